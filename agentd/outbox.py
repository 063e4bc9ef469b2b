"""The durable side of alerts: event log -> alerts -> outbox -> delivered.

``process(now)`` reads the audit events after a cursor kept in ``meta``, raises the
alerts they call for (``alerts.alert_for_event``), queues one outbox row per channel a
rule names (unless the same dedup key went to that channel within its cooldown) and
per task ping, and moves the cursor, all in one transaction. A crash before the commit
re-reads the same events; after it, every alert is in the outbox. Nothing is raised
twice and nothing raised is lost.

``deliver_due(now)`` sends due rows and records the outcome: delivered, retried later
with exponential backoff, or failed for good after the channel's retries. A delivery
in flight at a crash is still pending and is sent again after the restart.

It also keeps the small state alerts need (``alert_state``): when dead-man monitoring
of a task began, which deadline was reported, which runs were reported too long, which
tasks are late or auto-paused and owe a recovery notice at their next success.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from agentd.alerts import Alert, DeliveryError, alert_for_event, deadman_late, deliver, routes
from agentd.clock import Clock, from_iso, to_iso
from agentd.config import Config, inactive_reason
from agentd.models import EventKind, Row
from agentd.state.sqlite import SqliteStore as Store  # until its SQL moves behind the port

log = logging.getLogger("agentd.alerts")

CURSOR_KEY = "alerts_cursor"
PING_CHANNEL = "ping"
PING_RETRIES = 3
PING_BACKOFF_S = 10.0
BATCH = 500
# Event kinds that can raise an alert, fire a ping or clear a condition.
ALERT_EVENTS = frozenset(
    {
        EventKind.QUARANTINE,
        EventKind.PAUSE,
        EventKind.SUCCESS,
        EventKind.BUDGET_ALARM,
        EventKind.BUDGET_EXHAUSTED,
        EventKind.DEADMAN,
        EventKind.RUN_TOO_LONG,
        EventKind.CONFIG_RELOAD_FAILED,
        EventKind.RECOVERED,
        EventKind.START,
        EventKind.FAILURE,
        EventKind.TIMEOUT,
    }
)

if TYPE_CHECKING:
    import httpx
# A run's start and success are two of its few audit events, and they matter only to a
# task with a ``ping`` or (success) one that owes a recovery notice: when neither exists
# they are not read (that would be two state lookups per success, on the loop).
_RUN_KINDS = frozenset({EventKind.START, EventKind.SUCCESS})
_KINDS_JSON = {
    "all": json.dumps(sorted(ALERT_EVENTS)),
    "success": json.dumps(sorted(ALERT_EVENTS - {"start"})),
    "base": json.dumps(sorted(ALERT_EVENTS - _RUN_KINDS)),
}


class Outbox:
    def __init__(self, store: Store, config: Config, clock: Clock) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.host = os.uname().nodename
        self.withheld_env: frozenset[str] = frozenset()
        """Kept out of a command channel's environment (the daemon's secrets)."""
        self._watched_for: Config | None = None
        self._timed_for: Config | None = None
        self._any_timed = False
        self._too_long_may_exist = True
        self._watched: list[str] = []
        self._pinged_for: Config | None = None
        self._any_ping = False

    # ------------------------------------------------------------ state

    def _state(self, key: str) -> str | None:
        row = self.store.conn.execute("SELECT value FROM alert_state WHERE key=?", (key,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def _set_state(self, key: str, value: str, now: datetime) -> None:
        self.store.conn.execute(
            "INSERT OR REPLACE INTO alert_state(key, value, ts) VALUES (?,?,?)",
            (key, value, to_iso(now)),
        )

    def _clear_state(self, key: str) -> bool:
        cur = self.store.conn.execute("DELETE FROM alert_state WHERE key=?", (key,))
        return bool(cur.rowcount)

    # ------------------------------------------------------------ events -> outbox

    def process(self, now: datetime) -> int:
        """Turn new events into alerts and outbox rows; returns how many events were read."""
        # The usual answer, "nothing new", without a write transaction.
        cursor, top = self._cursor_and_top()
        if cursor is not None and top <= cursor:
            return 0
        with self.store.tx():
            cursor, top = self._cursor_and_top()
            if cursor is None:
                # First start with alerts: history before now is not news.
                self._set_cursor(top)
                return 0
            # Only the kinds that can raise an alert, ping or recover are read and
            # decoded (claims, heartbeats and fires are most of the log). No other
            # writer runs inside this transaction, so every event up to ``top`` is
            # committed and the cursor may jump there when the batch was not full.
            if top <= cursor:
                return 0
            kinds = self._kinds()
            events = self.store._all(
                "SELECT * FROM events WHERE id>? AND id<=? AND kind IN"
                " (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                (cursor, top, _KINDS_JSON[kinds], BATCH),
            )
            for read, event in enumerate(events, 1):
                event["data"] = json.loads(event["data"])
                self._on_event(event, now)
                if kinds == "base" and _owes_recovery(event):
                    # Successes after this one now matter and were not read: the next
                    # pass reads on from here with them.
                    self._set_cursor(event["id"])
                    return read
            self._set_cursor(events[-1]["id"] if len(events) == BATCH else top)
            return len(events)

    def _kinds(self) -> str:
        """Which event kinds this pass reads (a key of ``_KINDS_JSON``)."""
        if self._pinged_for is not self.config:
            self._pinged_for = self.config
            self._any_ping = any(t.ping for t in self.config.tasks.values())
        if self._any_ping:
            return "all"
        owed = self.store.conn.execute(
            "SELECT 1 FROM alert_state WHERE (key >= 'deadman:' AND key < 'deadman;')"
            " OR (key >= 'paused:' AND key < 'paused;') LIMIT 1"
        ).fetchone()
        return "success" if owed else "base"

    def _cursor_and_top(self) -> tuple[int | None, int]:
        """The last event read (None before the first pass) and the newest event id."""
        conn = self.store.conn
        row = conn.execute("SELECT value FROM meta WHERE key=?", (CURSOR_KEY,)).fetchone()
        top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        return (None if row is None else int(row[0])), int(top)

    def _set_cursor(self, value: int) -> None:
        self.store.conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (CURSOR_KEY, str(value))
        )

    def _on_event(self, event: Row, now: datetime) -> None:
        """A success clears a task's ``deadman:`` and ``paused:`` state (see ``_kinds``:
        what sets either must be known there too)."""
        kind, task_id = event["kind"], event["task_id"]
        if kind == EventKind.SUCCESS and task_id:
            for what in ("deadman", "paused"):
                since = self._state(f"{what}:{task_id}")
                if since is not None:
                    self._clear_state(f"{what}:{task_id}")
                    self.store.emit(
                        now, EventKind.RECOVERED, task_id, event["run_id"], what=what, since=since
                    )
        elif _owes_recovery(event):
            self._set_state(f"paused:{task_id}", event["ts"], now)
        self._ping(event, now)
        alert = alert_for_event(event)
        if alert is not None:
            self.raise_alert(alert, now, event["id"])

    def raise_alert(self, alert: Alert, now: datetime, event_id: int | None = None) -> int:
        """Record the alert and queue it for every channel its rules name (inside a tx).
        Its summary and data are scrubbed of secret values like every stored text."""
        scrub = self.store.redactor
        if scrub:
            alert = dataclasses.replace(
                alert, summary=scrub.text(alert.summary), data=scrub.value(alert.data)
            )
        cur = self.store.conn.execute(
            "INSERT INTO alerts(ts, kind, dedup_key, task_id, run_id, event_id, summary, data)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                to_iso(now),
                alert.kind,
                alert.key,
                alert.task_id,
                alert.run_id,
                event_id,
                alert.summary,
                json.dumps(alert.data, default=str, sort_keys=True),
            ),
        )
        alert_id = int(cur.lastrowid or 0)
        log.warning("alert id=%d kind=%s %s", alert_id, alert.kind, alert.summary)
        payload = {
            "id": alert_id,
            "kind": alert.kind,
            "summary": alert.summary,
            "task": alert.task_id,
            "run_id": alert.run_id,
            "ts": to_iso(now),
            "host": self.host,
            "data": alert.data,
        }
        for channel, cooldown in routes(alert, self.config).items():
            recent = self.store.conn.execute(
                "SELECT 1 FROM outbox WHERE channel=? AND dedup_key=? AND created_at>?",
                (channel, alert.key, to_iso(now - timedelta(seconds=cooldown))),
            ).fetchone()
            if recent:
                log.info("alert id=%d not sent to %s: in cooldown", alert_id, channel)
                continue
            self._enqueue(channel, alert.key, payload, now, alert_id)
        return alert_id

    def _enqueue(
        self, channel: str, key: str, payload: Row, now: datetime, alert_id: int | None
    ) -> None:
        self.store.conn.execute(
            "INSERT INTO outbox(alert_id, channel, dedup_key, created_at, next_attempt_at,"
            " payload) VALUES (?,?,?,?,?,?)",
            (alert_id, channel, key, to_iso(now), to_iso(now), json.dumps(payload, default=str)),
        )

    def _ping(self, event: Row, now: datetime) -> None:
        task = self.config.tasks.get(event["task_id"] or "")
        if task is None or task.ping is None or not event["run_id"]:
            return
        data = event["data"]
        phase = {
            "start": "start",
            "success": "success",
            "failure": "fail",
            "timeout": "fail",
            "budget_exhausted": "fail",
        }.get(event["kind"])
        if phase is None:
            return
        payload = {
            "task": task.id,
            "run_id": event["run_id"],
            "phase": phase,
            "attempt": data.get("attempt"),
            "exit_code": data.get("exit_code"),
            "error": (data.get("error") or "")[:500] or None,
        }
        key = f"ping:{task.id}:{event['run_id']}:{event['id']}"
        self._enqueue(PING_CHANNEL, key, payload, now, None)

    # ------------------------------------------------------------ checks

    def watched(self) -> list[str]:
        """Tasks with a dead man's switch (``expect``); usually few of many."""
        if self._watched_for is not self.config:
            self._watched_for = self.config
            self._watched = [t for t, task in self.config.tasks.items() if task.expect]
        return self._watched

    def needs_check(self) -> bool:
        """False when no task has ``expect`` or ``max_duration`` and no run-too-long
        report is left to clear: then the per-second check needs no query at all."""
        if self._timed_for is not self.config:
            self._timed_for = self.config
            self._any_timed = any(t.max_duration for t in self.config.tasks.values())
        if self.watched() or self._any_timed:
            return True
        if self._too_long_may_exist:  # from an earlier process, or this one's reports
            self._too_long_may_exist = self._has_too_long_state()
        return self._too_long_may_exist

    def check(self, now: datetime, task_rows: dict[str, Row], running: list[Row]) -> None:
        """Dead man's switch and run-too-long: raise each condition once, as events.

        Runs every second: with nothing watched, nothing running and no report to clear
        it returns without a transaction."""
        watched = self.watched()
        timed = [r for r in running if self._max_duration(r) is not None]
        if not watched and not timed and not self._has_too_long_state():
            return
        with self.store.tx():
            for task_id in watched:
                task = self.config.tasks[task_id]
                assert task.expect is not None
                since_text = self._state(f"deadman_since:{task_id}")
                if since_text is None:
                    self._set_state(f"deadman_since:{task_id}", to_iso(now), now)
                    continue
                row = task_rows.get(task_id) or {}
                if row.get("paused") or inactive_reason(task):
                    continue  # a paused task is an operator's decision, not a silent failure
                last = from_iso(row["last_success_at"]) if row.get("last_success_at") else None
                late = deadman_late(last, from_iso(since_text), task.expect, now)
                if late is None or self._state(f"deadman_deadline:{task_id}") == to_iso(late):
                    continue
                self._set_state(f"deadman_deadline:{task_id}", to_iso(late), now)
                self._set_state(f"deadman:{task_id}", to_iso(late), now)
                self.store.emit(
                    now,
                    EventKind.DEADMAN,
                    task_id,
                    deadline=to_iso(late),
                    last_success=row.get("last_success_at"),
                    every_s=task.expect.every,
                    grace_s=task.expect.grace,
                )
            for run in timed:
                owner = self.config.tasks[run["task_id"]]
                assert owner.max_duration is not None
                if not run.get("attempt_started"):
                    continue
                elapsed = (now - from_iso(run["attempt_started"])).total_seconds()
                key = f"too_long:{run['id']}:{run['attempt']}"
                if elapsed <= owner.max_duration or self._state(key) is not None:
                    continue
                self._set_state(key, to_iso(now), now)
                self._too_long_may_exist = True
                self.store.emit(
                    now,
                    EventKind.RUN_TOO_LONG,
                    run["task_id"],
                    run["id"],
                    attempt=run["attempt"],
                    running_s=round(elapsed, 1),
                    max_duration_s=owner.max_duration,
                )
            # Reports about runs that ended are no longer needed.
            self.store.conn.execute(
                "DELETE FROM alert_state WHERE key LIKE 'too_long:%' AND NOT EXISTS (SELECT 1"
                " FROM runs WHERE runs.status='running' AND alert_state.key LIKE"
                " 'too_long:' || runs.id || ':%')"
            )

    def _max_duration(self, run: Row) -> float | None:
        owner = self.config.tasks.get(run["task_id"])
        return owner.max_duration if owner else None

    def _has_too_long_state(self) -> bool:
        row = self.store._one(
            "SELECT 1 AS x FROM alert_state WHERE key >= 'too_long:' AND key < 'too_long;' LIMIT 1"
        )
        return row is not None

    def running_attempts(self) -> list[Row]:
        return self.store._all(
            "SELECT r.id, r.task_id, r.attempt, a.started_at AS attempt_started FROM runs r"
            " LEFT JOIN attempts a ON a.run_id = r.id AND a.attempt = r.attempt"
            " WHERE r.status='running'"
        )

    # ------------------------------------------------------------ delivery

    def due(self, now: datetime, limit: int = 20) -> list[Row]:
        return self.store._all(
            "SELECT * FROM outbox WHERE status='pending' AND next_attempt_at<=? ORDER BY id"
            " LIMIT ?",
            (to_iso(now), limit),
        )

    def next_due(self) -> datetime | None:
        row = self.store.conn.execute(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE status='pending'"
        ).fetchone()
        return from_iso(row[0]) if row and row[0] else None

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        rows = self.due(self.clock.now())
        if rows:
            await asyncio.gather(*(self._deliver_one(row, client) for row in rows))
        return len(rows)

    async def _deliver_one(self, row: Row, client: httpx.AsyncClient) -> None:
        payload = json.loads(row["payload"])
        retries, backoff, max_backoff = PING_RETRIES, PING_BACKOFF_S, 3600.0
        try:
            if row["channel"] == PING_CHANNEL:
                await self._send_ping(payload, client)
            else:
                channel = self.config.alerts.channels.get(row["channel"])
                if channel is None:
                    raise DeliveryError(f"channel {row['channel']!r} is no longer configured")
                retries, backoff, max_backoff = (
                    channel.retries,
                    channel.backoff,
                    channel.max_backoff,
                )
                await deliver(
                    channel,
                    payload,
                    f"{payload['id']}-{row['channel']}",
                    client,
                    self.withheld_env,
                )
        except (DeliveryError, OSError) as exc:
            self._failed(row, str(exc), retries, backoff, max_backoff)
            return
        with self.store.tx():
            self.store.conn.execute(
                "UPDATE outbox SET status='delivered', attempts=attempts+1, delivered_at=?,"
                " last_error=NULL WHERE id=?",
                (to_iso(self.clock.now()), row["id"]),
            )
        log.info("alert delivered outbox=%d channel=%s", row["id"], row["channel"])

    def _failed(
        self, row: Row, error: str, retries: int, backoff: float, max_backoff: float
    ) -> None:
        attempts = row["attempts"] + 1
        now = self.clock.now()
        give_up = attempts > retries
        delay = min(max_backoff, backoff * 2 ** (attempts - 1))
        with self.store.tx():
            self.store.conn.execute(
                "UPDATE outbox SET status=?, attempts=?, last_error=?, next_attempt_at=?"
                " WHERE id=?",
                (
                    "failed" if give_up else "pending",
                    attempts,
                    error[:500],
                    to_iso(now + timedelta(seconds=delay)),
                    row["id"],
                ),
            )
        level = logging.ERROR if give_up else logging.WARNING
        log.log(
            level,
            "alert delivery failed outbox=%d channel=%s attempt=%d %s: %s",
            row["id"],
            row["channel"],
            attempts,
            "giving up" if give_up else f"retry in {delay:g}s",
            error,
        )

    async def _send_ping(self, payload: Row, client: httpx.AsyncClient) -> None:
        import httpx  # on first use: a daemon that sends no HTTP never loads it

        task = self.config.tasks.get(payload["task"])
        if task is None or task.ping is None:
            return  # the ping was removed from the config: nothing to send
        url = task.ping.target(payload["phase"], payload.get("exit_code"))
        if url is None:
            return
        try:
            resp = await client.post(url, json=payload, timeout=task.ping.timeout)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"ping: {type(exc).__name__}") from None
        if not resp.is_success:
            raise DeliveryError(f"ping answered HTTP {resp.status_code}")


def _owes_recovery(event: Row) -> bool:
    """An automatic pause: the task's next success sends a recovery notice."""
    return bool(
        event["kind"] == EventKind.PAUSE
        and event["task_id"]
        and event["data"].get("by") == "agentd"
    )
