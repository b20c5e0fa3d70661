"""OpenAI tool calling over a chat model: the tools shown to the model, `required` and a named function held
to a grammar, and a reply read back as a tool call.

The template that renders a request (an adapter's own, else the base's) decides how tools are shown: one
with a tool format of its own (Qwen's, Hermes', Llama 3.1's) is given the tools and the earlier calls as it
expects them; for one without (the default model's), the tools are described in a system message asking
for `{"name": ..., "arguments": {...}}`. With `tool_choice` `required` or a named
function the reply is constrained to exactly that JSON (server.engine.constraint), so its arguments always
parse and follow the function's parameter schema; with `auto` the model may answer in text, and a reply
that is such a JSON object naming a tool (bare or in `<tool_call>` tags) is returned as a call.
"""

from __future__ import annotations

import functools
import json
import uuid

from jinja2 import TemplateError

from server.engine.constraint import Grammar, Grammars

INSTRUCTIONS = ("You can call the functions listed in <tools>. To call one, reply with only a JSON object "
                '{"name": <function name>, "arguments": <an object of its parameters>} and nothing else.')


PROBE_TOOL = {"type": "function", "function": {"name": "loraplex_probe_tool", "description": "",
                                               "parameters": {"type": "object", "properties": {}}}}


def renders_tools(tokenizer, template: str | None) -> bool:
    """Whether a chat template has a tool format: it shows a tool it is given. Templates without one ignore
    `tools`, so their prompt would not mention the tools at all."""
    if not template:
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[PROBE_TOOL],
                                             chat_template=template, add_generation_prompt=True, tokenize=False)
    except (TemplateError, TypeError, ValueError):
        return False
    return PROBE_TOOL["function"]["name"] in text


def tool_formats(tokenizer, templates: int = 256):
    """`renders_tools` probed once per template text (the base's and each adapter's); the most recent
    `templates` are kept, as adapters come and go."""
    return functools.lru_cache(maxsize=templates)(functools.partial(renders_tools, tokenizer))


def for_template(messages: list[dict], tools: list[dict] | None, native: bool) -> tuple[list[dict], list | None]:
    """The conversation and tools as the template that renders them takes them. `messages` carry earlier calls
    structured (`tool_calls`, `tool_call_id`); a `native` template (one with a tool format) gets them and the
    tools as they are, any other the calls written into the text and the tools described in a system message."""
    if tools and native:
        return messages, tools
    messages = [written_out(m) for m in messages]
    return (with_tools(messages, tools) if tools else messages), None


def written_out(message: dict) -> dict:
    """A message with its earlier calls appended to its text, as the model was asked to write them."""
    if "tool_calls" not in message and "tool_call_id" not in message:
        return message
    text = (message.get("content") or "") + "".join(json.dumps(c["function"]) for c in message.get("tool_calls") or ())
    rest = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
    return {**rest, "content": text}


def with_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation with the tools described in its system message (one is added if it has none)."""
    described = f"{INSTRUCTIONS}\n<tools>\n{json.dumps([t['function'] for t in tools])}\n</tools>"
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{described}"}, *messages[1:]]
    return [{"role": "system", "content": described}, *messages]


def call_grammar(grammars: Grammars, tools: list[dict], only: str | None = None) -> Grammar:
    """A reply that is one call of a tool (of `only`, if named), its arguments per the tool's parameters."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}}}
               for t in tools if only is None or t["function"]["name"] == only]
    return grammars.json_schema(options[0] if len(options) == 1 else {"anyOf": options})


def parse_call(text: str, tools: list[dict]) -> dict | None:
    """The OpenAI tool call a reply makes, or None when it is plain text."""
    body = text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>").strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    names = {t["function"]["name"] for t in tools}
    if not (isinstance(call, dict) and call.get("name") in names):
        return None
    arguments = call.get("arguments", call.get("parameters"))  # Llama 3.1's templates ask for "parameters"
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments)}}
