"""`trainer.publish` in a run file (issue 19 item 5): unset, "checkpoint" and "stream" are accepted, any
other value is refused naming the key, and "stream" is refused for an M3 run (which publishes nothing to
inference). The stream itself is tested against a vLLM engine in
tests/integration/inference/test_inference_weights_checked.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from forgerl.inference.buckets import Bucket
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.trainer.sources import NullPublisher

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("mode", [None, "checkpoint", "stream"])
def test_the_publish_modes_are_accepted(mode: str | None) -> None:
    trainer = {} if mode is None else {"publish": mode}
    assert run_config_from_dict({"trainer": trainer}).trainer.publish == (mode or "")


def test_another_publish_mode_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"trainer.publish 'reload' is not one of \('checkpoint', 'stream'\)"):
        run_config_from_dict({"trainer": {"publish": "reload"}})


def test_an_m3_run_cannot_stream() -> None:
    m3 = {"model_preset": "minimax-m3-tiny", "rl": {"prefix_merge": False}}
    assert run_config_from_dict({**m3, "trainer": {"publish": "checkpoint"}}).trainer.publish == "checkpoint"
    with pytest.raises(ValueError, match=r"trainer.publish 'stream' .* MiniMax-M3 \(preset minimax-m3-tiny\)"):
        run_config_from_dict({**m3, "trainer": {"publish": "stream"}})


def test_the_null_publisher_pulls_every_bucket() -> None:
    """On rank 0 the buckets are collective work: a publisher that sends nowhere still walks them all."""
    pulled = 0

    def buckets() -> Iterator[Bucket]:
        nonlocal pulled
        for _ in range(3):
            pulled += 1
            yield []

    assert NullPublisher().stream(buckets(), "/unused", 4) == (4, 0.0)
    assert pulled == 3
