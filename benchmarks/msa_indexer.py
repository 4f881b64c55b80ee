"""Training M3's lightning indexer with its own objective (forgerl.model.m3_indexer_training) on CPU.

A tiny M3 (3 layers, width 64; layers 1-2 with the indexer, blocks of 4 keys, 4 kept of 16 at 64 tokens)
learns byte-level language modelling on the project's built-in corpus (the standard-library sources of
forgerl.model.corpus), with the indexers' KL added to the LM loss (it reaches the indexers only):
a dense warm-up stage (attention dense), then a sparse stage (attention on the kept blocks). Every
`--eval-every` steps, on held-out text: the indexers' recall of the dense attention's heaviest blocks (the
top-N blocks by attention mass, over queries that drop blocks). At the end: held-out LM loss with dense
attention, with the trained indexer's sparse attention, and with a fresh (untrained) indexer's.

Run: python benchmarks/msa_indexer.py [--dense-steps 200 --sparse-steps 100]; prints one JSON object last.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

from forgerl.model.corpus import stdlib_sources
from forgerl.model.m3 import MiniMaxM3ForCausalLM
from forgerl.model.m3_config import M3Config


def byte_batches(seq_len: int, batch: int, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out windows [N, seq_len] of corpus bytes; held-out windows come from the last module."""
    sources = list(stdlib_sources())
    train_bytes = torch.tensor(list("\n".join(sources[:-1]).encode()), dtype=torch.long)
    held_bytes = torch.tensor(list(sources[-1].encode()), dtype=torch.long)
    train = train_bytes[: len(train_bytes) // seq_len * seq_len].view(-1, seq_len)
    held = held_bytes[: held_out * seq_len].view(-1, seq_len)
    if held.shape[0] < held_out:
        raise ValueError(f"the held-out module has {held.shape[0]} windows of {seq_len} bytes; asked {held_out}")
    return train, held


def lm_loss(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), ids_BT[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: MiniMaxM3ForCausalLM, held: torch.Tensor) -> dict[str, float]:
    """Held-out recall (from a dense-stage forward), LM loss with dense and with sparse attention."""
    model.eval()
    dense = model(held, indexer_stage="dense")
    sparse = model(held)
    model.train()
    assert dense.indexer_recall is not None
    return {
        "recall": round(dense.indexer_recall.item(), 4),
        "dense_loss": round(lm_loss(dense.logits, held).item(), 4),
        "sparse_loss": round(lm_loss(sparse.logits, held).item(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-steps", type=int, default=200)
    parser.add_argument("--sparse-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = M3Config.from_preset("minimax-m3-tiny", vocab_size=256, index_topk_blocks=4, max_position_embeddings=256)
    model = MiniMaxM3ForCausalLM(cfg).train()
    fresh_indexer = copy.deepcopy(model)  # its indexers keep their initial weights
    train, held = byte_batches(args.seq_len, args.batch, held_out=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    order = torch.randperm(train.shape[0])
    curve: list[dict[str, float | int | str]] = []
    start = time.monotonic()
    total = args.dense_steps + args.sparse_steps
    for step in itertools.count():
        if step % args.eval_every == 0 or step == total:
            stage = "dense" if step < args.dense_steps else "sparse"
            curve.append({"step": step, "stage": stage, **evaluate(model, held)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
        if step == total:
            break
        stage = "dense" if step < args.dense_steps else "sparse"
        ids = train[order[(step * args.batch) % len(order) :][: args.batch]]
        out = model(ids, indexer_stage=stage)
        assert out.indexer_loss is not None
        loss = lm_loss(out.logits, ids) + out.indexer_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The same trunk with the untrained indexers: what the sparse loss would be without the objective.
    fresh_state = {k: v for k, v in fresh_indexer.state_dict().items() if ".indexer." in k}
    baseline = copy.deepcopy(model)
    baseline.load_state_dict(fresh_state, strict=False)
    untrained = evaluate(baseline, held)
    final = curve[-1]
    print(
        json.dumps(
            {
                "benchmark": "msa_indexer",
                "preset": "minimax-m3-tiny (vocab 256 bytes, blocks of 4, 4 kept incl. 1 local)",
                "seq_len": args.seq_len,
                "steps": {"dense": args.dense_steps, "sparse": args.sparse_steps},
                "recall_curve": [(p["step"], p["recall"]) for p in curve],
                "recall_start": curve[0]["recall"],
                "recall_end": final["recall"],
                "held_out_loss_dense": final["dense_loss"],
                "held_out_loss_sparse": final["sparse_loss"],
                "held_out_loss_sparse_untrained_indexer": untrained["sparse_loss"],
                "recall_untrained_indexer": untrained["recall"],
                "seconds": round(time.monotonic() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
