"""Third-party OpenAI-client agents through the same episode API: mini-swe-agent.

mini-swe-agent runs as a subprocess under the Python of its own environment (`mini_swe_bridge.py`; its
litellm pins clash with forgerl's environment), talking to the gateway like any OpenAI client with the
episode key as its API key. Its shell commands come back to this process over a pipe and run in the
episode's sandbox through the tool box (so the sandbox needs no network to reach the model, and the
commands count for the process reward like our scaffold's tool calls). One `TurnRecord` per model call,
the commands of that call as its tool calls; rewards come from the task's tests as for every agent.

The Python with mini-swe-agent: $FORGERL_MINI_SWE_AGENT_PYTHON, else this interpreter if it can import
`minisweagent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from forgerl.rollout.scaffold import AgentResult, EpisodeContext, ModelUnavailableError, TurnRecord

log = logging.getLogger("forgerl.rollout")
BRIDGE = Path(__file__).with_name("mini_swe_bridge.py")
ENV_PYTHON = "FORGERL_MINI_SWE_AGENT_PYTHON"


# mini-swe-agent lives in its own virtual environment (its litellm pins clash with vLLM's openai and
# huggingface_hub): the package without the extras only its interactive and batch runners use.
MINI_SWE_AGENT = "mini-swe-agent==2.4.6"
MINI_SWE_AGENT_DEPS = [
    "litellm[mcp]==1.106.2",
    "python-dotenv",
    "platformdirs",
    "rich",
    "jinja2",
    "pydantic",
    "tenacity",
    "pyyaml",
    "requests",
    "typer",
]


def ensure_mini_swe_agent_env(venv: Path) -> Path:
    """The Python of a virtual environment with mini-swe-agent at `venv`, built from PyPI the first time
    (a few minutes); a marker file makes later calls instant and a half-built one is rebuilt."""
    import subprocess

    python = venv / "bin" / "python"
    ready = venv / ".forgerl-ready"
    if ready.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", MINI_SWE_AGENT], check=True)
    subprocess.run([*pip, *MINI_SWE_AGENT_DEPS], check=True)
    check_env = {
        **os.environ,
        "MSWEA_SILENT_STARTUP": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "MSWEA_GLOBAL_CONFIG_DIR": str(venv / "mswea-config"),
    }
    subprocess.run([str(python), "-c", "import minisweagent.models.litellm_model"], check=True, env=check_env)
    ready.write_text(MINI_SWE_AGENT + "\n")
    return python


class AgentUnavailableError(RuntimeError):
    """The third-party agent is not installed where rollout can run it."""


def mini_swe_agent_python() -> str:
    override = os.environ.get(ENV_PYTHON)
    if override:
        return override
    if importlib.util.find_spec("minisweagent") is not None:
        return sys.executable
    raise AgentUnavailableError(
        f"the mini-swe-agent scaffold needs mini-swe-agent: set {ENV_PYTHON} to the Python of an environment "
        "that has it (pip install mini-swe-agent)"
    )


def _exit_code(content: str) -> int:
    last = content.rstrip().rsplit("\n", 1)[-1]
    if last == "[exit code 0]":
        return 0
    return 1


def _strip_status(content: str) -> str:
    text = content.rstrip()
    if text.endswith("[exit code 0]"):
        text = text[: -len("[exit code 0]")].rstrip("\n")
    return text + ("\n" if text else "")


class MiniSweAgent:
    """mini-swe-agent's DefaultAgent + LitellmModel, with its environment bridged into our sandbox."""

    needs_model = True

    async def run(self, ctx: EpisodeContext) -> AgentResult:
        python = mini_swe_agent_python()
        req_read, req_write = os.pipe()
        rep_read, rep_write = os.pipe()
        spec = {
            "base_url": ctx.base_url,
            "api_key": ctx.api_key,
            "model": ctx.model,
            "task": ctx.task.instructions,
            "step_limit": ctx.scaffold.turn_budget(ctx.task.suite),
            "wall_time_limit_s": max(1, int(ctx.deadline - time.monotonic())),
            "temperature": ctx.scaffold.sampling.temperature,
            "max_tokens": ctx.scaffold.sampling.max_tokens,
            "command_timeout_s": ctx.scaffold.tool_timeout_s,
            "request_fd": req_write,
            "reply_fd": rep_read,
        }
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["NO_PROXY"] = "127.0.0.1,localhost"
        env.setdefault("MSWEA_GLOBAL_CONFIG_DIR", str(Path.home() / ".config" / "forgerl-mini-swe-agent"))
        try:
            proc = await asyncio.create_subprocess_exec(
                python,
                str(BRIDGE),
                json.dumps(spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(req_write, rep_read),
                env=env,
            )
        finally:
            os.close(req_write)
            os.close(rep_read)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(req_read, "rb", buffering=0)
        )
        replies = os.fdopen(rep_write, "wb", buffering=0)
        assert proc.stderr is not None
        stderr_task = asyncio.create_task(proc.stderr.read())
        done: dict[str, Any] | None = None
        current: TurnRecord | None = None
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                message = json.loads(line)
                log.debug("mini-swe-agent bridge: %s", list(message))
                if "model_call" in message:
                    current = TurnRecord(index=len(ctx.turns), format_errors=int(bool(message.get("format_error"))))
                    ctx.turns.append(current)
                elif "exec" in message:
                    if current is None:
                        current = TurnRecord(index=len(ctx.turns))
                        ctx.turns.append(current)
                    outcome = await ctx.tools.call("bash", {"command": message["exec"]})
                    current.tool_calls.append(
                        {"id": "", "name": "bash", "arguments": json.dumps({"command": message["exec"]})}
                    )
                    current.tool_results.append(outcome)
                    reply = {"output": _strip_status(outcome.content), "returncode": _exit_code(outcome.content)}
                    await asyncio.to_thread(replies.write, (json.dumps(reply) + "\n").encode())
                elif "done" in message:
                    done = message["done"]
            await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            transport.close()
            replies.close()
        stderr = (await stderr_task).decode(errors="replace")
        if done is None:
            return AgentResult(
                "", ctx.turns, "model_error", detail=f"mini-swe-agent exited {proc.returncode}: {stderr[-500:]}"
            )
        status = str(done.get("exit_status", ""))
        if "Connection" in status or "ServiceUnavailable" in status or "InternalServerError" in status:
            raise ModelUnavailableError(f"mini-swe-agent could not reach the model: {done.get('error', status)}")
        if status == "Submitted":
            stopped = "answer"
        elif status == "LimitsExceeded":
            stopped = "turn_budget"
        elif status == "TimeExceeded":
            stopped = "time_budget"
        else:
            stopped = "model_error"
        return AgentResult(str(done.get("submission", "")), ctx.turns, stopped, detail=status)
