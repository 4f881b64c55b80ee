"""The tool-use suite's tools evaluated in-process, on the AST without exec: `calculator` (integer
arithmetic) and `python` (only `print(expr)` with string literals, slicing and a few string methods).

What the trainer's in-process episodes run (forgerl.trainer.local_env) and how the suite's imperfect
teacher computes the outputs of its wrong calls; the real run's tools execute in sandboxes and print the
same text for every call these accept.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_STR_METHODS = {"upper", "lower", "count", "find", "replace", "strip", "title", "capitalize"}


def _eval(node: ast.AST, depth: int = 0) -> Any:
    if depth > 40:
        raise ValueError("expression too deep")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | str) and not isinstance(node.value, bool):
        if isinstance(node.value, int) and abs(node.value) > 10**12:
            raise ValueError("number too large")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, depth + 1)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Mult) and (isinstance(left, str) or isinstance(right, str)):
            raise ValueError("string repetition is not allowed")
        result = _BINOPS[type(node.op)](left, right)
        if isinstance(result, int) and abs(result) > 10**15:
            raise ValueError("result too large")
        return result
    if isinstance(node, ast.Subscript):
        value = _eval(node.value, depth + 1)
        sl = node.slice
        if isinstance(sl, ast.Slice):
            parts = [None if p is None else _eval(p, depth + 1) for p in (sl.lower, sl.upper, sl.step)]
            return value[slice(*parts)]
        return value[_eval(sl, depth + 1)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS:
        target = _eval(node.func.value, depth + 1)
        if not isinstance(target, str) or node.keywords:
            raise ValueError("only string methods on strings")
        return getattr(target, node.func.attr)(*[_eval(a, depth + 1) for a in node.args])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("len", "str", "int"):
        builtins: dict[str, Callable[..., Any]] = {"len": len, "str": str, "int": int}
        fn = builtins[node.func.id]
        return fn(*[_eval(a, depth + 1) for a in node.args])
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def run_tool(name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
    """(output, is_error) of one call of the suite's tools."""
    try:
        if name == "calculator":
            value = _eval(ast.parse(str(arguments["expression"]), mode="eval"))
            return str(value), False
        if name == "python":
            module = ast.parse(str(arguments["code"]))
            lines = []
            for stmt in module.body:
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"):
                    raise ValueError("only print(...) statements are supported")
                lines.append(" ".join(str(_eval(a)) for a in call.args))
            return "\n".join(lines), False
        return f"error: unknown tool {name!r}", True
    except Exception as err:  # the agent sees the error, as a sandboxed tool would report it
        return f"error: {type(err).__name__}: {err}", True
