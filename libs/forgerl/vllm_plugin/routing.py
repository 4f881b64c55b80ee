"""Routing replay on vLLM's V1 model runner: which experts each token was routed to, per MoE layer.

vLLM 0.32 has its own routed-experts output, but it needs Model Runner V2, which needs Triton with a CPU
backend: on the CPU build the engine refuses `enable_return_routed_experts`. This worker extension
(`worker_extension_cls`) does the same job on the V1 runner:

- every MoE router gets a capture callback (`BaseRouter.set_capture_fn`, the hook vLLM's own capturer
  uses) that writes the step's top-k expert ids of its layer into one buffer [tokens, layers, top_k];
- after each `execute_model` the rows of the requests that asked for it (`extra_args["forgerl_routing"]`
  in their SamplingParams, holding the key to keep them under: the front-end's request id, as vLLM
  renames requests internally) are kept per request by absolute token position (a recomputed position
  overwrites the old rows);
- the front-end takes a request's rows for a position range through `collective_rpc` when it finishes.

Only positions from the last prompt token on are kept: those are the forward passes that produced the
generated tokens, the rows routing replay needs and the ones prefix caching never skips.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "forgerl_routing"
EXTENSION = "forgerl.vllm_plugin.routing.RoutingCaptureExtension"
MAX_KEPT_REQUESTS = 4096


def _capture(buffer: Any, layer: int, topk_ids: Any) -> None:
    n = topk_ids.shape[0]
    if n <= buffer.shape[0]:
        buffer[:n, layer] = topk_ids


@dataclass
class _CaptureState:
    buffer: Any  # torch.Tensor int16 [max_num_tokens, num_layers, top_k], written by the routers
    shape: dict[str, int]
    # request key -> [(positions, rows)] in capture order
    kept: OrderedDict[str, list[tuple[Any, Any]]] = field(default_factory=OrderedDict)


class RoutingCaptureExtension:
    """Mixed into vLLM's worker class; its methods run in the worker through `collective_rpc`."""

    model_runner: Any
    _forgerl_routing: _CaptureState | None = None

    def forgerl_enable_routing_capture(self) -> dict[str, int]:
        import torch
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        if self._forgerl_routing is not None:
            return self._forgerl_routing.shape
        runner = self.model_runner
        model = runner.get_model()
        moe = [m for m in model.modules() if isinstance(m, MoERunner)]
        if not moe:
            raise RuntimeError("routing capture: the model has no MoE layers")
        unsupported = [type(m.router).__name__ for m in moe if not isinstance(m.router, BaseRouter)]
        if unsupported:
            raise RuntimeError(f"routing capture: routers {sorted(set(unsupported))} have no capture hook")
        hf = runner.model_config.hf_text_config
        num_layers = int(hf.num_hidden_layers)
        top_k = int(hf.num_experts_per_tok)
        buffer = torch.zeros((int(runner.max_num_tokens), num_layers, top_k), dtype=torch.int16)
        for m in moe:
            m.router.set_capture_fn(partial(_capture, buffer, int(m.layer_id)))
        shape = {"num_layers": num_layers, "top_k": top_k, "moe_layers": len(moe)}
        self._forgerl_routing = _CaptureState(buffer=buffer, shape=shape)

        execute_model = runner.execute_model

        def execute_and_collect(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            out = execute_model(scheduler_output, *args, **kwargs)
            try:
                self._forgerl_collect(scheduler_output)
            except Exception:  # never take the engine down over bookkeeping
                logger.exception("routing capture: could not collect this step's expert ids")
            return out

        runner.execute_model = execute_and_collect
        return shape

    def _forgerl_collect(self, scheduler_output: Any) -> None:
        total = int(scheduler_output.total_num_scheduled_tokens)
        if total <= 0:
            return
        state = self._forgerl_routing
        assert state is not None
        buffer, kept = state.buffer, state.kept
        if total > buffer.shape[0]:
            return
        runner = self.model_runner
        batch = runner.input_batch
        positions = runner.positions[:total].cpu().numpy()
        offset = 0
        for rid in batch.req_ids[: batch.num_reqs]:
            n = int(scheduler_output.num_scheduled_tokens.get(rid, 0))
            if n:
                req = runner.requests.get(rid)
                params = getattr(req, "sampling_params", None)
                extra = getattr(params, "extra_args", None) or {}
                key = extra.get(EXTRA_ARGS_KEY)
                if key:
                    first = max(len(req.prompt_token_ids or ()) - 1, 0)
                    pos = positions[offset : offset + n]
                    keep = pos >= first
                    if keep.any():
                        rows = buffer[offset : offset + n].numpy()[keep].copy()
                        kept.setdefault(key, []).append((pos[keep].copy(), rows))
                        kept.move_to_end(key)
            offset += n
        while len(kept) > MAX_KEPT_REQUESTS:
            kept.popitem(last=False)

    def forgerl_take_routed_experts(self, request_id: str, start: int, end: int) -> tuple[list[int], bytes, int]:
        """Rows [start, end) of a request's token positions as int16 bytes; forgets the request.

        Returns (shape, data, missing): `missing` counts positions no step captured (rows left at -1).
        """
        import numpy as np

        state = self._forgerl_routing
        if state is None:
            raise RuntimeError("routing capture is not enabled in this worker")
        shape = state.shape
        count = max(end - start, 0)
        out = np.full((count, shape["num_layers"], shape["top_k"]), -1, dtype=np.int16)
        seen = np.zeros(count, dtype=bool)
        for pos, rows in state.kept.pop(request_id, []):
            sel = (pos >= start) & (pos < end)
            out[pos[sel] - start] = rows[sel]
            seen[pos[sel] - start] = True
        return [count, shape["num_layers"], shape["top_k"]], out.tobytes(), int(count - seen.sum())

    def forgerl_drop_routed_experts(self, request_ids: list[str]) -> int:
        state = self._forgerl_routing
        if state is None:
            return 0
        return sum(state.kept.pop(rid, None) is not None for rid in request_ids)
