"""Tests of the SQLite engine (agentd.state.sqlite) that only it can have: the file's
pragmas and WAL, migrations between schema versions, the checkpoint and writer threads,
its transactions and savepoints, and what another ``sqlite3`` connection sees.

What any engine must do is the contract suite's (tests/contract), which runs against
this engine too: a test that needs only the port belongs there."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentd.clock import to_iso
from agentd.models import EventKind, Row, RunStatus, StateRefused
from agentd.state.port import EventSink, StorageError
from agentd.state.sqlite.engine import CHECKPOINT_EVERY, SqliteStore
from agentd.state.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TASKS = {"a": ("fp1", "command"), "b": ("fp2", "command")}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


_template: list[bytes] = []


def _migrated_db(tmp_path: Path) -> bytes:
    """A freshly migrated, checkpointed state DB, built once: migrating costs fsyncs."""
    if not _template:
        where = tmp_path / "template"
        where.mkdir()
        SqliteStore(where / "state.sqlite").close()  # close() folds the WAL into the file
        _template.append((where / "state.sqlite").read_bytes())
    return _template[0]


def make_store(
    tmp_path: Path,
    event_sink: EventSink | None = None,
    tasks: dict[str, tuple[str, str]] | None = None,
    *,
    fresh: bool = False,
) -> SqliteStore:
    """A SqliteStore on ``tmp_path/state.sqlite`` with tasks synced at ``T0``.

    Unless ``fresh``, the file starts as a copy of an already migrated DB.
    """
    path = tmp_path / "state.sqlite"
    if not fresh:
        path.write_bytes(_migrated_db(tmp_path))
    store = SqliteStore(path, event_sink=event_sink)
    store.sync_tasks(tasks or TASKS, T0)
    return store


@pytest.fixture
def fresh_store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = make_store(tmp_path, fresh=True)
    yield s
    s.conn.close()


def fire_at(store: SqliteStore, task_id: str, seconds: float, **kwargs: Any) -> str:
    """A scheduled fire for ``T0 + seconds`` at that same moment; returns the run id."""
    result = store.fire(task_id, at(seconds), scheduled_for=at(seconds), **kwargs)
    assert result.created
    return result.run_id


# ---------------------------------------------------------------- opening, schema


def test_pragmas_and_schema_version(fresh_store: SqliteStore) -> None:
    store = fresh_store
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    row = store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert row[0] == str(SCHEMA_VERSION)


def test_wal_mode_is_persistent_in_the_file(tmp_path: Path) -> None:
    make_store(tmp_path, fresh=True).close()
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_reopen_keeps_data_and_does_not_remigrate(tmp_path: Path) -> None:
    store = make_store(tmp_path, fresh=True)
    run_id = fire_at(store, "a", 0)
    schema = store.conn.execute(
        "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    ).fetchall()
    n_events = len(store.events())
    store.close()

    again = SqliteStore(tmp_path / "state.sqlite")
    try:
        assert again.get_run(run_id)["status"] == RunStatus.QUEUED
        assert [r["id"] for r in again.task_rows()] == ["a", "b"]
        schema_again = again.conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()
        assert [tuple(r) for r in schema_again] == [tuple(r) for r in schema]
        version = again.conn.execute("SELECT value FROM meta WHERE key='schema_version'")
        assert version.fetchone()[0] == str(SCHEMA_VERSION)
        assert len(again.events()) == n_events
        # Syncing the same tasks again changes nothing and records nothing.
        again.sync_tasks(TASKS, at(60))
        assert len(again.events()) == n_events
    finally:
        again.close()


def _old_fire(old: SqliteStore, task_id: str, seconds: float) -> str:
    """A queued run as an older schema holds it (the columns every version has), since
    today's ``fire`` writes columns that schema lacks (``params``, 11)."""
    ts = to_iso(at(seconds))
    run_id = f"{ts}-{task_id}"  # ids sort by creation time, as RunIds' do
    with old.tx():
        old.conn.execute(
            "INSERT INTO runs(id, task_id, trigger, scheduled_for, idempotency_key, status,"
            " attempt, failures, not_before, cancel_requested, created_at)"
            " VALUES (?,?,?,?,?,'queued',0,0,?,0,?)",
            (run_id, task_id, "schedule", ts, f"{task_id}@{ts}", ts, ts),
        )
    return run_id


def test_v3_file_migrates_to_v4_indexes_and_the_overlap_check_uses_them(
    tmp_path: Path,
) -> None:
    """A state file written by schema v3 keeps its runs; v4 trades the redundant
    (status, not_before) index for a partial index of active runs, which is what a
    fire's overlap check must read instead of the task's whole history."""
    path = tmp_path / "state.sqlite"
    old = SqliteStore(path, defer_open=True)
    old.conn.execute("PRAGMA journal_mode = WAL")
    with old.tx():
        for migrate in MIGRATIONS[:3]:
            migrate(old.db)
        old.conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '3')")
    old.sync_tasks(TASKS, at(0))
    run_id = _old_fire(old, "a", 0)
    old.close()

    store = SqliteStore(path)
    try:
        names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert "idx_runs_active" in names
        assert "idx_runs_status_not_before" not in names
        assert store.get_run(run_id)["status"] == RunStatus.QUEUED
        plan = " ".join(
            str(r[3])
            for r in store.conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM runs WHERE task_id=?"
                " AND status IN ('queued','running')",
                ("a",),
            )
        )
        assert "idx_runs_active" in plan
        # The check still sees the queued run: a skip-overlap fire is skipped.
        again = store.fire("a", at(60), scheduled_for=at(60), overlap="skip")
        assert again.status == RunStatus.SKIPPED and again.reason == "overlap"
    finally:
        store.close()


def _plan(store: SqliteStore, sql: str, params: tuple[Any, ...] = ()) -> str:
    return " ".join(str(r[3]) for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_v4_file_migrates_to_partial_indexes_and_the_hot_queries_use_them(
    tmp_path: Path,
) -> None:
    """v5 indexes queued runs by due time and running runs by owner, and nothing else:
    a queued run written by v4 is still claimed in due order, and none of the queries
    the loop runs per tick falls back to a scan of the whole history."""
    path = tmp_path / "state.sqlite"
    old = SqliteStore(path, defer_open=True)
    old.conn.execute("PRAGMA journal_mode = WAL")
    with old.tx():
        for migrate in MIGRATIONS[:4]:
            migrate(old.db)
        old.conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '4')")
    old.sync_tasks(TASKS, at(0))
    later = _old_fire(old, "a", 5)
    sooner = _old_fire(old, "b", 1)
    old.close()

    store = SqliteStore(path)
    try:
        sql = {r[0]: r[1] for r in store.conn.execute("SELECT name, sql FROM sqlite_master")}
        assert "WHERE status='queued'" in sql["idx_runs_due"]
        assert "WHERE status='running'" in sql["idx_runs_running"]
        assert "idx_runs_due" in _plan(
            store, "SELECT MIN(not_before) FROM runs WHERE status='queued'"
        )
        owner_plan = _plan(
            store,
            "SELECT id FROM runs WHERE status='running' AND cancel_requested=1 AND lease_owner=?",
            ("w1",),
        )
        assert "idx_runs_running" in owner_plan
        assert [r["id"] for r in store.claim(at(10), "w1", 30, 5, set(), set())] == [sooner, later]
        assert store.cancel_requests("w1") == []
        assert store.request_cancel(later, at(11)) == RunStatus.RUNNING
        assert store.cancel_requests("w1") == [later]
        assert [r["id"] for r in store.list_runs(status="running")] == [later, sooner]
        assert store.list_runs(status="queued") == []
        assert store.gauge_counts() == (0, 0)
    finally:
        store.close()


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    make_store(tmp_path, fresh=True).close()
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    with conn:
        conn.execute(
            "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()
    with pytest.raises(StateRefused) as info:
        SqliteStore(tmp_path / "state.sqlite")
    assert info.value.code == "schema_too_new"
    assert str(SCHEMA_VERSION + 1) in str(info.value)


# ---------------------------------------------------------------- commit off the loop


def test_failed_off_loop_commit_undoes_its_group_and_drops_its_events(tmp_path: Path) -> None:
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    try:
        del seen[:]
        store_unit = store.unit()
        lost = fire_at(store, "a", 0)
        # A real failure at COMMIT: a foreign key checked only then.
        store.conn.execute("PRAGMA defer_foreign_keys = ON")
        store.conn.execute(
            "INSERT INTO checkpoints(run_id, data, seq, saved_at) VALUES ('nope', '{}', 1, 'x')"
        )
        commit = store_unit.commit_off_loop()
        assert commit is not None
        error = commit.result()
        assert isinstance(error, StorageError)
        assert isinstance(error.__cause__, sqlite3.IntegrityError)
        assert isinstance(store.complete_commit(), StorageError)
        assert store.complete_commit() is None  # settled once
        assert seen == []
        with pytest.raises(StateRefused):
            store.get_run(lost)
        # The connection is usable, outside any transaction.
        kept = fire_at(store, "a", 5)
        assert store.get_run(kept)["status"] == RunStatus.QUEUED
        assert [e["kind"] for e in seen] == ["enqueue"]
    finally:
        store.close()


def test_wal_is_checkpointed_off_the_committing_connection(tmp_path: Path) -> None:
    """The loop's connection never checkpoints (a commit that did stalled the loop for
    tens of ms); the checkpoint thread folds the WAL into the file every so many
    commits, which a copy of the main file alone (no -wal) shows."""
    store = make_store(tmp_path)
    try:
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        ids = [fire_at(store, "a", i, overlap="allow") for i in range(CHECKPOINT_EVERY * 2)]
        assert store._checkpointing is not None
        store._checkpointing.result()
        copy = tmp_path / "main-file-only.sqlite"
        copy.write_bytes((tmp_path / "state.sqlite").read_bytes())
        reader = sqlite3.connect(copy)
        in_file = {r[0] for r in reader.execute("SELECT id FROM runs")}
        reader.close()
        # Everything up to the commit that started the last checkpoint is in the file.
        assert set(ids[:CHECKPOINT_EVERY]) <= in_file
    finally:
        store.close()


# ---------------------------------------------------------------- transactions and the group commit


def test_rolled_back_transaction_emits_nothing_and_leaves_no_rows(tmp_path: Path) -> None:
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    seen.clear()
    n_events = len(store.events())
    with pytest.raises(RuntimeError), store.tx() as conn:
        conn.execute("UPDATE tasks SET paused=1 WHERE id='a'")
        store._event(at(1), EventKind.PAUSE, "a", reason="doomed")
        raise RuntimeError("boom")
    assert seen == []
    assert len(store.events()) == n_events
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    # The next transaction emits only its own events, not the rolled-back ones.
    run_id = fire_at(store, "b", 2)
    assert [(e["kind"], e["run_id"]) for e in seen] == [("enqueue", run_id)]
    store.close()


def test_group_commit_shares_one_commit_and_a_failed_part_undoes_only_itself(
    tmp_path: Path,
) -> None:
    published: list[str] = []
    store = make_store(tmp_path, event_sink=lambda e: published.append(e["kind"]))
    published.clear()
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    store_unit = store.unit()
    first = fire_at(store, "a", 1)
    with pytest.raises(StateRefused), store.tx():
        store.conn.execute("UPDATE tasks SET paused=1 WHERE id='b'")
        raise StateRefused("boom", "a part that fails")
    second = fire_at(store, "b", 1)
    assert published == []  # nothing announced before it is durable
    other = sqlite3.connect(tmp_path / "state.sqlite")
    assert other.execute("SELECT count(*) FROM runs").fetchone()[0] == 0  # not yet visible
    store_unit.commit()
    assert [s for s in statements if s == "COMMIT"] == ["COMMIT"]  # one commit, one fsync
    assert published == ["enqueue", "enqueue"]
    ids = {r[0] for r in other.execute("SELECT id FROM runs")}
    assert ids == {first, second}
    assert other.execute("SELECT paused FROM tasks WHERE id='b'").fetchone()[0] == 0
    other.close()
    store.conn.close()


# ---------------------------------------------------------------- timestamps as text


def test_to_iso_is_fixed_width_so_text_order_is_time_order() -> None:
    from datetime import UTC, datetime, timezone

    from agentd.clock import from_iso

    early = datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert to_iso(early) == "0999-01-02T03:04:05.000000Z"
    berlin = datetime(2026, 3, 29, 3, 30, tzinfo=timezone(timedelta(hours=2)))
    assert to_iso(berlin) == "2026-03-29T01:30:00.000000Z"
    assert from_iso(to_iso(berlin)) == berlin
    assert to_iso(early) < to_iso(datetime(1000, 1, 1, tzinfo=UTC)) < to_iso(berlin)


# ---------------------------------------------------------------- the writer thread


def test_committing_says_a_commit_is_in_flight_without_waiting_for_it(tmp_path: Path) -> None:
    """The daemon's main loop asks before it reads: ``committing`` must neither block
    nor settle. The writer thread is held busy so that the commit is surely in flight."""
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    gate = threading.Event()
    try:
        del seen[:]
        assert not store.committing
        store._writer = ThreadPoolExecutor(1)
        store._writer.submit(gate.wait, 60)
        store_unit = store.unit()
        fire_at(store, "a", 0)
        commit = store_unit.commit_off_loop()
        assert commit is not None
        assert store.committing
        assert seen == []  # asking settled nothing
        gate.set()
        assert commit.result(timeout=60) is None
        assert not store.committing
        assert seen == []  # done, but handed on only when someone uses the connection
        _ = store.conn
        assert [e["kind"] for e in seen] == ["enqueue"]
    finally:
        gate.set()
        store.close()


def test_settled_waits_for_the_commit_in_flight_off_the_loop(tmp_path: Path) -> None:
    """What API requests await before they read: the loop keeps running meanwhile."""
    store = make_store(tmp_path)
    gate = threading.Event()

    async def scenario() -> list[str]:
        order: list[str] = []
        store._writer = ThreadPoolExecutor(1)
        store._writer.submit(gate.wait, 60)  # the commit below waits behind this
        store_unit = store.unit()
        fire_at(store, "a", 0)
        assert store_unit.commit_off_loop() is not None

        async def reader() -> None:
            await store.commit_done()
            order.append("settled")
            assert not store.committing

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        order.append("loop ran")  # while the reader waited
        gate.set()
        await asyncio.wait_for(task, 60)
        await store.commit_done()  # nothing in flight: returns at once
        return order

    try:
        assert asyncio.run(scenario()) == ["loop ran", "settled"]
    finally:
        gate.set()
        store.close()


def test_a_cancelled_waiter_does_not_cancel_a_queued_commit(tmp_path: Path) -> None:
    """An API request waiting in ``commit_done()`` may be cancelled (the client went away).
    The commit it waited on, still queued on the writer thread, must run anyway: its
    group holds run outcomes and events that ``settle`` then makes durable."""
    store = SqliteStore(tmp_path / "state.sqlite")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    store_unit = store.unit()
    store.emit(now, EventKind.MISFIRE, reason="first")
    first = store_unit.commit_off_loop()
    assert first is not None
    first.result()
    store.complete_commit()
    writer = store._writer  # white box: hold the writer thread so the next commit queues
    assert writer is not None
    release = threading.Event()
    writer.submit(release.wait)
    store_unit = store.unit()
    store.emit(now, EventKind.MISFIRE, reason="second")
    queued = store_unit.commit_off_loop()
    assert queued is not None and not queued.running()

    async def waiter_cancelled() -> bool:
        waiting = asyncio.ensure_future(store.commit_done())
        await asyncio.wait({waiting}, timeout=0.05)  # it is now awaiting the commit
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return waiting.cancelled()

    assert asyncio.run(waiter_cancelled())
    release.set()
    assert store.complete_commit() is None  # the commit ran: no CancelledError
    reasons = [e["data"].get("reason") for e in store.events()]
    store.close()
    assert reasons[-2:] == ["first", "second"]


def test_v10_file_migrates_to_v11_and_its_runs_have_no_params(tmp_path: Path) -> None:
    """11 adds ``runs.params`` (a manual trigger's): a run written by 10 reads back with
    none, and a trigger with params works on the migrated file."""
    path = tmp_path / "state.sqlite"
    old = SqliteStore(path, defer_open=True)
    old.conn.execute("PRAGMA journal_mode = WAL")
    with old.tx():
        for migrate in MIGRATIONS[:10]:
            migrate(old.db)
        old.conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '10')")
    old.sync_tasks(TASKS, at(0))
    run_id = _old_fire(old, "a", 0)
    old.close()

    store = SqliteStore(path)
    try:
        assert store.get_run(run_id)["params"] is None
        made = store.fire("b", at(1), trigger="manual", params={"n": 1}, key="b@key:k")
        assert store.get_run(made.run_id)["params"] == {"n": 1}
        (version,) = store.conn.execute(
            "SELECT value FROM meta WHERE key='schema_version'"
        ).fetchone()
        assert int(version) == SCHEMA_VERSION == 11
    finally:
        store.close()
