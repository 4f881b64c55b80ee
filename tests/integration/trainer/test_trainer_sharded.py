"""The trainer's torchrun worker under `trainer.parallel: {dp_shard: 2, ep: 2}` (FSDP2 + expert parallelism
on 2 gloo ranks) against the single-process trainer in this test's process, the independent reference:
the same init checkpoint and config (SFT, then CISPO RL on in-process episodes with MTP grown to 2
modules), so the same SFT batches and -- sampled from the same weights with the same generator -- the same
RL episodes. Per step: the losses and grad norms agree, the batches are the same ones (rows, rewards,
turns, advantages), held-out success (evaluated on both ranks from a gathered replica) is equal, and the
published Hugging Face checkpoint (written from the shards) holds the reference's weights.

Then a sharded run killed (SIGKILL to the whole torchrun) after an RL step's state is durable, started
again with the same run id on 2 ranks, resumes from its distributed checkpoint: no SFT step again, and
every step it trains equals the reference's.

Measured (2026-12-06, 2 loaded cores): losses and grad norms within 3.8e-6 (SFT step 1's grad norm; RL
losses within 3.3e-7), weights after the run within 1.3e-5; the killed run resumed at RL step 2 of 3 with
the reference's losses. Both tests 740 s at a load average of ~20 (the reference, three torchruns).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, load_checkpoint, save_checkpoint
from forgerl.model.tokenizer import load_tokenizer
from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import run_config_from_dict

pytestmark = pytest.mark.integration

TOLERANCE = 1e-5  # float32 sums in another order (the layout tests measure <= 1.3e-6)
# Weights after 5 AdamW steps at learning rates up to 3e-3: AdamW divides by sqrt(v), which turns a
# 1e-7 difference in a small gradient into a larger one of the step (measured up to 1.3e-5);
# each weight moved up to 1.5e-2, so 1e-4 is under 1% of the movement.
WEIGHT_TOLERANCE = 1e-4
SFT_STEPS, RL_STEPS = 2, 3
LAYOUT = {"dp_shard": 2, "ep": 2}


def _config(init_checkpoint: Path) -> dict:
    return {
        "name": "sharded",
        "init_checkpoint": str(init_checkpoint),
        "seed": 1,
        "checkpoint_every": 2,
        "sft": {"steps": SFT_STEPS, "batch_size": 4, "learning_rate": 3e-3, "examples": 16},
        "rl": {
            "steps": RL_STEPS, "batch_size": 8, "group_size": 4, "learning_rate": 1e-3,
            "mtp_loss_weight": 0.1, "grow_mtp_to": 2,
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The tiny preset at the tokenizer's size, one MTP module, torch's initialisation, no expert-bias
    updates. With them, the routing biases part: the loads count the tokens each rank computes, and prefix
    merging computes a prompt that rows on both ranks share once per rank, but once in one process. Measured
    with the model's 1e-3: every loss still within 4e-6, but after 2 RL steps one routing bias of the grown
    MTP module 2e-3 apart (a load on the other side of the mean), and then its experts 1e-3. The layout tests
    (tests/integration/distributed) check the bias update under every layout on rows sharing no prefix."""
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(7)
    cfg = ModelConfig.from_preset("tiny", vocab_size=len(tokenizer), num_mtp_modules=1, bias_update_rate=0.0)
    model = MiniMaxM2ForCausalLM(cfg)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("init") / "tiny")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, init_checkpoint: Path) -> dict:
    """{(stage, step): metrics} of the single-process trainer, and its run directory."""
    runs = tmp_path_factory.mktemp("single")
    records: dict[tuple[str, int], dict[str, float]] = {}

    def sink(stage: str, step: int, values: dict[str, float]) -> None:
        records.setdefault((stage, step), {}).update(values)

    settings = TrainerSettings(runs_dir=runs, eval_tasks=4, eval_every=2, local_episodes=True)
    run = TrainingRun("single", run_config_from_dict(_config(init_checkpoint)), settings, sink=sink)
    assert run.run().stage == "done"
    return {"metrics": records, "dir": runs / "single"}


def _command(tmp_path: Path, init_checkpoint: Path, run_id: str) -> list[str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**_config(init_checkpoint), "trainer": {"parallel": LAYOUT}}))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "forgerl.trainer.worker", str(path),
        "--run-id", run_id, "--runs-dir", str(tmp_path / "runs"), "--eval-tasks", "4", "--eval-every", "2",
        "--local-episodes",
    ]  # fmt: skip


def _metrics(run_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    records: dict[tuple[str, int], dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        values = json.loads(line)
        records.setdefault((values.pop("stage"), values.pop("step")), {}).update(values)
    return records


def _assert_steps_match(got: dict, ref: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        print(f"{key}: {got[key]:.7f} vs {ref[key]:.7f} (difference {abs(got[key] - ref[key]):.1e})")
        assert got[key] == pytest.approx(ref[key], abs=TOLERANCE), key


def _assert_run_matches(got: dict, ref: dict, steps: list[tuple[str, int]]) -> None:
    for stage, step in steps:
        mine, theirs = got[(stage, step)], ref[(stage, step)]
        if stage == "sft":
            _assert_steps_match(mine, theirs, ("sft/loss", "grad_norm"))
        else:
            for key in ("batch/rows", "reward/mean", "turns/mean", "advantage/abs_mean"):  # the same batch
                assert mine[key] == theirs[key], (stage, step, key)
            _assert_steps_match(mine, theirs, ("loss", "policy/loss", "mtp/loss", "grad_norm"))


def _rl_steps(first: int = 1) -> list[tuple[str, int]]:
    return [("rl", SFT_STEPS + step) for step in range(first, RL_STEPS + 1)]


def test_fsdp_ep_worker_matches_single_process(tmp_path: Path, init_checkpoint: Path, reference: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        _command(tmp_path, init_checkpoint, "ep"), capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["stage"] == "done"
    got, ref = _metrics(tmp_path / "runs" / "ep"), reference["metrics"]
    _assert_run_matches(got, ref, [("sft", step) for step in range(1, SFT_STEPS + 1)] + _rl_steps())
    for key in [("sft", SFT_STEPS), ("rl", SFT_STEPS + 2), ("rl", SFT_STEPS + RL_STEPS)]:
        assert got[key]["eval/heldout_success"] == ref[key]["eval/heldout_success"], key
    published = tmp_path / "runs" / "ep" / "checkpoints" / f"rl-{RL_STEPS:05d}"
    assert (published / "model.safetensors.index.json").exists()  # written from the shards
    mine = load_checkpoint(published).state_dict()
    theirs = load_checkpoint(reference["dir"] / "checkpoints" / f"rl-{RL_STEPS:05d}").state_dict()
    assert mine.keys() == theirs.keys() and len([k for k in mine if k.startswith("mtp.1.")]) > 0
    errors = {name: (mine[name] - tensor).abs().max().item() for name, tensor in theirs.items()}
    print(f"max weight difference {max(errors.values()):.2e} ({max(errors, key=errors.__getitem__)})")
    assert max(errors.values()) <= WEIGHT_TOLERANCE, errors


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker ended before it was killed"
        if path.exists() and any(json.loads(line)["step"] >= step and json.loads(line)["stage"] == "rl"
                                 for line in path.read_text().splitlines()):  # fmt: skip
            return
        time.sleep(0.2)
    raise AssertionError(f"no RL step {step} within {timeout_s} s")


def test_sharded_run_killed_resumes(tmp_path: Path, init_checkpoint: Path, reference: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _command(tmp_path, init_checkpoint, "kill")
    run_dir = tmp_path / "runs" / "kill"
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_step(run_dir, SFT_STEPS + 1, first, timeout_s=900)  # emitted after its state was saved
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["stage"], summary["rl_step"]) == ("done", RL_STEPS)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[before:]]
    assert lines and all(line["stage"] == "rl" for line in lines)  # resumed in RL: no SFT step again
    resumed = sorted({line["step"] for line in lines if "loss" in line})
    assert resumed and resumed[-1] == SFT_STEPS + RL_STEPS
    _assert_run_matches(_metrics(run_dir), reference["metrics"], [("rl", step) for step in resumed])
