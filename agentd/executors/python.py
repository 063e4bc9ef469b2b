"""Call a user's Python function, ``"package.module:function"``, with the run context.

A coroutine function runs on the event loop. A plain function runs in one of the
daemon's reusable daemon threads (``agentd.threads``) rather than ``asyncio.to_thread``:
the default executor's threads are joined at interpreter exit, so one stuck callable
would hang daemon shutdown forever.

A thread cannot be killed. On cancellation (timeout, cancel, shutdown) the executor sets
``ctx.cancelled`` and stops waiting at once; the function keeps running until its next
checkpoint, where ``ctx.checkpoint.save()`` raises ``StopRequested``, or until it checks
``ctx.cancelled`` itself. Long sync work should do one or the other regularly.

``ctx.llm`` errors that the callable lets escape keep their meaning: a budget refusal
ends the run ``budget_exhausted``, a 401 is not retried, a 429 waits for Retry-After.

``StopRequested`` and ``CheckpointNotSaved`` (the state DB could not take a checkpoint)
escape unchanged: the runner records the run as interrupted, at no cost of an attempt, and
the next attempt resumes from the last saved checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

from agentd.config import TaskConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv
from agentd.models import CheckpointNotSaved, Result, StopRequested
from agentd.providers import BudgetExhausted, LLMError
from agentd.threads import DaemonThreads


class _ResolveError(Exception):
    pass


def resolve(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if module_name not in sys.modules:
        importlib.invalidate_caches()  # a module written after startup must be found
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise _ResolveError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    func: Callable[..., Any] | None = getattr(module, attr, None)
    if func is None:
        raise _ResolveError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(func):
        raise _ResolveError(f"{ref} is a {type(func).__name__}, not a function")
    return func


async def _in_thread(func: Callable[..., Any], ctx: RunContext, threads: DaemonThreads) -> Any:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def hand_over(value: Any, exc: BaseException | None) -> None:
        if fut.done():  # the run was cancelled meanwhile
            return
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)

    def run() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = func(ctx)
        except StopIteration as exc:  # a Future refuses it; the run would never end
            error = RuntimeError(f"StopIteration raised: {exc!r}").with_traceback(exc.__traceback__)
        except BaseException as exc:  # re-raised on the loop by ``await fut``
            error = exc
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(hand_over, value, error)

    threads.submit(run)
    return await fut


async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv) -> Result:
    cfg = task.python
    assert cfg is not None
    try:
        func = resolve(cfg.callable)
    except _ResolveError as exc:
        return Result(ok=False, error=str(exc), retryable=False)
    try:
        if inspect.iscoroutinefunction(func):
            value = await func(ctx)
        else:
            value = await _in_thread(func, ctx, env.threads)
            if inspect.isawaitable(value):
                value = await value
    except asyncio.CancelledError:
        ctx.request_cancel()
        raise
    except (StopRequested, CheckpointNotSaved):
        raise
    except (BudgetExhausted, LLMError) as exc:  # from ctx.llm, uncaught by the callable
        _save_traceback(ctx, exc)
        return exc.result()
    except (Exception, SystemExit) as exc:  # sys.exit() in a task fails it, not the daemon
        _save_traceback(ctx, exc)
        return Result(ok=False, error=f"{type(exc).__name__}: {exc}")
    if value is None:
        return Result(ok=True)
    try:
        text = json.dumps(value, default=str, indent=2)
    except (TypeError, ValueError):  # e.g. non-string keys or a cycle
        text = json.dumps(repr(value))
    try:
        (ctx.workspace / "result.json").write_text(text + "\n")
    except OSError as exc:
        return Result(ok=False, error=f"result.json not written: {exc.strerror}")
    return Result(ok=True, detail={"result_bytes": len(text) + 1})


def _save_traceback(ctx: RunContext, exc: BaseException) -> None:
    """traceback.txt beside the run's output; a workspace that cannot take it (a full
    disk) costs only the file, the run's error says what happened."""
    try:
        (ctx.workspace / "traceback.txt").write_text("".join(traceback.format_exception(exc)))
    except OSError as err:
        ctx.log.warning("traceback.txt not written: %s", err.strerror)
