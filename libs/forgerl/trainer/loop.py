"""A training run, start to finish: SFT warm start, then CISPO RL, with checkpoints, weight publication,
acknowledgements, held-out evaluation, metrics and resume.

    run = TrainingRun(run_id, config, settings, episodes=ServiceEpisodes(...), publisher=InferencePublisher(...),
                      sink=sink)
    run.run()          # blocking; `run.stop()` from another thread ends it after the current step

Per RL step: FetchBatch(size, policy_version) -> build rows and advantages -> (prefix-merged) forward
-> CISPO (+ MTP) -> AdamW -> expert-bias update -> save the training state -> Ack. Every
`checkpoint_every` steps (and at the end) the weights are also written as a Hugging Face checkpoint and
published to inference as the next policy version: UpdateWeights reloads that checkpoint, or, with
`trainer.publish: stream`, every rank takes part in streaming the weights from its shards
(forgerl.distributed.weight_stream) and rank 0 sends the buckets over StreamWeights; the checkpoint is
written all the same (resume, export, and the reload inference gets when the stream fails).

Exactly-once training of batches: the state saved after a step names the batch it consumed; the batch
is acknowledged only after that state is durable. A trainer killed before the save restarts from the
previous state, and the unacknowledged batch is served again by the data pool (trained once: the first
attempt's update died with the process). Killed between the save and the Ack, it acknowledges the
batch named in the state on restart instead of training it again.

Resume state lives in `<runs_dir>/<run_id>/state/` (weights as safetensors, optimizer, RNGs, counters),
replaced atomically (write a new directory, then rename).

The model is MiniMax-M2 or MiniMax-M3 (run_config.is_m3_run); building, loading, saving and publishing go
through forgerl.trainer.policy_files with that architecture's classes. An M3 run is one process on local
episodes: vLLM's M3 path needs a GPU, so it is refused with an episode source or publisher of the services.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from forgerl.distributed import clip_grad_norm_
from forgerl.distributed.parallelize import ParallelModel
from forgerl.distributed.weight_stream import stream_weight_buckets
from forgerl.model import M3Config, MiniMaxM2ForCausalLM, MiniMaxM3ForCausalLM, ModelConfig
from forgerl.trainer.local_env import LocalEpisodeRunner, suite_episode_specs
from forgerl.trainer.policy_files import (
    PolicyNet,
    build_policy,
    config_from_checkpoint,
    config_from_preset,
    load_policy,
    save_policy,
)
from forgerl.trainer.run_config import check_m3_run, is_m3_run, model_overrides, parallel_config
from forgerl.trainer.schedule import learning_rate, set_learning_rate
from forgerl.trainer.sft import SftBatches, make_examples, sft_loss, sft_loss_merged
from forgerl.trainer.sharded import ShardedModel, all_ranks_mean
from forgerl.trainer.sources import EpisodeSource, InferencePublisher, NullPublisher, Publisher, ServiceEpisodes
from forgerl.trainer.step import (
    RlStepConfig,
    build_batch,
    expert_bias_step,
    global_token_mean,
    rl_step,
    shard_rows,
)
from forgerl.v1 import run_pb2

log = logging.getLogger("forgerl.trainer")

# StreamWeights' bucket size: the one its measurements used (commit 43c2268, small preset: 16 MiB buckets).
STREAM_BUCKET_BYTES = 16 * 1024 * 1024

MetricsSink = Callable[[str, int, dict[str, float]], None]  # (stage, step, values)


@dataclass
class TrainerSettings:
    runs_dir: Path = Path("runs")
    threads: int = 1
    eval_tasks: int = 256  # held-out tasks evaluated greedily in-process (+-3 points at 75%)
    eval_every: int = 10  # RL steps between held-out evaluations (and after SFT, and at the end)
    fetch_timeout_s: float = 120.0
    max_new_tokens: int = 48
    tokenizer_path: str | None = None  # when the run has no init_checkpoint
    max_tokens_per_pack: int = 2048
    local_episodes: bool = False  # no episode source given: sample in-process (forgerl.trainer.sources.LocalEpisodes)


@dataclass
class RunProgress:
    """What the resume state records (JSON)."""

    run_id: str
    stage: str = "sft"  # "sft" -> "rl" -> "done"
    sft_step: int = 0  # SFT steps completed
    rl_step: int = 0  # RL steps completed
    policy_version: int = 0  # last version published to inference
    task_cursor: int = 0  # training tasks handed to rollout
    unacked: list[str] = field(default_factory=list)  # trained batches not yet known acknowledged
    trained_batches: list[str] = field(default_factory=list)
    trained_trajectory_ids: list[str] = field(default_factory=list)
    trained_trajectories: int = 0
    sft_heldout: float | None = None
    final_heldout: float | None = None
    last_checkpoint: str = ""


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _lag(traj: Any, policy_version: int) -> int:
    """Policy lag of a trajectory: versions between the oldest policy that generated it and ours."""
    versions = [turn.policy_version for turn in traj.turns] or [policy_version]
    return policy_version - min(versions)


def _eval_metrics(outcomes: list[tuple[int, bool]], seconds: float) -> dict[str, float]:
    out = {"eval/heldout_success": sum(hit for _, hit in outcomes) / max(1, len(outcomes))}
    levels: dict[int, list[bool]] = {}
    for level, hit in outcomes:
        levels.setdefault(level, []).append(hit)
    for level, hits in sorted(levels.items()):
        out[f"eval/heldout_success_level{level}"] = sum(hits) / len(hits)
    out["eval/time_s"] = seconds
    return out


def _suite_gold(suite: str, teacher_error_rate: float = 0.0) -> list[dict[str, Any]]:
    if suite == "tooluse":
        from forgerl.rollout.suites.tooluse import gold_trajectories

        return list(gold_trajectories("train", teacher_error_rate=teacher_error_rate))
    raise ValueError(f"no gold trajectories for suite {suite!r} (SFT needs them; set sft.steps: 0 to skip SFT)")


class TrainingRun:
    def __init__(
        self,
        run_id: str,
        config: run_pb2.RunConfig,
        settings: TrainerSettings,
        *,
        episodes: EpisodeSource | None = None,
        publisher: Publisher | None = None,
        sink: MetricsSink | None = None,
        on_state: Callable[[RunProgress], None] | None = None,
        on_checkpoint: Callable[[run_pb2.Checkpoint], None] | None = None,
    ) -> None:
        self.run_id, self.config, self.settings = run_id, config, settings
        self.episodes = episodes
        self.publisher = publisher or NullPublisher()
        self.sink = sink or (lambda stage, step, values: None)
        self.on_state = on_state or (lambda p: None)
        self.on_checkpoint = on_checkpoint or (lambda c: None)
        self.dir = Path(settings.runs_dir) / run_id
        self.state_dir = self.dir / "state"
        self.ckpt_dir = self.dir / "checkpoints"
        self._stop = threading.Event()
        self.rank, self.world = _dist()
        self._ddp: torch.nn.Module | None = None
        self.sharded: ShardedModel | None = None  # trainer.parallel shards the model (FSDP2, EP)
        self._samples_here = False  # the episode source samples with the trainer's model (LocalEpisodes)
        self._sampling_model: MiniMaxM2ForCausalLM | None = None  # its replica, when sharded
        self.progress = RunProgress(run_id)
        self.checkpoints: list[run_pb2.Checkpoint] = []
        self.model: PolicyNet
        check_m3_run(config)  # again here: the trainer service sets init_checkpoint after parsing the config
        if is_m3_run(config) and (isinstance(episodes, ServiceEpisodes) or isinstance(publisher, InferencePublisher)):
            raise ValueError(
                f"run {run_id} trains MiniMax-M3, which runs here on local episodes only (worker --local-episodes, "
                "trainer service local_episodes): vLLM's M3 path needs a GPU (its MSA backends are Triton, CUTLASS "
                "and aiter kernels; the CPU build has none), so inference cannot serve or reload M3 weights"
            )

    # ---- setup --------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Rank 0 decides (a StopRun reaches it); the other ranks follow at the next step."""
        return bool(_broadcast(self._stop.is_set()) if self.world > 1 else self._stop.is_set())

    @property
    def train_model(self) -> torch.nn.Module:
        """What the forward/backward runs through: the DDP wrapper or the FSDP2 root under torchrun, else
        the model."""
        if self.sharded is not None:
            return self.sharded.train_model
        return self._ddp if self._ddp is not None else self.model

    def _wrap(self) -> None:
        if self.world > 1 and self.sharded is None:
            from forgerl.model.sharding import apply_ddp

            # The MTP modules get gradients only from RL's MTP loss, computed outside DDP's forward: in
            # SFT (whose merged loss has no MTP) DDP must skip them as unused, and in RL with MTP it must
            # not look for unused ones, or it marks the MTP parameters ready before their gradients come
            # ("Expected to mark a variable ready only once"; two gloo ranks, torch 2.x).
            assert isinstance(self.model, MiniMaxM2ForCausalLM)  # _init_model refuses M3 under torchrun
            self._ddp = apply_ddp(self.model, find_unused_parameters=not self._rl_trains_mtp())

    def _rl_trains_mtp(self) -> bool:
        return self.progress.stage != "sft" and self.config.rl.mtp_loss_weight > 0 and len(self.model.mtp) > 0

    def _grow_mtp(self) -> None:
        """RL trains `rl.grow_mtp_to` MTP modules: the new ones are copies of module 1 (grow_mtp). Called
        before the RL optimizer is built and the model re-wrapped, which must both hold them. M2 only
        (check_m3_run refuses grow_mtp_to for M3)."""
        wanted = self.config.rl.grow_mtp_to
        if wanted > len(self.model.mtp) and self.sharded is None:  # a sharded model grew when it was built
            assert isinstance(self.model, MiniMaxM2ForCausalLM)
            self.model.grow_mtp(wanted)

    def _emit(self, stage: str, step: int, values: dict[str, float]) -> None:
        if self.rank == 0:
            self.sink(stage, step, values)

    def _init_model(self) -> None:
        """The tokenizer and the model: whole on this rank, or sharded when trainer.parallel asks for it."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.tokenizer, model_cfg = self._model_source()
        if self.world > 1 and isinstance(model_cfg, M3Config):
            raise ValueError(
                f"run {self.run_id} trains MiniMax-M3 in one process: under torchrun ({self.world} ranks) every "
                "step would pack rows for DDP, and M3's sparse attention refuses packed rows; start it without torchrun"
            )
        layout = parallel_config(cfg).resolve(self.world, model_cfg.num_local_experts)
        if layout.uses_fsdp:
            self.sharded = ShardedModel.build(model_cfg, layout, cfg.seed, cfg.init_checkpoint, cfg.rl.grow_mtp_to)
            self.model = self.sharded.model
        elif cfg.init_checkpoint:
            self.model = load_policy(cfg.init_checkpoint, model_overrides(cfg), strict=False)
        else:
            self.model = build_policy(model_cfg)
        self.model.train()

    def _model_source(self) -> tuple[Any, ModelConfig]:
        """The tokenizer and the model's config (an M3Config for M3): init_checkpoint's, or the preset's at
        the tokenizer's size, with the run's kernels (trainer.moe_backend, trainer.attn_backend) where it
        sets them."""
        from forgerl.model.tokenizer import load_tokenizer, train_tokenizer

        cfg = self.config
        if cfg.init_checkpoint:
            tokenizer = load_tokenizer(cfg.init_checkpoint)
            config_path = Path(cfg.init_checkpoint, "config.json")
            if not config_path.exists():
                raise ValueError(f"init_checkpoint {cfg.init_checkpoint} has no config.json")
            return tokenizer, config_from_checkpoint(json.loads(config_path.read_text()), model_overrides(cfg))
        path = self.settings.tokenizer_path
        tokenizer = load_tokenizer(path) if path else train_tokenizer(vocab_size=4096)
        preset = cfg.model_preset or "debug"
        with_mtp = cfg.rl.mtp_loss_weight > 0
        return tokenizer, config_from_preset(preset, tokenizer, model_overrides(cfg), with_mtp)

    def _activation_checkpointing(self) -> None:
        """trainer.parallel.activation_checkpoint_every on a whole model (a sharded one has it already)."""
        every = self.config.trainer.parallel.activation_checkpoint_every
        if every > 0 and self.sharded is None:
            from forgerl.distributed.parallelize import apply_activation_checkpointing

            assert isinstance(self.model, MiniMaxM2ForCausalLM)  # check_m3_run refuses trainer.parallel for M3

            apply_activation_checkpointing(self.model, every)

    @staticmethod
    def _stage_lr(stage: run_pb2.SftStage | run_pb2.RlStage, step: int) -> float:
        return learning_rate(
            step, stage.steps, stage.learning_rate, stage.lr_schedule, stage.warmup_steps, stage.min_lr_ratio
        )

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    # ---- state --------------------------------------------------------------------------------

    def _save_state(self) -> None:
        tmp = self.dir / "state.tmp"
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        rngs = {
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "episode_rng": getattr(getattr(self.episodes, "generator", None), "get_state", lambda: None)(),
        }
        if self.sharded is not None:  # every rank writes its shards (DCP); rank 0 the RNGs (rank 0's)
            self.sharded.save(tmp / "dcp", self.optimizer, rngs)
        else:
            save_policy(self.model, self.tokenizer, tmp / "model")  # every rank calls it; rank 0 writes
        if self.rank == 0:
            if self.sharded is None:
                torch.save({"optimizer": self.optimizer.state_dict(), **rngs}, tmp / "trainer.pt")
            (tmp / "progress.json").write_text(json.dumps(asdict(self.progress), indent=1))
            old = self.dir / "state.old"
            if old.exists():
                shutil.rmtree(old)
            if self.state_dir.exists():
                self.state_dir.rename(old)
            tmp.rename(self.state_dir)
            if old.exists():
                shutil.rmtree(old)
            self.on_state(self.progress)
        _barrier()

    def _load_state(self) -> bool:
        state = self.state_dir if self.state_dir.exists() else self.dir / "state.old"
        if not (state / "progress.json").exists():
            return False
        self.progress = RunProgress(**json.loads((state / "progress.json").read_text()))
        lr = self.config.rl.learning_rate if self.progress.stage != "sft" else self.config.sft.learning_rate
        blob = self._load_weights(state, lr)
        torch.set_rng_state(blob["torch_rng"])
        random.setstate(blob["python_rng"])
        self._episode_rng = blob.get("episode_rng")
        log.info("resumed run %s at stage %s step %d/%d", self.run_id, self.progress.stage,
                 self.progress.sft_step, self.progress.rl_step)  # fmt: skip
        return True

    def _load_weights(self, state: Path, lr: float) -> dict[str, Any]:
        """Model and optimizer from the saved state (whole, or each rank its shards); returns the RNGs."""
        sharded_state = (state / "dcp").exists()
        if sharded_state != (self.sharded is not None):
            raise ValueError(
                f"{state} was saved {'with' if sharded_state else 'without'} a sharded trainer.parallel layout "
                f"(dp_shard > 1 or ep > 1); resume the run with the layout's kind it was saved with"
            )
        if self.sharded is not None:
            self.optimizer = self._optimizer(lr)
            return self.sharded.load(state / "dcp", self.optimizer)
        self.model = load_policy(state / "model", model_overrides(self.config))
        self.model.train()
        blob = dict(torch.load(state / "trainer.pt", weights_only=False))
        self.optimizer = self._optimizer(lr)
        self.optimizer.load_state_dict(blob["optimizer"])
        return blob

    def _hf_checkpoint(self, stage: str, step: int) -> run_pb2.Checkpoint:
        path = self.ckpt_dir / f"{stage}-{step:05d}"
        tmp = path.with_name(path.name + ".partial")
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        if self.sharded is not None:  # from the shards, one tensor gathered at a time
            self.sharded.export(tmp, self.tokenizer)
        else:
            save_policy(self.model, self.tokenizer, tmp)
        if self.rank == 0:
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        _barrier()
        ckpt = run_pb2.Checkpoint(
            checkpoint_id=f"{self.run_id}/{stage}-{step:05d}",
            run_id=self.run_id,
            step=self._global_step(stage, step),
            policy_version=self.progress.policy_version + 1,
            path=str(path.resolve()),
            stage=stage,
        )
        ckpt.created_at.GetCurrentTime()
        self.checkpoints.append(ckpt)
        self.progress.last_checkpoint = str(path.resolve())
        return ckpt

    def _publish(self, stage: str, step: int) -> run_pb2.Checkpoint:
        ckpt = self._hf_checkpoint(stage, step)
        if self.config.trainer.publish == "stream":
            version, reload_s = self._stream(ckpt)
        else:
            version, reload_s = self.publisher.publish(ckpt.path, ckpt.policy_version) if self.rank == 0 else (0, 0.0)
        version = int(_broadcast(version))
        ckpt.policy_version = version
        self.progress.policy_version = version
        if self.rank == 0:
            self.on_checkpoint(ckpt)
        self._emit(
            stage, self._global_step(stage, step), {"publish/reload_s": reload_s, "policy_version": float(version)}
        )
        return ckpt

    def _stream(self, ckpt: run_pb2.Checkpoint) -> tuple[int, float]:
        """The weights to inference in buckets, from the shards (or the whole model): a collective, every
        rank walks the buckets to the end; rank 0 receives them and hands them to the publisher. float32,
        the dtype of the checkpoints written here (StreamWeights refuses another dtype than the served one:
        an engine started from a bf16 checkpoint gets the fallback, UpdateWeights of `ckpt`). The plan is made
        anew each time (one small all_gather_object): RL may have grown the MTP modules since the last one."""
        assert isinstance(self.model, MiniMaxM2ForCausalLM)  # run_config refuses trainer.publish: stream for M3
        # One process or DDP: a whole model on every rank, no mesh; rank 0 sends itself every row.
        whole = ParallelModel(self.model, self.model, None)  # type: ignore[arg-type]
        parallel = self.sharded.parallel if self.sharded is not None else whole
        buckets = stream_weight_buckets(parallel, STREAM_BUCKET_BYTES, dtype=torch.float32)
        if self.rank == 0:
            return self.publisher.stream(buckets, ckpt.path, ckpt.policy_version)
        for _ in buckets:  # yields nothing here: this rank only sends its rows to rank 0
            pass
        return 0, 0.0

    def _global_step(self, stage: str, step: int) -> int:
        """One step axis for the whole run: SFT steps first, then RL steps."""
        return step if stage == "sft" else self.config.sft.steps + step

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out success in-process, overall and per difficulty level: on rank 0 with a whole
        model; with a sharded one every rank gathers a replica and runs every world-th task."""
        started = time.perf_counter()
        if self.sharded is not None:
            mine = self._eval_outcomes(self.sharded.replica(), self.rank, self.world)
            everyone: list[Any] = [None] * self.world
            dist.all_gather_object(everyone, mine)
            return _eval_metrics([o for part in everyone for o in part], time.perf_counter() - started)
        if self.rank != 0:
            return dict(_broadcast(None))
        result = _eval_metrics(self._eval_outcomes(self.model, 0, 1), time.perf_counter() - started)
        return dict(_broadcast(result))

    def _eval_outcomes(self, model: PolicyNet, part: int, parts: int) -> list[tuple[int, bool]]:
        """(difficulty, success) of held-out tasks part, part + parts, ... ."""
        from forgerl.rollout.tasks import get_suite

        suite = get_suite(self.config.suite)
        tasks = list(suite.tasks("test"))[: self.settings.eval_tasks][part::parts]
        if not tasks:
            return []
        specs = suite_episode_specs(self.config.suite, "test", [t.id for t in tasks])
        runner = LocalEpisodeRunner(self.tokenizer, max_new_tokens=self.settings.max_new_tokens)
        trajs = runner.run(model, specs, temperature=0.0)
        return [(task.difficulty, t.success) for task, t in zip(tasks, trajs, strict=True)]

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> RunProgress:
        torch.set_num_threads(max(1, self.settings.threads))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._episode_rng = None
        self._init_model()
        if not self._load_state():  # the optimizer comes after sharding: it holds the shards
            self.optimizer = self._optimizer(self.config.sft.learning_rate)
        self._activation_checkpointing()
        self._wrap()
        if self.progress.stage == "sft":
            self._run_sft()
        if self.progress.stage == "rl" and not self.stopped:
            self._run_rl()
        if self.progress.stage == "done" or (
            self.progress.stage == "rl" and self.progress.rl_step >= self.config.rl.steps
        ):
            self.progress.stage = "done"
        return self.progress

    def _run_sft(self) -> None:
        cfg = self.config.sft
        if cfg.steps > 0 and self.progress.sft_step < cfg.steps:
            items = _suite_gold(self.config.suite, cfg.teacher_error_rate)[: cfg.examples or None]
            batches = SftBatches(make_examples(self.tokenizer, items), max(1, cfg.batch_size), self.config.seed)
            every = max(1, self.config.checkpoint_every) * 10
            bias_rate = (
                cfg.expert_bias_update_rate
                if cfg.HasField("expert_bias_update_rate")
                else self.model.config.bias_update_rate
            )
            while self.progress.sft_step < cfg.steps and not self.stopped:
                self._sft_step(batches, bias_rate)
                if self.progress.sft_step % every == 0:
                    self._save_state()
            if self.stopped:
                self._save_state()
                return
        # End of SFT: evaluate, publish the warm-started policy (version 1), switch the optimizer to RL.
        ev = self.evaluate()
        self.progress.sft_heldout = ev["eval/heldout_success"]
        self._emit("sft", self.config.sft.steps, ev)
        self._publish("sft", self.config.sft.steps)
        self.progress.stage = "rl"
        self._grow_mtp()
        self._wrap()
        # A new optimizer for RL: SFT's first moments would carry its last direction into the first RL
        # steps, and its second moments (from gradients 10-100x larger) would shrink RL's for dozens.
        self.optimizer = self._optimizer(self.config.rl.learning_rate)
        self._save_state()

    def _sft_step(self, batches: SftBatches, bias_rate: float) -> None:
        """One SFT optimizer step on this rank's share of the step's examples. Under torchrun the loss is
        the token mean over every rank's examples (global_token_mean), as in one process."""
        step = self.progress.sft_step
        started = time.perf_counter()
        lr = self._stage_lr(self.config.sft, step)
        set_learning_rate(self.optimizer, lr)
        examples = batches.batch(step)[self.rank :: self.world]
        if self.config.rl.prefix_merge or self.world > 1:
            loss, metrics = sft_loss_merged(self.train_model, examples, max_tokens_per_pack=None)
        else:
            from forgerl.trainer.sft import collate

            ids, mask = collate(examples)
            loss, metrics = sft_loss(self.model, ids, mask)
        if self.world > 1:
            loss = global_token_mean(loss, torch.tensor(metrics["sft/tokens"]))
            metrics.update(all_ranks_mean({"sft/loss": float(loss.detach())}, ("sft/loss",)))
            metrics["loss"] = metrics["sft/loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = self._clip_grad_norm()
        self.optimizer.step()
        metrics.update(expert_bias_step(self.model, bias_rate))
        metrics["step_time_s"] = time.perf_counter() - started
        metrics["lr"] = lr
        self.progress.sft_step = step + 1
        self._emit("sft", step + 1, metrics)

    def _clip_grad_norm(self) -> float:
        """Clip to 1 and return the norm before: torch's on a whole model, forgerl.distributed's over shards."""
        if self.sharded is not None:
            return float(clip_grad_norm_(self.model.parameters(), 1.0))
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))

    def _rl_step_config(self) -> RlStepConfig:
        rl = self.config.rl
        return RlStepConfig(
            loss=rl.loss or "cispo",
            eps_high=rl.eps_high,
            eps_low=rl.eps_low if rl.HasField("eps_low") else None,
            gamma=rl.gamma if rl.gamma > 0 else 1.0,
            normalize_std=rl.scale_advantages_by_std,
            prefix_merge=rl.prefix_merge,
            # Under DDP one forward per backward: a rank's rows go in one pack.
            max_tokens_per_pack=self.settings.max_tokens_per_pack if self.world == 1 else None,
            mtp_loss_weight=rl.mtp_loss_weight,
            mtp_trains_trunk=rl.mtp_trains_trunk,
            routing_replay=rl.routing_replay,
            bias_update_rate=self.model.config.bias_update_rate,
        )

    def _start_episodes(self) -> EpisodeSource:
        if self.episodes is None and self.settings.local_episodes:
            from forgerl.trainer.sources import LocalEpisodes

            self.episodes = LocalEpisodes(
                lambda: self.model, self.tokenizer, max_new_tokens=self.settings.max_new_tokens
            )
        # Sampling in-process with a sharded model needs a gathered replica before each fetch (_fetch).
        self._samples_here = bool(_broadcast(hasattr(self.episodes, "model_ref")))
        if self.episodes is not None and hasattr(self.episodes, "model_ref"):
            self.episodes.model_ref = lambda: self.model if self.sharded is None else self._sampling_model
        if self.rank == 0:
            self._start_source()
        self.progress.unacked = []
        return cast(EpisodeSource, self.episodes)  # None on ranks but 0 that talk to no service: never called

    def _start_source(self) -> None:
        """Rank 0: the episode source starts the run's episodes where the saved state left them."""
        from forgerl.rollout.tasks import get_suite

        episodes = self.episodes
        if episodes is None:
            raise RuntimeError("the RL stage needs an episode source")
        task_ids = [t.id for t in get_suite(self.config.suite).tasks("train")]
        # A resumed run's policy may be newer than what inference serves (a topology started afresh serves
        # the initial checkpoint): trajectories of the old policy would all be dropped as stale.
        self.publisher.ensure(self.progress.last_checkpoint, self.progress.policy_version)
        episodes.start(
            self.run_id, self.config.rl, self.config.suite, task_ids, self.config.seed, self.progress.task_cursor
        )
        if self._episode_rng is not None and hasattr(episodes, "generator"):
            episodes.generator.set_state(self._episode_rng)
        # Batches trained before a crash whose Ack may not have happened: acknowledge, never train again.
        for batch_id in list(self.progress.unacked):
            episodes.ack(batch_id)

    def _fetch(self, episodes: EpisodeSource) -> tuple[Any, list[Any], dict[str, float]]:
        """Rank 0 fetches, every rank gets the batch; returns it, the trajectories to train, counters."""
        rl = self.config.rl
        started = time.perf_counter()
        fetched = None
        if self.sharded is not None and self._samples_here:
            self._sampling_model = self.sharded.replica()  # a collective: every rank gathers
        if self.rank == 0:
            fetched = episodes.fetch(rl.batch_size, self.progress.policy_version, self.settings.fetch_timeout_s)
        fetched = _broadcast(fetched)
        seen = set(self.progress.trained_trajectory_ids)
        fresh = [t for t in fetched.trajectories if t.trajectory_id not in seen]
        duplicates = len(fetched.trajectories) - len(fresh)
        # The data pool drops trajectories past the staleness bound; enforce it here too, so that the bound
        # holds for every trained token whatever the source.
        bound = rl.max_staleness if rl.max_staleness > 0 else None
        within = [t for t in fresh if bound is None or _lag(t, self.progress.policy_version) <= bound]
        counters = {
            "fetch_wait_s": time.perf_counter() - started,
            "batch/dropped_stale": float(fetched.dropped_stale),
            "batch/dropped_stale_trainer": float(len(fresh) - len(within)),
            "batch/duplicates_skipped": float(duplicates),
        }
        return fetched, within, counters

    def _run_rl(self) -> None:
        rl = self.config.rl
        episodes = self._start_episodes()
        step_cfg = self._rl_step_config()
        while self.progress.rl_step < rl.steps and not self.stopped:
            started = time.perf_counter()
            lr = self._stage_lr(rl, self.progress.rl_step)
            set_learning_rate(self.optimizer, lr)
            fetched, fresh, counters = self._fetch(episodes)
            if not fresh:
                # Nothing yet, or all served again although trained (an Ack was lost) or too stale:
                # acknowledge, don't train twice.
                if fetched.batch_id and self.rank == 0:
                    episodes.ack(fetched.batch_id)
                if not fetched.trajectories:
                    log.info("run %s: empty batch after %.0f s; waiting", self.run_id, counters["fetch_wait_s"])
                continue
            batch = build_batch(
                fresh,
                gamma=step_cfg.gamma,
                policy_version=self.progress.policy_version,
                normalize_std=step_cfg.normalize_std,
                # Recorded routes span the MoE layers: all of M2's, M3's after its dense ones.
                num_layers=self.model.config.sparse_layer_count
                if isinstance(self.model, MiniMaxM3ForCausalLM)
                else self.model.config.num_hidden_layers,
                top_k=self.model.config.num_experts_per_tok,
            )
            if self.world > 1:
                batch = shard_rows(batch, self.rank, self.world)
            metrics = rl_step(self.train_model, self.optimizer, batch, step_cfg, core=self.model)
            metrics.update(all_ranks_mean(metrics, ("loss", "policy/loss")))  # each rank's share -> the mean
            metrics.update(counters)
            metrics["lr"] = lr
            self._finish_rl_step(episodes, fetched.batch_id, fresh, metrics)
            metrics["step_total_s"] = time.perf_counter() - started
            self._emit("rl", self._global_step("rl", self.progress.rl_step), metrics)
        if self.stopped:
            self._save_state()

    def _finish_rl_step(
        self, episodes: EpisodeSource, batch_id: str, trained: list[Any], metrics: dict[str, float]
    ) -> None:
        """Count the step, publish / evaluate when due, save the state durably, then acknowledge the batch."""
        rl = self.config.rl
        self.progress.rl_step += 1
        self.progress.task_cursor = int(_broadcast(episodes.cursor() if self.rank == 0 else 0))
        self.progress.trained_trajectories += len(trained)
        self.progress.trained_trajectory_ids.extend(t.trajectory_id for t in trained)
        self.progress.trained_batches = [*self.progress.trained_batches[-999:], batch_id]
        self.progress.unacked.append(batch_id)
        final = self.progress.rl_step >= rl.steps
        if self.progress.rl_step % max(1, self.config.checkpoint_every) == 0 or final:
            self._publish("rl", self.progress.rl_step)
        if self.progress.rl_step % max(1, self.settings.eval_every) == 0 or final:
            ev = self.evaluate()
            metrics.update(ev)
            if final:
                self.progress.final_heldout = ev["eval/heldout_success"]
        if final:
            self.progress.stage = "done"
        self._save_state()  # the batch is trained, durably
        if self.rank == 0:
            episodes.ack(batch_id)
            metrics.update(getattr(episodes, "stats", dict)())
        self.progress.unacked.remove(batch_id)
        metrics["policy_version"] = float(self.progress.policy_version)
