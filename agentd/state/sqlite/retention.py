"""History bounded by configuration on the SQLite engine: what the state DB forgets, and
the thread that forgets it in small batches.

What goes and what never goes is the same on every engine (``agentd.state.retention``,
whose policy this module uses: ``cutoffs``, the judgements of a run, the batch walk,
the report and the thread's timing; its names ``cutoffs``, ``Cutoffs``, ``Selection``,
``Report`` and ``run_id_bound`` are reachable from here too). This module is SQLite's
SQL for it.

One selector per kind, which reads the next batch of what goes after a
cursor. Every selector's query is served by an index (``QUERIES`` lists them; a test
checks their plans): runs are cut by their id, which begins with the creation second
(``YYYYMMDDTHHMMSS``, see ``store.new_run_id``), on the primary key; the other tables
are walked in id order, in which their timestamps grow, up to the first row too young.

The executor (``prune``) deletes one batch per ``BEGIN IMMEDIATE`` transaction, a few
milliseconds each, with a pause between batches (the daemon's writes wait for the lock
while a batch holds it); a batch is selected again under the lock, so what it deletes
is what is true at its commit. A selection that finds nothing takes no write lock at
all. Workspaces are removed once their runs' deletion is durable: a crash in between
leaves a directory without a run, never a run without its directory.

``Pruner`` runs passes on its own thread and connection, a while after start and then
every ``prune_every``, reading the settings anew each pass (a reload applies without a
restart); ``stop()`` returns within one batch. ``prune_command`` is ``agentd prune``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd import exitcodes
from agentd.clock import Clock, SystemClock, to_iso
from agentd.config import Config, HistoryConfig
from agentd.models import ALERTS_CURSOR, EventKind
from agentd.state import retention as neutral
from agentd.state.retention import (
    ALERT_KINDS,
    BATCH_ROWS,
    BATCH_RUNS,
    FIRST_PASS_S,
    SETTINGS_POLL_S,
    Cutoffs,
    Report,
    Row,
    Selection,
    cutoffs,
    existing_workspaces,
    print_report,
    remove_trees,
    run_finished_before,
    run_id_bound,
    run_may_go,
    run_selection,
    tree_bytes,
    walk,
    workspace_dir,
)
from agentd.state.sqlite import statedir
from agentd.state.sqlite.migrations import SCHEMA_VERSION

log = logging.getLogger("agentd.retention")

FOLD_EVERY = 16
"""Batches between checkpoints of the pruner's own (``connect``), and one after a pass."""
_ALERT_KINDS = json.dumps(list(ALERT_KINDS))
"""The events the alert outbox reads, as ``json_each`` takes them."""


# ---------------------------------------------------------------- policy


QUERIES: dict[str, str] = {
    "runs_by_id": (
        "SELECT id, task_id, status, finished_at, created_at FROM runs"
        " WHERE id > ? AND id < ? ORDER BY id LIMIT ?"
    ),
    "held": (
        "SELECT run_id, quarantined_at FROM quarantine"
        " WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "unread": (
        "SELECT DISTINCT run_id FROM events WHERE run_id IN (SELECT value FROM json_each(?))"
        " AND id > ? AND kind IN (SELECT value FROM json_each(?))"
    ),
    "next_task": "SELECT id FROM tasks WHERE id > ? ORDER BY id LIMIT 1",
    "task_boundary": (
        "SELECT created_at FROM runs WHERE task_id=? ORDER BY created_at DESC LIMIT 1 OFFSET ?"
    ),
    "runs_of_task": (
        "SELECT rowid, id, task_id, status, finished_at, created_at FROM runs"
        " WHERE task_id=? AND created_at < ? AND (created_at, rowid) > (?, ?)"
        " ORDER BY created_at, rowid LIMIT ?"
    ),
    "quarantine": (
        "SELECT run_id, task_id, quarantined_at FROM quarantine WHERE run_id > ? AND run_id < ?"
        " ORDER BY run_id LIMIT ?"
    ),
    "events": ("SELECT id, ts FROM events WHERE run_id IS NULL AND id > ? ORDER BY id LIMIT ?"),
    "ledger": "SELECT id, ts, run_id, state FROM ledger WHERE id > ? ORDER BY id LIMIT ?",
    "live_runs": (
        "SELECT id FROM runs WHERE id IN (SELECT value FROM json_each(?))"
        " AND status IN ('queued','running')"
        " UNION SELECT run_id FROM quarantine WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "budget_alarms": ("SELECT rowid, ts FROM budget_alarms WHERE rowid > ? ORDER BY rowid LIMIT ?"),
    "alerts": "SELECT id, ts FROM alerts WHERE id > ? ORDER BY id LIMIT ?",
    "pending_alerts": "SELECT DISTINCT alert_id FROM outbox WHERE status='pending'",
    "outbox": "SELECT id, created_at, status FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
    "cursor": f"SELECT value FROM meta WHERE key='{ALERTS_CURSOR}'",
    # Deletes and dry-run counts: by primary key, or by an index on run_id.
    "delete_run_events": "DELETE FROM events WHERE run_id IN (SELECT value FROM json_each(?))",
    "count_run_events": (
        "SELECT COUNT(*) FROM events WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "delete_attempts": "DELETE FROM attempts WHERE run_id IN (SELECT value FROM json_each(?))",
    "count_attempts": (
        "SELECT COUNT(*) FROM attempts WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "delete_checkpoints": (
        "DELETE FROM checkpoints WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "count_checkpoints": (
        "SELECT COUNT(*) FROM checkpoints WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "delete_agent_steps": (
        "DELETE FROM agent_steps WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "count_agent_steps": (
        "SELECT COUNT(*) FROM agent_steps WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "delete_runs": "DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))",
    "count_quarantine": (
        "SELECT COUNT(*) FROM quarantine WHERE run_id IN (SELECT value FROM json_each(?))"
    ),
    "delete_quarantine": "DELETE FROM quarantine WHERE run_id IN (SELECT value FROM json_each(?))",
    "mark_dropped": (
        "UPDATE runs SET status='dropped' WHERE status='quarantined'"
        " AND id IN (SELECT value FROM json_each(?))"
    ),
    "delete_events": "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?))",
    "delete_ledger": "DELETE FROM ledger WHERE id IN (SELECT value FROM json_each(?))",
    "delete_budget_alarms": (
        "DELETE FROM budget_alarms WHERE rowid IN (SELECT value FROM json_each(?))"
    ),
    "delete_alerts": "DELETE FROM alerts WHERE id IN (SELECT value FROM json_each(?))",
    "delete_outbox": "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))",
}
"""Every statement retention runs; each one's plan searches an index (see the tests)."""


Selector = Callable[[sqlite3.Connection, Cutoffs, Any, int], Selection]


def _ids(values: Sequence[Any]) -> str:
    return json.dumps(list(values))


def _outbox_cursor(conn: sqlite3.Connection) -> int | None:
    """The last event the alert outbox has read (None before its first pass, when it
    will treat everything before as old news)."""
    row = conn.execute(QUERIES["cursor"]).fetchone()
    return None if row is None else int(row[0])


def _guards(conn: sqlite3.Connection, rows: list[Row], cut: Cutoffs) -> tuple[set[str], set[str]]:
    """Of ``rows`` (runs), those held in quarantine (an entry ``keep_quarantine`` has
    not expired) and those with an event the outbox has yet to read (one of the kinds
    it reads: it may raise an alert, send a ping or clear a condition)."""
    ids = _ids([r["id"] for r in rows])
    edge = to_iso(cut.quarantine) if cut.quarantine is not None else ""
    held = {r[0] for r in conn.execute(QUERIES["held"], (ids,)) if str(r[1]) >= edge}
    ceiling = _outbox_cursor(conn)
    unread: set[str] = set()
    if ceiling is not None:
        unread = {r[0] for r in conn.execute(QUERIES["unread"], (ids, ceiling, _ALERT_KINDS))}
    return held, unread


def select_old_runs(conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Finished runs that ended before ``cut.runs``, in id (creation) order from
    ``cursor`` (a run id, "" to begin)."""
    if cut.runs is None:
        return Selection([], cursor, False)
    rows = [
        dict(zip(("id", "task_id", "status", "finished_at", "created_at"), r, strict=True))
        for r in conn.execute(
            QUERIES["runs_by_id"], (cursor or "", run_id_bound(cut.runs), limit)
        ).fetchall()
    ]
    if not rows:
        return Selection([], cursor, False)
    held, unread = _guards(conn, rows, cut)
    going = [r for r in rows if run_may_go(r, held, unread) and run_finished_before(r, cut.runs)]
    return run_selection(going, rows[-1]["id"], len(rows) == limit)


def select_capped_runs(
    conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int
) -> Selection:
    """Finished runs older than a task's newest ``max_runs_per_task`` runs (of any
    status), one task at a time in id order; those ``select_old_runs`` takes anyway are
    left to it, so that no run is counted twice. ``cursor`` is None to begin, then
    (task, its newest-N boundary, created_at, rowid) of the last row read."""
    cap = cut.max_runs_per_task
    if cap is None:
        return Selection([], cursor, False)
    if cursor is None or cursor[1] is None:
        after = "" if cursor is None else cursor[0]
        task = conn.execute(QUERIES["next_task"], (after,)).fetchone()
        if task is None:
            return Selection([], cursor, False)
        found = conn.execute(QUERIES["task_boundary"], (task[0], cap - 1)).fetchone()
        if found is None:
            return Selection([], (task[0], None, "", 0), True)  # under the cap
        cursor = (task[0], str(found[0]), "", 0)
    task_id, boundary, after_created, after_rowid = cursor
    fetched = conn.execute(
        QUERIES["runs_of_task"], (task_id, boundary, after_created, after_rowid, limit)
    ).fetchall()
    rows = [
        dict(zip(("rowid", "id", "task_id", "status", "finished_at", "created_at"), r, strict=True))
        for r in fetched
    ]
    if len(rows) < limit:
        next_cursor: Any = (task_id, None, "", 0)  # this task is done: the next one
    else:
        next_cursor = (task_id, boundary, rows[-1]["created_at"], rows[-1]["rowid"])
    if not rows:
        return Selection([], next_cursor, True)
    held, unread = _guards(conn, rows, cut)
    going = [
        r for r in rows if run_may_go(r, held, unread) and not run_finished_before(r, cut.runs)
    ]
    return run_selection(going, next_cursor, True)


def select_quarantine(conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Quarantine entries older than ``cut.quarantine`` (their runs were created
    before it too, so the walk stops at that id)."""
    if cut.quarantine is None:
        return Selection([], cursor, False)
    rows = conn.execute(
        QUERIES["quarantine"], (cursor or "", run_id_bound(cut.quarantine), limit)
    ).fetchall()
    if not rows:
        return Selection([], cursor, False)
    edge = to_iso(cut.quarantine)
    going = [r for r in rows if str(r[2]) < edge]
    return Selection(
        keys=[r[0] for r in going],
        cursor=rows[-1][0],
        more=len(rows) == limit,
        times=[str(r[2]) for r in going],
        runs=[(str(r[1]), str(r[0])) for r in going],
    )


def select_events(conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Events tied to no run, older than ``cut.events``, that the outbox has read."""
    if cut.events is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["events"], (cursor or 0, limit)).fetchall()
    return walk(rows, to_iso(cut.events), cursor, limit, ceiling=_outbox_cursor(conn))


def select_ledger(conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Spend older than ``cut.ledger``, but not a reservation in flight nor the spend
    of a run that may still call a model (its run budget counts every attempt)."""
    if cut.ledger is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["ledger"], (cursor or 0, limit)).fetchall()
    runs = _ids(sorted({r[2] for r in rows if r[2]}))
    live = {r[0] for r in conn.execute(QUERIES["live_runs"], (runs, runs))}
    return walk(
        rows, to_iso(cut.ledger), cursor, limit, keep=lambda r: r[3] == "reserved" or r[2] in live
    )


def select_budget_alarms(
    conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int
) -> Selection:
    """Budget alarms older than the ledger's cut, so their windows are over. Rows are
    inserted in time order and never updated, and a new rowid is above every rowid
    left: rowid order is time order."""
    if cut.ledger is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["budget_alarms"], (cursor or 0, limit)).fetchall()
    return walk(rows, to_iso(cut.ledger), cursor, limit)


def select_alerts(conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Alerts older than ``cut.alerts`` with no delivery pending."""
    if cut.alerts is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["alerts"], (cursor or 0, limit)).fetchall()
    pending = {r[0] for r in conn.execute(QUERIES["pending_alerts"])}
    return walk(rows, to_iso(cut.alerts), cursor, limit, keep=lambda r: r[0] in pending)


def select_outbox(conn: sqlite3.Connection, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Deliveries older than ``cut.alerts`` that ended (delivered or failed); a pending
    one stays, however old."""
    if cut.alerts is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["outbox"], (cursor or 0, limit)).fetchall()
    return walk(rows, to_iso(cut.alerts), cursor, limit, keep=lambda r: r[2] == "pending")


# ---------------------------------------------------------------- deleting (or counting)


Deleter = Callable[[sqlite3.Connection, Selection, Cutoffs, bool], dict[str, int]]


def _delete_runs(
    conn: sqlite3.Connection, sel: Selection, cut: Cutoffs, dry_run: bool
) -> dict[str, int]:
    """A batch of runs with their events, attempts, checkpoints and agent steps (children
    first: foreign keys are on), and an expired quarantine entry if one is left. Dry: the
    same counts, read."""
    ids = _ids(sel.keys)
    counts = {"runs": len(sel.keys)}
    for kind, what in (("events", "run_events"), ("attempts", "attempts")):
        counts[kind] = _delete_or_count(conn, what, ids, dry_run)
    counts["checkpoints"] = _delete_or_count(conn, "checkpoints", ids, dry_run)
    counts["agent_steps"] = _delete_or_count(conn, "agent_steps", ids, dry_run)
    if dry_run:
        # An expired quarantine entry would have been dropped first, with an event.
        counts["events"] += int(conn.execute(QUERIES["count_quarantine"], (ids,)).fetchone()[0])
    else:
        conn.execute(QUERIES["delete_quarantine"], (ids,))
        counts["runs"] = conn.execute(QUERIES["delete_runs"], (ids,)).rowcount
    return counts


def _delete_or_count(conn: sqlite3.Connection, what: str, ids: str, dry_run: bool) -> int:
    if dry_run:
        return int(conn.execute(QUERIES[f"count_{what}"], (ids,)).fetchone()[0])
    return int(conn.execute(QUERIES[f"delete_{what}"], (ids,)).rowcount)


def _drop_quarantine(
    conn: sqlite3.Connection, sel: Selection, cut: Cutoffs, dry_run: bool
) -> dict[str, int]:
    """Entries past ``keep_quarantine`` leave quarantine as ``quarantine drop`` makes
    them, with a ``drop`` event each and their runs' status ``dropped``; the runs then
    age like any finished run."""
    if dry_run:
        return {"quarantine": len(sel.keys)}
    dropped = conn.execute(QUERIES["delete_quarantine"], (_ids(sel.keys),)).rowcount
    conn.execute(QUERIES["mark_dropped"], (_ids(sel.keys),))
    ts = to_iso(cut.now)
    data = json.dumps({"by": "retention", "reason": "keep_quarantine"}, sort_keys=True)
    conn.executemany(
        "INSERT INTO events(ts, kind, task_id, run_id, data) VALUES (?, ?, ?, ?, ?)",
        [(ts, EventKind.DROP, task_id, run_id, data) for task_id, run_id in sel.runs],
    )
    for task_id, run_id in sel.runs:
        log.info("retention: quarantine entry expired, dropped run=%s task=%s", run_id, task_id)
    return {"quarantine": dropped}


def _by_key(kind: str) -> Deleter:
    def delete(
        conn: sqlite3.Connection, sel: Selection, cut: Cutoffs, dry_run: bool
    ) -> dict[str, int]:
        if dry_run:
            return {kind: len(sel.keys)}
        return {kind: conn.execute(QUERIES[f"delete_{kind}"], (_ids(sel.keys),)).rowcount}

    return delete


@dataclass(frozen=True)
class Step:
    kind: str
    select: Selector
    delete: Deleter
    per_run: bool = False
    """Batches count runs (each brings several rows), not rows."""


STEPS = (
    # Expired quarantine entries first, so that the runs they held may go in this pass.
    Step("quarantine", select_quarantine, _drop_quarantine),
    Step("runs", select_old_runs, _delete_runs, per_run=True),
    Step("runs", select_capped_runs, _delete_runs, per_run=True),
    Step("events", select_events, _by_key("events")),
    Step("outbox", select_outbox, _by_key("outbox")),
    Step("alerts", select_alerts, _by_key("alerts")),
    Step("ledger", select_ledger, _by_key("ledger")),
    Step("budget_alarms", select_budget_alarms, _by_key("budget_alarms")),
)
"""A pass, in order."""


# ---------------------------------------------------------------- the executor


def fold(conn: sqlite3.Connection) -> None:
    """A PASSIVE checkpoint: copies what it can of the WAL into the DB file without
    taking a lock a writer needs (and does nothing if another checkpoint runs). A
    failure only leaves the WAL longer until the next."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:
        log.warning("retention: WAL checkpoint failed, retried later: %s", exc)


def durable(conn: sqlite3.Connection) -> None:
    """Make every commit so far durable: fsync the WAL file (``connect``). If it is gone,
    the last connection closed and folded it into the DB file, synced."""
    main = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        fd = os.open(main + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_workspaces(
    conn: sqlite3.Connection,
    state_dir: Path,
    runs: Sequence[tuple[str, str]],
    stopped: Callable[[], bool],
) -> int:
    """Remove the workspace directories of runs whose deletion ``conn`` committed, once
    that commit is durable; returns how many there were. A failure is logged and costs
    only that directory (it stays, without its run)."""
    found = existing_workspaces(state_dir, runs)
    if not found:
        return 0  # most runs write nothing
    durable(conn)
    return remove_trees(found, stopped)


def prune(
    conn: sqlite3.Connection,
    state_dir: Path,
    cut: Cutoffs,
    *,
    pace: Callable[[float], bool] = lambda _s: True,
    stopped: Callable[[], bool] = lambda: False,
    dry_run: bool = False,
    batch_runs: int = BATCH_RUNS,
    batch_rows: int = BATCH_ROWS,
) -> Report:
    """One pass over every kind, batch by batch, each batch one transaction. ``pace`` is
    called after each batch with how long it held the write lock and pauses before the
    next; when it returns False the pass ends there (``report.stopped``). ``stopped``
    is asked between workspace removals.

    ``conn`` is in autocommit mode (``connect``). A ``dry_run`` writes nothing: the pass
    reads one snapshot, counts what would go, with the bytes of its workspaces."""
    report = Report()
    started = time.monotonic()
    if dry_run:
        conn.execute("BEGIN")
    try:
        for step in STEPS:
            limit = batch_runs if step.per_run else batch_rows
            if dry_run:
                done = _count_step(conn, state_dir, cut, report, step, limit, stopped)
            else:
                done = _prune_step(conn, state_dir, cut, report, step, limit, pace, stopped)
            if not done:
                report.stopped = True
                break
    finally:
        if dry_run:
            conn.execute("COMMIT")
        report.seconds = time.monotonic() - started
    if not dry_run and report.batches % FOLD_EVERY:
        fold(conn)
    return report


def _prune_step(
    conn: sqlite3.Connection,
    state_dir: Path,
    cut: Cutoffs,
    report: Report,
    step: Step,
    limit: int,
    pace: Callable[[float], bool],
    stopped: Callable[[], bool],
) -> bool:
    """Returns False when ``pace`` said stop."""
    cursor: Any = None
    while True:
        sel = step.select(conn, cut, cursor, limit)  # no transaction: no lock taken
        if not sel.keys:
            if not sel.more:
                return True
            if stopped():
                return False
            cursor = sel.cursor
            continue
        conn.execute("BEGIN IMMEDIATE")  # may wait for the daemon's commit: not counted
        t0 = time.monotonic()
        try:
            sel = step.select(conn, cut, cursor, limit)  # again, under the lock: what is true now
            counts = step.delete(conn, sel, cut, False) if sel.keys else {}
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        held = time.monotonic() - t0
        report.add(counts, step.kind, sel.times)
        report.batches += 1
        if report.batches % FOLD_EVERY == 0:
            fold(conn)
        if step.per_run and sel.runs:
            report.counts["workspaces"] += remove_workspaces(conn, state_dir, sel.runs, stopped)
        cursor = sel.cursor
        if not pace(held):
            return False
        if not sel.more:
            return True


def _count_step(
    conn: sqlite3.Connection,
    state_dir: Path,
    cut: Cutoffs,
    report: Report,
    step: Step,
    limit: int,
    stopped: Callable[[], bool],
) -> bool:
    """A dry run of ``_prune_step``; returns False when ``stopped`` said stop."""
    cursor: Any = None
    while True:
        sel = step.select(conn, cut, cursor, limit)
        if sel.keys:
            report.add(step.delete(conn, sel, cut, True), step.kind, sel.times)
            report.batches += 1
        for task_id, run_id in sel.runs if step.per_run else ():
            path = workspace_dir(state_dir, task_id, run_id)
            if path is not None and path.is_dir():
                report.counts["workspaces"] += 1
                report.workspace_bytes += tree_bytes(path)
        if not sel.more:
            return True
        if stopped():
            return False
        cursor = sel.cursor


def connect(db_path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection of retention's own, in autocommit mode (its transactions are
    explicit) with foreign keys on, or read-only (``mode=ro``: it cannot write the DB
    whatever it runs).

    Its commits are quick, so that the daemon's writes, waiting for the lock, wait
    little. ``synchronous=NORMAL``: a commit does not fsync the WAL while it holds the
    lock. A prune that a crash undoes is only done again; what must not be undone is
    one whose workspaces are gone, so ``durable`` syncs the WAL, outside the lock,
    before any is removed: the guarantee FULL gives at commit (in WAL mode FULL is
    NORMAL plus an fsync of the WAL after each commit), a moment later. And no
    automatic checkpoint: a commit that crosses 1,000 WAL pages would fold the WAL into
    the DB file inside the COMMIT call; ``fold`` does it between
    batches instead, as the daemon's checkpoint thread does for its own commits."""
    if read_only:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(db_path), isolation_level=None)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """Why this agentd cannot prune this DB, or None."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.Error as exc:
        return f"not an agentd state DB ({exc})"
    version = int(row[0]) if row else 0
    if version != SCHEMA_VERSION:
        return (
            f"its schema version is {version} and this agentd's is {SCHEMA_VERSION};"
            " use the agentd that wrote it (a daemon start migrates an older one)"
        )
    return None


# ---------------------------------------------------------------- the thread


class Pruner(neutral.Pruner):
    """Prune passes on a thread of its own with a connection of its own (``connect``),
    timed as ``agentd.state.retention.Pruner`` says: the first ``first_pass_s`` (or
    ``prune_every``, if shorter) after ``start``, then ``prune_every`` after each pass
    ends. ``settings`` is read at each pass, so a reloaded config applies from the next
    one. ``on_pruned`` gets each pass's counts (metrics) when it pruned anything."""

    expected_errors = (sqlite3.Error,)

    def __init__(
        self,
        db_path: Path,
        state_dir: Path,
        settings: Callable[[], HistoryConfig],
        clock: Clock | None = None,
        on_pruned: Callable[[Mapping[str, int]], None] | None = None,
        *,
        first_pass_s: float = FIRST_PASS_S,
        settings_poll_s: float = SETTINGS_POLL_S,
        batch_runs: int = BATCH_RUNS,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        super().__init__(
            settings,
            clock,
            on_pruned,
            first_pass_s=first_pass_s,
            settings_poll_s=settings_poll_s,
            batch_runs=batch_runs,
            batch_rows=batch_rows,
        )
        self.db_path = db_path
        self.state_dir = state_dir
        self._conn: sqlite3.Connection | None = None

    def run_pass(self, conn: sqlite3.Connection) -> Report:
        """One pass now on ``conn``; logs one line and counts it when it pruned anything."""
        report = prune(
            conn,
            self.state_dir,
            cutoffs(self.settings(), self.clock.now()),
            pace=self._pace,
            stopped=self._stop.is_set,
            batch_runs=self.batch_runs,
            batch_rows=self.batch_rows,
        )
        self._counted(report)
        return report

    def _one_pass(self) -> None:
        if self._conn is None:
            self._conn = connect(self.db_path)
        self.run_pass(self._conn)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------- agentd prune


def prune_command(config: Config, args: argparse.Namespace) -> int:
    """``agentd prune [--dry-run]``, directly on the state DB in the daemon's batches:
    SQLite serialises it with a running daemon's writes, and it pauses between batches
    as the daemon's pruner does. ``--dry-run`` opens the DB read-only."""
    root, db_path, _ = statedir.state_paths(config)
    if not db_path.exists():
        print(f"agentd: no state DB at {db_path}: nothing to prune", file=sys.stderr)
        return 1
    try:
        conn = connect(db_path, read_only=args.dry_run)
    except sqlite3.Error as exc:
        print(f"agentd: cannot open {db_path}: {exc}", file=sys.stderr)
        return 1
    try:
        problem = schema_problem(conn)
        if problem:
            print(f"agentd: cannot prune {db_path}: {problem}", file=sys.stderr)
            return 1
        cut = cutoffs(config.history, SystemClock().now())
        # Ctrl-C ends the prune between batches, and what went is still reported.
        with neutral.ctrl_c_stops() as interrupted:

            def pace(batch_s: float) -> bool:
                return not interrupted.wait(neutral.gap(batch_s))

            report = prune(
                conn, root, cut, pace=pace, stopped=interrupted.is_set, dry_run=args.dry_run
            )
    finally:
        conn.close()
    print_report(args, config.history, cut, report)
    return exitcodes.FORCED if report.stopped else exitcodes.OK
