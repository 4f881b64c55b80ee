"""Streamed weight updates inside vLLM's workers: buckets of (Hugging Face name, tensor) pairs loaded one
`collective_rpc` at a time through vLLM's own in-place reload, so no process holds the whole state dict.

Why not vLLM's `reload_weights(weights_iterator=...)` once per bucket. vLLM 0.32's in-place reload
(`model_executor/model_loader/reload/inplace.py:32-104`) does three things in one call:
`initialize_layerwise_reload` moves every layer to the meta device and wraps its weight loaders,
`model.load_weights(iterator)` loads, and `finalize_layerwise_reload` processes every layer. A layer whose
weights straddle two calls (q_proj in one bucket and k/v_proj in the next, which vLLM fuses into qkv_proj;
some experts of a layer in one bucket and the rest in the next, which vLLM stacks into w13/w2) would be
materialised with `torch.empty_strided` (`reload/meta.py:49-61`) and processed with only part of its
weights ("Delayed processing", `reload/layerwise.py:269-275`): its other parts are garbage (tried on the
debug preset: 18 buckets, one `reload_weights` each, and the engine answered token 0 at every step). An
iterator cannot cross into the worker either: `collective_rpc` serializes its arguments to the engine-core
process (msgpack) and on to the workers.

So the three steps run here one per call: `forgerl_begin_weight_stream` (initialize), then
`forgerl_load_weight_bucket` per bucket (`model.load_weights`: the wrapped loaders buffer a layer's
weights until all of its elements are in, then process that layer and copy it into the served storage,
`reload/layerwise.py:216-218`), then `forgerl_finish_weight_stream` (finalize, and the names of any
parameter that got nothing). Between calls the layerwise state lives in vLLM's module-level
`LAYERWISE_INFO` and the engine is paused. With buckets in checkpoint order (layer by layer) at most the
layer being loaded waits in that buffer; a layer is written to the served tensors only whole. The same
18 buckets this way serve exactly what a reload of the checkpoint serves
(tests/integration/inference/test_inference_weights_checked.py).

A bucket travels as the bytes of one safetensors file: `collective_rpc` ships them to the engine-core
process (msgpack) and on to the worker (vLLM's shared-memory queue, out-of-band above 1 MiB), where
`safetensors.torch.load` makes the tensors the loader reads.
"""

from __future__ import annotations

from typing import Any


class WeightStreamExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker through
    `collective_rpc`."""

    model_runner: Any
    vllm_config: Any
    _forgerl_loaded: set[str] | None = None  # vLLM parameter names loaded by the stream in progress

    def forgerl_begin_weight_stream(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        if self._forgerl_loaded is not None:
            self.forgerl_abort_weight_stream()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._forgerl_loaded = set()

    def forgerl_load_weight_bucket(self, data: bytes) -> int:
        """Load one bucket (a safetensors file's bytes); the number of vLLM parameters it reached."""
        from safetensors.torch import load
        from vllm.config import set_current_vllm_config

        if self._forgerl_loaded is None:
            raise RuntimeError("forgerl_load_weight_bucket before forgerl_begin_weight_stream")
        tensors = load(data)
        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(iter(tensors.items()))
        self._forgerl_loaded |= set(loaded or ())
        return len(loaded or ())

    def forgerl_finish_weight_stream(self) -> list[str]:
        """Process what is left (layers vLLM defers to the end, e.g. attention) and end the stream; the
        vLLM parameters the stream never loaded (empty when the model is whole)."""
        loaded = self._forgerl_loaded or set()
        self._forgerl_end_stream()
        names = {name for name, _ in self.model_runner.get_model().named_parameters()}
        return sorted(names - loaded)

    def forgerl_abort_weight_stream(self) -> None:
        """End a stream cut short, putting every layer back on its served storage; layers loaded so far
        keep the new values (the caller restores the served weights)."""
        self._forgerl_end_stream()

    def _forgerl_end_stream(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(runner.get_model(), runner.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as runner.reload_weights
            if hasattr(runner, reset):
                getattr(runner, reset)()
        self._forgerl_loaded = None
