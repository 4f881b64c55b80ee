"""`forgerl evolve start|status|approve|rollback|pause|resume|halt`: the gRPC client of the evolution service.

forgerl evolve start                         # run rounds until the budget is spent (service config)
forgerl evolve status                        # state, budget ledger, the last iterations, the console URL
forgerl evolve approve <iteration> --operator alice [--reject] [--note "..."]
forgerl evolve rollback default@0 --operator alice
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table

from forgerl.v1 import evolution_pb2, evolution_pb2_grpc, run_pb2

evolve_app = typer.Typer(help="Self-evolution of the agent scaffold: start, status, approve, rollback.")
console = Console()

AddressOption = Annotated[
    str | None, typer.Option("--address", help="Evolution service address; default: the local topology's.")
]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="FORGERL_AUTH_TOKEN", help="Bearer token.")]
TopologyOption = Annotated[Path | None, typer.Option("--topology", help="Local topology YAML (ports, state dir).")]
OperatorOption = Annotated[str, typer.Option("--operator", envvar="USER", help="Who decides (the audit log names).")]


def _stub(address: str | None, token: str | None, topology: Path | None) -> evolution_pb2_grpc.EvolutionServiceStub:
    from forgerl.runtime.client import insecure_channel

    if not address:
        from forgerl.local.topology import LocalTopology

        address = LocalTopology.load(topology).address("evolution")
    return evolution_pb2_grpc.EvolutionServiceStub(insecure_channel(address, token))


def _call(fn: object, request: object) -> object:
    try:
        return fn(request, timeout=30)  # type: ignore[operator]
    except grpc.RpcError as err:
        console.print(f"[red]{err.code().name}[/red]: {err.details()}")
        raise typer.Exit(1) from None


def _print_status(status: evolution_pb2.EvolutionStatus) -> None:
    console.print(
        f"[bold]{status.state}[/bold] on {status.suite}, incumbent {status.incumbent}"
        + (f" ({status.halt_reason})" if status.halt_reason else "")
    )
    console.print(
        f"budget: rounds {status.rounds_spent}/{status.rounds_limit}, episodes {status.episodes_spent}/"
        f"{status.episodes_limit}, wall time {status.wall_time_spent_s:.0f}/{status.wall_time_limit_s:.0f} s"
    )
    if status.awaiting_approval:
        console.print(f"[yellow]awaiting approval:[/yellow] {', '.join(status.awaiting_approval)}")
    if status.open_anomalies:
        console.print(f"[yellow]open anomalies:[/yellow] {status.open_anomalies}")
    console.print(f"console: {status.console_url}")


@evolve_app.command()
def start(
    base: Annotated[str, typer.Option("--base", help="'scaffold_id@version' to improve on.")] = "",
    seeds: Annotated[int, typer.Option("--seeds", help="Episodes per task and version (>= 3); 0: service's.")] = 0,
    address: AddressOption = None,
    token: TokenOption = None,
    topology: TopologyOption = None,
) -> None:
    """Start the iteration loop (it runs until its budget is spent or an operator halts it)."""
    stub = _stub(address, token, topology)
    request = evolution_pb2.StartIterationRequest(base_scaffold=base, episodes_per_candidate=seeds)
    response = _call(stub.StartIteration, request)
    assert isinstance(response, evolution_pb2.StartIterationResponse)
    _print_status(response.status)


@evolve_app.command()
def status(
    limit: Annotated[int, typer.Option("--limit", help="Iterations to list.")] = 10,
    address: AddressOption = None,
    token: TokenOption = None,
    topology: TopologyOption = None,
) -> None:
    """The controller's state, budget, and the last iterations with their decision statistics."""
    stub = _stub(address, token, topology)
    response = _call(stub.GetEvolutionStatus, evolution_pb2.GetEvolutionStatusRequest())
    assert isinstance(response, evolution_pb2.GetEvolutionStatusResponse)
    _print_status(response.status)
    listed = _call(stub.ListIterations, evolution_pb2.ListIterationsRequest(limit=limit))
    assert isinstance(listed, evolution_pb2.ListIterationsResponse)
    table = Table("#", "iteration", "candidate", "state", "mean diff", "95% interval", "rationale")
    for it in listed.iterations:
        state = run_pb2.IterationState.Name(it.state)
        table.add_row(
            str(it.index),
            it.iteration_id,
            it.selected_scaffold or "-",
            state.removeprefix("ITERATION_STATE_").lower(),
            f"{it.mean_difference:+.3f}",
            f"[{it.ci_low:+.3f}, {it.ci_high:+.3f}]",
            it.rationale[:60],
        )
    console.print(table)


@evolve_app.command()
def approve(
    iteration: Annotated[str, typer.Argument(help="Iteration id (from `forgerl evolve status`).")],
    operator: OperatorOption = "",
    reject: Annotated[bool, typer.Option("--reject", help="Reject the candidate instead.")] = False,
    note: Annotated[str, typer.Option("--note", help="Why (kept in the audit log).")] = "",
    address: AddressOption = None,
    token: TokenOption = None,
    topology: TopologyOption = None,
) -> None:
    """Approve (or --reject) an iteration's candidate that waits for the operator."""
    stub = _stub(address, token, topology)
    request = evolution_pb2.ApproveCandidateRequest(
        iteration_id=iteration, approve=not reject, operator=operator, note=note
    )
    response = _call(stub.ApproveCandidate, request)
    assert isinstance(response, evolution_pb2.ApproveCandidateResponse)
    state = run_pb2.IterationState.Name(response.iteration.state).removeprefix("ITERATION_STATE_").lower()
    console.print(f"{iteration}: {state}")


@evolve_app.command()
def rollback(
    to: Annotated[str, typer.Argument(help="'scaffold_id@version' to make the incumbent again.")],
    operator: OperatorOption = "",
    address: AddressOption = None,
    token: TokenOption = None,
    topology: TopologyOption = None,
) -> None:
    """Make an earlier promoted version (or the root) the incumbent again."""
    scaffold_id, _, version = to.partition("@")
    stub = _stub(address, token, topology)
    request = evolution_pb2.RollbackRequest(scaffold_id=scaffold_id, to_version=int(version or 0), operator=operator)
    response = _call(stub.Rollback, request)
    assert isinstance(response, evolution_pb2.RollbackResponse)
    console.print(f"incumbent: {response.scaffold.scaffold_id}@{response.scaffold.version}")


def _control(
    action: evolution_pb2.EvolutionAction, operator: str, reason: str, address: str | None, token: str | None
) -> None:
    stub = _stub(address, token, None)
    request = evolution_pb2.ControlEvolutionRequest(action=action, operator=operator, reason=reason)
    response = _call(stub.ControlEvolution, request)
    assert isinstance(response, evolution_pb2.ControlEvolutionResponse)
    _print_status(response.status)


@evolve_app.command()
def pause(operator: OperatorOption = "", address: AddressOption = None, token: TokenOption = None) -> None:
    """Hold the loop before its next round."""
    _control(evolution_pb2.EVOLUTION_ACTION_PAUSE, operator, "", address, token)


@evolve_app.command()
def resume(operator: OperatorOption = "", address: AddressOption = None, token: TokenOption = None) -> None:
    """Let a paused loop go on."""
    _control(evolution_pb2.EVOLUTION_ACTION_RESUME, operator, "", address, token)


@evolve_app.command()
def halt(
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")] = "",
    operator: OperatorOption = "",
    address: AddressOption = None,
    token: TokenOption = None,
) -> None:
    """Stop the loop now (the round in progress is abandoned)."""
    _control(evolution_pb2.EVOLUTION_ACTION_HALT, operator, reason, address, token)
