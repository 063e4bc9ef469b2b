"""One LLM step over an OpenAI-compatible ``/chat/completions`` API, optionally per item.

With ``items`` every item is one call whose answer is written to ``items/NNNNN.json``
before the checkpoint moves past it, so a restarted run skips nothing and repeats (and
pays for) at most the one item that was in flight. All prompts are rendered before the
first call: a typo in a placeholder should cost nothing, not fail at item 37.

The API key is read from its variable or file at each call, so rotating it needs no
restart, and it is scrubbed from provider error messages (some echo it back). A response
that does not hold a string answer is an error: an empty result that looks like success
is the worst outcome for unattended work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agentd.config import AgentConfig, TaskConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv
from agentd.executors.http import describe, parse_retry_after
from agentd.models import Result

_RETRYABLE = frozenset({408, 425, 429})
_PERMANENT = frozenset({400, 401, 403, 404})


class _Failed(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(result.error)
        self.result = result


@dataclass(frozen=True)
class _Reply:
    content: str
    input_tokens: int
    output_tokens: int
    usage_missing: bool

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        if self.usage_missing:
            usage["usage_missing"] = True
        return usage


def _api_key(cfg: AgentConfig) -> str | None:
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            error = f"API key variable {cfg.api_key_env} is not set"
            raise _Failed(Result(ok=False, error=error, retryable=False))
        return key
    if cfg.api_key_file:
        try:
            key = cfg.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            error = f"cannot read API key file {cfg.api_key_file}: {exc.strerror}"
            raise _Failed(Result(ok=False, error=error, retryable=False)) from None
        if not key:
            error = f"API key file {cfg.api_key_file} is empty"
            raise _Failed(Result(ok=False, error=error, retryable=False))
        return key
    return None


def render(template: str, values: dict[str, Any], item: int | None = None) -> str:
    where = "" if item is None else f" for item {item}"
    try:
        return template.format_map(values)
    except KeyError as exc:
        names = ", ".join(sorted(values)) or "none"
        error = f"prompt placeholder {{{exc.args[0]}}}{where} has no value (have: {names})"
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        error = f"cannot render prompt{where}: {exc}"
    raise _Failed(Result(ok=False, error=error, retryable=False))


def _parse(resp: httpx.Response) -> _Reply:
    try:
        data = resp.json()
    except ValueError as exc:
        raise ValueError(f"body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("top level is not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = _error_message(data)  # some proxies answer 200 with an error object
        raise ValueError(f"no choices (error: {error})" if error else "no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, not a string")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}

    def count(name: str) -> int | None:
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    prompt_tokens, completion_tokens = count("prompt_tokens"), count("completion_tokens")
    missing = prompt_tokens is None or completion_tokens is None
    return _Reply(content, prompt_tokens or 0, completion_tokens or 0, missing)


def _error_message(data: Any) -> str | None:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return error if isinstance(error, str) else None


def _provider_message(resp: httpx.Response, key: str | None) -> str:
    try:
        message = _error_message(resp.json())
    except ValueError:
        message = None
    text = _scrub(message if message is not None else resp.text, key)
    return " ".join(text[:300].split())  # one line, even from an HTML error page


class _Chat:
    def __init__(
        self, cfg: AgentConfig, ctx: RunContext, client: httpx.AsyncClient, values: dict[str, Any]
    ) -> None:
        self.cfg, self.ctx, self.client, self.values = cfg, ctx, client, values
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.provider = httpx.URL(cfg.base_url).host

    async def __call__(self, prompt: str, item: int | None) -> _Reply:
        cfg = self.cfg
        key = _api_key(cfg)
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": cfg.model, "messages": messages}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        started = time.monotonic()
        try:
            resp = await self.client.post(self.url, json=body, headers=headers)
        except httpx.TimeoutException:
            error = f"request timed out after {cfg.request_timeout:g}s"
            raise _Failed(Result(ok=False, error=error, retryable=True)) from None
        except httpx.TransportError as exc:
            raise _Failed(Result(ok=False, error=describe(exc), retryable=True)) from None
        except httpx.HTTPError as exc:
            raise _Failed(Result(ok=False, error=describe(exc))) from None
        duration = time.monotonic() - started
        reply, problem = None, None
        if resp.is_success:
            try:
                reply = _parse(resp)
            except ValueError as exc:
                problem = str(exc)
        self._record(resp.status_code, reply, duration, item)
        if reply is not None:
            return reply
        status = resp.status_code
        if problem is not None:
            error = f"malformed response: {_scrub(problem, key)[:300]}"
            raise _Failed(Result(ok=False, error=error, http_status=status))
        message = _provider_message(resp, key)
        retryable = None if status not in _PERMANENT else False
        if status in _RETRYABLE or status >= 500:
            retryable = True
        raise _Failed(
            Result(
                ok=False,
                error=f"HTTP {status}: {message}" if message else f"HTTP {status}",
                http_status=status,
                retry_after_s=parse_retry_after(resp.headers.get("retry-after")),
                retryable=retryable,
            )
        )

    def _record(self, status: int, reply: _Reply | None, duration: float, item: int | None) -> None:
        call: dict[str, Any] = {
            "provider": self.provider,
            "model": self.cfg.model,
            "input_tokens": reply.input_tokens if reply else 0,
            "output_tokens": reply.output_tokens if reply else 0,
            "duration_s": round(duration, 3),
            "status": status,
            "item": item,
        }
        if reply is not None and reply.usage_missing:
            call["usage_missing"] = True
        self.ctx.record_llm_call(call)


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def _write(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves half an answer behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _resume_point(ctx: RunContext, n: int) -> int:
    saved = ctx.checkpoint.load({"next_item": 0})
    start = saved.get("next_item", 0) if isinstance(saved, dict) else 0
    return min(max(start, 0), n) if isinstance(start, int) else 0


async def _each(chat: _Chat, ctx: RunContext, items: list[Any], start: int) -> Result:
    prompts = [
        render(chat.cfg.prompt, {**chat.values, "item": items[i]}, i)
        for i in range(start, len(items))
    ]
    (ctx.workspace / "items").mkdir(exist_ok=True)
    totals = {"input_tokens": 0, "output_tokens": 0}
    missing = False
    for i, prompt in enumerate(prompts, start):
        try:
            reply = await chat(prompt, i)
        except _Failed as failed:
            progress = {"item": i, "items": len(items), "resumed_from": start, **totals}
            raise _Failed(dataclasses.replace(failed.result, detail=progress)) from None
        record = {"item": items[i], "content": reply.content, "usage": reply.usage()}
        _write(ctx.workspace / "items" / f"{i:05d}.json", json.dumps(record, default=str))
        ctx.checkpoint.save({"next_item": i + 1})  # StopRequested propagates from here
        totals["input_tokens"] += reply.input_tokens
        totals["output_tokens"] += reply.output_tokens
        missing = missing or reply.usage_missing
        ctx.heartbeat()
    detail: dict[str, Any] = {"items": len(items), "resumed_from": start, **totals}
    detail["processed"] = len(items) - start
    if missing:
        detail["usage_missing"] = True
    return Result(ok=True, detail=detail)


async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv) -> Result:
    cfg = task.agent
    assert cfg is not None
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    try:
        async with httpx.AsyncClient(timeout=cfg.request_timeout) as client:
            chat = _Chat(cfg, ctx, client, {**task.params, **ctx.params})
            if cfg.items is not None:
                start = _resume_point(ctx, len(cfg.items))
                return await _each(chat, ctx, cfg.items, start)
            reply = await chat(render(cfg.prompt, chat.values), None)
            _write(ctx.workspace / "result.md", reply.content)
            return Result(ok=True, detail=reply.usage())
    except _Failed as failed:
        return failed.result
