"""Is a deployment alive? gRPC health of every service, and one episode through rollout.

What the Helm chart's test pods run (`helm test <release>`), and what the end-to-end suite asserts on
both targets (the local topology and a cluster):

    python -m forgerl.deploy.checks health [--timeout 120] inference=host:port datapool=host:port ...
    python -m forgerl.deploy.checks episode --rollout host:port [--suite tooluse] [--timeout 600]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence

from forgerl.runtime.client import health_status, insecure_channel
from forgerl.v1 import rollout_pb2, rollout_pb2_grpc

SERVICE_NAMES = {
    "inference": "forgerl.v1.InferenceService",
    "datapool": "forgerl.v1.DatapoolService",
    "gateway": "forgerl.v1.GatewayService",
    "rollout": "forgerl.v1.RolloutService",
    "trainer": "forgerl.v1.TrainerService",
    "evolution": "forgerl.v1.EvolutionService",
}
K = rollout_pb2.EpisodeEventKind


class CheckFailed(RuntimeError):
    """A deployment check did not pass; the message says which service or episode and what it saw."""


def wait_serving(targets: Mapping[str, str], timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """Poll each `service -> host:port` until its own health service answers SERVING, within `timeout_s`
    for all together; return the statuses, or raise CheckFailed naming those that never served."""
    unknown = sorted(set(targets) - set(SERVICE_NAMES))
    if unknown:
        raise CheckFailed(f"unknown services {unknown}; known: {sorted(SERVICE_NAMES)}")
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, str] = {}
    while True:
        for service, address in targets.items():
            if statuses.get(service) != "SERVING":
                statuses[service] = health_status(address, SERVICE_NAMES[service], timeout_s=2.0)
        if all(s == "SERVING" for s in statuses.values()) or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    failing = {s: f"{targets[s]}: {status}" for s, status in statuses.items() if status != "SERVING"}
    if failing:
        raise CheckFailed(f"not SERVING after {timeout_s:.0f} s: {failing}")
    return statuses


def run_one_episode(
    rollout_address: str, suite: str = "tooluse", timeout_s: float = 600.0, token: str | None = None
) -> rollout_pb2.EpisodeEvent:
    """Submit the suite's first test task once (not published to the data pool) and follow its events
    until the episode finishes; return the FINISHED event, or raise CheckFailed with what happened."""
    from forgerl.rollout.tasks import get_suite

    task = get_suite(suite).tasks("test")[0]
    run_id = f"deploy-check-{uuid.uuid4().hex[:8]}"
    with insecure_channel(rollout_address, token) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        request = rollout_pb2.SubmitRequest(
            run_id=run_id, suite=suite, split="test", task_ids=[task.id], group_size=1, publish=False
        )
        submission = stub.Submit(request, timeout=60)
        stream = rollout_pb2.StreamEpisodeEventsRequest(run_id=run_id, submission_id=submission.submission_id)
        events = [r.event for r in stub.StreamEpisodeEvents(stream, timeout=timeout_s)]
    finished = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
    if len(finished) != 1:
        seen = [(K.Name(e.kind), e.message) for e in events]
        raise CheckFailed(f"episode of {suite}/{task.id} did not finish once; events: {seen}")
    return finished[0]


def _parse_targets(pairs: Sequence[str]) -> dict[str, str]:
    targets = {}
    for pair in pairs:
        service, sep, address = pair.partition("=")
        if not sep or ":" not in address:
            raise CheckFailed(f"target {pair!r}: expected service=host:port, e.g. gateway=10.0.0.7:50051")
        targets[service] = address
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgerl.deploy.checks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    health = commands.add_parser("health", help="wait until every named service is SERVING")
    health.add_argument("targets", nargs="+", help="service=host:port")
    health.add_argument("--timeout", type=float, default=120.0)
    episode = commands.add_parser("episode", help="run one episode through rollout")
    episode.add_argument("--rollout", required=True, help="rollout's host:port")
    episode.add_argument("--suite", default="tooluse")
    episode.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "health":
            for service, status in wait_serving(_parse_targets(args.targets), args.timeout).items():
                print(f"{service}: {status}")
        else:
            event = run_one_episode(args.rollout, args.suite, args.timeout, os.environ.get("FORGERL_AUTH_TOKEN"))
            print(f"episode {event.episode_id} of {event.task_id} finished in {event.wall_clock_s:.1f} s")
    except CheckFailed as err:
        print(f"check failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
