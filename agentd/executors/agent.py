"""One LLM step over an OpenAI-compatible ``/chat/completions`` API, optionally per item;
with ``tools`` or ``mcp``, the tool-calling loop of ``agentd.executors.toolloop``.

Calls go through ``ctx.llm`` (``agentd.providers``): the provider's shared client, a
budget reservation before every call, the ledger after it. With ``items`` every item is
one call whose answer is written to ``items/NNNNN.json`` before the checkpoint moves
past it, so a restarted run skips nothing and repeats (and pays for) at most the one
item that was in flight. All prompts are rendered before the first call: a typo in a
placeholder should cost nothing, not fail at item 37.

When the next call does not fit a budget the run stops right there, its checkpoint
already saved, and ends ``budget_exhausted``. A response that does not hold a string
answer is an error: an empty result that looks like success is the worst outcome for
unattended work.

With ``response_format`` every call asks for it and every answer must be JSON matching
its schema (``agentd.executors.output``): the single answer is written as
``result.json`` too and is the result's ``output``; an item's is its record's
``output``. An answer that does not match is an ``invalid_output`` error (retryable)
before anything of it is written: a retry asks again, for an item from that item on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agentd import tls
from agentd.config import AgentConfig, TaskConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv, output
from agentd.models import Result
from agentd.providers import BudgetExhausted, LLMError, Reply


class _Failed(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(result.error)
        self.result = result


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


def _write(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves half an answer behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _resume_point(ctx: RunContext, n: int) -> int:
    saved = ctx.checkpoint.load({"next_item": 0})
    start = saved.get("next_item", 0) if isinstance(saved, dict) else 0
    return min(max(start, 0), n) if isinstance(start, int) else 0


async def _ask(cfg: AgentConfig, ctx: RunContext, prompt: str, item: int | None) -> Reply:
    return await ctx.llm.achat(
        prompt,
        system=cfg.system,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        read_timeout=cfg.request_timeout,
        item=item,
        response_format=cfg.response_format.wire() if cfg.response_format else None,
    )


def _output(cfg: AgentConfig, reply: Reply) -> Any:
    """The parsed answer with ``response_format`` (None without); LLMError otherwise."""
    return None if cfg.response_format is None else output.check(cfg.response_format, reply.content)


async def _each(cfg: AgentConfig, ctx: RunContext, values: dict[str, Any], start: int) -> Result:
    items = cfg.items or []
    prompts = [
        render(cfg.prompt, {**values, "item": items[i]}, i) for i in range(start, len(items))
    ]
    (ctx.workspace / "items").mkdir(exist_ok=True)
    totals: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    missing = False
    for i, prompt in enumerate(prompts, start):
        try:
            reply = await _ask(cfg, ctx, prompt, i)
            value = _output(cfg, reply)
        except (LLMError, BudgetExhausted) as exc:
            progress = {"item": i, "items": len(items), "resumed_from": start, **totals}
            raise _Failed(exc.result(progress)) from None
        record = {"item": items[i], "content": reply.content, "usage": reply.usage()}
        if cfg.response_format is not None:
            record["output"] = value
        _write(ctx.workspace / "items" / f"{i:05d}.json", json.dumps(record, default=str))
        ctx.checkpoint.save({"next_item": i + 1})  # StopRequested propagates from here
        totals["input_tokens"] += reply.input_tokens
        totals["output_tokens"] += reply.output_tokens
        totals["cost_usd"] = round(totals["cost_usd"] + reply.cost_usd, 9)
        missing = missing or reply.usage_missing
        ctx.progress(i + 1, len(items))
    detail: dict[str, Any] = {"items": len(items), "resumed_from": start, **totals}
    detail["processed"] = len(items) - start
    if missing:
        detail["usage_missing"] = True
    return Result(ok=True, detail=detail)


async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv) -> Result:
    cfg = task.agent
    assert cfg is not None
    await tls.prepare()  # so the provider's client is made without stalling the loop
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    values = {**task.params, **ctx.params}
    try:
        if cfg.tools or cfg.mcp:
            from agentd.executors import toolloop

            return await toolloop.execute(task, ctx, env, render(cfg.prompt, values))
        if cfg.items is not None:
            return await _each(cfg, ctx, values, _resume_point(ctx, len(cfg.items)))
        try:
            reply = await _ask(cfg, ctx, render(cfg.prompt, values), None)
            value = _output(cfg, reply)
        except (LLMError, BudgetExhausted) as exc:
            return exc.result()
        _write(ctx.workspace / "result.md", reply.content)
        detail = reply.usage()
        if cfg.response_format is not None:
            output.write(ctx.workspace, value)
            detail["output"] = value
        return Result(ok=True, detail=detail)
    except _Failed as failed:
        return failed.result
