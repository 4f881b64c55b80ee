"""forgerl.inference.checkpoint: a checkpoint is checked against the served one from headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from forgerl.inference.checkpoint import (
    CheckpointError,
    CheckpointMissing,
    check_finite,
    check_same_architecture,
    inspect_checkpoint,
    is_mtp_tensor,
    read_safetensors_header,
)

pytestmark = pytest.mark.unit

CONFIG = {"architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "vocab_size": 16, "hidden_size": 4}


def write(path: Path, config: dict[str, object] | None = None, **tensors: tuple[int, ...]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    shapes = tensors or {"embed": (16, 4), "head": (16, 4)}
    save_file({name: np.zeros(shape, np.float32) for name, shape in shapes.items()}, str(path / "model.safetensors"))
    return path


def test_reads_config_and_tensor_shapes(tmp_path: Path) -> None:
    info = inspect_checkpoint(write(tmp_path / "a"))
    assert info.architecture == "MiniMaxM2ForCausalLM" and info.vocab_size == 16
    assert info.tensors == {"embed": ("F32", (16, 4)), "head": ("F32", (16, 4))}


def test_same_architecture_passes(tmp_path: Path) -> None:
    check_same_architecture(inspect_checkpoint(write(tmp_path / "a")), inspect_checkpoint(write(tmp_path / "b")))


def test_missing_paths_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(CheckpointMissing, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointMissing, match=r"no config\.json"):
        inspect_checkpoint(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointMissing, match=r"no \*\.safetensors"):
        inspect_checkpoint(tmp_path / "noweights")
    with pytest.raises(CheckpointMissing, match="cannot be looked up: File name too long"):
        inspect_checkpoint(tmp_path / ("é" * 300))  # UpdateWeights answered INTERNAL to it (fuzz)


def test_garbage_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        inspect_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps(CONFIG))
    (bad / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors_header(bad / "model.safetensors")


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    served = inspect_checkpoint(write(tmp_path / "a"))
    other = inspect_checkpoint(write(tmp_path / "b", {**CONFIG, "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="hidden_size: 8 \\(served: 4\\)"):
        check_same_architecture(other, served)


def test_missing_tensor_and_shape_are_refused(tmp_path: Path) -> None:
    served = inspect_checkpoint(write(tmp_path / "a"))
    fewer = inspect_checkpoint(write(tmp_path / "b", embed=(16, 4)))
    with pytest.raises(CheckpointError, match="1 missing \\['head'\\]"):
        check_same_architecture(fewer, served)
    reshaped = inspect_checkpoint(write(tmp_path / "c", embed=(16, 4), head=(4, 16)))
    with pytest.raises(CheckpointError, match="other shapes"):
        check_same_architecture(reshaped, served)


def test_mtp_modules_are_left_out_of_the_comparison(tmp_path: Path) -> None:
    """Two main layers; MTP modules are layers 2, 3, ... (vLLM serves none): grown from one module to three,
    a checkpoint still updates the served one; a main layer missing is still refused."""
    config = {**CONFIG, "num_hidden_layers": 2}
    main = {f"model.layers.{i}.w": (4, 4) for i in range(2)}
    served = inspect_checkpoint(write(tmp_path / "k1", config, **main, **{"model.layers.2.w": (4, 4)}))
    grown = {f"model.layers.{i}.w": (4, 4) for i in range(2, 5)}
    check_same_architecture(inspect_checkpoint(write(tmp_path / "k3", config, **main, **grown)), served)
    without = inspect_checkpoint(write(tmp_path / "k0", config, **{"model.layers.0.w": (4, 4)}, **grown))
    with pytest.raises(CheckpointError, match=r"1 missing \['model\.layers\.1\.w'\]"):
        check_same_architecture(without, served)
    assert [is_mtp_tensor(f"model.layers.{i}.w", 2) for i in (0, 1, 2, 10)] == [False, False, True, True]
    assert not is_mtp_tensor("model.embed_tokens.weight", 2) and not is_mtp_tensor("model.layers.1x.w", 0)


def test_truncated_file_and_corrupt_offsets_name_the_tensor(tmp_path: Path) -> None:
    path = write(tmp_path / "a")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])  # the last 8 bytes: half of tensor 'head' (16 x 4 float32 = 256 bytes)
    with pytest.raises(CheckpointError, match="is truncated: tensor 'head' ends at data byte 512, the file holds 504"):
        inspect_checkpoint(path)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["embed"]["data_offsets"] = [0, 100]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    weights.write_bytes(data[:8] + raw + data[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"tensor 'embed' is corrupt: F32 \[16, 4\] needs 256 bytes"):
        inspect_checkpoint(path)


def test_other_dtype_is_refused(tmp_path: Path) -> None:
    served = inspect_checkpoint(write(tmp_path / "a"))
    other = tmp_path / "b"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(CONFIG))
    tensors = {"embed": np.zeros((16, 4), np.float32), "head": np.zeros((16, 4), np.float16)}
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"other dtypes than the served model: head F16 \(served: F32\)"):
        check_same_architecture(inspect_checkpoint(other), served)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_tensor(tmp_path: Path, bad: float) -> None:
    path = write(tmp_path / "a")
    check_finite(inspect_checkpoint(path))
    values = np.zeros((16, 4), np.float32)
    values[3, 1] = values[7, 2] = bad
    save_file({"embed": np.zeros((16, 4), np.float32), "head": values}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'head' holds 2 non-finite values"):
        check_finite(inspect_checkpoint(path))
