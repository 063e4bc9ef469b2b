"""Retention on PostgreSQL (agentd.state.postgres.retention), on a real server: which
history goes and what stays (the rules of ``tests/test_retention.py``, on states filled
through ``PostgresStore``), batches under the engine's write lock, one pruner at a time
across nodes, every query's plan on a large history, the size of the tables over
repeated fill/prune cycles, each node's own workspaces, the pruner thread, and ``agentd
prune`` as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import agentd_cli, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_retention import (
    DAY,
    T0,
    TASKS,
    _spend,
    at,
    finished,
    history,
    queued,
    read_all,
    running,
)

from agentd.alerts import Alert
from agentd.clock import ManualClock, to_iso
from agentd.config import Config, HistoryConfig, parse_config
from agentd.metrics import PRUNE_KINDS, Metrics
from agentd.models import Outcome, RunStatus
from agentd.outbox import Outbox
from agentd.runner import workspace_path
from agentd.state import retention as policy
from agentd.state.port import Finish, Fire, atomically
from agentd.state.postgres import retention
from agentd.state.postgres.engine import PostgresStore


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_url)
    s.sync_tasks(TASKS, T0)
    yield s
    s.close()


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def count(url: str, statement: str, params: tuple[Any, ...] = ()) -> int:
    return int(sql(url, statement, params)[0][0])


def run_ids(url: str) -> set[str]:
    return {r[0] for r in sql(url, "SELECT id FROM runs")}


def selected(url: str, select: retention.Selector, cut: policy.Cutoffs) -> list[Any]:
    """Every key a selector picks, batch after batch from the start (nothing deleted)."""
    conn = retention.connect(url, read_only=True)
    keys: list[Any] = []
    cursor: Any = None
    try:
        while True:
            sel = select(conn, cut, cursor, 2)
            keys += sel.keys
            if not sel.more:
                return keys
            cursor = sel.cursor
    finally:
        conn.close()


def prune(url: str, state_dir: Path, cut: policy.Cutoffs, **kwargs: Any) -> policy.Report:
    conn = retention.connect(url, read_only=kwargs.get("dry_run", False))
    try:
        return retention.prune(conn, state_dir, cut, **kwargs)
    finally:
        conn.close()


# ---------------------------------------------------------------- which rows go


def test_old_finished_runs_go_and_queued_running_and_quarantined_stay(
    store: PostgresStore, pg_url: str
) -> None:
    goes = [
        finished(store, "a", at(0), at(0.1)),
        finished(store, "a", at(1), at(1.1), RunStatus.CANCELLED),
        finished(store, "b", at(2), at(2.1), RunStatus.SKIPPED),
        finished(store, "b", at(3), at(3.1), RunStatus.BUDGET_EXHAUSTED),
    ]
    dropped = finished(store, "a", at(4), at(4.1), RunStatus.QUARANTINED)
    store.quarantine_drop(dropped, at(5))
    goes.append(dropped)
    held = finished(store, "b", at(6), at(6.1), RunStatus.QUARANTINED)
    young = finished(store, "a", at(25), at(25.1))
    old_queued = queued(store, "b", at(7))
    old_running = running(store, "a", at(8))
    read_all(store)
    cut = policy.cutoffs(history(keep_runs=10 * DAY), at(30))
    assert sorted(selected(pg_url, retention.select_old_runs, cut)) == sorted(goes)
    later = policy.cutoffs(history(keep_runs=10 * DAY), at(60))
    assert young in selected(pg_url, retention.select_old_runs, later)
    for kept in (held, old_queued, old_running):
        assert kept not in selected(pg_url, retention.select_old_runs, later)


def test_a_run_waits_until_the_alert_outbox_has_read_its_events(
    store: PostgresStore, pg_url: str
) -> None:
    early = finished(store, "a", at(0), at(0.1))
    read_all(store)
    late = finished(store, "a", at(1), at(1.1))
    cut = policy.cutoffs(history(keep_runs=DAY), at(10))
    assert selected(pg_url, retention.select_old_runs, cut) == [early]
    Outbox(store, Config(), ManualClock(at(10))).process(at(10))
    assert sorted(selected(pg_url, retention.select_old_runs, cut)) == sorted([early, late])


def test_max_runs_per_task_keeps_the_newest_and_never_an_active_run(
    store: PostgresStore, pg_url: str
) -> None:
    a_runs = [finished(store, "a", at(i), at(i + 0.1)) for i in range(8)]
    b_runs = [finished(store, "b", at(i), at(i + 0.1)) for i in range(3)]
    old_running = running(store, "a", at(8))
    a_runs += [finished(store, "a", at(i), at(i + 0.1)) for i in range(9, 12)]
    read_all(store)
    cut = policy.cutoffs(history(max_runs_per_task=4), at(12))
    capped = selected(pg_url, retention.select_capped_runs, cut)
    assert sorted(capped) == sorted(a_runs[:8])
    assert old_running not in capped and not set(b_runs) & set(capped)
    both = policy.cutoffs(history(max_runs_per_task=4, keep_runs=8.5 * DAY), at(12))
    by_age = selected(pg_url, retention.select_old_runs, both)
    by_cap = selected(pg_url, retention.select_capped_runs, both)
    assert sorted(by_age + by_cap) == sorted(a_runs[:8] + b_runs)
    assert not set(by_age) & set(by_cap)


def test_events_not_tied_to_a_run_go_after_keep_events(store: PostgresStore, pg_url: str) -> None:
    store.pause("a", "one", at(1))
    store.resume("a", at(2))
    store.record_misfire("b", at(20), [at(19)], "catchup")
    run_id = finished(store, "a", at(3), at(3.1))
    cut = policy.cutoffs(history(keep_events=10 * DAY), at(25))
    assert len(selected(pg_url, retention.select_events, cut)) == 4  # no outbox cursor yet
    read_all(store)
    store.pause("b", "unread", at(4))  # after the cursor: waits for the outbox
    kinds = dict(sql(pg_url, "SELECT id, kind FROM events WHERE run_id IS NULL"))
    picked = selected(pg_url, retention.select_events, cut)
    assert sorted(kinds[i] for i in picked) == ["pause", "resume", "task_added", "task_added"]
    assert count(pg_url, "SELECT COUNT(*) FROM events WHERE run_id=%s", (run_id,)) > 0


def test_quarantine_entries_expire_after_keep_quarantine(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    old = finished(store, "a", at(0), at(0.1), RunStatus.QUARANTINED)
    recent = finished(store, "b", at(20), at(20.1), RunStatus.QUARANTINED)
    read_all(store)
    cut = policy.cutoffs(history(keep_quarantine=15 * DAY, keep_runs=10 * DAY), at(30))
    assert selected(pg_url, retention.select_quarantine, cut) == [old]
    report = prune(pg_url, tmp_path, cut)
    assert report.counts["quarantine"] == 1 and report.counts["runs"] == 1
    assert [r["run_id"] for r in store.quarantine_list()] == [recent]
    assert old not in run_ids(pg_url) and recent in run_ids(pg_url)
    cut = policy.cutoffs(history(keep_runs=DAY), at(400))
    assert selected(pg_url, retention.select_quarantine, cut) == []
    assert selected(pg_url, retention.select_old_runs, cut) == []


def test_an_expired_quarantine_entry_leaves_its_run_dropped(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    old = finished(store, "a", at(0), at(0.1), RunStatus.QUARANTINED)
    read_all(store)
    report = prune(pg_url, tmp_path, policy.cutoffs(history(keep_quarantine=15 * DAY), at(30)))
    assert report.counts["quarantine"] == 1 and store.quarantine_list() == []
    assert store.get_run(old)["status"] == RunStatus.DROPPED  # as `quarantine drop` leaves it


def test_ledger_and_alarms_go_after_keep_ledger_but_not_what_a_budget_counts(
    store: PostgresStore, pg_url: str
) -> None:
    done = finished(store, "a", at(0), at(0.1))
    old = _spend(store, "a", done, at(0))
    live = running(store, "b", at(0))
    of_live_run = _spend(store, "b", live, at(0))
    in_flight = _spend(store, "a", done, at(1), commit=False)
    recent = _spend(store, "a", done, at(50))
    assert count(pg_url, "SELECT COUNT(*) FROM budget_alarms") == 6
    cut = policy.cutoffs(history(keep_ledger=40 * DAY), at(60))
    assert selected(pg_url, retention.select_ledger, cut) == [old]
    alarms = selected(pg_url, retention.select_budget_alarms, cut)
    old_alarms = sql(
        pg_url,
        "SELECT scope, window_start, threshold FROM budget_alarms WHERE ts < %s",
        (to_iso(at(20)),),
    )
    assert len(alarms) == 4 and sorted(alarms) == sorted(old_alarms)
    short = HistoryConfig.model_construct(**{**history().model_dump(), "keep_ledger": DAY})
    assert selected(pg_url, retention.select_ledger, policy.cutoffs(short, at(32.5))) == [old]
    assert selected(pg_url, retention.select_ledger, policy.cutoffs(short, at(31.9))) == []
    later = selected(pg_url, retention.select_ledger, policy.cutoffs(short, at(100)))
    assert later == [old, recent] and {in_flight, of_live_run}.isdisjoint(later)


def test_alerts_and_ended_deliveries_go_after_keep_alerts_never_a_pending_one(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    config = parse_config(
        "alerts: {channels: {journal: {log: {}}, broken: {command: {argv: ['false']},"
        " retries: 0}, later: {command: {argv: ['false']}, retries: 5}},"
        " rules: [{events: [run_quarantined], channels: [journal, broken]},"
        " {events: [deadman], channels: [later]}]}"
    )
    outbox = Outbox(store, config, ManualClock(at(0)))
    with atomically(store):
        sent = outbox.raise_alert(Alert("run_quarantined", "k1", "one", "a"), at(0))
        waiting = outbox.raise_alert(Alert("deadman", "k2", "two", "a"), at(0))
    asyncio.run(outbox.deliver_due(None))
    assert dict(sql(pg_url, "SELECT channel, status FROM outbox")) == {
        "journal": "delivered",
        "broken": "failed",
        "later": "pending",
    }
    with atomically(store):
        recent = outbox.raise_alert(Alert("run_quarantined", "k3", "three", "b"), at(20))
    cut = policy.cutoffs(history(keep_alerts=10 * DAY), at(25))
    assert selected(pg_url, retention.select_alerts, cut) == [sent]
    going = selected(pg_url, retention.select_outbox, cut)
    channels = sql(pg_url, "SELECT channel FROM outbox WHERE id = ANY(%s)", (going,))
    assert sorted(c for (c,) in channels) == ["broken", "journal"]
    report = prune(pg_url, tmp_path, cut)
    assert report.counts["alerts"] == 1 and report.counts["outbox"] == 2
    left = {r[0] for r in sql(pg_url, "SELECT id FROM alerts")}
    assert left == {waiting, recent}


# ---------------------------------------------------------------- the executor


def _snapshot(url: str, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table, key in (
        ("runs", "id"),
        ("attempts", "run_id"),
        ("events", "run_id"),
        ("checkpoints", "run_id"),
        ("agent_steps", "run_id"),
        ("quarantine", "run_id"),
    ):
        out[table] = sorted(
            tuple(r) for r in sql(url, f"SELECT * FROM {table} WHERE {key} = ANY(%s)", (ids,))
        )
    return out


def test_prune_works_in_small_batches_under_the_write_lock_and_leaves_active_runs_alone(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    old = [finished(store, "a", at(i / 10), at(i / 10 + 0.01), checkpoint=True) for i in range(10)]
    old += [finished(store, "b", at(i / 10), at(i / 10 + 0.01)) for i in range(4)]
    held = finished(store, "b", at(1.5), at(1.6), RunStatus.QUARANTINED, checkpoint=True)
    busy = running(store, "a", at(2))
    waiting = queued(store, "b", at(2.5))
    for run_id in [*old[:3], held]:
        store.record_agent_step(run_id, 1, "model", None, {"content": "x"}, at(2))
    read_all(store)
    kept = [held, busy, waiting]
    before = _snapshot(pg_url, kept)
    assert before["checkpoints"] and before["attempts"] and before["events"]
    assert before["agent_steps"]
    version = store.version()

    remaining: list[int] = []
    writer_waited: list[bool] = []

    def pace(batch_s: float) -> bool:
        assert batch_s < 5
        remaining.append(count(pg_url, "SELECT COUNT(*) FROM runs"))
        return True

    # A daemon's write transaction holds the write lock: the first batch waits for it.
    with psycopg.connect(pg_url, autocommit=True) as writer:
        writer.execute("BEGIN")
        writer.execute("SELECT pg_advisory_xact_lock(%s)", (retention.WRITE_LOCK,))
        result: dict[str, policy.Report] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                r=prune(
                    pg_url,
                    tmp_path,
                    policy.cutoffs(history(keep_runs=DAY), at(10)),
                    pace=pace,
                    batch_runs=3,
                )
            )
        )
        thread.start()
        wait_for(
            lambda: (
                count(
                    pg_url,
                    "SELECT COUNT(*) FROM pg_locks WHERE locktype='advisory' AND NOT granted",
                )
                == 1
            ),
            what="the pruner's first batch to wait for the write lock",
        )
        writer_waited.append(count(pg_url, "SELECT COUNT(*) FROM runs") == len(old) + len(kept))
        writer.execute("COMMIT")
        thread.join(30)
    report = result["r"]
    assert writer_waited == [True]
    total = len(old) + len(kept)
    steps = [a - b for a, b in zip([total, *remaining], remaining, strict=False)]
    assert max(steps) <= 3 and len(remaining) >= 5, remaining
    assert run_ids(pg_url) == set(kept)
    assert report.counts["runs"] == 14 and report.counts["checkpoints"] == 10
    assert report.counts["agent_steps"] == 3
    assert report.counts["attempts"] == 14 and report.counts["events"] == 14 * 3 + 10
    assert _snapshot(pg_url, kept) == before
    orphans = (
        "SELECT COUNT(*) FROM events WHERE run_id IS NOT NULL"
        " AND run_id NOT IN (SELECT id FROM runs)"
    )
    assert count(pg_url, orphans) == 0
    assert store.version() != version  # every node sees the change


def test_prune_stops_when_pace_says_so(store: PostgresStore, pg_url: str, tmp_path: Path) -> None:
    for i in range(10):
        finished(store, "a", at(i / 10), at(i / 10 + 0.01))
    read_all(store)
    cut = policy.cutoffs(history(keep_runs=DAY), at(10))
    report = prune(pg_url, tmp_path, cut, pace=lambda _s: False, batch_runs=4)
    assert report.stopped and report.counts["runs"] == 4 and len(run_ids(pg_url)) == 6


def test_a_dry_run_counts_what_prune_then_deletes(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    for i in range(7):
        finished(store, "a", at(i), at(i + 0.1), checkpoint=i % 2 == 0)
        finished(store, "b", at(i), at(i + 0.2), RunStatus.SKIPPED)
    _spend(store, "a", finished(store, "b", at(1.5), at(1.6)), at(1.5))
    finished(store, "a", at(2.5), at(2.6), RunStatus.QUARANTINED)
    store.pause("a", "x", at(3))
    store.resume("a", at(3.5))
    read_all(store)
    first = sorted(run_ids(pg_url))[0]
    (workspace_path(tmp_path, "a", first) / "out").mkdir(parents=True)
    (workspace_path(tmp_path, "a", first) / "out" / "x").write_bytes(b"x" * 700)
    orphan = workspace_path(tmp_path, "b", "20260101T000000-00000000000000000000")
    orphan.mkdir(parents=True)
    (orphan / "stdout.log").write_bytes(b"y" * 300)
    settings = history(
        keep_runs=4 * DAY, max_runs_per_task=2, keep_events=3 * DAY, keep_ledger=32 * DAY,
        keep_quarantine=3 * DAY,
    )  # fmt: skip
    cut = policy.cutoffs(settings, at(40))
    version = count(pg_url, "SELECT value::bigint FROM meta WHERE key='version_counter'")
    dry = prune(pg_url, tmp_path, cut, dry_run=True)
    assert count(pg_url, "SELECT value::bigint FROM meta WHERE key='version_counter'") == version
    assert orphan.exists() and dry.workspace_bytes == 1000
    real = prune(pg_url, tmp_path, cut, batch_runs=2, batch_rows=2)
    assert dry.counts["runs"] > 0 and dry.counts["ledger"] == 1 and dry.counts["workspaces"] == 2
    assert dry.counts == real.counts, (dry.counts, real.counts)
    assert dry.oldest == real.oldest and dry.newest == real.newest
    assert not orphan.exists()


def test_a_dry_runs_connection_cannot_write(pg_url: str, store: PostgresStore) -> None:
    conn = retention.connect(pg_url, read_only=True)
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM runs")
    finally:
        conn.close()


# ---------------------------------------------------------------- workspaces


def test_each_node_removes_only_its_own_workspaces_and_those_of_runs_gone(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    """Two nodes, each with its own state dir: the node that prunes removes its own
    directories of the runs it deleted, never the other's; the other removes its own at
    its next pass (even one where the database was not its to prune), and never a
    directory of a run still in the database."""
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    ran_on_a = finished(store, "a", at(0), at(0.1))
    ran_on_b = finished(store, "b", at(0.2), at(0.3))
    ran_on_both = finished(store, "a", at(0.4), at(0.5))
    young = finished(store, "b", at(9), at(9.1))
    read_all(store)

    def workspace(node: Path, task: str, run_id: str) -> Path:
        path = workspace_path(node, task, run_id)
        path.mkdir(parents=True)
        (path / "stdout.log").write_bytes(b"x")
        return path

    a_gone = workspace(node_a, "a", ran_on_a)
    b_gone = workspace(node_b, "b", ran_on_b)
    both = [workspace(node_a, "a", ran_on_both), workspace(node_b, "a", ran_on_both)]
    b_young = workspace(node_b, "b", young)
    a_elsewhere = tmp_path / "elsewhere"  # linked in: the link goes, never its target
    a_elsewhere.mkdir()
    (node_b / "runs" / "b" / "20260101T000000-00000000000000000001").symlink_to(a_elsewhere)
    cut = policy.cutoffs(history(keep_runs=DAY), at(5))

    conn = retention.connect(pg_url)
    try:
        report, busy = retention.prune_pass(conn, node_a, cut)
        assert not busy and report.counts["runs"] == 3 and report.counts["workspaces"] == 2
        assert not a_gone.exists() and not both[0].exists()
        assert b_gone.exists() and both[1].exists() and b_young.exists()  # node b's

        # Another node's pass holds the lock: node b's pass only sweeps its own.
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (retention.PRUNE_LOCK,))
            finished(store, "a", at(1), at(1.1))
            read_all(store)
            report, busy = retention.prune_pass(conn, node_b, cut)
            assert busy and report.counts["runs"] == 0 and report.counts["workspaces"] == 3
            assert len(run_ids(pg_url)) == 2  # the database was not this pass's
            other.execute("SELECT pg_advisory_unlock(%s)", (retention.PRUNE_LOCK,))
        assert not b_gone.exists() and not both[1].exists()
        assert b_young.exists() and a_elsewhere.exists()
        report, busy = retention.prune_pass(conn, node_b, cut)
        assert not busy and report.counts["runs"] == 1 and run_ids(pg_url) == {young}
    finally:
        conn.close()


# ---------------------------------------------------------------- one pruner


def test_two_pruners_at_once_prune_one_at_a_time(
    store: PostgresStore, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nodes' pruners start together on one history: one pass takes the database
    (the prune lock), the other finds it taken, says so at debug and skips it; the runs
    are pruned once, by one of them."""
    created = at(0)
    fires = [policy_fire(i) for i in range(400)]
    store.fire_many(fires, created)
    claimed = store.claim(created, "w", 3600, 400, set(), {"a"})
    store.finish_many([finish_of(r, created) for r in claimed])
    read_all(store)
    caplog.set_level(logging.DEBUG, logger="agentd.retention")
    counted: list[dict[str, int]] = [{}, {}]
    pruners = [
        retention.Pruner(
            pg_url,
            None,
            tmp_path / f"node{i}",
            lambda: history(keep_runs=DAY),
            ManualClock(at(10)),
            on_pruned=lambda c, i=i: counted[i].update(c),
            first_pass_s=0.0,
            batch_runs=5,
        )
        for i in range(2)
    ]
    for pruner in pruners:
        pruner.start()
    try:
        wait_for(lambda: all(p.passes >= 1 for p in pruners), what="a pass of each", timeout=60)
    finally:
        for pruner in pruners:
            assert pruner.stop()
    assert run_ids(pg_url) == set()
    runs = sorted(c.get("runs", 0) for c in counted)
    assert runs == [0, 400], counted
    assert sum(p.busy_passes for p in pruners) >= 1
    assert "another node is pruning the database" in caplog.text


def policy_fire(i: int) -> Fire:
    return Fire("a", at(0) + timedelta(seconds=i), overlap="allow")


def finish_of(row: Any, when: datetime) -> Finish:
    return Finish(row["id"], "a", row["attempt"], 0, Outcome.SUCCESS, RunStatus.SUCCEEDED, when)


# ---------------------------------------------------------------- indexes

_ISO = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def _run_id(n: str) -> str:
    """The id of the run made ``n`` seconds after ``BASE`` (a real id's shape)."""
    second = f"timestamp '2026-01-01' + {n} * interval '1 second'"
    return f"to_char({second}, 'YYYYMMDD\"T\"HH24MISS') || '-' || lpad(({n})::text, 20, '0')"


def _fill_large_history(url: str) -> None:
    """1,000 tasks, 50,000 runs (one in 4 in quarantine), 50,000 attempts, 10,000
    checkpoints, 160,000 events, 50,000 ledger rows (six calls a run), 20,000 budget
    alarms, alerts and deliveries: one a second from ``BASE``."""
    ts = f"to_char(timestamp '2026-01-01' + i * interval '1 second', '{_ISO}')"
    run_id = _run_id("i")
    task = "'t' || lpad((i % 1000)::text, 4, '0')"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks(id, fingerprint, kind, present, paused, consecutive_quarantines,"
            f" updated_at) SELECT {task}, 'f', 'command', 1, 0, 0, '{to_iso(BASE)}'"
            " FROM generate_series(0, 999) AS i ON CONFLICT DO NOTHING"
        )
        conn.execute(
            "INSERT INTO runs(id, task_id, trigger, scheduled_for, idempotency_key, status,"
            " attempt, failures, created_at, finished_at, outcome)"
            f" SELECT {run_id}, {task}, 'schedule', {ts}, 'k' || i,"
            " CASE WHEN i % 4 = 0 THEN 'quarantined' ELSE 'succeeded' END, 1, 0,"
            f" {ts}, {ts}, 'success' FROM generate_series(1, 50000) AS i"
        )
        conn.execute(
            "INSERT INTO quarantine(run_id, task_id, quarantined_at, attempts)"
            f" SELECT {run_id}, {task}, {ts}, 1 FROM generate_series(4, 50000, 4) AS i"
        )
        conn.execute(
            "INSERT INTO attempts(run_id, attempt, worker, started_at, finished_at, outcome)"
            f" SELECT {run_id}, 1, 'w', {ts}, {ts}, 'success' FROM generate_series(1, 50000) AS i"
        )
        conn.execute(
            "INSERT INTO checkpoints(run_id, data, seq, saved_at)"
            f" SELECT {run_id}, '{{}}', 1, {ts} FROM generate_series(5, 50000, 5) AS i"
        )
        conn.execute(
            "INSERT INTO agent_steps(run_id, seq, step, kind, payload, recorded_at)"
            f" SELECT {run_id}, s, 1, 'model', '{{}}', {ts}"
            " FROM generate_series(7, 50000, 7) AS i, generate_series(1, 3) AS s"
        )
        conn.execute(
            "INSERT INTO events(ts, kind, task_id, run_id, data)"
            f" SELECT {ts}, k, {task}, {run_id}, '{{}}' FROM generate_series(1, 50000) AS i,"
            " unnest(ARRAY['enqueue', 'claim', 'success']) AS k ORDER BY i"
        )
        conn.execute(
            "INSERT INTO events(ts, kind, task_id, data)"
            f" SELECT {ts}, 'pause', {task}, '{{}}' FROM generate_series(1, 50000, 5) AS i"
        )
        conn.execute(
            "INSERT INTO ledger(ts, run_id, task_id, provider, model, state)"
            f" SELECT {ts}, {_run_id('(i / 6 + 1)')}, {task}, 'p', 'm', 'committed'"
            " FROM generate_series(1, 50000) AS i"
        )
        conn.execute(
            "INSERT INTO budget_alarms(scope, window_start, threshold, ts)"
            f" SELECT 'task:' || {task}, {ts}, 0.5, {ts} FROM generate_series(1, 20000) AS i"
        )
        conn.execute(
            "INSERT INTO alerts(ts, kind, dedup_key, task_id, summary)"
            f" SELECT {ts}, 'run_quarantined', 'k' || i, {task}, 's'"
            " FROM generate_series(1, 20000) AS i"
        )
        conn.execute(
            "INSERT INTO outbox(alert_id, channel, dedup_key, created_at, status,"
            " next_attempt_at) SELECT i, 'c', 'k' || i, "
            f"{ts}, CASE WHEN i % 400 = 0 THEN 'pending' ELSE 'delivered' END, {ts}"
            " FROM generate_series(1, 20000) AS i"
        )
        conn.execute(
            "INSERT INTO meta(key, value) SELECT 'alerts_cursor', max(id)::text FROM events"
        )
        conn.execute("ANALYZE")
        # Its counters into the shared statistics now, before the next statement
        # returns (see test_every_retention_query_uses_an_index_on_a_large_history).
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT 1")


_BATCH_IDS = [f"20260101T0000{i:02d}-{i:020d}" for i in range(1, 51)]
"""As many run ids as a batch of runs holds."""
_SAMPLE: dict[str, tuple[Any, ...]] = {
    "runs_by_id": ("", "20260101T003000", 50),
    "held": (_BATCH_IDS,),
    "unread": (_BATCH_IDS, 100, list(policy.ALERT_KINDS)),
    "next_task": ("t0500",),
    "task_boundary": ("t0500", 44),
    "runs_of_task": ("t0500", "2026-01-01T10:00:00.000000Z", "", "", 50),
    "quarantine": ("", "20260101T003000", 300),
    "events": (0, 300),
    "ledger": (0, 300),
    "live_runs": (_BATCH_IDS, _BATCH_IDS),
    "budget_alarms": ("", "", float("-inf"), 300),
    "alerts": (0, 300),
    "pending_alerts": (),
    "outbox": (0, 300),
    "cursor": (),
    "present_runs": (_BATCH_IDS * 10,),
    "delete_run_events": (_BATCH_IDS,),
    "count_run_events": (_BATCH_IDS,),
    "delete_attempts": (_BATCH_IDS,),
    "count_attempts": (_BATCH_IDS,),
    "delete_checkpoints": (_BATCH_IDS,),
    "count_checkpoints": (_BATCH_IDS,),
    "delete_agent_steps": (_BATCH_IDS,),
    "count_agent_steps": (_BATCH_IDS,),
    "delete_runs": (_BATCH_IDS,),
    "count_quarantine": (_BATCH_IDS,),
    "delete_quarantine": (_BATCH_IDS,),
    "mark_dropped": (_BATCH_IDS,),
    "insert_drop": ("t", "drop", "a", "x", "{}"),
    "delete_events": ([1, 2],),
    "delete_ledger": ([1, 2],),
    "delete_budget_alarms": (["task:t0001"], ["2026-01-01T00:00:01.000000Z"], [0.5]),
    "delete_alerts": ([1, 2],),
    "delete_outbox": ([1, 2],),
}
"""Parameters for each statement's EXPLAIN, like those a pass sends."""


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


SCANNED = ("runs", "attempts", "checkpoints", "agent_steps", "events", "quarantine",
           "ledger", "budget_alarms", "alerts", "outbox", "tasks")  # fmt: skip


def _seq_scans(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(SCANNED),),
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def test_every_retention_query_uses_an_index_on_a_large_history(
    pg_url: str, store: PostgresStore, tmp_path: Path
) -> None:
    """On a history large enough that a scan would be the planner's choice if no index
    served a query, every statement of ``QUERIES`` plans an index search (EXPLAIN), and
    a whole pass that prunes thousands of runs, events, ledger rows and alerts makes no
    sequential scan of any of those tables (the server's own counters, which also see
    the foreign-key checks of the deletes).

    The counters are what each backend reported: one reports when it ends, or now and
    then while idle (up to 10 s later in PostgreSQL 15). So the store's own backend (its
    reads at open, of tables then empty: scans) ends first, and the filling backend
    flushes before it returns: else either could report into the pass's window (seen
    in a full suite run: runs +7, events +3, ... before this)."""
    store.close()
    _fill_large_history(pg_url)
    assert set(_SAMPLE) == set(retention.QUERIES)  # a new statement needs its check
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for name, statement in retention.QUERIES.items():
            conn.execute("BEGIN")
            try:
                [(plan,)] = conn.execute(
                    "EXPLAIN (FORMAT JSON) " + statement, _SAMPLE[name]
                ).fetchall()
            finally:
                conn.execute("ROLLBACK")
            nodes = list(_nodes(plan[0]["Plan"]))
            scans = [
                n["Relation Name"]
                for n in nodes
                if n["Node Type"] == "Seq Scan" and n.get("Relation Name") != "meta"
            ]
            assert not scans, f"{name}: {statement}\n{json.dumps(plan, indent=1)}"
            if name not in ("cursor", "insert_drop"):
                assert any("Index" in n["Node Type"] for n in nodes), (name, plan)
    # A real pass: runs of the first hour by age and the oldest of every task by the
    # cap, events, ledger, alarms, alerts and deliveries of the first hour.
    now = BASE + timedelta(days=100)
    hour = (now - BASE).total_seconds() - 3600
    cut = policy.cutoffs(
        history(keep_runs=hour, max_runs_per_task=48, keep_events=hour, keep_ledger=hour,
                keep_alerts=hour),
        now,
    )  # fmt: skip
    before = _seq_scans(pg_url)
    report = prune(pg_url, tmp_path, cut)
    after = _seq_scans(pg_url)
    assert report.counts["runs"] > 2000 and report.counts["events"] > 6000, report.counts
    assert min(report.counts[k] for k in ("ledger", "budget_alarms", "alerts", "outbox")) > 0
    assert {t: after[t] - before[t] for t in SCANNED} == dict.fromkeys(SCANNED, 0)


# ---------------------------------------------------------------- bloat


def _fill_cycle(url: str, cycle: int, runs: int) -> None:
    """``runs`` finished runs with an attempt and three events each, created on day
    ``cycle`` from ``BASE``, all read by the alert outbox."""
    start = f"timestamp '2026-01-01' + interval '{cycle} days'"
    ts = f"to_char({start} + i * interval '1 second', '{_ISO}')"
    run = f"to_char({start} + i * interval '1 second', 'YYYYMMDD\"T\"HH24MISS')"
    run_id = f"{run} || '-' || lpad(i::text, 20, '0')"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO runs(id, task_id, trigger, scheduled_for, idempotency_key, status,"
            " attempt, failures, created_at, finished_at, outcome, error)"
            f" SELECT {run_id}, 'a', 'schedule', {ts}, 'k{cycle}-' || i, 'succeeded', 1, 0,"
            f" {ts}, {ts}, 'success', repeat('e', 200) FROM generate_series(1, {runs}) AS i"
        )
        conn.execute(
            "INSERT INTO attempts(run_id, attempt, worker, started_at, finished_at, outcome)"
            f" SELECT {run_id}, 1, 'w', {ts}, {ts}, 'success'"
            f" FROM generate_series(1, {runs}) AS i"
        )
        conn.execute(
            "INSERT INTO events(ts, kind, task_id, run_id, data)"
            f" SELECT {ts}, k, 'a', {run_id}, '{{\"pad\": \"' || repeat('p', 100) || '\"}}'"
            f" FROM generate_series(1, {runs}) AS i,"
            " unnest(ARRAY['enqueue', 'claim', 'success']) AS k ORDER BY i"
        )
        conn.execute(
            "INSERT INTO meta(key, value) SELECT 'alerts_cursor', max(id)::text FROM events"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        )


def _size(url: str) -> int:
    return count(url, "SELECT pg_total_relation_size('runs') + pg_total_relation_size('events')")


def test_repeated_fill_and_prune_keeps_the_tables_from_bloating(
    pg_url: str, store: PostgresStore, tmp_path: Path
) -> None:
    """With autovacuum off on the tables (as if it fell behind a steady fill, river#59),
    six cycles of 4,000 runs and 12,000 events filled, then pruned: each pass VACUUMs
    what it deleted from, the next fill reuses the space, and the size of ``runs`` and
    ``events`` (with their indexes and TOAST) after the last cycle is within a small
    factor of the size after the first, and no longer grows. Without the VACUUM it grows
    by a cycle's worth each time."""
    for table in ("runs", "attempts", "events"):
        sql(pg_url, f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    sizes: list[int] = []
    for cycle in range(6):
        _fill_cycle(pg_url, cycle, 4000)
        now = BASE + timedelta(days=cycle, hours=3)
        conn = retention.connect(pg_url)
        try:
            report, busy = retention.prune_pass(
                conn, tmp_path, policy.cutoffs(history(keep_runs=3600), now)
            )
        finally:
            conn.close()
        assert not busy and report.counts["runs"] == 4000, report.counts
        assert count(pg_url, "SELECT COUNT(*) FROM runs") == 0
        sizes.append(_size(pg_url))
    # The second fill cannot reuse the index pages the first VACUUM freed (a deleted
    # btree page is recycled by the VACUUM after), so the high-water mark is reached at
    # the second cycle, and then it holds. Without the VACUUM: 6x at the sixth, growing.
    assert sizes[-1] <= 2.5 * sizes[0], sizes
    assert sizes[-1] <= 1.1 * sizes[2], sizes
    vacuumed = count(
        pg_url,
        "SELECT COUNT(*) FROM pg_stat_user_tables WHERE relname IN ('runs', 'events')"
        " AND vacuum_count >= 6",
    )
    assert vacuumed == 2


# ---------------------------------------------------------------- the thread


def test_the_pruner_thread_prunes_counts_and_stops_promptly(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    for i in range(300):
        finished(store, "a", at(i / 1000), at(i / 1000 + 0.0001))
    read_all(store)
    metrics = Metrics("test")
    settings = {"now": history(keep_runs=DAY)}
    clock = ManualClock(at(10))
    pruner = retention.Pruner(
        pg_url, None, tmp_path, lambda: settings["now"], clock, metrics.pruned_history,
        first_pass_s=0.0, settings_poll_s=0.05, batch_runs=100,
    )  # fmt: skip
    pruner.start()
    wait_for(lambda: pruner.passes >= 1, what="a first pass")
    assert run_ids(pg_url) == set()

    def pruned() -> dict[str, float]:
        return {
            s.labels["kind"]: s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples
            if s.name == "agentd_pruned_total"
        }

    samples = pruned()
    assert set(samples) == set(PRUNE_KINDS)
    assert samples["runs"] == 300 and samples["attempts"] == 300 and samples["events"] == 900
    for i in range(200):
        finished(store, "b", at(20 + i / 1000), at(20 + i / 1000 + 0.0001))
    read_all(store)
    assert pruner.passes == 1
    settings["now"] = history(keep_runs=DAY / 2, prune_every=1)
    clock.advance(20 * DAY)
    wait_for(lambda: pruner.passes >= 2 and not run_ids(pg_url), what="a pass on the new settings")
    assert pruned()["runs"] == 500
    t0 = time.monotonic()
    assert pruner.stop()
    assert time.monotonic() - t0 < 2.0
    assert not [t for t in threading.enumerate() if t.name == "agentd-retention"]
    # Its connection went with it, and with the connection its lock.
    assert (
        count(
            pg_url,
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'agentd-retention'",
        )
        == 0
    )


def test_a_stop_ends_a_long_pass_between_batches(
    store: PostgresStore, pg_url: str, tmp_path: Path
) -> None:
    created = at(0)
    store.fire_many([policy_fire(i) for i in range(400)], created)
    claimed = store.claim(created, "w", 3600, 400, set(), {"a"})
    store.finish_many([finish_of(r, created) for r in claimed])
    read_all(store)
    pruner = retention.Pruner(
        pg_url, None, tmp_path, lambda: history(keep_runs=DAY), ManualClock(at(10)),
        first_pass_s=0.0, batch_runs=1,
    )  # fmt: skip
    pruner.start()
    wait_for(lambda: len(run_ids(pg_url)) < 400, what="the first batches")
    t0 = time.monotonic()
    assert pruner.stop()
    assert time.monotonic() - t0 < 2.0
    left = len(run_ids(pg_url))
    assert 0 < left < 400
    assert not [t for t in threading.enumerate() if t.name == "agentd-retention"]


def test_a_stop_cancels_a_vacuum_in_progress(
    store: PostgresStore, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VACUUM is no batch: ``stop()`` cuts it short. (A reader's lock on ``runs``
    holds the VACUUM in its last phase, where it tries for 5 s to take the lock that
    truncating the emptied table needs.)"""
    for i in range(300):
        finished(store, "a", at(i / 1000), at(i / 1000 + 0.0001))
    read_all(store)
    caplog.set_level(logging.INFO, logger="agentd.retention")
    with psycopg.connect(pg_url) as reader:
        reader.execute("LOCK TABLE runs IN ACCESS SHARE MODE")  # no snapshot, no xid
        pruner = retention.Pruner(
            pg_url, None, tmp_path, lambda: history(keep_runs=DAY), ManualClock(at(10)),
            first_pass_s=0.0, batch_runs=300,
        )  # fmt: skip
        pruner.start()
        wait_for(
            lambda: count(
                pg_url,
                "SELECT COUNT(*) FROM pg_stat_progress_vacuum"
                " WHERE relid = 'runs'::regclass AND phase = 'truncating heap'",
            ),
            what="the VACUUM of runs to wait for its truncation lock",
        )
        t0 = time.monotonic()
        assert pruner.stop()
        # Uncancelled, the VACUUM would wait out its 5 s for the lock; a loaded machine
        # may take a while to deliver the cancel, so the bound sits between.
        assert time.monotonic() - t0 < 4.0
        reader.rollback()
    assert "VACUUM of runs cut short to stop" in caplog.text
    assert run_ids(pg_url) == set()


# ---------------------------------------------------------------- agentd prune


def _config_for(tmp_path: Path, url: str, history_yaml: str) -> Path:
    config = tmp_path / "agentd.yaml"
    config.write_text(
        f"daemon: {{state_dir: {tmp_path / 'state'}, http: {{port: 9}}}}\n"
        f"state: {{url: '{url}'}}\n"
        f"history: {history_yaml}\n"
        "tasks:\n"
        "  a: {schedule: {manual: true}, command: {argv: ['true']}}\n"
        "  b: {schedule: {manual: true}, command: {argv: ['true']}}\n"
    )
    return config


def test_cli_prune_on_postgresql_dry_run_then_prune_and_a_busy_lock(
    pg_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    store = PostgresStore(pg_url)
    store.sync_tasks(TASKS, now - timedelta(days=30))
    old = []
    for i in range(6):
        created = now - timedelta(days=20 - i)
        old.append(finished(store, "a", created, created + timedelta(minutes=1)))
    keep = [finished(store, "b", now - timedelta(hours=1), now - timedelta(minutes=59))]
    keep.append(queued(store, "b", now - timedelta(days=25)))
    read_all(store)
    store.close()
    workspace = workspace_path(tmp_path / "state", "a", old[0])
    workspace.mkdir(parents=True)
    (workspace / "stdout.log").write_bytes(b"z" * 2048)
    config = _config_for(tmp_path, pg_url, "{keep_runs: 10d, keep_events: forever}")

    def version() -> int:
        return count(pg_url, "SELECT value::bigint FROM meta WHERE key='version_counter'")

    before = version()
    dry = agentd_cli("prune", "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"^would prune \(history: keep_runs: 10d", dry.stdout, re.M), dry.stdout
    assert re.search(r"^\s+runs\s+6\s+oldest \S+\s+newest \S+$", dry.stdout, re.M), dry.stdout
    assert re.search(r"^\s+workspaces\s+1\s+2\.0 KiB", dry.stdout, re.M), dry.stdout
    assert version() == before and len(run_ids(pg_url)) == 8 and workspace.exists()

    # A daemon's pass holds the prune lock: the CLI says so and exits 75.
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (retention.PRUNE_LOCK,))
        busy = agentd_cli("prune", "--json", config=config)
        assert busy.returncode == 75 and "another node is pruning" in busy.stderr, busy.stderr
        assert len(run_ids(pg_url)) == 8
        other.execute("SELECT pg_advisory_unlock(%s)", (retention.PRUNE_LOCK,))

    real = agentd_cli("prune", "--json", config=config)
    assert real.returncode == 0, real.stderr
    out = json.loads(real.stdout)
    assert not out["dry_run"] and out["counts"]["runs"] == 6 and out["counts"]["workspaces"] == 1
    assert run_ids(pg_url) == set(keep) and not workspace.exists()
    assert version() != before
    again = agentd_cli("prune", config=config)
    assert again.returncode == 0 and re.search(r"^\s+runs\s+0$", again.stdout, re.M), again.stdout


def test_cli_prune_refuses_a_database_without_agentd_state(pg_url: str, tmp_path: Path) -> None:
    proc = agentd_cli("prune", "--dry-run", config=_config_for(tmp_path, pg_url, "{}"))
    assert proc.returncode == 1 and "holds no agentd state" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert count(pg_url, "SELECT COUNT(*) FROM pg_tables WHERE schemaname='public'") == 0
