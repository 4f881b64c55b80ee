"""The policy model: MiniMax-M2 architecture in plain PyTorch, HF-compatible checkpoints, tokenizer.

```python
from forgerl.model import ModelConfig, MiniMaxM2ForCausalLM, save_checkpoint, load_checkpoint
model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
out = model(input_ids)                      # logits, hidden_states, expert_load, routed_experts, aux_loss
loss, metrics = model.mtp_loss(out.hidden_states, input_ids, loss_mask)
```
"""

from forgerl.model.balance import expert_load_metrics, update_expert_bias
from forgerl.model.checkpoint import load_checkpoint, save_checkpoint
from forgerl.model.config import PRESETS, ModelConfig, ParamCounts
from forgerl.model.model import MiniMaxM2ForCausalLM, ModelOutput

__all__ = [
    "PRESETS",
    "MiniMaxM2ForCausalLM",
    "ModelConfig",
    "ModelOutput",
    "ParamCounts",
    "expert_load_metrics",
    "load_checkpoint",
    "save_checkpoint",
    "update_expert_bias",
]
