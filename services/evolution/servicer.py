"""gRPC front of the evolution controller (EvolutionService), the console's HTTP server, and the diagnosis scan."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
from pathlib import Path

import grpc
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from forgerl.evolution.console import ConsoleApp
from forgerl.evolution.controller import Controller, Settings
from forgerl.evolution.diagnosis import Anomaly, diagnose
from forgerl.evolution.evaluation import Evaluator, RolloutEvaluator, draw_task_sets
from forgerl.evolution.ledger import BudgetLimits
from forgerl.evolution.proposers import ModelProposer, MutationProposer, Proposer
from forgerl.evolution.records import AnomalyRecord, Iteration, Version
from forgerl.rollout.scaffold_config import ScaffoldRegistry
from forgerl.rollout.tasks import get_suite
from forgerl.runtime.client import aio_channel
from forgerl.runtime.http import HttpServer
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.store import Store, default_url
from forgerl.v1 import evolution_pb2, evolution_pb2_grpc, run_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("forgerl.evolution")


def operator_token(config: EvolutionConfig, directory: Path) -> str:
    """The configured token, else the shared auth token, else a random one kept in a 0600 file."""
    if config.operator_token or config.auth_token:
        return config.operator_token or str(config.auth_token)
    path = directory / "operator-token"
    if path.exists():
        return path.read_text().strip()
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def make_proposer(config: EvolutionConfig) -> Proposer:
    if config.proposer == "model":
        if not config.proposer_base_url:
            raise ValueError("proposer 'model' needs proposer_base_url (e.g. the gateway's http://host:port/v1)")
        return ModelProposer(config.proposer_base_url, config.proposer_model, config.proposer_api_key)
    return MutationProposer(seed=config.proposer_seed)


def settings_of(config: EvolutionConfig) -> Settings:
    suite = get_suite(config.suite)
    ids = [t.id for t in suite.tasks(config.split)]
    sizes = (config.dev_tasks, config.subset_tasks, config.heldout_tasks)
    subset, dev, heldout = draw_task_sets(ids, *sizes, config.task_seed)
    return Settings(
        suite=config.suite, split=config.split, subset_tasks=subset, dev_tasks=dev, heldout_tasks=heldout,
        seeds=config.seeds, margin=config.margin, confidence=config.confidence,
        require_approval=config.require_approval,
    )  # fmt: skip


def _ts(iso: str) -> Timestamp:
    ts = Timestamp()
    ts.FromJsonString(iso.replace("+00:00", "Z"))
    return ts


class EvolutionServicer(evolution_pb2_grpc.EvolutionServiceServicer):
    def __init__(self, controller: Controller, console_url: str = "") -> None:
        self.controller = controller
        self.console_url = console_url

    # -- conversions -------------------------------------------------------------------------------

    def ref(self, name: str) -> str:
        """'scaffold_id@version': the root is version 0, the candidate of round n version n."""
        version = self.controller.versions.get(name)
        if version is None or not version.parent:
            return f"{name}@0"
        root, _, index = name.rpartition("-e")
        return f"{root}@{index}"

    def name(self, ref: str) -> str:
        scaffold_id, _, version = ref.partition("@")
        return scaffold_id if version in ("", "0") else f"{scaffold_id}-e{version}"

    def iteration_proto(self, it: Iteration) -> run_pb2.EvolutionIteration:
        decision = it.decision() or {}
        return run_pb2.EvolutionIteration(
            iteration_id=it.id, index=it.index, base_scaffold=self.ref(it.base),
            candidate_scaffolds=[self.ref(it.candidate)] if it.candidate else [],
            state=f"ITERATION_STATE_{it.state.value.upper()}",
            diagnosis="\n".join(it.logs), selected_scaffold=self.ref(it.candidate) if it.candidate else "",
            approved_by=it.approved_by, created_at=_ts(it.created_at), updated_at=_ts(it.updated_at),
            rationale=it.rationale, mean_difference=decision.get("mean_difference", 0.0),
            ci_low=decision.get("ci_low", 0.0), ci_high=decision.get("ci_high", 0.0),
        )  # fmt: skip

    def status_proto(self) -> evolution_pb2.EvolutionStatus:
        snap = self.controller.snapshot()
        budget = snap["budget"]
        return evolution_pb2.EvolutionStatus(
            state=snap["status"], halt_reason=snap["halt_reason"], incumbent=self.ref(snap["incumbent"]),
            suite=snap["suite"], rounds_spent=budget["spent"]["rounds"], rounds_limit=budget["limits"]["rounds"],
            episodes_spent=budget["spent"]["episodes"], episodes_limit=budget["limits"]["episodes"],
            wall_time_spent_s=budget["spent"]["wall_time_s"], wall_time_limit_s=budget["limits"]["wall_time_s"],
            awaiting_approval=snap["awaiting_approval"], open_anomalies=snap["open_anomalies"],
            console_url=self.console_url,
        )  # fmt: skip

    # -- RPCs --------------------------------------------------------------------------------------

    async def StartIteration(
        self, request: evolution_pb2.StartIterationRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.StartIterationResponse:
        c = self.controller
        problem = ""
        if request.suite and request.suite != c.settings.suite:
            problem = f"suite {request.suite!r}: this service evaluates on {c.settings.suite!r} (its --suite)"
        elif request.candidates > 1:
            problem = f"candidates {request.candidates}: the controller proposes one per round"
        elif 0 < request.episodes_per_candidate < 3:
            problem = f"episodes_per_candidate {request.episodes_per_candidate}: the paired rule needs >= 3 seeds"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        base = self.name(request.base_scaffold) if request.base_scaffold else c.incumbent
        try:
            if base != c.incumbent:
                if c.iterations:
                    raise ValueError(f"base {request.base_scaffold}: iterations build on {self.ref(c.incumbent)}")
                c.registry.get(base)
                c.versions.pop(c.incumbent, None)
                c.incumbent = base
                c.versions[base] = Version(base, "", "", "root")
            if request.episodes_per_candidate:
                c.settings = dataclasses.replace(c.settings, seeds=request.episodes_per_candidate)
            c.start("grpc")
        except (KeyError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc.args[0]))
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        current = c.iterations[-1] if c.iterations else None
        return evolution_pb2.StartIterationResponse(
            iteration=self.iteration_proto(current) if current else None, status=self.status_proto()
        )

    async def GetIteration(
        self, request: evolution_pb2.GetIterationRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.GetIterationResponse:
        try:
            it = self.controller.iteration(request.iteration_id)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        evaluations = [
            run_pb2.Evaluation(
                evaluation_id=f"{it.id}-{stage.name}-{who}",
                iteration_id=it.id,
                scaffold_version=self.ref(name),
                suite=self.controller.settings.suite,
                split=f"{stage.split}:{stage.name}",
                episodes=len(stage.per_task) * stage.seeds,
                success_rate=rate,
                mean_reward=rate,  # an evaluation episode scores 1 when its tests pass, else 0
            )
            for stage in it.stages
            for who, name, rate in (("c", it.candidate, stage.candidate_rate), ("i", it.base, stage.incumbent_rate))
        ]
        return evolution_pb2.GetIterationResponse(iteration=self.iteration_proto(it), evaluations=evaluations)

    async def ListIterations(
        self, request: evolution_pb2.ListIterationsRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.ListIterationsResponse:
        its = list(reversed(self.controller.iterations))[: request.limit or None]
        return evolution_pb2.ListIterationsResponse(iterations=[self.iteration_proto(i) for i in its])

    async def ApproveCandidate(
        self, request: evolution_pb2.ApproveCandidateRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.ApproveCandidateResponse:
        try:
            it = self.controller.iteration(request.iteration_id)
            if request.scaffold_version and self.name(request.scaffold_version) != it.candidate:
                raise ValueError(f"iteration {it.id} proposed {self.ref(it.candidate)}, not {request.scaffold_version}")
            self.controller.approve(it.id, request.approve, request.operator, request.note)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        for _ in range(200):  # the round records the decision when it resumes (bounded wait: 2 s)
            if it.state.value != "awaiting_approval":
                break
            await asyncio.sleep(0.01)
        return evolution_pb2.ApproveCandidateResponse(iteration=self.iteration_proto(it))

    async def Rollback(
        self, request: evolution_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.RollbackResponse:
        name = self.name(f"{request.scaffold_id}@{request.to_version}")
        try:
            self.controller.rollback(name, request.operator or "grpc")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return evolution_pb2.RollbackResponse(scaffold=self.version_proto(name))

    def version_proto(self, name: str) -> run_pb2.ScaffoldVersion:
        v = self.controller.versions[name]
        config = self.controller.registry.get(name)
        scaffold_id, _, number = self.ref(name).partition("@")
        return run_pb2.ScaffoldVersion(
            scaffold_id=scaffold_id, version=int(number), parent=self.ref(v.parent) if v.parent else "",
            config_yaml=yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
            created_by=(v.iteration and "evolution") or "builtin", created_at=_ts(v.created_at),
        )  # fmt: skip

    async def ListScaffoldVersions(
        self, request: evolution_pb2.ListScaffoldVersionsRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.ListScaffoldVersionsResponse:
        versions = [self.version_proto(n) for n in self.controller.versions]
        if request.scaffold_id:
            versions = [v for v in versions if v.scaffold_id == request.scaffold_id]
        return evolution_pb2.ListScaffoldVersionsResponse(versions=versions)

    async def GetEvolutionStatus(
        self, request: evolution_pb2.GetEvolutionStatusRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.GetEvolutionStatusResponse:
        return evolution_pb2.GetEvolutionStatusResponse(status=self.status_proto())

    async def ControlEvolution(
        self, request: evolution_pb2.ControlEvolutionRequest, context: grpc.aio.ServicerContext
    ) -> evolution_pb2.ControlEvolutionResponse:
        operator = request.operator or "grpc"
        try:
            if request.action == evolution_pb2.EVOLUTION_ACTION_PAUSE:
                self.controller.pause(operator)
            elif request.action == evolution_pb2.EVOLUTION_ACTION_RESUME:
                self.controller.resume(operator)
            elif request.action == evolution_pb2.EVOLUTION_ACTION_HALT:
                self.controller.halt(operator, request.reason or f"halted by {operator}")
            else:
                raise ValueError("action must be PAUSE, RESUME or HALT")
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return evolution_pb2.ControlEvolutionResponse(status=self.status_proto())


class EvolutionService:
    """What runs in the service's event loop: the controller, its rollout channel, the console, the scan."""

    def __init__(
        self, config: EvolutionConfig, evaluator: Evaluator | None = None, proposer: Proposer | None = None
    ) -> None:
        self.config = config
        self.directory = config.state_dir / "evolution"
        self.channel = aio_channel(config.rollout_address, config.auth_token) if evaluator is None else None
        if evaluator is None:
            if not config.rollout_address:
                raise ValueError("rollout_address is required: evaluations run through RolloutService")
            assert self.channel is not None
            evaluator = RolloutEvaluator(self.channel, max_in_flight=config.evaluation_in_flight)
        scaffolds = Path(config.scaffold_dir) if config.scaffold_dir else config.state_dir / "scaffolds"
        limits = BudgetLimits(config.budget_rounds, config.budget_wall_time_s, config.budget_episodes)
        self.controller = Controller(
            settings_of(config), evaluator, proposer or make_proposer(config), ScaffoldRegistry(scaffolds), limits,
            self.directory, incumbent=config.base_scaffold,
        )  # fmt: skip
        self.trainer = aio_channel(config.trainer_address, config.auth_token) if config.trainer_address else None
        self.console = ConsoleApp(self.controller, operator_token(config, self.directory), act=self.act)
        self.http = HttpServer(self.console, config.host, config.http_port, config.grace_s, config.log_level)
        self.servicer = EvolutionServicer(self.controller, f"{self.http.url}/")
        self._scan: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.http.start()
        log.info("operator console at %s", self.http.url)
        if self.config.diagnose_interval_s > 0:
            self._scan = asyncio.create_task(self._diagnose_forever())
        if self.config.autostart:
            self.controller.start("autostart")

    async def stop(self) -> None:
        self.console.closing.set()
        if self.controller.status in ("running", "paused"):
            self.controller.halt("service", "the evolution service stopped")
        if self._scan is not None:
            self._scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan
        await self.http.stop()
        for channel in (self.channel, self.trainer):
            if channel is not None:
                await channel.close()

    async def act(self, record: AnomalyRecord) -> str:
        """Carry out an approved anomaly's action where the trainer has an RPC for it (stop); the others
        (roll back to a checkpoint, lower the learning rate) are the operator's to do with a new run."""
        action, run_id = record.anomaly["action"], record.run_id
        if action != "stop":
            what = action.replace("_", " ")
            return f"recorded: {what} is done by resuming the run from a checkpoint with changed config"
        if self.trainer is None:
            return f"not carried out: no trainer_address configured; run `forgerl run stop {run_id}`"
        stub = trainer_pb2_grpc.TrainerServiceStub(self.trainer)
        try:
            response = await stub.StopRun(trainer_pb2.StopRunRequest(run_id=run_id), timeout=30)
        except grpc.aio.AioRpcError as err:
            return f"stopping run {run_id} failed: {err.code().name}: {err.details()}"
        return f"run {run_id} stopped ({run_pb2.RunState.Name(response.run.state).removeprefix('RUN_STATE_').lower()})"

    async def _diagnose_forever(self) -> None:
        url = self.config.database_url or default_url(self.config.state_dir)
        sqlite_file = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
        store: Store | None = None
        last_error = ""
        try:
            while True:
                try:
                    if store is None and (sqlite_file is None or sqlite_file.exists()):  # the trainer creates it
                        store = await asyncio.to_thread(Store.open, url, migrate=False)
                    for run_id, anomalies in await asyncio.to_thread(runs_anomalies, store) if store else []:
                        self.controller.report_anomalies(run_id, anomalies)
                    last_error = ""
                except Exception as exc:  # e.g. a store whose tables the trainer has not migrated yet
                    if str(exc) != last_error:  # once per distinct error, not every scan
                        log.warning("diagnosis scan of %s failed: %s", url, exc)
                    last_error = str(exc)
                await asyncio.sleep(self.config.diagnose_interval_s)
        finally:
            if store is not None:
                store.close()


def runs_anomalies(store: Store, runs: int = 5) -> list[tuple[str, list[Anomaly]]]:
    """The newest runs' metrics (`<stage>/<name>` series) through the detectors."""
    found = []
    for run in store.runs.list(limit=runs):
        series: dict[str, list[tuple[int, float]]] = {}
        for m in store.metrics.steps(run.run_id):
            for name, value in m.values.items():
                series.setdefault(f"{m.stage}/{name}" if m.stage else name, []).append((m.step, value))
        anomalies = diagnose(series)
        if anomalies:
            found.append((run.run_id, anomalies))
    return found
