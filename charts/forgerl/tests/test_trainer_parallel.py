"""The trainer StatefulSet sized by `trainer.parallel` (issue 19 item 1): the run file's block, in values,
gives the pods and torchrun's processes per pod, and the job they make is one the trainer accepts for that
block (the reference: forgerl.trainer.run_config + ParallelConfig.resolve, as a torchrun worker resolves
it at start). A layout the pods cannot hold fails `helm template` with the values to change, where the
trainer's own check would refuse it only when the workers start."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chart_render import CHART, RELEASE, Manifest, find, helm, render

from forgerl.trainer.run_config import parallel_config, run_config_from_dict

pytestmark = pytest.mark.chart

TRAINER = f"{RELEASE}-forgerl-trainer"
MINIMAX_M2_EXPERTS = 256


def job(manifests: list[Manifest]) -> tuple[int, dict[str, Any]]:
    """(pods, the trainer container's env) of a render."""
    sts = find(manifests, "StatefulSet", TRAINER)
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return sts["spec"]["replicas"], {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize(
    ("gpus", "parallel", "pods"),
    [
        (8, {"dp_shard": 16, "ep": 8}, 2),  # FSDP2 over 2 pods, each expert group over 8 ranks (efsdp 2)
        (8, {"dp_replicate": 2, "dp_shard": 8, "ep": 8, "activation_checkpoint_every": 1}, 2),  # HSDP
        (8, {"dp_shard": 64, "ep": 8}, 8),  # minimax-m2 on 64 GPUs (forgerl plan's layout, README)
        (8, {"dp_replicate": 4, "dp_shard": 16, "ep": 8}, 8),
        (8, {"dp_shard": 8, "ep": 4}, 1),  # one pod, 8 processes: torchrun still needs them told
        (4, {"dp_replicate": 3, "dp_shard": 4}, 3),
        (1, {"dp_shard": 2, "ep": 2}, 2),  # one GPU per pod
    ],
)
def test_pods_follow_the_run_files_layout(gpus: int, parallel: dict[str, int], pods: int) -> None:
    replicas, env = job(render("gpu", trainer__nodes=1, trainer__gpu__count=gpus, trainer__parallel=parallel))
    assert replicas == pods
    assert env["PET_NNODES"] == str(pods) and env["PET_NPROC_PER_NODE"] == str(gpus)
    world = replicas * gpus  # torchrun's world size on these pods
    layout = parallel_config(run_config_from_dict({"trainer": {"parallel": parallel}})).resolve(
        world, MINIMAX_M2_EXPERTS
    )
    assert layout.world_size == world == parallel.get("dp_replicate", 1) * parallel["dp_shard"]


def test_unset_keeps_nodes_of_ddp_ranks() -> None:
    replicas, env = job(render("gpu"))  # the profile's nodes: 2, gpu.count: 8, no parallel
    assert replicas == 2 and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
    ddp = parallel_config(run_config_from_dict({})).resolve(replicas * 8, MINIMAX_M2_EXPERTS)
    assert (ddp.dp_replicate, ddp.dp_shard, ddp.uses_fsdp) == (16, 1, False)
    replicas, env = job(render())
    assert replicas == 1 and not any(k.startswith("PET_") for k in env)  # one process, as before
    # The profile's nodes: 2 agrees with a layout of 2 pods, and is refused with one of 4 (below).
    assert job(render("gpu", trainer__parallel={"dp_shard": 16, "ep": 8}))[0] == 2


def _template_error(**values: Any) -> str:
    args = ["template", RELEASE, str(CHART), "-f", str(CHART / "ci" / "gpu-values.yaml")]
    for key, value in values.items():
        args += ["--set-json", f"{key.replace('__', '.')}={json.dumps(value)}"]
    result = helm(*args, check=False)
    assert result.returncode != 0, "helm template accepted it"
    return result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"trainer__nodes": 1, "trainer__parallel": {"dp_shard": 12}},
            "trainer.parallel: world size 12 (dp_replicate 1 x dp_shard 12) does not divide into trainer pods "
            "of 8 GPUs (trainer.gpu.count: torchrun's --nproc-per-node): make dp_replicate x dp_shard a "
            "multiple of 8, or change trainer.gpu.count",
        ),
        (
            {"trainer__nodes": 1, "trainer__gpu__count": 4, "trainer__parallel": {"dp_replicate": 3, "dp_shard": 2}},
            "world size 6 (dp_replicate 3 x dp_shard 2) does not divide into trainer pods of 4 GPUs",
        ),
        (
            {"trainer__parallel": {"dp_shard": 16, "ep": 3}},
            "trainer.parallel.ep 3 must divide dp_shard 16: expert parallelism is carved out of the",
        ),
        (
            {"trainer__parallel": {"dp_shard": 32}},  # the profile's nodes: 2; the layout needs 4 pods
            "trainer.nodes 2 disagrees with trainer.parallel: world size 32 on pods of 8 GPUs is 4 pods",
        ),
        ({"trainer__parallel": {"dp_shard": -1}}, "at '/trainer/parallel/dp_shard': minimum: got -1, want 0"),
        ({"trainer__parallel": {"tp": 2}}, "at '/trainer/parallel': additional properties 'tp' not allowed"),
    ],
)
def test_a_layout_the_pods_cannot_hold_fails(values: dict[str, Any], message: str) -> None:
    assert message in _template_error(**values)
