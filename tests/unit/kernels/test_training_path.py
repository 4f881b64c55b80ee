"""Our Triton kernels inside training (issue 19, item 6): `moe_backend: triton` runs the experts on the
fused-MoE kernels and `attn_backend: tree | msa` the attention on the tree / MSA kernels, forward and
backward (Triton backward kernels, no recomputation in torch). Checked against the torch path's
autograd: the experts module alone in float64, then one whole RL step (rl_step: prefix-merged packs,
CISPO, clipping, AdamW, the expert-bias update) of the debug preset, whose loss, grad norm and updated
parameters must equal the torch step's within 1e-4. Tiny shapes: the interpreter is slow.
"""

import math

import pytest
import torch
from kernel_cases import DEVICES, rel_err

from forgerl.kernels.msa.naive import naive_msa, naive_select_blocks
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.attention import TreeMask, register_attention_backend
from forgerl.model.moe import Experts
from forgerl.rl.prefix_tree import PrefixForest
from forgerl.trainer.step import RlBatch, RlStepConfig, rl_step

STEP_TOLERANCE = 1e-4  # the bound for one step
VOCAB = 128


@pytest.mark.parametrize("device", DEVICES)
def test_experts_kernel_matches_the_torch_experts_autograd(device: str) -> None:
    """Forward and every gradient (x, routing weights, w1, w2, w3) of Experts on moe_backend 'triton' in
    float32 against the torch Experts in float64; expert 4 of 6 gets no token."""
    n, d, e, f, k = 21, 24, 6, 20, 2
    g = torch.Generator().manual_seed(3)
    cfg = ModelConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])  # never expert e - 1
    ids[ids == 4] = 5
    ids = torch.where(ids[:, :1] == ids[:, 1:], torch.tensor([[0, 1]]), ids)
    weights = torch.rand(n, k, generator=g).softmax(-1)
    x, grad = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    stacks = [torch.randn(e, f, d, generator=g) * d**-0.5, torch.randn(e, d, f, generator=g) * f**-0.5]
    stacks.insert(2, torch.randn(e, f, d, generator=g) * d**-0.5)
    outputs = {}
    for backend, dtype, dev in (("triton", torch.float32, device), ("torch", torch.float64, "cpu")):
        experts = Experts(cfg.replace(moe_backend=backend)).to(dev, dtype)
        with torch.no_grad():
            for param, value in zip((experts.w1, experts.w2, experts.w3), stacks, strict=True):
                param.copy_(value)
        leaves = [t.detach().to(dev, dtype).clone().requires_grad_() for t in (x, weights)]
        counts = torch.bincount(ids.reshape(-1), minlength=e).to(dev)
        y = experts(leaves[0], ids.to(dev), leaves[1], counts)
        y.backward(grad.to(dev, dtype))
        outputs[backend] = [y, *(t.grad for t in leaves), experts.w1.grad, experts.w2.grad, experts.w3.grad]
    for name, got, want in zip(
        ("y", "x", "weights", "w1", "w2", "w3"), outputs["triton"], outputs["torch"], strict=True
    ):
        assert got is not None and want is not None
        assert rel_err(got.cpu(), want) < 1e-5, name
    w1_grad = outputs["triton"][3]
    assert w1_grad is not None and float(w1_grad[4].abs().max()) == 0.0  # the idle expert: exactly zero


def _batch(g: torch.Generator, rows: int, shortest: int, longest: int) -> RlBatch:
    """Rows in 2 groups sharing a 9-token prompt per group (real prefix trees)."""
    prompts = torch.randint(0, VOCAB, (2, 9), generator=g)
    lengths = torch.randint(shortest, longest + 1, (rows,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(0, VOCAB, (rows, width), generator=g)
    ids[:, :9] = prompts.repeat_interleave(rows // 2, dim=0)
    steps = torch.arange(width - 1)
    mask = (steps[None] >= 8) & (steps[None] < lengths[:, None] - 1)
    old = -math.log(VOCAB) + 0.3 * torch.randn(rows, width - 1, generator=g)
    adv = torch.randn(rows, 1, generator=g).expand(rows, width - 1).contiguous()
    return RlBatch(ids, lengths, old, adv, mask, None)


def _step(cfg: ModelConfig, state: dict[str, torch.Tensor], batch: RlBatch, merge: bool) -> tuple[dict, dict]:
    model = MiniMaxM2ForCausalLM(cfg).train()
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    step_cfg = RlStepConfig(prefix_merge=merge, max_tokens_per_pack=None, bias_update_rate=1e-3)
    metrics = rl_step(model, opt, batch, step_cfg)
    return metrics, {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_steps_equal(
    kernels: tuple[dict, dict], reference: tuple[dict, dict], initial: dict[str, torch.Tensor]
) -> None:
    (metrics, state), (ref_metrics, ref_state) = kernels, reference
    for key in ("policy/loss", "grad_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=STEP_TOLERANCE), key
    moved = 0.0
    for name, tensor in ref_state.items():
        assert (state[name] - tensor).abs().max().item() <= STEP_TOLERANCE, name
        moved = max(moved, (tensor - initial[name]).abs().max().item())
    assert moved > 10 * STEP_TOLERANCE  # the step moved the weights well past the tolerance


@pytest.mark.parametrize("device", DEVICES[:1])
def test_one_step_on_the_tree_and_moe_kernels_equals_the_torch_step(device: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, num_mtp_modules=0)
    initial = MiniMaxM2ForCausalLM(cfg).state_dict()
    batch = _batch(torch.Generator().manual_seed(1), rows=6, shortest=13, longest=18)
    forest = PrefixForest.build(batch.input_ids, batch.lengths)
    assert forest.num_packed_tokens < forest.num_input_tokens  # shared prefixes: the kernel sees real trees
    reference = _step(cfg, initial, batch, merge=True)
    kernels = _step(cfg.replace(attn_backend="tree", moe_backend="triton"), initial, batch, merge=True)
    _assert_steps_equal(kernels, reference, initial)


def _msa_reference(block: int, top_k: int):  # type: ignore[no-untyped-def]
    """MSA in torch (kernels/msa/naive.py's selection and attention), one batch row at a time: autograd
    gives the reference gradients."""

    def backend(q_BHTK, k_BGSK, v_BGSK, mask_BTS: torch.Tensor | TreeMask | None, scale: float):  # type: ignore[no-untyped-def]
        assert mask_BTS is None
        rows = []
        for q_HTK, k_GSK, v_GSK in zip(q_BHTK, k_BGSK, v_BGSK, strict=True):
            q_THK, k_SGK, v_SGK = (t.transpose(0, 1) for t in (q_HTK, k_GSK, v_GSK))
            selected = naive_select_blocks(q_THK.detach(), k_SGK.detach(), block, top_k)
            rows.append(naive_msa(q_THK, k_SGK, v_SGK, selected, block, scale).transpose(0, 1))
        return torch.stack(rows)

    return backend


@pytest.mark.parametrize("device", DEVICES[:1])
def test_one_step_on_the_msa_kernel_equals_the_torch_msa_step(device: str) -> None:
    """Blocks of 16 tokens (the kernel's smallest tile), 1 picked besides the first and the local block:
    rows of 49..52 tokens (4 blocks) attend sparsely. One layer, unmerged rows (MSA is causal only), the
    experts in torch (the test above covers their kernel): the interpreter takes minutes per MSA layer."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, num_hidden_layers=1, num_mtp_modules=0, msa_block_size=16, msa_top_k=1)
    initial = MiniMaxM2ForCausalLM(cfg).state_dict()
    batch = _batch(torch.Generator().manual_seed(2), rows=2, shortest=49, longest=52)
    register_attention_backend("msa_reference", _msa_reference(16, 1))
    reference = _step(cfg.replace(attn_backend="msa_reference"), initial, batch, merge=False)
    kernels = _step(cfg.replace(attn_backend="msa"), initial, batch, merge=False)
    dense = _step(cfg, initial, batch, merge=False)
    _assert_steps_equal(kernels, reference, initial)
    assert abs(dense[0]["policy/loss"] - reference[0]["policy/loss"]) > 10 * STEP_TOLERANCE  # it is sparse
