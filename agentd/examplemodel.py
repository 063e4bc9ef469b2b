"""The example model: a deterministic stand-in for an LLM, built into agentd so that the
shipped config's agent example runs offline. It is NOT a language model: it reads no
meaning, judges nothing, and says so in every answer.

A provider whose ``base_url`` is ``builtin:example`` (``URL``) gets its answers from
``answer`` instead of the network (``agentd.providers`` hands it the request body that
would have been POSTed to ``/chat/completions``); everything else about the call (the
budget reservation, the ledger, the response parsing, the tool loop) is the real one.

What it answers, from the request alone (so a replayed conversation gets the same
answer, and two runs of one task get the same calls):

- offered ``tools`` that no earlier assistant message of the conversation called: a
  reply that calls each of them once, all in that reply, with arguments made from the
  tool's parameter schema (each property's first ``examples`` entry, else its
  ``default``, ``const`` or first ``enum`` value, else a plain value of its type);
- otherwise an answer that lists the tool results it was sent (each clipped);
- with a ``json_schema`` ``response_format``, that answer as JSON made to fit the
  schema (a string gets the summary, a boolean whether every tool call succeeded, a
  number how many results there are, an array one item per result): it handles plain
  schemas (objects, arrays, scalars, enums, ``anyOf``), not ``$ref`` or patterns, and
  agentd checks its output like any model's.

Usage is counted at four characters a token, the completion at most ``max_tokens``.
A leaf: imports nothing of agentd.
"""

from __future__ import annotations

import json
import math
from typing import Any

URL = "builtin:example"
"""The ``base_url`` that selects the example model."""

MODEL = "example"
"""The model name the shipped config gives it (any name is answered the same)."""

LABEL = "example model (agentd built-in, not an LLM)"
RESULT_CLIP = 200
"""Characters of each tool result quoted in the answer."""


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions response body for request ``body``. Pure; ValueError when
    the body is not a chat-completions request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of objects")
    calls = _calls(body.get("tools"), messages)
    message: dict[str, Any]
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        finish = "tool_calls"
    else:
        message = {"role": "assistant", "content": _final(messages, body.get("response_format"))}
        finish = "stop"
    prompt = _tokens(json.dumps(messages) + json.dumps(body.get("tools") or []))
    completion = _tokens(json.dumps(message))
    cap = body.get("max_tokens")
    if isinstance(cap, int) and cap > 0:
        completion = min(completion, cap)
    return {
        "id": f"example-{len(messages)}",
        "object": "chat.completion",
        "model": str(body.get("model") or MODEL),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _called(messages: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return names


def _calls(tools: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A call of each offered tool not called yet; ids unique in the conversation."""
    if not isinstance(tools, list):
        return []
    called = _called(messages)
    turn = sum(1 for m in messages if m.get("role") == "assistant") + 1
    calls: list[dict[str, Any]] = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name in called:
            continue
        schema = fn.get("parameters") if isinstance(fn, dict) else None
        arguments = _arguments(schema if isinstance(schema, dict) else {})
        calls.append(
            {
                "id": f"example-{turn}-{len(calls) + 1}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        )
    return calls


def _arguments(schema: dict[str, Any]) -> dict[str, Any]:
    """The required properties, each with the schema's own example of it."""
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    out: dict[str, Any] = {}
    for name in required:
        spec = properties.get(name) if isinstance(properties, dict) else None
        out[name] = _example(spec if isinstance(spec, dict) else {})
    return out


def _example(spec: dict[str, Any]) -> Any:
    examples = spec.get("examples")
    if isinstance(examples, list) and examples:
        return examples[0]
    for key in ("default", "const"):
        if key in spec:
            return spec[key]
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return spec["enum"][0]
    return _instance(spec, "", [], True)


def _results(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(tool name, content) of every tool message, in order."""
    names: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(call, dict) and isinstance(fn, dict):
                names[str(call.get("id"))] = str(fn.get("name"))
    return [
        (names.get(str(m.get("tool_call_id")), "?"), str(m.get("content") or ""))
        for m in messages
        if m.get("role") == "tool"
    ]


def _clip(text: str, width: int = RESULT_CLIP) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _final(messages: list[dict[str, Any]], response_format: Any) -> str:
    results = _results(messages)
    ok = all(not content.startswith("error:") for _, content in results)
    lines = [f"{name}: {_clip(content)}" for name, content in results]
    if results:
        summary = f"{LABEL}: {len(results)} tool result(s). " + "; ".join(lines)
    else:
        prompts = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
        prompt = _clip(prompts[-1] if prompts else "")
        summary = f"{LABEL}: no tool results; the prompt was: {prompt}"
    spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        value = _instance(schema if isinstance(schema, dict) else {}, summary, lines, ok)
        return json.dumps(value)
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return json.dumps({"summary": summary})
    return summary


def _instance(schema: dict[str, Any], text: str, lines: list[str], ok: bool) -> Any:
    """A value made to fit ``schema``: ``text`` for a string, ``ok`` for a boolean, how
    many ``lines`` for a number, one item per line for an array."""
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], dict):
            return _instance(options[0], text, lines, ok)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {
            name: _instance(spec if isinstance(spec, dict) else {}, text, lines, ok)
            for name, spec in properties.items()
        }
    if kind == "array":
        items = schema.get("items")
        items = items if isinstance(items, dict) else {}
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        count = max(low, len(lines))
        if isinstance(high, int):
            count = min(count, high)
        return [
            _instance(items, lines[i] if i < len(lines) else text, [], ok) for i in range(count)
        ]
    if kind in ("integer", "number"):
        value = len(lines)
        least, most = schema.get("minimum"), schema.get("maximum")
        if isinstance(least, (int, float)):
            value = max(value, math.ceil(least))
        if isinstance(most, (int, float)):
            value = min(value, math.floor(most))
        return value
    if kind == "boolean":
        return ok
    if kind == "null":
        return None
    width = schema.get("maxLength")
    return text[:width] if isinstance(width, int) and width >= 0 else text
