"""Fixtures of the gateway's unit tier: the ForgeRL tokenizer (trained once per session), its ChatFormat,
and a GatewayCore over scripted in-process replicas (no network)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from forgerl.gateway.chat import ChatFormat
from forgerl.gateway.routing import Router
from forgerl.gateway.service import GatewayCore, GatewaySettings
from forgerl.gateway.testing import ScriptedInference, ScriptedReplica
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(), path)
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def fmt(tokenizer: Any) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture
def gen(fmt: ChatFormat) -> Callable[..., list[int]]:
    """Token ids of an assistant turn as the model would generate it (the template's own layout)."""

    def make(
        content: str = "", reasoning: str = "", calls: tuple[tuple[str, str], ...] = (), end: bool = True
    ) -> list[int]:
        text = f"<think>\n{reasoning}\n</think>\n\n" if reasoning else ""
        text += content
        for i, (name, args) in enumerate(calls):
            if content or i:
                text += "\n"
            text += f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'
        ids = fmt.encode(text)
        return [*ids, fmt.end_of_turn] if end else ids

    return make


class Harness:
    def __init__(self, fmt: ChatFormat, replicas: int = 1, settings: GatewaySettings | None = None) -> None:
        self.servers = [ScriptedInference(eos_id=fmt.end_of_turn) for _ in range(replicas)]
        self.router = Router([ScriptedReplica(f"replica-{i}", s) for i, s in enumerate(self.servers)])
        self.core = GatewayCore(fmt, self.router, settings)

    @property
    def server(self) -> ScriptedInference:
        return self.servers[0]


@pytest.fixture
def harness(fmt: ChatFormat) -> Callable[..., Harness]:
    return lambda replicas=1, settings=None: Harness(fmt, replicas, settings)
