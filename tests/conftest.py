"""Fixtures shared by every test area."""

import collections.abc
import itertools
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> collections.abc.Iterator[None]:
    """Tests run small models: intra-op threads gain nothing on a shared 2-core box and only contend
    (60 debug-preset steps took 21 s with 2 threads under load, 1.3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tokenizer trained on 300 gold conversations of the tool-use suite (seconds, not minutes)."""
    from forgerl.model.tokenizer import save_tokenizer, train_tokenizer
    from forgerl.rollout.suites.tooluse import tokenizer_corpus

    path = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(itertools.islice(tokenizer_corpus(), 300), vocab_size=700)
    save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from forgerl.model.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
