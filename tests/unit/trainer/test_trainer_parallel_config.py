"""`trainer.parallel` in a run file: unset keeps today's layouts (one process; DDP under torchrun), set
fields reach forgerl.distributed's ParallelConfig, and bad values are refused with the key named."""

from __future__ import annotations

import pytest

from forgerl.distributed import ParallelConfig
from forgerl.trainer.run_config import parallel_config, run_config_from_dict

pytestmark = pytest.mark.unit

EXPERTS = 8  # the debug and tiny presets


def test_unset_is_one_process_or_ddp() -> None:
    config = run_config_from_dict({})
    assert parallel_config(config) == ParallelConfig()
    single = parallel_config(config).resolve(1, EXPERTS)
    assert (single.dp_replicate, single.dp_shard, single.ep, single.uses_fsdp) == (1, 1, 1, False)
    ddp = parallel_config(config).resolve(2, EXPERTS)
    assert (ddp.dp_replicate, ddp.dp_shard, ddp.ep, ddp.uses_fsdp) == (2, 1, 1, False)


def test_fsdp_ep_layout_from_the_run_file() -> None:
    values = {"dp_shard": 2, "ep": 2, "activation_checkpoint_every": 1}
    config = run_config_from_dict({"trainer": {"parallel": values}})
    assert parallel_config(config) == ParallelConfig(dp_replicate=-1, **values)
    layout = parallel_config(config).resolve(2, EXPERTS)
    assert (layout.dp_replicate, layout.dp_shard, layout.ep, layout.efsdp) == (1, 2, 2, 1)
    assert layout.uses_fsdp and layout.activation_checkpoint_every == 1


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="tp"):
        run_config_from_dict({"trainer": {"parallel": {"tp": 2}}})
    with pytest.raises(ValueError, match=r"trainer\.parallel\.ep"):
        run_config_from_dict({"trainer": {"parallel": {"ep": -1}}})
    with pytest.raises(ValueError, match=r"trainer\.parallel\.dp_shard -2"):
        run_config_from_dict({"trainer": {"parallel": {"dp_shard": -2}}})
    one_process = parallel_config(run_config_from_dict({"trainer": {"parallel": {"dp_shard": 2}}}))
    with pytest.raises(ValueError, match=r"world size 1 is not a multiple of trainer\.parallel\.dp_shard 2"):
        one_process.resolve(1, EXPERTS)  # the trainer service trains in one process
