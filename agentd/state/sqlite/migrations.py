"""The SQLite engine's schema history: one function per schema version, run in order
by ``SqliteStore`` inside one write transaction when it opens a DB at an older version.

A migration never changes once released (a DB at version N was made by exactly these
steps); ``agentd.state.schema`` is the schema they end at, and a test holds the two
equal.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

SCHEMA_VERSION = 11


def _migrate_1(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    db.table("tasks").create(
        {
            "id": str,
            "fingerprint": str,
            "kind": str,
            "present": int,
            "paused": int,
            "paused_reason": str,
            "paused_at": str,
            "consecutive_quarantines": int,
            "last_run_at": str,
            "last_outcome": str,
            "last_success_at": str,
            "updated_at": str,
        },
        pk="id",
        defaults={"present": 1, "paused": 0, "consecutive_quarantines": 0},
        not_null={"fingerprint", "kind"},
    )
    db.table("runs").create(
        {
            "id": str,
            "task_id": str,
            "trigger": str,
            "scheduled_for": str,
            "idempotency_key": str,
            "status": str,
            "attempt": int,
            "failures": int,
            "not_before": str,
            "lease_owner": str,
            "lease_expires_at": str,
            "cancel_requested": int,
            "created_at": str,
            "started_at": str,
            "finished_at": str,
            "outcome": str,
            "exit_code": int,
            "error": str,
            "duration_s": float,
            "skip_reason": str,
            "progress_done": int,
            "progress_total": int,
            "progress_message": str,
        },
        pk="id",
        defaults={"attempt": 0, "failures": 0, "cancel_requested": 0},
        not_null={"task_id", "status", "idempotency_key", "created_at"},
    )
    db.table("runs").create_index(["idempotency_key"], unique=True)
    db.table("runs").create_index(["status", "not_before"])
    db.table("runs").create_index(["task_id", "created_at"])
    db.table("attempts").create(
        {
            "id": int,
            "run_id": str,
            "attempt": int,
            "worker": str,
            "started_at": str,
            "finished_at": str,
            "outcome": str,
            "exit_code": int,
            "http_status": int,
            "error": str,
            "duration_s": float,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("attempts").create_index(["run_id", "attempt"])
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL,"
        " kind TEXT NOT NULL, task_id TEXT, run_id TEXT, data TEXT NOT NULL DEFAULT '{}')"
    )
    db.table("events").create_index(["run_id", "id"])
    db.table("events").create_index(["task_id", "id"])
    db.table("checkpoints").create(
        {"run_id": str, "data": str, "seq": int, "saved_at": str},
        pk="run_id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("quarantine").create(
        {
            "run_id": str,
            "task_id": str,
            "quarantined_at": str,
            "last_error": str,
            "attempts": int,
        },
        pk="run_id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("llm_calls").create(
        {
            "id": int,
            "run_id": str,
            "task_id": str,
            "ts": str,
            "provider": str,
            "model": str,
            "input_tokens": int,
            "output_tokens": int,
            "duration_s": float,
            "status": int,
            "item": int,
        },
        pk="id",
    )
    db.table("llm_calls").create_index(["task_id", "ts"])


def _migrate_2(db: sqlite_utils.Database) -> None:
    """Unattended safety: the spend ledger (which absorbs ``llm_calls``), budget alarms
    once per window, alert state, raised alerts and their delivery outbox."""
    db.execute(
        "CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL,"
        " run_id TEXT, task_id TEXT, provider TEXT, model TEXT, item INTEGER,"
        " state TEXT NOT NULL DEFAULT 'committed',"  # reserved | committed
        " input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,"
        " cost_usd REAL NOT NULL DEFAULT 0, reserved_tokens INTEGER NOT NULL DEFAULT 0,"
        " reserved_usd REAL NOT NULL DEFAULT 0, status TEXT, duration_s REAL,"
        " usage_missing INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO ledger(ts, run_id, task_id, provider, model, item, state, input_tokens,"
        " output_tokens, cost_usd, status, duration_s) SELECT ts, run_id, task_id, provider,"
        " model, item, 'committed', input_tokens, output_tokens, 0, CAST(status AS TEXT),"
        " duration_s FROM llm_calls ORDER BY id"
    )
    db.execute("DROP TABLE llm_calls")
    db.table("ledger").create_index(["task_id", "ts"])
    db.table("ledger").create_index(["run_id"])
    db.table("ledger").create_index(["ts"])
    db.execute(
        "CREATE TABLE budget_alarms (scope TEXT NOT NULL, window_start TEXT NOT NULL,"
        " threshold REAL NOT NULL, ts TEXT NOT NULL, limit_usd REAL, spent_usd REAL,"
        " PRIMARY KEY (scope, window_start, threshold))"
    )
    db.execute("CREATE TABLE alert_state (key TEXT PRIMARY KEY, value TEXT, ts TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL,"
        " kind TEXT NOT NULL, dedup_key TEXT NOT NULL, task_id TEXT, run_id TEXT,"
        " event_id INTEGER, summary TEXT NOT NULL, data TEXT NOT NULL DEFAULT '{}')"
    )
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, alert_id INTEGER,"
        " channel TEXT NOT NULL, dedup_key TEXT NOT NULL, created_at TEXT NOT NULL,"
        " status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at TEXT NOT NULL, last_error TEXT, delivered_at TEXT,"
        " payload TEXT NOT NULL DEFAULT '{}')"  # pending | delivered | failed
    )
    db.table("outbox").create_index(["status", "next_attempt_at"])
    db.table("outbox").create_index(["channel", "dedup_key", "created_at"])


def _migrate_3(db: sqlite_utils.Database) -> None:
    """The paused set is read every second for gauges: index the few paused rows
    instead of scanning 10,000 tasks. Claims walk an index in due order."""
    db.execute("CREATE INDEX idx_tasks_paused ON tasks(id) WHERE paused=1")
    # claim() reads due runs in (not_before, scheduled_for, rowid) order and stops early.
    db.execute("CREATE INDEX idx_runs_due ON runs(status, not_before, scheduled_for)")


def _migrate_4(db: sqlite_utils.Database) -> None:
    """Every status change rewrites each index on ``status``: (status, not_before) is a
    prefix of idx_runs_due and only cost writes. A fire's overlap check reads the task's
    *active* runs, which the (task_id, created_at) index found by walking the task's
    whole history: O(history) per fire for a task that runs every minute for a year.
    The partial index holds only queued and running rows."""
    db.execute("DROP INDEX IF EXISTS idx_runs_status_not_before")
    db.execute(
        "CREATE INDEX idx_runs_active ON runs(task_id, status) WHERE status IN ('queued','running')"
    )


def _migrate_5(db: sqlite_utils.Database) -> None:
    """Index only the runs a hot query looks for: queued runs by due time, running
    runs by lease owner. The full (status, not_before, scheduled_for) index held every
    finished run too, and each claim and finish deleted and re-inserted the run's entry
    in it. Now a claim moves the entry from one small index to the other, and a finish
    drops it.
    (Queries must spell ``status='queued'`` or ``status='running'`` literally: SQLite
    uses a partial index only when it can see the query implies its WHERE.)"""
    db.execute("DROP INDEX IF EXISTS idx_runs_due")
    db.execute("CREATE INDEX idx_runs_due ON runs(not_before, scheduled_for) WHERE status='queued'")
    db.execute("CREATE INDEX idx_runs_running ON runs(lease_owner) WHERE status='running'")


def _migrate_6(db: sqlite_utils.Database) -> None:
    """Each attempt's process group, recorded right after its spawn (``record_group``):
    the group id, its leader's start time in clock ticks since boot, and the boot id.
    Recovery ends a group still alive before it re-queues the run (``agentd.procs``)."""
    db.execute("ALTER TABLE attempts ADD COLUMN pgid INTEGER")
    db.execute("ALTER TABLE attempts ADD COLUMN pgid_start INTEGER")
    db.execute("ALTER TABLE attempts ADD COLUMN boot_id TEXT")


def _migrate_7(db: sqlite_utils.Database) -> None:
    """The node registry: each daemon that has opened this state, what it runs (version,
    config generation) and when it was last seen (``Store.node_seen``)."""
    db.execute(
        "CREATE TABLE nodes (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,"
        " version TEXT NOT NULL, config_generation TEXT NOT NULL, started_at TEXT NOT NULL,"
        " last_seen TEXT NOT NULL, stopped_at TEXT)"
    )


def _migrate_8(db: sqlite_utils.Database) -> None:
    """The claim's index holds its whole ORDER BY (``not_before, scheduled_for,
    created_at, id``), the same on both engines: PostgreSQL has no rowid to end it with."""
    db.execute("DROP INDEX IF EXISTS idx_runs_due")
    db.execute(
        "CREATE INDEX idx_runs_due ON runs(not_before, scheduled_for, created_at, id)"
        " WHERE status='queued'"
    )


def _migrate_9(db: sqlite_utils.Database) -> None:
    """An agent run's durable steps: its model replies and tool calls, in order
    (``Store.record_agent_step``)."""
    db.execute(
        "CREATE TABLE agent_steps (run_id TEXT NOT NULL REFERENCES runs(id),"
        " seq INTEGER NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL, call_id TEXT,"
        " payload TEXT NOT NULL, recorded_at TEXT NOT NULL, PRIMARY KEY (run_id, seq))"
    )


def _migrate_10(db: sqlite_utils.Database) -> None:
    """Runs parked for an approval (``awaiting_approval``) by deadline: the approval
    timeout's sweep (``Store.expire_approvals``) reads only those."""
    db.execute("CREATE INDEX idx_runs_parked ON runs(not_before) WHERE status='awaiting_approval'")


def _migrate_11(db: sqlite_utils.Database) -> None:
    """A manual trigger's params, recorded with its run (``Fire.params``)."""
    db.execute("ALTER TABLE runs ADD COLUMN params TEXT")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migrate_1,
    _migrate_2,
    _migrate_3,
    _migrate_4,
    _migrate_5,
    _migrate_6,
    _migrate_7,
    _migrate_8,
    _migrate_9,
    _migrate_10,
    _migrate_11,
]
