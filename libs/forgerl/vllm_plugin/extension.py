"""The one worker extension the inference engine gives vLLM (`worker_extension_cls` takes a single class):
routing capture and streamed weight updates. Their methods only act when the engine calls them through
`collective_rpc`, so the extension changes nothing for an engine that uses neither."""

from __future__ import annotations

from forgerl.vllm_plugin.routing import RoutingCaptureExtension
from forgerl.vllm_plugin.weights import WeightStreamExtension

EXTENSION = "forgerl.vllm_plugin.extension.ForgeRLWorkerExtension"


class ForgeRLWorkerExtension(RoutingCaptureExtension, WeightStreamExtension):
    pass
