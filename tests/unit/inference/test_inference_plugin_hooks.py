"""forgerl.vllm_plugin: register() is cheap and lazy; post-import hooks run once the module is imported."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

import forgerl.vllm_plugin as plugin
from forgerl.vllm_plugin import hooks
from forgerl.vllm_plugin.fixes import FIXES, padded_head_size

pytestmark = pytest.mark.unit


def test_hook_runs_after_import_and_at_once_when_already_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "forgerl_hook_probe.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []

    def bump(module: ModuleType) -> None:
        module.VALUE += 1
        seen.append(module.VALUE)

    hooks.when_imported("forgerl_hook_probe", bump)
    assert seen == []
    import forgerl_hook_probe  # type: ignore[import-not-found]

    assert forgerl_hook_probe.VALUE == 42 and seen == [42]
    hooks.when_imported("forgerl_hook_probe", bump)  # already imported: runs now
    assert seen == [42, 43]
    sys.modules.pop("forgerl_hook_probe")


def test_every_fix_names_a_vllm_module() -> None:
    assert set(FIXES) == {
        "cpu_sigmoid_routing",
        "reload_partial_loader_name",
        "cpu_moe_reprepack_on_reload",
        "cpu_attention_head_padding",
        "mtp_layers_any_count",
    }
    assert all(fix.module.startswith("vllm.") for fix in FIXES.values())


def test_disable_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv(plugin.DISABLE_ENV, "no_such_fix")
    with pytest.raises(ValueError, match="unknown fixes"):
        plugin.register()


def test_padded_head_size() -> None:
    supported = [32, 64, 80, 96, 128]
    assert padded_head_size(16, supported) == 32
    assert padded_head_size(72, supported) == 80
    assert padded_head_size(64, supported) is None
    assert padded_head_size(1024, supported) is None


def test_the_mtp_layer_pattern_drops_exactly_the_layers_after_the_main_ones() -> None:
    from forgerl.vllm_plugin.fixes import main_layers_only

    pattern = main_layers_only(62)
    kept = [f"layers.{i}.self_attn.qkv_proj.weight" for i in (0, 6, 61)] + ["embed_tokens.weight", "norm.weight"]
    dropped = [f"layers.{i}.enorm.weight" for i in (62, 63, 64, 100, 620)]
    assert [bool(pattern.search(n)) for n in kept] == [False] * len(kept)
    assert [bool(pattern.search(n)) for n in dropped] == [True] * len(dropped)
