"""ForgeRL's vLLM plugin: fixes vLLM needs for our MiniMax-M2 models on CPU, and registers our architectures.

vLLM calls `register()` (entry point `vllm.general_plugins: forgerl`) once in every process it starts: the
front-end, the engine core and each worker. Nothing here patches files on disk: each fix is applied to the
vLLM module in memory right after that module is first imported (see `hooks`), so `register()` itself imports
no part of vLLM or torch and costs microseconds. It is idempotent.

The fixes (see `fixes` for the details and `FIXES` for their names):
- `cpu_sigmoid_routing`: vLLM's CPU MoE router only accepts softmax scoring; MiniMax-M2's sigmoid routing
  with an expert-bias correction goes through the grouped top-k path with a single group, which is exact.
- `reload_partial_loader_name`: the layerwise weight-reload code reads `weight_loader.__name__`, which a
  `functools.partial` loader (MiniMax's q/k RMSNorm) does not have.
- `cpu_moe_reprepack_on_reload`: after a weight reload the CPU MoE expert weights were copied in unpacked
  layout into the prepacked kernel buffers (no error, wrong outputs); they are prepacked again.
- `cpu_attention_head_padding`: the CPU attention kernel has no head size 16 (our debug preset); such
  layers run zero-padded to the next supported size, which is exact.
- `mtp_layers_any_count`: a reload drops only as many MTP layers as the engine started with; a checkpoint
  whose MTP modules grew (`rl.grow_mtp_to`) failed it. Every layer after the main ones is dropped (vLLM
  serves no MTP module here).

Set `FORGERL_VLLM_DISABLE_FIXES=name,name` to leave some out (tests use it to show what a fix fixes).
"""

from __future__ import annotations

import os

from forgerl.vllm_plugin.fixes import FIXES
from forgerl.vllm_plugin.models import ARCHITECTURES

DISABLE_ENV = "FORGERL_VLLM_DISABLE_FIXES"

_registered = False


def disabled_fixes() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def register() -> None:
    """vLLM's entry point: install the fixes (lazily, per module) and register our architectures."""
    global _registered
    if _registered:
        return
    from forgerl.vllm_plugin.hooks import when_imported

    off = disabled_fixes()
    unknown = off - set(FIXES)
    if unknown:
        raise ValueError(f"{DISABLE_ENV} names unknown fixes {sorted(unknown)}; known: {sorted(FIXES)}")
    for name, fix in FIXES.items():
        if name not in off:
            when_imported(fix.module, fix.apply)
    if ARCHITECTURES:
        from forgerl.vllm_plugin.models import register_architectures

        register_architectures()
    _registered = True


__all__ = ["ARCHITECTURES", "DISABLE_ENV", "FIXES", "disabled_fixes", "register"]
