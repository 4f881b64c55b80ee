"""One suite for every target (e2e_tests/deployment.py picks the local topology or a cluster): each
service SERVING, one episode through rollout, and a tiny SFT + RL run through the trainer, all by gRPC."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml
from deployment import Deployment, cluster_deployment, free_topology_values, local_deployment, target_from_env

from forgerl.deploy.checks import SERVICE_NAMES, run_one_episode, wait_serving
from forgerl.runtime.client import health_status, insecure_channel
from forgerl.v1 import inference_pb2, inference_pb2_grpc, rollout_pb2, run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if target_from_env() == "cluster":
        yield cluster_deployment()
        return
    root = tmp_path_factory.mktemp("deployment")
    topology_file = root / "local.yaml"
    topology_file.write_text(yaml.safe_dump(free_topology_values(root)))
    # The trainer's held-out evaluation: 8 tasks, not 256, so that the run takes seconds.
    env = {"FORGERL_TRAINER_EVAL_TASKS": "8", "FORGERL_TRAINER_RUNS_DIR": str(root / "runs"), "OMP_NUM_THREADS": "1"}
    with local_deployment(topology_file, env) as running:
        yield running


def test_every_service_is_serving(deployment: Deployment) -> None:
    statuses = wait_serving(deployment.addresses, timeout_s=300)
    assert statuses == dict.fromkeys(SERVICE_NAMES, "SERVING")
    # The checker is not vacuous: a port where nothing listens reads as UNREACHABLE.
    assert health_status("127.0.0.1:1", SERVICE_NAMES["gateway"]) == "UNREACHABLE"


def test_one_episode_through_rollout(deployment: Deployment) -> None:
    event = run_one_episode(deployment.addresses["rollout"], "tooluse", timeout_s=300, token=deployment.token)
    assert event.kind == rollout_pb2.EPISODE_EVENT_KIND_FINISHED
    assert event.task_id and event.wall_clock_s > 0


def test_a_tiny_run_trains_and_publishes(deployment: Deployment) -> None:
    """SFT then one RL step of the debug preset: the run succeeds, the trainer lists the checkpoints it
    wrote, and inference (asked directly) serves the policy version the trainer published last."""
    config = run_pb2.RunConfig(
        name="e2e-deployment",
        model_preset="debug",
        suite="tooluse",
        seed=0,
        checkpoint_every=1,
        sft=run_pb2.SftStage(steps=2, batch_size=4, learning_rate=3e-3),
        rl=run_pb2.RlStage(steps=1, batch_size=8, group_size=4, episodes_in_flight=8),
    )
    inference = inference_pb2_grpc.InferenceServiceStub(
        insecure_channel(deployment.addresses["inference"], deployment.token)
    )
    served_before = inference.GetStatus(inference_pb2.GetStatusRequest(), timeout=10).policy_version
    with insecure_channel(deployment.addresses["trainer"], deployment.token) as channel:
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        run = trainer.StartRun(trainer_pb2.StartRunRequest(config=config), timeout=60).run
        deadline = time.monotonic() + 600
        while run.state in (run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING) and time.monotonic() < deadline:
            time.sleep(2)
            run = trainer.GetRun(trainer_pb2.GetRunRequest(run_id=run.run_id), timeout=10).run
        assert run.state == run_pb2.RUN_STATE_SUCCEEDED, (run_pb2.RunState.Name(run.state), run.error)
        assert run.stage == "done"
        checkpoints = trainer.ListCheckpoints(trainer_pb2.ListCheckpointsRequest(run_id=run.run_id), timeout=10)
        assert len(checkpoints.checkpoints) >= 1
    # What the trainer published is what inference serves now, and it is newer than before the run.
    served_after = inference.GetStatus(inference_pb2.GetStatusRequest(), timeout=10).policy_version
    assert served_after == run.policy_version > served_before
