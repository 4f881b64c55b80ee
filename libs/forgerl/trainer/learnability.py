"""Can a small MiniMax-M2 trained from scratch on CPU learn the tool-use suite, and does RL beat SFT?

In-process, no services: SFT on gold trajectories, then CISPO RL with in-process sampling
(forgerl.trainer.local_env); held-out greedy success after SFT and after RL. Prints one JSON object.

    python -m forgerl.trainer.learnability --init .forgerl/checkpoints/init-tiny --sft-examples 4000 \
        --sft-steps 800 --sft-schedule cosine --sft-warmup 50 --teacher-error 0.7 --eval-n 256 \
        --rl-steps 30 --rl-lr 3e-4 --rl-schedule cosine --rl-warmup 10 --rl-fresh-opt

(the setting of examples/tiny-tool-use.yaml; benchmarks/README.md "Learnability" has the results and the
ablation flags' findings). `--sft-cache FILE` keeps the SFT model for the next RL variant.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.trainer.local_env import LocalEpisodeRunner, suite_episode_specs
from forgerl.trainer.schedule import learning_rate, set_learning_rate
from forgerl.trainer.sft import SftBatches, make_examples, sft_loss_merged
from forgerl.trainer.step import RlStepConfig, build_batch, expert_bias_step, rl_step


def evaluate(model: MiniMaxM2ForCausalLM, runner: LocalEpisodeRunner, tasks: list[Any]) -> dict[str, Any]:
    """Greedy success on held-out tasks, overall and per level ("L3": level 3's success)."""
    specs = suite_episode_specs("tooluse", "test", [t.id for t in tasks])
    trajs = runner.run(model, specs, temperature=0.0)
    levels: dict[str, list[bool]] = {}
    for task, t in zip(tasks, trajs, strict=True):
        levels.setdefault(f"L{task.difficulty}", []).append(t.success)
    per_level = {k: round(sum(v) / len(v), 3) for k, v in sorted(levels.items())}
    return {"success": sum(t.success for t in trajs) / len(trajs), **per_level}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="debug")
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--tokenizer", default="")
    p.add_argument("--init", default="", help="start from this checkpoint (model and tokenizer), e.g. a run's init")
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-examples", type=int, default=2000, help="gold trajectories of the train split used")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-schedule", default="constant")
    p.add_argument("--sft-warmup", type=int, default=0)
    p.add_argument("--sft-min-lr", type=float, default=0.1, help="cosine: final rate as a fraction of --sft-lr")
    p.add_argument("--rl-schedule", default="constant")
    p.add_argument("--rl-min-lr", type=float, default=0.1)
    p.add_argument("--rl-warmup", type=int, default=0)
    p.add_argument(
        "--sft-bias",
        action="store_true",
        help="update the expert biases during SFT (the trainer's default; the example turns it off)",
    )
    p.add_argument("--rl-freeze", default="", help="comma-separated parameter-name parts not trained in RL")
    p.add_argument("--rl-fresh-opt", action="store_true", help="a new AdamW for RL (else SFT's moments carry over)")
    p.add_argument("--rl-steps", type=int, default=20)
    p.add_argument("--rl-tasks", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rl-lr", type=float, default=1e-3)
    p.add_argument("--eps-high", type=float, default=0.28)
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", default="1,2,3,4")
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--mtp-weight", type=float, default=0.0, help="RL's MTP loss weight (run config rl.mtp_loss_weight)")
    p.add_argument("--std", action="store_true", help="advantages: scale by the group's return std (GRPO)")
    p.add_argument("--bias-rate", type=float, default=-1.0, help="expert-bias update rate in RL (default: model's)")
    p.add_argument("--pos-only", action="store_true", help="train on positive advantages only (ablation)")
    p.add_argument("--override", default="{}", help="ModelConfig overrides as JSON, e.g. '{\"rope_theta\": 1e4}'.")
    p.add_argument("--sft-eval-every", type=int, default=0)
    p.add_argument("--teacher-error", type=float, default=0.0, help="SFT data from an imperfect teacher")
    p.add_argument("--sft-cache", default="", help="a file: load the SFT model and optimizer from it, or save them")
    p.add_argument("--save", default="", help="a directory: save the model after RL there (HF format, with tokenizer)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from forgerl.model.tokenizer import load_tokenizer, train_tokenizer
    from forgerl.rollout.suites.tooluse import gold_trajectories

    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(vocab_size=4096)
    overrides: dict[str, Any] = {}
    if args.hidden:
        overrides.update(hidden_size=args.hidden, intermediate_size=args.hidden)
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    overrides.update(json.loads(args.override))
    cfg = ModelConfig.from_preset(args.preset, vocab_size=len(tok), **overrides)
    model = MiniMaxM2ForCausalLM(cfg)
    if args.init:
        from forgerl.model import load_checkpoint

        tok = load_tokenizer(args.init)
        model = load_checkpoint(args.init, dtype=torch.float32, strict=False)
        cfg = model.config
    levels = {int(x) for x in args.levels.split(",")}
    gold = gold_trajectories("train", teacher_error_rate=args.teacher_error)
    items = [it for it in itertools.islice(gold, 4000) if it["difficulty"] in levels]
    examples = make_examples(tok, items[: args.sft_examples])
    batches = SftBatches(examples, args.sft_batch, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    from forgerl.rollout.tasks import get_suite

    test_tasks = [t for t in get_suite("tooluse").tasks("test") if t.difficulty in levels][: args.eval_n]
    train_tasks = [t for t in get_suite("tooluse").tasks("train") if t.difficulty in levels]
    result: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "config": vars(args)}
    log: list[dict[str, Any]] = []
    runner = LocalEpisodeRunner(tok, max_new_tokens=args.max_new_tokens)
    t0 = time.time()
    cached = bool(args.sft_cache) and Path(args.sft_cache).exists()
    if cached:
        blob = torch.load(args.sft_cache, weights_only=False)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
    for step in range(0 if cached else args.sft_steps):
        lr = learning_rate(step, args.sft_steps, args.sft_lr, args.sft_schedule, args.sft_warmup, args.sft_min_lr)
        set_learning_rate(opt, lr)
        loss, m = sft_loss_merged(model, batches.batch(step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.sft_bias:
            expert_bias_step(model, cfg.bias_update_rate)
        if step % 20 == 0 or step == args.sft_steps - 1:
            print(f"sft {step} loss {m['sft/loss']:.3f} t {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if args.sft_eval_every and (step + 1) % args.sft_eval_every == 0 and step + 1 < args.sft_steps:
            success = evaluate(model, runner, test_tasks)
            log.append({"sft_step": step + 1, "heldout": success})
            print(f"sft {step + 1} held-out {json.dumps(success)}", file=sys.stderr, flush=True)
    result["sft_time_s"] = time.time() - t0
    if args.sft_cache and not cached:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.sft_cache)
    t1 = time.time()
    result["sft_heldout"] = evaluate(model, runner, test_tasks)
    result["eval_time_s"] = time.time() - t1
    print(f"SFT held-out {json.dumps(result['sft_heldout'])} (eval {result['eval_time_s']:.0f}s)", file=sys.stderr)
    bias_rate = cfg.bias_update_rate if args.bias_rate < 0 else args.bias_rate
    rl_cfg = RlStepConfig(
        eps_high=args.eps_high,
        prefix_merge=not args.no_merge,
        bias_update_rate=bias_rate,
        mtp_loss_weight=args.mtp_weight,
    )
    frozen = [part for part in args.rl_freeze.split(",") if part]
    for name, param in model.named_parameters():
        param.requires_grad_(not any(part in name for part in frozen))
    if args.rl_fresh_opt:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=args.rl_lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t2 = time.time()
    for step in range(args.rl_steps):
        set_learning_rate(
            opt, learning_rate(step, args.rl_steps, args.rl_lr, args.rl_schedule, args.rl_warmup, args.rl_min_lr)
        )
        tasks = rng.sample(train_tasks, args.rl_tasks)
        specs = suite_episode_specs("tooluse", "train", [t.id for t in tasks], group_size=args.group)
        ts = time.time()
        trajs = runner.run(model, specs, temperature=1.0, generator=gen)
        sample_s = time.time() - ts
        batch = build_batch(trajs, gamma=1.0, policy_version=0, normalize_std=args.std)
        if args.pos_only:
            batch.advantages.clamp_(min=0.0)
        m = rl_step(model, opt, batch, rl_cfg)
        entry: dict[str, Any] = {
            "step": step,
            "reward": m["reward/mean"],
            "success": m["success_rate"],
            "entropy": m.get("entropy", 0.0),
            "clip": m.get("clip_frac", 0.0),
            "sample_s": sample_s,
            "train_s": m["step_time_s"],
        }
        if (step + 1) % args.eval_every == 0:
            entry["heldout"] = evaluate(model, runner, test_tasks)
        log.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    result["rl_time_s"] = time.time() - t2
    result["rl_heldout"] = evaluate(model, runner, test_tasks)
    result["log"] = log
    if args.save:
        from forgerl.model import save_checkpoint

        save_checkpoint(model, tok, Path(args.save))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    return result


if __name__ == "__main__":
    main()
