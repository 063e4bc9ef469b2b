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

It also keeps the small state alerts need (``Store.alert_state``): when dead-man
monitoring of a task began, which deadline was reported, which runs were reported too
long, which tasks are late or auto-paused and owe a recovery notice at their next success.

What an event turns into, the cooldown, the backoff and when to give up are decided here;
the rows are the engine's (``agentd.state.sqlite.alerts``), reached through the port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from agentd.alerts import (
    Alert,
    DeliveryError,
    alert_for_event,
    completion_alert,
    deadman_late,
    deliver,
    repeat_routes,
    routes,
)
from agentd.clock import Clock, from_iso, to_iso
from agentd.config import Config, inactive_reason
from agentd.models import ALERT_EVENTS, ALERTS_CURSOR, EventKind, Row, StateRefused
from agentd.state.port import NewAlert, OutboxRecord, RunningAttempt, Store, TaskRecord, atomically

log = logging.getLogger("agentd.alerts")

PING_CHANNEL = "ping"
PING_RETRIES = 3
PING_BACKOFF_S = 10.0
BATCH = 500

if TYPE_CHECKING:
    import httpx
# A run's start and success are two of its few audit events, and they matter only to a
# task with a ``ping`` or (success) one that owes a recovery notice: when neither exists
# they are not read (that would be two state lookups per success, on the loop).
_RUN_KINDS = frozenset({EventKind.START, EventKind.SUCCESS})
_KINDS: dict[str, frozenset[str]] = {
    "all": ALERT_EVENTS,
    "success": ALERT_EVENTS - {"start"},
    "base": ALERT_EVENTS - _RUN_KINDS,
}
_NOTIFY_KINDS = frozenset(
    {EventKind.SUCCESS, EventKind.FAILURE, EventKind.TIMEOUT, EventKind.QUARANTINE}
)
DEADMAN = "deadman:"
"""Alert state of a task its dead man's switch reported late: ``deadman:<task>``."""
FAILING = "failing:"
"""Alert state of a task whose run was quarantined, kept only while a rule repeats
``run_quarantined`` (``repeat_every``): ``failing:<task>`` = the quarantine's time,
cleared by the task's next success."""
TOO_LONG = "too_long:"
"""Prefix of the alert state of a run reported too long: ``too_long:<run id>:<attempt>``."""


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
        self._repeats_for: Config | None = None
        self._any_repeat = False
        self._any_ping = False
        self._notify_success = False
        self._repeat_failing = False
        self._instance: str | None = None
        self.on_attempt: Callable[[str, str], None] | None = None
        """Told each delivery attempt's channel and outcome (``delivered``, ``retry``,
        ``failed``): the ``agentd_alert_deliveries_total`` counter."""
        """The state's instance id, read on the first delivery: it changes only by a
        restore, which the daemon is stopped for."""

    # ------------------------------------------------------------ events -> outbox

    def process(self, now: datetime) -> int:
        """Turn new events into alerts and outbox rows; returns how many events were read."""
        # The usual answer, "nothing new", without a write transaction.
        cursor, top = self._cursor_and_top()
        if cursor is not None and top <= cursor:
            return 0
        with atomically(self.store):
            cursor, top = self._cursor_and_top()
            if cursor is None:
                # First start with alerts: history before now is not news.
                self.store.move_event_cursor(ALERTS_CURSOR, top)
                return 0
            # Only the kinds that can raise an alert, ping or recover are read and
            # decoded (claims, heartbeats and fires are most of the log). No other
            # writer runs inside this transaction, so every event up to ``top`` is
            # committed and the cursor may jump there when the batch was not full.
            if top <= cursor:
                return 0
            kinds = self._kinds()
            events = self.store.events_of_kinds(cursor, top, _KINDS[kinds], BATCH)
            for read, event in enumerate(events, 1):
                self._on_event(event, now)
                if kinds == "base" and _owes_recovery(event):
                    # Successes after this one now matter and were not read: the next
                    # pass reads on from here with them.
                    self.store.move_event_cursor(ALERTS_CURSOR, event["id"])
                    return read
            last = events[-1]["id"] if len(events) == BATCH else top
            self.store.move_event_cursor(ALERTS_CURSOR, last)
            return len(events)

    def _kinds(self) -> str:
        """Which event kinds this pass reads (a key of ``_KINDS``)."""
        if self._pinged_for is not self.config:
            self._pinged_for = self.config
            self._any_ping = any(t.ping for t in self.config.tasks.values())
            self._notify_success = any(
                t.notify and "success" in t.notify.on for t in self.config.tasks.values()
            )
            self._repeat_failing = any(
                r.repeat_every is not None and ("*" in r.events or "run_quarantined" in r.events)
                for r in self.config.alerts.rules
            )
        if self._any_ping:
            return "all"
        if self._notify_success:
            return "success"
        owed = self.store.has_alert_state("deadman:", "paused:", FAILING)
        return "success" if owed else "base"

    def _cursor_and_top(self) -> tuple[int | None, int]:
        """The last event read (None before the first pass) and the newest event id."""
        return self.store.event_cursor(ALERTS_CURSOR), self.store.latest_event_id()

    def _on_event(self, event: Row, now: datetime) -> None:
        """A success clears a task's ``deadman:`` and ``paused:`` state (see ``_kinds``:
        what sets either must be known there too)."""
        kind, task_id = event["kind"], event["task_id"]
        if kind == EventKind.SUCCESS and task_id:
            for what in ("deadman", "paused"):
                since = self.store.alert_state(f"{what}:{task_id}")
                if since is not None:
                    self.store.clear_alert_state(f"{what}:{task_id}")
                    self.store.emit(
                        now, EventKind.RECOVERED, task_id, event["run_id"], what=what, since=since
                    )
            if self.store.alert_state(f"{FAILING}{task_id}") is not None:
                self.store.clear_alert_state(f"{FAILING}{task_id}")
                log.info("task %s no longer failing: run %s succeeded", task_id, event["run_id"])
        elif _owes_recovery(event):
            self.store.set_alert_state(f"paused:{task_id}", event["ts"], now)
        elif (
            kind == EventKind.QUARANTINE
            and task_id
            and self._repeat_failing
            and self.store.alert_state(f"{FAILING}{task_id}") is None
        ):
            self.store.set_alert_state(f"{FAILING}{task_id}", event["ts"], now)
        self._ping(event, now)
        alert = alert_for_event(event)
        if alert is not None:
            self.raise_alert(alert, now, event["id"])
        self._notify(event, now)

    def _notify(self, event: Row, now: datetime) -> None:
        """A completion notice for a task with ``notify`` (``alerts.completion_alert``):
        one read of the run and one of its spend, only when it will raise one."""
        task = self.config.tasks.get(event["task_id"] or "")
        if task is None or task.notify is None or not event["run_id"]:
            return
        if event["kind"] not in _NOTIFY_KINDS:
            return
        try:
            run: Mapping[str, object] = self.store.get_run(event["run_id"])
        except StateRefused:
            run = {}  # pruned already: the event alone says enough
        cost = self.store.run_usage(event["run_id"])["cost_usd"]
        alert = completion_alert(event, task.notify.on, run, round(cost, 6) if cost else None)
        if alert is not None:
            self.raise_alert(alert, now, event["id"])

    def raise_alert(
        self,
        alert: Alert,
        now: datetime,
        event_id: int | None = None,
        channels: Mapping[str, float] | None = None,
    ) -> int:
        """Record the alert and queue it for every channel its rules name that did not
        get the same dedup key within its cooldown, in one unit of work (the caller's,
        when one is open). ``channels`` (name -> cooldown) replaces the rules' routes: a
        repeat goes only where a rule asked for repeats.
        Its summary and data are scrubbed of secret values like every stored text."""
        scrub = self.store.redactor
        if scrub:
            alert = dataclasses.replace(
                alert, summary=scrub.text(alert.summary), data=scrub.value(alert.data)
            )
        with atomically(self.store):  # the alert and its deliveries, or neither
            alert_id = self.store.record_alert(
                now,
                NewAlert(
                    alert.kind,
                    alert.key,
                    alert.task_id,
                    alert.run_id,
                    event_id,
                    alert.summary,
                    alert.data,
                ),
            )
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
            targets = routes(alert, self.config) if channels is None else channels
            for channel, cooldown in targets.items():
                if self.store.queued_since(channel, alert.key, now - timedelta(seconds=cooldown)):
                    log.info("alert id=%d not sent to %s: in cooldown", alert_id, channel)
                    continue
                self.store.enqueue_delivery(now, channel, alert.key, payload, alert_id)
        return alert_id

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
        self.store.enqueue_delivery(now, PING_CHANNEL, key, payload, None)

    # ------------------------------------------------------------ repeats

    def repeats_configured(self) -> bool:
        """Whether any rule has ``repeat_every`` (once per config)."""
        if self._repeats_for is not self.config:
            self._repeats_for = self.config
            self._any_repeat = any(r.repeat_every is not None for r in self.config.alerts.rules)
        return self._any_repeat

    def repeat(self, now: datetime) -> int:
        """Send again the alerts of lasting conditions a rule repeats (``repeat_every``):
        a task its dead man's switch reported late (``deadman:<task>``) or whose run was
        quarantined (``failing:<task>``), until its next success clears that state.
        A channel gets the repeat once the condition began ``repeat_every`` ago and no
        delivery of its dedup key was queued to it within that time, so the first repeat
        comes that long after the original alert, and the next ones as often. A task
        paused by an operator, inactive or gone is not repeated. Returns how many alerts
        were raised."""
        if not self.repeats_configured():
            return 0
        store = self.store
        lasting: list[tuple[str, str, str]] = []  # (alert kind, task, state key)
        for prefix, kind in ((DEADMAN, "deadman"), (FAILING, "run_quarantined")):
            for key in store.alert_state_keys(prefix):
                lasting.append((kind, key[len(prefix) :], key))
        if not lasting:
            return 0
        raised = 0
        rows = {r["id"]: r for r in store.task_rows(sorted({t for _, t, _ in lasting}))}
        for kind, task_id, state_key in lasting:
            task = self.config.tasks.get(task_id)
            row = rows.get(task_id)
            if task is None or row is None or inactive_reason(task):
                continue
            if row["paused"] and store.alert_state(f"paused:{task_id}") is None:
                continue  # an operator's pause: their decision, not a silent failure
            since = store.alert_state(state_key)
            began = from_iso(since) if since else now
            targets = repeat_routes(kind, task_id, self.config)
            key = f"{kind}:{task_id}"
            due = {
                ch: every
                for ch, every in targets.items()
                if (now - began).total_seconds() >= every  # the original goes first
                and not store.queued_since(ch, key, now - timedelta(seconds=every))
            }
            if not due:
                continue
            what = "late" if kind == "deadman" else "failing"
            since_what = "its deadline" if kind == "deadman" else "a quarantine"
            summary = f"{task_id}: still {what} since {since_what} at {since}, no success since"
            data = {"repeat": True, "since": since, "last_success": row["last_success_at"]}
            self.raise_alert(Alert(kind, key, summary, task_id, None, data), now, None, due)
            raised += 1
        return raised

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

    def check(
        self, now: datetime, task_rows: Mapping[str, TaskRecord], running: Sequence[RunningAttempt]
    ) -> None:
        """Dead man's switch and run-too-long: raise each condition once, as events.

        Runs every second: with nothing watched, nothing running and no report to clear
        it returns without a transaction."""
        watched = self.watched()
        timed = [r for r in running if self._max_duration(r) is not None]
        if not watched and not timed and not self._has_too_long_state():
            return
        store = self.store
        with atomically(store):
            for task_id in watched:
                task = self.config.tasks[task_id]
                assert task.expect is not None
                since_text = store.alert_state(f"deadman_since:{task_id}")
                if since_text is None:
                    store.set_alert_state(f"deadman_since:{task_id}", to_iso(now), now)
                    continue
                row = task_rows.get(task_id)
                if (row is not None and row["paused"]) or inactive_reason(task):
                    continue  # a paused task is an operator's decision, not a silent failure
                success_at = row["last_success_at"] if row is not None else None
                last = from_iso(success_at) if success_at else None
                late = deadman_late(last, from_iso(since_text), task.expect, now)
                if late is None:
                    continue
                if store.alert_state(f"deadman_deadline:{task_id}") == to_iso(late):
                    continue  # this deadline was reported already
                store.set_alert_state(f"deadman_deadline:{task_id}", to_iso(late), now)
                store.set_alert_state(f"deadman:{task_id}", to_iso(late), now)
                store.emit(
                    now,
                    EventKind.DEADMAN,
                    task_id,
                    deadline=to_iso(late),
                    last_success=success_at,
                    every_s=task.expect.every,
                    grace_s=task.expect.grace,
                )
            for run in timed:
                owner = self.config.tasks[run["task_id"]]
                assert owner.max_duration is not None
                started = run["attempt_started"]
                if not started:
                    continue
                elapsed = (now - from_iso(started)).total_seconds()
                key = f"{TOO_LONG}{run['id']}:{run['attempt']}"
                if elapsed <= owner.max_duration or store.alert_state(key) is not None:
                    continue
                store.set_alert_state(key, to_iso(now), now)
                self._too_long_may_exist = True
                store.emit(
                    now,
                    EventKind.RUN_TOO_LONG,
                    run["task_id"],
                    run["id"],
                    attempt=run["attempt"],
                    running_s=round(elapsed, 1),
                    max_duration_s=owner.max_duration,
                )
            # Reports about runs that ended are no longer needed.
            reports = store.alert_state_keys(TOO_LONG)
            if reports:
                live = {r["id"] for r in store.running_attempts()}
                for key in reports:
                    if key[len(TOO_LONG) :].rpartition(":")[0] not in live:
                        store.clear_alert_state(key)

    def _max_duration(self, run: RunningAttempt) -> float | None:
        owner = self.config.tasks.get(run["task_id"])
        return owner.max_duration if owner else None

    def _has_too_long_state(self) -> bool:
        return self.store.has_alert_state(TOO_LONG)

    def running_attempts(self) -> list[RunningAttempt]:
        return self.store.running_attempts()

    # ------------------------------------------------------------ delivery

    def due(self, now: datetime, limit: int = 20) -> list[OutboxRecord]:
        return self.store.pending_deliveries(now, limit)

    def next_due(self) -> datetime | None:
        return self.store.next_delivery_at()

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        rows = self.due(self.clock.now())
        if rows:
            await asyncio.gather(*(self._deliver_one(row, client) for row in rows))
        return len(rows)

    def delivery_id(self, row: OutboxRecord) -> str:
        """``X-Agentd-Delivery``: ``<instance id>-<alert id>-<channel>``. The same for
        every attempt of one delivery (a receiver drops a repeat by it), and never the
        same for two deliveries, also across databases: alert ids begin at 1 again in a
        recreated state DB, and where a restored one left off, so the database's
        instance id (``Store.instance_id``, new in a restored copy) tells them apart.
        (A delivery pending in a backup is sent again after its restore under the new
        id: a receiver may see it twice, which is better than never seeing a new one.)"""
        if self._instance is None:
            self._instance = self.store.instance_id()
        return f"{self._instance}-{row['payload']['id']}-{row['channel']}"

    async def _deliver_one(self, row: OutboxRecord, client: httpx.AsyncClient) -> None:
        payload = row["payload"]
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
                await deliver(channel, payload, self.delivery_id(row), client, self.withheld_env)
        except (DeliveryError, OSError) as exc:
            self._failed(row, str(exc), retries, backoff, max_backoff)
            return
        if self.store.mark_delivered(row["id"], self.clock.now()):
            log.info("alert delivered outbox=%d channel=%s", row["id"], row["channel"])
            if self.on_attempt:
                self.on_attempt(row["channel"], "delivered")

    def _failed(
        self, row: OutboxRecord, error: str, retries: int, backoff: float, max_backoff: float
    ) -> None:
        attempts = row["attempts"] + 1
        delay = retry_delay(attempts, retries=retries, backoff=backoff, max_backoff=max_backoff)
        give_up = delay is None
        if delay is None:
            self.store.give_up_delivery(row["id"], attempts, error[:500])
        else:
            at = self.clock.now() + timedelta(seconds=delay)
            self.store.schedule_redelivery(row["id"], attempts, error[:500], at)
        if self.on_attempt:
            self.on_attempt(row["channel"], "failed" if give_up else "retry")
        level = logging.ERROR if give_up else logging.WARNING
        log.log(
            level,
            "alert delivery failed outbox=%d channel=%s attempt=%d %s: %s",
            row["id"],
            row["channel"],
            attempts,
            "giving up" if delay is None else f"retry in {delay:g}s",
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


def retry_delay(attempts: int, *, retries: int, backoff: float, max_backoff: float) -> float | None:
    """The retry policy: how long after its ``attempts``-th failed attempt a delivery is
    tried again (``backoff``, then twice the wait before, at most ``max_backoff``), or
    None once the first attempt and its ``retries`` retries have all failed: give up."""
    if attempts > retries:
        return None
    return min(max_backoff, backoff * 2.0 ** (attempts - 1))


def _owes_recovery(event: Row) -> bool:
    """An automatic pause: the task's next success sends a recovery notice."""
    return bool(
        event["kind"] == EventKind.PAUSE
        and event["task_id"]
        and event["data"].get("by") == "agentd"
    )
