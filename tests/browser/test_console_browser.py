"""The operator console in a real browser (Debian's Chromium through playwright-core) against a live
evolution service: six rounds over the simulated suite, anomalies from an injected NaN, then every page
renders and an approval clicked in the page promotes the iteration. Screenshots: artefacts/console/.

`make test-browser` installs Chromium (apt) and the npm packages first."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from forgerl.evolution.diagnosis import diagnose
from forgerl.evolution.testing import DEMO_SCRIPT, ScriptedProposer, SimulatedEvaluator, demo_effect
from forgerl.rollout.scaffold_config import ScaffoldRegistry
from forgerl.runtime.testing import serve_in_process
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.services.evolution.main import build

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / "artefacts" / "console"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token"


async def until(condition: Any, what: str, timeout_s: float = 60) -> Any:
    """Poll `condition()` (async) until it returns something truthy."""
    async with asyncio.timeout(timeout_s):
        while not (value := await condition()):
            await asyncio.sleep(0.05)
    assert value, what
    return value


async def test_console_pages_and_an_approval_in_the_browser(tmp_path: Path) -> None:
    if not CHROMIUM.exists() or not (ROOT / "node_modules" / "playwright-core").is_dir():
        pytest.fail("Chromium or playwright-core is missing: run `make test-browser` (it installs both)")
    config = EvolutionConfig(
        state_dir=tmp_path, http_port=0, operator_token=TOKEN, diagnose_interval_s=0, dev_tasks=200,
        subset_tasks=20, heldout_tasks=200, budget_rounds=len(DEMO_SCRIPT),
    )  # fmt: skip
    registry = ScaffoldRegistry(tmp_path / "scaffolds")
    spec, service = build(config, SimulatedEvaluator(registry, demo_effect, seed=4), ScriptedProposer(DEMO_SCRIPT))
    c = service.controller
    metrics = {"loss": [(s, 1.0 - 0.01 * s) for s in range(30)], "entropy": [(s, 2.0 * 0.9**s) for s in range(30)]}
    metrics["loss"][21] = (21, math.nan)
    c.report_anomalies("run-demo", diagnose(metrics))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serve_in_process(spec, config), httpx.AsyncClient(base_url=service.http.url, headers=auth) as http:
        await http.post("/api/v1/control", json={"operator": "alice", "action": "start"})

        async def waiting() -> list[str]:
            return (await http.get("/api/v1/status")).json()["awaiting_approval"]  # type: ignore[no-any-return]

        first = (await until(waiting, "round 1 awaits approval"))[0]
        await http.post(f"/api/v1/iterations/{first}/approve", json={"operator": "alice", "note": "clear win"})

        async def last_round_waiting() -> list[str]:
            return [i for i in await waiting() if c.iteration(i).index == len(DEMO_SCRIPT)]

        last = (await until(last_round_waiting, f"round {len(DEMO_SCRIPT)} awaits approval"))[0]
        assert c.iteration(first).state.value == "promoted"

        shutil.rmtree(ARTEFACTS, ignore_errors=True)
        node = await asyncio.create_subprocess_exec(
            "node", str(ROOT / "tests" / "browser" / "console_pages.mjs"), service.http.url + "/", TOKEN, last,
            first, str(ARTEFACTS), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(node.communicate(), 180)
        report = out.decode().strip().splitlines()
        assert report, f"the browser script printed nothing; stderr: {err.decode()[-2000:]}"
        failed = [r for r in json.loads(report[-1]) if not r["ok"]]
        assert node.returncode == 0 and not failed, (failed, err.decode()[-2000:])

        it = c.iteration(last)
        assert (it.state.value, it.approved_by) == ("promoted", "browser-operator")
        assert it.note == "approved from the console"
        assert c.incumbent == it.candidate
    shots = {p.name: p.stat().st_size for p in ARTEFACTS.glob("*.png")}
    expected = {"overview", "iterations", "lineage", "compare", "anomalies", "audit", "budget", "memory"}
    assert {f"{name}.png" for name in expected | {"candidate-awaiting", "candidate-approved"}} <= set(shots)
    assert min(shots.values()) > 10_000  # a rendered page, not a blank one
