"""History bounded by configuration on the PostgreSQL engine: the same rules as on SQLite
(``agentd.state.retention``: what goes, what never goes, the cutoffs, the judgements of
a run, the batch walk), with PostgreSQL's SQL, its locks, its bloat, and workspaces that
live on several machines.

**Batches.** ``prune`` deletes one batch per transaction, each taking the engine's
write lock first, as every write of the engine does (``BEGIN; SELECT
pg_advisory_xact_lock(WRITE_LOCK)``, see ``agentd.state.postgres.engine``): a batch is
one writer among the daemons' writes, never beside one, and the events it appends (a
quarantine entry's ``drop``) get their ids in commit order. Every daemon write on every
node waits while a batch holds the lock, so batches are small (``BATCH_RUNS`` runs,
``BATCH_ROWS`` rows: a few milliseconds) with a pause of ``GAP_FACTOR`` times as long
after each. A batch is selected first without a transaction (no lock), then again under
the lock (READ COMMITTED: each statement after the lock reads what was committed before
it), so what it deletes is what is true at its commit; a selection that finds nothing
takes no lock. Its commit bumps the version counter, as the engine's commits do, so
that every node's ``version()`` sees the change.

**One pruner in the cluster.** A pass (``prune_pass``) first takes a session-level
advisory lock, ``PRUNE_LOCK``, with ``pg_try_advisory_lock`` on the pruner's own
connection, and holds it through its batches and its VACUUM. A node that finds it held
(another node's pass runs) skips the database part of that pass (a debug line) and
only sweeps its own workspaces. The lock is the session's: a node that dies or loses
its connection mid-pass frees it, and the next node's pass takes over where the
cursors start again (nothing of a pass is half done: each batch is its commit).

**Indexes.** Every statement retention runs is in ``QUERIES``, and each one's plan
searches an index (a test checks the plans with EXPLAIN on a large history, and counts
the sequential scans of a whole pass): runs are cut by their id, which begins with the
creation second, on the primary key; a task's runs beyond its cap by
``(task_id, created_at)``; the tables with a surrogate id are walked in id order, in
which their timestamps grow, up to the first row too young; budget alarms (no surrogate
id) in primary-key order. The deletes go by primary key or by an index on ``run_id``,
and so do the foreign-key checks they cause (``attempts``, ``checkpoints`` and
``quarantine`` are indexed by ``run_id``). (A table of a few pages, as the quarantine
usually is, the planner may rightly read whole rather than probe it once per id of a
long list; the index serves it once it is large.)

**Bloat.** A DELETE leaves dead row versions and dead index entries until a VACUUM
makes their space reusable; if autovacuum falls behind a steady fill-and-prune
(river#59) the tables and indexes grow without bound. So after a pass that deleted rows
the pruner VACUUMs (plain VACUUM, never FULL: no exclusive lock) each table it deleted
from, from its autocommit connection, at autovacuum's own pace (``vacuum_cost_delay``,
``SKIP_LOCKED``: a table autovacuum is already vacuuming is left to it), still holding
``PRUNE_LOCK``. The next inserts reuse the freed space, and a fill/prune cycle repeated
keeps the size of ``runs`` and ``events`` near its first high-water mark (a test repeats
it with autovacuum off). ``stop()`` cancels a VACUUM in progress (``cancel_safe``).

**Workspaces.** A run's workspace directory is on the node that ran it, under that
node's own ``state_dir`` (``<state_dir>/runs/<task>/<run>``); each node has a state dir
of its own (its lock refuses a second daemon on it). A node removes workspace
directories only under its own state dir, never anywhere else, so never another node's:

1. the pruning node, after each batch's commit (durable once COMMIT returns), removes
   its own directories of the runs that batch deleted, as SQLite's pruner does;
2. every node, at every pass, whether it pruned or skipped, sweeps its own ``runs/``
   for directories whose run is no longer in the database (one primary-key lookup per
   ``BATCH_SWEEP`` ids) and removes those (``sweep_workspaces``): the other nodes'
   directories of the runs a pass deleted go at those nodes' next pass, and so do the
   pruning node's own if it died between a commit and its removals.

A run's row is committed before its workspace can exist (the runner makes it after the
claim), and a queued or running run is never pruned, so a directory whose run is absent
is one that no view can show: removing it loses nothing of the state. (A directory left
in the state dir by another state, an earlier SQLite file or another database, is
absent from this one and goes too.) A crash between a batch's commit and the removals
leaves a directory without a run, which the next sweep takes; never a run without its
directory. ``agentd_pruned_total{kind="workspaces"}`` counts each node's own removals
(sum it across nodes); the row kinds are counted by the node that pruned them.

**Dry run.** On a read-only connection (``default_transaction_read_only``), one
REPEATABLE READ snapshot: the counts of what a pass would delete, and this node's
workspace directories (of the runs that would go, and of runs already gone) with their
bytes.

``Pruner`` runs the passes on its own thread and connection (``agentd.state.retention``
times them); ``prune_command`` is ``agentd prune`` on PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from agentd import exitcodes
from agentd.clock import Clock, SystemClock, to_iso
from agentd.config import Config, HistoryConfig
from agentd.models import ALERTS_CURSOR, EventKind
from agentd.redact import SecretUnavailable, read_secret
from agentd.state import retention as neutral
from agentd.state.postgres.engine import (
    CONNECT_TIMEOUT_S,
    LOCK_TIMEOUT_MS,
    SCHEMA_VERSION,
    WRITE_LOCK,
)
from agentd.state.retention import (
    ALERT_KINDS,
    BATCH_ROWS,
    BATCH_RUNS,
    FIRST_PASS_S,
    SAFE_NAME,
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
)

log = logging.getLogger("agentd.retention")

Conn = psycopg.Connection[tuple[Any, ...]]

PRUNE_LOCK = 0x61676E74_64520001
"""The session-level advisory lock of a prune pass: one node prunes at a time."""
BATCH_SWEEP = 500
"""Workspace directories whose runs one lookup checks (``sweep_workspaces``)."""
VACUUM_COST_DELAY_MS = 2
"""The pruner's VACUUM sleeps as autovacuum's does (its default delay since
PostgreSQL 12), so that it never takes the server's I/O from the daemons."""
_ALERT_KINDS = list(ALERT_KINDS)
_BUMP = "UPDATE meta SET value = (value::bigint + 1)::text WHERE key='version_counter'"
"""What every write of the engine does before its COMMIT (``version()``)."""
TABLES = {
    "runs": "runs",
    "attempts": "attempts",
    "checkpoints": "checkpoints",
    "agent_steps": "agent_steps",
    "events": "events",
    "quarantine": "quarantine",
    "ledger": "ledger",
    "budget_alarms": "budget_alarms",
    "alerts": "alerts",
    "outbox": "outbox",
}
"""The table of each kind a report counts (workspaces are no table)."""


QUERIES: dict[str, str] = {
    "runs_by_id": (
        "SELECT id, task_id, status, finished_at, created_at FROM runs"
        " WHERE id > %s AND id < %s ORDER BY id LIMIT %s"
    ),
    "held": "SELECT run_id, quarantined_at FROM quarantine WHERE run_id = ANY(%s::text[])",
    "unread": (
        "SELECT DISTINCT run_id FROM events WHERE run_id = ANY(%s::text[])"
        " AND id > %s AND kind = ANY(%s::text[])"
    ),
    "next_task": "SELECT id FROM tasks WHERE id > %s ORDER BY id LIMIT 1",
    "task_boundary": (
        "SELECT created_at FROM runs WHERE task_id=%s ORDER BY created_at DESC LIMIT 1 OFFSET %s"
    ),
    "runs_of_task": (
        "SELECT id, task_id, status, finished_at, created_at FROM runs"
        " WHERE task_id=%s AND created_at < %s AND (created_at, id) > (%s, %s)"
        " ORDER BY created_at, id LIMIT %s"
    ),
    "quarantine": (
        "SELECT run_id, task_id, quarantined_at FROM quarantine"
        " WHERE run_id > %s AND run_id < %s ORDER BY run_id LIMIT %s"
    ),
    "events": "SELECT id, ts FROM events WHERE run_id IS NULL AND id > %s ORDER BY id LIMIT %s",
    "ledger": "SELECT id, ts, run_id, state FROM ledger WHERE id > %s ORDER BY id LIMIT %s",
    "live_runs": (
        "SELECT id FROM runs WHERE id = ANY(%s::text[]) AND status IN ('queued','running')"
        " UNION SELECT run_id FROM quarantine WHERE run_id = ANY(%s::text[])"
    ),
    "budget_alarms": (
        "SELECT scope, window_start, threshold, ts FROM budget_alarms"
        " WHERE (scope, window_start, threshold) > (%s, %s, %s)"
        " ORDER BY scope, window_start, threshold LIMIT %s"
    ),
    "alerts": "SELECT id, ts FROM alerts WHERE id > %s ORDER BY id LIMIT %s",
    "pending_alerts": "SELECT DISTINCT alert_id FROM outbox WHERE status='pending'",
    "outbox": "SELECT id, created_at, status FROM outbox WHERE id > %s ORDER BY id LIMIT %s",
    "cursor": f"SELECT value FROM meta WHERE key='{ALERTS_CURSOR}'",
    "present_runs": "SELECT id FROM runs WHERE id = ANY(%s::text[])",
    # Deletes and dry-run counts: by primary key, or by an index on run_id.
    "delete_run_events": "DELETE FROM events WHERE run_id = ANY(%s::text[])",
    "count_run_events": "SELECT COUNT(*) FROM events WHERE run_id = ANY(%s::text[])",
    "delete_attempts": "DELETE FROM attempts WHERE run_id = ANY(%s::text[])",
    "count_attempts": "SELECT COUNT(*) FROM attempts WHERE run_id = ANY(%s::text[])",
    "delete_checkpoints": "DELETE FROM checkpoints WHERE run_id = ANY(%s::text[])",
    "count_checkpoints": "SELECT COUNT(*) FROM checkpoints WHERE run_id = ANY(%s::text[])",
    "delete_agent_steps": "DELETE FROM agent_steps WHERE run_id = ANY(%s::text[])",
    "count_agent_steps": "SELECT COUNT(*) FROM agent_steps WHERE run_id = ANY(%s::text[])",
    "delete_runs": "DELETE FROM runs WHERE id = ANY(%s::text[])",
    "count_quarantine": "SELECT COUNT(*) FROM quarantine WHERE run_id = ANY(%s::text[])",
    "delete_quarantine": "DELETE FROM quarantine WHERE run_id = ANY(%s::text[])",
    "mark_dropped": (
        "UPDATE runs SET status='dropped' WHERE status='quarantined' AND id = ANY(%s::text[])"
    ),
    "insert_drop": (
        "INSERT INTO events(ts, kind, task_id, run_id, data) VALUES (%s, %s, %s, %s, %s)"
    ),
    "delete_events": "DELETE FROM events WHERE id = ANY(%s::bigint[])",
    "delete_ledger": "DELETE FROM ledger WHERE id = ANY(%s::bigint[])",
    "delete_budget_alarms": (
        "DELETE FROM budget_alarms WHERE (scope, window_start, threshold) IN"
        " (SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[]))"
    ),
    "delete_alerts": "DELETE FROM alerts WHERE id = ANY(%s::bigint[])",
    "delete_outbox": "DELETE FROM outbox WHERE id = ANY(%s::bigint[])",
}
"""Every statement retention runs; each one's plan searches an index (see the tests)."""


# ---------------------------------------------------------------- selectors

Selector = Callable[[Conn, Cutoffs, Any, int], Selection]

_RUN_COLUMNS = ("id", "task_id", "status", "finished_at", "created_at")


def _outbox_cursor(conn: Conn) -> int | None:
    """The last event the alert outbox has read (None before its first pass, when it
    will treat everything before as old news)."""
    row = conn.execute(QUERIES["cursor"]).fetchone()
    return None if row is None else int(row[0])


def _guards(conn: Conn, rows: list[Row], cut: Cutoffs) -> tuple[set[str], set[str]]:
    """Of ``rows`` (runs), those held in quarantine (an entry ``keep_quarantine`` has
    not expired) and those with an event the outbox has yet to read (one of the kinds
    it reads: it may raise an alert, send a ping or clear a condition)."""
    ids = [r["id"] for r in rows]
    edge = to_iso(cut.quarantine) if cut.quarantine is not None else ""
    held = {r[0] for r in conn.execute(QUERIES["held"], (ids,)) if str(r[1]) >= edge}
    ceiling = _outbox_cursor(conn)
    unread: set[str] = set()
    if ceiling is not None:
        unread = {r[0] for r in conn.execute(QUERIES["unread"], (ids, ceiling, _ALERT_KINDS))}
    return held, unread


def select_old_runs(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Finished runs that ended before ``cut.runs``, in id (creation) order from
    ``cursor`` (a run id, "" to begin)."""
    if cut.runs is None:
        return Selection([], cursor, False)
    rows = [
        dict(zip(_RUN_COLUMNS, r, strict=True))
        for r in conn.execute(
            QUERIES["runs_by_id"], (cursor or "", run_id_bound(cut.runs), limit)
        ).fetchall()
    ]
    if not rows:
        return Selection([], cursor, False)
    held, unread = _guards(conn, rows, cut)
    going = [r for r in rows if run_may_go(r, held, unread) and run_finished_before(r, cut.runs)]
    return run_selection(going, rows[-1]["id"], len(rows) == limit)


def select_capped_runs(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Finished runs older than a task's newest ``max_runs_per_task`` runs (of any
    status), one task at a time in id order; those ``select_old_runs`` takes anyway are
    left to it, so that no run is counted twice. ``cursor`` is None to begin, then
    (task, its newest-N boundary, created_at, id) of the last row read."""
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
            return Selection([], (task[0], None, "", ""), True)  # under the cap
        cursor = (task[0], str(found[0]), "", "")
    task_id, boundary, after_created, after_id = cursor
    rows = [
        dict(zip(_RUN_COLUMNS, r, strict=True))
        for r in conn.execute(
            QUERIES["runs_of_task"], (task_id, boundary, after_created, after_id, limit)
        ).fetchall()
    ]
    if len(rows) < limit:
        next_cursor: Any = (task_id, None, "", "")  # this task is done: the next one
    else:
        next_cursor = (task_id, boundary, rows[-1]["created_at"], rows[-1]["id"])
    if not rows:
        return Selection([], next_cursor, True)
    held, unread = _guards(conn, rows, cut)
    going = [
        r for r in rows if run_may_go(r, held, unread) and not run_finished_before(r, cut.runs)
    ]
    return run_selection(going, next_cursor, True)


def select_quarantine(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
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


def select_events(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Events tied to no run, older than ``cut.events``, that the outbox has read."""
    if cut.events is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["events"], (cursor or 0, limit)).fetchall()
    return walk(rows, to_iso(cut.events), cursor, limit, ceiling=_outbox_cursor(conn))


def select_ledger(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Spend older than ``cut.ledger``, but not a reservation in flight nor the spend
    of a run that may still call a model (its run budget counts every attempt)."""
    if cut.ledger is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["ledger"], (cursor or 0, limit)).fetchall()
    runs = sorted({r[2] for r in rows if r[2]})
    live = {r[0] for r in conn.execute(QUERIES["live_runs"], (runs, runs))} if runs else set()
    return walk(
        rows, to_iso(cut.ledger), cursor, limit, keep=lambda r: r[3] == "reserved" or r[2] in live
    )


_FIRST_ALARM = ("", "", float("-inf"))
"""Below every budget alarm's key (scopes and windows are never empty)."""


def select_budget_alarms(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Budget alarms older than the ledger's cut, so their windows are over. The table
    has no surrogate id to walk in time order (its key is scope, window, threshold), so
    the walk goes over all of it in key order, taking what is old; it is small (one row
    per scope, window and threshold reached)."""
    if cut.ledger is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["budget_alarms"], (*(cursor or _FIRST_ALARM), limit)).fetchall()
    if not rows:
        return Selection([], cursor, False)
    edge = to_iso(cut.ledger)
    going = [r for r in rows if str(r[3]) < edge]
    return Selection(
        keys=[(r[0], r[1], r[2]) for r in going],
        cursor=tuple(rows[-1][:3]),
        more=len(rows) == limit,
        times=[str(r[3]) for r in going],
    )


def select_alerts(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Alerts older than ``cut.alerts`` with no delivery pending."""
    if cut.alerts is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["alerts"], (cursor or 0, limit)).fetchall()
    pending = {r[0] for r in conn.execute(QUERIES["pending_alerts"])}
    return walk(rows, to_iso(cut.alerts), cursor, limit, keep=lambda r: r[0] in pending)


def select_outbox(conn: Conn, cut: Cutoffs, cursor: Any, limit: int) -> Selection:
    """Deliveries older than ``cut.alerts`` that ended (delivered or failed); a pending
    one stays, however old."""
    if cut.alerts is None:
        return Selection([], cursor, False)
    rows = conn.execute(QUERIES["outbox"], (cursor or 0, limit)).fetchall()
    return walk(rows, to_iso(cut.alerts), cursor, limit, keep=lambda r: r[2] == "pending")


# ---------------------------------------------------------------- deleting (or counting)

Deleter = Callable[[Conn, Selection, Cutoffs, bool], dict[str, int]]


def _count(conn: Conn, sql: str, params: Sequence[Any]) -> int:
    row = conn.execute(sql, params).fetchone()
    return 0 if row is None else int(row[0])


def _delete_or_count(conn: Conn, what: str, ids: list[str], dry_run: bool) -> int:
    if dry_run:
        return _count(conn, QUERIES[f"count_{what}"], (ids,))
    return int(conn.execute(QUERIES[f"delete_{what}"], (ids,)).rowcount)


def _delete_runs(conn: Conn, sel: Selection, cut: Cutoffs, dry_run: bool) -> dict[str, int]:
    """A batch of runs with their events, attempts, checkpoints and agent steps (children
    first: the foreign keys), and an expired quarantine entry if one is left. Dry: the same counts,
    read."""
    ids = list(sel.keys)
    counts = {"runs": len(ids)}
    counts["events"] = _delete_or_count(conn, "run_events", ids, dry_run)
    counts["attempts"] = _delete_or_count(conn, "attempts", ids, dry_run)
    counts["checkpoints"] = _delete_or_count(conn, "checkpoints", ids, dry_run)
    counts["agent_steps"] = _delete_or_count(conn, "agent_steps", ids, dry_run)
    if dry_run:
        # An expired quarantine entry would have been dropped first, with an event.
        counts["events"] += _count(conn, QUERIES["count_quarantine"], (ids,))
    else:
        conn.execute(QUERIES["delete_quarantine"], (ids,))
        counts["runs"] = int(conn.execute(QUERIES["delete_runs"], (ids,)).rowcount)
    return counts


def _drop_quarantine(conn: Conn, sel: Selection, cut: Cutoffs, dry_run: bool) -> dict[str, int]:
    """Entries past ``keep_quarantine`` leave quarantine as ``quarantine drop`` makes
    them, with a ``drop`` event each and their runs' status ``dropped``; the runs then
    age like any finished run."""
    if dry_run:
        return {"quarantine": len(sel.keys)}
    dropped = int(conn.execute(QUERIES["delete_quarantine"], (list(sel.keys),)).rowcount)
    conn.execute(QUERIES["mark_dropped"], (list(sel.keys),))
    ts = to_iso(cut.now)
    data = json.dumps({"by": "retention", "reason": "keep_quarantine"}, sort_keys=True)
    with conn.cursor() as cur:
        cur.executemany(
            QUERIES["insert_drop"],
            [(ts, str(EventKind.DROP), task_id, run_id, data) for task_id, run_id in sel.runs],
        )
    for task_id, run_id in sel.runs:
        log.info("retention: quarantine entry expired, dropped run=%s task=%s", run_id, task_id)
    return {"quarantine": dropped}


def _by_key(kind: str) -> Deleter:
    def delete(conn: Conn, sel: Selection, cut: Cutoffs, dry_run: bool) -> dict[str, int]:
        if dry_run:
            return {kind: len(sel.keys)}
        return {kind: int(conn.execute(QUERIES[f"delete_{kind}"], (list(sel.keys),)).rowcount)}

    return delete


def _delete_budget_alarms(
    conn: Conn, sel: Selection, cut: Cutoffs, dry_run: bool
) -> dict[str, int]:
    if dry_run:
        return {"budget_alarms": len(sel.keys)}
    scopes, windows, thresholds = (list(column) for column in zip(*sel.keys, strict=True))
    cur = conn.execute(QUERIES["delete_budget_alarms"], (scopes, windows, thresholds))
    return {"budget_alarms": int(cur.rowcount)}


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
    Step("budget_alarms", select_budget_alarms, _delete_budget_alarms),
)
"""A pass, in order."""


# ---------------------------------------------------------------- the executor


def prune(
    conn: Conn,
    state_dir: Path,
    cut: Cutoffs,
    *,
    pace: Callable[[float], bool] = lambda _s: True,
    stopped: Callable[[], bool] = lambda: False,
    dry_run: bool = False,
    batch_runs: int = BATCH_RUNS,
    batch_rows: int = BATCH_ROWS,
    vacuuming: Callable[[bool], None] = lambda _on: None,
) -> Report:
    """One pass over every kind, batch by batch, each batch one transaction under the
    write lock; then VACUUM of the tables it deleted from, then this node's workspace
    sweep. ``pace`` is called after each batch with how long it held the write lock and
    pauses before the next; when it returns False the pass ends there
    (``report.stopped``). ``stopped`` is asked between workspace removals and tables
    to vacuum; ``vacuuming`` is told when a VACUUM starts and ends (``Pruner`` cancels
    one to stop).

    The caller holds ``PRUNE_LOCK`` (``prune_pass`` does). ``conn`` is in autocommit
    mode (``connect``). A ``dry_run`` writes nothing: one read-only snapshot, counting
    what would go and this node's workspaces that would, with their bytes."""
    report = Report()
    started = time.monotonic()
    if dry_run:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
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
        if not report.stopped and not dry_run:
            touched = [TABLES[k] for k, n in report.counts.items() if n and k in TABLES]
            vacuum(conn, touched, stopped, vacuuming)
        if not report.stopped:
            found, size = sweep_workspaces(conn, state_dir, stopped, dry_run=dry_run)
            report.counts["workspaces"] += found
            report.workspace_bytes += size
    finally:
        if dry_run:
            conn.execute("COMMIT")
        report.seconds = time.monotonic() - started
    return report


def _prune_step(
    conn: Conn,
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
        # The engine's write transaction: the lock's wait (a daemon's commit) is not
        # counted in what the batch held.
        conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")
        t0 = time.monotonic()
        try:
            sel = step.select(conn, cut, cursor, limit)  # again, under the lock: what is true now
            counts = step.delete(conn, sel, cut, False) if sel.keys else {}
            conn.execute(f"{_BUMP}; COMMIT" if counts else "COMMIT")
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise
        held = time.monotonic() - t0
        report.add(counts, step.kind, sel.times)
        report.batches += 1
        if step.per_run and sel.runs:
            found = existing_workspaces(state_dir, sel.runs)  # this node's: durable, committed
            report.counts["workspaces"] += remove_trees(found, stopped) if found else 0
        cursor = sel.cursor
        if not pace(held):
            return False
        if not sel.more:
            return True


def _count_step(
    conn: Conn,
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
        for path in existing_workspaces(state_dir, sel.runs) if step.per_run else ():
            report.counts["workspaces"] += 1
            report.workspace_bytes += tree_bytes(path)
        if not sel.more:
            return True
        if stopped():
            return False
        cursor = sel.cursor


def vacuum(
    conn: Conn,
    tables: Sequence[str],
    stopped: Callable[[], bool],
    vacuuming: Callable[[bool], None] = lambda _on: None,
) -> list[str]:
    """VACUUM (plain: no exclusive lock, the daemons go on) each of ``tables``, at
    autovacuum's pace, skipping one that another VACUUM holds; returns those done. A
    cancel (a stop) ends it there; a failure costs only that table (autovacuum's turn)."""
    done: list[str] = []
    if not tables:
        return done
    started = time.monotonic()
    conn.execute(f"SET vacuum_cost_delay = {VACUUM_COST_DELAY_MS}")
    for table in tables:
        if stopped():
            break
        vacuuming(True)
        try:
            conn.execute(f"VACUUM (SKIP_LOCKED) {table}")
            done.append(table)
        except psycopg.errors.QueryCanceled:
            log.info("retention: VACUUM of %s cut short to stop", table)
            break
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                raise
            log.warning("retention: VACUUM of %s failed, left to autovacuum: %s", table, exc)
        finally:
            vacuuming(False)
    if done:
        log.info("retention: vacuumed %s in %.2fs", " ".join(done), time.monotonic() - started)
    return done


def sweep_workspaces(
    conn: Conn, state_dir: Path, stopped: Callable[[], bool], *, dry_run: bool = False
) -> tuple[int, int]:
    """Remove (dry: count, with their bytes) the workspace directories under this node's
    ``state_dir`` whose runs are not in the database; returns (how many, bytes). Only
    ``<state_dir>/runs/<task>/<run>`` entries with safe names are looked at, a batch of
    ``BATCH_SWEEP`` ids per lookup."""
    root = state_dir / "runs"
    found = size = 0
    batch: list[tuple[str, Path]] = []

    def settle() -> None:
        nonlocal found, size
        present = {
            r[0] for r in conn.execute(QUERIES["present_runs"], ([run for run, _ in batch],))
        }
        gone = [path for run, path in batch if run not in present]
        batch.clear()
        if dry_run:
            found += len(gone)
            size += sum(tree_bytes(p) for p in gone)
        elif gone:
            found += remove_trees(gone, stopped)

    for task_dir in _entries(root):
        if not (SAFE_NAME.match(task_dir.name) and task_dir.is_dir(follow_symlinks=False)):
            continue
        for run_dir in _entries(Path(task_dir.path)):
            if stopped():
                return found, size
            if SAFE_NAME.match(run_dir.name) and (run_dir.is_dir() or run_dir.is_symlink()):
                batch.append((run_dir.name, Path(run_dir.path)))
                if len(batch) >= BATCH_SWEEP:
                    settle()
    if batch:
        settle()
    return found, size


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


class Busy(Exception):
    """Another session holds ``PRUNE_LOCK``: another node's pass runs."""


@contextlib.contextmanager
def exclusive(conn: Conn) -> Iterator[None]:
    """Hold ``PRUNE_LOCK`` (session-level) for the block, or raise ``Busy`` at once."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK,)).fetchone()
    if not (row and row[0]):
        raise Busy
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))


def prune_pass(
    conn: Conn,
    state_dir: Path,
    cut: Cutoffs,
    *,
    pace: Callable[[float], bool] = lambda _s: True,
    stopped: Callable[[], bool] = lambda: False,
    dry_run: bool = False,
    batch_runs: int = BATCH_RUNS,
    batch_rows: int = BATCH_ROWS,
    vacuuming: Callable[[bool], None] = lambda _on: None,
) -> tuple[Report, bool]:
    """A pass of this node: ``prune`` under ``PRUNE_LOCK``, or, when another node holds
    it, only the sweep of this node's workspaces. Returns the report and whether it was
    that (True: busy, the database was another node's to prune). A dry run takes no
    lock."""
    if dry_run:
        return prune(conn, state_dir, cut, stopped=stopped, dry_run=True, batch_runs=batch_runs,
                     batch_rows=batch_rows), False  # fmt: skip
    try:
        with exclusive(conn):
            report = prune(
                conn, state_dir, cut, pace=pace, stopped=stopped, batch_runs=batch_runs,
                batch_rows=batch_rows, vacuuming=vacuuming,
            )  # fmt: skip
        return report, False
    except Busy:
        pass
    report = Report()
    started = time.monotonic()
    report.counts["workspaces"] = sweep_workspaces(conn, state_dir, stopped)[0]
    report.seconds = time.monotonic() - started
    return report, True


def connect(url: str, password: str | None = None, *, read_only: bool = False) -> Conn:
    """A connection of retention's own, in autocommit mode (its transactions are
    explicit; VACUUM needs it), waiting at most the engine's lock timeout for a lock;
    or read-only (``default_transaction_read_only``: it cannot write whatever it runs).
    ``password`` is passed apart from the URL, as the engine does."""
    options = f"-c lock_timeout={LOCK_TIMEOUT_MS}"
    if read_only:
        options += " -c default_transaction_read_only=on"
    return psycopg.connect(
        url,
        password=password,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        options=options,
        application_name="agentd-retention",
    )


def schema_problem(conn: Conn) -> str | None:
    """Why this agentd cannot prune this database, or None."""
    exists = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return "it holds no agentd state (no daemon has opened it)"
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version != SCHEMA_VERSION:
        return (
            f"its schema version is {version} and this agentd's is {SCHEMA_VERSION};"
            " use the agentd that wrote it"
        )
    return None


# ---------------------------------------------------------------- the thread


class Pruner(neutral.Pruner):
    """Prune passes (``prune_pass``) on a thread of its own with a connection of its own
    (``connect``, opened at the first pass and again after a pass that failed: a broken
    one, or one whose lock may not have been let go), timed as
    ``agentd.state.retention.Pruner`` says. ``stop()`` returns within a batch: it also
    cancels a VACUUM in progress. A pass another node's lock made a sweep only is
    logged at debug."""

    expected_errors = (psycopg.Error,)

    def __init__(
        self,
        url: str,
        password: str | None,
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
        self.url = url
        self._password = password
        self.state_dir = state_dir
        self.busy_passes = 0
        """Passes that found another node pruning (and only swept)."""
        self._conn: Conn | None = None
        self._vacuuming = False

    def run_pass(self, conn: Conn) -> Report:
        """One pass now on ``conn``; logs one line and counts it when it pruned anything."""
        report, busy = prune_pass(
            conn,
            self.state_dir,
            cutoffs(self.settings(), self.clock.now()),
            pace=self._pace,
            stopped=self._stop.is_set,
            batch_runs=self.batch_runs,
            batch_rows=self.batch_rows,
            vacuuming=self._set_vacuuming,
        )
        if busy:
            self.busy_passes += 1
            log.debug(
                "retention: another node is pruning the database; this pass swept only"
                " this node's workspaces"
            )
        self._counted(report)
        return report

    def _set_vacuuming(self, on: bool) -> None:
        self._vacuuming = on

    def _one_pass(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, self._password)
        try:
            self.run_pass(self._conn)
        except BaseException:
            self._close()
            raise

    def _interrupt(self) -> None:
        conn = self._conn
        if self._vacuuming and conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=1.0)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------- agentd prune


def prune_command(config: Config, args: argparse.Namespace) -> int:
    """``agentd prune [--dry-run]`` on the shared database, in the daemons' batches
    under their write lock, pausing between batches as their pruner does; the
    workspaces are this node's (the config's ``state_dir``). When a daemon's pass holds
    ``PRUNE_LOCK`` it sweeps only those and exits 75 (try again later). ``--dry-run``
    connects read-only and takes no lock."""
    assert config.state.url is not None
    try:
        password = read_secret(
            config.state.password_env, config.state.password_file, "state password"
        )
    except SecretUnavailable as exc:
        print(f"agentd: state: {exc}", file=sys.stderr)
        return exitcodes.REFUSED
    try:
        conn = connect(config.state.url, password, read_only=args.dry_run)
    except psycopg.Error as exc:
        print(f"agentd: cannot connect to the state database: {exc}", file=sys.stderr)
        return exitcodes.REFUSED
    try:
        problem = schema_problem(conn)
        if problem:
            print(f"agentd: cannot prune the state database: {problem}", file=sys.stderr)
            return exitcodes.REFUSED
        cut = cutoffs(config.history, SystemClock().now())
        # Ctrl-C ends the prune between batches, and what went is still reported.
        with neutral.ctrl_c_stops() as interrupted:

            def pace(batch_s: float) -> bool:
                return not interrupted.wait(neutral.gap(batch_s))

            report, busy = prune_pass(
                conn,
                config.daemon.state_dir,
                cut,
                pace=pace,
                stopped=interrupted.is_set,
                dry_run=args.dry_run,
            )
    finally:
        conn.close()
    if busy:
        print(
            "agentd: another node is pruning the state database now; only this node's"
            " workspaces were swept: try again when its pass is over",
            file=sys.stderr,
        )
    print_report(args, config.history, cut, report)
    if busy:
        return exitcodes.LOCKED
    return exitcodes.FORCED if report.stopped else exitcodes.OK
