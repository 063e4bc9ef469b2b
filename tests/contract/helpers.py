"""What the contract tests share: the clock they use, the tasks every state starts with,
the instances a test opens (``States``) and short ways to fire, claim and finish
through the port."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentd.models import Outcome, Row, RunStatus
from agentd.state.port import EventSink, Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TASKS = {"a": ("fp1", "command"), "b": ("fp2", "command")}
N_ROUNDS = 12

Engine = Callable[[Path, EventSink | None], Store]
"""Opens an instance of one engine on the state kept under a directory (the directory
exists), handing each committed event to the sink."""


class States:
    """The engine instances one test opens, each closed at the test's end (unless the
    test closed it itself, to open the state again)."""

    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        self.root = root
        self._open: list[Store] = []

    def open(self, name: str = "state", sink: EventSink | None = None) -> Store:
        """An instance on the state called ``name`` (a new, empty one the first time)."""
        where = self.root / name
        where.mkdir(exist_ok=True)
        store = self.engine(where, sink)
        self._open.append(store)
        return store

    def close(self, store: Store) -> None:
        """Close ``store`` now (the process that held it stops cleanly)."""
        self._open.remove(store)
        store.close()

    def close_all(self) -> None:
        """Close every instance still open, the last opened first; raises the first
        failure once all are closed."""
        failed: list[BaseException] = []
        while self._open:
            try:
                self._open.pop().close()
            except BaseException as exc:
                failed.append(exc)
        if failed:
            raise failed[0]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fire_at(store: Store, task_id: str, seconds: float, **kwargs: Any) -> str:
    """A scheduled fire for ``T0 + seconds`` at that same moment; returns the run id."""
    result = store.fire(task_id, at(seconds), scheduled_for=at(seconds), **kwargs)
    assert result.created
    return result.run_id


def claim_one(store: Store, now: datetime, owner: str = "w1", lease_s: float = 30) -> Row:
    rows = store.claim(now, owner, lease_s, 1, set(), set())
    assert len(rows) == 1, rows
    return rows[0]


def kinds(store: Store, run_id: str | None = None) -> list[str]:
    return [e["kind"] for e in store.events(run_id=run_id)]


def events_of_kind(store: Store, kind: str) -> list[Row]:
    return [e for e in store.events() if e["kind"] == kind]


def run_and_finish(
    store: Store,
    task_id: str,
    seconds: float,
    outcome: Outcome,
    next_status: RunStatus,
    **kwargs: Any,
) -> str:
    """Fire, claim and finish one run of ``task_id`` around ``T0 + seconds``."""
    run_id = fire_at(store, task_id, seconds, honour_pause=False)
    row = claim_one(store, at(seconds))
    assert row["id"] == run_id
    store.finish(run_id, at(seconds + 1), outcome=outcome, next_status=next_status, **kwargs)
    return run_id


def quarantine(store: Store, seconds: float, pause_after: int = 2) -> str:
    """One run of ``a`` that fails into quarantine around ``T0 + seconds``."""
    return run_and_finish(
        store,
        "a",
        seconds,
        Outcome.FAILURE,
        RunStatus.QUARANTINED,
        error="boom",
        pause_after_failures=pause_after,
    )
