"""One rank of the data-parallel check (run by test_model_data_parallel.py under torchrun, gloo, CPU).

Each of the 2 ranks takes half of the global batch, runs forward + main loss + MTP loss + backward under
DDP or FSDP2, updates the routing bias from the all-reduced loads, and saves a checkpoint; rank 0 writes
the averaged loss and the full gradients to --out for the test to compare with one process.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint, update_expert_bias
from forgerl.model.sharding import apply_ddp, apply_fsdp

GLOBAL_BATCH, SEQ_LEN, SEED = 4, 32, 0


def global_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(SEED + 1))


def build_model() -> MiniMaxM2ForCausalLM:
    torch.manual_seed(SEED)
    return MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).train()


def loss_of(model: MiniMaxM2ForCausalLM, forward: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Main next-token loss plus the MTP loss, each a mean over the tokens of `ids`."""
    out = forward(ids)
    main = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return main + model.mtp_loss(out.hidden_states, ids)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    wrapped = apply_ddp(model) if args.mode == "ddp" else apply_fsdp(model)
    rows = GLOBAL_BATCH // world
    ids = global_batch(model.config.vocab_size)[rank * rows : (rank + 1) * rows]
    loss = loss_of(model, wrapped, ids)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad  # FSDP2 shards
        grads[name] = grad.clone()
    update_expert_bias(model, rate=1e-3)
    bias = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("e_score_correction_bias")}
    save_checkpoint(model, None, args.out.parent / f"{args.mode}-checkpoint")
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": grads, "bias": bias}, args.out)
    # As the trainer's worker does: every rank done before teardown, then leave without running gloo's C++
    # destructors, which hung or aborted a rank now and then under load once all results were written.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
