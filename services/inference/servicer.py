"""gRPC face of the inference engine: Generate (streamed), UpdateWeights, StreamWeights, GetStatus, Abort."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from forgerl.inference.checkpoint import CheckpointError, CheckpointMissing
from forgerl.inference.engine import (
    DuplicateRequest,
    EngineFailure,
    EngineSettings,
    FeatureDisabled,
    GenerationChunk,
    InferenceEngine,
    InFlight,
    WeightsLost,
)
from forgerl.inference.requests import GenerationRequest, InvalidRequest, Sampling
from forgerl.services.inference.config import InferenceConfig
from forgerl.v1 import inference_pb2, inference_pb2_grpc, trajectory_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

_IN_FLIGHT: dict[int, InFlight | None] = {
    inference_pb2.IN_FLIGHT_POLICY_UNSPECIFIED: None,
    inference_pb2.IN_FLIGHT_POLICY_FINISH: "finish",
    inference_pb2.IN_FLIGHT_POLICY_ABORT: "abort",
}


def engine_settings(config: InferenceConfig) -> EngineSettings:
    return EngineSettings(
        model_path=config.model_path,
        policy_version=config.policy_version,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        kv_cache_bytes=config.kv_cache_bytes,
        in_flight=config.in_flight,
        routing_replay=config.routing_replay,
        enable_prefix_caching=config.enable_prefix_caching,
        max_num_seqs=config.max_num_seqs,
        seed=config.seed,
        logprobs_mode=config.logprobs_mode,
        executor=config.executor,
        tensor_parallel_size=config.tensor_parallel_size,
    )


def to_request(message: inference_pb2.GenerateRequest) -> GenerationRequest:
    s = message.sampling
    return GenerationRequest(
        request_id=message.request_id,
        prompt_token_ids=tuple(message.prompt_token_ids),
        sampling=Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_tokens=s.max_tokens,
            stop_token_ids=tuple(s.stop_token_ids),
            seed=s.seed if s.HasField("seed") else None,
        ),
        return_routed_experts=message.return_routed_experts,
    )


def to_response(chunk: GenerationChunk) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        logprobs=chunk.logprobs,
        finish_reason=chunk.finish_reason,
        policy_version=chunk.policy_version,
        cached_prompt_tokens=chunk.cached_prompt_tokens,
    )
    if chunk.routed_experts is not None:
        routed = chunk.routed_experts
        response.routed_experts.CopyFrom(
            trajectory_pb2.RoutedExperts(
                num_layers=routed.num_layers,
                top_k=routed.top_k,
                expert_ids=routed.expert_ids.reshape(-1).astype("int32").tolist(),
            )
        )
    return response


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, config: InferenceConfig, engine: InferenceEngine | None = None) -> None:
        self.config = config
        self.engine = engine or InferenceEngine(engine_settings(config))

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        await self._abort_if_dead(context)
        try:
            async for chunk in self.engine.generate(to_request(request)):
                yield to_response(chunk)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except DuplicateRequest as err:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
        except FeatureDisabled as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except WeightsLost as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except EngineFailure as err:
            await context.abort(grpc.StatusCode.INTERNAL, str(err))
        except Exception as err:
            if _is_vllm_validation(err):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"vLLM rejected the request: {err}")
            logger.exception("Generate %s failed", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(err).__name__}: {err}")

    async def UpdateWeights(
        self, request: inference_pb2.UpdateWeightsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UpdateWeightsResponse:
        await self._abort_if_dead(context)
        if not request.checkpoint_path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "checkpoint_path is empty: send a directory")
        if request.in_flight not in _IN_FLIGHT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown in_flight policy {request.in_flight}")
        update = self.engine.update_weights(request.checkpoint_path, request.version, _IN_FLIGHT[request.in_flight])
        result = await self._weights_update(update, context, f"UpdateWeights to {request.checkpoint_path}")
        return inference_pb2.UpdateWeightsResponse(policy_version=result.policy_version, reload_s=result.reload_s)

    async def StreamWeights(
        self,
        request_iterator: AsyncIterator[inference_pb2.StreamWeightsRequest],
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.StreamWeightsResponse:
        await self._abort_if_dead(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.in_flight not in _IN_FLIGHT:
            problem = "no message: send the buckets" if first is None else f"unknown in_flight policy {first.in_flight}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"StreamWeights got {problem}")
            raise AssertionError("context.abort raises")
        update = self.engine.stream_weights(
            first.version, _buckets(first, request_iterator), _IN_FLIGHT[first.in_flight]
        )
        result = await self._weights_update(update, context, f"StreamWeights to version {first.version}")
        return inference_pb2.StreamWeightsResponse(
            policy_version=result.policy_version, reload_s=result.reload_s, buckets=result.buckets, bytes=result.bytes
        )

    async def _weights_update(self, update: Awaitable[T], context: grpc.aio.ServicerContext, what: str) -> T:
        """The update's result, or the status its failure maps to (the served version says if it still serves)."""
        try:
            return await update
        except CheckpointMissing as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{err}; policy version {self.engine.version} keeps serving")
        except (CheckpointError, InvalidRequest) as err:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{err}; policy version {self.engine.version} keeps serving"
            )
        except EngineFailure as err:
            await context.abort(grpc.StatusCode.INTERNAL, str(err))
        except Exception as err:
            logger.exception("%s failed", what)
            await context.abort(grpc.StatusCode.INTERNAL, f"weight update failed: {type(err).__name__}: {err}")
        raise AssertionError("context.abort raises")

    async def _abort_if_dead(self, context: grpc.aio.ServicerContext) -> None:
        """UNAVAILABLE (retry elsewhere or later) once the engine died; health already says NOT_SERVING."""
        failure = self.engine.failure()
        if failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{failure}; restart the inference service")

    async def GetStatus(
        self, request: inference_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetStatusResponse:
        s = self.engine.status()
        return inference_pb2.GetStatusResponse(
            policy_version=s.policy_version,
            model_path=s.model_path,
            running_requests=s.running_requests,
            waiting_requests=s.waiting_requests,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
        )

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        return inference_pb2.AbortResponse(aborted=await self.engine.abort(list(request.request_ids)))


async def _buckets(
    first: inference_pb2.StreamWeightsRequest, rest: AsyncIterator[inference_pb2.StreamWeightsRequest]
) -> AsyncIterator[bytes]:
    """Each bucket's bytes, its pieces joined; InvalidRequest if the stream ends inside a bucket."""
    message: inference_pb2.StreamWeightsRequest | None = first
    parts: list[bytes] = []
    while message is not None:
        parts.append(message.safetensors)
        if not message.continued:
            yield b"".join(parts)
            parts = []
        message = await anext(rest, None)
    if parts:
        raise InvalidRequest("the stream ended inside a bucket (its last piece had `continued` set)")


def _is_vllm_validation(err: BaseException) -> bool:
    return type(err).__name__ in {"VLLMValidationError", "VLLMClientError"} or (
        isinstance(err, ValueError) and type(err).__module__.startswith("vllm")
    )
