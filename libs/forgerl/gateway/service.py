"""Episodes and their turns: what the HTTP face and the gRPC admin API of the gateway both work on.

An episode is opened by rollout (it gets a key its agent sends as API key), receives chat completions
(one at a time: a turn holds the episode's lock from matching its history until it is recorded), and is
closed by rollout, which turns the recorded turns into a Trajectory and hands it to the data pool. A turn
is recorded only once its generation finished; a refused or failed request leaves the episode as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from forgerl.datapool.topics import SCHEMA_VERSION
from forgerl.gateway.chat import ChatFormat, Message
from forgerl.gateway.errors import GatewayError
from forgerl.gateway.formats import new_parser
from forgerl.gateway.history import Base, TurnRecord, build_prompt, match_history, reply_message
from forgerl.gateway.parsing import Delta, GenerationParsing
from forgerl.gateway.requests import ChatRequest
from forgerl.gateway.routing import Route, Router, Sampling
from forgerl.v1 import trajectory_pb2

logger = logging.getLogger(__name__)

Publisher = Callable[[trajectory_pb2.Trajectory], Awaitable[None]]


class TrajectoryReleased(Exception):
    """A repeated close of an episode closed so long ago that its trajectory is no longer held."""


@dataclass(frozen=True)
class GatewaySettings:
    model_name: str = "forgerl"
    # The engine's context (prompt + generated); 0: unknown, the engine checks it.
    max_model_len: int = 0
    # max_tokens when a request sets none; 0: up to the context.
    default_max_tokens: int = 0
    return_routed_experts: bool = False
    # CloseEpisode waits this long for a turn in flight, then cancels it.
    close_wait_s: float = 30.0
    # Closed episodes remembered (their keys answer "closed"); the newest `closed_trajectories` of them keep
    # their trajectory, so a repeated CloseEpisode gets the same answer.
    closed_retention: int = 1024
    closed_trajectories: int = 16
    # An open episode with no request for this long is dropped (its agent is gone: 2,000 abandoned episodes
    # grew the gateway's memory without bound, issue 24); 0 keeps them forever.
    episode_idle_ttl_s: float = 3600.0


@dataclass
class EpisodeInfo:
    run_id: str = ""
    task_id: str = ""
    group_id: str = ""
    scaffold_version: str = ""
    strip_reasoning: bool = False
    suite: str = ""
    split: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Episode:
    id: str
    key: str
    info: EpisodeInfo
    route: Route
    started_at: Timestamp
    turns: list[TurnRecord] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    trajectory: trajectory_pb2.Trajectory | None = None
    inflight: asyncio.Task[Any] | None = None
    # Set when a closed episode lets go of its turns and trajectory (memory); the counts stay.
    released: tuple[int, int] | None = None
    # time.monotonic() of the last request; an episode idle for episode_idle_ttl_s expires (closed unpublished).
    last_active: float = field(default_factory=time.monotonic)
    expired: bool = False

    @property
    def turn_count(self) -> int:
        return self.released[0] if self.released else len(self.turns)

    @property
    def generated_tokens(self) -> int:
        if self.released:
            return self.released[1]
        return sum(len(t.generated_ids) for t in self.turns)

    def release(self) -> None:
        self.released = (len(self.turns), self.generated_tokens)
        self.turns = []
        self.trajectory = None


@dataclass
class TurnEvent:
    """One step of a generation in progress, for streaming: the parsed delta and the tokens behind it."""

    delta: Delta
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class PreparedTurn:
    episode: Episode
    request: ChatRequest
    arrival: float
    base: Base
    new: list[Message]
    messages: list[Message]
    prompt_ids: list[int]
    max_tokens: int
    completion_id: str


@dataclass
class TurnResult:
    record: TurnRecord
    finish_reason: str  # OpenAI's: stop, length, tool_calls
    completion_id: str
    parser: GenerationParsing


def _now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def openai_finish_reason(engine_reason: str, has_tool_calls: bool) -> str:
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


class GatewayCore:
    def __init__(
        self,
        fmt: ChatFormat,
        router: Router,
        settings: GatewaySettings | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self.fmt = fmt
        self.router = router
        self.settings = settings or GatewaySettings()
        self.publisher = publisher
        self.episodes: dict[str, Episode] = {}
        self.closed: OrderedDict[str, Episode] = OrderedDict()

    # --- episodes -----------------------------------------------------------------------------------

    def open_episode(self, info: EpisodeInfo) -> Episode:
        episode = Episode(
            id=uuid.uuid4().hex,
            key="fep-" + secrets.token_urlsafe(24),
            info=info,
            route=Route(),
            started_at=_now_timestamp(),
        )
        self.router.assign(episode.route)
        self.episodes[episode.key] = episode
        logger.info(
            "episode %s opened on %s (run %s, task %s)", episode.id, episode.route.replica, info.run_id, info.task_id
        )
        return episode

    def find(self, key: str) -> Episode | None:
        return self.episodes.get(key) or self.closed.get(key)

    def episode_for_request(self, key: str | None) -> Episode:
        """The open episode of an agent's key: 401 for a missing or unknown key, 403 once it is closed."""
        if not key:
            raise GatewayError(
                401,
                "no episode key: send it as the API key (Authorization: Bearer <episode_key>) or in the "
                "X-Forgerl-Episode header; rollout gets it from the gateway's OpenEpisode",
                code="missing_episode_key",
            )
        episode = self.find(key)
        if episode is None:
            raise GatewayError(
                401,
                "unknown episode key: open an episode with the gateway's OpenEpisode and use its key",
                code="invalid_episode_key",
            )
        if episode.closed:
            why = "expired (no request for a while)" if episode.expired else "closed: its trajectory is final"
            raise GatewayError(403, f"episode {episode.id} is {why}, open a new episode", code="episode_closed")
        return episode

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close, unpublished, every open episode without a request for `episode_idle_ttl_s` and no turn in
        flight; returns their ids. Their keys answer 403 "expired" while the closed episodes are remembered."""
        ttl = self.settings.episode_idle_ttl_s
        now = time.monotonic() if now is None else now
        idle = [
            (key, e)
            for key, e in self.episodes.items()
            if ttl and now - e.last_active > ttl and not e.lock.locked() and (e.inflight is None or e.inflight.done())
        ]
        for key, episode in idle:
            episode.closed = episode.expired = True
            episode.release()
            self.router.release(episode.route)
            del self.episodes[key]
            self.closed[key] = episode
        while len(self.closed) > self.settings.closed_retention:
            self.closed.popitem(last=False)
        if idle:
            logger.warning("%d episode(s) expired after %.0f s idle: %s", len(idle), ttl, [e.id for _, e in idle])
        return [e.id for _, e in idle]

    async def close_episode(
        self,
        key: str,
        *,
        step_rewards: Sequence[trajectory_pb2.StepReward] = (),
        reward: trajectory_pb2.RewardComponents | None = None,
        success: bool = False,
        wall_clock_s: float = 0.0,
        baseline_s: float = 0.0,
        publish: bool = False,
    ) -> trajectory_pb2.Trajectory:
        """The episode's trajectory; published first when asked. KeyError for an unknown key, ValueError
        for rewards that name no turn; if publishing fails the episode stays open (retry the close)."""
        episode = self.find(key)
        if episode is None:
            raise KeyError(key)
        if episode.closed:
            return self._closed_trajectory(episode)
        for reward_i in step_rewards:
            if not 0 <= reward_i.turn_index < len(episode.turns):
                raise ValueError(
                    f"step reward for turn {reward_i.turn_index}, but the episode has {len(episode.turns)} turn(s)"
                )
        try:
            await asyncio.wait_for(episode.lock.acquire(), self.settings.close_wait_s)
        except TimeoutError:
            if episode.inflight is not None:
                logger.warning("episode %s: cancelling the turn in flight to close it", episode.id)
                episode.inflight.cancel()
            await episode.lock.acquire()
        try:
            if episode.closed:
                return self._closed_trajectory(episode)
            trajectory = self.trajectory(
                episode,
                step_rewards=step_rewards,
                reward=reward,
                success=success,
                wall_clock_s=wall_clock_s,
                baseline_s=baseline_s,
            )
            if publish and self.publisher is not None:
                await self.publisher(trajectory)
            episode.closed = True
            episode.trajectory = trajectory
            self.router.release(episode.route)
            del self.episodes[key]
            self.closed[key] = episode
            while len(self.closed) > self.settings.closed_retention:
                self.closed.popitem(last=False)
            if len(self.closed) > self.settings.closed_trajectories:
                older = list(self.closed.values())[: len(self.closed) - self.settings.closed_trajectories]
                for old in reversed(older):
                    if old.released:
                        break
                    old.release()
        finally:
            episode.lock.release()
        logger.info(
            "episode %s closed: %d turns, %d generated tokens", episode.id, len(episode.turns), episode.generated_tokens
        )
        return trajectory

    @staticmethod
    def _closed_trajectory(episode: Episode) -> trajectory_pb2.Trajectory:
        if episode.expired:
            raise TrajectoryReleased(
                f"episode {episode.id} expired: no request for longer than the gateway's episode_idle_ttl_s, so "
                "it was dropped unpublished; open a new episode (or raise FORGERL_GATEWAY_EPISODE_IDLE_TTL_S)"
            )
        if episode.trajectory is None:
            raise TrajectoryReleased(
                f"episode {episode.id} was closed earlier and its trajectory is no longer held here (it went to "
                "the data pool if the close asked to publish)"
            )
        return episode.trajectory

    def trajectory(
        self,
        episode: Episode,
        *,
        step_rewards: Sequence[trajectory_pb2.StepReward] = (),
        reward: trajectory_pb2.RewardComponents | None = None,
        success: bool = False,
        wall_clock_s: float = 0.0,
        baseline_s: float = 0.0,
    ) -> trajectory_pb2.Trajectory:
        info = episode.info
        labels = dict(info.labels)
        if info.strip_reasoning:
            labels["forgerl/strip_reasoning"] = "true"
        if episode.route.moves:
            labels["forgerl/replica_moves"] = str(episode.route.moves)
        return trajectory_pb2.Trajectory(
            schema_version=SCHEMA_VERSION,
            trajectory_id=uuid.uuid4().hex,
            run_id=info.run_id,
            task_id=info.task_id,
            group_id=info.group_id,
            episode_id=episode.id,
            scaffold_version=info.scaffold_version,
            turns=[turn_proto(t) for t in episode.turns],
            step_rewards=list(step_rewards),
            reward=reward,
            success=success,
            wall_clock_s=wall_clock_s,
            baseline_s=baseline_s,
            started_at=episode.started_at,
            finished_at=_now_timestamp(),
            suite=info.suite,
            split=info.split,
            labels=labels,
        )

    # --- turns --------------------------------------------------------------------------------------

    async def prepare_turn(self, episode: Episode, request: ChatRequest, arrival: float) -> PreparedTurn:
        """Match the history and build the prompt, holding the episode's lock (released by `run_turn`,
        or here on error)."""
        await episode.lock.acquire()
        episode.last_active = time.monotonic()
        try:
            if episode.closed:
                raise GatewayError(
                    403, f"episode {episode.id} was closed while this request waited", code="episode_closed"
                )
            base, new = match_history(episode.turns, request.messages, request.tools)
            prompt_ids, messages = build_prompt(self.fmt, base, new, request.tools)
            max_tokens = request.max_tokens or self.settings.default_max_tokens
            limit = self.settings.max_model_len
            if limit:
                if len(prompt_ids) >= limit:
                    raise GatewayError(
                        400,
                        f"This model's maximum context length is {limit} tokens. However, your messages resulted "
                        f"in {len(prompt_ids)} tokens: the episode's history no longer fits, end the episode",
                        code="context_length_exceeded",
                        param="messages",
                    )
                max_tokens = min(max_tokens, limit - len(prompt_ids)) if max_tokens else 0
            return PreparedTurn(
                episode=episode,
                request=request,
                arrival=arrival,
                base=base,
                new=new,
                messages=messages,
                prompt_ids=prompt_ids,
                max_tokens=max_tokens,
                completion_id="chatcmpl-" + uuid.uuid4().hex,
            )
        except BaseException:
            episode.lock.release()
            raise

    async def run_turn(self, prepared: PreparedTurn, on_event: Callable[[TurnEvent], None] | None = None) -> TurnResult:
        """Generate, parse and record one turn; releases the episode's lock whatever happens."""
        episode, request = prepared.episode, prepared.request
        try:
            parser = new_parser(self.fmt, request.parse_tool_names, request.tools)
            sampling = Sampling(
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                max_tokens=prepared.max_tokens,
                seed=request.seed,
                stop_token_ids=self.fmt.stop_token_ids,
            )
            ids: list[int] = []
            logprobs: list[float] = []
            versions: list[int] = []
            cached = -1
            routed: list[trajectory_pb2.RoutedExperts] = []
            first_token_at: float | None = None
            engine_reason = ""
            replica = episode.route.replica
            request_id = f"{episode.id}-{len(episode.turns)}-{uuid.uuid4().hex[:6]}"
            async for chunk in self.router.generate(
                episode.route, prepared.prompt_ids, sampling, request_id, self.settings.return_routed_experts
            ):
                if chunk.token_ids and first_token_at is None:
                    first_token_at = time.perf_counter()
                chunk_logprobs = list(chunk.logprobs)
                if len(chunk_logprobs) != len(chunk.token_ids):
                    chunk_logprobs = (chunk_logprobs + [float("nan")] * len(chunk.token_ids))[: len(chunk.token_ids)]
                ids.extend(chunk.token_ids)
                logprobs.extend(chunk_logprobs)
                if chunk.policy_version:
                    versions.append(chunk.policy_version)
                if cached < 0 and (chunk.token_ids or chunk.finish_reason):
                    cached = chunk.cached_prompt_tokens
                if chunk.routed_experts is not None:
                    routed.append(chunk.routed_experts)
                replica = chunk.replica
                delta = parser.feed(chunk.token_ids)
                if chunk.finish_reason:
                    engine_reason = chunk.finish_reason
                    delta.extend(parser.finish())
                if on_event is not None:
                    on_event(TurnEvent(delta, list(chunk.token_ids), chunk_logprobs))
            if not parser.finished:
                extra = parser.finish()
                if on_event is not None and extra:
                    on_event(TurnEvent(extra, [], []))
            end = time.perf_counter()
            record = self._record(prepared, parser, ids, logprobs, engine_reason, end)
            record.policy_version = min(versions) if versions else 0
            record.cached_prompt_tokens = max(cached, 0)
            record.ttft_s = (first_token_at or end) - prepared.arrival
            record.replica = replica
            record.routed_experts = _merge_routed(routed)
            return TurnResult(
                record=record,
                finish_reason=openai_finish_reason(engine_reason, bool(parser.valid_tool_calls)),
                completion_id=prepared.completion_id,
                parser=parser,
            )
        finally:
            episode.lock.release()

    def _record(
        self,
        prepared: PreparedTurn,
        parser: GenerationParsing,
        ids: list[int],
        logprobs: list[float],
        engine_reason: str,
        end: float,
    ) -> TurnRecord:
        episode = prepared.episode
        kept = self.fmt.strip_reasoning_ids(ids) if episode.info.strip_reasoning else list(ids)
        record = TurnRecord(
            index=len(episode.turns),
            messages=prepared.messages,
            tools_key=prepared.request.tools.key,
            prompt_ids=array("i", prepared.prompt_ids),
            generation_prompt_len=len(self.fmt.generation_prompt_ids),
            generated_ids=ids,
            logprobs=logprobs,
            reply=reply_message(parser.content, parser.reasoning, parser.tool_calls),
            tool_calls=list(parser.tool_calls),
            finish_reason=engine_reason or "stop",
            generation_s=end - prepared.arrival,
            finished_at=end,
            reply_tail=kept + self.fmt.closing_ids(kept),
        )
        base = prepared.base
        if base.turn is not None and base.reply:
            earlier = base.turn
            if earlier.tool_s is None:
                earlier.tool_s = max(0.0, prepared.arrival - earlier.finished_at)
            known = {m.tool_call_id for m in earlier.tool_results if m.tool_call_id}
            for message in prepared.new:
                if message.role == "tool" and (not message.tool_call_id or message.tool_call_id not in known):
                    earlier.tool_results.append(message)
        episode.turns.append(record)
        return record


def turn_proto(t: TurnRecord) -> trajectory_pb2.Turn:
    tool_s = t.tool_s or 0.0
    return trajectory_pb2.Turn(
        prompt_token_ids=t.prompt_ids.tolist(),
        generated_token_ids=t.generated_ids,
        behaviour_logprobs=t.logprobs,
        loss_mask=[1] * len(t.generated_ids),
        policy_version=t.policy_version,
        timings=trajectory_pb2.TurnTimings(time_to_first_token_s=t.ttft_s, generation_s=t.generation_s, tool_s=tool_s),
        reasoning=t.reply.reasoning,
        content=t.reply.content,
        tool_calls=[
            trajectory_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments, malformed=c.malformed)
            for c in t.tool_calls
        ],
        tool_results=[
            trajectory_pb2.ToolResult(
                tool_call_id=m.tool_call_id,
                content=m.content,
                is_error=m.is_error,
                duration_s=m.duration_s if m.duration_s is not None else tool_s,
            )
            for m in t.tool_results
        ],
        routed_experts=t.routed_experts,
        cached_prompt_tokens=t.cached_prompt_tokens,
        finish_reason=t.finish_reason,
    )


def _merge_routed(parts: Sequence[trajectory_pb2.RoutedExperts]) -> trajectory_pb2.RoutedExperts | None:
    if not parts:
        return None
    merged = trajectory_pb2.RoutedExperts(num_layers=parts[0].num_layers, top_k=parts[0].top_k)
    for part in parts:
        merged.expert_ids.extend(part.expert_ids)
    return merged


async def cancel_quietly(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task
