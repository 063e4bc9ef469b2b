"""The APScheduler side on real SQLite files: fires of one due instant are one commit."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from agentd.clock import SystemClock, from_iso
from agentd.config import parse_config
from agentd.scheduler import Scheduler
from agentd.state.sqlite.engine import SqliteStore

N_TASKS = 60


def _job_ids(jobs_path: Path) -> set[str]:
    """The ids in APScheduler's jobstore table, read with a connection of our own."""
    conn = sqlite3.connect(jobs_path)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM apscheduler_jobs")}
    finally:
        conn.close()


def test_fires_due_at_one_instant_are_one_commit_and_one_jobstore_write(tmp_path: Path) -> None:
    tasks = "".join(
        f'  t{i}:\n    schedule: {{every: 1s}}\n    command: {{argv: ["true"]}}\n'
        for i in range(N_TASKS)
    )
    config = parse_config(f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}")
    store = SqliteStore(tmp_path / "state.sqlite")
    index = {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}
    store.sync_tasks(index, SystemClock().now())
    commits: list[str] = []
    store.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    updates: list[int] = []

    def on_execute(_conn: Any, _cur: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        if sql.startswith("UPDATE apscheduler_jobs"):
            updates.append(len(params) if many else 1)

    async def scenario() -> None:
        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite")
        sqlalchemy.event.listen(scheduler._engine, "before_cursor_execute", on_execute)
        scheduler.start(config)
        deadline = time.monotonic() + 30
        try:
            while store.counts().get("queued", 0) < N_TASKS:
                assert time.monotonic() < deadline, "fires did not arrive"
                await asyncio.sleep(0.01)
        finally:
            scheduler.shutdown()

    asyncio.run(scenario())
    instants = {r[0] for r in store.conn.execute("SELECT scheduled_for FROM runs")}
    runs = store.conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    store.conn.close()
    # Normally one instant; two if adding the jobs straddled a second boundary.
    assert len(instants) <= 2 and runs >= N_TASKS
    # One commit per due instant, not per run...
    assert len(commits) == len(instants), (commits, instants)
    # ... and the jobstore moved all those jobs on with one statement per instant.
    assert len(updates) == len(instants) and sum(updates) == runs, updates
    jobs = sqlite3.connect(tmp_path / "schedule.sqlite")
    (count,) = jobs.execute("SELECT count(*) FROM apscheduler_jobs").fetchone()
    jobs.close()
    assert count == N_TASKS


def test_before_commit_runs_inside_the_pass_group_before_its_fires_are_durable(
    tmp_path: Path,
) -> None:
    """The daemon claims fired runs in ``before_commit``: it must see the pass's fires
    (same connection, same transaction) while no other connection can yet."""
    n = 5  # due at the same instants, so each pass fires several
    tasks = "".join(
        f'  t{i}:\n    schedule: {{every: 1s}}\n    command: {{argv: ["true"]}}\n' for i in range(n)
    )
    config = parse_config(f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}")
    store = SqliteStore(tmp_path / "state.sqlite")
    index = {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}
    store.sync_tasks(index, SystemClock().now())
    other = sqlite3.connect(tmp_path / "state.sqlite")
    seen: list[tuple[bool, int, int]] = []

    async def scenario() -> None:
        called = asyncio.Event()

        def before_commit() -> None:
            mine = store.conn.execute("SELECT count(*) FROM runs").fetchone()[0]
            theirs = other.execute("SELECT count(*) FROM runs").fetchone()[0]
            seen.append((store._group_open, mine, theirs))
            called.set()

        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite")
        scheduler.before_commit = before_commit
        scheduler.start(config)
        try:
            await asyncio.wait_for(called.wait(), timeout=30)
        finally:
            scheduler.shutdown()

    asyncio.run(scenario())
    committed = other.execute("SELECT count(*) FROM runs").fetchone()[0]
    other.close()
    store.conn.close()
    in_group, mine, theirs = seen[0]
    assert in_group
    assert theirs < mine, seen  # this pass's fires: visible here, not yet durable
    assert committed >= mine


def _every_second(tmp_path: Path, n: int) -> tuple[Any, SqliteStore]:
    tasks = "".join(
        f"  t{i}:\n    schedule: {{every: 1s}}\n    overlap: allow\n"
        '    command: {argv: ["true"]}\n'
        for i in range(n)
    )
    config = parse_config(f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}")
    store = SqliteStore(tmp_path / "state.sqlite")
    index = {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}
    store.sync_tasks(index, SystemClock().now())
    return config, store


class Fires:
    """``on_enqueue`` for a test: counts fires, and ``reach(n)`` awaits the n-th."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, n: int, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()


class LoopTurns:
    """Counts the event loop's turns while it runs: that a count grew between two
    points shows the loop got turns in between."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._count())

    async def _count(self) -> None:
        while not self._stop.is_set():
            self.count += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def test_a_burst_is_fired_in_passes_of_due_batch_with_the_loop_running_between(
    tmp_path: Path,
) -> None:
    """Jobs due at one instant are fired ``due_batch`` per pass, each pass one commit,
    and the loop gets turns between passes; none is dropped or fired twice."""
    n, batch = 25, 10
    # Far enough ahead that a loaded machine has the jobs in place first: a past
    # ``at`` gets no job at all.
    soon = datetime.now(UTC) + timedelta(seconds=2.0)
    tasks = "".join(
        f'  t{i}:\n    schedule: {{at: "{soon.isoformat()}"}}\n    command: {{argv: ["true"]}}\n'
        for i in range(n)
    )
    config = parse_config(f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}")
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, SystemClock().now()
    )
    passes: list[tuple[int, int]] = []  # (runs so far, loop turns so far) per pass

    async def scenario() -> None:
        turns = LoopTurns()
        all_fired = asyncio.Event()

        def before_commit() -> None:
            runs = store.conn.execute("SELECT count(*) FROM runs").fetchone()[0]
            passes.append((runs, turns.count))
            if runs >= n:
                all_fired.set()

        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite")
        scheduler._jobstore.due_batch = batch
        scheduler.before_commit = before_commit
        turns.start()
        scheduler.start(config)
        try:
            await asyncio.wait_for(all_fired.wait(), timeout=30)
        finally:
            scheduler.shutdown()
            await turns.stop()

    asyncio.run(scenario())
    rows = store.conn.execute("SELECT task_id, scheduled_for FROM runs").fetchall()
    store.close()
    assert [runs for runs, _ in passes] == [10, 20, 25], passes
    turns = [t for _, t in passes]
    assert turns[0] < turns[1] < turns[2], passes  # the loop ran between the passes
    assert sorted(r[0] for r in rows) == sorted(config.tasks)  # each fired exactly once
    assert {from_iso(r[1]) for r in rows} == {soon}
    assert _job_ids(tmp_path / "schedule.sqlite") == set()  # all fired, all removed


def test_the_early_timer_never_fires_a_run_before_its_time(tmp_path: Path) -> None:
    """The scheduler's timer goes off up to EARLY_S early and sleeps the rest: every
    fire is still recorded at or after its scheduled instant."""
    config, store = _every_second(tmp_path, 1)

    async def scenario() -> None:
        fires = Fires()
        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite", fires)
        scheduler.start(config)
        try:
            await fires.reach(3)
        finally:
            scheduler.shutdown()

    asyncio.run(scenario())
    rows = store.conn.execute(
        "SELECT r.scheduled_for, e.ts FROM runs r JOIN events e"
        " ON e.run_id = r.id AND e.kind = 'enqueue'"
    ).fetchall()
    store.close()
    assert len(rows) >= 3
    for scheduled_for, enqueued in rows:
        assert from_iso(enqueued) >= from_iso(scheduled_for), (scheduled_for, enqueued)


def test_a_job_that_cannot_be_unpickled_is_logged_and_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, store = _every_second(tmp_path, 2)
    jobs_path = tmp_path / "schedule.sqlite"

    async def scenario() -> None:
        fires = Fires()
        scheduler = Scheduler(store, SystemClock(), jobs_path, fires)
        scheduler.start(config)
        try:
            jobs = sqlite3.connect(jobs_path)
            with jobs:
                jobs.execute("UPDATE apscheduler_jobs SET job_state=x'00' WHERE id='t0'")
            jobs.close()
            # t0 falls due within any second of t1's fires; its pass reads the broken
            # row and removes it at that pass's end, before any later pass fires t1.
            await fires.reach(fires.count + 3)
        finally:
            scheduler.shutdown()

    with caplog.at_level(logging.ERROR, logger="agentd.scheduler"):
        asyncio.run(scenario())
    store.close()
    assert _job_ids(jobs_path) == {"t1"}
    assert any("cannot restore job t0" in r.getMessage() for r in caplog.records)


def test_apscheduler_per_job_lines_are_dropped_its_own_state_lines_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tasks = "".join(
        f'  t{i}:\n    schedule: {{every: 1h}}\n    command: {{argv: ["true"]}}\n' for i in range(3)
    )
    config = parse_config(f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}")
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, SystemClock().now()
    )

    async def scenario() -> None:
        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite")
        scheduler.start(config)
        fewer = parse_config(
            f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks[: len(tasks) // 3]}"
        )
        assert scheduler.sync(fewer).removed == ["t1", "t2"]
        scheduler.shutdown()

    asyncio.run(scenario())
    store.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "apscheduler.scheduler"]
    assert "Scheduler started" in lines and "Scheduler has been shut down" in lines, lines
    assert not [line for line in lines if "job" in line.lower() and "processing" not in line]


def test_sync_async_lets_the_loop_run_between_slices_and_syncs_the_same(
    tmp_path: Path,
) -> None:
    """The daemon registers and reloads through ``sync_async``: the loop must get
    turns while it works, and the jobs must end up as ``sync`` leaves them."""
    n = 40

    def config_text(minute: int) -> str:
        tasks = "".join(
            f'  t{i}:\n    schedule: {{cron: "{minute if i < 10 else 0} 3 * * *"}}\n'
            f'    command: {{argv: ["true"]}}\n'
            for i in range(n)
        )
        return f"daemon:\n  state_dir: {tmp_path}\ntasks:\n{tasks}"

    first, second = parse_config(config_text(0)), parse_config(config_text(5))
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (c.fingerprint(), c.kind) for t, c in first.tasks.items()}, SystemClock().now()
    )

    async def scenario() -> tuple[int, int, Any, Any]:
        scheduler = Scheduler(store, SystemClock(), tmp_path / "schedule.sqlite")
        turns = LoopTurns()
        turns.start()
        scheduler.start_paused()
        added = await scheduler.sync_async(first, slice_s=0)  # a turn after every job
        turns_at_start = turns.count
        reloaded = await scheduler.sync_async(second, slice_s=0)
        await turns.stop()
        next_fires = {t: scheduler.next_fire_time(t) for t in ("t0", "t9", "t10")}
        scheduler.shutdown()
        return turns_at_start, turns.count, (added, reloaded), next_fires

    turns_at_start, turns, (added, reloaded), next_fires = asyncio.run(scenario())
    store.close()
    assert sorted(added.added) == sorted(first.tasks) and not added.rescheduled
    assert reloaded.rescheduled == [f"t{i}" for i in range(10)] and reloaded.unchanged == n - 10
    assert turns_at_start >= n and turns >= n + 10  # the loop ran between the jobs
    assert next_fires["t0"] is not None and next_fires["t0"].minute == 5
    assert next_fires["t9"] is not None and next_fires["t9"].minute == 5
    assert next_fires["t10"] is not None and next_fires["t10"].minute == 0


def test_a_schedule_with_no_fire_time_left_gets_no_job_and_a_fired_once_task_no_second(
    tmp_path: Path,
) -> None:
    """A once task fires, its job goes; a restart must neither bring the job back nor
    fire it again. A past ``at`` and a passed ``end_at`` never get a job; a future
    ``at`` and an open cron do."""
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    text = (
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        f'  soon:\n    schedule: {{at: "{soon.isoformat()}"}}\n    command: {{argv: ["true"]}}\n'
        '  past:\n    schedule: {at: "2020-01-01T00:00:00Z"}\n    command: {argv: ["true"]}\n'
        '  ended:\n    schedule: {cron: "0 3 * * *", end_at: "2020-01-01T00:00:00Z"}\n'
        '    command: {argv: ["true"]}\n'
        '  later:\n    schedule: {at: "2999-01-01T00:00:00Z"}\n    command: {argv: ["true"]}\n'
        '  nightly:\n    schedule: {cron: "0 3 * * *"}\n    command: {argv: ["true"]}\n'
    )
    config = parse_config(text)
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, SystemClock().now()
    )
    jobs_path = tmp_path / "schedule.sqlite"

    async def first_life() -> Any:
        fired = asyncio.Event()
        scheduler = Scheduler(store, SystemClock(), jobs_path, on_enqueue=fired.set)
        scheduler.start_paused()
        report = await scheduler.sync_async(config)
        scheduler.resume()
        try:
            await asyncio.wait_for(fired.wait(), timeout=30)  # the once task fired
        finally:
            scheduler.shutdown()
        return report

    async def restart() -> Any:
        scheduler = Scheduler(store, SystemClock(), jobs_path)
        scheduler.start_paused()
        report = await scheduler.sync_async(config)
        scheduler.resume()
        scheduler.shutdown()
        return report

    first = asyncio.run(first_life())
    assert sorted(first.added) == ["later", "nightly", "soon"]
    assert sorted(first.ended) == ["ended", "past"]
    assert _job_ids(jobs_path) == {"later", "nightly"}  # the fired once task's job is gone
    again = asyncio.run(restart())
    assert sorted(again.ended) == ["ended", "past", "soon"] and not again.added
    assert again.unchanged == 2 and _job_ids(jobs_path) == {"later", "nightly"}
    runs = store.conn.execute("SELECT task_id, COUNT(*) FROM runs GROUP BY task_id").fetchall()
    store.close()
    assert [tuple(r) for r in runs] == [("soon", 1)]


def test_next_fire_times_and_overdue_jobs_as_the_metrics_read_them(tmp_path: Path) -> None:
    """A scheduler that does not fire (paused here; stuck or failing writes in life)
    leaves its jobs' past times in the jobstore: that is what makes a task overdue
    (``agentd_task_overdue``), past its own misfire_grace, unless it is paused."""
    from agentd.metrics import Metrics
    from agentd.oversight import Oversight

    config = parse_config(
        f"""
        daemon: {{state_dir: {tmp_path}}}
        tasks:
          tight: {{schedule: {{every: 1s}}, misfire_grace: 200ms, command: {{argv: ["true"]}}}}
          loose: {{schedule: {{every: 1s}}, misfire_grace: 1h, command: {{argv: ["true"]}}}}
          held: {{schedule: {{every: 1s}}, misfire_grace: 200ms, command: {{argv: ["true"]}}}}
          hand: {{schedule: {{manual: true}}, command: {{argv: ["true"]}}}}
        """
    )
    store = SqliteStore(tmp_path / "state.sqlite")
    clock = SystemClock()
    store.sync_tasks({t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, clock.now())

    async def scenario() -> None:
        scheduler = Scheduler(store, clock, tmp_path / "schedule.sqlite")
        scheduler.start_paused()  # jobs are due, nothing fires them
        scheduler.sync(config)
        oversight = Oversight(store, config, clock, Metrics("test"))
        try:
            asked = {"tight", "loose", "hand", "gone"}
            times = scheduler.next_fire_times(asked)
            assert set(times) == {"tight", "loose"}  # no job: manual, unknown
            assert all(0 < t - time.time() <= 1.5 for t in times.values())
            # Many ids are one scan, with the same answer.
            assert scheduler.next_fire_times(asked | {f"x{i}" for i in range(600)}) == times
            assert oversight.min_misfire_grace() == timedelta(milliseconds=200)

            def overdue() -> set[str]:
                now = clock.now()
                due = scheduler.overdue_jobs(now - oversight.min_misfire_grace())
                return oversight.overdue_tasks(now, due, paused={"held"})

            assert overdue() == set()  # not due yet
            deadline = time.monotonic() + 30
            while overdue() != {"tight"}:
                assert time.monotonic() < deadline, overdue()
                await asyncio.sleep(0.05)
            # The jobs' stored times are past; loose is within its hour of grace.
            assert set(scheduler.overdue_jobs(clock.now())) == {"tight", "loose", "held"}
        finally:
            scheduler.shutdown()

    asyncio.run(scenario())
    store.close()
