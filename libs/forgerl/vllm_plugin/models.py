"""Our own architectures for vLLM, registered lazily ("module:Class") so no model code is imported early.

MiniMax-M2 itself needs no entry: vLLM ships `MiniMaxM2ForCausalLM`. Architectures of later work (MSA
attention) add a line to ARCHITECTURES: the `architectures[0]` of their config.json, and where vLLM finds
the class.
"""

from __future__ import annotations

ARCHITECTURES: dict[str, str] = {}


def register_architectures() -> None:
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
