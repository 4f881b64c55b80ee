"""Run configurations as YAML: the `RunConfig` message (run.proto) with both stages, plus defaults.

    name: tiny-tool-use
    model_preset: debug
    suite: tooluse
    seed: 0
    checkpoint_every: 5
    sft: {steps: 300, batch_size: 16, learning_rate: 3.0e-3}
    rl: {steps: 40, batch_size: 64, group_size: 8, learning_rate: 1.0e-3, loss: cispo, eps_high: 0.28, ...}
    trainer: {parallel: {dp_shard: 2, ep: 2}}   # under torchrun; unset: one process, or DDP
    trainer: {moe_backend: triton, attn_backend: tree}   # our kernels in training; unset: the model's own
    trainer: {publish: stream}   # weights to inference over StreamWeights; unset: checkpoint + UpdateWeights

Keys are the proto's field names; unknown keys are an error naming the key.

The model is MiniMax-M3 when init_checkpoint's config.json says so (model_type / architectures), or, for
a fresh model, when model_preset names an M3 preset (forgerl.model.M3_PRESETS); M2 otherwise. M3 runs
are checked here, before any model is built (check_m3_run): prefix merging, sharded layouts and MTP growth
are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from google.protobuf import json_format

from forgerl.trainer.schedule import SCHEDULES
from forgerl.v1 import run_pb2

if TYPE_CHECKING:
    from forgerl.distributed.config import ParallelConfig

RL_DEFAULTS: dict[str, Any] = {
    "steps": 40,
    "batch_size": 64,
    "group_size": 8,
    "learning_rate": 1e-3,
    "loss": "cispo",
    "eps_high": 0.28,
    "gamma": 1.0,
    "alpha_process": 0.1,
    "beta_speed": 0.0,
    "fifo_window": 0.3,
    "max_staleness": 4,
    "episodes_in_flight": 64,
    "scaffold_version": "default",
    "prefix_merge": True,
    "mtp_loss_weight": 0.0,
    "routing_replay": False,
}
SFT_DEFAULTS: dict[str, Any] = {"steps": 300, "batch_size": 16, "learning_rate": 3e-3}
# The names the model accepts for `trainer.moe_backend` ("torch" + forgerl.model.moe.MOE_KERNELS) and
# `trainer.attn_backend` (attention.ATTENTION_BACKENDS + KERNEL_BACKENDS), spelled out here so that
# checking a run file imports no torch; a unit test keeps them equal to the model's registries.
MOE_BACKENDS = ("torch", "triton")
ATTN_BACKENDS = ("sdpa", "eager", "tree", "msa")
# `trainer.publish`: "" and "checkpoint" write the checkpoint and UpdateWeights it; "stream" also StreamWeights.
PUBLISH_MODES = ("", "checkpoint", "stream")
# forgerl.model.M3_PRESETS's names, and the model types / architecture prefix of an M3 config.json
# (m3_checkpoint writes minimax_m3_vl_text, the released checkpoint is minimax_m3_vl), spelled out here for
# the same reason; a unit test keeps the presets equal to the model's.
M3_PRESET_NAMES = ("minimax-m3-tiny", "minimax-m3-preview")
M3_MODEL_TYPES = ("minimax_m3_vl", "minimax_m3_vl_text")
M3_ARCHITECTURE_PREFIX = "MiniMaxM3"


def run_config_from_dict(data: dict[str, Any]) -> run_pb2.RunConfig:
    data = dict(data)
    data.setdefault("model_preset", "debug")
    data.setdefault("suite", "tooluse")
    data.setdefault("checkpoint_every", 5)
    data["sft"] = {**SFT_DEFAULTS, **(data.get("sft") or {})}
    data["rl"] = {**RL_DEFAULTS, **(data.get("rl") or {})}
    try:
        config = json_format.ParseDict(data, run_pb2.RunConfig(), ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise ValueError(f"bad run config: {err} (keys are the fields of RunConfig in run.proto)") from None
    for name, stage in (("sft", config.sft), ("rl", config.rl)):
        if stage.lr_schedule and stage.lr_schedule not in SCHEDULES:
            raise ValueError(f"bad run config: {name}.lr_schedule {stage.lr_schedule!r} is not one of {SCHEDULES}")
        if not 0.0 <= stage.min_lr_ratio <= 1.0 or stage.warmup_steps < 0:
            raise ValueError(f"bad run config: {name}.min_lr_ratio must be in [0, 1] and warmup_steps >= 0")
    if not 0.0 <= config.sft.teacher_error_rate <= 1.0:
        raise ValueError("bad run config: sft.teacher_error_rate must be in [0, 1]")
    if config.sft.examples < 0 or config.sft.expert_bias_update_rate < 0:
        raise ValueError("bad run config: sft.examples and sft.expert_bias_update_rate must be >= 0")
    if config.rl.mtp_loss_weight < 0 or config.rl.grow_mtp_to < 0:
        raise ValueError("bad run config: rl.mtp_loss_weight and rl.grow_mtp_to must be >= 0")
    _check_parallel(config.trainer.parallel)
    _check_backends(config)
    check_m3_run(config)
    return config


def is_m3_hf_config(hf: dict[str, Any]) -> bool:
    """Whether a Hugging Face config.json describes MiniMax-M3 (ours, transformers' or the released VL one)."""
    architectures = hf.get("architectures") or []
    return hf.get("model_type") in M3_MODEL_TYPES or any(a.startswith(M3_ARCHITECTURE_PREFIX) for a in architectures)


def init_checkpoint_hf_config(config: run_pb2.RunConfig) -> dict[str, Any] | None:
    """init_checkpoint's config.json, or None when the run has no init_checkpoint or it has no config.json
    yet (the trainer refuses the latter when it builds the model)."""
    path = Path(config.init_checkpoint, "config.json") if config.init_checkpoint else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def is_m3_run(config: run_pb2.RunConfig) -> bool:
    """Whether the run trains MiniMax-M3: init_checkpoint's architecture when it has one, else model_preset."""
    if config.init_checkpoint:
        hf = init_checkpoint_hf_config(config)
        return hf is not None and is_m3_hf_config(hf)
    return config.model_preset in M3_PRESET_NAMES


def check_m3_run(config: run_pb2.RunConfig) -> None:
    """Refuse what an M3 run cannot do, naming the key; nothing for M2 runs."""
    if not is_m3_run(config):
        return
    model = f"init_checkpoint {config.init_checkpoint}" if config.init_checkpoint else f"preset {config.model_preset}"
    if config.rl.prefix_merge:
        raise ValueError(
            f"bad run config: rl.prefix_merge is on and the model is MiniMax-M3 ({model}): its sparse-attention "
            "layers pick key blocks by pack slot, so a prefix-tree pack would not give each row its own logits "
            "(log-probabilities 1.9 apart on minimax-m3-tiny); set rl.prefix_merge: false"
        )
    p = config.trainer.parallel
    if p.dp_shard > 1 or p.ep > 1 or p.dp_replicate > 1 or p.activation_checkpoint_every > 0:
        raise ValueError(
            f"bad run config: trainer.parallel is set (dp_replicate {p.dp_replicate}, dp_shard {p.dp_shard}, ep "
            f"{p.ep}, activation_checkpoint_every {p.activation_checkpoint_every}); its layouts are MiniMax-M2's "
            f"(forgerl.trainer.sharded) and the model is MiniMax-M3 ({model}), trained in one process: leave it unset"
        )
    if config.trainer.publish == "stream":
        raise ValueError(
            f"bad run config: trainer.publish 'stream' streams MiniMax-M2's tensor names and the model is MiniMax-M3 "
            f"({model}), which publishes nothing to inference (vLLM's M3 path needs a GPU): leave it unset"
        )
    if config.rl.grow_mtp_to > 0:
        raise ValueError(
            f"bad run config: rl.grow_mtp_to {config.rl.grow_mtp_to}: growing MTP modules is MiniMax-M2's; an "
            f"M3 run ({model}) trains the MTP modules its checkpoint has (num_mtp_modules in config.json)"
        )
    hf = init_checkpoint_hf_config(config)
    modules = (hf or {}).get("text_config", hf or {}).get("num_mtp_modules", 0)
    if hf is not None and config.rl.mtp_loss_weight > 0 and modules == 0:
        raise ValueError(
            f"bad run config: rl.mtp_loss_weight {config.rl.mtp_loss_weight} but {model} has no MTP modules "
            "(num_mtp_modules 0 in its config.json): set rl.mtp_loss_weight: 0, or start from a checkpoint with them"
        )


def model_overrides(config: run_pb2.RunConfig) -> dict[str, str]:
    """The ModelConfig fields `trainer.moe_backend` / `trainer.attn_backend` set (unset ones: none)."""
    t = config.trainer
    return {name: value for name, value in (("moe_backend", t.moe_backend), ("attn_backend", t.attn_backend)) if value}


def parallel_config(config: run_pb2.RunConfig) -> ParallelConfig:
    """`trainer.parallel` as a ParallelConfig: unset (0) fields take its defaults (dp_replicate fills the
    world size, dp_shard 1, ep 1); the world size checks come with ParallelConfig.resolve."""
    from forgerl.distributed.config import ParallelConfig  # imports torch: not at the CLI's start

    p = config.trainer.parallel
    return ParallelConfig(
        dp_replicate=p.dp_replicate or -1,
        dp_shard=p.dp_shard or 1,
        ep=p.ep or 1,
        activation_checkpoint_every=p.activation_checkpoint_every,
    )


def _check_parallel(p: run_pb2.ParallelLayout) -> None:
    for name in ("dp_replicate", "dp_shard"):
        if getattr(p, name) < -1:
            raise ValueError(f"bad run config: trainer.parallel.{name} {getattr(p, name)}: must be >= 1, or -1 to fill")
    if p.ep < 0 or p.activation_checkpoint_every < 0:
        raise ValueError("bad run config: trainer.parallel.ep and activation_checkpoint_every must be >= 0")


def _check_backends(config: run_pb2.RunConfig) -> None:
    for name, value, allowed in (
        ("moe_backend", config.trainer.moe_backend, MOE_BACKENDS),
        ("attn_backend", config.trainer.attn_backend, ATTN_BACKENDS),
    ):
        if value and value not in allowed:
            raise ValueError(f"bad run config: trainer.{name} {value!r} is not one of {allowed} (unset: the model's)")
    if config.trainer.publish not in PUBLISH_MODES:
        raise ValueError(
            f"bad run config: trainer.publish {config.trainer.publish!r} is not one of {PUBLISH_MODES[1:]} "
            "(unset: checkpoint)"
        )
    if config.trainer.attn_backend == "msa" and config.rl.prefix_merge:
        raise ValueError(
            "bad run config: trainer.attn_backend 'msa' is causal only and rl.prefix_merge packs rows into "
            "prefix trees: set rl.prefix_merge: false (or attn_backend 'tree' for merged packs)"
        )


def load_run_config(path: str | Path) -> run_pb2.RunConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config is a YAML mapping")
    return run_config_from_dict(data)


def run_config_to_dict(config: run_pb2.RunConfig) -> dict[str, Any]:
    return json_format.MessageToDict(config, preserving_proto_field_name=True)
