"""Each fix of the ForgeRL vLLM plugin, on the vLLM code it fixes: the original fails, the fix works.

These import vLLM's layers in-process (no engine): ~15 s of imports, no subprocess except the first test.
The engine-level consequences (parity, reload equals a fresh engine) are in test_inference_service.py.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


def test_register_imports_neither_vllm_nor_torch() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import forgerl.vllm_plugin as p; p.register(); p.register(); "
        "dt = time.perf_counter() - t; "
        "print(dt, 'vllm' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]
    assert float(out[0]) < 1.0


@pytest.fixture(scope="module")
def plugin_applied() -> None:
    import forgerl.vllm_plugin as plugin

    plugin.register()


def hf_router(logits: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' MiniMaxM2TopKRouter: sigmoid, bias for the choice only, renormalised weights."""
    scores = logits.float().sigmoid()
    _, ids = torch.topk(scores + bias, k, dim=-1)
    weights = scores.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True), ids


def test_cpu_sigmoid_routing(plugin_applied: None) -> None:
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    torch.manual_seed(0)
    logits, bias = torch.randn(5, 8), torch.randn(8) * 0.5
    router = cpu_router.CPURouter(
        top_k=2, global_num_experts=8, scoring_func="sigmoid", e_score_correction_bias=bias, renormalize=True
    )
    original = cpu_router.CPURouter._compute_routing.__wrapped__
    with pytest.raises(AssertionError):
        original(router, None, logits, None)
    weights, ids = router._compute_routing(None, logits, None)
    ref_weights, ref_ids = hf_router(logits, bias, 2)
    order, ref_order = ids.long().argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.long().gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order))
    # softmax routing is untouched
    softmax = cpu_router.CPURouter(top_k=2, global_num_experts=8, scoring_func="softmax", renormalize=True)
    w, i = softmax._compute_routing(None, logits, None)
    ref = torch.softmax(logits, -1).topk(2, -1)
    torch.testing.assert_close(
        w.gather(1, i.long().argsort(-1)),
        (ref.values / ref.values.sum(-1, keepdim=True)).gather(1, ref.indices.argsort(-1)),
    )


class NormWithPartialLoader(torch.nn.Module):
    """The shape of MiniMaxText01RMSNormTP: a parameter whose weight_loader is a functools.partial."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4))
        self.weight.weight_loader = functools.partial(self.load, scale=2.0)  # type: ignore[attr-defined]

    @staticmethod
    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, scale: float) -> None:
        param.data.copy_(loaded_weight * scale)


def reload_partial(layerwise: object) -> torch.Tensor:
    model = torch.nn.Sequential(NormWithPartialLoader())
    layerwise.record_metadata_for_reloading(model)  # type: ignore[attr-defined]
    layerwise.initialize_layerwise_reload(model)  # type: ignore[attr-defined]
    param = model[0].weight
    param.weight_loader(param, torch.ones(4))
    layerwise.finalize_layerwise_reload(model, None)  # type: ignore[attr-defined]
    return model[0].weight.detach().clone()


def test_reload_partial_loader_name(plugin_applied: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.model_loader.reload import layerwise

    torch.set_default_device("cpu")
    assert torch.equal(reload_partial(layerwise), torch.full((4,), 2.0))
    monkeypatch.setattr(layerwise, "_get_weight_loader", layerwise._get_weight_loader.__wrapped__)
    with pytest.raises(AttributeError, match="__name__"):
        reload_partial(layerwise)


def test_cpu_moe_reprepack_on_reload(plugin_applied: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a weight update `_setup_kernel` must run the CPU experts' own processing (the prepack) again."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as moe

    monkeypatch.setattr(
        moe, "convert_to_unquantized_kernel_format", lambda *a, w13_weight, w2_weight, **k: (w13_weight, w2_weight)
    )
    prepacked: list[object] = []
    method = SimpleNamespace(
        unquantized_backend=None,
        moe_kernel=SimpleNamespace(fused_experts=SimpleNamespace(process_weights_after_loading=prepacked.append)),
    )
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(torch.zeros(2, 4, 3), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(torch.zeros(2, 3, 2), requires_grad=False)
    layer.moe_config = None

    patched = moe.UnquantizedFusedMoEMethod._setup_kernel
    patched.__wrapped__(method, layer, layer.w13_weight, layer.w2_weight)
    assert prepacked == []  # vLLM as shipped: the reloaded experts are never prepacked
    patched(method, layer, layer.w13_weight, layer.w2_weight)
    assert prepacked == [layer]


def test_cpu_attention_head_padding_is_exact() -> None:
    from forgerl.vllm_plugin.fixes import pad_heads, unpad_heads

    torch.manual_seed(0)
    tokens, heads, kv_heads, size, padded = 7, 4, 2, 16, 32
    q, k, v = (
        torch.randn(tokens, heads * size),
        torch.randn(tokens, kv_heads * size),
        torch.randn(tokens, kv_heads * size),
    )

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int) -> torch.Tensor:
        qh = q.view(tokens, heads, d).transpose(0, 1)
        kh = k.view(tokens, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vh = v.view(tokens, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=size**-0.5)
        return out.transpose(0, 1).reshape(tokens, heads * d)

    ref = attend(q, k, v, size)
    out = attend(
        pad_heads(q, heads, size, padded),
        pad_heads(k, kv_heads, size, padded),
        pad_heads(v, kv_heads, size, padded),
        padded,
    )
    torch.testing.assert_close(unpad_heads(out, heads, size, padded), ref, rtol=0, atol=1e-6)
