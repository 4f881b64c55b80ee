"""A built-in corpus for training the tokenizer offline: arithmetic, tool calls, Python code.

Two parts, neither downloaded: documents generated from templates (seeded, so deterministic) in the task
domains of the local demo, and the source of a fixed list of pure-Python standard-library modules for
real code and English docstrings. The templates alone only reach ~900 BPE tokens; with ~1.9 MB of
library source a byte-level BPE reaches 4096 (and 8192) tokens.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from collections.abc import Iterator

_STDLIB_MODULES = (
    "json.decoder", "json.encoder", "pathlib", "textwrap", "argparse", "dataclasses", "functools",
    "collections", "statistics", "fractions", "decimal", "string", "shlex", "csv", "unittest.case", "difflib",
    "heapq", "bisect", "calendar", "tokenize", "ast", "inspect", "subprocess", "tempfile", "shutil",
    "logging", "typing", "enum", "random", "glob", "fnmatch", "configparser", "pprint", "copy", "operator",
    "datetime", "zipfile", "tarfile", "email.message", "http.client", "urllib.parse",
)  # fmt: skip

_OPS = (("+", "plus", lambda a, b: a + b), ("-", "minus", lambda a, b: a - b), ("*", "times", lambda a, b: a * b))
_TOOLS = (
    ("calculator", {"expression": "{a} {op} {b}"}),
    ("python", {"code": "print({a} {op} {b})"}),
    ("read_file", {"path": "src/{name}.py"}),
    ("write_file", {"path": "tests/test_{name}.py", "content": "def test_{name}():\n    assert {name}() == {a}\n"}),
    ("run_tests", {"path": "tests/test_{name}.py", "verbose": True}),
    ("bash", {"command": "ls -la src && grep -rn {name} src"}),
    ("search", {"query": "how to {verb} a {noun} in python"}),
)
_NAMES = (
    "parse_config", "load_data", "compute_total", "merge_lists", "count_words", "find_max", "read_lines",
    "normalize", "tokenize", "evaluate", "apply_patch", "run_step", "update_state", "format_result",
)  # fmt: skip
_VERBS = ("sort", "reverse", "filter", "group", "sum", "parse", "validate", "split", "merge", "count")
_NOUNS = ("list", "string", "dictionary", "file", "number", "matrix", "table", "tree", "queue", "record")
_REASONING = (
    "First, I need to understand what the question asks.",
    "Let me break the problem into smaller steps.",
    "I should check the result with a tool before answering.",
    "The test failed, so the function must have a bug in the loop.",
    "The file does not exist yet, so I will create it.",
    "This looks correct, but let me verify the edge cases.",
    "The user wants the final answer as a single number.",
    "I will read the source file to see how the function is defined.",
)
_CODE = (
    '''def {name}(values):
    """Return the {noun} after we {verb} it."""
    result = []
    for value in values:
        if value is None:
            continue
        result.append(value)
    return result
''',
    """class {cls}:
    def __init__(self, size: int = {a}) -> None:
        self.size = size
        self.items: list[int] = []

    def push(self, item: int) -> None:
        if len(self.items) >= self.size:
            raise ValueError("full")
        self.items.append(item)
""",
    """import json
from pathlib import Path


def {name}(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {{key: value for key, value in data.items() if value}}
""",
    """def test_{name}():
    assert {name}([{a}, {b}]) == [{a}, {b}]
    assert {name}([]) == []
""",
    """def gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


print(gcd({a}, {b}))
""",
    """for i in range({a}):
    if i % {b} == 0:
        print(f"{{i}} is divisible by {b}")
    else:
        total += i
""",
)


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 99)
    symbol, word, fn = rng.choice(_OPS)
    c = fn(a, b)
    return rng.choice(
        (
            f"What is {a} {symbol} {b}? {a} {symbol} {b} = {c}. The answer is {c}.",
            f"Compute {a} {word} {b}. Step 1: write it as {a} {symbol} {b}. Step 2: the result is {c}.",
            f"If you have {a} apples and the count changes by {symbol}{b}, you get {c} apples.",
            f"Q: {a} {symbol} {b}\nA: {c}",
        )
    )


def _tool_call(rng: random.Random) -> str:
    tool, template = rng.choice(_TOOLS)
    fill = {
        "a": rng.randint(0, 999),
        "b": rng.randint(1, 99),
        "op": rng.choice(_OPS)[0],
        "name": rng.choice(_NAMES),
        "verb": rng.choice(_VERBS),
        "noun": rng.choice(_NOUNS),
    }
    arguments = {k: v.format(**fill) if isinstance(v, str) else v for k, v in template.items()}
    call = json.dumps({"name": tool, "arguments": arguments})
    response = json.dumps({"result": fill["a"], "status": rng.choice(("ok", "error", "passed", "failed"))})
    return f"{rng.choice(_REASONING)}\n{call}\n{response}\n"


def _code(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    return rng.choice(_CODE).format(
        name=name,
        cls="".join(part.title() for part in name.split("_")),
        noun=rng.choice(_NOUNS),
        verb=rng.choice(_VERBS),
        a=rng.randint(2, 99),
        b=rng.randint(2, 9),
    )


def task_documents(num_documents: int = 6000, seed: int = 0) -> Iterator[str]:
    """Documents mixing arithmetic, tool calls and code, a third each; deterministic for a given seed."""
    rng = random.Random(seed)
    makers = (_arithmetic, _tool_call, _code)
    for i in range(num_documents):
        yield "\n".join(makers[(i + j) % 3](rng) for j in range(3))


def stdlib_sources() -> Iterator[str]:
    """The source of _STDLIB_MODULES (about 1.9 MB on Python 3.11)."""
    for name in _STDLIB_MODULES:
        yield inspect.getsource(importlib.import_module(name))


def default_corpus() -> Iterator[str]:
    yield from task_documents()
    yield from stdlib_sources()
