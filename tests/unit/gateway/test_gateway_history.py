"""Token-exact histories, restored and stripped reasoning, and histories that contradict the record."""

from __future__ import annotations

import time
from typing import Any

import pytest
from gateway_helpers import CALC_TOOL

from forgerl.gateway.chat import Tools
from forgerl.gateway.errors import GatewayError
from forgerl.gateway.requests import parse_chat_request
from forgerl.gateway.service import EpisodeInfo, GatewayCore, TurnResult

pytestmark = pytest.mark.unit

SYSTEM = {"role": "system", "content": "You are a careful agent."}
USER = {"role": "user", "content": "What is 12 + 7?"}


async def turn(core: GatewayCore, episode, messages: list[dict[str, Any]], **body: Any) -> TurnResult:
    request = parse_chat_request({"messages": messages, **body}, "forgerl")
    prepared = await core.prepare_turn(episode, request, time.perf_counter())
    return await core.run_turn(prepared)


def reply(result: TurnResult, *, reasoning: bool = False) -> dict[str, Any]:
    """The assistant message as an OpenAI client sends it back (without reasoning_content by default)."""
    calls = result.parser.valid_tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": result.parser.content or None}
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    if reasoning:
        message["reasoning_content"] = result.parser.reasoning
    return message


def fresh(tokenizer, messages, tools=None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"])


async def test_two_turns_are_token_exact_and_reasoning_is_restored(harness, fmt, gen, tokenizer) -> None:
    h = harness()
    first = gen(content="Let me compute.", reasoning="Use the tool.", calls=(("calculator", '{"expression": "12+7"}'),))
    second = gen(content="It is 19.", reasoning="The tool said 19.")
    h.server.add(first, second)
    episode = h.core.open_episode(EpisodeInfo(run_id="r"))
    r1 = await turn(h.core, episode, [SYSTEM, USER], tools=[CALC_TOOL])
    assert r1.finish_reason == "tool_calls" and r1.record.generated_ids == first
    call = r1.parser.valid_tool_calls[0]
    tool_message = {"role": "tool", "tool_call_id": call.id, "content": "19"}
    history = [SYSTEM, USER, reply(r1), tool_message]  # the agent dropped reasoning_content
    r2 = await turn(h.core, episode, history, tools=[CALC_TOOL])

    prompt2 = list(r2.record.prompt_ids)
    expected = [
        *r1.record.prompt_ids,
        *first,
        *fmt.encode("\n"),
        *fmt.suffix_ids(r2.record.messages[:-1], r2.record.messages[-1:], Tools.parse([CALC_TOOL])),
    ]
    assert prompt2 == expected
    assert fmt.decode(first) in fmt.decode(prompt2)  # the reasoning is back in the prompt
    assert "Use the tool." in fmt.decode(prompt2)
    # ... and equals a fresh rendering of the history with the reasoning put back
    restored = [SYSTEM, USER, {**reply(r1), "reasoning_content": "Use the tool."}, tool_message]
    assert prompt2 == fresh(tokenizer, restored, [CALC_TOOL])
    # what the engine saw is what was recorded
    assert [entry.prompt_token_ids for entry in h.server.log] == [list(r1.record.prompt_ids), prompt2]
    assert [entry.generated for entry in h.server.log] == [first, second]

    trajectory = await h.core.close_episode(episode.key)
    t0, t1 = trajectory.turns
    assert list(t0.generated_token_ids) == first and list(t1.prompt_token_ids) == prompt2
    assert list(t0.loss_mask) == [1] * len(first) and len(t0.behaviour_logprobs) == len(first)
    assert t0.tool_results[0].tool_call_id == call.id and t0.tool_results[0].content == "19"
    assert t0.timings.tool_s > 0 and t1.timings.time_to_first_token_s > 0
    assert t0.reasoning == "Use the tool." and t0.tool_calls[0].name == "calculator"
    assert t1.cached_prompt_tokens == len(t0.prompt_token_ids)  # the scripted engine's prefix cache


async def test_strip_reasoning_removes_earlier_reasoning(harness, fmt, gen, tokenizer) -> None:
    h = harness()
    first = gen(content="Four.", reasoning="secret plan")
    h.server.add(first, gen(content="Eight.", reasoning="again"))
    episode = h.core.open_episode(EpisodeInfo(run_id="r", strip_reasoning=True))
    r1 = await turn(h.core, episode, [USER])
    history = [USER, reply(r1, reasoning=True), {"role": "user", "content": "Double it."}]
    r2 = await turn(h.core, episode, history)
    text = fmt.decode(list(r2.record.prompt_ids))
    assert "secret plan" not in text and "<think>" not in text
    assert list(r2.record.prompt_ids) == fresh(tokenizer, [USER, {"role": "assistant", "content": "Four."}, history[2]])
    assert r1.record.generated_ids == first  # the recorded generation keeps its reasoning
    assert (await h.core.close_episode(episode.key)).labels["forgerl/strip_reasoning"] == "true"


async def test_a_dropped_reply_continues_from_the_prompt(harness, fmt, gen) -> None:
    """An agent that discards a reply (e.g. a format error) sends its history without it."""
    h = harness()
    h.server.add(gen(content="garbage"), gen(content="better"))
    episode = h.core.open_episode(EpisodeInfo())
    r1 = await turn(h.core, episode, [USER])
    feedback = {"role": "user", "content": "Format error: call a tool."}
    r2 = await turn(h.core, episode, [USER, feedback])
    head = list(r1.record.prompt_ids)[: -len(fmt.generation_prompt_ids)]
    assert list(r2.record.prompt_ids) == head + fmt.suffix_ids(r2.record.messages[:-1], r2.record.messages[-1:])
    assert len(episode.turns) == 2


async def test_a_retried_request_gets_the_same_prompt(harness, gen) -> None:
    h = harness()
    h.server.add(gen(content="a"), gen(content="b"))
    episode = h.core.open_episode(EpisodeInfo())
    r1 = await turn(h.core, episode, [SYSTEM, USER])
    r2 = await turn(h.core, episode, [SYSTEM, USER])
    assert list(r1.record.prompt_ids) == list(r2.record.prompt_ids)


@pytest.mark.parametrize(
    ("edit", "index", "fragment"),
    [
        (lambda h: [SYSTEM, {"role": "user", "content": "What is 12 + 8?"}, *h[2:]], 1, "content"),
        (lambda h: [SYSTEM, USER, {**h[2], "content": "I changed my mind."}, h[3]], 2, "differs from what the model"),
        (lambda h: [SYSTEM, USER, {**h[2], "reasoning_content": "other reasoning"}, h[3]], 2, "reasoning_content"),
        (
            lambda h: [
                SYSTEM,
                USER,
                {
                    **h[2],
                    "tool_calls": [
                        {
                            **h[2]["tool_calls"][0],
                            "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'},
                        }
                    ],
                },
                h[3],
            ],
            2,
            "arguments",
        ),
        (lambda h: [SYSTEM, USER, {"role": "assistant", "content": "invented"}, *h[2:]], 2, "differs"),
        (lambda h: [SYSTEM], 1, "shorter"),
        (lambda h: [{"role": "system", "content": "Another system prompt."}, *h[1:]], 0, "content"),
    ],
)
async def test_contradicting_histories_are_400_and_lose_nothing(harness, gen, edit, index, fragment) -> None:
    h = harness()
    h.server.add(gen(content="Let me compute.", reasoning="r", calls=(("calculator", '{"expression": "12+7"}'),)))
    episode = h.core.open_episode(EpisodeInfo())
    r1 = await turn(h.core, episode, [SYSTEM, USER], tools=[CALC_TOOL])
    history = [
        SYSTEM,
        USER,
        reply(r1),
        {"role": "tool", "tool_call_id": r1.parser.valid_tool_calls[0].id, "content": "19"},
    ]
    with pytest.raises(GatewayError) as err:
        await turn(h.core, episode, edit(history), tools=[CALC_TOOL])
    assert err.value.status == 400 and err.value.code == "history_mismatch"
    assert err.value.param == f"messages[{index}]" and fragment in err.value.message
    assert len(episode.turns) == 1 and not episode.lock.locked()
    assert episode.turns[0].tool_results == [] and episode.turns[0].tool_s is None
    h.server.add(gen(content="19."))  # the episode goes on where it was
    r2 = await turn(h.core, episode, history, tools=[CALC_TOOL])
    assert r2.record.index == 1


async def test_changed_tools_contradict_the_history(harness, gen) -> None:
    h = harness()
    h.server.add(gen(content="hi"))
    episode = h.core.open_episode(EpisodeInfo())
    r1 = await turn(h.core, episode, [USER], tools=[CALC_TOOL])
    with pytest.raises(GatewayError, match="tools differ"):
        await turn(h.core, episode, [USER, reply(r1), {"role": "user", "content": "more"}])


async def test_first_turn_may_carry_example_assistant_messages(harness, gen, fmt, tokenizer) -> None:
    h = harness()
    h.server.add(gen(content="ok"))
    episode = h.core.open_episode(EpisodeInfo())
    few_shot = [USER, {"role": "assistant", "content": "19"}, {"role": "user", "content": "2+2?"}]
    r1 = await turn(h.core, episode, few_shot)
    assert list(r1.record.prompt_ids) == fresh(tokenizer, few_shot)


async def test_context_limit_and_max_tokens_clamp(harness, gen, fmt) -> None:
    from forgerl.gateway.service import GatewaySettings

    h = harness(settings=GatewaySettings(max_model_len=64))
    episode = h.core.open_episode(EpisodeInfo())
    with pytest.raises(GatewayError) as err:
        await turn(h.core, episode, [{"role": "user", "content": "word " * 100}])
    assert err.value.code == "context_length_exceeded" and "maximum context length is 64" in err.value.message
    h.server.add(gen(content="a " * 100))
    r = await turn(h.core, episode, [USER], max_tokens=1000)
    assert h.server.log[-1].max_tokens == 64 - len(r.record.prompt_ids)
    assert r.finish_reason == "length" and len(r.record.generated_ids) == h.server.log[-1].max_tokens


async def test_a_truncated_turn_is_closed_in_the_next_prompt(harness, gen, fmt) -> None:
    h = harness()
    h.server.add(gen(content="one two three four five six"), gen(content="ok"))
    episode = h.core.open_episode(EpisodeInfo())
    r1 = await turn(h.core, episode, [USER], max_tokens=3)
    assert r1.finish_reason == "length" and len(r1.record.generated_ids) == 3
    r2 = await turn(h.core, episode, [USER, reply(r1), {"role": "user", "content": "go on"}])
    prompt = list(r2.record.prompt_ids)
    n = len(r1.record.prompt_ids)
    assert prompt[n : n + 3] == r1.record.generated_ids
    assert fmt.decode(prompt[n + 3 : n + 5]) == "<|im_end|>\n"


async def test_close_is_idempotent_and_closed_keys_are_refused(harness, gen) -> None:
    h = harness()
    h.server.add(gen(content="a"))
    episode = h.core.open_episode(EpisodeInfo(run_id="r", labels={"k": "v"}))
    await turn(h.core, episode, [USER])
    with pytest.raises(ValueError, match="turn 5"):
        from forgerl.v1 import trajectory_pb2

        await h.core.close_episode(episode.key, step_rewards=[trajectory_pb2.StepReward(turn_index=5)])
    t1 = await h.core.close_episode(episode.key, success=True)
    t2 = await h.core.close_episode(episode.key)
    assert t1 == t2 and t1.success and t1.labels["k"] == "v" and t1.schema_version == 1
    with pytest.raises(GatewayError) as err:
        h.core.episode_for_request(episode.key)
    assert err.value.status == 403
    with pytest.raises(GatewayError) as err:
        h.core.episode_for_request("fep-unknown")
    assert err.value.status == 401
    assert h.router.replicas["replica-0"].episodes == 0


async def test_failed_publish_keeps_the_episode_open(harness, gen) -> None:
    h = harness()
    h.server.add(gen(content="a"))
    calls = []

    async def publish(trajectory) -> None:
        calls.append(trajectory)
        if len(calls) == 1:
            raise RuntimeError("data pool down")

    h.core.publisher = publish
    episode = h.core.open_episode(EpisodeInfo(run_id="r"))
    await turn(h.core, episode, [USER])
    with pytest.raises(RuntimeError):
        await h.core.close_episode(episode.key, publish=True)
    assert not episode.closed and len(episode.turns) == 1
    trajectory = await h.core.close_episode(episode.key, publish=True)
    assert episode.closed and len(calls) == 2 and len(trajectory.turns) == 1


async def test_old_closed_episodes_let_go_of_their_trajectories(harness, gen) -> None:
    from forgerl.gateway.service import GatewaySettings, TrajectoryReleased

    h = harness(settings=GatewaySettings(closed_trajectories=1, closed_retention=2))
    episodes = []
    for _ in range(3):
        h.server.add(gen(content="a"))
        episode = h.core.open_episode(EpisodeInfo())
        await turn(h.core, episode, [USER])
        await h.core.close_episode(episode.key)
        episodes.append(episode)
    assert h.core.find(episodes[0].key) is None  # forgotten: past closed_retention
    assert episodes[1].turns == [] and episodes[1].turn_count == 1 and episodes[1].generated_tokens == 2
    with pytest.raises(TrajectoryReleased):
        await h.core.close_episode(episodes[1].key)
    assert len((await h.core.close_episode(episodes[2].key)).turns) == 1
