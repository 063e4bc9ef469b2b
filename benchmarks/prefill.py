"""Queue or history rows written straight into a stopped daemon's state DB.

Throughput benchmarks (B3, B4, B6) time how fast agentd *works off* a queue, like the
huey benchmark times its consumer on a filled queue; crash recovery (B8) needs a long
history. Writing those rows through the daemon would take minutes and measure the API
instead. So one run is created through agentd's own ``SqliteStore.fire`` (its real row
shape) and cloned in one transaction. Column lists come from that row, so the clones
follow agentd's schema as it changes.

On PostgreSQL (``queue_pg``, section PG) the port itself is fast enough: the runs are
fired through ``PostgresStore.fire_many``, 1,000 per transaction, each with its own
idempotency key. A fire is due at once (``not_before`` = now); one UPDATE then moves the
queue's ``not_before`` to one instant after every node is up (the state a retry's
backoff leaves a run in), so that all nodes find the whole queue due together.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from agentd.clock import to_iso
from agentd.config import load_config
from agentd.state.port import Fire
from agentd.state.postgres.engine import PostgresStore
from agentd.state.sqlite.engine import SqliteStore
from benchmarks.agentd_proc import AgentdProc

PG_BATCH = 1000


def _store(proc: AgentdProc) -> SqliteStore:
    proc.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(proc.db_path)
    tasks = load_config(proc.config).tasks
    store.sync_tasks(
        {tid: (t.fingerprint(), t.kind) for tid, t in tasks.items()}, datetime.now(UTC)
    )
    return store


def _insert(store: SqliteStore, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    store.conn.executemany(sql, [tuple(r[c] for c in cols) for r in rows])


def queue(
    proc: AgentdProc,
    task_id: str,
    n: int,
    trigger: str = "manual",
    paused: bool = False,
    offset: int = 0,
) -> None:
    """``n`` queued runs of ``task_id`` (``trigger='schedule'`` ones wait while paused).

    Also safe while the daemon runs (the CLI writes the same file the same way): B6 tops
    the queue up in chunks, ``offset`` keeping ids and idempotency keys unique."""
    store = _store(proc)
    now = datetime.now(UTC)
    try:
        first = store.fire(task_id, now, trigger=trigger, overlap="allow")
        template = store.get_run(first.run_id)
        stamp = now.strftime("%Y%m%dT%H%M%S")
        runs, events = [], []
        for i in range(offset + 1, offset + n):
            run_id = f"{stamp}-q{i:08d}"
            runs.append({**template, "id": run_id, "idempotency_key": f"{task_id}@bench:{i}"})
            events.append(
                {
                    "ts": template["created_at"],
                    "kind": "enqueue",
                    "task_id": task_id,
                    "run_id": run_id,
                    "data": json.dumps({"trigger": trigger}),
                }
            )
        with store.tx():
            _insert(store, "runs", runs)
            _insert(store, "events", events)
        if paused:
            store.pause(task_id, "benchmark: queue filled while paused", now)
    finally:
        store.close()


def history(proc: AgentdProc, task_id: str, n: int) -> None:
    """``n`` finished runs of ``task_id`` over the past days: attempts and events too."""
    histories(proc, [task_id], n)


def histories(proc: AgentdProc, task_ids: list[str], n: int) -> None:
    """``n`` finished runs of each of ``task_ids`` over the past days, with attempts and
    events, in one transaction (the config's tasks are synced once, not per task)."""
    store = _store(proc)
    now = datetime.now(UTC)
    try:
        runs, attempts, events, firsts = [], [], [], []
        for task_id in task_ids:
            first = store.fire(task_id, now, trigger="manual", overlap="allow")
            firsts.append(first.run_id)
            template = store.get_run(first.run_id)
            for i in range(n):
                at = to_iso(now - timedelta(days=7) + timedelta(seconds=5 * i))
                run_id = f"hist-{task_id}-{i:08d}" if len(task_ids) > 1 else f"hist-{i:08d}"
                runs.append(
                    {
                        **template,
                        "id": run_id,
                        "idempotency_key": f"{task_id}@hist:{i}",
                        "status": "succeeded",
                        "outcome": "success",
                        "attempt": 1,
                        "created_at": at,
                        "scheduled_for": at,
                        "started_at": at,
                        "finished_at": at,
                        "duration_s": 0.01,
                        "not_before": at,
                    }
                )
                attempts.append(
                    {
                        "run_id": run_id,
                        "attempt": 1,
                        "worker": "bench:1",
                        "started_at": at,
                        "finished_at": at,
                        "outcome": "success",
                        "duration_s": 0.01,
                    }
                )
                for kind in ("enqueue", "claim", "start", "success"):
                    events.append(
                        {"ts": at, "kind": kind, "task_id": task_id, "run_id": run_id, "data": "{}"}
                    )
        with store.tx():
            for run_id in firsts:
                store.conn.execute("DELETE FROM events WHERE run_id=?", (run_id,))
                store.conn.execute("DELETE FROM runs WHERE id=?", (run_id,))
            _insert(store, "runs", runs)
            _insert(store, "attempts", attempts)
            _insert(store, "events", events)
    finally:
        store.close()


def queue_pg(url: str, proc: AgentdProc, task_id: str, n: int, due: datetime) -> None:
    """``n`` queued runs of ``task_id`` (from ``proc``'s config) in the PostgreSQL state at
    ``url``, all due at ``due``, fired through the port before any node starts."""
    tasks = load_config(proc.config).tasks
    store = PostgresStore(url)
    try:
        now = datetime.now(UTC)
        store.sync_tasks({tid: (t.fingerprint(), t.kind) for tid, t in tasks.items()}, now)
        for start in range(0, n, PG_BATCH):
            fires = [
                Fire(task_id, due, "schedule", "allow", key=f"{task_id}@bench:{i}")
                for i in range(start, min(n, start + PG_BATCH))
            ]
            results = store.fire_many(fires, now)
            if not all(r.created for r in results):
                raise RuntimeError(f"prefill: {sum(not r.created for r in results)} not fired")
    finally:
        store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE runs SET not_before=%s WHERE task_id=%s AND status='queued'",
            (to_iso(due), task_id),
        )
