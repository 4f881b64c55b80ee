"""rl_step under 2 gloo ranks equals one process where it needs collectives beyond the policy loss's:

- the MTP loss is a mean over every rank's trained tokens (not a mean of per-rank means): 3 steps with 2
  MTP modules at weight 0.3, under DDP and FSDP2 + EP2, give the single process's losses, MTP loss, grad
  norms, expert loads and parameters;
- fill_routes' extra forward runs on every rank when any rank has positions without a recorded route:
  with only rank 1's rows missing routes, FSDP2 + EP2 neither hangs (collectives time out after 60 s in
  the worker, the run after 300 s here) nor drifts from the single process.

The reference is the single-process run in this test's own process (layout_case's model and batches).
Measured (2 busy cores, ~15 s): every difference <= 1.3e-6, loads equal. With the MTP loss a per-rank
mean, both layouts' grad norm differed by 8.6e-3 at step 0 and the policy loss by 2.4e-4 at step 1; with
the forward only where routes are missing, the partial-routes run failed at the 60 s gloo timeout (rank
1's fill_routes forward all-gathered against rank 0's training forward).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5  # test_layouts.py's bound for float32
FSDP_EP2 = {"dp_shard": 2, "ep": 2}
LAYOUTS = {"mtp/ddp": {}, "mtp/fsdp_ep2": FSDP_EP2, "routes/fsdp_ep2": FSDP_EP2}


def single_process(kind: str) -> dict:
    mtp_modules, step_config, step_batches = case.step_case(kind)
    model = case.build_model(mtp_modules)
    record = case.run_steps(model, model, case.optimizer(model), step_config=step_config, step_batches=step_batches)
    record["state"] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return record


def run_ranks(out: Path) -> subprocess.CompletedProcess[str]:
    """torchrun the worker on 2 ranks; on timeout kill its whole process group (the ranks too)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    worker = Path(__file__).parent / "step_collectives_worker.py"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(worker)]
    cmd += ["--layouts", json.dumps(LAYOUTS), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the 2-rank run did not finish in 300 s: a rank is waiting on a collective")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_mtp_loss_and_partial_routes_match_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    result = run_ranks(tmp_path / "records.pt")
    assert result.returncode == 0, result.stderr[-4000:]
    records = torch.load(tmp_path / "records.pt", weights_only=False)
    assert set(records) == set(LAYOUTS)
    references = {kind: single_process(kind) for kind in ("mtp", "routes")}
    assert len(references["mtp"]["mtp_loss"]) == 3 and not references["routes"]["mtp_loss"]
    for name, got in records.items():
        ref = references[name.split("/")[0]]
        for key in ("loss", "grad_norm", "mtp_loss"):
            assert got[key] == pytest.approx(ref[key], abs=TOLERANCE), (name, key, got[key], ref[key])
        for step, loads in enumerate(ref["loads"]):
            assert torch.equal(got["loads"][step], loads), (name, step)
        assert got["state"].keys() == ref["state"].keys(), name
        for key, tensor in ref["state"].items():
            error = (got["state"][key] - tensor).abs().max().item()
            assert error <= TOLERANCE, f"{name}: {key} differs by {error:.2e}"
