"""RL core: policy losses (CISPO and the baselines), rewards and advantages, windowed-FIFO scheduling of the
generation queue, prefix-tree merging. Pure tensor code: importing it never pulls in vLLM or Triton.

```python
from forgerl.rl import PrefixForest, WindowedFIFO, forward_merged, get_policy_loss
forest = PrefixForest.build(input_ids, lengths)                # shared prefixes stored once
logprobs = forward_merged(model, forest).logprobs              # [B, L - 1], as if run one by one
loss, metrics = get_policy_loss("cispo")(logprobs, old_logprobs, advantages, mask, eps_high=0.28)
```


The data pool imports the windowed FIFO without torch: names load from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        subtree_end_mask,
        tree_attention_for,
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

_MODULE_OF = {
    "CausalLM": "forgerl.rl.prefix_merge",
    "ItemState": "forgerl.rl.windowed_fifo",
    "POLICY_LOSSES": "forgerl.rl.losses",
    "PolicyLoss": "forgerl.rl.losses",
    "PrefixForest": "forgerl.rl.prefix_tree",
    "SPEED_FUNCTIONS": "forgerl.rl.rewards",
    "TREE_ATTENTION": "forgerl.rl.prefix_merge",
    "Taken": "forgerl.rl.windowed_fifo",
    "TokenOutputs": "forgerl.rl.prefix_merge",
    "TreeAttention": "forgerl.rl.prefix_merge",
    "TreePack": "forgerl.rl.prefix_tree",
    "WindowedFIFO": "forgerl.rl.windowed_fifo",
    "check_speed_fn": "forgerl.rl.rewards",
    "cispo_loss": "forgerl.rl.losses",
    "cispo_weight": "forgerl.rl.losses",
    "dense_ancestor_mask": "forgerl.rl.prefix_merge",
    "forward_merged": "forgerl.rl.prefix_merge",
    "forward_pack": "forgerl.rl.prefix_merge",
    "forward_unmerged": "forgerl.rl.prefix_merge",
    "get_policy_loss": "forgerl.rl.losses",
    "get_speed_fn": "forgerl.rl.rewards",
    "group_baseline_advantages": "forgerl.rl.rewards",
    "reward_to_go": "forgerl.rl.rewards",
    "speed_reward": "forgerl.rl.rewards",
    "step_rewards": "forgerl.rl.rewards",
    "subtree_end_mask": "forgerl.rl.prefix_merge",
    "token_advantages": "forgerl.rl.rewards",
    "tree_attention_for": "forgerl.rl.prefix_merge",
}

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
    "subtree_end_mask",
    "token_advantages",
    "tree_attention_for",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'forgerl.rl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
