"""`forgerl run start|status|stop|report`: the gRPC client of the trainer service.

forgerl run start examples/tiny-tool-use.yaml --local   # the main job (`make run`): topology up, run,
                                                        # live progress, report, topology down
forgerl run start examples/tiny-tool-use.yaml           # against a trainer already running
forgerl run status <run-id>
forgerl run stop <run-id>
forgerl run report <run-id>                             # PNGs + summary under runs/<run-id>/report/
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

run_app = typer.Typer(
    help="Training runs: start, follow, stop, report.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console()

AddressOption = Annotated[
    str | None, typer.Option("--address", help="Trainer address; default: the local topology's trainer.")
]
RunsDirOption = Annotated[Path, typer.Option("--runs-dir", help="Where run directories live.")]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="FORGERL_AUTH_TOKEN", help="Bearer token.")]
TopologyOption = Annotated[
    Path | None, typer.Option("--topology", help="Local topology YAML (ports, state dir), as `forgerl up --config`.")
]


def _address(address: str | None, topology: Path | None = None) -> str:
    if address:
        return address
    from forgerl.local.topology import LocalTopology

    return LocalTopology.load(topology).address("trainer")


def _stub(
    address: str | None, token: str | None = None, topology: Path | None = None
) -> trainer_pb2_grpc.TrainerServiceStub:
    from forgerl.runtime.client import insecure_channel

    return trainer_pb2_grpc.TrainerServiceStub(insecure_channel(_address(address, topology), token))


# States in which no trainer trains the run (an interrupted one waits for `start --resume`).
_ENDED = (
    run_pb2.RUN_STATE_SUCCEEDED,
    run_pb2.RUN_STATE_FAILED,
    run_pb2.RUN_STATE_STOPPED,
    run_pb2.RUN_STATE_INTERRUPTED,
)


def _state(run: run_pb2.Run) -> str:
    return run_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower()


class _Progress:
    """The live view: stage, step, reward, held-out success, loss, step time, policy version."""

    def __init__(self, run: run_pb2.Run) -> None:
        self.run = run
        self.last: dict[str, float] = {}
        self.stage, self.step = run.stage or "sft", run.step
        self.sft_heldout: float | None = None
        self.heldout: float | None = None
        self.started = time.monotonic()

    def update(self, m: run_pb2.StepMetrics) -> None:
        self.stage, self.step = m.stage, m.step
        self.last.update(m.values)
        if "eval/heldout_success" in m.values:
            if m.stage == "sft":
                self.sft_heldout = m.values["eval/heldout_success"]
            self.heldout = m.values["eval/heldout_success"]

    def render(self) -> Table:
        cfg = self.run.config
        total = cfg.sft.steps + cfg.rl.steps
        rl_step = max(0, self.step - cfg.sft.steps)
        stage = f"SFT {self.step}/{cfg.sft.steps}" if self.stage == "sft" else f"RL {rl_step}/{cfg.rl.steps}"
        table = Table(title=f"run {self.run.run_id}  ({time.monotonic() - self.started:.0f} s)", show_header=False)
        table.add_column("", style="bold")
        table.add_column("")
        bar = int(30 * min(1.0, self.step / max(1, total)))
        table.add_row("stage", f"{stage}  [{'#' * bar}{'.' * (30 - bar)}]")
        if self.stage == "sft":
            table.add_row("SFT loss", _f(self.last.get("sft/loss")))
        else:
            table.add_row("reward (batch)", _f(self.last.get("reward/mean")))
            table.add_row("success (batch)", _f(self.last.get("success_rate")))
            table.add_row("entropy / clip", f"{_f(self.last.get('entropy'))} / {_f(self.last.get('clip_frac'))}")
            table.add_row("staleness (max)", _f(self.last.get("staleness/max")))
            table.add_row("tokens merged", _f(self.last.get("tokens/merged")))
        table.add_row("held-out success", f"SFT {_f(self.sft_heldout)}  ->  now {_f(self.heldout)}")
        table.add_row("policy version", _f(self.last.get("policy_version")))
        table.add_row("step time", f"{_f(self.last.get('step_total_s', self.last.get('step_time_s')))} s")
        return table


def _f(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def follow(stub: trainer_pb2_grpc.TrainerServiceStub, run_id: str) -> run_pb2.Run:
    """Show live progress until the run ends; returns the final Run. Reconnects while the trainer
    restarts (a killed trainer resumes the run)."""
    run = stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30).run
    view = _Progress(run)
    from_step = 0
    with Live(view.render(), console=console, refresh_per_second=2) as live:
        while True:
            try:
                for resp in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run_id, from_step=from_step)):
                    view.update(resp.metrics)
                    from_step = max(from_step, resp.metrics.step)
                    live.update(view.render())
                run = stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30).run
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                time.sleep(2)  # the trainer is (re)starting
                continue
            view.run = run
            if run.state in _ENDED:
                live.update(view.render())
                return run
            time.sleep(1)


def report(
    stub: trainer_pb2_grpc.TrainerServiceStub, run_id: str, runs_dir: Path, timeout_s: float = 30.0
) -> dict[str, Any]:
    from forgerl.trainer.report import summary_rows, write_report

    run = stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30).run
    metrics = []
    try:
        for resp in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run_id), timeout=timeout_s):
            metrics.append(resp.metrics)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # a live run streams on: take what came
            raise
    out = runs_dir / run_id / "report"
    summary = write_report(run, metrics, out)
    table = Table(title=f"run {run_id}: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    console.print(table)
    console.print(f"report: {out} ({', '.join(summary['plots'])}, summary.json, summary.md)")
    return summary


@run_app.command()
def start(
    config: Annotated[Path, typer.Argument(help="Run config YAML (e.g. examples/tiny-tool-use.yaml).")],
    address: AddressOption = None,
    local: Annotated[
        bool, typer.Option("--local", help="Bring the local topology up first and down at the end.")
    ] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Return once the run started.")] = False,
    resume: Annotated[str | None, typer.Option("--resume", help="Resume this run id instead.")] = None,
    runs_dir: RunsDirOption = Path("runs"),
    token: TokenOption = None,
    topology: TopologyOption = None,
) -> None:
    """Start a run (SFT then RL as the YAML says), follow it live, then write its report."""
    from forgerl.local.topology import LocalTopology
    from forgerl.trainer.run_config import load_run_config

    run_config = load_run_config(config)
    supervisor = None
    run_id = resume or ""
    if local:  # SIGTERM stops the run as Ctrl-C does: topology down, state saved, no process left
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if local:
            preset = run_config.model_preset or "debug"
            supervisor = _bring_up(topology, preset)
            if not run_config.init_checkpoint:  # the checkpoint (and tokenizer) inference starts from
                initial = LocalTopology.load(topology, model_preset=preset).initial_model_path
                run_config.init_checkpoint = str(initial.resolve())
        stub = _stub(address, token, topology)
        request = trainer_pb2.StartRunRequest(config=run_config, resume_run_id=resume or "")
        run = stub.StartRun(request, timeout=60).run
        run_id = run.run_id
        console.print(f"run [bold]{run.run_id}[/bold] {'resumed' if resume else 'started'} ({run.config.name})")
        _show_interrupted(stub, run.run_id, _resume_command(config, local, topology))
        if detach:
            return
        run = follow(stub, run.run_id)
        console.print(f"run {run.run_id}: {_state(run)}" + (f" ({run.error})" if run.error else ""))
        report(stub, run.run_id, runs_dir)
        if run.state != run_pb2.RUN_STATE_SUCCEEDED:
            raise typer.Exit(1)
    except KeyboardInterrupt:
        _on_interrupt(run_id, _resume_command(config, local, topology), supervisor)
        raise typer.Exit(130) from None
    finally:
        if supervisor is not None:
            with _ignoring_interrupts():
                supervisor.stop_all()
            console.print("local topology stopped")


def _resume_command(config: Path, local: bool, topology: Path | None) -> str:
    options = (" --local" if local else "") + (f" --topology {topology}" if topology else "")
    return f"forgerl run start {config}{options} --resume"


def _show_interrupted(stub: trainer_pb2_grpc.TrainerServiceStub, current: str, resume: str) -> None:
    """Name the runs an earlier Ctrl-C (or shutdown) interrupted, and how to continue each."""
    try:
        runs = stub.ListRuns(trainer_pb2.ListRunsRequest(states=[run_pb2.RUN_STATE_INTERRUPTED], limit=3), timeout=10)
    except grpc.RpcError:  # a trainer without ListRuns: nothing to show
        return
    for run in runs.runs:
        if run.run_id != current:
            console.print(f"[yellow]run {run.run_id} was interrupted at {run.stage} step {run.step}; "
                          f"continue it with: {resume} {run.run_id}[/yellow]")  # fmt: skip


def _on_interrupt(run_id: str, resume: str, supervisor: Any) -> None:
    if supervisor is None:
        following = f"; run {run_id} goes on: `forgerl run status {run_id}`, `forgerl run stop {run_id}`"
        console.print("interrupted" + (following if run_id else ""))
        return
    console.print("interrupted: stopping the local topology (the trainer saves the run's state)")
    if run_id:
        console.print(f"continue the run with: {resume} {run_id}")


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """A second Ctrl-C (or SIGTERM) while the topology stops must not leave processes behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _bring_up(path: Path | None, preset: str) -> Any:
    """The local topology, serving a fresh checkpoint of the run's model preset first."""
    from forgerl.local.bootstrap import ensure_initial_checkpoint
    from forgerl.local.supervisor import Supervisor
    from forgerl.local.topology import LocalTopology

    topology = LocalTopology.load(path, model_preset=preset)
    if Supervisor.attach(topology).processes:
        console.print("[yellow]using the local topology that already runs[/yellow]")
        return None
    if topology.model_path is None:
        with console.status(f"creating the initial {topology.model_preset} checkpoint"):
            ensure_initial_checkpoint(topology.initial_model_path, topology.model_preset)
    supervisor = Supervisor(topology)
    with console.status("starting the local topology (broker, inference, datapool, gateway, rollout, trainer)"):
        supervisor.start_all(lambda name, what: None)
    console.print("local topology SERVING")
    supervisor.watch(lambda name, what: console.print(f"[yellow]{name}: {what}[/yellow]"))
    return supervisor


@run_app.command()
def status(
    run_id: str, address: AddressOption = None, token: TokenOption = None, topology: TopologyOption = None
) -> None:
    """State, stage, step and policy version of a run."""
    run = _stub(address, token, topology).GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30).run
    table = Table(title=f"run {run_id}")
    table.add_column("field")
    table.add_column("value")
    for key, value in (("state", _state(run)), ("stage", run.stage), ("step", str(run.step)),
                       ("policy version", str(run.policy_version)), ("error", run.error or "-")):  # fmt: skip
        table.add_row(key, value)
    console.print(table)


@run_app.command()
def stop(
    run_id: str, address: AddressOption = None, token: TokenOption = None, topology: TopologyOption = None
) -> None:
    """Stop a run after its current step (its state is saved; `start --resume` continues it)."""
    run = _stub(address, token, topology).StopRun(trainer_pb2.StopRunRequest(run_id=run_id), timeout=180).run
    console.print(f"run {run_id}: {_state(run)} at step {run.step}")


@run_app.command(name="report")
def report_command(
    run_id: str,
    address: AddressOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    token: TokenOption = None,
    topology: TopologyOption = None,
) -> None:
    """Write the PNG plots and the summary of a run under <runs-dir>/<run-id>/report/."""
    report(_stub(address, token, topology), run_id, runs_dir)
