"""Policy-model training step: forward + backward tokens/s of forgerl.model next to transformers'
MiniMaxM2ForCausalLM on the same weights (loaded from our checkpoint), on CPU. Prints one JSON object.

    python benchmarks/model_step.py [--presets debug small] [--batch 4] [--seq-len 256] [--repeats 7]
                                    [--threads N] [--out FILE]

Each step is logits -> next-token cross-entropy -> backward (no optimizer: it is the same for both). The
two implementations alternate step by step, so that load from other processes hits both alike, after
two warm-up steps each; the median step time is reported. transformers runs its defaults (SDPA attention,
the grouped_mm experts kernel). ratio = ours / transformers tokens/s (target >= 1). The logits of the
first batch are compared too (max_abs_logit_diff), to show that both compute the same function.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint


def step_fn(forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], ids: torch.Tensor) -> float:
    """Seconds for one forward + next-token loss + backward."""
    start = time.perf_counter()
    logits = forward(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - start


def bench_preset(preset: str, batch: int, seq_len: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, num_mtp_modules=0)  # transformers has no MTP: compare like for like
    ours = MiniMaxM2ForCausalLM(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(ours, None, tmp)
        theirs = transformers.MiniMaxM2ForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logit_diff = (ours(ids).logits - theirs(ids, use_cache=False).logits).abs().max().item()

    runners = {
        "ours": (lambda x: ours(x).logits, list(ours.parameters())),
        "transformers": (lambda x: theirs(x, use_cache=False).logits, list(theirs.parameters())),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats + 2):
        for name, (forward, params) in runners.items():
            seconds = step_fn(forward, params, ids)
            if i >= 2:
                times[name].append(seconds)
    tokens = batch * seq_len
    rate = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    return {
        "preset": preset,
        "batch": batch,
        "seq_len": seq_len,
        "params": sum(p.numel() for p in ours.parameters()),
        "ours_tokens_per_s": round(rate["ours"], 1),
        "transformers_tokens_per_s": round(rate["transformers"], 1),
        "ratio": round(rate["ours"] / rate["transformers"], 3),
        "ours_step_ms": [round(1e3 * t, 2) for t in times["ours"]],
        "transformers_step_ms": [round(1e3 * t, 2) for t in times["transformers"]],
        "max_abs_logit_diff": logit_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["debug", "small"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "model_step",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": [bench_preset(p, args.batch, args.seq_len, args.repeats) for p in args.presets],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
