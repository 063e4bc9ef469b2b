"""The alerts' statements (``agentd.state.port.AlertsPort``) on SQLite: the event cursor
(in ``meta``), ``alert_state``, ``alerts`` and the ``outbox`` of deliveries."""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection
from datetime import datetime
from typing import cast

from agentd.clock import from_iso, to_iso
from agentd.models import INSTANCE_KEY, Row
from agentd.state.port import AlertRecord, NewAlert, OutboxRecord, RunningAttempt
from agentd.state.sqlite.statements import Statements


def _prefix_range(prefix: str) -> tuple[str, str]:
    """[low, high) of the keys that start with ``prefix``: an index range, where LIKE
    would scan (and treat ``_`` and ``%`` as wildcards)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _delivery(row: Row) -> OutboxRecord:
    row["payload"] = json.loads(row["payload"])
    return cast(OutboxRecord, row)


class AlertStatements(Statements):
    """``AlertsPort`` for ``SqliteStore``."""

    # ------------------------------------------------------------ the event cursor

    def event_cursor(self, name: str) -> int | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def move_event_cursor(self, name: str, event_id: int) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (name, str(event_id))
            )

    def instance_id(self) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (INSTANCE_KEY,)).fetchone()
        if row is not None:
            return str(row[0])
        with self.tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
                (INSTANCE_KEY, secrets.token_hex(16)),
            )
            made = conn.execute("SELECT value FROM meta WHERE key=?", (INSTANCE_KEY,)).fetchone()
        return str(made[0])

    def events_of_kinds(
        self, after_id: int, up_to_id: int, kinds: Collection[str], limit: int
    ) -> list[Row]:
        rows = self._all(
            "SELECT * FROM events WHERE id>? AND id<=? AND kind IN"
            " (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
            (after_id, up_to_id, json.dumps(sorted(kinds)), limit),
        )
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    # ------------------------------------------------------------ alert state

    def alert_state(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM alert_state WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_alert_state(self, key: str, value: str, now: datetime) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO alert_state(key, value, ts) VALUES (?,?,?)",
                (key, value, to_iso(now)),
            )

    def clear_alert_state(self, key: str) -> bool:
        with self.tx() as conn:
            return bool(conn.execute("DELETE FROM alert_state WHERE key=?", (key,)).rowcount)

    def has_alert_state(self, *prefixes: str) -> bool:
        if not prefixes:
            return False
        ranges = [_prefix_range(p) for p in prefixes]
        where = " OR ".join("(key >= ? AND key < ?)" for _ in ranges)
        params = [bound for r in ranges for bound in r]
        row = self.conn.execute(f"SELECT 1 FROM alert_state WHERE {where} LIMIT 1", params)
        return row.fetchone() is not None

    def alert_state_keys(self, prefix: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT key FROM alert_state WHERE key >= ? AND key < ? ORDER BY key",
            _prefix_range(prefix),
        )
        return [str(row[0]) for row in rows]

    # ------------------------------------------------------------ alerts and the outbox

    def record_alert(self, now: datetime, alert: NewAlert) -> int:
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT INTO alerts(ts, kind, dedup_key, task_id, run_id, event_id, summary,"
                " data) VALUES (?,?,?,?,?,?,?,?)",
                (
                    to_iso(now),
                    alert.kind,
                    alert.dedup_key,
                    alert.task_id,
                    alert.run_id,
                    alert.event_id,
                    alert.summary,
                    json.dumps(alert.data, default=str, sort_keys=True),
                ),
            )
            return int(cur.lastrowid or 0)

    def alert(self, alert_id: int) -> AlertRecord | None:
        row = self._one("SELECT * FROM alerts WHERE id=?", (alert_id,))
        if row is None:
            return None
        row["data"] = json.loads(row["data"])
        return cast(AlertRecord, row)

    def queued_since(self, channel: str, dedup_key: str, since: datetime) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM outbox WHERE channel=? AND dedup_key=? AND created_at>? LIMIT 1",
            (channel, dedup_key, to_iso(since)),
        ).fetchone()
        return row is not None

    def enqueue_delivery(
        self, now: datetime, channel: str, dedup_key: str, payload: Row, alert_id: int | None
    ) -> int:
        ts = to_iso(now)
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT INTO outbox(alert_id, channel, dedup_key, created_at, next_attempt_at,"
                " payload) VALUES (?,?,?,?,?,?)",
                (alert_id, channel, dedup_key, ts, ts, json.dumps(payload, default=str)),
            )
            return int(cur.lastrowid or 0)

    def pending_deliveries(self, now: datetime, limit: int) -> list[OutboxRecord]:
        rows = self._all(
            "SELECT * FROM outbox WHERE status='pending' AND next_attempt_at<=? ORDER BY id"
            " LIMIT ?",
            (to_iso(now), limit),
        )
        return [_delivery(row) for row in rows]

    def next_delivery_at(self) -> datetime | None:
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE status='pending'"
        ).fetchone()
        return from_iso(row[0]) if row and row[0] else None

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        rows = self.conn.execute(
            "SELECT channel, status, COUNT(*) FROM outbox WHERE status IN ('pending','failed')"
            " GROUP BY channel, status"
        )
        return {(str(channel), str(status)): int(n) for channel, status, n in rows}

    def mark_delivered(self, outbox_id: int, now: datetime) -> bool:
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE outbox SET status='delivered', attempts=attempts+1, delivered_at=?,"
                " last_error=NULL WHERE id=? AND status='pending'",
                (to_iso(now), outbox_id),
            )
            return bool(cur.rowcount)

    def schedule_redelivery(self, outbox_id: int, attempts: int, error: str, at: datetime) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE outbox SET attempts=?, last_error=?, next_attempt_at=? WHERE id=?",
                (attempts, error, to_iso(at), outbox_id),
            )

    def give_up_delivery(self, outbox_id: int, attempts: int, error: str) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE outbox SET status='failed', attempts=?, last_error=? WHERE id=?",
                (attempts, error, outbox_id),
            )

    def delivery(self, outbox_id: int) -> OutboxRecord | None:
        row = self._one("SELECT * FROM outbox WHERE id=?", (outbox_id,))
        return None if row is None else _delivery(row)

    # ------------------------------------------------------------ what the checks look at

    def running_attempts(self) -> list[RunningAttempt]:
        rows = self._all(
            "SELECT r.id, r.task_id, r.attempt, a.started_at AS attempt_started FROM runs r"
            " LEFT JOIN attempts a ON a.run_id = r.id AND a.attempt = r.attempt"
            " WHERE r.status='running'"
        )
        return cast(list[RunningAttempt], rows)
