"""The alerts' statements (``agentd.state.port.AlertsPort``) on PostgreSQL: the event
cursor (in ``meta``), ``alert_state``, ``alerts`` and the ``outbox`` of deliveries.

The same verbs and results as the SQLite engine's (``agentd.state.sqlite.alerts``), with
PostgreSQL's spelling: an upsert is ``ON CONFLICT ... DO UPDATE``, a set of kinds is one
array parameter (``= ANY(%s)``), an id comes from ``RETURNING``. Alert-state keys are
compared byte-wise whatever the database's collation: a prefix is ``^@`` (starts-with; a
text range under a linguistic collation would let ``deadman_since:`` fall inside
``deadman:``), and keys are listed in ``COLLATE "C"`` order, SQLite's order. JSON
columns hold encoded text on every engine (``agentd.state.schema``) and are decoded
here."""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection
from datetime import datetime
from typing import Any, cast

from agentd.clock import from_iso, to_iso
from agentd.models import INSTANCE_KEY, Row
from agentd.state.port import AlertRecord, NewAlert, OutboxRecord, RunningAttempt
from agentd.state.postgres.statements import Statements


def _decoded(value: Any) -> Any:
    """A JSON column's value: text from the column, decoded (a driver that decoded it
    already hands it through)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def _delivery(row: Row) -> OutboxRecord:
    row["payload"] = _decoded(row["payload"])
    return cast(OutboxRecord, row)


class AlertStatements(Statements):
    """``AlertsPort`` for ``PostgresStore``."""

    # ------------------------------------------------------------ the event cursor

    def event_cursor(self, name: str) -> int | None:
        row = self._one("SELECT value FROM meta WHERE key=%s", (name,))
        return None if row is None else int(row["value"])

    def move_event_cursor(self, name: str, event_id: int) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (name, str(event_id)),
            )

    def instance_id(self) -> str:
        row = self._one("SELECT value FROM meta WHERE key=%s", (INSTANCE_KEY,))
        if row is not None:
            return str(row["value"])
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                (INSTANCE_KEY, secrets.token_hex(16)),
            )
        made = self._one("SELECT value FROM meta WHERE key=%s", (INSTANCE_KEY,))
        assert made is not None  # inserted above, or by the node that won the race
        return str(made["value"])

    def events_of_kinds(
        self, after_id: int, up_to_id: int, kinds: Collection[str], limit: int
    ) -> list[Row]:
        rows = self._all(
            "SELECT * FROM events WHERE id>%s AND id<=%s AND kind = ANY(%s) ORDER BY id LIMIT %s",
            (after_id, up_to_id, sorted(kinds), limit),
        )
        for row in rows:
            row["data"] = _decoded(row["data"])
        return rows

    # ------------------------------------------------------------ alert state

    def alert_state(self, key: str) -> str | None:
        row = self._one("SELECT value FROM alert_state WHERE key=%s", (key,))
        return None if row is None else str(row["value"])

    def set_alert_state(self, key: str, value: str, now: datetime) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO alert_state(key, value, ts) VALUES (%s,%s,%s) ON CONFLICT (key)"
                " DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts",
                (key, value, to_iso(now)),
            )

    def clear_alert_state(self, key: str) -> bool:
        with self.tx() as conn:
            return bool(conn.execute("DELETE FROM alert_state WHERE key=%s", (key,)).rowcount)

    def has_alert_state(self, *prefixes: str) -> bool:
        if not prefixes:
            return False
        row = self._one(
            "SELECT 1 AS found FROM alert_state WHERE key ^@ ANY(%s) LIMIT 1",
            (list(prefixes),),
        )
        return row is not None

    def alert_state_keys(self, prefix: str) -> list[str]:
        rows = self._all(
            'SELECT key FROM alert_state WHERE key ^@ %s ORDER BY key COLLATE "C"',
            (prefix,),
        )
        return [str(row["key"]) for row in rows]

    # ------------------------------------------------------------ alerts and the outbox

    def record_alert(self, now: datetime, alert: NewAlert) -> int:
        with self.tx():
            row = self._one(
                "INSERT INTO alerts(ts, kind, dedup_key, task_id, run_id, event_id, summary,"
                " data) VALUES (%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
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
            assert row is not None
            return int(row["id"])

    def alert(self, alert_id: int) -> AlertRecord | None:
        row = self._one("SELECT * FROM alerts WHERE id=%s", (alert_id,))
        if row is None:
            return None
        row["data"] = _decoded(row["data"])
        return cast(AlertRecord, row)

    def queued_since(self, channel: str, dedup_key: str, since: datetime) -> bool:
        row = self._one(
            "SELECT 1 AS found FROM outbox WHERE channel=%s AND dedup_key=%s AND created_at>%s"
            " LIMIT 1",
            (channel, dedup_key, to_iso(since)),
        )
        return row is not None

    def enqueue_delivery(
        self, now: datetime, channel: str, dedup_key: str, payload: Row, alert_id: int | None
    ) -> int:
        ts = to_iso(now)
        with self.tx():
            row = self._one(
                "INSERT INTO outbox(alert_id, channel, dedup_key, created_at, next_attempt_at,"
                " payload) VALUES (%s,%s,%s,%s,%s,%s) RETURNING id",
                (alert_id, channel, dedup_key, ts, ts, json.dumps(payload, default=str)),
            )
            assert row is not None
            return int(row["id"])

    def pending_deliveries(self, now: datetime, limit: int) -> list[OutboxRecord]:
        rows = self._all(
            "SELECT * FROM outbox WHERE status='pending' AND next_attempt_at<=%s ORDER BY id"
            " LIMIT %s",
            (to_iso(now), limit),
        )
        return [_delivery(row) for row in rows]

    def next_delivery_at(self) -> datetime | None:
        row = self._one("SELECT MIN(next_attempt_at) AS due FROM outbox WHERE status='pending'")
        return from_iso(row["due"]) if row and row["due"] else None

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        rows = self._all(
            "SELECT channel, status, COUNT(*) AS n FROM outbox"
            " WHERE status IN ('pending','failed') GROUP BY channel, status"
        )
        return {(str(r["channel"]), str(r["status"])): int(r["n"]) for r in rows}

    def mark_delivered(self, outbox_id: int, now: datetime) -> bool:
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE outbox SET status='delivered', attempts=attempts+1, delivered_at=%s,"
                " last_error=NULL WHERE id=%s AND status='pending'",
                (to_iso(now), outbox_id),
            )
            return bool(cur.rowcount)

    def schedule_redelivery(self, outbox_id: int, attempts: int, error: str, at: datetime) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE outbox SET attempts=%s, last_error=%s, next_attempt_at=%s WHERE id=%s",
                (attempts, error, to_iso(at), outbox_id),
            )

    def give_up_delivery(self, outbox_id: int, attempts: int, error: str) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE outbox SET status='failed', attempts=%s, last_error=%s WHERE id=%s",
                (attempts, error, outbox_id),
            )

    def delivery(self, outbox_id: int) -> OutboxRecord | None:
        row = self._one("SELECT * FROM outbox WHERE id=%s", (outbox_id,))
        return None if row is None else _delivery(row)

    # ------------------------------------------------------------ what the checks look at

    def running_attempts(self) -> list[RunningAttempt]:
        rows = self._all(
            "SELECT r.id, r.task_id, r.attempt, a.started_at AS attempt_started FROM runs r"
            " LEFT JOIN attempts a ON a.run_id = r.id AND a.attempt = r.attempt"
            " WHERE r.status='running'"
        )
        return cast(list[RunningAttempt], rows)
