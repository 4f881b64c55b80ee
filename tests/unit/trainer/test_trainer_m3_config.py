"""Run configs of MiniMax-M3 (issue 20 item 5): the model is M3 by init_checkpoint's config.json or by an M3
preset, and what an M3 run cannot do is refused when the config is read, naming the key: prefix merging
(the indexer's blocks are pack slots), trainer.parallel, MTP growth, an MTP loss without MTP modules; and a
TrainingRun given the services (vLLM) is refused before any model is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from forgerl.model import (
    M3_PRESETS,
    M3Config,
    MiniMaxM2ForCausalLM,
    MiniMaxM3ForCausalLM,
    ModelConfig,
    save_checkpoint,
    save_m3_checkpoint,
)
from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import M3_PRESET_NAMES, is_m3_run, run_config_from_dict
from forgerl.trainer.sources import InferencePublisher, ServiceEpisodes

pytestmark = pytest.mark.unit

M3_RUN: dict[str, Any] = {"model_preset": "minimax-m3-tiny", "rl": {"prefix_merge": False}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny M3 checkpoints without and with an MTP module, and a debug M2 one (vocab 64: weights only)."""
    root = tmp_path_factory.mktemp("ckpts")
    m3 = M3Config.from_preset("minimax-m3-tiny", vocab_size=64)
    return {
        "m3": save_m3_checkpoint(MiniMaxM3ForCausalLM(m3), root / "m3"),
        "m3_mtp": save_m3_checkpoint(MiniMaxM3ForCausalLM(m3.replace(num_mtp_modules=1)), root / "m3_mtp"),
        "m2": save_checkpoint(MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=64)), None, root / "m2"),
    }


def test_preset_names_are_the_models() -> None:
    assert set(M3_PRESET_NAMES) == set(M3_PRESETS)


def test_the_model_is_m3_by_checkpoint_or_preset(checkpoints: dict[str, Path]) -> None:
    assert is_m3_run(run_config_from_dict(M3_RUN))
    assert not is_m3_run(run_config_from_dict({"model_preset": "debug"}))
    # init_checkpoint's architecture wins over the preset, either way.
    assert is_m3_run(run_config_from_dict({"init_checkpoint": str(checkpoints["m3"]), "rl": {"prefix_merge": False}}))
    assert not is_m3_run(run_config_from_dict({**M3_RUN, "init_checkpoint": str(checkpoints["m2"])}))


def test_prefix_merge_with_m3_is_refused_at_config_time(checkpoints: dict[str, Path]) -> None:
    merge = r"rl\.prefix_merge is on and the model is MiniMax-M3 \(.*\).*set rl\.prefix_merge: false"
    with pytest.raises(ValueError, match=merge):
        run_config_from_dict({"model_preset": "minimax-m3-tiny"})  # prefix_merge is on by default
    with pytest.raises(ValueError, match=merge):
        run_config_from_dict({"init_checkpoint": str(checkpoints["m3"]), "rl": {"prefix_merge": True}})
    run_config_from_dict({"model_preset": "debug", "rl": {"prefix_merge": True}})  # M2 merges as before
    run_config_from_dict({"init_checkpoint": str(checkpoints["m2"])})


def test_what_m3_runs_cannot_do_is_refused(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"trainer\.parallel is set .* MiniMax-M3"):
        run_config_from_dict({**M3_RUN, "trainer": {"parallel": {"dp_shard": 2}}})
    with pytest.raises(ValueError, match=r"rl\.grow_mtp_to 2: growing MTP modules is MiniMax-M2's"):
        run_config_from_dict({**M3_RUN, "rl": {"prefix_merge": False, "grow_mtp_to": 2}})
    no_mtp = {"init_checkpoint": str(checkpoints["m3"]), "rl": {"prefix_merge": False, "mtp_loss_weight": 0.1}}
    with pytest.raises(ValueError, match=r"rl\.mtp_loss_weight 0\.1 but .* has no MTP modules"):
        run_config_from_dict(no_mtp)
    with_mtp = {**no_mtp, "init_checkpoint": str(checkpoints["m3_mtp"])}
    assert run_config_from_dict(with_mtp).rl.mtp_loss_weight == pytest.approx(0.1)


def test_m3_through_the_services_is_refused_before_a_model_is_built(tmp_path: Path) -> None:
    config = run_config_from_dict(M3_RUN)
    settings = TrainerSettings(runs_dir=tmp_path)
    publisher = InferencePublisher("127.0.0.1:1")  # never called: the refusal comes first
    with pytest.raises(ValueError, match=r"local episodes only .* vLLM's M3 path needs a GPU"):
        TrainingRun("r", config, settings, publisher=publisher)
    with pytest.raises(ValueError, match=r"vLLM's M3 path needs a GPU"):
        TrainingRun("r", config, settings, episodes=ServiceEpisodes("127.0.0.1:1", "127.0.0.1:1"))
    # The trainer service sets init_checkpoint after the config was read: TrainingRun checks it again.
    merged = run_config_from_dict({"model_preset": "debug"})
    merged.model_preset = "minimax-m3-tiny"
    with pytest.raises(ValueError, match=r"rl\.prefix_merge is on"):
        TrainingRun("r", merged, settings)
    assert not (tmp_path / "r").exists()


def test_a_fresh_m3_preset_builds_m3(tmp_path: Path, tokenizer_dir: Path) -> None:
    """From the preset, at the tokenizer's size, with one MTP module when the run trains an MTP loss."""
    config = run_config_from_dict({**M3_RUN, "sft": {"steps": 0}, "rl": {"prefix_merge": False, "steps": 0,
                                                                          "mtp_loss_weight": 0.1}})  # fmt: skip
    run = TrainingRun("r", config, TrainerSettings(runs_dir=tmp_path, tokenizer_path=str(tokenizer_dir)))
    run._init_model()
    assert isinstance(run.model, MiniMaxM3ForCausalLM) and len(run.model.mtp) == 1
    assert run.model.config.vocab_size == len(run.tokenizer)
    assert run.model.model.embed_tokens.weight.dtype == torch.float32
