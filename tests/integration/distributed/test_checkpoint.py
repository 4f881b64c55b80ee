"""Distributed checkpoints: saved by 4 gloo ranks under FSDP2 + EP2 after 3 of layout_case's 5 steps,
resumed on 2 ranks under EP2, FSDP2 alone and DDP (resharding the experts from 2 EP groups of 2 FSDP
shards to 2 EP ranks, to 2 FSDP shards, to whole replicas). Every resumed run's next losses and grad
norms, and its parameters after the last step, equal the uninterrupted single-process run's (and the
uninterrupted 4-rank run equals it too). Each resumed layout then exports a Hugging Face checkpoint from
its shards, which our loader and transformers read back with the single process's weights and logits.
Measured: every difference <= 5.6e-7.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.model import MiniMaxM2ForCausalLM, load_checkpoint

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5
SAVE_AT = 3
SAVE_LAYOUT = {"fsdp_ep2": {"dp_shard": 4, "ep": 2}}
RESUME_LAYOUTS = {"ep2": {"dp_shard": 2, "ep": 2}, "fsdp": {"dp_shard": 2}, "ddp": {}}  # each exports too


def _torchrun(ranks: int, layouts: dict, *args: str) -> dict:
    out = Path(args[-1])
    worker = Path(__file__).parent / "checkpoint_worker.py"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(ranks)]
    cmd += [str(worker), "--layouts", json.dumps(layouts), *args[:-1], "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_save_on_four_ranks_resume_on_two(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = case.build_model()
    ref = case.run_steps(model, model, case.optimizer(model))
    ref_state = model.state_dict()
    ckpt = tmp_path / "step-3"
    saved = _torchrun(4, SAVE_LAYOUT, "--save", str(ckpt), "--save-at", str(SAVE_AT), str(tmp_path / "save.pt"))
    assert (ckpt / ".metadata").exists() and len(list(ckpt.glob("*.distcp"))) == 4  # one file per rank
    export = tmp_path / "hf"
    resumed = _torchrun(2, RESUME_LAYOUTS, "--load", str(ckpt), "--export", str(export), str(tmp_path / "resume.pt"))
    assert set(resumed) == set(RESUME_LAYOUTS)
    for name, got in [*saved.items(), *resumed.items()]:
        assert got["first"] == SAVE_AT
        for offset, step in enumerate(range(SAVE_AT, case.STEPS)):
            assert got["loss"][offset] == pytest.approx(ref["loss"][step], abs=TOLERANCE), (name, step)
            assert got["grad_norm"][offset] == pytest.approx(ref["grad_norm"][step], abs=TOLERANCE), (name, step)
            assert torch.equal(got["loads"][offset], ref["loads"][step]), (name, step)
        for key, tensor in ref_state.items():
            error = (got["state"][key] - tensor).abs().max().item()
            assert error <= TOLERANCE, f"{name}: {key} differs by {error:.2e}"
    _check_exports(export, model, ref_state)


def _check_exports(export: Path, model: MiniMaxM2ForCausalLM, ref_state: dict[str, torch.Tensor]) -> None:
    """The HF checkpoints written from the shards (several files per writer rank) hold the trained weights,
    and transformers' own MiniMaxM2ForCausalLM computes the single process's logits from them."""
    ids = torch.randint(0, case.VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.eval()(ids).logits
    for name in RESUME_LAYOUTS:
        path = export / name
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == len(list(path.glob("model-*-of-*.safetensors"))) > 2
        loaded = load_checkpoint(path).state_dict()
        for key, tensor in ref_state.items():
            assert (loaded[key] - tensor).abs().max().item() <= TOLERANCE, (name, key)
        theirs = transformers.MiniMaxM2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            error = (theirs(ids).logits - expected).abs().max().item()
        assert error <= TOLERANCE, f"{name}: transformers' logits differ by {error:.2e}"
