"""vLLM's AsyncLLM behind a small interface: token-in/token-out generation with versioned weight updates.

The engine core runs in its own process (vLLM's design); this object lives in the service's event loop.

Versioning. Every request is stamped with the policy version when it is admitted, and that version made
all of its tokens: an update closes admission, waits until every admitted request has reached the engine,
then pauses the engine, which either lets the requests in flight finish on the old weights ("finish") or
aborts them ("abort"). Only then are the weights reloaded, the prefix cache reset, and admission reopened
under the new version. Requests that arrive during an update wait for it and run on the new version.

Two ways in: `update_weights` reloads a checkpoint directory; `stream_weights` takes the weights in buckets
(StreamWeights), each checked and loaded into vLLM's own loader as it arrives (forgerl.vllm_plugin.weights:
vLLM fuses q/k/v and stacks the experts itself; a layer is written only whole). A failed update that
touched the weights reloads the checkpoint the served ones came from; streamed weights have none, so after
such a failure the engine refuses requests (WeightsLost) until an update succeeds rather than serve a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from forgerl.inference.buckets import BucketCheck
from forgerl.inference.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    check_finite,
    check_same_architecture,
    inspect_checkpoint,
)
from forgerl.inference.requests import (
    GenerationRequest,
    InvalidRequest,
    ModelLimits,
    Sampling,
    check_request,
    sampling_kwargs,
)
from forgerl.inference.stats import EngineStats, stat_logger_factory

logger = logging.getLogger(__name__)

InFlight = Literal["finish", "abort"]
_PAUSE_MODE = {"finish": "wait", "abort": "abort"}


def _checked_mode(mode: str) -> InFlight:
    if mode not in _PAUSE_MODE:
        raise InvalidRequest(f"in_flight={mode!r}: must be 'finish' or 'abort'")
    return mode  # type: ignore[return-value]


class FeatureDisabled(Exception):
    """The request needs something this engine was started without (e.g. routing replay)."""


class DuplicateRequest(Exception):
    """A request with this id is already running."""


class EngineFailure(RuntimeError):
    """The engine could not do what was asked and the caller cannot fix it by changing the request."""


class WeightsLost(EngineFailure):
    """A failed update overwrote part of the served weights and they could not be restored: generation is
    refused until an update succeeds."""


@dataclass(frozen=True)
class EngineSettings:
    model_path: str
    policy_version: int = 1
    dtype: str = "float32"
    max_model_len: int = 2048
    kv_cache_bytes: int = 256 * 1024 * 1024
    in_flight: InFlight = "finish"
    routing_replay: bool = False
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    enforce_eager: bool = True
    seed: int = 0
    logprobs_mode: str = "raw_logprobs"
    # "mp": the model worker in its own process (vLLM's default); "uni": inside the engine-core process
    # (on CPU vLLM 0.32 turns "uni" into "mp" unless VLLM_ENABLE_V1_MULTIPROCESSING=0).
    executor: str = "mp"
    warmup_tokens: int = 4
    # GPUs the model is sharded over (vLLM's tensor_parallel_size); a pod's GPU count in the chart.
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class RoutedRows:
    """Expert ids per generated token: row i is the forward pass that produced token i."""

    num_layers: int
    top_k: int
    expert_ids: np.ndarray  # int16 [num_tokens, num_layers, top_k]


@dataclass
class GenerationChunk:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "" until the last chunk: "stop", "length" or "abort"
    policy_version: int
    cached_prompt_tokens: int
    routed_experts: RoutedRows | None = None


@dataclass(frozen=True)
class UpdateResult:
    policy_version: int
    reload_s: float  # reload + prefix-cache reset, the engine paused
    wait_s: float  # waiting for requests in flight to finish or abort


@dataclass(frozen=True)
class StreamResult(UpdateResult):
    buckets: int
    bytes: int  # safetensors bytes received


@dataclass
class _Pause:
    wait_s: float = 0.0
    reload_s: float = 0.0


@dataclass(frozen=True)
class EngineStatus:
    policy_version: int
    model_path: str
    running_requests: int
    waiting_requests: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int


@dataclass
class _Active:
    version: int
    prompt_len: int
    generated: int = 0
    aborted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class InferenceEngine:
    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.stats = EngineStats()
        self._llm: Any = None
        self._served: CheckpointInfo | None = None
        self._limits: ModelLimits | None = None
        self._version = settings.policy_version
        self._active: dict[str, _Active] = {}
        self._update_lock = asyncio.Lock()
        self._open = asyncio.Event()
        self._admitting = 0
        self._held = 0  # requests waiting for an update to finish before they are admitted
        self._admitted = asyncio.Condition()
        self._routing_shape: dict[str, int] | None = None
        self._source: Path | None = None  # the checkpoint the served weights came from; None: streamed
        self._lost: str | None = None  # why the served weights are a mix of versions (WeightsLost)

    # --- life cycle -------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def limits(self) -> ModelLimits:
        if self._limits is None:
            raise EngineFailure("the engine has not started")
        return self._limits

    async def start(self) -> None:
        """Start vLLM on the model path and warm it up; CheckpointError if the path holds no model."""
        served = inspect_checkpoint(self.settings.model_path)
        self._served = served
        self._source = served.path
        # vLLM logs to stdout by default; a service's stdout is not for logs (and benchmarks print JSON there).
        # Set before vLLM is imported; the engine-core and worker processes inherit it.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        self._limits = ModelLimits(vocab_size=served.vocab_size, max_model_len=self.settings.max_model_len)
        t0 = time.perf_counter()
        self._llm = await asyncio.to_thread(self._build)
        if self.settings.routing_replay:
            shapes = await self._llm.collective_rpc("forgerl_enable_routing_capture")
            self._routing_shape = shapes[0]
        await self._llm.update_weight_version(str(self._version))
        self._open.set()
        await self.warm_up()
        logger.info("engine ready", extra={"model": str(served.path), "start_s": round(time.perf_counter() - t0, 1)})

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from forgerl.vllm_plugin.extension import EXTENSION

        s = self.settings
        engine_kwargs: dict[str, Any] = {"dtype": s.dtype, "logprobs_mode": s.logprobs_mode}
        args = AsyncEngineArgs(
            model=str(Path(s.model_path).resolve()),
            skip_tokenizer_init=True,
            max_model_len=s.max_model_len,
            kv_cache_memory_bytes=s.kv_cache_bytes,
            enable_prefix_caching=s.enable_prefix_caching,
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            seed=s.seed,
            distributed_executor_backend=s.executor,
            tensor_parallel_size=s.tensor_parallel_size,
            worker_extension_cls=EXTENSION,
            disable_log_stats=True,
            **engine_kwargs,
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(self.stats)])

    async def warm_up(self) -> None:
        """Run one short greedy request through the engine, then forget its cache statistics."""
        n = max(1, min(16, self.limits.max_model_len - self.settings.warmup_tokens - 1))
        request = GenerationRequest(
            request_id=f"warmup-{uuid.uuid4().hex[:8]}",
            prompt_token_ids=tuple(i % self.limits.vocab_size for i in range(n)),
            sampling=Sampling(max_tokens=self.settings.warmup_tokens),
            return_routed_experts=self.settings.routing_replay,
        )
        async for _ in self.generate(request):
            pass
        await self._llm.reset_prefix_cache()
        self.stats.prefix_cache_queried_tokens = 0
        self.stats.prefix_cache_hit_tokens = 0

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ shuts down again, at interpreter exit if something still holds the engine,
            # when vLLM's module globals are gone (a TypeError on stderr): once is enough.
            llm.shutdown = lambda timeout=None: None

    # --- generation -------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's tokens; InvalidRequest / FeatureDisabled / DuplicateRequest before any."""
        max_tokens = check_request(request, self.limits)
        if request.return_routed_experts and not self.settings.routing_replay:
            raise FeatureDisabled(
                "return_routed_experts needs routing replay, which is off in this inference service: "
                "start it with routing_replay=true (FORGERL_INFERENCE_ROUTING_REPLAY=true)"
            )
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        rid = request.request_id or uuid.uuid4().hex
        kwargs = sampling_kwargs(request, max_tokens)
        if request.return_routed_experts:
            from forgerl.vllm_plugin.routing import EXTRA_ARGS_KEY

            kwargs["extra_args"] = {EXTRA_ARGS_KEY: rid}
        params = SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))

        state = await self._admit(rid, len(request.prompt_token_ids))
        queue = None
        finished = False
        try:
            try:
                queue = await self._llm.add_request(rid, prompt, params)
            finally:
                await self._admission_done()
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = bool(out.finished)
                chunk = self._chunk(rid, state, out)
                if finished and request.return_routed_experts:
                    chunk.routed_experts = await self._take_routing(rid, state)
                yield chunk
        finally:
            if queue is not None:
                if not finished:
                    with contextlib.suppress(Exception):
                        await self._llm.abort(rid, internal=False)
                queue.close()
            if request.return_routed_experts and not finished:
                with contextlib.suppress(Exception):
                    await self._llm.collective_rpc("forgerl_drop_routed_experts", args=([rid],))
            self._active.pop(rid, None)

    async def _admit(self, rid: str, prompt_len: int) -> _Active:
        if not self._open.is_set():
            self._held += 1
            try:
                while not self._open.is_set():
                    await self._open.wait()
            finally:
                self._held -= 1
        if self._lost is not None:
            raise WeightsLost(self._lost)
        if rid in self._active:
            raise DuplicateRequest(f"request_id {rid!r} is already running: use a new id per request")
        state = _Active(version=self._version, prompt_len=prompt_len)
        self._active[rid] = state
        self._admitting += 1
        return state

    async def _admission_done(self) -> None:
        async with self._admitted:
            self._admitting -= 1
            self._admitted.notify_all()

    def _chunk(self, rid: str, state: _Active, out: Any) -> GenerationChunk:
        completion = out.outputs[0] if out.outputs else None
        tokens = list(completion.token_ids) if completion is not None else []
        logprobs: list[float] = []
        if completion is not None and completion.logprobs:
            logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, tokens, strict=True)]
        state.generated += len(tokens)
        reason = (completion.finish_reason if completion is not None else None) or ""
        if out.finished and not reason:
            reason = "abort"
        return GenerationChunk(
            request_id=rid,
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=str(reason),
            policy_version=state.version,
            cached_prompt_tokens=int(out.num_cached_tokens or 0),
        )

    async def _take_routing(self, rid: str, state: _Active) -> RoutedRows | None:
        start = state.prompt_len - 1
        results = await self._llm.collective_rpc(
            "forgerl_take_routed_experts", args=(rid, start, start + state.generated)
        )
        shape, data, missing = results[0]
        if missing:
            logger.warning("routing capture missed %d of %d tokens of %s", missing, state.generated, rid)
        rows = np.frombuffer(data, dtype=np.int16).reshape(shape)
        return RoutedRows(num_layers=int(shape[1]), top_k=int(shape[2]), expert_ids=rows)

    async def abort(self, request_ids: list[str]) -> int:
        known = [rid for rid in request_ids if rid in self._active]
        if known:
            await self._llm.abort(known)
        return len(known)

    # --- weights ----------------------------------------------------------------------------------------

    async def update_weights(self, path: str, version: int, in_flight: InFlight | None = None) -> UpdateResult:
        """Serve the checkpoint at `path` as `version`. CheckpointError / InvalidRequest leave the old one."""
        mode = _checked_mode(in_flight or self.settings.in_flight)
        async with self._update_lock:
            self._check_newer(version)
            new, _ = await asyncio.to_thread(self._checked, path)
            async with self._paused(mode) as pause:
                try:
                    await self._reload(new.path)
                except Exception as err:
                    logger.exception("reload of %s failed; restoring the served weights", new.path)
                    await self._restore(err)
                    raise EngineFailure(
                        f"reloading {str(new.path)!r} failed ({err}); version {self._version} keeps serving"
                    ) from err
                await self._commit(version, source=new.path)
                self._served = new
        logger.info("serving policy version %d from %s (reload %.3f s)", version, new.path, pause.reload_s)
        return UpdateResult(policy_version=version, reload_s=pause.reload_s, wait_s=pause.wait_s)

    async def stream_weights(
        self, version: int, buckets: AsyncIterator[bytes], in_flight: InFlight | None = None
    ) -> StreamResult:
        """Serve the weights streamed in `buckets` (each the bytes of one safetensors file of HF-named
        tensors) as `version`, each bucket checked (BucketCheck) and then loaded into vLLM's own loader as
        it arrives (forgerl.vllm_plugin.weights), so neither this process nor the workers ever hold more
        than a bucket or two beside the served model. A refused first bucket leaves the engine untouched; a
        refused later one, a stream cut short or a failed load restores the served weights (`_restore`).
        CheckpointError / InvalidRequest: the served version keeps serving."""
        mode = _checked_mode(in_flight or self.settings.in_flight)
        async with self._update_lock:
            self._check_newer(version)
            if self._served is None:
                raise EngineFailure("the engine has not started")
            check = BucketCheck(self._served)
            data = await anext(buckets, None)
            if data is None:
                raise InvalidRequest("StreamWeights got no bucket: send every tensor of the model")
            await asyncio.to_thread(check.check, data)
            count = size = 0
            async with self._paused(mode) as pause:
                try:
                    await self._llm.collective_rpc("forgerl_begin_weight_stream")
                    while data is not None:
                        size += len(data)
                        data = await self._load_and_receive(data, buckets, check)
                        count += 1
                    check.check_complete()
                    unloaded = await self._llm.collective_rpc("forgerl_finish_weight_stream")
                    if any(unloaded):
                        raise EngineFailure(f"vLLM loaded nothing into {sorted(set().union(*unloaded))[:3]}")
                except BaseException as err:  # a cancelled stream (the sender went away) too
                    logger.warning("streamed update to version %d failed after %d buckets: %r", version, count, err)
                    await self._llm.collective_rpc("forgerl_abort_weight_stream")
                    await self._restore(err)
                    raise
                await self._commit(version, source=None)
        logger.info("serving policy version %d, streamed in %d buckets (%.3f s)", version, count, pause.reload_s)
        return StreamResult(
            policy_version=version, reload_s=pause.reload_s, wait_s=pause.wait_s, buckets=count, bytes=size
        )

    async def _load_and_receive(self, data: bytes, buckets: AsyncIterator[bytes], check: BucketCheck) -> bytes | None:
        """Load bucket `data` into vLLM while the next one is received and checked (the checks were 0.2-0.6 s
        of a 138 MB stream's 1.3-1.8 s pause on 2 cores; the load runs in vLLM's processes), so this process
        holds two buckets at a time; the next bucket, None at the end. Never returns while the load runs."""
        loading = asyncio.ensure_future(self._llm.collective_rpc("forgerl_load_weight_bucket", args=(data,)))
        try:
            following = await anext(buckets, None)
            if following is not None:
                await asyncio.to_thread(check.check, following)
        except BaseException:
            await asyncio.wait([loading])
            if not loading.cancelled():
                loading.exception()  # seen: the receive's or the check's error is the one reported
            raise
        await loading
        return following

    def _check_newer(self, version: int) -> None:
        if version <= self._version:
            raise InvalidRequest(
                f"version {version} is not newer than the served policy version {self._version}: versions only go up"
            )

    @contextlib.asynccontextmanager
    async def _paused(self, mode: InFlight) -> AsyncIterator[_Pause]:
        """Admission closed, the requests admitted so far on the engine, the engine paused (requests in flight
        finished or aborted per `mode`); resumed and reopened on the way out, whatever happened."""
        pause = _Pause()
        t0 = time.perf_counter()
        self._open.clear()
        try:
            async with self._admitted:
                await self._admitted.wait_for(lambda: self._admitting == 0)
            await self._llm.pause_generation(mode=_PAUSE_MODE[mode], clear_cache=True)
            t1 = time.perf_counter()
            pause.wait_s = t1 - t0
            yield pause
            pause.reload_s = time.perf_counter() - t1
        finally:
            with contextlib.suppress(Exception):
                await self._llm.resume_generation()
            self._open.set()

    async def _commit(self, version: int, source: Path | None) -> None:
        await self._llm.reset_prefix_cache()
        await self._llm.update_weight_version(str(version))
        self._version = version
        self._source = source
        self._lost = None

    async def _restore(self, err: BaseException) -> None:
        """The served version's weights back after a failed update touched them: its checkpoint reloaded.
        Streamed weights have no checkpoint to come back from (keeping a copy would double the memory the
        stream saves): then the engine holds a mix of two versions and refuses requests (WeightsLost) until
        an update succeeds. The same if the reload fails."""
        if self._source is None:
            self._lost = (
                f"a failed weight update ({err!r}) overwrote part of policy version {self._version}, which was "
                "streamed and has no checkpoint to restore: no requests are served until an update succeeds"
            )
        else:
            try:
                await self._reload(self._source)
                return
            except Exception as again:
                logger.exception("restoring the served weights from %s failed", self._source)
                self._lost = (
                    f"a failed weight update ({err!r}) overwrote part of policy version {self._version}, and "
                    f"reloading it from {str(self._source)!r} failed too ({again!r}): no requests are served "
                    "until an update succeeds"
                )
        logger.error("%s", self._lost)
        raise WeightsLost(self._lost) from err

    def _checked(self, path: str) -> tuple[CheckpointInfo, CheckpointInfo]:
        """The checkpoint at `path` if the served engine can take it in place, checked before the engine is
        touched: vLLM's reload loads whatever it is given, and a bad file left the engine dead (issue 24)."""
        if self._served is None:
            raise EngineFailure("the engine has not started")
        new = inspect_checkpoint(path)
        check_same_architecture(new, self._served)
        check_finite(new)
        return new, self._served

    async def _reload(self, path: Path) -> None:
        await self._llm.collective_rpc(
            "reload_weights", kwargs={"weights_path": str(path.resolve()), "is_checkpoint_format": True}
        )

    # --- status -----------------------------------------------------------------------------------------

    def failure(self) -> str | None:
        """Why the engine cannot serve (not started, stopped, or its core process died), or None."""
        if self._llm is None:
            return "the vLLM engine is not running"
        if self._llm.errored:
            return f"the vLLM engine died: {self._llm.dead_error}"
        return None

    def status(self) -> EngineStatus:
        s = self.stats
        return EngineStatus(
            policy_version=self._version,
            model_path=str(self._source or "") if self._served else self.settings.model_path,
            running_requests=s.running_requests,
            waiting_requests=s.waiting_requests + self._held,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
        )


__all__ = [
    "CheckpointError",
    "DuplicateRequest",
    "EngineFailure",
    "EngineSettings",
    "EngineStatus",
    "FeatureDisabled",
    "GenerationChunk",
    "InferenceEngine",
    "InvalidRequest",
    "RoutedRows",
    "StreamResult",
    "UpdateResult",
    "WeightsLost",
]
