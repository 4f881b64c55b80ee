"""M3's MTP modules: vLLM's MiniMaxM3MTP names (read from vLLM's own loader code), checkpoints both ways,
transformers ignoring them, and the trainer's MTP loss on M3."""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import vllm
from safetensors import safe_open
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_m3

from forgerl.model import M3Config, MiniMaxM3ForCausalLM, load_m3_checkpoint, save_m3_checkpoint
from forgerl.model.m3 import M3DecoderLayer
from forgerl.model.m3_checkpoint import RELEASED, name_table
from forgerl.trainer.sft import sft_loss
from forgerl.trainer.step import RlStepConfig, build_batch, rl_step
from forgerl.v1 import trajectory_pb2

pytestmark = pytest.mark.unit

VLLM_MTP = Path(inspect.getfile(vllm)).parent / "models" / "minimax_m3" / "nvidia" / "mtp.py"


def tiny_with_mtp(modules: int = 2) -> MiniMaxM3ForCausalLM:
    torch.manual_seed(0)
    model = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny", vocab_size=64, num_mtp_modules=modules))
    with torch.no_grad():  # non-zero norms: a misplaced norm would not hide behind its identity init
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2)
    return model


def vllm_mtp_source() -> tuple[Callable[[object, str], str | None], set[str]]:
    """From vLLM's installed mtp.py (its package does not import on a machine without CUDA): the loader's
    checkpoint-name mapping `MiniMaxM3MTP._map_checkpoint_name`, compiled on its own, and the submodules
    `MiniMaxM3MultiTokenPredictorLayer.__init__` assigns (its parameters' name prefixes)."""
    tree = ast.parse(VLLM_MTP.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    mapper = next(
        f for f in classes["MiniMaxM3MTP"].body if isinstance(f, ast.FunctionDef) and f.name == "_map_checkpoint_name"
    )
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=[mapper], type_ignores=[]), str(VLLM_MTP), "exec"), namespace)
    init = next(
        f
        for f in classes["MiniMaxM3MultiTokenPredictorLayer"].body
        if isinstance(f, ast.FunctionDef) and f.name == "__init__"
    )
    submodules = {
        target.attr
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    return namespace["_map_checkpoint_name"], submodules  # type: ignore[return-value]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[MiniMaxM3ForCausalLM, Path]:
    model = tiny_with_mtp().eval()
    return model, save_m3_checkpoint(model, tmp_path_factory.mktemp("m3mtp"))


def test_mtp_tensors_carry_the_names_vllms_loader_reads(saved: tuple[MiniMaxM3ForCausalLM, Path]) -> None:
    """Every MTP tensor we write maps, through vLLM's own _map_checkpoint_name, to one of its MTP layer's
    submodules, and the decoder layer under `transformer_layer` is named exactly as a main MoE +
    sparse-attention layer of the released checkpoint (vLLM builds both with MiniMaxM3DecoderLayer and
    loads both with the same q/k/v, index_q/index_k, gate/up and w1/w2/w3 mapping)."""
    model, path = saved
    map_name, submodules = vllm_mtp_source()
    assert {"enorm", "hnorm", "eh_proj", "transformer_layer", "final_layernorm"} <= submodules
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = f.keys()
    mtp_names = [n for n in names if ".mtp." in n]
    main_layer = {
        name.removeprefix("language_model.model.layers.1.")
        for _, theirs in name_table(model.config, RELEASED)
        for name in theirs
        if name.startswith("language_model.model.layers.1.")
    }
    for k in range(model.config.num_mtp_modules):
        mapped = [map_name(None, n) for n in mtp_names if n.startswith(f"model.mtp.layers.{k}.")]
        assert all(m is not None and m.startswith(f"model.layers.{k}.") for m in mapped), mapped
        parts = {m.removeprefix(f"model.layers.{k}.") for m in mapped if m is not None}
        assert {p.split(".")[0] for p in parts} == submodules
        layer = {p.removeprefix("transformer_layer.") for p in parts if p.startswith("transformer_layer.")}
        experts = {re.sub(r"experts\.\d+\.", "experts.{e}.", p) for p in layer}
        assert experts == main_layer


def test_checkpoint_with_mtp_round_trips_and_transformers_loads_the_rest(
    saved: tuple[MiniMaxM3ForCausalLM, Path],
) -> None:
    model, path = saved
    loaded = load_m3_checkpoint(path)
    assert loaded.config == model.config and len(loaded.mtp) == 2
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    reference, info = hf_m3.MiniMaxM3VLForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - reference.eval()(ids).logits).abs().max().item() <= 1e-5
    without = load_m3_checkpoint_without_mtp(path)
    assert len(without.mtp) == 0  # a config that asks for no MTP skips the modules, as transformers does


def load_m3_checkpoint_without_mtp(path: Path) -> MiniMaxM3ForCausalLM:
    copy_dir = path.parent / "no_mtp"
    shutil.copytree(path, copy_dir, dirs_exist_ok=True)
    config = json.loads((copy_dir / "config.json").read_text())
    config["num_mtp_modules"] = 0
    (copy_dir / "config.json").write_text(json.dumps(config))
    return load_m3_checkpoint(copy_dir)


def test_mtp_block_is_an_moe_sparse_attention_layer() -> None:
    """vLLM forces MoE and sparse attention on the MTP layer: with layer 1's weights (MoE + indexer in the
    tiny preset), our MTP block computes what layer 1 computes, blocks dropped at 30 tokens."""
    model = tiny_with_mtp(1).eval()
    block = model.mtp[0].block
    assert isinstance(block, M3DecoderLayer) and block.self_attn.indexer is not None
    block.load_state_dict(model.model.layers[1].state_dict())
    x = torch.randn(2, 30, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    rope = model.rope(torch.arange(30).expand(2, 30), x.dtype)
    with torch.no_grad():
        ours, main = block(x, rope, None), model.model.layers[1](x, rope, None)
    assert torch.equal(ours.x_BTD, main.x_BTD) and torch.equal(ours.blocks_BGTN, main.blocks_BGTN)
    assert (ours.blocks_BGTN[..., -1] == -1).sum() < ours.blocks_BGTN[..., -1].numel()  # some query keeps 3


def test_counts_include_mtp_modules() -> None:
    cfg = M3Config.from_preset("minimax-m3-tiny", num_mtp_modules=3)
    with torch.device("meta"):
        model = MiniMaxM3ForCausalLM(cfg)
    assert sum(t.numel() for t in model.state_dict().values()) == cfg.m3_param_counts().total


def test_trainer_mtp_loss_on_m3_trains_only_the_mtp_modules() -> None:
    """SFT reports each module's loss; a CISPO step with the MTP loss (rl.mtp_trains_trunk off) moves every
    parameter outside the MTP modules exactly as a step without it, and trains the modules."""
    base = tiny_with_mtp().double()
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    loss, metrics = sft_loss(copy.deepcopy(base), ids, torch.ones_like(ids))
    assert {"mtp/loss_1", "mtp/loss_2"} <= metrics.keys() and torch.isfinite(loss)
    traj = trajectory_pb2.Trajectory(trajectory_id="t", group_id="g", task_id="g")
    other = trajectory_pb2.Trajectory(trajectory_id="u", group_id="g", task_id="g")
    for t, reward in ((traj, 1.0), (other, 0.0)):
        gen = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(int(reward) + 4)).tolist()
        t.turns.add(prompt_token_ids=ids[0, :20].tolist(), generated_token_ids=gen, behaviour_logprobs=[-4.0] * 8)
        t.reward.total = reward
    batch = build_batch([traj, other], gamma=1.0, policy_version=0)
    after = {}
    for name, weight in (("none", 0.0), ("mtp", 0.5)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        metrics = rl_step(model, opt, batch, RlStepConfig(prefix_merge=False, mtp_loss_weight=weight))
        after[name] = model.state_dict()
    assert metrics["mtp/loss"] > 0 and metrics["mtp/grad_norm"] > 0
    for key, value in after["none"].items():
        if key.startswith("mtp."):
            assert torch.equal(value, base.state_dict()[key]), key
        else:
            assert torch.equal(after["mtp"][key], value), key
    assert not torch.equal(after["mtp"]["mtp.1.eh_proj.weight"], base.state_dict()["mtp.1.eh_proj.weight"])
