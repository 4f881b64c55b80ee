"""The registry of generation parsers, by the name ChatFormat.parser holds (chat.PARSER_NAMES).

"forgerl" is the ChatML family's incremental, token-level parser (the tiny model's default, unchanged);
"hermes" parses the same family with vLLM's `hermes` tool parser and `qwen3` reasoning parser;
"minimax_m2" parses MiniMax-M2's format with vLLM's `minimax_m2` tool and reasoning parsers.
"""

from __future__ import annotations

from collections.abc import Callable

from forgerl.gateway.chat import ChatFormat, Tools
from forgerl.gateway.parsing import GenerationParser, GenerationParsing, new_tool_call_id
from forgerl.gateway.vllm_parsing import VllmGenerationParser, VllmParsers
from forgerl.model.tokenizer import TOOL_CALL

_VLLM_PARSERS = {
    "hermes": VllmParsers(reasoning="qwen3", tool="hermes", call_opening=TOOL_CALL),
    # One `<invoke name=...>` per call inside a `<minimax:tool_call>` block.
    "minimax_m2": VllmParsers(reasoning="minimax_m2", tool="minimax_m2", call_opening="<invoke name="),
}


def new_parser(
    fmt: ChatFormat,
    tool_names: frozenset[str] | None,
    tools: Tools,
    new_id: Callable[[], str] = new_tool_call_id,
) -> GenerationParsing:
    """A parser of one generation in `fmt`'s format; `tool_names` None: tool calls are plain content."""
    if fmt.parser == "forgerl":
        return GenerationParser(fmt, tool_names, new_id)
    return VllmGenerationParser(fmt, _VLLM_PARSERS[fmt.parser], tool_names, tools.specs, new_id)


def prepare_parsers(fmt: ChatFormat) -> None:
    """Import what `fmt`'s parser needs now (vLLM takes seconds to import), not in the first request."""
    if fmt.parser != "forgerl":
        new_parser(fmt, frozenset(), Tools())
