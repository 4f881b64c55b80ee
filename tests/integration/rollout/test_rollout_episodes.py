"""Whole episodes in real local sandboxes: the rewards are real, not constant.

A scripted agent that knows the answers scores full reward and one that does nothing scores zero, on both
suites, through the same tool / sandbox / test / reward path as the model's scaffold. Every SWE task is
validated on the way (SWE-bench style): FAIL_TO_PASS fail and PASS_TO_PASS pass on the buggy repository,
all pass after the gold fix. The interleaved scaffold runs the same episodes through a gateway stand-in
(gRPC OpenEpisode / CloseEpisode, an OpenAI endpoint on 127.0.0.1) with the official OpenAI client.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from rollout_fake_gateway import running_fake_gateway

from forgerl.rollout.episode import EpisodeResult, EpisodeRunner, EpisodeSpec, GrpcGateway, InfraError
from forgerl.rollout.rewards import RewardSettings
from forgerl.rollout.sandbox.local import LocalSandboxFactory
from forgerl.rollout.tasks import Task, get_suite
from forgerl.rollout.third_party import MINI_SWE_AGENT, ensure_mini_swe_agent_env
from forgerl.runtime.client import aio_channel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
SUITES = {"tooluse": get_suite("tooluse"), "swe": get_suite("swe")}
REWARDS = RewardSettings(alpha=0.1, beta=0.1)


def tooluse_sample() -> list[Task]:
    """Two held-out tasks of every level."""
    tasks = SUITES["tooluse"].tasks("test")
    return [t for level in (1, 2, 3, 4) for t in [x for x in tasks if x.difficulty == level][:2]]


async def run_all(runner: EpisodeRunner, tasks: list[Task], scaffold: str, parallel: int = 4) -> list[EpisodeResult]:
    gate = asyncio.Semaphore(parallel)

    async def one(task: Task) -> EpisodeResult:
        async with gate:
            return await runner.run(EpisodeSpec(run_id="it", task=task, scaffold_version=scaffold, publish=False))

    return list(await asyncio.gather(*(one(t) for t in tasks)))


def assert_full(result: EpisodeResult) -> None:
    assert result.success and result.performance == 1.0, (result.task_id, result.tests)
    assert result.reward.process == 0.0 and result.reward.performance == 1.0
    assert result.reward.total >= 1.0 - 0.1, result.reward  # speed can only lower it by beta at worst
    assert result.tool_errors == 0 and result.stopped == "answer"


def assert_zero(result: EpisodeResult) -> None:
    assert not result.success and result.performance == 0.0, (result.task_id, result.tests)
    assert result.reward.total == 0.0 and result.reward.speed == 0.0 and result.reward.process == 0.0


async def test_tooluse_knows_the_answers_full_does_nothing_zero(sandbox_root: Path, limits) -> None:
    runner = EpisodeRunner(LocalSandboxFactory(sandbox_root, limits), SUITES, rewards=REWARDS)
    tasks = tooluse_sample()
    for result in await run_all(runner, tasks, "oracle"):
        assert_full(result)
        assert result.tool_calls == 1
    for result in await run_all(runner, tasks, "noop"):
        assert_zero(result)
        assert result.tests.results == {"answer": "fail"}


async def test_swe_every_task_validates_and_scores_full_or_zero(sandbox_root: Path, limits) -> None:
    runner = EpisodeRunner(LocalSandboxFactory(sandbox_root, limits), SUITES, rewards=REWARDS)
    tasks = [*SUITES["swe"].tasks("train"), *SUITES["swe"].tasks("test")]
    fixed = await run_all(runner, tasks, "oracle")
    for task, result in zip(tasks, fixed, strict=True):
        assert_full(result)
        assert set(result.tests.results.values()) == {"pass"}, task.id
    untouched = await run_all(runner, tasks, "noop")
    for task, result in zip(tasks, untouched, strict=True):
        assert_zero(result)
        assert all(result.tests.results[t] == "fail" for t in task.fail_to_pass), (task.id, result.tests.results)
        assert all(result.tests.results[t] == "pass" for t in task.pass_to_pass), (task.id, result.tests.results)
    assert not [p for p in sandbox_root.iterdir() if not p.name.startswith(".")], "sandboxes left behind"


async def test_swe_editing_the_tests_gains_nothing(sandbox_root: Path, limits) -> None:
    """An agent that rewrites the failing test (and the harness) instead of the code still scores 0."""
    from forgerl.rollout.episode import run_tests

    task = SUITES["swe"].tasks("train")[0]
    factory = LocalSandboxFactory(sandbox_root, limits)
    from forgerl.rollout.sandbox.base import SandboxRequest

    sandbox = await factory.create(SandboxRequest(files=task.files))
    try:
        test_file = f"tests/test_{task.metadata['module']}.py"
        fake_harness = 'import sys; print("FORGERL_RESULTS", sys.stdin.readline().strip(), \'{"x": "pass"}\')'
        await sandbox.write_files({
            test_file: "import unittest\nclass T(unittest.TestCase):\n    def test_ok(self): pass\n",
            ".forgerl/run_tests.py": fake_harness,
            "unittest.py": "raise SystemExit('shadowed')",  # cannot shadow the standard library
        })  # fmt: skip
        grading = await run_tests(factory, sandbox, task, "")
        assert grading.performance == 0.0 and not grading.success
        assert all(grading.results[t] == "pass" for t in task.pass_to_pass), grading.results
        assert set(grading.dropped) == {test_file, ".forgerl/run_tests.py"}, grading.dropped
    finally:
        await sandbox.close()


async def test_the_model_scaffold_through_a_gateway(sandbox_root: Path, limits) -> None:
    """The interleaved scaffold, the OpenAI client and the gateway protocol, with a model that replays gold
    solutions: full reward; CloseEpisode gets one step reward per model call; a wrong model scores 0."""
    tasks = [*tooluse_sample()[::2], *SUITES["swe"].tasks("test")[:2]]
    async with running_fake_gateway(SUITES) as (gateway, address):
        channel = aio_channel(address)
        runner = EpisodeRunner(
            LocalSandboxFactory(sandbox_root, limits), SUITES, gateway=GrpcGateway(channel), rewards=REWARDS
        )
        results = await run_all(runner, tasks, "default")
        for task, result in zip(tasks, results, strict=True):
            assert_full(result)
            state = next(s for s in gateway.episodes.values() if s.episode_id == result.gateway_episode_id)
            assert state.closed is not None and not state.closed.publish
            assert result.trajectory_id == f"traj-{state.episode_id}"
            assert len(state.closed.step_rewards) == state.calls == result.turns
            assert state.closed.baseline_s == task.baseline_s and state.closed.success
            assert state.request.scaffold_version == "default" and state.request.suite == task.suite
        gateway.behaviour = "wrong"
        wrong = await runner.run(EpisodeSpec(run_id="it", task=tasks[0], scaffold_version="default"))
        assert_zero(wrong)
        assert len(gateway.published) == 1  # publish=True by default: handed to the data pool
        gateway.behaviour = "down"
        with pytest.raises(InfraError, match="model endpoint unavailable"):
            await runner.run(EpisodeSpec(run_id="it", task=tasks[0], scaffold_version="default"))
        # The failed attempt was closed without publishing, and its sandbox is gone.
        assert all(s.closed is not None for s in gateway.episodes.values())
        assert len(gateway.published) == 1
        await channel.close()
    assert not [p for p in sandbox_root.iterdir() if not p.name.startswith(".")]


def _mini_swe_agent_python() -> str:
    import os as _os

    override = _os.environ.get("FORGERL_MINI_SWE_AGENT_PYTHON")
    if override:
        return override
    venv = Path(__file__).resolve().parents[3] / ".forgerl" / "venvs" / MINI_SWE_AGENT.replace("==", "-")
    return str(ensure_mini_swe_agent_env(venv))


async def test_mini_swe_agent_through_the_same_episode_api(
    sandbox_root: Path, limits, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """mini-swe-agent (its own process and environment) as the agent: its model calls go to the gateway with
    the episode key, its bash commands run in our sandbox, the tests grade its work."""
    python = _mini_swe_agent_python()
    monkeypatch.setenv("FORGERL_MINI_SWE_AGENT_PYTHON", python)
    monkeypatch.setenv("MSWEA_GLOBAL_CONFIG_DIR", str(tmp_path / "mini-swe-agent"))
    task = SUITES["swe"].tasks("test")[1]
    async with running_fake_gateway(SUITES, behaviour="mini-swe-agent") as (gateway, address):
        channel = aio_channel(address)
        runner = EpisodeRunner(
            LocalSandboxFactory(sandbox_root, limits), SUITES, gateway=GrpcGateway(channel), rewards=REWARDS
        )
        result = await runner.run(EpisodeSpec(run_id="it", task=task, scaffold_version="mini-swe-agent"))
        await channel.close()
    assert result.success and result.performance == 1.0, (result.stopped, result.tests)
    assert result.stopped == "answer" and result.turns == 2 and result.tool_calls == 2
    (state,) = gateway.episodes.values()
    assert state.calls == 2 and len(state.closed.step_rewards) == 2 and state.closed.success
