"""Tool implementations and the per-episode tool box that runs the agent's tool calls.

Every tool that touches files or runs code does so inside the episode's sandbox, as the sandbox's user;
only the calculator (a pure function on a parsed expression) runs in the rollout process. A tool call
never raises for what the agent did wrong: it returns a result with `is_error` set (unknown tool,
arguments that are not a JSON object, missing arguments, a failing command), which the process reward
counts. `SandboxInfraError` does propagate: the episode is then retried elsewhere.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgerl.rollout.sandbox.base import ExecResult, Sandbox

MAX_OUTPUT_CHARS = 8000


@dataclass
class ToolOutcome:
    content: str
    is_error: bool = False
    malformed: bool = False  # the call itself was unusable (unknown tool, arguments not a JSON object)
    duration_s: float = 0.0
    violations: tuple[str, ...] = ()


@dataclass
class ToolStats:
    calls: int = 0
    errors: int = 0
    malformed: int = 0
    violations: list[str] = field(default_factory=list)


class ToolError(Exception):
    """The agent's call failed (reported to the agent as an error result)."""


# -- calculator -------------------------------------------------------------------------------------------

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_LIMIT = 10**30


def evaluate_arithmetic(expression: str) -> int | float:
    """Numbers, + - * / // % **, parentheses. Bounded: no huge powers, no names, no calls."""
    if len(expression) > 500:
        raise ToolError("expression too long (500 characters at most)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            constant: int | float = node.value  # type: ignore[assignment]
            return constant
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            unary: int | float = _UNARY[type(node.op)](ev(node.operand))
            return unary
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ToolError("power too large")
            try:
                value = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            if isinstance(value, complex) or abs(value) > _LIMIT:
                raise ToolError("result out of range")
            result: int | float = value
            return result
        raise ToolError(f"unsupported in an arithmetic expression: {ast.dump(node)[:60]}")

    return ev(tree)


def format_number(value: int | float) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return f"{value:.6g}"
    return str(value)


# -- sandbox-backed tools ---------------------------------------------------------------------------------

_STR_REPLACE = (
    "import json,sys\n"
    "a=json.load(sys.stdin)\n"
    "try: s=open(a['path']).read()\n"
    "except OSError as e: sys.exit(f'cannot read {a[\"path\"]}: {e.strerror}')\n"
    "n=s.count(a['old'])\n"
    "if n!=1: sys.exit(f'old text occurs {n} times in {a[\"path\"]}; it must occur exactly once')\n"
    "open(a['path'],'w').write(s.replace(a['old'],a['new']))\n"
    "print(f'replaced 1 occurrence in {a[\"path\"]}')\n"
)


def clip(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"


def _command_output(result: ExecResult) -> str:
    out = result.stdout
    if result.stderr:
        out = f"{out}\n{result.stderr}" if out else result.stderr
    if not result.ok or result.violations:
        out = f"{out}\n[{result.describe()}]" if out else f"[{result.describe()}]"
    return out


@dataclass
class ToolContext:
    sandbox: Sandbox | None
    timeout_s: float


ToolFn = Callable[[Mapping[str, Any], ToolContext], Awaitable[ToolOutcome]]


def _need_sandbox(ctx: ToolContext) -> Sandbox:
    if ctx.sandbox is None:
        raise ToolError("this tool needs a sandbox and the episode has none")
    return ctx.sandbox


def _arg(args: Mapping[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise ToolError(f"argument {name!r} must be a string")
    return value


async def calculator(args: Mapping[str, Any], ctx: ToolContext) -> ToolOutcome:
    return ToolOutcome(format_number(evaluate_arithmetic(_arg(args, "expression"))))


async def python(args: Mapping[str, Any], ctx: ToolContext) -> ToolOutcome:
    result = await _need_sandbox(ctx).exec(["python3", "-c", _arg(args, "code")], timeout_s=ctx.timeout_s)
    if result.ok and not result.stderr and not result.violations:
        return ToolOutcome(clip(result.stdout.rstrip("\n")))
    return ToolOutcome(clip(_command_output(result)), is_error=not result.ok, violations=result.violations)


async def bash(args: Mapping[str, Any], ctx: ToolContext) -> ToolOutcome:
    result = await _need_sandbox(ctx).exec(["bash", "-c", _arg(args, "command")], timeout_s=ctx.timeout_s)
    text = _command_output(result)
    if result.ok and not result.violations:
        text = f"{text}\n[exit code 0]" if text else "[exit code 0]"
    # A failing command (e.g. failing tests) is information, not a tool error; a limit hit is.
    return ToolOutcome(clip(text), is_error=bool(result.violations), violations=result.violations)


async def read_file(args: Mapping[str, Any], ctx: ToolContext) -> ToolOutcome:
    result = await _need_sandbox(ctx).exec(["cat", "--", _arg(args, "path")], timeout_s=ctx.timeout_s)
    if not result.ok:
        return ToolOutcome(clip(_command_output(result)), is_error=True, violations=result.violations)
    return ToolOutcome(clip(result.stdout))


async def write_file(args: Mapping[str, Any], ctx: ToolContext) -> ToolOutcome:
    path, content = _arg(args, "path"), _arg(args, "content")
    result = await _need_sandbox(ctx).write_files({path: content}, timeout_s=ctx.timeout_s)
    if not result.ok:
        return ToolOutcome(clip(_command_output(result)), is_error=True, violations=result.violations)
    return ToolOutcome(f"wrote {len(content.encode())} bytes to {path}")


async def str_replace(args: Mapping[str, Any], ctx: ToolContext) -> ToolOutcome:
    payload = {"path": _arg(args, "path"), "old": _arg(args, "old"), "new": _arg(args, "new")}
    result = await _need_sandbox(ctx).exec(
        ["python3", "-I", "-c", _STR_REPLACE], stdin=json.dumps(payload).encode(), timeout_s=ctx.timeout_s
    )
    if not result.ok:
        return ToolOutcome(clip(_command_output(result)), is_error=True, violations=result.violations)
    return ToolOutcome(result.stdout.strip())


TOOLS: dict[str, ToolFn] = {
    "calculator": calculator,
    "python": python,
    "bash": bash,
    "read_file": read_file,
    "write_file": write_file,
    "str_replace": str_replace,
}


def parse_arguments(arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A tool call's arguments as a dict; raises ToolError when they are not a JSON object."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ToolError(f"arguments are not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ToolError("arguments must be a JSON object")
    return value


class ToolBox:
    """The tools one episode offers, bound to its sandbox; counts calls, errors and malformed calls."""

    def __init__(self, names: Sequence[str], sandbox: Sandbox | None, *, timeout_s: float = 30.0) -> None:
        unknown = [n for n in names if n not in TOOLS]
        if unknown:
            raise ValueError(f"no implementation for tools {unknown}; known: {sorted(TOOLS)}")
        self.names = tuple(names)
        self.ctx = ToolContext(sandbox=sandbox, timeout_s=timeout_s)
        self.stats = ToolStats()

    async def call(self, name: str, arguments: str | Mapping[str, Any] | None) -> ToolOutcome:
        from forgerl.rollout.sandbox.base import SandboxInfraError

        start = time.monotonic()
        self.stats.calls += 1
        if name not in self.names:
            outcome = ToolOutcome(
                f"error: unknown tool {name!r}; available: {', '.join(self.names)}", is_error=True, malformed=True
            )
        else:
            try:
                args = parse_arguments(arguments)
            except ToolError as exc:
                outcome = ToolOutcome(f"error: {exc}", is_error=True, malformed=True)
            else:
                try:
                    outcome = await TOOLS[name](args, self.ctx)
                except ToolError as exc:
                    outcome = ToolOutcome(f"error: {exc}", is_error=True)
                except (SandboxInfraError, asyncio.CancelledError):
                    raise
        outcome.duration_s = time.monotonic() - start
        self.stats.errors += outcome.is_error
        self.stats.malformed += outcome.malformed
        self.stats.violations.extend(outcome.violations)
        return outcome
