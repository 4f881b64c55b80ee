"""The fixes the ForgeRL plugin applies to vLLM (0.32, CPU build), each on one vLLM module.

Every `apply` takes the freshly imported vLLM module, is idempotent (a patched function carries
`__forgerl_fix__`) and keeps the original reachable as `__wrapped__`, so tests can call both.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

MARK = "__forgerl_fix__"


@dataclass(frozen=True)
class Fix:
    name: str
    module: str
    apply: Callable[[ModuleType], None]
    why: str


def _is_patched(func: object) -> bool:
    return getattr(func, MARK, None) is not None


def _mark(wrapper: Any, original: Callable[..., Any], name: str) -> Any:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, name)
    return wrapper


# --- 1. sigmoid routing on CPU ---------------------------------------------------------------------------

CPU_ROUTER_MODULE = "vllm.model_executor.layers.fused_moe.router.cpu_router"


def apply_cpu_sigmoid_routing(module: ModuleType) -> None:
    """Send sigmoid scoring through `_grouped_topk` with one group instead of the softmax-only branch.

    `CPURouter._compute_routing` asserts `scoring_func == "softmax"` unless grouped top-k is on. With one
    group (and top-1 group) the grouped path is plain top-k: sigmoid scores, `+ e_score_correction_bias` for
    the choice only, weights gathered from the unbiased scores and renormalised: MiniMax-M2's router.
    """
    router_cls = module.CPURouter
    original = router_cls._compute_routing
    if _is_patched(original):
        return
    grouped_topk = module._grouped_topk

    def _compute_routing(self: Any, hidden_states: Any, router_logits: Any, indices_type: Any, **kwargs: Any):
        if not self.use_grouped_topk and self.scoring_func == "sigmoid" and self.custom_routing_function is None:
            return grouped_topk(
                gating_output=router_logits,
                topk=self.top_k,
                renormalize=self.renormalize,
                num_expert_group=1,
                topk_group=1,
                scoring_func="sigmoid",
                routed_scaling_factor=self.routed_scaling_factor,
                e_score_correction_bias=self.e_score_correction_bias,
            )
        return original(self, hidden_states, router_logits, indices_type, **kwargs)

    router_cls._compute_routing = _mark(_compute_routing, original, "cpu_sigmoid_routing")


# --- 2. functools.partial weight loaders in the layerwise reload -----------------------------------------

LAYERWISE_MODULE = "vllm.model_executor.model_loader.reload.layerwise"


def apply_reload_partial_loader_name(module: ModuleType) -> None:
    """Give weight loaders without a `__name__` (a `functools.partial`) one before the reload reads it.

    `initialize_layerwise_reload` compares `weight_loader.__name__` with "online_process_loader" for every
    parameter; MiniMax-M2's q_norm / k_norm (`MiniMaxText01RMSNormTP`) use a partial loader, so
    `collective_rpc("reload_weights")` died with AttributeError. A partial accepts attributes, so the
    loader is given the name of the function it wraps; nothing else about it changes.
    """
    original = module._get_weight_loader
    if _is_patched(original):
        return

    def _get_weight_loader(tensor: Any) -> Any:
        loader = original(tensor)
        if not hasattr(loader, "__name__"):
            inner = getattr(loader, "func", None)
            name = getattr(inner, "__name__", type(loader).__name__)
            try:
                loader.__name__ = name
            except (AttributeError, TypeError):  # an object without a __dict__: wrap it instead
                loader = _named(loader, name)
                tensor.weight_loader = loader
        return loader

    module._get_weight_loader = _mark(_get_weight_loader, original, "reload_partial_loader_name")  # type: ignore[attr-defined]


def _named(loader: Callable[..., Any], name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return loader(*args, **kwargs)

    call.__name__ = name
    call.__signature__ = inspect.signature(loader)  # type: ignore[attr-defined]
    return call


# --- 3. CPU MoE expert weights after a reload -------------------------------------------------------------

UNQUANTIZED_MOE_MODULE = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"


def apply_cpu_moe_reprepack_on_reload(module: ModuleType) -> None:
    """Prepack the CPU MoE expert weights again when a weight update re-runs the kernel set-up.

    `UnquantizedFusedMoEMethod._setup_kernel` only calls `fused_experts.process_weights_after_loading`
    (which pads and prepacks the experts into the CPU grouped-GEMM layout) on the first load; on a weight
    update it copies the reloaded, unpacked weights over the prepacked buffers, and the model silently
    computes garbage. On CPU the experts' own processing is run again on the update.
    """
    method_cls = module.UnquantizedFusedMoEMethod
    original = method_cls._setup_kernel
    if _is_patched(original):
        return

    def _setup_kernel(self: Any, layer: Any, w13: Any, w2: Any) -> None:
        is_weight_update = self.moe_kernel is not None
        original(self, layer, w13, w2)
        if is_weight_update and _on_cpu():
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    method_cls._setup_kernel = _mark(_setup_kernel, original, "cpu_moe_reprepack_on_reload")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# --- 4. head sizes the CPU attention kernel lacks -----------------------------------------------------------

ATTENTION_MODULE = "vllm.model_executor.layers.attention.attention"


def padded_head_size(head_size: int, supported: list[int]) -> int | None:
    """The smallest supported head size above `head_size`, or None if it is supported (or none is larger)."""
    if head_size in supported:
        return None
    larger = [s for s in sorted(supported) if s > head_size]
    return larger[0] if larger else None


def pad_heads(x: Any, heads: int, size: int, padded: int) -> Any:
    """[tokens, heads * size] -> [tokens, heads * padded], zeros after each head's `size` channels."""
    import torch.nn.functional as F

    return F.pad(x.reshape(-1, heads, size), (0, padded - size)).reshape(-1, heads * padded)


def unpad_heads(x: Any, heads: int, size: int, padded: int) -> Any:
    return x.reshape(-1, heads, padded)[..., :size].reshape(-1, heads * size)


def apply_cpu_attention_head_padding(module: ModuleType) -> None:
    """Run attention of an unsupported head size (the debug preset's 16) at the next supported one (32).

    vLLM's CPU attention kernel has head sizes 32, 64, 80, ... only; a model with head_dim 16 starts and
    then dies on its first forward ("Unsupported CPU attention configuration"). The layer is built with the
    padded size (so the KV cache is too), q, k and v get zero channels after each head's real ones, and the
    output keeps the real channels. The softmax scale is the model's own (1/sqrt(real head_dim)); zero
    channels add nothing to q.k and produce zero output channels, so the result is exact.
    """
    attention_cls = module.Attention
    original_init = attention_cls.__init__
    if _is_patched(original_init):
        return
    original_forward = attention_cls.forward

    def __init__(self: Any, num_heads: int, head_size: int, scale: float, *args: Any, **kwargs: Any) -> None:
        padded = None
        if _on_cpu() and kwargs.get("head_size_v") in (None, head_size) and kwargs.get("attn_backend") is None:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            padded = padded_head_size(head_size, CPUAttentionBackend.get_supported_head_sizes())
        if padded is None:
            original_init(self, num_heads, head_size, scale, *args, **kwargs)
            return
        kwargs.pop("head_size_v", None)
        original_init(self, num_heads, padded, scale, *args, **kwargs)
        self._forgerl_real_head_size = head_size

    def forward(self: Any, query: Any, key: Any, value: Any, output_shape: Any = None, output_dtype: Any = None):
        real = getattr(self, "_forgerl_real_head_size", None)
        if real is None:
            return original_forward(self, query, key, value, output_shape, output_dtype)
        padded = self.head_size
        q = pad_heads(query, self.num_heads, real, padded)
        k = None if key is None else pad_heads(key, self.num_kv_heads, real, padded)
        v = None if value is None else pad_heads(value, self.num_kv_heads, real, padded)
        out = original_forward(self, q, k, v, None, output_dtype)
        out = unpad_heads(out, self.num_heads, real, padded)
        return out if output_shape is None else out.reshape(output_shape)

    attention_cls.__init__ = _mark(__init__, original_init, "cpu_attention_head_padding")
    attention_cls.forward = _mark(forward, original_forward, "cpu_attention_head_padding")


# --- 5. MTP layers of any number dropped at load ---------------------------------------------------------

MINIMAX_M2_MODULE = "vllm.model_executor.models.minimax_m2"


def main_layers_only(num_hidden_layers: int) -> re.Pattern[str]:
    """A name of a layer after the first `num_hidden_layers` (an MTP module's), as MiniMaxM2Model sees it."""
    main = "|".join(str(i) for i in range(num_hidden_layers))
    return re.compile(rf"^layers\.(?!(?:{main})\.)\d+\.")


def apply_mtp_layers_any_count(module: ModuleType) -> None:
    """Drop every MTP layer at load, however many the checkpoint has.

    `MiniMaxM2Model.__init__` drops `layers.{L + i}` for i below the `num_mtp_modules` of the config the engine
    started with; a checkpoint whose MTP modules grew since (`rl.grow_mtp_to`: 1 -> 3) then fails to reload
    ("There is no module or parameter named 'layers.L+1...'"). vLLM serves no MTP module (no speculative
    decoding here), so every layer after the main ones is dropped, as vLLM drops the first num_mtp_modules."""
    model_cls = module.MiniMaxM2Model
    original_init = model_cls.__init__
    if _is_patched(original_init):
        return
    mapper_cls = module.WeightsMapper

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        layers = self.config.num_hidden_layers
        self.hf_to_vllm_mapper = self.hf_to_vllm_mapper | mapper_cls(orig_to_new_regex={main_layers_only(layers): None})

    model_cls.__init__ = _mark(__init__, original_init, "mtp_layers_any_count")


FIXES: dict[str, Fix] = {
    fix.name: fix
    for fix in (
        Fix(
            "cpu_sigmoid_routing",
            CPU_ROUTER_MODULE,
            apply_cpu_sigmoid_routing,
            "CPU MoE router asserts softmax scoring; MiniMax-M2 routes with sigmoid + expert bias",
        ),
        Fix(
            "reload_partial_loader_name",
            LAYERWISE_MODULE,
            apply_reload_partial_loader_name,
            "layerwise reload reads weight_loader.__name__; functools.partial loaders have none",
        ),
        Fix(
            "cpu_moe_reprepack_on_reload",
            UNQUANTIZED_MOE_MODULE,
            apply_cpu_moe_reprepack_on_reload,
            "after reload_weights the CPU MoE experts were left unpacked in the prepacked buffers",
        ),
        Fix(
            "cpu_attention_head_padding",
            ATTENTION_MODULE,
            apply_cpu_attention_head_padding,
            "CPU attention kernel has no head size 16 (debug preset); run it zero-padded to 32",
        ),
        Fix(
            "mtp_layers_any_count",
            MINIMAX_M2_MODULE,
            apply_mtp_layers_any_count,
            "a reload drops only as many MTP layers as the engine started with; grown MTP modules failed it",
        ),
    )
}
