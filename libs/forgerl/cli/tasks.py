"""`forgerl tasks import FILE.jsonl --repos DIR`: SWE-bench-format instances built and validated locally.
`forgerl tasks mine REPO`: such instances mined from a clone's own history.

forgerl tasks import swe.jsonl --repos ./clones --specs specs.json --out tasks/swe.verdicts.jsonl
    [--sandbox-root /var/tmp/forgerl-sandboxes] [--env-root SANDBOX_ROOT/.envs]
    [--pip-option=--no-index --pip-option=--find-links=/wheels]
forgerl tasks mine ./clones/acme__calc --specs specs.json --version 1.0 [--out acme__calc.jsonl]
    [--max N] [--since REV] [--test-command "python3 -m pytest -rA ..."] (and the sandbox options above)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from forgerl.rollout.sandbox.local import LocalSandboxFactory

tasks_app = typer.Typer(help="Task sets: import SWE-bench-format instances or mine them from git, validated.")
console = Console()

SpecsOption = Annotated[
    Path | None, typer.Option("--specs", help='Environments: {"owner/name": {"version": {"python", "requirements"}}}.')
]
SandboxRootOption = Annotated[Path, typer.Option("--sandbox-root")]
EnvRootOption = Annotated[
    Path | None, typer.Option("--env-root", help="Task environments' cache; default: SANDBOX_ROOT/.envs.")
]
PipOption = Annotated[list[str] | None, typer.Option("--pip-option", help="Passed to pip (repeat).")]
DEFAULT_SANDBOX_ROOT = Path("/var/tmp/forgerl-sandboxes")


def progress(line: str) -> None:
    typer.echo(line, err=True)  # one line each, never wrapped: commit ids stay greppable


def _sandboxes(sandbox_root: Path, env_root: Path | None, pip_option: list[str] | None) -> LocalSandboxFactory:
    from forgerl.rollout.sandbox.environments import EnvironmentBuilder
    from forgerl.rollout.sandbox.local import DEFAULT_PATH, LocalSandboxFactory

    # The rollout service's own cache and interpreter lookup (services/rollout/servicer.py): environments
    # built while importing or mining are the ones its episodes then find ready.
    builder = EnvironmentBuilder(
        env_root or sandbox_root / ".envs", search_path=DEFAULT_PATH, pip_options=tuple(pip_option or ())
    )
    return LocalSandboxFactory(sandbox_root, environments=builder)


@tasks_app.command(name="import")
def import_command(
    file: Annotated[Path, typer.Argument(help="SWE-bench / SWE-Gym instances, one JSON object a line.")],
    repos: Annotated[Path, typer.Option("--repos", help="Local clones: DIR/owner__name or DIR/owner/name.")],
    specs: SpecsOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Verdicts JSONL; default: FILE with .verdicts.jsonl.")
    ] = None,
    sandbox_root: SandboxRootOption = DEFAULT_SANDBOX_ROOT,
    env_root: EnvRootOption = None,
    pip_option: PipOption = None,
) -> None:
    """Build every instance at its base commit, run its tests without and with the gold patch, and write a
    verdict line per instance (valid, or the reason it is not)."""
    from forgerl.tasks.swebench import import_instances, load_specs, write_verdicts

    factory = _sandboxes(sandbox_root, env_root, pip_option)
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


@tasks_app.command(name="mine")
def mine_command(
    repo: Annotated[Path, typer.Argument(help="A local clone; DIR/owner__name names it owner/name.")],
    specs: SpecsOption = None,
    version: Annotated[str, typer.Option("--version", help="The instances' version: their specs entry.")] = "0",
    name: Annotated[
        str | None, typer.Option("--name", help="owner/name; default: from REPO's folder (local/FOLDER).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="SWE-bench JSONL; default: ./owner__name.jsonl.")] = None,
    max_instances: Annotated[int | None, typer.Option("--max", min=1, help="Stop after N instances.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only commits after REV.")] = None,
    test_command: Annotated[
        str | None, typer.Option("--test-command", help="Prints pytest's -rA summary; default: pytest on the tree.")
    ] = None,
    sandbox_root: SandboxRootOption = DEFAULT_SANDBOX_ROOT,
    env_root: EnvRootOption = None,
    pip_option: PipOption = None,
) -> None:
    """Walk REPO's first-parent history (commits and PR merges) for changes to source and tests whose new
    tests fail before and pass after; write them as SWE-bench instances, validated as `tasks import` does."""
    from forgerl.tasks.mining import DEFAULT_TEST_COMMAND, Miner, commits, mine, repo_name, summary, write_instances
    from forgerl.tasks.swebench import ImportProblem, environment_for, load_specs

    repo_id = name or repo_name(repo)
    try:
        environment = environment_for(load_specs(specs), repo_id, version)
        history = commits(repo, since=since)
    except ImportProblem as problem:
        raise typer.BadParameter(str(problem)) from None
    miner = Miner(
        _sandboxes(sandbox_root, env_root, pip_option),
        repo,
        repo_id,
        version,
        environment,
        test_command or DEFAULT_TEST_COMMAND,
    )
    progress(f"mining {repo_id} ({repo}): {len(history)} commit(s), test command {miner.test_command!r}")
    outcomes = asyncio.run(mine(miner, history, max_instances=max_instances, progress=progress))
    target = out or Path(f"{repo_id.replace('/', '__')}.jsonl")
    kept = write_instances(outcomes, target)
    for line in summary(outcomes):
        progress(line)
    console.print(f"{kept} instance(s) in {target}")
