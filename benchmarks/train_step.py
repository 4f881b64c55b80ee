"""The trainer's RL step with prefix merging on and off, on the same batches (JSON).

A batch is shaped like the run's: `--tasks` tool-use tasks x `--group` episodes, two turns each (tool call,
then answer), rendered with the chat template and the default tokenizer. Group members share the system
prompt, the tool signatures and the question; sampling makes them diverge, simulated here by replacing
the generated tokens of each member from a random point on (seeded). The same batch goes through
`forgerl.trainer.step.rl_step` (build rows -> forward -> CISPO -> backward -> AdamW -> expert bias) with
`prefix_merge` on and off, alternating, from the same weights each time; medians of wall time and
process CPU time are reported with the tokens before and after merging.

Run: `python benchmarks/train_step.py [--tasks 8] [--group 8] [--repeats 5] [--preset tiny]`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.trainer.sft import make_example
from forgerl.trainer.step import RlStepConfig, build_batch, rl_step
from forgerl.v1 import trajectory_pb2


def _episodes(tokenizer: Any, tasks: int, group: int, seed: int) -> list[trajectory_pb2.Trajectory]:
    from forgerl.rollout.suites.tooluse import gold_trajectories

    rng = random.Random(seed)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab = len(tokenizer)
    out = []
    for t, item in enumerate(itertools.islice(gold_trajectories("train"), tasks)):
        example = make_example(tokenizer, item["messages"], item["tools"])
        ids, mask = list(example.input_ids), list(example.loss_mask)
        # Assistant spans (runs of mask == 1) are the generated parts of turns 1 and 2.
        spans, start = [], None
        for i, m in enumerate([*mask, 0]):
            if m and start is None:
                start = i
            if not m and start is not None:
                spans.append((start, i))
                start = None
        for g in range(group):
            traj = trajectory_pb2.Trajectory(trajectory_id=f"{t}-{g}", task_id=str(t), group_id=str(t))
            history = list(ids)
            for s, e in spans:
                gen = history[s:e]
                cut = rng.randrange(len(gen))  # diverge from here on, as sampling would
                gen = gen[:cut] + [rng.randrange(300, vocab) for _ in range(len(gen) - cut - 1)] + [im_end]
                history[s:e] = gen
                traj.turns.add(
                    prompt_token_ids=history[:s],
                    generated_token_ids=gen,
                    behaviour_logprobs=[-rng.random() for _ in gen],
                    loss_mask=[1] * len(gen),
                )
            traj.reward.total = float(rng.random() < 0.5)
            traj.step_rewards.add(turn_index=len(spans) - 1).components.total = traj.reward.total
            out.append(traj)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from forgerl.model.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(vocab_size=4096)
    torch.manual_seed(args.seed)
    base = MiniMaxM2ForCausalLM(ModelConfig.from_preset(args.preset, vocab_size=len(tokenizer)))
    batch = build_batch(_episodes(tokenizer, args.tasks, args.group, args.seed), gamma=1.0, policy_version=0)
    results: dict[bool, dict[str, list[float]]] = {True: {"wall": [], "cpu": []}, False: {"wall": [], "cpu": []}}
    tokens: dict[bool, dict[str, float]] = {}
    losses: dict[bool, float] = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for merge in (True, False):
            model = copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            cfg = RlStepConfig(prefix_merge=merge, max_tokens_per_pack=None)
            wall, cpu = time.perf_counter(), time.process_time()
            metrics = rl_step(model, opt, batch, cfg)
            results[merge]["wall"].append(time.perf_counter() - wall)
            results[merge]["cpu"].append(time.process_time() - cpu)
            tokens[merge] = {k: metrics[k] for k in ("tokens/input", "tokens/packed", "tokens/merged")}
            losses[merge] = metrics["policy/loss"]
    for merge in (True, False):
        for key in ("wall", "cpu"):
            results[merge][key] = results[merge][key][1:]
    on, off = results[True], results[False]
    report = {
        "benchmark": "train_step",
        "preset": args.preset,
        "trajectories": args.tasks * args.group,
        "rows": int(batch.input_ids.shape[0]),
        "tokens_input": tokens[True]["tokens/input"],
        "tokens_packed_merged": tokens[True]["tokens/packed"],
        "tokens_padded_unmerged": tokens[False]["tokens/packed"],
        "token_ratio": tokens[True]["tokens/input"] / tokens[True]["tokens/packed"],
        "merge_on": {"wall_s_median": statistics.median(on["wall"]), "cpu_s_median": statistics.median(on["cpu"])},
        "merge_off": {"wall_s_median": statistics.median(off["wall"]), "cpu_s_median": statistics.median(off["cpu"])},
        "speedup_wall": statistics.median(off["wall"]) / statistics.median(on["wall"]),
        "speedup_cpu": statistics.median(off["cpu"]) / statistics.median(on["cpu"]),
        "loss_merge_on": losses[True],
        "loss_merge_off": losses[False],
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
