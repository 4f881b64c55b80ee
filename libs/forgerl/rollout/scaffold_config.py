"""Versioned scaffold configurations: everything about the agent that self-evolution may change.

System prompts, tool descriptions, the turn budget, tool-call parallelism, the context policy and the
sampling parameters are data, not code: a `ScaffoldConfig` with a `version`. Versions are immutable; a
new idea is a new version (with `parent` naming the one it came from), stored as a YAML file in the
registry's directory. Episodes name the version they ran with, so trajectories stay attributable.

`agent` picks the loop that drives the episode: `interleaved` (ours, through the gateway), `oracle` and
`noop` (scripted test agents that need no model: they replay the task's gold solution or do nothing),
and `mini-swe-agent` (a third-party OpenAI-client agent behind the same episode API).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

AgentKind = Literal["interleaved", "oracle", "noop", "mini-swe-agent"]


class ToolDescription(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class ContextPolicy(BaseModel):
    """How the message history is kept within the model's context."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Interleaved thinking keeps every earlier turn's reasoning in the prompt; False drops it (ablation).
    keep_reasoning: bool = True
    # A tool result longer than this is cut to its head and tail when it enters the history.
    max_tool_output_chars: int = Field(default=4000, ge=64)
    # When the history grows past this, the oldest tool results are replaced by a short note.
    max_context_chars: int = Field(default=60_000, ge=1000)
    # The most recent tool results are never elided.
    keep_recent_observations: int = Field(default=4, ge=0)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=1)  # per turn


class ScaffoldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    agent: AgentKind = "interleaved"
    parent: str | None = None
    notes: str = ""
    # System prompt by suite name; "*" is used for suites without their own.
    system_prompts: dict[str, str]
    tools: tuple[ToolDescription, ...]
    max_turns: int = Field(default=16, ge=1)  # turn budget: model calls per episode
    # Suites may need different budgets (a tool-use question takes 2 turns, a bug fix tens).
    max_turns_by_suite: dict[str, int] = Field(default_factory=dict)
    parallel_tool_calls: bool = True  # run a turn's tool calls concurrently (they are independent)
    max_parallel_tools: int = Field(default=4, ge=1)
    tool_timeout_s: float = Field(default=30.0, gt=0)
    context: ContextPolicy = ContextPolicy()
    sampling: Sampling = Sampling()

    def system_prompt(self, suite: str) -> str:
        prompt = self.system_prompts.get(suite, self.system_prompts.get("*"))
        if prompt is None:
            raise KeyError(f"scaffold {self.version}: no system prompt for suite {suite!r} and no '*' default")
        return prompt

    def turn_budget(self, suite: str) -> int:
        return self.max_turns_by_suite.get(suite, self.max_turns)

    def tool(self, name: str) -> ToolDescription:
        for t in self.tools:
            if t.name == name:
                return t
        raise KeyError(f"scaffold {self.version} describes no tool {name!r}")

    def tool_specs(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """OpenAI `tools` for the named tools, in the task's order."""
        return [self.tool(n).openai() for n in names]

    def digest(self) -> str:
        """Content hash: two configs with the same digest behave the same."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"notes"}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def derive(self, version: str, **changes: Any) -> ScaffoldConfig:
        """A new version from this one (what self-evolution does): `parent` is set to this version."""
        data = self.model_dump()
        data.update(changes)
        data["version"] = version
        data["parent"] = self.version
        return ScaffoldConfig.model_validate(data)


_OBJ = "object"

DEFAULT_TOOLS: tuple[ToolDescription, ...] = (
    ToolDescription(
        name="calculator",
        description="Evaluate an arithmetic expression.",
        parameters={
            "type": _OBJ,
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    ),
    ToolDescription(
        name="python",
        description="Run Python code and return what it prints.",
        parameters={"type": _OBJ, "properties": {"code": {"type": "string"}}, "required": ["code"]},
    ),
    ToolDescription(
        name="bash",
        description="Run a shell command in the repository and return its output and exit code.",
        parameters={"type": _OBJ, "properties": {"command": {"type": "string"}}, "required": ["command"]},
    ),
    ToolDescription(
        name="read_file",
        description="Return the contents of a file in the repository.",
        parameters={"type": _OBJ, "properties": {"path": {"type": "string"}}, "required": ["path"]},
    ),
    ToolDescription(
        name="write_file",
        description="Create or overwrite a file in the repository with the given content.",
        parameters={
            "type": _OBJ,
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    ),
    ToolDescription(
        name="str_replace",
        description="Replace the single occurrence of old with new in a file of the repository.",
        parameters={
            "type": _OBJ,
            "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
            "required": ["path", "old", "new"],
        },
    ),
)

DEFAULT_SYSTEM_PROMPTS = {
    "tooluse": "Solve the task with one tool call, then reply with only the answer.",
    "swe": (
        "You fix bugs in a small Python repository. Read the code and the failing tests, change the code "
        "(not the tests), run the tests with `python3 -m unittest` to check, and finish with a short "
        "summary when they pass."
    ),
    "*": "Solve the task. Think briefly, call tools when they help, and finish with your answer.",
}

DEFAULT = ScaffoldConfig(
    version="default",
    notes="Interleaved thinking: think, call tools (in parallel when independent), observe, repeat.",
    system_prompts=DEFAULT_SYSTEM_PROMPTS,
    tools=DEFAULT_TOOLS,
    max_turns=16,
    max_turns_by_suite={"tooluse": 4, "swe": 30},
    sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=256),
)
ORACLE = DEFAULT.derive("oracle", agent="oracle", notes="Scripted test agent: replays the gold solution.")
NOOP = DEFAULT.derive("noop", agent="noop", notes="Scripted test agent: does nothing and answers nothing.")
MINI_SWE_AGENT = DEFAULT.derive(
    "mini-swe-agent",
    agent="mini-swe-agent",
    notes="Third-party: mini-swe-agent's own prompts and bash tool; turn budget and sampling from here.",
)
BUILTIN: dict[str, ScaffoldConfig] = {c.version: c for c in (DEFAULT, ORACLE, NOOP, MINI_SWE_AGENT)}


class ScaffoldRegistry:
    """Built-in versions plus `<version>.yaml` files in `directory` (where self-evolution writes)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._cache: dict[str, ScaffoldConfig] = dict(BUILTIN)

    def get(self, version: str) -> ScaffoldConfig:
        version = version or "default"
        if version in self._cache:
            return self._cache[version]
        if self.directory is not None:
            path = self.directory / f"{version}.yaml"
            if path.is_file():
                config = ScaffoldConfig.model_validate(yaml.safe_load(path.read_text()))
                if config.version != version:
                    raise ValueError(f"{path} declares version {config.version!r}, not {version!r}")
                self._cache[version] = config
                return config
        raise KeyError(f"unknown scaffold version {version!r}; known: {', '.join(self.versions())}")

    def put(self, config: ScaffoldConfig) -> Path | None:
        """Store a new version; a version is immutable, so different content under a known name is refused."""
        try:
            existing = self.get(config.version)
        except KeyError:
            existing = None
        if existing is not None:
            if existing.digest() != config.digest():
                raise ValueError(f"scaffold version {config.version!r} exists with different content")
            return None
        self._cache[config.version] = config
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{config.version}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return path

    def versions(self) -> list[str]:
        names = set(self._cache)
        if self.directory is not None and self.directory.is_dir():
            names.update(p.stem for p in self.directory.glob("*.yaml"))
        return sorted(names)
