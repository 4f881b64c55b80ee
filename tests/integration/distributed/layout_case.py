"""The training case every layout runs: the tiny preset, 5 RL steps (CISPO + MTP, prefix-merged packs,
routing replay on steps 1 and 3) on fixed batches of 8 rows, AdamW. Shared by the single-process
reference (in the test process) and each rank of layout_worker.py.

Rows never share a prefix (distinct first tokens), so a rank's packs hold exactly its rows' tokens and
the expert loads summed over ranks are the single process's loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from forgerl.distributed import ParallelConfig, ParallelMeshes, ParallelModel, apply_parallelism, build_meshes
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.moe import SparseMoeBlock
from forgerl.trainer.step import RlBatch, RlStepConfig, rl_step, shard_rows

SEED, ROWS, STEPS, VOCAB = 0, 8, 5, 512
STEP_CONFIG = RlStepConfig(
    prefix_merge=True, max_tokens_per_pack=None, mtp_loss_weight=0.0, routing_replay=True, bias_update_rate=1e-3
)


def model_config(num_mtp_modules: int = 0) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_mtp_modules=num_mtp_modules)


def build_model(num_mtp_modules: int = 0) -> MiniMaxM2ForCausalLM:
    torch.manual_seed(SEED)
    return MiniMaxM2ForCausalLM(model_config(num_mtp_modules)).train()


def parallel_model(values: dict, num_mtp_modules: int = 0) -> tuple[ParallelModel, ParallelMeshes]:
    """build_model() under the trainer.parallel layout `values`, on the initialised gloo group."""
    model = build_model(num_mtp_modules)
    layout = ParallelConfig.from_dict(values).resolve(dist.get_world_size(), model.config.num_local_experts)
    meshes = build_meshes(layout, "cpu")
    return apply_parallelism(model, meshes), meshes


def start_worker(
    parser: argparse.ArgumentParser, timeout: timedelta | None = None
) -> tuple[argparse.Namespace, dict[str, dict]]:
    """Parse a worker's arguments (plus --layouts and --out) and join the gloo group torchrun set up;
    `timeout`: how long a collective may wait for the other ranks before it fails (gloo's default: 30 min)."""
    parser.add_argument("--layouts", required=True, help='JSON: {"name": {"dp_shard": 2, "ep": 2}, ...}')
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timeout)
    return args, json.loads(args.layouts)


def write_results(results: dict, out: Path) -> None:
    """Rank 0 saves the records; every rank leaves the group, then the process, without running gloo's C++
    destructors (as the trainer's worker does: they hung or aborted a rank now and then under load). The
    workers' last call."""
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # The trainer's AdamW (loop._optimizer) at a learning rate that moves the weights visibly in 5 steps.
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)


def random_routes(g: torch.Generator, rows: int, width: int) -> torch.Tensor:
    """[rows, width, nL, K]: K distinct random experts per token and layer."""
    cfg = model_config()
    scores = torch.rand(rows, width, cfg.num_hidden_layers, cfg.num_local_experts, generator=g)
    return scores.argsort(dim=-1)[..., : cfg.num_experts_per_tok]


def batches() -> list[RlBatch]:
    g = torch.Generator().manual_seed(SEED + 1)
    out = []
    for step in range(STEPS):
        lengths = torch.randint(10, 21, (ROWS,), generator=g)
        width = int(lengths.max())
        ids = torch.randint(0, VOCAB, (ROWS, width), generator=g)
        ids[:, 0] = torch.randperm(VOCAB, generator=g)[:ROWS]  # distinct first tokens: no shared prefix
        steps = torch.arange(width - 1)
        prompt = torch.randint(3, 8, (ROWS, 1), generator=g)
        mask = (steps[None] >= prompt - 1) & (steps[None] < lengths[:, None] - 1)
        # Behaviour log-probabilities near the initial policy's (~ -ln V): ratios near 1, some clipped.
        old = -math.log(VOCAB) + 0.3 * torch.randn(ROWS, width - 1, generator=g)
        adv = torch.randn(ROWS, 1, generator=g).expand(ROWS, width - 1).contiguous()
        routed = random_routes(g, ROWS, width) if step in (1, 3) else None
        out.append(RlBatch(ids, lengths, old.float(), adv.float(), mask, routed))
    return out


def partial_route_batches(steps: int) -> list[RlBatch]:
    """batches() with routes recorded everywhere but at the last 3 positions of the odd rows: sharded
    over 2 ranks, only rank 1 has positions that fill_routes must route with a forward."""
    g = torch.Generator().manual_seed(SEED + 2)
    out = []
    for batch in batches()[:steps]:
        routed = random_routes(g, ROWS, batch.input_ids.shape[1])
        for row in range(1, ROWS, 2):
            end = int(batch.lengths[row])
            routed[row, end - 3 : end] = -1
        out.append(replace(batch, routed_experts=routed))
    return out


def step_case(kind: str) -> tuple[int, RlStepConfig, list[RlBatch]]:
    """(MTP modules, step config, batches) of test_step_collectives.py's cases: "mtp", 3 steps with 2 MTP
    modules at weight 0.3; "routes", 2 steps of partial_route_batches with routing replay."""
    if kind == "mtp":
        return 2, replace(STEP_CONFIG, mtp_loss_weight=0.3), batches()[:3]
    if kind == "routes":
        return 0, STEP_CONFIG, partial_route_batches(2)
    raise ValueError(f"step case {kind!r}: must be 'mtp' or 'routes'")


class LoadRecorder:
    """Tokens routed to each expert per MoE layer, summed over the training forwards of a step."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.current = torch.zeros(len(self.blocks), self.blocks[0].n_experts, dtype=torch.float64)
        for index, block in enumerate(self.blocks):
            block.register_forward_hook(self._hook(index))

    def _hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, _args: object, output: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                self.current[index] += output[2].detach().double()

        return hook

    def take(self) -> torch.Tensor:
        loads, self.current = self.current, torch.zeros_like(self.current)
        return loads


def run_steps(
    train_model: nn.Module,
    core: MiniMaxM2ForCausalLM,
    opt: torch.optim.Optimizer,
    steps: range = range(STEPS),
    *,
    step_config: RlStepConfig = STEP_CONFIG,
    step_batches: list[RlBatch] | None = None,
) -> dict[str, list]:
    """Per step: the loss over all ranks' tokens, the grad norm, the expert loads over all ranks, and the
    MTP loss (rl_step's metric, global) when there is one; on `step_batches` (default: batches())."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    recorder = LoadRecorder(core)
    record: dict[str, list] = {"loss": [], "grad_norm": [], "loads": [], "mtp_loss": []}
    for step, batch in enumerate(batches() if step_batches is None else step_batches):
        if step not in steps:
            continue
        mine = shard_rows(batch, rank, world) if world > 1 else batch
        metrics = rl_step(train_model, opt, mine, step_config, core=core)
        if "mtp/loss" in metrics:
            record["mtp_loss"].append(metrics["mtp/loss"])
        # rl_step scales each rank's loss by its share of the tokens: the mean over ranks is the global loss.
        loss = torch.tensor(metrics["policy/loss"], dtype=torch.float64)
        loads = recorder.take()
        if distributed:
            dist.all_reduce(loss)
            loss /= world
            dist.all_reduce(loads)
        record["loss"].append(float(loss))
        record["grad_norm"].append(metrics["grad_norm"])
        record["loads"].append(loads)
    return record
