"""The episode runner: task -> sandbox -> agent (through the gateway) -> tests -> rewards -> trajectory.

One `EpisodeRunner.run(spec)` is one attempt at one episode:

1. a sandbox with the task's files (`SandboxInfraError` -> the attempt failed for infrastructure reasons);
2. for agents that use the model: `GatewayService.OpenEpisode` -> an episode key and the base URL the
   agent's OpenAI client talks to (the gateway records every model call token-exactly);
3. the agent runs until it answers, spends its turn budget or hits the task's time budget;
4. the tests (forgerl.rollout.grading): the agent's source edits are applied to a clean copy of the task
   in a fresh sandbox, with the task's tests, the harness and a canary (and the final answer in the
   task's answer file, if any); graded FAIL_TO_PASS / PASS_TO_PASS;
5. rewards (forgerl.rollout.rewards) and `CloseEpisode` with them, which returns the trajectory and hands
   it to the data pool when `publish` is set;
6. the sandbox is deleted, whatever happened.

`InfraError` marks an attempt that failed through no fault of the agent (sandbox, gateway or model
endpoint unreachable): the service retries it. Anything the agent does wrong is an outcome, rewarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from forgerl.rollout.grading import GRADING_TIMEOUT_S, run_tests
from forgerl.rollout.rewards import RewardSettings, episode_rewards
from forgerl.rollout.sandbox.base import SandboxFactory, SandboxInfraError
from forgerl.rollout.scaffold import AgentResult, EpisodeContext, ModelUnavailableError, make_agent
from forgerl.rollout.scaffold_config import ScaffoldRegistry
from forgerl.rollout.tasks import Grading, Suite, Task
from forgerl.rollout.tools import ToolBox
from forgerl.rollout.workspace import open_workspace
from forgerl.v1 import gateway_pb2, gateway_pb2_grpc, trajectory_pb2

log = logging.getLogger("forgerl.rollout")

# After the deadline the agent is cancelled; this much longer is allowed for it to wind down.
DEADLINE_GRACE_S = 5.0


class InfraError(Exception):
    """The attempt failed for infrastructure reasons (sandbox, gateway, model endpoint): retry it."""


class EpisodeError(Exception):
    """The episode cannot run as asked (unknown scaffold, an agent that needs a model but no gateway)."""


@dataclass(frozen=True)
class EpisodeSpec:
    run_id: str
    task: Task
    scaffold_version: str
    group_id: str = ""
    episode_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    publish: bool = True
    attempt: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    # The run's (alpha, beta) reward weights; None: the runner's configured ones.
    reward_weights: tuple[float, float] | None = None


@dataclass
class EpisodeResult:
    episode_id: str
    task_id: str
    reward: trajectory_pb2.RewardComponents
    step_rewards: list[trajectory_pb2.StepReward]
    success: bool
    performance: float
    wall_clock_s: float
    sandbox_start_s: float
    stopped: str
    turns: int
    tests: Grading
    trajectory_id: str = ""
    gateway_episode_id: str = ""
    final_answer: str = ""
    tool_calls: int = 0
    tool_errors: int = 0
    violations: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OpenedEpisode:
    episode_id: str
    episode_key: str
    base_url: str


class Gateway(Protocol):
    async def open(self, spec: EpisodeSpec, strip_reasoning: bool) -> OpenedEpisode: ...

    async def close(
        self,
        key: str,
        *,
        step_rewards: list[trajectory_pb2.StepReward],
        reward: trajectory_pb2.RewardComponents,
        success: bool,
        wall_clock_s: float,
        baseline_s: float,
        publish: bool,
    ) -> trajectory_pb2.Trajectory: ...


_INFRA_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


class GrpcGateway:
    """GatewayService over gRPC (the admin side; agents use its OpenAI endpoint).

    A close the gateway could not publish (the data pool or its broker restarting: UNAVAILABLE, the episode
    stays open with every turn recorded) is repeated with doubling backoff up to `close_deadline_s`, so the
    trajectory is written late instead of the episode run again or failed."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0, close_deadline_s: float = 120.0) -> None:
        self.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.timeout_s = timeout_s
        self.close_deadline_s = close_deadline_s

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            # A gateway that is restarting is waited for (up to the timeout), not counted as a failed attempt.
            return await method(request, timeout=self.timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            if err.code() in _INFRA_CODES:
                raise InfraError(f"gateway {err.code().name}: {err.details()}") from err
            raise EpisodeError(f"gateway refused: {err.code().name}: {err.details()}") from err

    async def open(self, spec: EpisodeSpec, strip_reasoning: bool) -> OpenedEpisode:
        reply = await self._call(
            self.stub.OpenEpisode,
            gateway_pb2.OpenEpisodeRequest(
                run_id=spec.run_id,
                task_id=spec.task.id,
                group_id=spec.group_id,
                scaffold_version=spec.scaffold_version,
                strip_reasoning=strip_reasoning,
                suite=spec.task.suite,
                split=spec.task.split,
                labels={**spec.labels, "forgerl/attempt": str(spec.attempt)},
            ),
        )
        return OpenedEpisode(reply.episode_id, reply.episode_key, reply.base_url)

    async def close(
        self,
        key: str,
        *,
        step_rewards: list[trajectory_pb2.StepReward],
        reward: trajectory_pb2.RewardComponents,
        success: bool,
        wall_clock_s: float,
        baseline_s: float,
        publish: bool,
    ) -> trajectory_pb2.Trajectory:
        request = gateway_pb2.CloseEpisodeRequest(
            episode_key=key,
            step_rewards=step_rewards,
            reward=reward,
            success=success,
            wall_clock_s=wall_clock_s,
            baseline_s=baseline_s,
            publish=publish,
        )
        deadline = time.monotonic() + self.close_deadline_s
        delay, retried = 0.5, False
        while True:
            try:
                return (await self._call(self.stub.CloseEpisode, request)).trajectory
            except InfraError as err:
                code = err.__cause__.code() if isinstance(err.__cause__, grpc.aio.AioRpcError) else None
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > deadline:
                    raise
                log.info("episode close not published yet (%s); retrying in %.1f s", err, delay)
            except EpisodeError as err:
                if not retried:
                    raise
                # Unknown after an UNAVAILABLE: that gateway died with the episode; run the episode again.
                raise InfraError(f"the gateway lost the episode while closing it: {err}") from err
            await asyncio.sleep(delay)
            delay, retried = min(10.0, delay * 2), True


class EpisodeRunner:
    def __init__(
        self,
        sandboxes: SandboxFactory,
        suites: Mapping[str, Suite],
        *,
        scaffolds: ScaffoldRegistry | None = None,
        gateway: Gateway | None = None,
        rewards: RewardSettings | None = None,
        model: str = "forgerl-policy",
        http_client_factory: Any = None,
    ) -> None:
        self.sandboxes = sandboxes
        self.suites = suites
        self.scaffolds = scaffolds or ScaffoldRegistry()
        self.gateway = gateway
        self.rewards = rewards or RewardSettings()
        self.model = model
        self.http_client_factory = http_client_factory  # tests: an httpx.AsyncClient with a mock transport

    def _reward_settings(self, spec: EpisodeSpec) -> RewardSettings:
        if spec.reward_weights is None:
            return self.rewards
        alpha, beta = spec.reward_weights
        return dataclasses.replace(self.rewards, alpha=alpha, beta=beta)

    async def run(self, spec: EpisodeSpec) -> EpisodeResult:
        task = spec.task
        try:
            scaffold = self.scaffolds.get(spec.scaffold_version)
        except (KeyError, ValueError) as exc:
            raise EpisodeError(str(exc)) from exc
        agent = make_agent(scaffold)
        if agent.needs_model and self.gateway is None:
            raise EpisodeError(f"scaffold {scaffold.version} ({scaffold.agent}) needs the gateway; none is configured")
        suite = self.suites[task.suite]
        labels = {"forgerl/run": spec.run_id, "forgerl/episode": spec.episode_id, "forgerl/task": task.id}
        try:
            sandbox = await open_workspace(
                self.sandboxes, task, labels=labels, time_budget_s=task.time_budget_s + GRADING_TIMEOUT_S
            )
        except SandboxInfraError as exc:
            raise InfraError(f"sandbox: {exc}") from exc
        opened: OpenedEpisode | None = None
        closed = False
        client = None
        try:
            if agent.needs_model:
                assert self.gateway is not None
                opened = await self.gateway.open(spec, strip_reasoning=not scaffold.context.keep_reasoning)
                client = self._client(opened)
            tool_names = task.tools
            if scaffold.agent == "mini-swe-agent" and "bash" not in tool_names:
                tool_names = (*tool_names, "bash")  # mini-swe-agent's only tool
            toolbox = ToolBox(tool_names, sandbox, timeout_s=scaffold.tool_timeout_s)
            started = time.monotonic()
            ctx = EpisodeContext(
                task=task,
                scaffold=scaffold,
                tools=toolbox,
                deadline=started + task.time_budget_s,
                gold=suite.gold(task) if scaffold.agent == "oracle" else None,
                client=client,
                model=self.model,
                base_url=opened.base_url if opened else "",
                api_key=opened.episode_key if opened else "",
            )
            try:
                result = await asyncio.wait_for(agent.run(ctx), task.time_budget_s + DEADLINE_GRACE_S)
            except TimeoutError:
                result = AgentResult("", ctx.turns, "time_budget")
            except ModelUnavailableError as exc:
                raise InfraError(str(exc)) from exc
            wall = time.monotonic() - started
            tests = await run_tests(self.sandboxes, sandbox, task, result.final_answer, labels=labels)
            rewards = episode_rewards(
                result.step_processes(),
                performance=tests.performance,
                success=tests.success,
                wall_clock_s=wall,
                baseline_s=task.baseline_s,
                settings=self._reward_settings(spec),
            )
            trajectory_id = ""
            if opened is not None:
                assert self.gateway is not None
                closed = True
                # An episode cut off during its first model call has no turn at the gateway: nothing to train
                # on, and no turn to put a step reward on. It closes unpublished (the pool is told it is skipped).
                trained = bool(result.turns)
                trajectory = await self.gateway.close(
                    opened.episode_key,
                    step_rewards=rewards.steps if trained else [],
                    reward=rewards.total,
                    success=tests.success,
                    wall_clock_s=wall,
                    baseline_s=task.baseline_s,
                    publish=spec.publish and trained,
                )
                trajectory_id = trajectory.trajectory_id if trained else ""
            stats = toolbox.stats
            return EpisodeResult(
                episode_id=spec.episode_id,
                task_id=task.id,
                reward=rewards.total,
                step_rewards=rewards.steps,
                success=tests.success,
                performance=tests.performance,
                wall_clock_s=wall,
                sandbox_start_s=sandbox.start_latency_s,
                stopped=result.stopped,
                turns=len(result.turns),
                tests=tests,
                trajectory_id=trajectory_id,
                gateway_episode_id=opened.episode_id if opened else "",
                final_answer=result.final_answer,
                tool_calls=stats.calls,
                tool_errors=stats.errors,
                violations=list(stats.violations),
            )
        except SandboxInfraError as exc:
            raise InfraError(f"sandbox: {exc}") from exc
        finally:
            if opened is not None and not closed and self.gateway is not None:
                # Release the episode at the gateway without publishing a half-finished trajectory.
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        self.gateway.close(
                            opened.episode_key,
                            step_rewards=[],
                            reward=trajectory_pb2.RewardComponents(),
                            success=False,
                            wall_clock_s=0.0,
                            baseline_s=task.baseline_s,
                            publish=False,
                        )
                    )
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            await asyncio.shield(sandbox.close())

    def _client(self, opened: OpenedEpisode) -> Any:
        import openai

        kwargs: dict[str, Any] = {"base_url": opened.base_url, "api_key": opened.episode_key, "max_retries": 2}
        if self.http_client_factory is not None:
            kwargs["http_client"] = self.http_client_factory()
        return openai.AsyncOpenAI(**kwargs)
