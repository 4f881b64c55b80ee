"""`forgerl run ...` mounted as a sub-app: its commands and their options."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from forgerl.cli.run import run_app

pytestmark = pytest.mark.unit


def test_run_commands() -> None:
    app = typer.Typer()
    app.add_typer(run_app, name="run")
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for command in ("start", "status", "stop", "report"):
        assert command in result.output
    start = runner.invoke(app, ["run", "start", "--help"])
    assert "--local" in start.output and "--resume" in start.output and "--topology" in start.output
