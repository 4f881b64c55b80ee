"""`forgerl`: serve one service, or bring the local topology up, down, and ask its status."""

from __future__ import annotations

import importlib
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from forgerl.cli.errors import OneLineErrors
from forgerl.cli.evolve import evolve_app
from forgerl.cli.plan import plan_command
from forgerl.cli.run import run_app
from forgerl.cli.tasks import tasks_app
from forgerl.local.bootstrap import ensure_initial_checkpoint
from forgerl.local.supervisor import Supervisor, status
from forgerl.local.topology import BROKER, SERVICES, LocalTopology
from forgerl.runtime.config import ConfigError

app = OneLineErrors(
    help="ForgeRL: agentic RL for mixture-of-experts LLMs.", no_args_is_help=True, pretty_exceptions_enable=False
)
app.add_typer(run_app, name="run")
app.add_typer(evolve_app, name="evolve")
app.add_typer(tasks_app, name="tasks")
app.command(name="plan")(plan_command)
console = Console()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error, not just its line.")] = False,
) -> None:
    app.debug = debug


ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML file overriding the local topology.")]
StateOption = Annotated[Path | None, typer.Option("--state-dir", help="Where logs and the pid file live.")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context, service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}")]) -> None:
    """Run one service in the foreground (what a container runs); extra flags set its config (--port 50051)."""
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    module = importlib.import_module(f"forgerl.services.{service}.main")
    try:
        module.main(list(ctx.args))
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


@app.command()
def up(
    config: ConfigOption = None,
    state_dir: StateOption = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once everything is SERVING.")] = False,
) -> None:
    """Start the broker and every service on loopback, wait until all are SERVING."""
    topology = LocalTopology.load(config, state_dir=state_dir)
    if Supervisor.attach(topology).processes:
        console.print(f"[yellow]a local topology already runs ({topology.state_file}); `forgerl down` first[/yellow]")
        raise typer.Exit(1)
    if topology.model_path is None:
        with console.status(f"creating the initial {topology.model_preset} checkpoint"):
            ensure_initial_checkpoint(topology.initial_model_path, topology.model_preset)
    supervisor = Supervisor(topology)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the children too, like Ctrl-C
    started = time.monotonic()
    try:
        _start_with_progress(supervisor)
    except (RuntimeError, TimeoutError) as err:
        console.print(f"[red]start-up failed:[/red] {err}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted: stopped everything")
        raise typer.Exit(130) from None
    console.print(f"all SERVING in {time.monotonic() - started:.1f} s; logs in {topology.logs_dir}")
    _print_status(topology)
    if detach:
        return
    supervisor.watch(lambda name, what: console.print(f"[yellow]{name}: {what}[/yellow]"))
    _wait_for_interrupt(supervisor)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
    supervisor.stop_all()
    console.print("stopped")


def _start_with_progress(supervisor: Supervisor) -> None:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks = {name: progress.add_task(f"{name}: starting", total=1) for name in (BROKER, *SERVICES)}

        def on_event(name: str, what: str) -> None:
            progress.update(tasks[name], description=f"{name}: {what}", completed=1 if what == "serving" else 0)

        supervisor.start_all(on_event)


def _wait_for_interrupt(supervisor: Supervisor) -> None:
    try:  # entered before saying so, so that an immediate Ctrl-C is caught here too
        console.print("Ctrl-C (or `forgerl down` elsewhere) stops everything; a component that dies is restarted.")
        while supervisor.topology.state_file.exists():  # `forgerl down` elsewhere removes it
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


@app.command()
def down(config: ConfigOption = None, state_dir: StateOption = None) -> None:
    """Stop every process of the local topology (SIGTERM, then SIGKILL after the grace period)."""
    topology = LocalTopology.load(config, state_dir=state_dir)
    supervisor = Supervisor.attach(topology)
    if not supervisor.processes:
        console.print("nothing is running")
        return
    names = list(supervisor.processes)
    killed = supervisor.stop_all()
    console.print(f"stopped {', '.join(names)}" + (f" (killed after grace: {', '.join(killed)})" if killed else ""))


@app.command()
def restart(
    component: Annotated[str, typer.Argument(help=f"One of: {', '.join((BROKER, *SERVICES))}")],
    config: ConfigOption = None,
    state_dir: StateOption = None,
) -> None:
    """Stop one component of the running local topology (if it still runs) and start it again."""
    topology = LocalTopology.load(config, state_dir=state_dir)
    supervisor = Supervisor.attach(topology)
    if not supervisor.processes:
        console.print("the local topology is not running: `forgerl up` first")
        raise typer.Exit(1)
    try:
        supervisor.restart(component, on_event=lambda name, what: console.print(f"{name} {what}"))
    except (ValueError, RuntimeError, TimeoutError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None


@app.command(name="status")
def status_command(config: ConfigOption = None, state_dir: StateOption = None) -> None:
    """Health of the broker and each service."""
    topology = LocalTopology.load(config, state_dir=state_dir)
    if not _print_status(topology):
        raise typer.Exit(1)


def _print_status(topology: LocalTopology) -> bool:
    processes = Supervisor.attach(topology).processes
    table = Table(title="ForgeRL local topology")
    for column in ("component", "address", "pid", "ready after", "health"):
        table.add_column(column)
    healthy = True
    for name in (BROKER, *SERVICES):
        health = status(topology, name)
        healthy &= health == "SERVING"
        colour = "green" if health == "SERVING" else "red"
        process = processes.get(name)
        pid = str(process.pid) if process else "-"
        ready = f"{process.ready_s:.1f} s" if process and process.ready_s is not None else "-"
        table.add_row(name, topology.address(name), pid, ready, f"[{colour}]{health}[/{colour}]")
    console.print(table)
    return healthy


if __name__ == "__main__":
    app()
