"""Configuration of the MiniMax-M3 text backbone: M2's fields plus what M3 adds, and its presets.

Field names are those of transformers 5.19's `MiniMaxM3VLTextConfig` (which also reads the checkpoint's
legacy `moe_layer_freq` / `sparse_attention_config` keys), so m3_checkpoint.py copies them into
`config.json` as they are. What M3 changes against M2, checked against transformers' modeling code:
- the first layers are dense (one SwiGLU-OAI MLP of width `dense_intermediate_size`), the rest MoE;
- MoE layers add one always-on shared expert (`shared_intermediate_size`) and scale the routed sum by
  `routed_scaling_factor` before adding it;
- experts and dense MLPs use SwiGLU-OAI with a clamp (`swiglu_alpha`, `swiglu_limit`);
- q/k RMSNorm is per head, Gemma style (x * (1 + w)), and so is every other norm;
- sparse layers ("minimax_m3_sparse" in `layer_types`) select key blocks with a lightning indexer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forgerl.model.config import ModelConfig, ParamCounts

DENSE_MLP, SPARSE_MLP = "dense", "sparse"
FULL_ATTENTION, SPARSE_ATTENTION = "full_attention", "minimax_m3_sparse"


@dataclass
class M3Config(ModelConfig):
    dense_intermediate_size: int = 128
    shared_intermediate_size: int = 64
    routed_scaling_factor: float = 2.0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Per layer: "dense" | "sparse" MLP, "full_attention" | "minimax_m3_sparse" attention. Empty: the
    # first layer dense with full attention, the rest MoE with the indexer (the preview's pattern, 1 of 3).
    mlp_layer_types: tuple[str, ...] = ()
    layer_types: tuple[str, ...] = ()
    # Lightning indexer. index_n_heads must equal num_key_value_heads: one block selection per GQA group.
    index_n_heads: int = 2
    index_head_dim: int = 16
    index_block_size: int = 4
    # The forced local blocks count inside this budget (transformers boosts them to +inf before the top-k):
    # a query attends at most index_topk_blocks blocks in all.
    index_topk_blocks: int = 3
    index_local_blocks: int = 1
    # Block-sparse attention kernel of the sparse layers and the indexer's block scorer: keys of
    # m3_attention.MSA_BACKENDS / INDEX_SCORERS (forgerl.kernels.msa.register_m3_msa adds "triton").
    msa_backend: str = "torch"
    index_backend: str = "torch"
    # Multi-token prediction. transformers 5.19's M3 has none (modeling_minimax_m3_vl.py drops `mtp.*` with
    # _keys_to_ignore_on_load_unexpected), but vLLM 0.32 serves one as a draft model: MiniMaxM3MTP
    # (vllm/models/minimax_m3/nvidia/mtp.py, registered in model_executor/models/registry.py; its config
    # default num_mtp_modules=1 in transformers_utils/configs/minimax_m3.py). Each module is
    # enorm/hnorm/eh_proj/final_layernorm (Gemma norms) around one MoE + sparse-attention decoder layer
    # (force_moe, force_sparse_attn), as forgerl.model.mtp.MTPModule with M3's layer. One difference: vLLM
    # zeroes the token embedding at position 0 (MiniMaxM3MultiTokenPredictorLayer.forward), our MTPModule
    # (shared with M2) does not, so the two differ there only. 0 by default: transformers has none.
    num_mtp_modules: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_hidden_layers
        if not self.mlp_layer_types:
            self.mlp_layer_types = (DENSE_MLP,) + (SPARSE_MLP,) * (n - 1)
        if not self.layer_types:
            self.layer_types = (FULL_ATTENTION,) + (SPARSE_ATTENTION,) * (n - 1)
        self.mlp_layer_types, self.layer_types = tuple(self.mlp_layer_types), tuple(self.layer_types)
        checks = (
            (
                len(self.mlp_layer_types) == n and set(self.mlp_layer_types) <= {DENSE_MLP, SPARSE_MLP},
                f"mlp_layer_types {self.mlp_layer_types} must hold {n} entries of {DENSE_MLP!r} / {SPARSE_MLP!r}",
            ),
            (
                len(self.layer_types) == n and set(self.layer_types) <= {FULL_ATTENTION, SPARSE_ATTENTION},
                f"layer_types {self.layer_types} must hold {n} entries of {FULL_ATTENTION!r} / {SPARSE_ATTENTION!r}",
            ),
            (
                self.index_n_heads == self.num_key_value_heads,
                f"index_n_heads {self.index_n_heads} must equal num_key_value_heads {self.num_key_value_heads}: "
                "the indexer makes one block selection per GQA group",
            ),
            (
                0 <= self.index_local_blocks <= self.index_topk_blocks and self.index_block_size > 0,
                f"index_local_blocks {self.index_local_blocks} must be in [0, index_topk_blocks="
                f"{self.index_topk_blocks}] and index_block_size {self.index_block_size} positive",
            ),
            (
                self.num_mtp_modules >= 0,
                f"num_mtp_modules {self.num_mtp_modules} must be >= 0",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> M3Config:
        """`M3Config.from_preset("minimax-m3-tiny")`; names are the keys of M3_PRESETS."""
        if name not in M3_PRESETS:
            raise ValueError(f"unknown M3 preset {name!r}: choose one of {sorted(M3_PRESETS)}")
        return cls(**{**M3_PRESETS[name], **overrides})

    @property
    def sparse_layer_count(self) -> int:
        return self.mlp_layer_types.count(SPARSE_MLP)

    def param_counts(self) -> ParamCounts:
        """M2's breakdown assumes one layer shape; M3 mixes dense and MoE layers, so callers that plan with
        it (distributed.planner) would be wrong without an error. Use m3_param_counts()."""
        raise TypeError("M3Config has dense and MoE layers: use m3_param_counts(), not the M2 ParamCounts")

    def m3_param_counts(self) -> M3ParamCounts:
        return M3ParamCounts.of(self)


@dataclass(frozen=True)
class M3ParamCounts:
    """Every tensor a checkpoint stores (`total`: embedding, layers, final norm, head, MTP modules; the
    routing bias included) and what one token multiplies through in the layers (`active`: attention and
    indexer, the dense MLP or the router, top-k experts and the shared expert), the report's "activated"
    convention."""

    per_full_attention: int
    per_indexer: int
    per_dense_mlp: int
    per_moe_total: int
    per_moe_active: int
    total: int
    active: int

    @classmethod
    def of(cls, cfg: M3Config) -> M3ParamCounts:
        d, hd, idx = cfg.hidden_size, cfg.head_dim, cfg.index_head_dim
        attention = 2 * d * cfg.num_attention_heads * hd + 2 * d * cfg.num_key_value_heads * hd + 2 * hd
        indexer = d * cfg.index_n_heads * idx + d * idx + 2 * idx  # q_proj, one key head, two norms
        dense = 3 * d * cfg.dense_intermediate_size  # gate_up [2F, D] + down [D, F]
        router = cfg.num_local_experts * (d + 1)  # gate weight + correction bias
        shared = 3 * d * cfg.shared_intermediate_size
        expert = 3 * d * cfg.intermediate_size
        moe_total = router + cfg.num_local_experts * expert + shared
        moe_active = router + cfg.num_experts_per_tok * expert + shared
        layers_total = layers_active = 0
        for mlp, attn in zip(cfg.mlp_layer_types, cfg.layer_types, strict=True):
            mixer = attention + 2 * d + (indexer if attn == SPARSE_ATTENTION else 0)  # + the two layer norms
            layers_total += mixer + (moe_total if mlp == SPARSE_MLP else dense)
            layers_active += mixer + (moe_active if mlp == SPARSE_MLP else dense)
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
        # An MTP module: enorm, hnorm, eh_proj [D, 2D], head norm, and an MoE + sparse-attention layer.
        mtp = 3 * d + 2 * d * d + attention + 2 * d + indexer + moe_total
        return cls(
            per_full_attention=attention,
            per_indexer=indexer,
            per_dense_mlp=dense,
            per_moe_total=moe_total,
            per_moe_active=moe_active,
            total=cfg.vocab_size * d + head + layers_total + d + cfg.num_mtp_modules * mtp,
            active=layers_active,
        )


def _first_dense(num_dense: int, num_layers: int) -> dict[str, tuple[str, ...]]:
    """The M3 pattern: the first `num_dense` layers dense MLP + full attention, the rest MoE + indexer."""
    rest = num_layers - num_dense
    return {
        "mlp_layer_types": (DENSE_MLP,) * num_dense + (SPARSE_MLP,) * rest,
        "layer_types": (FULL_ATTENTION,) * num_dense + (SPARSE_ATTENTION,) * rest,
    }


# Only what differs from the dataclass defaults.
M3_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: 3 layers (1 dense, 2 MoE + indexer) at width 64; blocks of 4 keys with 3 kept per query,
    # so any sequence over 12 tokens makes the indexer drop blocks.
    "minimax-m3-tiny": {
        "num_hidden_layers": 3,
        "intermediate_size": 32,
        **_first_dense(1, 3),
    },
    # The MiniMax-M3 preview checkpoint's text model: transformers' MiniMaxM3VLTextConfig defaults for the
    # shapes, and the checkpoint's layer pattern as vLLM's MiniMaxM3TextConfig spells it (moe_layer_freq
    # and sparse_attention_freq both [0] * 3 + [1] * 57): 3 dense full-attention layers, then 57 MoE layers
    # with the indexer (4 heads of 128, blocks of 128 keys, 16 blocks kept, 1 of them local). RoPE rotates
    # 64 of the 128 channels (vLLM: partial_rotary_factor 0.5). The checkpoint's MTP module is not built
    # here (num_mtp_modules 0, transformers' shape); a released config.json that sets it builds it.
    "minimax-m3-preview": {
        "vocab_size": 200_064,
        "hidden_size": 6144,
        "num_hidden_layers": 60,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "rotary_dim": 64,
        "rope_theta": 5_000_000.0,
        "max_position_embeddings": 524_288,
        "intermediate_size": 3072,
        "dense_intermediate_size": 12_288,
        "shared_intermediate_size": 3072,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "index_n_heads": 4,
        "index_head_dim": 128,
        "index_block_size": 128,
        "index_topk_blocks": 16,
        "index_local_blocks": 1,
        "bos_token_id": 200_034,
        "eos_token_id": 200_020,
        **_first_dense(3, 60),
    },
}
