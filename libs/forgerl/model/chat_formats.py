"""MiniMax-M2's chat format, written from its public description (the model card's chat template and
MiniMax's tool-calling guide), for tokenizers that speak it instead of ForgeRL's ChatML-style format.

Markers (single tokens): `]~!b[` opens the conversation, `]~b]` opens a block whose role name follows
(`system`, `user`, `ai`, `tool`), `[e~[` ends a block (= eos). `<think>`/`</think>` hold reasoning and
`<minimax:tool_call>`/`</minimax:tool_call>` hold tool calls; these four stay in decoded text.

A rendered conversation:
    ]~!b[]~b]system\n{system, or a default identity}{tools header}[e~[\n
    ]~b]user\n{content}[e~[\n
    ]~b]ai\n<think>\n{reasoning}\n</think>\n\n{content}\n<minimax:tool_call>\n
        <invoke name="f">\n<parameter name="k">{value}</parameter>\n</invoke>\n</minimax:tool_call>[e~[\n
    ]~b]tool\n<response>{result}</response>\n<response>{result}</response>[e~[\n   <- consecutive results
    ]~b]ai\n<think>\n                                             <- add_generation_prompt

Two properties of the published format that a token-exact gateway must know (forgerl.gateway.chat):
- the reasoning of an assistant turn is rendered only after the last user message: a new user message
  drops the reasoning of every earlier turn, so re-rendering a conversation is token-exact only within
  one user turn (the gateway keeps generated ids instead, and with them the reasoning: interleaved
  thinking, which M2 was trained with);
- the generation prompt already opens the reasoning (`<think>\n`), so generated ids start inside it.
Parameter values are written raw when they are strings and as JSON otherwise; parsers recover the type
from the tool's JSON schema (vLLM's `minimax_m2` parser does).
"""

from __future__ import annotations

BEGIN, BLOCK, END = "]~!b[", "]~b]", "[e~["
M2_THINK, M2_END_THINK = "<think>", "</think>"
M2_TOOL_CALL, M2_END_TOOL_CALL = "<minimax:tool_call>", "</minimax:tool_call>"
M2_SPECIAL_TOKENS = (BEGIN, BLOCK, END)
M2_TAG_TOKENS = (M2_THINK, M2_END_THINK, M2_TOOL_CALL, M2_END_TOOL_CALL)

# Jinja shared by both templates: a message's text, from a string or a list of text parts.
TEXT_MACRO = r"""
{%- macro text(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}
{%- elif content is not none -%}{{- content -}}
{%- endif -%}
{%- endmacro -%}
""".strip()

M2_CHAT_TEMPLATE = (
    TEXT_MACRO
    + r"""
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- ']~!b[]~b]system\n' -}}
{%- if has_system -%}{{- text(messages[0].content) -}}{%- else -%}{{- 'You are a helpful assistant.' -}}{%- endif -%}
{%- if tools -%}
{{- '\n\n# Tools\nYou may call one or more tools to assist with the user query.\n'
    + 'Here are the tools available in JSONSchema format:\n\n<tools>\n' -}}
{%- for tool in tools -%}
{{- '<tool>' + ((tool.function if tool.function is defined else tool) | tojson) + '</tool>\n' -}}
{%- endfor -%}
{{- '</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n'
    + '<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
    + '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{%- if not loop.first -%}{{- ']~b]system\n' + text(message.content) + '[e~[\n' -}}{%- endif -%}
{%- elif message.role == 'user' -%}
{{- ']~b]user\n' + text(message.content) + '[e~[\n' -}}
{%- elif message.role == 'assistant' -%}
{{- ']~b]ai\n' -}}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' -%}
{%- if reasoning and loop.index0 > ns.last_user -%}{{- '<think>\n' + reasoning + '\n</think>\n\n' -}}{%- endif -%}
{{- text(message.content) -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{{- '\n<minimax:tool_call>\n' -}}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{{- '<invoke name="' + fn.name + '">\n' -}}
{%- if fn.arguments is mapping -%}
{%- for key, value in fn.arguments.items() -%}
{{- '<parameter name="' + key + '">' -}}
{%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{{- '</parameter>\n' -}}
{%- endfor -%}
{%- else -%}
{{- raise_exception('tool call ' + fn.name + ': arguments must be an object for this format') -}}
{%- endif -%}
{{- '</invoke>\n' -}}
{%- endfor -%}
{{- '</minimax:tool_call>' -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- ']~b]tool' -}}{%- endif -%}
{{- '\n<response>' + text(message.content) + '</response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '[e~[\n' -}}{%- endif -%}
{%- else -%}
{{- raise_exception('unknown role ' + message.role + ': use system, user, assistant or tool') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ']~b]ai\n<think>\n' -}}{%- endif -%}
"""
).strip()
