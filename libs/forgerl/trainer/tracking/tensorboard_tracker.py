"""TensorBoard event files of a run: every metric a scalar (tag = the metric's name, one step axis for SFT
then RL), the flattened RunConfig and each checkpoint as text. `tensorboard --logdir <runs_dir>` shows
every run, one per `<run_id>/tensorboard` folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from forgerl.v1 import run_pb2

CONFIG_TAG = "run_config"  # text: the flattened RunConfig as indented JSON (a markdown code block)
CHECKPOINT_TAG = "checkpoints"  # text at the checkpoint's step: stage, policy version, path
FLUSH_SECS = 10  # how stale a live TensorBoard may be; torch's default is 120 s


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package; lazy: heavy

        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=FLUSH_SECS)

    def log_params(self, params: Mapping[str, str]) -> None:
        text = json.dumps(dict(params), indent=1, sort_keys=True)
        self.writer.add_text(CONFIG_TAG, "\n".join("    " + line for line in text.splitlines()))

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_checkpoint(self, checkpoint: run_pb2.Checkpoint) -> None:
        self.writer.add_text(
            CHECKPOINT_TAG,
            f"{checkpoint.stage} step {checkpoint.step}, policy version {checkpoint.policy_version}: "
            f"`{checkpoint.path}`",
            checkpoint.step,
        )

    def close(self, status: str) -> None:
        self.writer.close()
