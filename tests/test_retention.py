"""Retention (agentd.state.sqlite.retention): which history goes, given the settings and a time, on
real state DBs filled through ``SqliteStore``; the batch executor; the pruner thread; and
``agentd prune`` as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import agentd_cli, wait_for
from prometheus_client.parser import text_string_to_metric_families

from agentd import ledger
from agentd.alerts import Alert
from agentd.budget import Need, Scope
from agentd.clock import ManualClock, to_iso
from agentd.config import Config, ConfigError, HistoryConfig, parse_config
from agentd.metrics import PRUNE_KINDS, Metrics
from agentd.models import Outcome, RunStatus
from agentd.outbox import Outbox
from agentd.runner import workspace_path
from agentd.state.port import Finish, Fire, atomically
from agentd.state.sqlite import retention
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)
TASKS = {"a": ("fa", "python"), "b": ("fb", "python")}
DAY = 86400.0


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


def history(**settings: Any) -> HistoryConfig:
    """Everything kept forever except what the test sets."""
    base: dict[str, Any] = {
        "keep_runs": None,
        "max_runs_per_task": None,
        "keep_events": None,
        "keep_quarantine": None,
        "keep_ledger": None,
        "keep_alerts": None,
    }
    return HistoryConfig(**{**base, **settings})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.sqlite")
    s.sync_tasks(TASKS, T0)
    yield s
    s.close()


_OUTCOME = {
    RunStatus.SUCCEEDED: Outcome.SUCCESS,
    RunStatus.QUARANTINED: Outcome.FAILURE,
    RunStatus.BUDGET_EXHAUSTED: Outcome.BUDGET_EXHAUSTED,
}


def finished(
    store: SqliteStore,
    task: str,
    created: datetime,
    ended: datetime,
    status: RunStatus = RunStatus.SUCCEEDED,
    *,
    checkpoint: bool = False,
) -> str:
    """A run fired at ``created`` and ended at ``ended`` with ``status``, through the
    store's own transitions (fire, claim, finish / cancel / skip)."""
    if status == RunStatus.SKIPPED:
        store.pause(task, "test", created)
        result = store.fire(task, created, scheduled_for=created)
        store.resume(task, created)
        assert result.status == RunStatus.SKIPPED
        return result.run_id
    result = store.fire(task, created, scheduled_for=created, overlap="allow")
    if status == RunStatus.CANCELLED:
        assert store.request_cancel(result.run_id, ended) == RunStatus.CANCELLED
        return result.run_id
    others = set(TASKS) - {task}
    [row] = store.claim(created, "test-worker", 3600, 1, others, {task})
    assert row["id"] == result.run_id
    if checkpoint:
        store.save_checkpoint(row["id"], {"next": 1}, created)
    store.finish(
        row["id"],
        ended,
        outcome=_OUTCOME[status],
        next_status=status,
        error=None if status == RunStatus.SUCCEEDED else "it failed",
        duration_s=(ended - created).total_seconds(),
    )
    return row["id"]


def queued(store: SqliteStore, task: str, created: datetime) -> str:
    return store.fire(task, created, scheduled_for=created, overlap="allow").run_id


def running(store: SqliteStore, task: str, created: datetime) -> str:
    run_id = queued(store, task, created)
    others = set(TASKS) - {task}
    [row] = store.claim(created, "test-worker", 3600, 1, others, {task})
    assert row["id"] == run_id
    store.save_checkpoint(run_id, {"next": 3}, created)
    return run_id


def read_all(store: SqliteStore) -> None:
    """The alert outbox reads every event there is (its first pass: all is old news)."""
    Outbox(store, Config(), ManualClock(T0)).process(T0)


def selected(store: SqliteStore, select: retention.Selector, cut: retention.Cutoffs) -> list[Any]:
    """Every key a selector picks, batch after batch from the start (nothing deleted)."""
    conn = retention.connect(store.path, read_only=True)
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


def count(store: SqliteStore, sql: str, params: tuple[Any, ...] = ()) -> int:
    return int(store.conn.execute(sql, params).fetchone()[0])


def run_ids(store: SqliteStore) -> set[str]:
    return {r[0] for r in store.conn.execute("SELECT id FROM runs")}


# ---------------------------------------------------------------- settings


def test_history_settings_accept_forever_and_null() -> None:
    config = parse_config(
        "history: {keep_runs: 14d, keep_events: forever, keep_quarantine: null,"
        " keep_ledger: 40d, keep_alerts: 2h, max_runs_per_task: forever, prune_every: 30s}"
    )
    h = config.history
    assert (h.keep_runs, h.keep_events, h.keep_quarantine) == (14 * DAY, None, None)
    assert (h.keep_ledger, h.keep_alerts, h.max_runs_per_task) == (40 * DAY, 7200.0, None)
    assert h.prune_every == 30.0
    default = parse_config("").history
    assert default.keep_runs == 30 * DAY and default.max_runs_per_task == 10_000
    assert default.keep_ledger is not None and default.keep_ledger >= 32 * DAY
    assert default.keep_quarantine is None


def test_bad_history_settings_name_their_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            "alerts: {cooldown: 2h}\n"
            "history: {keep_runs: -1s, keep_ledger: 31d, keep_alerts: 1h, max_runs_per_task: 0,"
            " prune_every: 0, keep_event: 1d}",
            "agentd.yaml",
        )
    found = {p.path: p.message for p in info.value.problems}
    assert set(found) == {
        "history.keep_runs",
        "history.keep_ledger",
        "history.max_runs_per_task",
        "history.prune_every",
        "history.keep_event",
    }, found
    assert "32d" in found["history.keep_ledger"]
    assert "agentd.yaml: history.keep_ledger:" in info.value.render()
    # The cooldown check runs once the sections are valid.
    with pytest.raises(ConfigError) as info:
        parse_config(
            "alerts: {cooldown: 2h, channels: {j: {log: {}}},"
            " rules: [{events: ['*'], channels: [j], cooldown: 3d}]}\n"
            "history: {keep_alerts: 2d}"
        )
    [problem] = info.value.problems
    assert problem.path == "history.keep_alerts" and "cooldown" in problem.message


def test_cutoffs_are_the_settings_before_now_with_a_floor_under_the_ledger() -> None:
    now = at(100)
    cut = retention.cutoffs(history(keep_runs=2 * DAY, keep_events=DAY, max_runs_per_task=5), now)
    assert cut.runs == at(98) and cut.events == at(99) and cut.max_runs_per_task == 5
    assert cut.quarantine is None and cut.ledger is None and cut.alerts is None
    # Validation forbids a shorter ledger; the policy does not rely on it.
    short = HistoryConfig.model_construct(**{**history().model_dump(), "keep_ledger": DAY})
    assert retention.cutoffs(short, now).ledger == now - timedelta(days=32)
    assert retention.run_id_bound(datetime(2026, 3, 1, 12, 30, 5, 999, tzinfo=UTC)) == (
        "20260301T123005"
    )


# ---------------------------------------------------------------- which runs go


def test_old_finished_runs_go_and_queued_running_and_quarantined_stay(store: SqliteStore) -> None:
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
    cut = retention.cutoffs(history(keep_runs=10 * DAY), at(30))
    assert sorted(selected(store, retention.select_old_runs, cut)) == sorted(goes)
    # The same runs at a later time: the young one has aged too; the rest still stay.
    later = retention.cutoffs(history(keep_runs=10 * DAY), at(60))
    assert young in selected(store, retention.select_old_runs, later)
    for kept in (held, old_queued, old_running):
        assert kept not in selected(store, retention.select_old_runs, later)


def test_a_run_is_judged_by_when_it_finished_not_when_it_was_created(store: SqliteStore) -> None:
    run_id = finished(store, "a", at(0), at(0.1), RunStatus.QUARANTINED)
    store.quarantine_release(run_id, at(40))  # queued again, a new attempt
    [row] = store.claim(at(40), "test-worker", 3600, 1, {"b"}, set())
    store.finish(row["id"], at(40), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED)
    read_all(store)
    cut = retention.cutoffs(history(keep_runs=30 * DAY), at(41))
    assert run_id < retention.run_id_bound(cut.runs or T0)  # created long before the cut
    assert selected(store, retention.select_old_runs, cut) == []
    cut = retention.cutoffs(history(keep_runs=30 * DAY), at(71))
    assert selected(store, retention.select_old_runs, cut) == [run_id]


def test_a_run_waits_until_the_alert_outbox_has_read_its_events(store: SqliteStore) -> None:
    early = finished(store, "a", at(0), at(0.1))
    read_all(store)
    late = finished(store, "a", at(1), at(1.1))  # its events are after the outbox's cursor
    cut = retention.cutoffs(history(keep_runs=DAY), at(10))
    assert selected(store, retention.select_old_runs, cut) == [early]
    Outbox(store, Config(), ManualClock(at(10))).process(at(10))
    assert sorted(selected(store, retention.select_old_runs, cut)) == sorted([early, late])


def test_max_runs_per_task_keeps_the_newest_and_never_an_active_run(store: SqliteStore) -> None:
    a_runs = [finished(store, "a", at(i), at(i + 0.1)) for i in range(8)]
    b_runs = [finished(store, "b", at(i), at(i + 0.1)) for i in range(3)]
    old_running = running(store, "a", at(8))
    a_runs += [finished(store, "a", at(i), at(i + 0.1)) for i in range(9, 12)]
    read_all(store)
    cut = retention.cutoffs(history(max_runs_per_task=4), at(12))
    # Task a's newest four runs are 8 (running) and 9-11; its runs 0-7 go. Task b is
    # under the cap.
    assert sorted(selected(store, retention.select_capped_runs, cut)) == sorted(a_runs[:8])
    assert old_running not in selected(store, retention.select_capped_runs, cut)
    assert not set(b_runs) & set(selected(store, retention.select_capped_runs, cut))
    # What the age rule takes is its own: no run is picked twice.
    both = retention.cutoffs(history(max_runs_per_task=4, keep_runs=8.5 * DAY), at(12))
    by_age = selected(store, retention.select_old_runs, both)
    by_cap = selected(store, retention.select_capped_runs, both)
    assert sorted(by_age + by_cap) == sorted(a_runs[:8] + b_runs)
    assert not set(by_age) & set(by_cap)


def test_events_not_tied_to_a_run_go_after_keep_events(store: SqliteStore) -> None:
    store.pause("a", "one", at(1))
    store.resume("a", at(2))
    store.record_misfire("b", at(20), [at(19)], "catchup")
    run_id = finished(store, "a", at(3), at(3.1))
    cut = retention.cutoffs(history(keep_events=10 * DAY), at(25))
    # Before the outbox's first pass there is no cursor: that pass skips history anyway.
    assert len(selected(store, retention.select_events, cut)) == 4
    read_all(store)
    store.pause("b", "unread", at(4))  # after the cursor: waits for the outbox
    kinds = {
        r[0]: r[1] for r in store.conn.execute("SELECT id, kind FROM events WHERE run_id IS NULL")
    }
    picked = selected(store, retention.select_events, cut)
    assert sorted(kinds[i] for i in picked) == ["pause", "resume", "task_added", "task_added"]
    assert count(store, "SELECT COUNT(*) FROM events WHERE run_id=?", (run_id,)) > 0
    assert not {i for i in picked if kinds[i] == "misfire"}


def test_quarantine_entries_expire_after_keep_quarantine(
    store: SqliteStore, tmp_path: Path
) -> None:
    old = finished(store, "a", at(0), at(0.1), RunStatus.QUARANTINED)
    recent = finished(store, "b", at(20), at(20.1), RunStatus.QUARANTINED)
    read_all(store)
    settings = history(keep_quarantine=15 * DAY, keep_runs=10 * DAY)
    cut = retention.cutoffs(settings, at(30))
    assert selected(store, retention.select_quarantine, cut) == [old]
    conn = retention.connect(store.path)
    report = retention.prune(conn, tmp_path, cut)
    conn.close()
    assert report.counts["quarantine"] == 1 and report.counts["runs"] == 1
    assert [r["run_id"] for r in store.quarantine_list()] == [recent]
    assert old not in run_ids(store) and recent in run_ids(store)
    # Forever (the default) keeps them until an operator releases or drops them.
    cut = retention.cutoffs(history(keep_runs=DAY), at(400))
    assert selected(store, retention.select_quarantine, cut) == []
    assert selected(store, retention.select_old_runs, cut) == []


def test_an_expired_quarantine_entry_leaves_its_run_dropped(
    store: SqliteStore, tmp_path: Path
) -> None:
    old = finished(store, "a", at(0), at(0.1), RunStatus.QUARANTINED)
    read_all(store)
    cut = retention.cutoffs(history(keep_quarantine=15 * DAY), at(30))  # runs kept
    conn = retention.connect(store.path)
    report = retention.prune(conn, tmp_path, cut)
    conn.close()
    assert report.counts["quarantine"] == 1 and store.quarantine_list() == []
    assert store.get_run(old)["status"] == RunStatus.DROPPED  # as `quarantine drop` leaves it


def _spend(store: SqliteStore, task: str, run_id: str, when: datetime, commit: bool = True) -> int:
    end = when + timedelta(days=1)
    day = Scope(f"task:{task}:day", f"{task}:day", task, "day", 1.0, None, when, end)
    entry = ledger.reserve(
        store,
        when,
        run_id=run_id,
        task_id=task,
        provider="p",
        model="m",
        item=None,
        need=Need(10, 10, 0.9),
        scopes=[day],
    )
    assert isinstance(entry, int)
    if commit:
        ledger.commit(
            store,
            when,
            entry,
            input_tokens=10,
            output_tokens=10,
            cost=0.9,
            status="200",
            duration_s=0.1,
            usage_missing=False,
            scopes=[day],
        )
    return entry


def test_ledger_and_alarms_go_after_keep_ledger_but_not_what_a_budget_counts(
    store: SqliteStore,
) -> None:
    done = finished(store, "a", at(0), at(0.1))
    old = _spend(store, "a", done, at(0))
    live = running(store, "b", at(0))
    of_live_run = _spend(store, "b", live, at(0))
    in_flight = _spend(store, "a", done, at(1), commit=False)
    recent = _spend(store, "a", done, at(50))
    assert count(store, "SELECT COUNT(*) FROM budget_alarms") == 6  # 50 and 80 %, each day
    cut = retention.cutoffs(history(keep_ledger=40 * DAY), at(60))
    assert selected(store, retention.select_ledger, cut) == [old]
    alarms = selected(store, retention.select_budget_alarms, cut)
    assert (
        len(alarms) == 4
        and count(store, "SELECT COUNT(*) FROM budget_alarms WHERE ts < ?", (to_iso(at(20)),)) == 4
    )
    # Never less than 32 days, whatever the settings (a budget month counts them).
    short = HistoryConfig.model_construct(**{**history().model_dump(), "keep_ledger": DAY})
    assert selected(store, retention.select_ledger, retention.cutoffs(short, at(32.5))) == [old]
    assert selected(store, retention.select_ledger, retention.cutoffs(short, at(31.9))) == []
    # Long after: a reservation in flight and a live run's spend still stay.
    later = selected(store, retention.select_ledger, retention.cutoffs(short, at(100)))
    assert later == [old, recent] and {in_flight, of_live_run}.isdisjoint(later)


def test_alerts_and_ended_deliveries_go_after_keep_alerts_never_a_pending_one(
    store: SqliteStore,
) -> None:
    config = parse_config(
        "alerts: {channels: {journal: {log: {}}, broken: {command: {argv: ['false']},"
        " retries: 0}, later: {command: {argv: ['false']}, retries: 5}},"
        " rules: [{events: [run_quarantined], channels: [journal, broken]},"
        " {events: [deadman], channels: [later]}]}"
    )
    clock = ManualClock(at(0))
    outbox = Outbox(store, config, clock)
    with atomically(store):
        sent = outbox.raise_alert(Alert("run_quarantined", "k1", "one", "a"), at(0))
        waiting = outbox.raise_alert(Alert("deadman", "k2", "two", "a"), at(0))
    # One round of deliveries: the log channel delivers, `false` without retries fails
    # for good, `false` with retries stays pending (retried later).
    asyncio.run(outbox.deliver_due(None))  # type: ignore[arg-type]
    statuses = dict(store.conn.execute("SELECT channel, status FROM outbox").fetchall())
    assert statuses == {"journal": "delivered", "broken": "failed", "later": "pending"}
    with atomically(store):
        recent = outbox.raise_alert(Alert("run_quarantined", "k3", "three", "b"), at(20))
    cut = retention.cutoffs(history(keep_alerts=10 * DAY), at(25))
    assert selected(store, retention.select_alerts, cut) == [sent]
    going = selected(store, retention.select_outbox, cut)
    assert sorted(
        r[0]
        for r in store.conn.execute(
            "SELECT channel FROM outbox WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(going),),
        )
    ) == ["broken", "journal"]
    assert waiting not in selected(store, retention.select_alerts, cut)
    assert recent not in selected(store, retention.select_alerts, cut)


# ---------------------------------------------------------------- indexes


def _plan(conn: sqlite3.Connection, sql: str) -> list[str]:
    args = tuple(("[]" if "json_each" in sql else 0) for _ in range(sql.count("?")))
    return [str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]


def test_every_retention_query_is_served_by_an_index(store: SqliteStore) -> None:
    for name, sql in retention.QUERIES.items():
        plan = _plan(store.conn, sql)
        scans = [line for line in plan if re.match(r"SCAN (?!json_each)", line)]
        assert not scans, f"{name}: {sql}\n{plan}"
        if sql.startswith("SELECT") and "json_each" not in sql and "meta" not in sql:
            assert any(line.startswith("SEARCH") for line in plan), (name, plan)
    # The cut on runs is a range of the primary key, not a walk of the history.
    assert "sqlite_autoindex_runs_1 (id>? AND id<?)" in " ".join(
        _plan(store.conn, retention.QUERIES["runs_by_id"])
    )


# ---------------------------------------------------------------- the executor


def _snapshot(store: SqliteStore, ids: list[str]) -> dict[str, Any]:
    """Everything stored about these runs."""
    marks = json.dumps(ids)
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
            tuple(r)
            for r in store.conn.execute(
                f"SELECT * FROM {table} WHERE {key} IN (SELECT value FROM json_each(?))",
                (marks,),
            )
        )
    return out


def test_prune_works_in_small_batches_and_leaves_active_runs_alone(
    store: SqliteStore, tmp_path: Path
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
    before = _snapshot(store, kept)
    assert before["checkpoints"] and before["attempts"] and before["events"]
    assert before["agent_steps"]

    remaining: list[int] = []

    def pace(batch_s: float) -> bool:
        assert batch_s < 5
        remaining.append(count(store, "SELECT COUNT(*) FROM runs"))
        return True

    conn = retention.connect(store.path)
    report = retention.prune(
        conn, tmp_path, retention.cutoffs(history(keep_runs=DAY), at(10)), pace=pace, batch_runs=3
    )
    conn.close()
    total = len(old) + len(kept)
    steps = [a - b for a, b in zip([total, *remaining], remaining, strict=False)]
    assert max(steps) <= 3 and len(remaining) >= 5, remaining  # 14 runs, three at a time
    assert run_ids(store) == set(kept)
    assert report.counts["runs"] == 14 and report.counts["checkpoints"] == 10
    assert report.counts["agent_steps"] == 3
    # enqueue, claim and success for each, and the ten checkpoints' events
    assert report.counts["attempts"] == 14 and report.counts["events"] == 14 * 3 + 10
    assert _snapshot(store, kept) == before
    assert store.conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert (
        count(
            store,
            "SELECT COUNT(*) FROM events WHERE run_id IS NOT NULL AND run_id NOT IN"
            " (SELECT id FROM runs)",
        )
        == 0
    )


def test_prune_stops_when_pace_says_so(store: SqliteStore, tmp_path: Path) -> None:
    for i in range(10):
        finished(store, "a", at(i / 10), at(i / 10 + 0.01))
    read_all(store)
    conn = retention.connect(store.path)
    report = retention.prune(
        conn, tmp_path, retention.cutoffs(history(keep_runs=DAY), at(10)),
        pace=lambda _s: False, batch_runs=4,
    )  # fmt: skip
    conn.close()
    assert report.stopped and report.counts["runs"] == 4 and len(run_ids(store)) == 6


def test_workspaces_go_with_their_runs(store: SqliteStore, tmp_path: Path) -> None:
    gone = finished(store, "a", at(0), at(0.1))
    nothing_written = finished(store, "a", at(0.5), at(0.6))
    kept = finished(store, "b", at(0), at(0.1), RunStatus.QUARANTINED)
    young = finished(store, "a", at(9), at(9.1))
    read_all(store)
    dirs = {}
    for task, run_id in (("a", gone), ("b", kept), ("a", young)):
        path = workspace_path(tmp_path, task, run_id)
        (path / "sub").mkdir(parents=True)
        (path / "stdout.log").write_bytes(b"x" * 1000)
        (path / "sub" / "out.bin").write_bytes(b"y" * 500)
        dirs[run_id] = path
    cut = retention.cutoffs(history(keep_runs=DAY), at(5))
    ro = retention.connect(store.path, read_only=True)
    dry = retention.prune(ro, tmp_path, cut, dry_run=True)
    ro.close()
    assert dry.counts["workspaces"] == 1 and dry.workspace_bytes == 1500
    assert dirs[gone].exists()
    conn = retention.connect(store.path)
    report = retention.prune(conn, tmp_path, cut)
    conn.close()
    assert report.counts["runs"] == 2 and report.counts["workspaces"] == 1
    assert not dirs[gone].exists() and dirs[kept].exists() and dirs[young].exists()
    assert nothing_written not in run_ids(store)


def test_a_dry_run_counts_what_prune_then_deletes(store: SqliteStore, tmp_path: Path) -> None:
    for i in range(7):
        finished(store, "a", at(i), at(i + 0.1), checkpoint=i % 2 == 0)
        finished(store, "b", at(i), at(i + 0.2), RunStatus.SKIPPED)
    _spend(store, "a", finished(store, "b", at(1.5), at(1.6)), at(1.5))
    finished(store, "a", at(2.5), at(2.6), RunStatus.QUARANTINED)
    store.pause("a", "x", at(3))
    store.resume("a", at(3.5))
    read_all(store)
    settings = history(
        keep_runs=4 * DAY, max_runs_per_task=2, keep_events=3 * DAY, keep_ledger=32 * DAY,
        keep_quarantine=3 * DAY,
    )  # fmt: skip
    cut = retention.cutoffs(settings, at(40))
    ro = retention.connect(store.path, read_only=True)
    dry = retention.prune(ro, tmp_path, cut, dry_run=True)
    ro.close()
    conn = retention.connect(store.path)
    real = retention.prune(conn, tmp_path, cut, batch_runs=2, batch_rows=2)
    conn.close()
    assert dry.counts["runs"] > 0 and dry.counts["ledger"] == 1
    # Including the drop event the expired quarantine entry gets, gone with its run.
    assert dry.counts == real.counts, (dry.counts, real.counts)
    assert dry.oldest == real.oldest and dry.newest == real.newest


def test_the_pruner_thread_prunes_counts_and_stops_promptly(
    store: SqliteStore, tmp_path: Path
) -> None:
    for i in range(300):
        finished(store, "a", at(i / 1000), at(i / 1000 + 0.0001))
    read_all(store)
    metrics = Metrics("test")
    settings = {"now": history(keep_runs=DAY)}  # prune_every: the default 10 minutes
    clock = ManualClock(at(10))
    pruner = retention.Pruner(
        store.path,
        tmp_path,
        lambda: settings["now"],
        clock,
        metrics.pruned_history,
        first_pass_s=0.0,
        settings_poll_s=0.05,
        batch_runs=100,
    )
    pruner.start()
    wait_for(lambda: pruner.passes >= 1, what="a first pass")
    assert run_ids(store) == set()

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
    # The settings are read anew: a shorter prune_every applies without a new pruner,
    # and without waiting out the ten minutes.
    for i in range(200):
        finished(store, "b", at(20 + i / 1000), at(20 + i / 1000 + 0.0001))
    read_all(store)
    assert pruner.passes == 1
    settings["now"] = history(keep_runs=DAY / 2, prune_every=1)
    clock.advance(20 * DAY)
    wait_for(lambda: pruner.passes >= 2 and not run_ids(store), what="a pass on the new settings")
    assert pruned()["runs"] == 500
    t0 = time.monotonic()
    assert pruner.stop()
    assert time.monotonic() - t0 < 2.0
    assert not [t for t in threading.enumerate() if t.name == "agentd-retention"]


def test_a_stop_ends_a_long_pass_between_batches(store: SqliteStore, tmp_path: Path) -> None:
    for i in range(400):
        finished(store, "a", at(i / 1000), at(i / 1000 + 0.0001))
    read_all(store)
    pruner = retention.Pruner(
        store.path, tmp_path, lambda: history(keep_runs=DAY), ManualClock(at(10)),
        first_pass_s=0.0, batch_runs=1,
    )  # fmt: skip
    pruner.start()
    wait_for(lambda: len(run_ids(store)) < 400, what="the first batches")
    t0 = time.monotonic()
    assert pruner.stop()
    assert time.monotonic() - t0 < 2.0
    left = len(run_ids(store))
    assert 0 < left < 400  # 400 batches of one, 20 ms apart at least: far from done
    assert not [t for t in threading.enumerate() if t.name == "agentd-retention"]


# ---------------------------------------------------------------- agentd prune


def _config_for(tmp_path: Path, state_dir: Path, history_yaml: str) -> Path:
    config = tmp_path / "agentd.yaml"
    config.write_text(
        f"daemon: {{state_dir: {state_dir}, http: {{port: 9}}}}\n"
        f"history: {history_yaml}\n"
        "tasks:\n"
        "  a: {schedule: {manual: true}, command: {argv: ['true']}}\n"
        "  b: {schedule: {manual: true}, command: {argv: ['true']}}\n"
    )
    return config


def test_cli_prune_dry_run_writes_nothing_and_prune_prunes(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    now = datetime.now(UTC)
    store = SqliteStore(state_dir / "state.sqlite")
    store.sync_tasks(TASKS, now - timedelta(days=30))
    old = []
    for i in range(6):
        created = now - timedelta(days=20 - i)
        old.append(finished(store, "a", created, created + timedelta(minutes=1)))
    keep = [finished(store, "b", now - timedelta(hours=1), now - timedelta(minutes=59))]
    keep.append(queued(store, "b", now - timedelta(days=25)))
    read_all(store)
    workspace = workspace_path(state_dir, "a", old[0])
    workspace.mkdir(parents=True)
    (workspace / "stdout.log").write_bytes(b"z" * 2048)
    store.close()
    config = _config_for(tmp_path, state_dir, "{keep_runs: 10d, keep_events: forever}")
    db = state_dir / "state.sqlite"
    watcher = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    version = watcher.execute("PRAGMA data_version").fetchone()[0]
    stat = db.stat()

    dry = agentd_cli("prune", "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"^would prune \(history: keep_runs: 10d", dry.stdout, re.M), dry.stdout
    assert re.search(r"^  before: runs \S+Z, events never,", dry.stdout, re.M), dry.stdout
    assert re.search(r"^\s+runs\s+6\s+oldest \S+\s+newest \S+$", dry.stdout, re.M), dry.stdout
    assert re.search(r"^\s+workspaces\s+1\s+2\.0 KiB", dry.stdout, re.M), dry.stdout
    assert watcher.execute("PRAGMA data_version").fetchone()[0] == version
    assert (db.stat().st_mtime_ns, db.stat().st_size) == (stat.st_mtime_ns, stat.st_size)
    assert watcher.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 8
    as_json = json.loads(agentd_cli("prune", "--dry-run", "--json", config=config).stdout)
    assert as_json["dry_run"] and as_json["counts"]["runs"] == 6
    assert as_json["counts"]["events"] == 6 * 3 and as_json["workspace_bytes"] == 2048
    assert watcher.execute("PRAGMA data_version").fetchone()[0] == version

    real = agentd_cli("prune", "--json", config=config)
    assert real.returncode == 0, real.stderr
    out = json.loads(real.stdout)
    assert not out["dry_run"] and out["counts"]["runs"] == 6 and out["counts"]["workspaces"] == 1
    assert watcher.execute("PRAGMA data_version").fetchone()[0] != version
    assert {r[0] for r in watcher.execute("SELECT id FROM runs")} == set(keep)
    assert not workspace.exists()
    again = agentd_cli("prune", config=config)
    assert again.returncode == 0 and re.search(r"^\s+runs\s+0$", again.stdout, re.M), again.stdout
    watcher.close()


def test_cli_prune_without_a_state_db_says_so(tmp_path: Path) -> None:
    config = _config_for(tmp_path, tmp_path / "nowhere", "{}")
    proc = agentd_cli("prune", "--dry-run", config=config)
    assert proc.returncode == 1 and "no state DB" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()
    bad = _config_for(tmp_path, tmp_path / "nowhere", "{keep_ledger: 1d}")
    proc = agentd_cli("prune", config=bad)
    assert proc.returncode == 78 and "history.keep_ledger" in proc.stderr


def test_cli_prune_refuses_a_db_of_another_schema(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    SqliteStore(state_dir / "state.sqlite").close()
    conn = sqlite3.connect(state_dir / "state.sqlite")
    conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    proc = agentd_cli("prune", config=_config_for(tmp_path, state_dir, "{}"))
    assert proc.returncode == 1 and "schema version is 999" in proc.stderr, proc.stderr
    assert os.path.exists(state_dir / "state.sqlite")


def test_ctrl_c_ends_cli_prune_between_batches_and_reports_what_went(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    now = datetime.now(UTC)
    store = SqliteStore(state_dir / "state.sqlite")
    store.sync_tasks(TASKS, now - timedelta(days=30))
    created = now - timedelta(days=20)
    fires = [Fire("a", created + timedelta(seconds=i), overlap="allow") for i in range(2000)]
    store.fire_many(fires, created)
    claimed = store.claim(created, "test-worker", 3600, 2000, set(), {"a"})
    store.finish_many(
        [
            Finish(r["id"], "a", r["attempt"], 0, Outcome.SUCCESS, RunStatus.SUCCEEDED, created)
            for r in claimed
        ]
    )
    assert len(claimed) == 2000
    read_all(store)
    store.close()
    config = _config_for(tmp_path, state_dir, "{keep_runs: 10d}")
    watcher = sqlite3.connect(f"file:{state_dir / 'state.sqlite'}?mode=ro", uri=True)

    def left() -> int:
        return int(watcher.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    cmd = [sys.executable, "-m", "agentd.cli", "prune", "--json", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: left() < 2000, what="the first batches")  # 40 batches, >= 20 ms apart
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["stopped"] and 0 < report["counts"]["runs"] < 2000
    assert report["counts"]["runs"] == 2000 - left()
    assert report["before"]["runs"] is not None and report["before"]["ledger"] is not None
    assert watcher.execute("PRAGMA foreign_key_check").fetchall() == []
    watcher.close()
