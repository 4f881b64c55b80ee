import collections.abc

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> collections.abc.Iterator[None]:
    """The debug model's ops are too small to gain from intra-op threads, and on a shared 2-core box
    OpenMP threads waiting on each other cost 15x: 60 training steps took 1.3 s on 1 thread, 21 s on 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
