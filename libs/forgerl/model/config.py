"""Configuration of the MiniMax-M2 architecture: one dataclass, named presets, parameter counts.

The field names are those of the Hugging Face `config.json` of MiniMax-M2 wherever one exists, so that the
checkpoint writer can copy them and vLLM / transformers read them back; the fields that only training needs
(loss weights, the bias update rate) travel under a `forgerl` key of the same file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

# Released MiniMax-M2 checkpoints are bf16 with FP8 experts; ids of the real tokenizer (200064 tokens).
_M2_BOS_ID = 200034
_M2_EOS_ID = 200020


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    # Partial RoPE: only the first `rotary_dim` channels of each head rotate (M2: 64 of 128).
    rotary_dim: int = 8
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 196_608
    rms_norm_eps: float = 1e-6
    # Mixture of experts: every layer is sparse, no shared expert, SwiGLU experts of width intermediate_size.
    intermediate_size: int = 64
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    # Multi-token prediction: K modules after the main layers (M2 ships 3, trained from 1 by copying).
    num_mtp_modules: int = 1
    mtp_loss_weight: float = 0.1
    # Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): bias step u per optimizer step; 1e-3 is their value.
    bias_update_rate: float = 1e-3
    # Optional sequence-wise balance loss (DeepSeek-V3 eq. 17-20); 0 turns it off. They use 1e-4.
    seq_aux_loss_coef: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # Which attention module and kernel: keys of attention.ATTENTION_MODULES / ATTENTION_BACKENDS, or
    # a Triton kernel of attention.KERNEL_BACKENDS ("tree": prefix-tree packs, "msa": sparse attention).
    attention_type: str = "full"
    attn_backend: str = "sdpa"
    # MSA (attn_backend "msa"): key blocks of msa_block_size tokens, each query block keeps the first, its
    # own and the msa_top_k best-scoring blocks (64 and 16: kernels/msa's defaults, 1,152 keys per query).
    msa_block_size: int = 64
    msa_top_k: int = 16
    # The experts' implementation: "torch" (grouped_mm) or "triton" (kernels/fused_moe, SwiGLU only).
    moe_backend: str = "torch"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Derived in __post_init__.
    num_key_value_groups: int = field(init=False)

    def __post_init__(self) -> None:
        checks = (
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (GQA groups)",
            ),
            (
                self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
                f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]",
            ),
            (
                0 < self.num_experts_per_tok <= self.num_local_experts,
                f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_local_experts="
                f"{self.num_local_experts}]",
            ),
            (self.num_mtp_modules >= 0, f"num_mtp_modules {self.num_mtp_modules}: must be >= 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.num_key_value_groups = self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """`ModelConfig.from_preset("debug", num_mtp_modules=3)`; names are the keys of PRESETS."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def param_counts(self) -> ParamCounts:
        return ParamCounts.of(self)


# Only what differs from the dataclass defaults (which are the debug preset).
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.9M parameters, half of them the 4096-token embedding and head: a CPU training step takes ~10 ms.
    "debug": {},
    # ~2.3M parameters: the debug layout (2 layers of 8 experts, top 2, one MTP module) at width 128 with
    # full-width RoPE at base 10^4 -- what `make run` trains from scratch on a 2-core CPU. The debug
    # preset's partial RoPE (8 of 16 channels at base 5*10^6, M2's long-context setting) leaves a two-layer
    # model too little relative-position signal to learn to copy numbers within a few hundred steps (5%
    # held-out success on the tool-use suite after 800 SFT steps, where `tiny` reached 25% after 600).
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 128,
        "head_dim": 32,
        "rotary_dim": 32,
        "rope_theta": 10_000.0,
    },
    # ~35M parameters (~8M active) for the local demo: 4 layers of 32 experts, top 4.
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rotary_dim": 16,
        "intermediate_size": 256,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
    },
    # The released model (HF MiniMaxAI/MiniMax-M2 config.json).
    "minimax-m2": {
        "vocab_size": 200_064,
        "hidden_size": 3072,
        "num_hidden_layers": 62,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rotary_dim": 64,
        "rope_theta": 5_000_000.0,
        "intermediate_size": 1536,
        "num_local_experts": 256,
        "num_experts_per_tok": 8,
        "num_mtp_modules": 3,
        "bos_token_id": _M2_BOS_ID,
        "eos_token_id": _M2_EOS_ID,
    },
}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts from the config alone (a test checks them against an instantiated model).

    `total` is every parameter of the main model (embedding, layers, final norm, output head) and
    `active` what one token multiplies through in the layers: attention, router and top-k experts, the
    convention behind the report's "9.8B activated". MTP modules are counted apart in `mtp`.
    """

    embedding: int
    head: int
    per_layer_attention: int
    per_layer_router: int
    per_expert: int
    per_layer_norms: int
    per_mtp_module: int
    total: int
    active: int
    mtp: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> ParamCounts:
        d, hd = cfg.hidden_size, cfg.head_dim
        q_width, kv_width = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        attention = d * q_width * 2 + d * kv_width * 2  # q_proj, o_proj, k_proj, v_proj
        router = cfg.num_local_experts * d + cfg.num_local_experts  # gate weight + correction bias
        expert = 3 * d * cfg.intermediate_size  # w1, w3: [F, D]; w2: [D, F]
        norms = 2 * d + q_width + kv_width  # input / post-attention norms, q_norm, k_norm
        layer = attention + router + cfg.num_local_experts * expert + norms
        embedding = cfg.vocab_size * d
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
        mtp_module = layer + 2 * d * d + 3 * d  # eh_proj [D, 2D]; enorm, hnorm, shared_head.norm
        active_layer = attention + router + cfg.num_experts_per_tok * expert + norms
        return cls(
            embedding=embedding,
            head=head,
            per_layer_attention=attention,
            per_layer_router=router,
            per_expert=expert,
            per_layer_norms=norms,
            per_mtp_module=mtp_module,
            total=embedding + head + cfg.num_hidden_layers * layer + d,
            active=cfg.num_hidden_layers * active_layer,
            mtp=cfg.num_mtp_modules * mtp_module,
        )
