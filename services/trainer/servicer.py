"""TrainerService: StartRun / GetRun / StreamMetrics / StopRun / ListCheckpoints over forgerl.trainer.

A run trains in a thread of this process (torch releases the GIL in its kernels; the asyncio server
stays responsive). Runs, step metrics, checkpoints and policy versions go to the SQL store; metrics are
also pushed live to StreamMetrics subscribers, and with the run's parameters and checkpoints to
TensorBoard and MLflow (forgerl.trainer.tracking; a tracking backend that fails is dropped, never the run).

What happens to a run whose trainer goes away:
- shutdown (SIGTERM, Ctrl-C, the topology taken down): the run is marked INTERRUPTED at once and its
  thread saves the state after the current step; `StartRun(resume_run_id)` continues it, and no trainer
  trains it meanwhile, so a new run can start.
- crash (`kill -9`, OOM): the run stays RUNNING; a trainer restarted in its place (a Deployment, the local
  supervisor) resumes it from the saved state (`resume_on_start`). A trainer started fresh
  (`resume_on_start` off: `forgerl up`, `make run`) marks it INTERRUPTED instead.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from forgerl.store import Store, default_url
from forgerl.trainer.loop import RunProgress, TrainerSettings, TrainingRun
from forgerl.trainer.report import write_report
from forgerl.trainer.sources import InferencePublisher, ServiceEpisodes
from forgerl.trainer.tracking import Tracking, flatten_config, open_tracking
from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

from .config import TrainerConfig

log = logging.getLogger("forgerl.trainer")

_TERMINAL = (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_STOPPED)
_UNFINISHED = (run_pb2.RUN_STATE_RUNNING, run_pb2.RUN_STATE_PENDING)
MAX_LIST_RUNS = 10_000  # ListRuns answers at most this many runs per call


def new_run_id(name: str) -> str:
    stem = "".join(c if c.isalnum() or c == "-" else "-" for c in (name or "run").lower())[:40].strip("-")
    return f"{stem or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _Live:
    """A running run: its thread, its TrainingRun, its tracking, and the subscribers of its metrics."""

    def __init__(self, training: TrainingRun, tracking: Tracking) -> None:
        self.training = training
        self.tracking = tracking
        self.thread: threading.Thread | None = None
        self.subscribers: set[asyncio.Queue[run_pb2.StepMetrics | None]] = set()
        self.done = False


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, config: TrainerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store.open(config.database_url or default_url(config.state_dir))
        self.live: dict[str, _Live] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._shutting_down = False

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for run in self.store.runs.list(states=_UNFINISHED):
            if self.config.resume_on_start and (Path(self.config.runs_dir) / run.run_id).exists():
                log.info("resuming run %s after a restart", run.run_id)
                self._launch(run.run_id, run.config)
            else:  # its trainer died and this one starts fresh: nobody trains it, say so
                log.info("run %s was left %s by a trainer that stopped: marked interrupted", run.run_id,
                         run_pb2.RunState.Name(run.state))  # fmt: skip
                self.store.runs.update(run.run_id, state=run_pb2.RUN_STATE_INTERRUPTED)

    async def stop(self) -> None:
        # A shutdown is not a StopRun: the run is INTERRUPTED (resumable), marked before the threads finish
        # their step, so that a shutdown cut short by SIGKILL leaves the same mark.
        self._shutting_down = True
        for run_id, live in self.live.items():
            live.training.stop()
            if not live.done:
                self.store.runs.update(run_id, state=run_pb2.RUN_STATE_INTERRUPTED)
        for live in list(self.live.values()):
            if live.thread is not None:
                await asyncio.to_thread(live.thread.join, 60)

    # ---- the training thread ------------------------------------------------------------------

    def _settings(self) -> TrainerSettings:
        c = self.config
        return TrainerSettings(
            runs_dir=Path(c.runs_dir),
            threads=c.threads,
            eval_tasks=c.eval_tasks,
            eval_every=c.eval_every,
            fetch_timeout_s=c.fetch_timeout_s,
            max_new_tokens=c.max_new_tokens,
            local_episodes=c.local_episodes,
        )

    def _launch(self, run_id: str, config: run_pb2.RunConfig) -> None:
        c = self.config
        if not config.init_checkpoint and c.inference_model_path:
            config.init_checkpoint = c.inference_model_path
        if c.local_episodes:
            episodes = None  # TrainingRun samples in-process (settings.local_episodes)
            publisher = None
        else:
            episodes = ServiceEpisodes(c.rollout_address, c.datapool_address, c.auth_token, c.retry_deadline_s)
            publisher = InferencePublisher(c.inference_address, c.auth_token, retry_deadline_s=c.retry_deadline_s)
        training = TrainingRun(
            run_id,
            config,
            self._settings(),
            episodes=episodes,
            publisher=publisher,
            sink=lambda stage, step, values: self._on_metrics(run_id, stage, step, values),
            on_state=lambda progress: self._on_state(run_id, progress),
            on_checkpoint=lambda ckpt: self._on_checkpoint(ckpt),
        )
        live = _Live(training, open_tracking(c.tracking(), Path(c.runs_dir), run_id))
        live.tracking.log_params(flatten_config(config))
        self.live[run_id] = live
        live.thread = threading.Thread(
            target=self._thread_main, args=(run_id, live), name=f"train-{run_id}", daemon=True
        )
        self.store.runs.update(run_id, state=run_pb2.RUN_STATE_RUNNING)
        live.thread.start()

    def _thread_main(self, run_id: str, live: _Live) -> None:
        training = live.training
        try:
            progress = training.run()
            if training.stopped and progress.stage != "done":
                if self._shutting_down:
                    log.info("run %s interrupted by the shutdown at %s; StartRun(resume_run_id) resumes it",
                             run_id, progress.stage)  # fmt: skip
                    self.store.runs.update(run_id, state=run_pb2.RUN_STATE_INTERRUPTED, stage=progress.stage)
                    return
                state = run_pb2.RUN_STATE_STOPPED
            else:
                state = run_pb2.RUN_STATE_SUCCEEDED
            # before the state: a client that sees the run finished finds its TensorBoard and MLflow complete
            live.tracking.close("FINISHED" if state == run_pb2.RUN_STATE_SUCCEEDED else "KILLED")
            self.store.runs.update(run_id, state=state, stage=progress.stage)
            self._write_report(run_id)
        except Exception as err:
            if self._shutting_down:  # its peers went down with the topology: the run did not fail
                log.info("run %s interrupted by the shutdown (%s: %s)", run_id, type(err).__name__, err)
                return
            log.exception("run %s failed", run_id)
            live.tracking.close("FAILED")
            self.store.runs.update(run_id, state=run_pb2.RUN_STATE_FAILED, error=f"{type(err).__name__}: {err}")
        finally:
            live.tracking.close("KILLED")  # interrupted (resumable): a no-op where closed above
            live.done = True
            self._publish_to_subscribers(run_id, None)

    def _write_report(self, run_id: str) -> None:
        try:
            run = self.store.runs.get(run_id)
            write_report(run, self.store.metrics.steps(run_id), Path(self.config.runs_dir) / run_id / "report")
        except Exception:
            log.exception("report of run %s failed", run_id)

    def _on_metrics(self, run_id: str, stage: str, step: int, values: dict[str, float]) -> None:
        metrics = run_pb2.StepMetrics(run_id=run_id, stage=stage, step=step, values=values)
        metrics.time.GetCurrentTime()
        self.store.metrics.add(metrics)
        self.store.runs.update(run_id, stage=stage, step=step)
        self.live[run_id].tracking.log_metrics(step, values)
        self._publish_to_subscribers(run_id, metrics)

    def _on_state(self, run_id: str, progress: RunProgress) -> None:
        self.store.runs.update(run_id, policy_version=progress.policy_version)

    def _on_checkpoint(self, ckpt: run_pb2.Checkpoint) -> None:
        self.store.checkpoints.add(ckpt)
        self.live[ckpt.run_id].tracking.log_checkpoint(ckpt)
        self.store.policy_versions.publish(ckpt.run_id, ckpt.policy_version, ckpt.checkpoint_id)
        self.store.runs.update(ckpt.run_id, policy_version=ckpt.policy_version)

    def _publish_to_subscribers(self, run_id: str, metrics: run_pb2.StepMetrics | None) -> None:
        live = self.live.get(run_id)
        if live is None or self.loop is None:
            return
        for queue in list(live.subscribers):
            self.loop.call_soon_threadsafe(queue.put_nowait, metrics)

    # ---- RPCs ---------------------------------------------------------------------------------

    async def StartRun(
        self, request: trainer_pb2.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StartRunResponse:
        busy = [rid for rid, live in self.live.items() if not live.done]
        if busy:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {busy[0]} is still training on this trainer (one run at a time): follow it with "
                f"`forgerl run status {busy[0]}`, or stop it with `forgerl run stop {busy[0]}` first",
            )
        if request.resume_run_id:
            run = self.store.runs.find(request.resume_run_id)
            if run is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.resume_run_id!r} to resume")
            assert run is not None
            self._launch(run.run_id, run.config)
            return trainer_pb2.StartRunResponse(run=self.store.runs.get(run.run_id))
        config = request.config
        if config.rl.steps > 0 and config.rl.batch_size <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rl.batch_size must be > 0 when rl.steps > 0")
        if config.rl.loss:
            from forgerl.rl.losses import POLICY_LOSSES

            if config.rl.loss not in POLICY_LOSSES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown rl.loss {config.rl.loss!r}: choose one of {', '.join(sorted(POLICY_LOSSES))}",
                )
        run_id = new_run_id(config.name)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        self.store.runs.create(run_pb2.Run(run_id=run_id, config=config, state=run_pb2.RUN_STATE_PENDING,
                                           stage="sft", created_at=now))  # fmt: skip
        self._launch(run_id, config)
        return trainer_pb2.StartRunResponse(run=self.store.runs.get(run_id))

    async def GetRun(
        self, request: trainer_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetRunResponse:
        run = self.store.runs.find(request.run_id)
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}")
        return trainer_pb2.GetRunResponse(run=run)

    async def StreamMetrics(
        self, request: trainer_pb2.StreamMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.StreamMetricsResponse]:
        run = self.store.runs.find(request.run_id)
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}")
        queue: asyncio.Queue[run_pb2.StepMetrics | None] = asyncio.Queue()
        live = self.live.get(request.run_id)
        if live is not None:
            live.subscribers.add(queue)
        try:
            sent: set[tuple[str, int]] = set()
            for m in self.store.metrics.steps(request.run_id, since_step=request.from_step - 1):
                sent.add((m.stage, m.step))
                yield trainer_pb2.StreamMetricsResponse(metrics=m)
            if live is None or live.done:
                return
            while True:
                item = await queue.get()
                if item is None:
                    return
                if item.step < request.from_step:
                    continue
                yield trainer_pb2.StreamMetricsResponse(metrics=item)
        finally:
            if live is not None:
                live.subscribers.discard(queue)

    async def StopRun(
        self, request: trainer_pb2.StopRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StopRunResponse:
        run = self.store.runs.find(request.run_id)
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}")
        live = self.live.get(request.run_id)
        if live is not None and not live.done:
            live.training.stop()
            if live.thread is not None:
                await asyncio.to_thread(live.thread.join, 120)
        run = self.store.runs.get(request.run_id)
        if run.state not in _TERMINAL:
            run = self.store.runs.update(request.run_id, state=run_pb2.RUN_STATE_STOPPED)
        return trainer_pb2.StopRunResponse(run=run)

    async def ListRuns(
        self, request: trainer_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListRunsResponse:
        unknown = [state for state in request.states if state not in run_pb2.RunState.values()]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"states {unknown}: not RunState values")
        if not 0 <= request.limit <= MAX_LIST_RUNS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"limit {request.limit}: must be in [0, {MAX_LIST_RUNS}] (0: 100)"
            )
        runs = self.store.runs.list(states=list(request.states), limit=request.limit or 100)
        return trainer_pb2.ListRunsResponse(runs=runs)

    async def ListCheckpoints(
        self, request: trainer_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListCheckpointsResponse:
        return trainer_pb2.ListCheckpointsResponse(checkpoints=self.store.checkpoints.list(request.run_id))
