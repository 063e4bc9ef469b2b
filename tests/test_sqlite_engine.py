"""Tests for agentd.state.sqlite: the durable state on a real SQLite file."""

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
from agentd.models import Outcome, Row, RunStatus, StateRefused
from agentd.state.port import EventSink, Finish, Fire
from agentd.state.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from agentd.state.sqlite.engine import CHECKPOINT_EVERY

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
N_ROUNDS = 12
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
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = make_store(tmp_path)
    yield s
    s.conn.close()  # the file is thrown away: no need for close()'s WAL checkpoint


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


def claim_one(store: SqliteStore, now: datetime, owner: str = "w1", lease_s: float = 30) -> Row:
    rows = store.claim(now, owner, lease_s, 1, set(), set())
    assert len(rows) == 1, rows
    return rows[0]


def kinds(store: SqliteStore, run_id: str | None = None) -> list[str]:
    return [e["kind"] for e in store.events(run_id=run_id)]


def events_of_kind(store: SqliteStore, kind: str) -> list[Row]:
    return [e for e in store.events() if e["kind"] == kind]


def run_and_finish(
    store: SqliteStore,
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
    run_id = fire_at(old, "a", 0)
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
    later = fire_at(old, "a", 5)
    sooner = fire_at(old, "b", 1)
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


def _other_reader(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "state.sqlite")


def test_off_loop_commit_events_come_once_after_it_and_before_later_ones(
    tmp_path: Path,
) -> None:
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    try:
        del seen[:]
        store_unit = store.unit()
        first = fire_at(store, "a", 0)
        commit = store_unit.commit_off_loop()
        assert commit is not None
        # Done or not, nothing reaches the sink before someone settles the commit.
        assert seen == []
        # The next use of the connection waits for it and hands its events on first.
        second = fire_at(store, "b", 1)
        assert [(e["kind"], e["run_id"]) for e in seen] == [
            ("enqueue", first),
            ("enqueue", second),
        ]
        assert commit.result() is None
        assert store.complete_commit() is None and len(seen) == 2  # never twice
        reader = _other_reader(tmp_path)
        ids = {r[0] for r in reader.execute("SELECT id FROM runs")}
        reader.close()
        assert {first, second} <= ids
    finally:
        store.close()


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
        assert isinstance(error, sqlite3.IntegrityError)
        assert isinstance(store.complete_commit(), sqlite3.IntegrityError)
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


def test_sync_tasks_adds_changes_removes_and_keeps_pause(store: SqliteStore) -> None:
    store.pause("a", "maintenance", at(1))
    store.sync_tasks({"a": ("fp1-changed", "command"), "c": ("fp3", "http")}, at(2))
    rows = {r["id"]: r for r in store.task_rows()}
    assert set(rows) == {"a", "c"}
    assert rows["a"]["fingerprint"] == "fp1-changed"
    assert rows["a"]["paused"] == 1
    assert rows["a"]["paused_reason"] == "maintenance"
    b = store.task_row("b")
    assert b is not None
    assert b["present"] == 0
    assert {"task_added", "task_changed", "task_removed"} <= set(kinds(store))
    with pytest.raises(StateRefused) as info:
        store.fire("b", at(3))
    assert info.value.code == "unknown_task"


def test_sync_tasks_events_come_in_config_order_with_the_ids_the_sink_saw(
    tmp_path: Path,
) -> None:
    """The batched writes keep what one-by-one writing said: adds and changes in the
    config's order, then removals; each event's id in the sink is its row's id."""
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    try:
        seen.clear()
        store.sync_tasks(
            {"z": ("fz", "http"), "a": ("fp1-changed", "command"), "c": ("fp3", "http")}, at(1)
        )
        expected = [
            ("task_added", "z", {"fingerprint": "fz"}),
            ("task_changed", "a", {"fingerprint": "fp1-changed"}),
            ("task_added", "c", {"fingerprint": "fp3"}),
            ("task_removed", "b", {}),
        ]
        assert [(e["kind"], e["task_id"], e["data"]) for e in seen] == expected
        stored = [e for e in store.events() if e["ts"] == to_iso(at(1))]
        assert [(e["id"], e["kind"], e["task_id"]) for e in stored] == [
            (e["id"], e["kind"], e["task_id"]) for e in seen
        ]
        rows = {
            r["id"]: (r["fingerprint"], r["kind"], r["present"])
            for r in store._all("SELECT * FROM tasks")
        }
        assert rows == {
            "a": ("fp1-changed", "command", 1),
            "b": ("fp2", "command", 0),
            "c": ("fp3", "http", 1),
            "z": ("fz", "http", 1),
        }
    finally:
        store.conn.close()


def test_sync_tasks_against_the_last_sync_writes_what_a_full_sync_writes(
    tmp_path: Path,
) -> None:
    """A reload passes what it synced last, and only the differing rows are read."""
    steps = [
        {"a": ("fp1-changed", "command"), "c": ("fp3", "http")},  # change, remove, add
        {"a": ("fp1-changed", "command"), "b": ("fp2", "command"), "c": ("fp3", "http")},
        {"a": ("fp1-changed", "command"), "b": ("fp2", "command"), "c": ("fp3", "http")},
        {"b": ("fp2b", "http")},
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "diff").mkdir()
    full, diff = make_store(tmp_path / "full"), make_store(tmp_path / "diff")
    try:
        last = TASKS
        for n, step in enumerate(steps, start=1):
            full.sync_tasks(step, at(n))
            diff.sync_tasks(step, at(n), synced=last)
            last = step
        rows = "SELECT id, fingerprint, kind, present, updated_at FROM tasks ORDER BY id"
        assert diff._all(rows) == full._all(rows)
        seen = [(e["kind"], e["task_id"], e["ts"], e["data"]) for e in full.events()]
        assert [(e["kind"], e["task_id"], e["ts"], e["data"]) for e in diff.events()] == seen
        assert ("task_changed", "b", to_iso(at(2)), {"fingerprint": "fp2"}) in seen  # back
        assert not [e for e in seen if e[2] == to_iso(at(3))]  # nothing changed, nothing said
    finally:
        full.conn.close()
        diff.conn.close()


# ---------------------------------------------------------------- fire


def test_fire_with_scheduled_for_is_idempotent(store: SqliteStore) -> None:
    first = store.fire("a", at(0), scheduled_for=at(0))
    second = store.fire("a", at(5), scheduled_for=at(0))
    assert first.created
    assert first.status == RunStatus.QUEUED
    assert not second.created
    assert second.reason == "duplicate"
    assert second.run_id == first.run_id
    assert len(store.list_runs(task_id="a")) == 1
    assert kinds(store).count("enqueue") == 1


def test_manual_fires_are_distinct_runs(store: SqliteStore) -> None:
    one = store.fire("a", at(0), trigger="manual", overlap="allow")
    two = store.fire("a", at(0), trigger="manual", overlap="allow")
    assert one.created and two.created
    assert one.run_id != two.run_id
    assert store.get_run(one.run_id)["trigger"] == "manual"


def test_overlap_skip(store: SqliteStore) -> None:
    first = fire_at(store, "a", 0)
    result = store.fire("a", at(60), scheduled_for=at(60), overlap="skip")
    assert result.created
    assert result.status == RunStatus.SKIPPED
    assert result.reason == "overlap"
    row = store.get_run(result.run_id)
    assert row["status"] == RunStatus.SKIPPED
    assert row["skip_reason"] == "overlap"
    assert row["finished_at"] == to_iso(at(60))
    skips = events_of_kind(store, "skip")
    assert [(e["run_id"], e["data"]["reason"]) for e in skips] == [(result.run_id, "overlap")]
    # Still skipped while the first one runs.
    claim_one(store, at(61))
    assert store.fire("a", at(120), scheduled_for=at(120)).reason == "overlap"
    # Other tasks are not affected.
    assert store.fire("b", at(120), scheduled_for=at(120)).status == RunStatus.QUEUED
    assert store.get_run(first)["status"] == RunStatus.RUNNING


def test_overlap_queue_one(store: SqliteStore) -> None:
    first = fire_at(store, "a", 0, overlap="queue_one")
    claim_one(store, at(1))
    second = store.fire("a", at(60), scheduled_for=at(60), overlap="queue_one")
    third = store.fire("a", at(120), scheduled_for=at(120), overlap="queue_one")
    assert store.get_run(first)["status"] == RunStatus.RUNNING
    assert second.status == RunStatus.QUEUED
    assert third.status == RunStatus.SKIPPED
    assert third.reason == "overlap"


def test_overlap_queue_all_bounded_by_max_queued(store: SqliteStore) -> None:
    statuses = [
        store.fire("a", at(i), scheduled_for=at(i), overlap="queue_all", max_queued=3)
        for i in range(5)
    ]
    assert [r.status for r in statuses] == [RunStatus.QUEUED] * 3 + [RunStatus.SKIPPED] * 2
    assert [r.reason for r in statuses[3:]] == ["queue_full", "queue_full"]
    assert len(store.active_runs("a")) == 3


def test_overlap_cancel_previous(store: SqliteStore) -> None:
    running = fire_at(store, "a", 0)
    claim_one(store, at(1))
    queued = fire_at(store, "a", 30, overlap="allow")
    result = store.fire("a", at(60), scheduled_for=at(60), overlap="cancel_previous")
    assert result.status == RunStatus.QUEUED
    run = store.get_run(running)
    assert run["status"] == RunStatus.RUNNING
    assert run["cancel_requested"] == 1
    assert store.cancel_requests("w1") == [running]
    # A previous run that had not started yet is cancelled outright.
    assert store.get_run(queued)["status"] == RunStatus.CANCELLED
    reasons = {e["run_id"]: e["data"]["reason"] for e in store.events() if "cancel" in e["kind"]}
    assert reasons == {running: "cancel_previous", queued: "cancel_previous"}


def test_overlap_allow(store: SqliteStore) -> None:
    fire_at(store, "a", 0)
    claim_one(store, at(1))
    results = [store.fire("a", at(i), scheduled_for=at(i), overlap="allow") for i in range(10, 13)]
    assert all(r.status == RunStatus.QUEUED for r in results)
    assert len(store.active_runs("a")) == 4


def _finishes(rows: list[Row], plan: list[tuple[Outcome, RunStatus]]) -> list[Finish]:
    return [
        Finish(
            run_id=row["id"],
            task_id=row["task_id"],
            attempt=row["attempt"],
            failures=row["failures"],
            outcome=outcome,
            next_status=status,
            at=at(20 + i),
            not_before=at(60 + i) if status == RunStatus.QUEUED else at(20 + i),
            error=None if outcome == Outcome.SUCCESS else f"{outcome} #{i}",
            exit_code=i,
            duration_s=0.5 + i,
            pause_after_failures=1,
        )
        for i, (row, (outcome, status)) in enumerate(zip(rows, plan, strict=True))
    ]


@pytest.mark.parametrize("with_quarantine", [False, True])
def test_finish_many_is_the_same_finishes_one_after_the_other(
    tmp_path: Path, with_quarantine: bool
) -> None:
    """Every outcome, and two runs of one task ending either way round, in one batch:
    the runs, attempts, task rows and events (with their ids as the sink saw them) are
    what finishing them one after the other gives. A quarantine (which reads and counts
    the task's row, and here pauses it) is part of the second batch."""
    tasks = {**TASKS, "c": ("fp3", "command"), "d": ("fp4", "command")}
    plan = [
        (Outcome.FAILURE, RunStatus.QUEUED),  # a: retry
        (Outcome.SUCCESS, RunStatus.SUCCEEDED),  # a: then success
        (Outcome.SUCCESS, RunStatus.SUCCEEDED),  # b: success
        (Outcome.TIMEOUT, RunStatus.QUEUED),  # b: then a retried timeout
        (Outcome.INTERRUPTED, RunStatus.QUEUED),  # c: resume, not counted
        (Outcome.CANCELLED, RunStatus.CANCELLED),  # c
        (
            (Outcome.FAILURE, RunStatus.QUARANTINED)
            if with_quarantine
            else (Outcome.BUDGET_EXHAUSTED, RunStatus.BUDGET_EXHAUSTED)
        ),  # d
    ]
    made = make_store(tmp_path, tasks=tasks)
    for task_id in ("a", "a", "b", "b", "c", "c", "d"):
        made.fire(task_id, at(0), trigger="manual", overlap="allow")
    rows = made.claim(at(1), "w1", 30, 10, set(), set(tasks))
    made.close()
    assert [r["task_id"] for r in rows] == ["a", "a", "b", "b", "c", "c", "d"]
    for name in ("one", "many"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.sqlite").write_bytes((tmp_path / "state.sqlite").read_bytes())

    def state(store: SqliteStore, seen: list[Row]) -> list[Any]:
        events = store.events()
        assert [(e["id"], e["kind"], e["data"]) for e in events[-len(seen) :]] == [
            (e["id"], e["kind"], e["data"]) for e in seen
        ]
        return [
            store._all("SELECT * FROM runs ORDER BY id"),
            store._all("SELECT * FROM attempts ORDER BY id"),
            store._all("SELECT * FROM tasks ORDER BY id"),
            events,
        ]

    items = _finishes(rows, plan)
    seen_one: list[Row] = []
    one = SqliteStore(tmp_path / "one" / "state.sqlite", event_sink=seen_one.append)
    one_unit = one.unit()
    for f in items:
        one.finish(
            f.run_id,
            f.at,
            outcome=f.outcome,
            next_status=f.next_status,
            not_before=f.not_before,
            error=f.error,
            exit_code=f.exit_code,
            duration_s=f.duration_s,
            pause_after_failures=f.pause_after_failures,
        )
    one_unit.commit()
    seen_many: list[Row] = []
    many = SqliteStore(tmp_path / "many" / "state.sqlite", event_sink=seen_many.append)
    many_unit = many.unit()
    many.finish_many(items)
    many_unit.commit()
    try:
        assert len(seen_many) == len(seen_one) >= len(items)
        assert state(many, seen_many) == state(one, seen_one)
        kinds_seen = {e["kind"] for e in seen_many}
        assert kinds_seen >= {"failure", "retry", "success", "timeout", "interrupt", "cancel"}
        assert ("quarantine" in kinds_seen) is with_quarantine
        assert ("pause" in kinds_seen) is with_quarantine
    finally:
        one.close()
        many.close()


def test_finish_many_is_all_or_nothing(store: SqliteStore) -> None:
    """A run that is gone undoes the whole batch: its caller then records them one by
    one, and must not find half of them already done."""
    fire_at(store, "a", 0)
    row = claim_one(store, at(1))
    gone = Finish(
        run_id="r-gone", task_id="b", attempt=1, failures=0,
        outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED, at=at(2),
    )  # fmt: skip
    real = _finishes([row], [(Outcome.SUCCESS, RunStatus.SUCCEEDED)])[0]
    before = len(store.events())
    with pytest.raises(StateRefused) as caught:
        store.finish_many([real, gone])
    assert caught.value.code == "unknown_run"
    assert store.get_run(row["id"])["status"] == RunStatus.RUNNING
    assert len(store.events()) == before
    store.finish_many([real])
    assert store.get_run(row["id"])["status"] == RunStatus.SUCCEEDED


def test_fire_many_is_the_same_fires_one_after_the_other(tmp_path: Path) -> None:
    """Every policy, repeated keys, a paused task and an unknown one in one batch: the
    batch gives each fire the result, the row and the events that firing it alone, in
    order, gives."""
    tasks = {**TASKS, "c": ("fp3", "command")}
    fires = [
        Fire("a", at(0)),
        Fire("a", at(1)),  # skip: the first is queued
        Fire("a", at(0)),  # the first's key again
        Fire("b", at(0), overlap="queue_all", max_queued=2),
        Fire("b", at(1), overlap="queue_all", max_queued=2),
        Fire("b", at(2), overlap="queue_all", max_queued=2),  # queue_full
        Fire("b", at(3), overlap="cancel_previous"),  # cancels both, queued this batch
        Fire("b", at(4), overlap="queue_one"),  # overlap: the one before is queued
        Fire("c", at(0)),  # paused: skipped
        Fire("c", None, trigger="manual", honour_pause=False),  # manual: runs anyway
        Fire("a", at(5), overlap="allow"),
        Fire("nope", at(0)),
    ]

    def outcome(store: SqliteStore, results: list[Any], setup: int) -> list[Any]:
        runs = [
            (r.created, r.status, r.reason, store.get_run(r.run_id) if r.run_id else None)
            for r in results
        ]
        events = [(e["kind"], e["task_id"], e["run_id"], e["data"]) for e in store.events()]
        events = events[setup:]  # the fires' own events
        random = {"id": "-", "idempotency_key": "-"}  # a manual key is random too
        return [[(c, s, why, run and {**run, **random}) for c, s, why, run in runs], events]

    one_dir, many_dir = tmp_path / "one", tmp_path / "many"
    one_dir.mkdir()
    many_dir.mkdir()
    one, many = make_store(one_dir, tasks=tasks), make_store(many_dir, tasks=tasks)
    try:
        for s in (one, many):
            s.pause("c", "test", at(0))
            fire_at(s, "a", -60)  # an earlier run of a, claimed and running
            claim_one(s, at(-59))
            s.finish(
                s.list_runs(task_id="a")[0]["id"], at(-58),
                outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED,
            )  # fmt: skip
        setup = len(one.events())
        singly = []
        for f in fires:
            try:
                singly.append(
                    one.fire(
                        f.task_id,
                        at(10),
                        scheduled_for=f.scheduled_for,
                        trigger=f.trigger,
                        overlap=f.overlap,
                        max_queued=f.max_queued,
                        honour_pause=f.honour_pause,
                    )
                )
            except StateRefused as exc:
                assert exc.code == "unknown_task"
                singly.append(None)
        batch = many.fire_many(fires, at(10))
        assert batch[-1].reason == "unknown_task" and singly[-1] is None
        ids = {r.run_id: b.run_id for r, b in zip(singly[:-1], batch[:-1], strict=True)}
        got = outcome(many, batch[:-1], setup)
        expected = outcome(one, singly[:-1], setup)
        # Run ids are random: compare with the batch's ids put in place of the others'.
        expected[1] = [(k, t, ids.get(r, r), d) for k, t, r, d in expected[1]]
        assert got == expected
        statuses = [r.status for r in batch[:-1]]
        assert statuses == [
            "queued", "skipped", "queued", "queued", "queued", "skipped", "queued",
            "skipped", "skipped", "queued", "queued",
        ]  # fmt: skip
    finally:
        one.conn.close()
        many.conn.close()


# ---------------------------------------------------------------- pause


def test_paused_task_skips_scheduled_fires_but_not_manual_ones(store: SqliteStore) -> None:
    assert store.pause("a", "maintenance", at(0)) is True
    assert store.pause("a", "again", at(0)) is False  # idempotent
    assert store.paused_tasks() == {"a"}
    scheduled = store.fire("a", at(10), scheduled_for=at(10))
    assert scheduled.status == RunStatus.SKIPPED
    assert scheduled.reason == "paused"
    manual = store.fire("a", at(20), trigger="manual", honour_pause=False)
    assert manual.status == RunStatus.QUEUED
    pause_events = events_of_kind(store, "pause")
    assert len(pause_events) == 1
    assert pause_events[0]["data"] == {"reason": "maintenance", "by": "operator"}


def test_claim_skips_scheduled_runs_of_a_paused_task_but_takes_manual_ones(
    store: SqliteStore,
) -> None:
    scheduled = fire_at(store, "a", 0)
    store.pause("a", "maintenance", at(1))
    assert store.claim(at(2), "w1", 30, 5, set(), set()) == []
    manual = store.fire("a", at(3), trigger="manual", overlap="allow", honour_pause=False)
    claimed = store.claim(at(4), "w1", 30, 5, set(), {"a"})
    assert [r["id"] for r in claimed] == [manual.run_id]
    assert store.get_run(scheduled)["status"] == RunStatus.QUEUED
    # Resuming lets the scheduled run through.
    assert store.resume("a", at(5)) is True
    assert store.resume("a", at(5)) is False
    assert [r["id"] for r in store.claim(at(6), "w1", 30, 5, set(), {"a"})] == [scheduled]


# ---------------------------------------------------------------- claim


def test_claim_respects_not_before(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 10)
    assert store.claim(at(9), "w1", 30, 5, set(), set()) == []
    assert [r["id"] for r in store.claim(at(10), "w1", 30, 5, set(), set())] == [run_id]


def test_claim_sets_running_attempt_lease_and_records_it(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    row = claim_one(store, at(2.5), owner="host:1", lease_s=30)
    assert row["id"] == run_id
    assert row["status"] == RunStatus.RUNNING
    assert row["attempt"] == 1
    stored = store.get_run(run_id)
    assert stored["status"] == RunStatus.RUNNING
    assert stored["attempt"] == 1
    assert stored["lease_owner"] == "host:1"
    assert stored["lease_expires_at"] == to_iso(at(32.5))
    assert stored["started_at"] == to_iso(at(2.5))
    attempts = store.attempts(run_id)
    assert len(attempts) == 1
    assert attempts[0]["attempt"] == 1
    assert attempts[0]["worker"] == "host:1"
    assert attempts[0]["started_at"] == to_iso(at(2.5))
    assert attempts[0]["finished_at"] is None
    claim_events = events_of_kind(store, "claim")
    assert len(claim_events) == 1
    assert claim_events[0]["run_id"] == run_id
    assert claim_events[0]["data"] == {"attempt": 1, "lateness_s": 2.5}


def test_claim_respects_limit(tmp_path: Path) -> None:
    store = make_store(tmp_path, tasks={t: ("fp", "command") for t in "abcd"})
    for task_id in "abcd":
        fire_at(store, task_id, 0)
    first = store.claim(at(1), "w1", 30, 2, set(), set())
    assert len(first) == 2
    second = store.claim(at(1), "w1", 30, 5, {r["task_id"] for r in first}, set())
    assert len(second) == 2
    assert {r["task_id"] for r in first + second} == set("abcd")
    assert store.claim(at(1), "w1", 30, 0, set(), set()) == []
    store.close()


def test_claim_one_per_task_unless_overlap_allowed(store: SqliteStore) -> None:
    ids = [fire_at(store, "a", i, overlap="allow") for i in range(3)]
    claimed = store.claim(at(5), "w1", 30, 5, set(), set())
    assert [r["id"] for r in claimed] == [ids[0]]
    claimed = store.claim(at(5), "w1", 30, 5, set(), {"a"})
    assert sorted(r["id"] for r in claimed) == sorted(ids[1:])


def test_claim_skips_busy_tasks(store: SqliteStore) -> None:
    fire_at(store, "a", 0)
    b = fire_at(store, "b", 0)
    claimed = store.claim(at(1), "w1", 30, 5, {"a"}, set())
    assert [r["id"] for r in claimed] == [b]


def test_claim_takes_runs_of_one_task_in_fire_order(store: SqliteStore) -> None:
    """Catch-up fires many due times at one ``now``; they must run in their own order."""
    ids = [
        store.fire(
            "a", T0, scheduled_for=T0 - timedelta(minutes=10 - i), overlap="queue_all"
        ).run_id
        for i in range(8)
    ]
    claimed = store.claim(at(1), "w1", 30, 8, set(), {"a"})
    assert [r["id"] for r in claimed] == ids


def test_claim_is_not_starved_by_a_backlog_of_a_busy_task(store: SqliteStore) -> None:
    """A long queue of one busy task must not hide another task's due run."""
    # claim(limit=2, busy={"a"}) looks at 2 * 4 + 1 = 9 rows; give "a" more than that.
    for i in range(12):
        fire_at(store, "a", i / 100, overlap="queue_all", max_queued=100)
    claim_one(store, at(1))  # one run of "a" is now running
    b = fire_at(store, "b", 2)
    claimed = store.claim(at(3), "w1", 30, 2, {"a"}, set())
    assert [r["id"] for r in claimed] == [b]


def test_heartbeat_extends_only_own_leases(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0), owner="w1", lease_s=30)
    store.heartbeat([run_id], "someone-else", at(20), 30)
    assert store.get_run(run_id)["lease_expires_at"] == to_iso(at(30))
    store.heartbeat([run_id], "w1", at(20), 30)
    assert store.get_run(run_id)["lease_expires_at"] == to_iso(at(50))


# ---------------------------------------------------------------- finish


def test_finish_success(store: SqliteStore) -> None:
    run_id = run_and_finish(
        store, "a", 0, Outcome.SUCCESS, RunStatus.SUCCEEDED, exit_code=0, duration_s=0.5
    )
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.SUCCEEDED
    assert run["outcome"] == Outcome.SUCCESS
    assert run["finished_at"] == to_iso(at(1))
    assert run["lease_owner"] is None
    assert run["failures"] == 0
    task = store.task_row("a")
    assert task is not None
    assert task["last_success_at"] == to_iso(at(1))
    assert task["last_outcome"] == Outcome.SUCCESS
    (attempt,) = store.attempts(run_id)
    assert attempt["outcome"] == Outcome.SUCCESS
    assert attempt["finished_at"] == to_iso(at(1))
    assert attempt["duration_s"] == 0.5
    assert kinds(store, run_id) == ["enqueue", "claim", "success"]


def test_finish_failure_retry_waits_in_the_queue(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0))
    store.finish(
        run_id,
        at(1),
        outcome=Outcome.FAILURE,
        next_status=RunStatus.QUEUED,
        not_before=at(31),
        error="exit 1",
        exit_code=1,
    )
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 1
    assert run["not_before"] == to_iso(at(31))
    assert run["finished_at"] is None
    assert run["error"] == "exit 1"
    retry = events_of_kind(store, "retry")
    assert len(retry) == 1
    assert retry[0]["data"]["failures"] == 1
    assert retry[0]["data"]["not_before"] == to_iso(at(31))
    task = store.task_row("a")
    assert task is not None
    assert task["last_success_at"] is None
    # Not before its time; then it is attempt 2.
    assert store.claim(at(30), "w1", 30, 5, set(), set()) == []
    row = claim_one(store, at(31))
    assert row["attempt"] == 2
    assert [a["outcome"] for a in store.attempts(run_id)] == [Outcome.FAILURE, None]


def test_finish_quarantined(store: SqliteStore) -> None:
    run_id = run_and_finish(
        store, "a", 0, Outcome.FAILURE, RunStatus.QUARANTINED, error="boom", exit_code=2
    )
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUARANTINED
    assert run["finished_at"] == to_iso(at(1))
    assert run["failures"] == 1
    q = store.quarantine_get(run_id)
    assert q["task_id"] == "a"
    assert q["last_error"] == "boom"
    assert q["attempts"] == 1
    assert [r["run_id"] for r in store.quarantine_list()] == [run_id]
    events = events_of_kind(store, "quarantine")
    assert [(e["run_id"], e["data"]["error"]) for e in events] == [(run_id, "boom")]
    assert store.counts()["in_quarantine"] == 1


def test_finish_interrupted_costs_no_failure(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0))
    store.finish(run_id, at(1), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED)
    claim_one(store, at(2))
    store.finish(run_id, at(3), outcome=Outcome.INTERRUPTED, next_status=RunStatus.QUEUED)
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 1  # only the real failure counts
    assert run["attempt"] == 2
    assert kinds(store, run_id).count("retry") == 1
    assert "interrupt" in kinds(store, run_id)


def test_finish_unknown_run(store: SqliteStore) -> None:
    with pytest.raises(StateRefused) as info:
        store.finish("nope", at(0), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED)
    assert info.value.code == "unknown_run"


def _quarantine(store: SqliteStore, seconds: float, pause_after: int = 2) -> str:
    return run_and_finish(
        store,
        "a",
        seconds,
        Outcome.FAILURE,
        RunStatus.QUARANTINED,
        error="boom",
        pause_after_failures=pause_after,
    )


def test_consecutive_quarantines_pause_the_task(store: SqliteStore) -> None:
    _quarantine(store, 0)
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    assert task["consecutive_quarantines"] == 1
    _quarantine(store, 100)
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 1
    assert task["consecutive_quarantines"] == 2
    assert "2 consecutive" in task["paused_reason"]
    pauses = events_of_kind(store, "pause")
    assert len(pauses) == 1
    assert pauses[0]["data"]["by"] == "agentd"
    assert pauses[0]["task_id"] == "a"
    # The schedule now skips it.
    assert store.fire("a", at(200), scheduled_for=at(200)).reason == "paused"


def test_a_success_resets_the_quarantine_count(store: SqliteStore) -> None:
    _quarantine(store, 0)
    run_and_finish(store, "a", 100, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    task = store.task_row("a")
    assert task is not None
    assert task["consecutive_quarantines"] == 0
    _quarantine(store, 200)
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    assert task["consecutive_quarantines"] == 1
    assert events_of_kind(store, "pause") == []


def test_resume_clears_the_quarantine_count(store: SqliteStore) -> None:
    _quarantine(store, 0)
    _quarantine(store, 100)
    assert store.paused_tasks() == {"a"}
    assert store.resume("a", at(150))
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    assert task["paused_reason"] is None
    assert task["consecutive_quarantines"] == 0
    _quarantine(store, 200)
    assert store.paused_tasks() == set()


def test_pause_after_zero_never_pauses(store: SqliteStore) -> None:
    for i in range(4):
        _quarantine(store, i * 100, pause_after=0)
    assert store.paused_tasks() == set()


# ---------------------------------------------------------------- recover


def test_recover_requeues_runs_of_a_dead_owner(tmp_path: Path) -> None:
    old = make_store(tmp_path)
    run_id = fire_at(old, "a", 0)
    claim_one(old, at(0), owner="host:111")
    old.finish(run_id, at(1), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED)
    claim_one(old, at(2), owner="host:111")
    old.conn.close()  # the old process dies without cleaning up

    new = SqliteStore(tmp_path / "state.sqlite")
    try:
        assert new.recover(at(5), owner="host:222") == [run_id]
        run = new.get_run(run_id)
        assert run["status"] == RunStatus.QUEUED
        assert run["failures"] == 1  # the lost attempt costs nothing
        assert run["lease_owner"] is None
        assert run["not_before"] == to_iso(at(5))
        attempts = new.attempts(run_id)
        assert [a["outcome"] for a in attempts] == [Outcome.FAILURE, Outcome.LOST]
        assert attempts[1]["finished_at"] == to_iso(at(5))
        recover = events_of_kind(new, "recover")
        assert len(recover) == 1
        assert recover[0]["run_id"] == run_id
        assert recover[0]["data"]["previous_owner"] == "host:111"
        assert recover[0]["data"]["by"] == "host:222"
        assert claim_one(new, at(6), owner="host:222")["attempt"] == 3
    finally:
        new.close()


def test_recover_leaves_live_owners_with_valid_leases(store: SqliteStore) -> None:
    live = fire_at(store, "a", 0)
    claim_one(store, at(0), owner="alive", lease_s=30)
    expired = fire_at(store, "b", 0)
    claim_one(store, at(0), owner="alive-but-stuck", lease_s=5)
    recovered = store.recover(at(10), owner="me", live_owners={"alive", "alive-but-stuck"})
    assert recovered == [expired]
    assert store.get_run(live)["status"] == RunStatus.RUNNING
    assert store.get_run(expired)["status"] == RunStatus.QUEUED


# ---------------------------------------------------------------- cancel


def test_cancel_queued_run_is_immediate(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    assert store.request_cancel(run_id, at(1)) == RunStatus.CANCELLED
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.CANCELLED
    assert run["finished_at"] == to_iso(at(1))
    assert store.claim(at(2), "w1", 30, 5, set(), set()) == []


def test_cancel_running_run_is_flagged_for_its_owner(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0), owner="w1")
    assert store.cancel_requests("w1") == []
    assert store.request_cancel(run_id, at(1)) == RunStatus.RUNNING
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.RUNNING
    assert run["cancel_requested"] == 1
    assert store.cancel_requests("w1") == [run_id]
    assert store.cancel_requests("w2") == []
    assert "cancel_requested" in kinds(store, run_id)


def test_cancel_finished_or_unknown_run_is_an_error(store: SqliteStore) -> None:
    run_id = run_and_finish(store, "a", 0, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    with pytest.raises(StateRefused) as info:
        store.request_cancel(run_id, at(5))
    assert info.value.code == "run_finished"
    assert store.get_run(run_id)["status"] == RunStatus.SUCCEEDED
    with pytest.raises(StateRefused) as info:
        store.request_cancel("20260301T120000-deadbeef", at(5))
    assert info.value.code == "unknown_run"


# ---------------------------------------------------------------- quarantine


def test_quarantine_release(store: SqliteStore) -> None:
    run_id = _quarantine(store, 0, pause_after=0)
    store.quarantine_release(run_id, at(50))
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 0
    assert run["trigger"] == "release"
    assert run["finished_at"] is None
    assert store.quarantine_list() == []
    with pytest.raises(StateRefused) as info:
        store.quarantine_get(run_id)
    assert info.value.code == "not_quarantined"
    assert "release" in kinds(store, run_id)
    assert claim_one(store, at(51))["id"] == run_id


def test_released_run_of_a_paused_task_is_claimed(store: SqliteStore) -> None:
    first = _quarantine(store, 0)
    _quarantine(store, 100)
    assert store.paused_tasks() == {"a"}
    store.quarantine_release(first, at(150))
    assert claim_one(store, at(151))["id"] == first


def test_quarantine_drop(store: SqliteStore) -> None:
    run_id = _quarantine(store, 0, pause_after=0)
    store.quarantine_drop(run_id, at(50))
    assert store.quarantine_list() == []
    assert store.get_run(run_id)["status"] == RunStatus.QUARANTINED
    assert "drop" in kinds(store, run_id)
    with pytest.raises(StateRefused) as info:
        store.quarantine_drop(run_id, at(51))
    assert info.value.code == "not_quarantined"


def test_release_of_a_run_not_in_quarantine(store: SqliteStore) -> None:
    run_id = fire_at(store, "a", 0)
    with pytest.raises(StateRefused) as info:
        store.quarantine_release(run_id, at(1))
    assert info.value.code == "not_quarantined"
    assert store.get_run(run_id)["status"] == RunStatus.QUEUED


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_keep_the_last_and_survive_reopening(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    run_id = fire_at(store, "a", 0)
    assert store.load_checkpoint(run_id) is None
    assert store.save_checkpoint(run_id, {"done": ["x"]}, at(1)) == 1
    assert store.save_checkpoint(run_id, {"done": ["x", "y"], "n": 2}, at(2)) == 2
    assert store.load_checkpoint(run_id) == {"done": ["x", "y"], "n": 2}
    assert [e["data"]["seq"] for e in events_of_kind(store, "checkpoint")] == [1, 2]
    store.close()

    again = SqliteStore(tmp_path / "state.sqlite")
    try:
        assert again.load_checkpoint(run_id) == {"done": ["x", "y"], "n": 2}
        assert again.save_checkpoint(run_id, [3], at(3)) == 3
    finally:
        again.close()


# ---------------------------------------------------------------- events


def test_event_sink_gets_committed_events_in_order(tmp_path: Path) -> None:
    db_path = tmp_path / "state.sqlite"
    seen: list[Row] = []
    visible: list[bool] = []

    def sink(event: Row) -> None:
        seen.append(event)
        # Another connection (like the CLI) must already see the row: it is committed.
        other = sqlite3.connect(db_path)
        try:
            row = other.execute("SELECT kind FROM events WHERE id=?", (event["id"],)).fetchone()
        finally:
            other.close()
        visible.append(row is not None and row[0] == event["kind"])

    store = make_store(tmp_path, event_sink=sink)
    assert [e["kind"] for e in seen] == ["task_added", "task_added"]
    seen.clear()
    running = fire_at(store, "a", 0)
    claim_one(store, at(1))
    queued = fire_at(store, "a", 2, overlap="allow")
    seen.clear()

    new = store.fire("a", at(3), scheduled_for=at(3), overlap="cancel_previous")
    # One transaction, three events: two cancels, then the enqueue; all after commit.
    assert {(e["kind"], e["run_id"]) for e in seen[:2]} == {
        ("cancel_requested", running),
        ("cancel", queued),
    }
    assert (seen[2]["kind"], seen[2]["run_id"]) == ("enqueue", new.run_id)
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert all(visible)
    # Exactly what was stored, nothing more.
    assert seen == store.events(after_id=ids[0] - 1)
    store.close()


def test_rolled_back_transaction_emits_nothing_and_leaves_no_rows(tmp_path: Path) -> None:
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    seen.clear()
    n_events = len(store.events())
    with pytest.raises(RuntimeError), store.tx() as conn:
        conn.execute("UPDATE tasks SET paused=1 WHERE id='a'")
        store._event(at(1), "pause", "a", reason="doomed")
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


def test_failed_operation_emits_nothing(tmp_path: Path) -> None:
    seen: list[Row] = []
    store = make_store(tmp_path, event_sink=seen.append)
    seen.clear()
    with pytest.raises(StateRefused):
        store.pause("missing", "x", at(0))
    with pytest.raises(StateRefused):
        store.request_cancel("missing", at(0))
    assert seen == []
    store.close()


def test_misfire_is_recorded(store: SqliteStore) -> None:
    store.record_misfire("a", at(100), [at(0), at(60)], "catchup=latest")
    (event,) = events_of_kind(store, "misfire")
    assert event["data"] == {
        "count": 2,
        "reason": "catchup=latest",
        "first": to_iso(at(0)),
        "last": to_iso(at(60)),
    }


# ---------------------------------------------------------------- two processes


def test_two_stores_on_one_file_interleave(tmp_path: Path) -> None:
    daemon = make_store(tmp_path)
    cli = SqliteStore(tmp_path / "state.sqlite")
    try:
        run_id = fire_at(daemon, "a", 0)
        cli.pause("b", "maintenance", at(1))
        claim_one(daemon, at(2))
        assert cli.request_cancel(run_id, at(3)) == RunStatus.RUNNING
        assert daemon.cancel_requests("w1") == [run_id]
        manual = cli.fire("b", at(4), trigger="manual", honour_pause=False)
        daemon.finish(run_id, at(5), outcome=Outcome.CANCELLED, next_status=RunStatus.CANCELLED)
        assert cli.get_run(run_id)["status"] == RunStatus.CANCELLED
        assert [r["id"] for r in daemon.claim(at(6), "w1", 30, 5, set(), set())] == [manual.run_id]
        cli.resume("b", at(7))
        assert daemon.paused_tasks() == set()
        assert len(daemon.events()) == len(cli.events())
    finally:
        cli.close()
        daemon.close()


def test_two_stores_writing_from_two_threads(tmp_path: Path) -> None:
    """The daemon and the CLI write at the same time; BEGIN IMMEDIATE + busy_timeout
    serialise them without "database is locked"."""
    daemon = make_store(tmp_path)
    cli = SqliteStore(tmp_path / "state.sqlite")
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def daemon_side() -> None:
        try:
            start.wait()
            for i in range(N_ROUNDS):
                fire_at(daemon, "a", i, overlap="allow")
                for row in daemon.claim(at(i), "w1", 30, 5, set(), {"a"}):
                    daemon.finish(
                        row["id"],
                        at(i),
                        outcome=Outcome.SUCCESS,
                        next_status=RunStatus.SUCCEEDED,
                    )
        except BaseException as exc:
            errors.append(exc)

    def cli_side() -> None:
        try:
            start.wait()
            for i in range(N_ROUNDS):
                cli.pause("b", f"p{i}", at(i))
                cli.fire("b", at(i), trigger="manual", overlap="allow", honour_pause=False)
                cli.resume("b", at(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=daemon_side), threading.Thread(target=cli_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        counts = daemon.counts()
        assert (
            counts.get("succeeded", 0) + counts.get("queued", 0) + counts.get("running", 0)
            == 2 * N_ROUNDS
        )
        assert len(daemon.list_runs(task_id="a", status="succeeded", limit=100)) == N_ROUNDS
        assert len(cli.list_runs(task_id="b", limit=100)) == N_ROUNDS
        assert len(events_of_kind(cli, "pause")) == N_ROUNDS
    finally:
        cli.close()
        daemon.close()


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


def test_to_iso_is_fixed_width_so_text_order_is_time_order() -> None:
    from datetime import UTC, datetime, timezone

    from agentd.clock import from_iso

    early = datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert to_iso(early) == "0999-01-02T03:04:05.000000Z"
    berlin = datetime(2026, 3, 29, 3, 30, tzinfo=timezone(timedelta(hours=2)))
    assert to_iso(berlin) == "2026-03-29T01:30:00.000000Z"
    assert from_iso(to_iso(berlin)) == berlin
    assert to_iso(early) < to_iso(datetime(1000, 1, 1, tzinfo=UTC)) < to_iso(berlin)


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


def test_version_moves_on_any_write_and_only_then(tmp_path: Path) -> None:
    """What lets an idle tick skip its reads: unchanged means nobody wrote."""
    store = make_store(tmp_path)
    try:
        v0 = store.version()
        store.first_queued_at()
        assert store.version() == v0  # reads move nothing
        fire_at(store, "a", 0)
        v1 = store.version()
        assert v1 != v0  # this connection's write
        other = _other_reader(tmp_path)
        with other:
            other.execute("UPDATE tasks SET paused=1 WHERE id='a'")
        other.close()
        v2 = store.version()
        assert v2 != v1  # another connection's commit (the CLI's)
        assert store.version() == v2
    finally:
        store.close()


def test_a_cancelled_waiter_does_not_cancel_a_queued_commit(tmp_path: Path) -> None:
    """An API request waiting in ``commit_done()`` may be cancelled (the client went away).
    The commit it waited on, still queued on the writer thread, must run anyway: its
    group holds run outcomes and events that ``settle`` then makes durable."""
    store = SqliteStore(tmp_path / "state.sqlite")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    store_unit = store.unit()
    store.emit(now, "first")
    first = store_unit.commit_off_loop()
    assert first is not None
    first.result()
    store.complete_commit()
    writer = store._writer  # white box: hold the writer thread so the next commit queues
    assert writer is not None
    release = threading.Event()
    writer.submit(release.wait)
    store_unit = store.unit()
    store.emit(now, "second")
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
    kinds = [r[0] for r in store.conn.execute("SELECT kind FROM events ORDER BY id")]
    store.close()
    assert kinds[-2:] == ["first", "second"]
