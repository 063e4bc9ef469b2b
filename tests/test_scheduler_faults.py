"""The scheduler when a commit fails: of its fires (the state DB) or of its jobs (the
jobstore). On real SQLite files and a real event loop; a full disk is a small tmpfs."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from smallfs import small_fs

from agentd.clock import SystemClock, from_iso, to_iso
from agentd.config import Config, parse_config
from agentd.scheduler import Scheduler
from agentd.state.port import RunIds
from agentd.state.sqlite.engine import SqliteStore


def _config(tmp_path: Path, tasks: str) -> Config:
    return parse_config(f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}")


def _store(path: Path, config: Config) -> SqliteStore:
    store = SqliteStore(path)
    store.sync_tasks(
        {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, SystemClock().now()
    )
    return store


async def _until(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_a_fire_that_was_not_stored_fires_again_and_its_job_is_not_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A once task whose one fire cannot be stored: the job must not be removed (it
    would never fire), it fires again after a backoff, for the same instant."""
    when = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    config = _config(
        tmp_path,
        f"  once:\n    schedule: {{at: '{when.isoformat()}'}}\n    command: {{argv: ['true']}}\n"
        "  other:\n    schedule: {manual: true}\n    command: {argv: ['true']}\n",
    )
    store = _store(tmp_path / "state.sqlite", config)
    existing = store.fire("other", datetime.now(UTC), trigger="manual").run_id
    fresh = RunIds()
    colliding = True

    def ids(now: datetime) -> str:
        return existing if colliding else fresh(now)

    store.new_run_id = ids
    caplog.set_level(logging.WARNING, logger="agentd.scheduler")

    def once_runs() -> int:
        return int(
            store.conn.execute("SELECT count(*) FROM runs WHERE task_id='once'").fetchone()[0]
        )

    async def scenario() -> None:
        nonlocal colliding
        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite")
        scheduler.start(config)
        try:
            await _until(lambda: "fires not stored" in caplog.text, "a failed fire", 15)
            assert once_runs() == 0
            colliding = False
            await _until(lambda: once_runs() == 1, "the fire again", 30)
        finally:
            scheduler.shutdown()

    asyncio.run(scenario())
    runs = [dict(r) for r in store.conn.execute("SELECT * FROM runs WHERE task_id='once'")]
    store.close()
    assert len(runs) == 1
    assert from_iso(runs[0]["scheduled_for"]) == when
    assert runs[0]["idempotency_key"] == f"once@{to_iso(when)}"


def test_a_jobstore_that_cannot_be_written_keeps_firing_each_time_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(
        tmp_path,
        "  tick:\n    schedule: {every: 1s}\n    command: {argv: ['true']}\n    overlap: allow\n",
    )
    store = _store(tmp_path / "state.sqlite", config)
    heard: list[str | None] = []
    caplog.set_level(logging.INFO, logger="agentd.scheduler")
    with small_fs(tmp_path / "jobs", "2m") as fs:

        async def scenario() -> None:
            scheduler = Scheduler(store, SystemClock(), fs.root / "schedule.sqlite")
            scheduler.on_jobstore_fault(lambda exc: heard.append(None if exc is None else str(exc)))
            scheduler.start(config)
            try:
                runs = lambda: store.conn.execute("SELECT count(*) FROM runs").fetchone()[0]  # noqa: E731
                await _until(lambda: runs() >= 2, "two fires")
                fs.fill()
                await _until(lambda: heard and heard[-1], "the jobstore's failure", 15)
                at_fill = runs()
                await _until(lambda: runs() >= at_fill + 3, "fires while it cannot be written")
                fs.free()
                await _until(lambda: heard[-1] is None, "the jobstore writable again", 30)
                after = runs()
                await _until(lambda: runs() >= after + 2, "fires after")
            finally:
                scheduler.shutdown()

        asyncio.run(scenario())
        jobs = sqlite3.connect(fs.root / "schedule.sqlite")
        (next_run,) = jobs.execute("SELECT next_run_time FROM apscheduler_jobs").fetchone()
        jobs.close()
    fired = [
        from_iso(r[0]) for r in store.conn.execute("SELECT scheduled_for FROM runs ORDER BY 1")
    ]
    store.close()
    assert "full" in (heard[0] or "") and heard[-1] is None
    # Each second once: the jobs' progress was kept in memory, not lost or re-fired.
    assert "fire deduplicated" not in caplog.text
    assert len(fired) == len(set(fired))
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(fired)}
    assert gaps == {1.0}, fired
    # What was kept in memory reached the file once it had room.
    assert datetime.fromtimestamp(next_run, UTC) > fired[-1]
