"""The run context handed to executors and to users' Python callables.

A sync callable runs in a worker thread while the state DB belongs to the event loop
thread, so every call that touches state is marshalled onto the loop and waited for:
``checkpoint.save()`` returns only once the checkpoint is durable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agentd.models import StopRequested

if TYPE_CHECKING:
    from agentd.providers import RunLLM

T = TypeVar("T")


class ContextBackend(Protocol):
    """What the runner provides behind a context; all methods run on the loop thread."""

    def load_checkpoint(self, run_id: str) -> Any | None: ...
    def save_checkpoint(self, run_id: str, data: Any) -> None: ...
    def progress(self, run_id: str, done: int, total: int | None, message: str) -> None: ...
    def heartbeat(self, run_id: str) -> None: ...
    def agent_steps(self, run_id: str) -> list[dict[str, Any]]: ...
    async def record_agent_step(
        self, run_id: str, step: int, kind: str, call_id: str | None, payload: Any
    ) -> dict[str, Any]: ...


class Checkpoint:
    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def load(self, default: Any = None) -> Any:
        """The last saved checkpoint of this run (across restarts), or ``default``."""
        ctx = self._ctx
        value = ctx._on_loop(lambda: ctx._backend.load_checkpoint(ctx.run_id))
        return default if value is None else value

    def save(self, data: Any) -> None:
        """Durably store ``data`` (JSON-serialisable). Raises StopRequested after saving
        when the daemon is shutting down, so the run ends at a clean boundary."""
        ctx = self._ctx
        ctx._on_loop(lambda: ctx._backend.save_checkpoint(ctx.run_id, data))
        if ctx.stop_requested:
            raise StopRequested("stop requested at checkpoint")


class RunContext:
    def __init__(
        self,
        *,
        run_id: str,
        task_id: str,
        attempt: int,
        scheduled_for: datetime | None,
        params: dict[str, Any],
        workspace: Path,
        backend: ContextBackend,
        loop: asyncio.AbstractEventLoop,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        llm: RunLLM | None = None,
    ) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.attempt = attempt
        self.scheduled_for = scheduled_for
        self.params = params
        self.workspace_path = workspace
        self._workspace_made = False
        self.log = logger
        self.checkpoint = Checkpoint(self)
        self._backend = backend
        self._llm = llm
        self._loop = loop
        self._loop_thread = threading.get_ident()
        # Plain flags, read from the run's thread: nothing waits on them, and two
        # threading.Events (a Condition and a lock each) were a tenth of starting a run.
        self._cancelled = False
        self._stopping = False

    @property
    def workspace(self) -> Path:
        """The run's own directory, created on first use: a run that writes nothing
        costs no directory (on some filesystems a mkdir is half a millisecond of CPU)."""
        if not self._workspace_made:
            self.workspace_path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._workspace_made = True
        return self.workspace_path

    @property
    def llm(self) -> RunLLM:
        """Chat completions through the task's provider, metered against its budgets:
        ``await ctx.llm.achat("prompt")`` or, from a sync callable, ``ctx.llm.chat(...)``."""
        if self._llm is None:
            raise RuntimeError("this run context has no LLM gateway")
        return self._llm

    # -- signals from the runner
    @property
    def cancelled(self) -> bool:
        """True once the run is cancelled or timed out; long work should check it."""
        return self._cancelled

    @property
    def stop_requested(self) -> bool:
        """True while the daemon drains for shutdown: stop at the next checkpoint."""
        return self._stopping or self._cancelled

    def request_cancel(self) -> None:
        self._cancelled = True

    def request_stop(self) -> None:
        self._stopping = True

    # -- reporting
    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        self._on_loop(lambda: self._backend.progress(self.run_id, done, total, message))

    def heartbeat(self) -> None:
        self._on_loop(lambda: self._backend.heartbeat(self.run_id))

    # -- an agent's durable steps (``agentd.executors.toolloop``)
    def agent_steps(self) -> list[dict[str, Any]]:
        """This run's recorded steps, across restarts and attempts, in order."""
        return self._on_loop(lambda: self._backend.agent_steps(self.run_id))

    async def record_agent_step(
        self, step: int, kind: str, call_id: str | None, payload: Any
    ) -> dict[str, Any]:
        """Durably append one step; returns the record as kept (its ``seq`` and
        ``recorded_at``, the payload scrubbed of secrets) once it is durable
        (``CheckpointNotSaved`` when the state could not take it: the run then stops
        and resumes from there). On the loop (the tool loop's own coroutine): the write
        rides the runner's next group commit, and the loop goes on meanwhile."""
        return await self._backend.record_agent_step(self.run_id, step, kind, call_id, payload)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        if threading.get_ident() == self._loop_thread:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return fut.result()
