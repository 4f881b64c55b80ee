"""DDP and FSDP2 on 2 gloo processes give the loss and gradients of one process on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgerl.model import load_checkpoint, update_expert_bias

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).parent))
import data_parallel_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def single_process() -> dict[str, object]:
    model = worker.build_model()
    loss = worker.loss_of(model, model, worker.global_batch(model.config.vocab_size))
    loss.backward()
    update_expert_bias(model, rate=1e-3)
    return {
        "loss": loss.detach(),
        "grads": {name: param.grad for name, param in model.named_parameters()},
        "bias": {name: b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")},
        "state": model.state_dict(),
    }


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(mode: str, tmp_path: Path, single_process: dict) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / f"{mode}.pt"
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(Path(worker.__file__)),
            "--mode",
            mode,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = torch.load(out)
    torch.testing.assert_close(ranks["loss"], single_process["loss"], rtol=1e-6, atol=0)
    assert ranks["grads"].keys() == single_process["grads"].keys()
    worst = 0.0
    for name, grad in single_process["grads"].items():
        scale = grad.abs().max().item()
        worst = max(worst, (ranks["grads"][name] - grad).abs().max().item() / max(scale, 1e-12))
    # Measured 4.2e-7 for both: float32 sums taken in a different order, nothing more.
    assert worst < 2e-6, f"largest gradient error relative to the tensor's max: {worst:.2e}"
    for name, bias in single_process["bias"].items():  # the loads were summed over ranks: the same step
        assert torch.equal(ranks["bias"][name], bias), name
    # The checkpoint written under the wrapper (FSDP2 gathers its shards) holds the full model.
    saved = load_checkpoint(tmp_path / f"{mode}-checkpoint").state_dict()
    for name, tensor in single_process["state"].items():
        assert torch.equal(saved[name], tensor), name
