"""Routing replay end to end: vLLM's CPU engine generates two turns with route capture, the trainer builds
its batch from the trajectory (`build_batch`, `fill_routes`, as `rl_step` does) and replays the routes.

vLLM records with generated token j the routing of the forward that sampled it, that of input position
p - 1 + j (p: the first generated token's position), so the replayed routes must equal the trainer's own
routing of the same tokens (as sets of experts) at every position, prompt and generated, and the
replayed forward must compute the same log-probabilities. A deliberately moved route changes the
output, so the forward does use the replayed routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from forgerl.inference.engine import EngineSettings, InferenceEngine
from forgerl.inference.requests import GenerationRequest, Sampling
from forgerl.inference.testing import make_checkpoint
from forgerl.model import MiniMaxM2ForCausalLM, load_checkpoint
from forgerl.rl.prefix_merge import forward_merged, forward_unmerged
from forgerl.rl.prefix_tree import PrefixForest
from forgerl.trainer.step import RlBatch, build_batch, fill_routes
from forgerl.v1 import trajectory_pb2

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Longer than one KV block (128 tokens on CPU, vllm/platforms/cpu.py): the second turn reuses a cached block.
PROMPT = [(7 * i + 3) % 4096 for i in range(150)]
GENERATED = 9
ENGINE = {"max_model_len": 512, "kv_cache_bytes": 32 * 1024 * 1024, "executor": "uni"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1", "debug", seed=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(checkpoint: Path) -> AsyncIterator[InferenceEngine]:
    engine = InferenceEngine(EngineSettings(model_path=str(checkpoint), routing_replay=True, **ENGINE))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def _turn(engine: InferenceEngine, rid: str, prompt: list[int]) -> tuple[trajectory_pb2.Turn, int]:
    """One sampled generation with its routes, recorded as the gateway records a turn; and how many
    prompt tokens the engine's prefix cache served."""
    request = GenerationRequest(
        rid, tuple(prompt), Sampling(temperature=1.0, max_tokens=GENERATED, seed=7), return_routed_experts=True
    )
    turn = trajectory_pb2.Turn(prompt_token_ids=prompt, policy_version=1)
    cached = 0
    async for chunk in engine.generate(request):
        cached = max(cached, chunk.cached_prompt_tokens)
        turn.generated_token_ids.extend(chunk.token_ids)
        turn.behaviour_logprobs.extend(chunk.logprobs)
        if chunk.routed_experts is not None:
            rows = chunk.routed_experts
            turn.routed_experts.num_layers = rows.num_layers
            turn.routed_experts.top_k = rows.top_k
            turn.routed_experts.expert_ids.extend(rows.expert_ids.reshape(-1).astype(int).tolist())
    turn.loss_mask.extend([1] * len(turn.generated_token_ids))
    return turn, cached


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def batch_and_model(engine: InferenceEngine, checkpoint: Path) -> tuple[RlBatch, MiniMaxM2ForCausalLM]:
    """Two turns of one episode (the second's prompt holds the first turn, served from the prefix cache)
    and a second episode of the same task: the batch's rows share prefixes, as in training."""
    traj = trajectory_pb2.Trajectory(trajectory_id="e0", group_id="g", task_id="g")
    first, _ = await _turn(engine, "e0-0", PROMPT)
    second, cached = await _turn(engine, "e0-1", [*PROMPT, *first.generated_token_ids, 11, 12, 13])
    assert cached > 0  # the second turn's prompt came partly from the prefix cache
    traj.turns.extend([first, second])
    other = trajectory_pb2.Trajectory(trajectory_id="e1", group_id="g", task_id="g")
    other.turns.append((await _turn(engine, "e1-0", PROMPT))[0])
    for t, reward in ((traj, 1.0), (other, 0.0)):
        t.reward.total = reward
        assert all(len(turn.generated_token_ids) == GENERATED for turn in t.turns)
    model = load_checkpoint(checkpoint, dtype=torch.float32).eval()
    cfg = model.config
    batch = build_batch(
        [traj, other], gamma=1.0, policy_version=1, num_layers=cfg.num_hidden_layers, top_k=cfg.num_experts_per_tok
    )
    return batch, model


def _sorted(routes: torch.Tensor) -> torch.Tensor:
    return routes.sort(dim=-1).values


def _prompt_lengths(batch: RlBatch) -> list[int]:
    return [int(batch.lengths[row]) - GENERATED for row in range(batch.input_ids.shape[0])]


async def test_recorded_routes_are_the_trainers_routing_of_the_same_positions(
    batch_and_model: tuple[RlBatch, MiniMaxM2ForCausalLM],
) -> None:
    batch, model = batch_and_model
    assert batch.routed_experts is not None
    with torch.no_grad():
        own = model(batch.input_ids).routed_experts  # [B, L, nL, K]
    recorded = batch.routed_experts[..., 0, 0] >= 0
    for row, p in enumerate(_prompt_lengths(batch)):
        # The last prompt token and every generated token but the last (never fed to the engine).
        assert recorded[row].nonzero().flatten().tolist() == list(range(p - 1, p - 1 + GENERATED))
        vllm_rows = batch.routed_experts[row, p - 1 : p - 1 + GENERATED]
        assert torch.equal(_sorted(vllm_rows), _sorted(own[row, p - 1 : p - 1 + GENERATED])), row
        # One position later, where build_batch used to put them, they disagree: the test can fail.
        assert not torch.equal(_sorted(vllm_rows), _sorted(own[row, p : p + GENERATED])), row


async def test_replayed_routes_equal_the_trainers_own_everywhere_and_are_used(
    batch_and_model: tuple[RlBatch, MiniMaxM2ForCausalLM],
) -> None:
    batch, model = batch_and_model
    routes = fill_routes(model, batch)
    assert routes is not None and bool((routes >= 0).all())
    with torch.no_grad():
        own = model(batch.input_ids).routed_experts
        for row, length in enumerate(batch.lengths.tolist()):
            assert torch.equal(_sorted(routes[row, :length]), _sorted(own[row, :length])), row
        plain = forward_unmerged(model, batch.input_ids, batch.lengths)
        replayed = forward_unmerged(model, batch.input_ids, batch.lengths, routed_experts=routes)
        merged = forward_merged(model, PrefixForest.build(batch.input_ids, batch.lengths), routed_experts=routes)
        torch.testing.assert_close(replayed.logprobs, plain.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged.logprobs, plain.logprobs, rtol=0, atol=1e-5)

        # Move one route of row 0's third generated token (layer 0) to an expert it did not choose.
        p = _prompt_lengths(batch)[0]
        position = p + 2
        moved = routes.clone()
        chosen = set(moved[0, position, 0].tolist())
        moved[0, position, 0, 0] = next(e for e in range(model.config.num_local_experts) if e not in chosen)
        changed = forward_unmerged(model, batch.input_ids, batch.lengths, routed_experts=moved)
    diff = (changed.logprobs[0] - replayed.logprobs[0]).abs()
    assert float(diff[:position].max()) < 1e-6  # causal: earlier positions keep their output
    assert float(diff[position]) > 1e-4  # the moved route's own output changes
