"""The policy model: MiniMax-M2 architecture in plain PyTorch, HF-compatible checkpoints, tokenizer.

```python
from forgerl.model import ModelConfig, MiniMaxM2ForCausalLM, save_checkpoint, load_checkpoint
model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
out = model(input_ids)                      # logits, hidden_states, expert_load, routed_experts, aux_loss
loss, metrics = model.mtp_loss(out.hidden_states, input_ids, loss_mask)
m3 = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny"))  # out.block_indices: the indexer's picks
```
"""

from forgerl.model.balance import expert_load_metrics, update_expert_bias
from forgerl.model.checkpoint import load_checkpoint, save_checkpoint
from forgerl.model.config import PRESETS, ModelConfig, ParamCounts
from forgerl.model.m3 import M3Output, MiniMaxM3ForCausalLM
from forgerl.model.m3_checkpoint import load_m3_checkpoint, save_m3_checkpoint
from forgerl.model.m3_config import M3_PRESETS, M3Config
from forgerl.model.model import MiniMaxM2ForCausalLM, ModelOutput

__all__ = [
    "M3_PRESETS",
    "PRESETS",
    "M3Config",
    "M3Output",
    "MiniMaxM2ForCausalLM",
    "MiniMaxM3ForCausalLM",
    "ModelConfig",
    "ModelOutput",
    "ParamCounts",
    "expert_load_metrics",
    "load_checkpoint",
    "load_m3_checkpoint",
    "save_checkpoint",
    "save_m3_checkpoint",
    "update_expert_bias",
]
