"""Structured final output of an agent (``agent.response_format``): the answer must be
JSON that matches the schema (Draft 2020-12), whatever the provider promised.

``check`` gives the parsed answer or raises ``LLMError`` of category
``invalid_output``, retryable: a model that answered badly once may answer well the
next time, and when the task's retries run out the run is quarantined like any other
retryable failure. Its message names where the answer breaks the schema (a JSON
pointer, ``/`` for the top). ``write`` puts a valid answer in ``result.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentd.config import ResponseFormatConfig
from agentd.providers import LLMError

CATEGORY = "invalid_output"


def pointer(path: Any) -> str:
    """A JSON pointer (RFC 6901) of a jsonschema error's path."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts)


def problem(fmt: ResponseFormatConfig, text: str) -> tuple[Any, str | None, str | None]:
    """(the answer, None, None) when ``text`` is JSON matching ``fmt``'s schema, else
    (None, where, what is wrong). Pure."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, "/", f"the answer is not JSON ({exc})"
    import jsonschema

    errors = sorted(
        jsonschema.Draft202012Validator(fmt.json_schema).iter_errors(value),
        key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))),
    )
    if errors:
        first = errors[0]
        return None, pointer(first.absolute_path), first.message
    return value, None, None


def check(fmt: ResponseFormatConfig, text: str) -> Any:
    """The parsed answer; ``LLMError`` (``invalid_output``, retryable) when it is not JSON
    matching the schema."""
    value, where, what = problem(fmt, text)
    if where is not None:
        raise invalid(fmt, where, str(what))
    return value


def invalid(fmt: ResponseFormatConfig, where: str, what: str) -> LLMError:
    message = f"invalid output: the answer does not match response_format {fmt.name}"
    message += f" at {where}: {what}"
    return LLMError(message[:500], retryable=True, category=CATEGORY)


def write(workspace: Path, value: Any) -> None:
    """``result.json``, written then renamed (a crash never leaves half of it)."""
    path = workspace / "result.json"
    tmp = path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
