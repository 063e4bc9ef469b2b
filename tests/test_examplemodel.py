"""The built-in example model (agentd.examplemodel): what it answers, from the request
alone. It runs end to end in tests/test_toolloop.py and tests/test_e2e_agent.py (the
shipped config's host-check-offline); here, the cases the shipped config does not show."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from agentd import examplemodel


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {}}}


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}


def message(body: dict[str, Any]) -> dict[str, Any]:
    reply = examplemodel.answer(body)
    [choice] = reply["choices"]
    return dict(choice["message"])


def test_it_calls_each_tool_once_with_arguments_from_the_schema_then_answers() -> None:
    params = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "examples": ["/srv"]},
            "depth": {"type": "integer", "default": 2},
            "mode": {"enum": ["fast", "slow"]},
            "flag": {"type": "boolean"},
            "ignored": {"type": "string"},
        },
        "required": ["path", "depth", "mode", "flag"],
    }
    tools = [tool("scan", params), tool("ping")]
    first = [{"role": "user", "content": "Go."}]
    asked = message({"messages": first, "tools": tools})
    assert asked["content"] is None
    calls = asked["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["scan", "ping"]
    assert json.loads(calls[0]["function"]["arguments"]) == {
        "path": "/srv",
        "depth": 2,
        "mode": "fast",
        "flag": True,
    }
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    assert len({c["id"] for c in calls}) == 2
    results = [
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "x" * 500},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "error: down"},
    ]
    later = [*first, asked, *results]
    final = message({"messages": later, "tools": tools})
    assert "tool_calls" not in final
    assert final["content"].startswith(examplemodel.LABEL + ": 2 tool result(s). scan: xxx")
    assert "..." in final["content"] and "; ping: error: down" in final["content"]
    assert examplemodel.answer({"messages": later, "tools": tools}) == examplemodel.answer(
        {"messages": later, "tools": tools}
    )  # deterministic


def test_a_structured_answer_fits_plain_schemas() -> None:
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 5},
            "level": {"enum": ["low", "high"]},
            "lines": {"type": "array", "items": {"type": "string"}, "maxItems": 1},
            "note": {"type": ["string", "null"], "maxLength": 10},
            "pick": {"anyOf": [{"type": "number"}, {"type": "string"}]},
            "nested": {"type": "object", "properties": {"k": {"const": 1}}},
        },
        "required": ["ok", "count", "level", "lines", "note", "pick", "nested"],
        "additionalProperties": False,
    }
    messages = [
        {"role": "user", "content": "Judge."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "a", "function": {"name": "t", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "a", "content": "error: no"},
    ]
    value = json.loads(message({"messages": messages, "response_format": fmt(schema)})["content"])
    jsonschema.Draft202012Validator(schema).validate(value)
    assert value["ok"] is False and value["count"] == 5 and value["lines"] == ["t: error: no"]
    assert len(value["note"]) == 10 and value["nested"] == {"k": 1}


def test_without_tools_it_answers_at_once_and_counts_usage() -> None:
    reply = examplemodel.answer(
        {"model": "m", "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 3}
    )
    assert reply["choices"][0]["message"]["content"] == (
        f"{examplemodel.LABEL}: no tool results; the prompt was: Hello there."
    )
    assert reply["model"] == "m" and reply["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body", [{}, {"messages": "hi"}, {"messages": [1]}])
def test_what_is_not_a_chat_request_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="messages must be a list of objects"):
        examplemodel.answer(body)
