"""One line per CLI error: what went wrong and what to do, never a traceback (`forgerl --debug` shows it)."""

from __future__ import annotations

import sys
from typing import Any

import grpc
import typer
from rich.console import Console
from rich.markup import escape

# What to do when a call answers with this status; the service's own message says what was wrong.
_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the topology up? start it with `forgerl up`, or pass `--local`",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service is busy or stuck: see `forgerl status` and its log",
    grpc.StatusCode.UNAUTHENTICATED: "set FORGERL_AUTH_TOKEN (or --token) to the topology's token",
}


def describe(err: BaseException) -> str:
    """`err` as one line for a person at a terminal."""
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        code, details = err.code(), (err.details() or "").strip()
        hint = _HINTS.get(code)
        return f"{details or code.name} ({code.name})" + (f"; {hint}" if hint else "")
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    return f"{type(err).__name__}: {err}"


class OneLineErrors(typer.Typer):
    """A Typer app whose uncaught errors print as one line with exit code 1, unless `debug` is on."""

    debug = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as err:  # usage errors and typer.Exit are handled by click before this
            if self.debug:
                raise
            line = " ".join(describe(err).split())  # one line, whatever newlines the message held
            Console(stderr=True, soft_wrap=True).print(
                f"[red]error:[/red] {escape(line)} (`forgerl --debug ...` shows the traceback)"
            )
            sys.exit(1)
