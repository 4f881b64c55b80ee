"""RL core: policy losses (CISPO and the baselines), rewards and advantages, windowed-FIFO scheduling of the
generation queue, prefix-tree merging. Pure tensor code: importing it never pulls in vLLM or Triton.

```python
from forgerl.rl import PrefixForest, WindowedFIFO, forward_merged, get_policy_loss
forest = PrefixForest.build(input_ids, lengths)                # shared prefixes stored once
logprobs = forward_merged(model, forest).logprobs              # [B, L - 1], as if run one by one
loss, metrics = get_policy_loss("cispo")(logprobs, old_logprobs, advantages, mask, eps_high=0.28)
```
"""

from forgerl.rl.losses import POLICY_LOSSES, PolicyLoss, cispo_loss, cispo_weight, get_policy_loss
from forgerl.rl.prefix_merge import (
    TREE_ATTENTION,
    CausalLM,
    TokenOutputs,
    TreeAttention,
    dense_ancestor_mask,
    forward_merged,
    forward_pack,
    forward_unmerged,
)
from forgerl.rl.prefix_tree import PrefixForest, TreePack
from forgerl.rl.rewards import (
    SPEED_FUNCTIONS,
    check_speed_fn,
    get_speed_fn,
    group_baseline_advantages,
    reward_to_go,
    speed_reward,
    step_rewards,
    token_advantages,
)
from forgerl.rl.windowed_fifo import ItemState, Taken, WindowedFIFO

__all__ = [
    "POLICY_LOSSES",
    "SPEED_FUNCTIONS",
    "TREE_ATTENTION",
    "CausalLM",
    "ItemState",
    "PolicyLoss",
    "PrefixForest",
    "Taken",
    "TokenOutputs",
    "TreeAttention",
    "TreePack",
    "WindowedFIFO",
    "check_speed_fn",
    "cispo_loss",
    "cispo_weight",
    "dense_ancestor_mask",
    "forward_merged",
    "forward_pack",
    "forward_unmerged",
    "get_policy_loss",
    "get_speed_fn",
    "group_baseline_advantages",
    "reward_to_go",
    "speed_reward",
    "step_rewards",
    "token_advantages",
]
