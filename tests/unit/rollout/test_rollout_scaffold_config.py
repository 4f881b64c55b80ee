"""Scaffold configs are versioned data: registry, immutability, derivation, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forgerl.rollout.scaffold_config import DEFAULT, ScaffoldConfig, ScaffoldRegistry

pytestmark = pytest.mark.unit


def test_builtin_versions() -> None:
    registry = ScaffoldRegistry()
    assert {"default", "oracle", "noop"} <= set(registry.versions())
    assert registry.get("") is DEFAULT
    assert registry.get("oracle").agent == "oracle" and registry.get("oracle").parent == "default"
    with pytest.raises(KeyError, match="unknown scaffold version"):
        registry.get("v999")


def test_derive_put_and_load_from_directory(tmp_path: Path) -> None:
    registry = ScaffoldRegistry(tmp_path)
    evolved = DEFAULT.derive(
        "evo-1",
        system_prompts={**DEFAULT.system_prompts, "tooluse": "Use one tool. Answer with the number only."},
        max_turns_by_suite={"tooluse": 3},
        parallel_tool_calls=False,
    )
    assert evolved.parent == "default" and evolved.digest() != DEFAULT.digest()
    path = registry.put(evolved)
    assert path == tmp_path / "evo-1.yaml" and yaml.safe_load(path.read_text())["version"] == "evo-1"
    fresh = ScaffoldRegistry(tmp_path)  # another process reading the directory
    loaded = fresh.get("evo-1")
    assert loaded == evolved and loaded.turn_budget("tooluse") == 3 and loaded.turn_budget("swe") == 16
    assert registry.put(evolved) is None  # same content again: fine, nothing written
    with pytest.raises(ValueError, match="exists with different content"):
        registry.put(evolved.model_copy(update={"max_turns": 2}))


def test_version_file_must_declare_its_name(tmp_path: Path) -> None:
    (tmp_path / "x1.yaml").write_text(yaml.safe_dump(DEFAULT.derive("other").model_dump(mode="json")))
    with pytest.raises(ValueError, match="declares version"):
        ScaffoldRegistry(tmp_path).get("x1")


def test_config_is_strict_and_frozen() -> None:
    data = DEFAULT.model_dump()
    data["unknown_knob"] = 1
    with pytest.raises(ValueError):
        ScaffoldConfig.model_validate(data)
    with pytest.raises(ValueError):
        DEFAULT.derive("bad version!")
    with pytest.raises(ValueError):
        DEFAULT.max_turns = 3  # type: ignore[misc]


def test_tool_specs_and_prompts() -> None:
    specs = DEFAULT.tool_specs(["calculator", "python"])
    assert [s["function"]["name"] for s in specs] == ["calculator", "python"]
    assert specs[0]["function"]["parameters"]["required"] == ["expression"]
    assert DEFAULT.system_prompt("unknown-suite") == DEFAULT.system_prompts["*"]
    with pytest.raises(KeyError):
        DEFAULT.tool("teleport")
