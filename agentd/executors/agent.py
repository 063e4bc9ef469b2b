"""One LLM step over an OpenAI-compatible ``/chat/completions`` API, optionally per item;
with ``tools`` or ``mcp``, the tool-calling loop of ``agentd.executors.toolloop``.

Calls go through ``ctx.llm`` (``agentd.providers``): the provider's shared client, a
budget reservation before every call, the ledger after it. With ``items`` every item is
one call whose answer is written to ``items/NNNNN.json`` before the checkpoint counts
it done, so a restarted run skips nothing and repeats (and pays for) at most the items
that were in flight: one, or ``items_concurrency``, that many calls at once taking the
items in order. The checkpoint is the set of done items as ``{"next_item": k, "done":
[...]}``: every item below ``k`` is done, and ``done`` lists those above it (absent when
none; ``{"next_item": k}`` alone is what a sequential run saves, as before). When one
item fails (or its call does not fit a budget), no further item is started, the calls
in flight finish and are kept, and the run ends with that item's error. A stop at a
checkpoint (the daemon draining) cancels the calls in flight: their items are asked
again on resume. Every call in flight holds its worst-case reservation, so a budget
holds at any concurrency; a call refused only because of the others' reservations
waits for one of them to settle and asks again (each refusal is a ``budget_refused``
event), and the run ends ``budget_exhausted`` only when a call is refused with none in
flight. All prompts are rendered before the first call: a typo in a
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

import asyncio
import json
from functools import partial
from pathlib import Path
from typing import Any, cast

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


def _done_items(ctx: RunContext, n: int) -> set[int]:
    """The items the run's checkpoint counts done (below ``n``; a damaged or foreign
    checkpoint counts none)."""
    saved = ctx.checkpoint.load({"next_item": 0})
    if not isinstance(saved, dict):
        return set()
    start = saved.get("next_item", 0)
    done = set(range(min(max(start, 0), n))) if isinstance(start, int) else set()
    extra = saved.get("done", [])
    if isinstance(extra, list):
        done.update(i for i in extra if isinstance(i, int) and 0 <= i < n)
    return done


def _checkpoint(done: set[int]) -> dict[str, Any]:
    """``done`` as ``{"next_item": k, "done": [...]}``: all below ``k`` done, ``done``
    the ones above it (left out when there are none)."""
    k = 0
    while k in done:
        k += 1
    above = sorted(i for i in done if i > k)
    return {"next_item": k, "done": above} if above else {"next_item": k}


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


def _moved(settles: list[int], seen: int, failed: list[Result]) -> bool:
    """Another call settled since ``seen``, or an item failed: time to look again."""
    return settles[0] > seen or bool(failed)


async def _each(cfg: AgentConfig, ctx: RunContext, values: dict[str, Any]) -> Result:
    items = cfg.items or []
    done = _done_items(ctx, len(items))
    resumed_from = len(done)
    pending = [i for i in range(len(items)) if i not in done]
    prompts = {i: render(cfg.prompt, {**values, "item": items[i]}, i) for i in pending}
    (ctx.workspace / "items").mkdir(exist_ok=True)
    totals: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    flags = {"usage_missing": False}
    failed: list[Result] = []
    order = iter(pending)  # shared by the workers: each takes the next item in order
    flying, settles = [0], [0]
    settled = asyncio.Condition()

    async def ask(i: int) -> tuple[Reply, Any]:
        """Item ``i``'s answer. A call the budget refuses while others are in flight
        waits for one of them to settle and asks again: their reservations are worst
        cases, and what they really cost may leave room. Refused with none in flight,
        the budget is out (BudgetExhausted)."""
        while True:
            flying[0] += 1
            seen = settles[0]
            retry = False
            try:
                reply = await _ask(cfg, ctx, prompts[i], i)
                return reply, _output(cfg, reply)
            except BudgetExhausted:
                if flying[0] <= 1 or failed:
                    raise
                retry = True
            finally:
                flying[0] -= 1
                settles[0] += 1
                async with settled:
                    settled.notify_all()
            if retry:
                async with settled:
                    await settled.wait_for(partial(_moved, settles, seen + 1, failed))

    async def worker() -> None:
        for i in order:
            if failed:
                return
            try:
                reply, value = await ask(i)
            except (LLMError, BudgetExhausted) as exc:
                progress = {"item": i, "items": len(items), "resumed_from": resumed_from}
                failed.append(exc.result({**progress, **totals}))
                return
            record = {"item": items[i], "content": reply.content, "usage": reply.usage()}
            if cfg.response_format is not None:
                record["output"] = value
            _write(ctx.workspace / "items" / f"{i:05d}.json", json.dumps(record, default=str))
            done.add(i)
            totals["input_tokens"] += reply.input_tokens
            totals["output_tokens"] += reply.output_tokens
            totals["cost_usd"] = round(totals["cost_usd"] + reply.cost_usd, 9)
            flags["usage_missing"] = flags["usage_missing"] or reply.usage_missing
            ctx.checkpoint.save(_checkpoint(done))  # StopRequested propagates from here
            ctx.progress(len(done), len(items))

    width = min(cfg.items_concurrency or 1, len(pending))
    if width <= 1:
        await worker()
    else:
        workers = [asyncio.ensure_future(worker()) for _ in range(width)]
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # a stop, a cancel or one worker's error: the others go too
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        for w in workers:
            if not w.cancelled() and w.exception() is not None:
                raise cast(BaseException, w.exception())
    if failed:
        raise _Failed(failed[0])
    detail: dict[str, Any] = {"items": len(items), "resumed_from": resumed_from, **totals}
    detail["processed"] = len(items) - resumed_from
    if flags["usage_missing"]:
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
            return await _each(cfg, ctx, values)
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
