"""Self-evolution on the local topology: N rounds improving the default scaffold on the tool-use suite.

Starts its own local topology (every service, the Tansu broker, vLLM's CPU engine serving --checkpoint) on
non-default loopback ports with its state under --state-dir, then drives the evolution service as an
operator would, over gRPC: start the loop with the built-in mutation operators as the proposer (no external
model), approve each candidate that reaches the approval gate (dev and held-out agreed), wait until the
round budget is spent. Each round evaluates candidate and incumbent through rollout on the same tasks with
--seeds episodes each (a subset stage, then the dev set); the held-out set re-checks a promotion.

Afterwards it measures what the loop was for: the root scaffold and the final incumbent on the sealed
held-out tasks, paired, with the same bootstrap interval the controller decides with (when nothing was
promoted the two are the same version and one evaluation stands for both). Every decision's statistics are
read back from the operator console's JSON API (/api/v1/iterations/<id>), and then looked for in the console
page itself in Chromium (console_decisions.mjs, when `make test-browser` has installed Chromium and
playwright-core): each compare view must show every stage's tasks x seeds, mean paired difference, interval
and margin; screenshots land in <state-dir>/console/.

    rounds, decisions[]      each round: operator, change, state, per stage the mean paired difference,
                             its interval, the margin, candidate and incumbent success
    heldout_before/_after    success of the root scaffold and of the final incumbent on the held-out set
    wall_s                   the loop's wall time (topology start and the final held-out check excluded)

Without --checkpoint it serves an untrained `tiny` checkpoint (every score 0: the loop runs, nothing can win).

Run (repo root): `python benchmarks/evolution.py --checkpoint /tmp/lrn/main-ckpt [--rounds 10]
[--subset-tasks 8 --dev-tasks 24 --heldout-tasks 48 --seeds 3] [--state-dir /tmp/evo/bench] [--port-base 47100]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from forgerl.evolution import stats
from forgerl.evolution.evaluation import EvaluationResult, RolloutEvaluator, draw_task_sets
from forgerl.local.bootstrap import ensure_initial_checkpoint
from forgerl.local.supervisor import Supervisor
from forgerl.local.topology import SERVICES, LocalTopology
from forgerl.rollout.tasks import get_suite
from forgerl.runtime.client import aio_channel
from forgerl.v1 import evolution_pb2, evolution_pb2_grpc

SUITE, SPLIT, TASK_SEED = "tooluse", "test", 0
OPERATOR_TOKEN = "evolution-benchmark"
CHROMIUM = Path("/usr/bin/chromium")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", type=Path, help="HF-format checkpoint to serve; default: an untrained `tiny` one (no gain)."
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--subset-tasks", type=int, default=8, help="First-stage subset of the dev set.")
    p.add_argument("--dev-tasks", type=int, default=24)
    p.add_argument("--heldout-tasks", type=int, default=48)
    p.add_argument("--seeds", type=int, default=3, help="Episodes per task and version (>= 3).")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--wall-budget-s", type=float, default=3600.0, help="The loop's wall-time budget.")
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/evo/bench"), help="Emptied first.")
    p.add_argument(
        "--port-base", type=int, default=47100, help="Ports port-base .. +31 (not the defaults 50051-50056, ...)."
    )
    p.add_argument("--poll-s", type=float, default=5.0)
    # vLLM's CPU engine took 1.5 min to start at load 3, over 4 at load 12-15, over 15 at load 20-24 (nice 19).
    p.add_argument("--ready-timeout-s", type=float, default=900.0, help="Wait this long for the topology.")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not (args.checkpoint / "config.json").exists():
        p.error(f"--checkpoint {args.checkpoint}: no config.json there; pass an HF-format checkpoint directory")
    if args.seeds < stats.MIN_SEEDS:
        p.error(f"--seeds {args.seeds}: the decision rule needs >= {stats.MIN_SEEDS}")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be >= 1")
    return args


def write_topology(args: argparse.Namespace, checkpoint: Path) -> Path:
    """A topology YAML on ports port-base.. (broker, 6 gRPC, 6 metrics, 2 HTTP) with state under --state-dir."""
    base = args.port_base
    values = {
        "broker_port": base,
        "grpc_base_port": base + 1,
        "metrics_base_port": base + 1 + len(SERVICES),
        "gateway_http_port": base + 1 + 2 * len(SERVICES),
        "evolution_http_port": base + 2 + 2 * len(SERVICES),
        "state_dir": str(args.state_dir / "state"),
        "model_path": str(checkpoint.resolve()),
        "grace_s": 5.0,
        "ready_timeout_s": args.ready_timeout_s,
    }
    path = args.state_dir / "topology.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def evolution_env(args: argparse.Namespace) -> dict[str, str]:
    """The evolution service's settings for this run (the supervisor passes our environment on)."""
    settings = {
        "SUITE": SUITE,
        "SPLIT": SPLIT,
        "TASK_SEED": TASK_SEED,
        "SUBSET_TASKS": args.subset_tasks,
        "DEV_TASKS": args.dev_tasks,
        "HELDOUT_TASKS": args.heldout_tasks,
        "SEEDS": args.seeds,
        "MARGIN": args.margin,
        "BUDGET_ROUNDS": args.rounds,
        "BUDGET_WALL_TIME_S": args.wall_budget_s,
        "PROPOSER": "mutation",
        "REQUIRE_APPROVAL": "true",
        "OPERATOR_TOKEN": OPERATOR_TOKEN,
        "DIAGNOSE_INTERVAL_S": 0,
    }
    return {f"FORGERL_EVOLUTION_{key}": str(value) for key, value in settings.items()}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def run_loop(stub: evolution_pb2_grpc.EvolutionServiceStub, poll_s: float) -> evolution_pb2.EvolutionStatus:
    """Start the loop, approve what reaches the gate, return the final status once the loop has ended."""
    await stub.StartIteration(evolution_pb2.StartIterationRequest(base_scaffold=""))
    last = ""
    while True:
        status = (await stub.GetEvolutionStatus(evolution_pb2.GetEvolutionStatusRequest())).status
        for iteration_id in status.awaiting_approval:
            request = evolution_pb2.ApproveCandidateRequest(
                iteration_id=iteration_id, approve=True, operator="benchmark", note="dev and held-out agreed"
            )
            await stub.ApproveCandidate(request)
            log(f"approved {iteration_id}")
        line = (
            f"{status.state}: round {status.rounds_spent}/{status.rounds_limit}, episodes {status.episodes_spent}, "
            f"incumbent {status.incumbent}"
        )
        if line != last:
            log(line)
            last = line
        if status.state in ("finished", "halted"):
            return status
        await asyncio.sleep(poll_s)


def console_status(console_url: str) -> dict[str, Any]:
    """The controller's snapshot (its incumbent by scaffold name, as rollout knows it)."""
    return dict(httpx.get(console_url.rstrip("/") + "/api/v1/status", timeout=30).raise_for_status().json())


def read_decisions(console_url: str) -> list[dict[str, Any]]:
    """Each iteration's statistics as the console serves them."""
    with httpx.Client(base_url=console_url.rstrip("/") + "/api/v1", timeout=30) as http:
        listed = http.get("/iterations").raise_for_status().json()
        details = [http.get(f"/iterations/{row['id']}").raise_for_status().json() for row in reversed(listed)]
    decisions = []
    for it in details:
        stages = []
        for stage in it["stages"]:
            d = stage["decision"]
            if not stage["per_task"] or not all("difference" in row for row in stage["per_task"]):
                raise RuntimeError(f"console: iteration {it['id']} stage {stage['name']} lacks paired differences")
            stages.append(
                {
                    "stage": stage["name"],
                    "tasks": d["tasks"],
                    "seeds": d["seeds"],
                    "candidate_success": round(stage["candidate_rate"], 4),
                    "incumbent_success": round(stage["incumbent_rate"], 4),
                    # unrounded: the console writes -1e-17 as "-0.000", and the browser check compares
                    "mean_difference": d["mean_difference"],
                    "interval": [d["ci_low"], d["ci_high"]],
                    "confidence": d["confidence"],
                    "margin": d["margin"],
                    "verdict": d["verdict"],
                }
            )
        decisions.append(
            {
                "round": it["index"],
                "iteration": it["id"],
                "operator": it["operator"],
                "change": it["rationale"],
                "candidate": it["candidate"],
                "state": it["state"],
                "why": it["logs"][-1].split(" ", 1)[-1] if it["logs"] else "",
                "stages": stages,
            }
        )
    return decisions


def infra_failures(result: EvaluationResult) -> dict[str, int]:
    """Episodes rollout gave up on (scored 0, as the controller scores them) out of all evaluated."""
    failed = sum(f.message.startswith("infrastructure failure") for f in result.failures)
    return {"episodes": sum(map(len, result.scores.values())), "infrastructure_failures": failed}


async def heldout_check(address: str, before: str, after: str, seeds: int, tasks: tuple[str, ...]) -> dict[str, Any]:
    """Root scaffold vs final incumbent on the held-out tasks, paired, through rollout."""
    channel = aio_channel(address)
    try:
        evaluator = RolloutEvaluator(channel, run_id="evolution-benchmark")
        first = await evaluator.evaluate(before, SUITE, SPLIT, tasks, seeds)
        second = first if after == before else await evaluator.evaluate(after, SUITE, SPLIT, tasks, seeds)
    finally:
        await channel.close()
    decision = stats.decide(stats.paired_differences(second.scores, first.scores, seeds), seeds=seeds)
    return {
        "tasks": len(tasks),
        "seeds": seeds,
        "before": {"scaffold": before, "success": round(first.success_rate, 4), **infra_failures(first)},
        "after": {"scaffold": after, "success": round(second.success_rate, 4), **infra_failures(second)},
        "mean_difference": round(decision.mean_difference, 4),
        "interval": [round(decision.ci_low, 4), round(decision.ci_high, 4)],
        "verdict": decision.verdict.value,
        "same_version": after == before,
    }


async def benchmark(args: argparse.Namespace, topology: LocalTopology, checkpoint: Path) -> dict[str, Any]:
    channel = aio_channel(topology.address("evolution"))
    try:
        stub = evolution_pb2_grpc.EvolutionServiceStub(channel)
        console_url = (await stub.GetEvolutionStatus(evolution_pb2.GetEvolutionStatusRequest())).status.console_url
        root = console_status(console_url)["incumbent"]
        started = time.monotonic()
        final = await run_loop(stub, args.poll_s)
        wall_s = time.monotonic() - started
    finally:
        await channel.close()
    decisions = read_decisions(console_url)
    incumbent = console_status(console_url)["incumbent"]
    browser = browser_check(console_url, decisions, args.state_dir / "console")
    log(f"console in Chromium: {browser}")
    ids = [t.id for t in get_suite(SUITE).tasks(SPLIT)]
    _, _, heldout = draw_task_sets(ids, args.dev_tasks, args.subset_tasks, args.heldout_tasks, TASK_SEED)
    log(f"held-out check: {root} vs {incumbent} on {len(heldout)} tasks x {args.seeds} seeds")
    check = await heldout_check(topology.address("rollout"), root, incumbent, args.seeds, heldout)
    counts = {state: sum(d["state"] == state for d in decisions) for state in sorted({d["state"] for d in decisions})}
    return {
        "benchmark": "evolution",
        "checkpoint": str(checkpoint),
        "suite": SUITE,
        "sizes": {
            "subset": args.subset_tasks,
            "dev": args.dev_tasks,
            "heldout": args.heldout_tasks,
            "seeds": args.seeds,
        },
        "rounds": final.rounds_spent,
        "status": final.state,
        "halt_reason": final.halt_reason,
        "episodes": final.episodes_spent,
        "wall_s": round(wall_s, 1),
        "states": counts,
        "decisions": decisions,
        "heldout_before": check["before"]["success"],
        "heldout_after": check["after"]["success"],
        "heldout_check": check,
        "console_url": console_url,
        "console_browser_check": browser,
    }


def signed(x: float, digits: int = 3) -> str:
    """As the console writes a number (console.js `signed`): a sign always, -0 as +0."""
    return f"{x + 0.0:+.{digits}f}"


def console_expectations(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per iteration, the texts its compare view must show for each stage (from the API's numbers)."""
    rows = []
    for d in decisions:
        texts = []
        for s in d["stages"]:
            low, high = s["interval"]
            texts += [
                f"{s['tasks']} tasks × {s['seeds']} seeds",
                f"{signed(s['mean_difference'])} [{signed(low)}, {signed(high)}]",
                f"margin {signed(s['margin'], 2)}",
            ]
        rows.append({"id": d["iteration"], "round": d["round"], "texts": texts})
    return rows


def browser_check(console_url: str, decisions: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Every decision's statistics in the console page, in Chromium; screenshots under `out_dir`."""
    root = Path(__file__).resolve().parents[1]
    if not CHROMIUM.exists() or not (root / "node_modules" / "playwright-core").is_dir():
        return {"skipped": "Chromium or playwright-core missing (`make test-browser` installs both)"}
    expectations = out_dir.with_suffix(".json")
    expectations.write_text(json.dumps(console_expectations(decisions), ensure_ascii=False))
    script = Path(__file__).with_name("console_decisions.mjs")
    command = ["node", str(script), console_url, str(expectations), str(out_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": "the browser check took over 600 s"}
    lines = done.stdout.strip().splitlines()
    if not lines:  # reported, not raised: the held-out check after it is the loop's result
        return {"error": f"the browser check printed nothing; stderr: {done.stderr[-2000:]}"}
    checks = json.loads(lines[-1])
    failed = [c for c in checks if not c["ok"]]
    return {"checks": len(checks), "failed": failed, "screenshots": str(out_dir)}


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.state_dir.exists():
        shutil.rmtree(args.state_dir)
    args.state_dir.mkdir(parents=True)
    checkpoint = args.checkpoint or ensure_initial_checkpoint(args.state_dir / "init-tiny", "tiny", 0)
    topology = LocalTopology.load(write_topology(args, checkpoint))
    os.environ.update(evolution_env(args))
    load_before = machine()["load_average"]
    supervisor = Supervisor(topology)
    began = time.monotonic()
    try:
        supervisor.start_all(lambda name, what: log(f"{name} {what}"))
        up_s = time.monotonic() - began
        result = asyncio.run(benchmark(args, topology, checkpoint))
    finally:
        killed = supervisor.stop_all()
        log(
            f"topology stopped ({'killed: ' + ', '.join(killed) if killed else 'cleanly'}); logs in {topology.logs_dir}"
        )
    result["topology_start_s"] = round(up_s, 1)
    result["machine"] = {**machine(), "load_average_before": load_before}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
