"""Training at GPU-pool scale: device meshes, expert-parallel dispatch, FSDP2 application (torchtitan's
`distributed/` beside `models/`: the model code in forgerl.model stays single-device).

```python
layout = ParallelConfig(dp_shard=4, ep=2).resolve(dist.get_world_size(), cfg.num_local_experts)
parallel = apply_parallelism(model, build_meshes(layout, "cpu"))
out = parallel.train_model(input_ids)       # experts of each layer live on 2 ranks, the rest is sharded
clip_grad_norm_(parallel.model.parameters(), 1.0)
```
"""

from forgerl.distributed.config import ParallelConfig, ResolvedParallel
from forgerl.distributed.mesh import ParallelMeshes, build_meshes
from forgerl.distributed.parallelize import (
    ParallelModel,
    apply_parallelism,
    clip_grad_norm_,
    full_state_dict,
)

__all__ = [
    "ParallelConfig",
    "ParallelMeshes",
    "ParallelModel",
    "ResolvedParallel",
    "apply_parallelism",
    "build_meshes",
    "clip_grad_norm_",
    "full_state_dict",
]
