"""What a checkpoint directory holds, read without loading a tensor: config.json and safetensors headers.

The inference service checks a new checkpoint against the one it serves before it touches the engine:
vLLM's in-place reload only logs a warning for weights a checkpoint lacks, and a layer of the wrong shape
fails half-way through the reload, leaving a mix of two models. A checkpoint that passes these checks has
the same architecture, the same tensor names and the same shapes as the served one.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """The directory is not a checkpoint the engine can load; the message says why."""


class CheckpointMissing(CheckpointError):
    """The path does not exist or holds no checkpoint."""


# config.json keys that fix tensor shapes or the computation; two checkpoints that differ in one of them
# are different models, not two versions of one.
ARCHITECTURE_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rotary_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "scoring_func",
    "use_routing_bias",
    "tie_word_embeddings",
    "attention_type",
)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_mtp_tensor(name: str, num_hidden_layers: int) -> bool:
    """A tensor of an MTP module (a layer after the main ones). vLLM never serves them (it drops them when it
    loads, whatever their number: the plugin's `mtp_layers_any_count`), so the checks below leave them out:
    a trainer that grew its MTP modules (`rl.grow_mtp_to`) publishes to an engine started on fewer."""
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= num_hidden_layers


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    # tensor name -> (dtype, shape), from the safetensors headers
    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @property
    def served_tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors vLLM loads: every tensor but the MTP modules'."""
        return {name: entry for name, entry in self.tensors.items() if not is_mtp_tensor(name, self.num_layers)}

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["?"]
        return str(archs[0])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def num_experts(self) -> int:
        return int(self.config.get("num_local_experts", 0))

    @property
    def experts_per_token(self) -> int:
        return int(self.config.get("num_experts_per_tok", 0))


# Bytes per element of each safetensors dtype (the format's spec, huggingface/safetensors README).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape); CheckpointError naming the tensor if the header does not describe
    the file: a truncated file (a tensor's bytes end past the end of the file) or a corrupt header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024 or 8 + n > size:
            raise CheckpointError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - n
    return {
        name: _tensor_entry(path, name, meta, data_bytes) for name, meta in header.items() if name != "__metadata__"
    }


def _tensor_entry(path: Path, name: str, meta: Any, data_bytes: int) -> tuple[str, tuple[int, ...]]:
    try:
        dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
        begin, end = (int(x) for x in meta["data_offsets"])
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry ({err!r})") from None
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    expected = DTYPE_BYTES[dtype] * math.prod(shape)
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} is corrupt: {dtype} {list(shape)} needs {expected} bytes, "
            f"its header gives offsets [{begin}, {end}]"
        )
    if end > data_bytes:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at data byte {end}, the file holds {data_bytes}; "
            "write the checkpoint again"
        )
    return dtype, shape


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read a Hugging Face-layout checkpoint directory; CheckpointError if it is not one."""
    root = Path(path)
    try:
        exists = root.exists()
    except OSError as err:  # e.g. a name longer than the filesystem allows (found by the service's fuzz test)
        raise CheckpointMissing(f"checkpoint path {str(root)[:200]!r} cannot be looked up: {err.strerror}") from None
    if not exists:
        raise CheckpointMissing(f"checkpoint path {str(root)!r} does not exist")
    if not root.is_dir():
        raise CheckpointMissing(f"checkpoint path {str(root)!r} is not a directory")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointMissing(f"{str(root)!r} has no config.json: not a checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "vocab_size" not in config:
        raise CheckpointError(f"{config_path} does not describe a model (no vocab_size)")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointMissing(f"{str(root)!r} has no *.safetensors weight files")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    return CheckpointInfo(root, config, tensors)


def check_same_architecture(new: CheckpointInfo, served: CheckpointInfo) -> None:
    """CheckpointError unless `new` can be loaded in place of `served` (same config keys, tensors, shapes)."""
    diffs = [
        f"{key}: {new.config.get(key)!r} (served: {served.config.get(key)!r})"
        for key in ARCHITECTURE_KEYS
        if new.config.get(key) != served.config.get(key)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {str(new.path)!r} is a different architecture from the served model: " + "; ".join(diffs)
        )
    new_tensors, served_tensors = new.served_tensors, served.served_tensors
    missing = sorted(set(served_tensors) - set(new_tensors))
    extra = sorted(set(new_tensors) - set(served_tensors))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {str(new.path)!r} does not have the served model's tensors: "
            f"{len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )
    for index, what in ((1, "shapes"), (0, "dtypes")):  # (dtype, shape) per tensor
        differ = [
            f"{name} {new_tensors[name][index]} (served: {served_tensors[name][index]})"
            for name in sorted(served_tensors)
            if new_tensors[name][index] != served_tensors[name][index]
        ]
        if differ:
            raise CheckpointError(
                f"checkpoint {str(new.path)!r} has tensors of other {what} than the served model: "
                + "; ".join(differ[:3])
            )


def check_finite(info: CheckpointInfo) -> None:
    """CheckpointError naming the first tensor holding a NaN or an infinity. All-NaN weights load without
    complaint and make the engine emit token 0 forever (issue 24), so the values are read, once per update
    (~0.1 s for the 2.3M-parameter tiny preset; a full reload reads every byte anyway)."""
    import torch
    from safetensors import safe_open

    for file in sorted(info.path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and tensor.element_size() == 1:  # float8: no isfinite kernel
                    tensor = tensor.float()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise CheckpointError(
                        f"checkpoint {str(info.path)!r}: tensor {name!r} holds {bad} non-finite values "
                        f"(NaN or infinity) of {tensor.numel()}; the trainer diverged or the file is corrupt"
                    )
