"""`forgerl tasks import FILE.jsonl --repos DIR`: SWE-bench-format instances built and validated locally.

forgerl tasks import swe.jsonl --repos ./clones --specs specs.json --out tasks/swe.verdicts.jsonl
    [--sandbox-root /var/tmp/forgerl-sandboxes] [--env-root SANDBOX_ROOT/.envs]
    [--pip-option=--no-index --pip-option=--find-links=/wheels]
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

tasks_app = typer.Typer(help="Task sets: import SWE-bench-format instances, validated with their tests.")
console = Console()


@tasks_app.command(name="import")
def import_command(
    file: Annotated[Path, typer.Argument(help="SWE-bench / SWE-Gym instances, one JSON object a line.")],
    repos: Annotated[Path, typer.Option("--repos", help="Local clones: DIR/owner__name or DIR/owner/name.")],
    specs: Annotated[
        Path | None,
        typer.Option("--specs", help='Environments: {"owner/name": {"version": {"python", "requirements"}}}.'),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Verdicts JSONL; default: FILE with .verdicts.jsonl.")
    ] = None,
    sandbox_root: Annotated[Path, typer.Option("--sandbox-root")] = Path("/var/tmp/forgerl-sandboxes"),
    env_root: Annotated[
        Path | None, typer.Option("--env-root", help="Task environments' cache; default: SANDBOX_ROOT/.envs.")
    ] = None,
    pip_option: Annotated[list[str] | None, typer.Option("--pip-option", help="Passed to pip (repeat).")] = None,
) -> None:
    """Build every instance at its base commit, run its tests without and with the gold patch, and write a
    verdict line per instance (valid, or the reason it is not)."""
    from forgerl.rollout.sandbox.environments import EnvironmentBuilder
    from forgerl.rollout.sandbox.local import DEFAULT_PATH, LocalSandboxFactory
    from forgerl.tasks.swebench import import_instances, load_specs, write_verdicts

    # The rollout service's own cache and interpreter lookup (services/rollout/servicer.py): environments
    # built while importing are the ones its episodes then find ready.
    builder = EnvironmentBuilder(
        env_root or sandbox_root / ".envs", search_path=DEFAULT_PATH, pip_options=tuple(pip_option or ())
    )
    factory = LocalSandboxFactory(sandbox_root, environments=builder)
    verdicts = asyncio.run(import_instances(factory, file, repos, load_specs(specs)))
    target = out or file.with_suffix(".verdicts.jsonl")
    write_verdicts(verdicts, target)
    valid = sum(v.valid for v in verdicts)
    console.print(
        f"{valid} valid, {len(verdicts) - valid} invalid of {len(verdicts)} instance(s); verdicts in {target}"
    )
    for verdict in verdicts:
        if not verdict.valid:
            console.print(f"[red]invalid[/red] {verdict.instance_id}: {verdict.reason}")
