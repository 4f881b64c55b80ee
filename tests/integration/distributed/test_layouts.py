"""The maths does not change with the layout: 5 RL steps (rl_step: CISPO, clipping, AdamW, expert-bias
update, routing replay on two steps) of the tiny preset on the same batches give, per step, the same loss,
grad norm and expert loads, and the same parameters and routing biases after them, whether one process
trains or 2 / 4 gloo ranks do it under DDP, FSDP2, FSDP2 + EP, EP alone, HSDP + EP or EP with every
layer recomputed in backward. The reference is
the single-process run in this test's own process.

Measured: every difference <= 6.2e-7 (float32 sums in another order); the loads are equal. Each torchrun
(all its layouts in one process group) takes 25-45 s on 2 busy cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.distributed import ParallelConfig
from forgerl.distributed.materialize import local_bytes, seeded_init_
from forgerl.model import MiniMaxM2ForCausalLM

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5  # the bound for float32
LAYOUTS = {
    2: {
        "ddp": {},
        "fsdp": {"dp_shard": 2},
        "fsdp_ep2": {"dp_shard": 2, "ep": 2},
        "ep2_recompute": {"dp_shard": 2, "ep": 2, "activation_checkpoint_every": 1},
    },
    4: {
        "ddp": {},
        "fsdp": {"dp_shard": 4},
        "fsdp_ep2": {"dp_shard": 4, "ep": 2},
        "ep4": {"dp_shard": 4, "ep": 4},
        "hsdp_ep2": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
    },
}


@pytest.fixture(scope="module")
def single_process() -> dict:
    torch.set_num_threads(1)
    model = case.build_model()
    record = case.run_steps(model, model, case.optimizer(model))
    record["state"] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return record


@pytest.mark.parametrize("ranks", sorted(LAYOUTS))
def test_layouts_match_one_process(ranks: int, tmp_path: Path, single_process: dict) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "layouts.pt"
    worker = Path(__file__).parent / "layout_worker.py"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks), str(worker)]
    cmd += ["--layouts", json.dumps(LAYOUTS[ranks]), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    layouts = torch.load(out, weights_only=False)
    assert set(layouts) == set(LAYOUTS[ranks])
    ref = single_process
    for name, got in layouts.items():
        for step in range(case.STEPS):
            assert got["loss"][step] == pytest.approx(ref["loss"][step], abs=TOLERANCE), (name, step)
            assert got["grad_norm"][step] == pytest.approx(ref["grad_norm"][step], abs=TOLERANCE), (name, step)
            # Also with recompute: torch 2.13's non-reentrant checkpoint stops recomputing a layer once it has
            # what backward needs (early_stop), before the MoE block adds its counts a second time.
            assert torch.equal(got["loads"][step], ref["loads"][step]), (name, step)
        assert got["state"].keys() == ref["state"].keys(), name
        for key, tensor in ref["state"].items():
            assert got["state"][key].shape == tensor.shape, (name, key)
            error = (got["state"][key] - tensor).abs().max().item()
            assert error <= TOLERANCE, f"{name}: {key} differs by {error:.2e} after {case.STEPS} steps"
    # Built on the meta device and materialised shard by shard: the single-device seeded init, exactly,
    # and no rank held more than 1 / dp_shard of it (plus FSDP2's padding of uneven dim-0 chunks).
    seeded = MiniMaxM2ForCausalLM(case.model_config())
    seeded_init_(seeded, case.SEED)
    total = local_bytes(seeded)
    for name, got in layouts.items():
        for key, tensor in seeded.state_dict().items():
            assert torch.equal(got["meta_init"][key], tensor), (name, key)
        shards = ParallelConfig.from_dict(LAYOUTS[ranks][name]).resolve(ranks, 8).dp_shard  # 1 for DDP
        assert got["max_rank_bytes"] <= total / shards * 1.01, (name, got["max_rank_bytes"], total)
    # The steps moved the weights well beyond the tolerance, and the routing bias moved: the check has teeth.
    moved = case.build_model().state_dict()
    assert max((ref["state"][k] - moved[k]).abs().max().item() for k in moved) > 100 * TOLERANCE
    assert any(ref["state"][k].abs().max() > 0 for k in moved if k.endswith("e_score_correction_bias"))
