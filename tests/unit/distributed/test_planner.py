"""The capacity planner's figures against counts made by hand from the debug preset (D 64, F 64, E 8,
K 2, H 4, KV 2, hd 16, V 4096, 2 layers + 1 MTP module), and against an instantiated model."""

import math

import pytest
import typer
from typer.testing import CliRunner

from forgerl.cli.plan import plan_command
from forgerl.distributed.planner import GIB, activation_bytes_per_token_layer, choose_ep, parse_bytes, plan
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig

pytestmark = pytest.mark.unit

DEBUG = ModelConfig.from_preset("debug")


def test_sharded_state_is_16_bytes_per_parameter_over_the_pool() -> None:
    params = sum(p.numel() for p in MiniMaxM2ForCausalLM(DEBUG).parameters())  # counted on a real model
    p = plan(DEBUG, gpus=4, gpu_memory_bytes=GIB, seq=100)
    assert p.params == params
    assert p.sharded_params_bytes == p.sharded_grads_bytes == 4 * math.ceil(params / 4)
    assert p.optimizer_bytes == 8 * math.ceil(params / 4)


def test_activation_and_working_set_by_hand() -> None:
    # attention: bf16 x, norm(x) 2*64, q/k/v (4 + 2*2)*16 = 128, output 4*16 = 64 -> 2*320; lse 4 heads fp32
    attention = 2 * (128 + 128 + 64) + 4 * 4
    # moe: bf16 h, norm(h) 2*64; fp32 scores 8*4; per pair (K=2) input 64, w1/w3 128, product 64, output 64
    moe = 2 * 128 + 8 * 4 + 2 * 2 * (64 + 128 + 64 + 64)
    assert activation_bytes_per_token_layer(DEBUG) == attention + moe == 2224
    p = plan(DEBUG, gpus=4, gpu_memory_bytes=GIB, seq=100)
    assert (p.ep, p.efsdp, p.dp_shard) == (4, 1, 4)  # 8 experts, 4 GPUs: ep 4
    logits = 100 * 4096 * (2 + 4)
    assert p.activations_bytes == 3 * 100 * 2224 + logits
    assert p.activations_checkpointed_bytes == 3 * 100 * 64 * 2 + 100 * 2224 + logits
    # One unit: q/o 64x64 each, k/v 64x32 each = 12288; router 8*64 = 512; norms 64+64+64+32 = 224;
    # 8/4 = 2 local experts of 3*64*64 = 12288. Two units bf16, plus embedding and head (4096*64 each).
    unit = 12288 + 512 + 224 + 2 * 12288
    assert p.working_params_bytes == 2 * (2 * unit + 2 * 4096 * 64)
    # Pairs: 100 tokens * K 2 * D 64 * 2 bytes * 3 MoE layers, 3 of 4 remote; 4 passes, 6 with recompute.
    assert p.all_to_all_bytes == round(4 * 100 * 2 * 64 * 2 * 3 * 0.75)
    assert p.all_to_all_checkpointed_bytes == round(6 * 100 * 2 * 64 * 2 * 3 * 0.75)


def test_choose_ep() -> None:
    assert choose_ep(256, 64, 8) == 8
    assert choose_ep(256, 12, 8) == 4
    assert choose_ep(256, 64, 4) == 4
    assert choose_ep(8, 3, 8) == 1
    with pytest.raises(ValueError, match="ep 3 must divide both the 4 GPUs and the 8 experts"):
        plan(DEBUG, gpus=4, gpu_memory_bytes=GIB, seq=10, ep=3)


def test_parse_bytes() -> None:
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("512 MiB") == 512 * 1024**2
    with pytest.raises(ValueError, match="give a number with a unit"):
        parse_bytes("80")


def _cli(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(plan_command)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_refuses_what_does_not_fit_saying_by_how_much() -> None:
    code, out = _cli("--model", "debug", "--gpus", "4", "--gpu-memory", "1MiB", "--seq", "100")
    assert code == 1
    p = plan(DEBUG, gpus=4, gpu_memory_bytes=1024**2, seq=100)
    over = (p.total_bytes(True) - 1024**2) / GIB
    assert f"with activation checkpointing: does NOT fit: {over:.2f} GiB over" in out
    code, out = _cli("--model", "debug", "--gpus", "4", "--gpu-memory", "1GiB", "--seq", "100")
    assert code == 0 and "mesh: dp_shard 4 (FSDP2 over all 4 GPUs), ep 4, efsdp 1" in out
