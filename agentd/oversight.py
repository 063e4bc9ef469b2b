"""The daemon's oversight of unattended work: events turned into alerts, dead man's
switches and runs that run too long, budget alarms and spend gauges, alert delivery,
and the budget admission of scheduled fires (``budget_gate``, which the daemon hands to
the state as its ``fire_gate``). LLM calls are the ``providers.Gateway``'s.

Built in ``startup()`` once the state DB is open; the daemon calls ``tick(now)`` from
its main loop, ``on_event`` from its event sink, ``set_config``/``reload_failed`` from
``reload()`` and ``aclose()`` at shutdown. Everything else lives in ``budget``,
``ledger``, ``providers``, ``alerts`` and ``outbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from agentd import tls
from agentd.budget import Scope, burn_alarm, exhaustion_eta, global_scopes, task_scopes
from agentd.clock import Clock, to_iso
from agentd.config import Config, TaskConfig, inactive_reason
from agentd.ledger import charge_stale, fire_verdict, window_blocked, window_report
from agentd.metrics import Metrics
from agentd.models import ALERT_EVENTS, EventKind, Row
from agentd.outbox import Outbox
from agentd.state.port import Fire, Store, atomically

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("agentd.oversight")

CHECK_EVERY_S = 1.0
PROCESS_EVERY_S = 0.2  # events -> alerts in batches: at most this late, not once per run
GAUGES_EVERY_S = 5.0
DELIVERY_IDLE_S = 60.0
PING_NOTE_EVERY_S = 300.0
"""A failing heartbeat ping is logged at most this often (with a count)."""
DEADMAN_LATE = "deadman:"
"""Alert state of a task its dead man's switch reported late (cleared by its next
success, ``agentd.outbox``)."""


class Oversight:
    def __init__(self, store: Store, config: Config, clock: Clock, metrics: Metrics) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.outbox = Outbox(store, config, clock)
        charged = charge_stale(store, clock.now())
        if charged:
            log.warning("%d LLM call(s) in flight at the last stop charged at worst case", charged)
        self._last_check = self._last_gauges = self._last_process = -1e9
        self._dirty = True
        self._seen_version: tuple[int, int] | None = None
        self._deliver_wake = asyncio.Event()
        self._delivery: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._budgeted_for: Config | None = None
        self._budgeted_tasks: list[TaskConfig] = []
        self._graced_for: Config | None = None
        self._min_grace_s = 0.0
        self._outbox_version: tuple[int, int] | None = None
        self.outbox.on_attempt = metrics.delivery_attempt
        self._heartbeat: asyncio.Task[None] | None = None
        self.live: Callable[[], bool] = lambda: True
        """Whether the daemon is healthy as ``/healthz`` means it: the heartbeat ping is
        sent only then (set by the daemon to its ``Health.liveness``)."""
        self._ping_failures = 0
        self._ping_noted = -1e9
        self._ping_silent = False
        self._burnt: set[tuple[str, datetime]] = set()
        """Windows (scope key, start) whose burn-rate alarm is recorded: not asked again."""
        self._window_spend: list[tuple[Scope, float]] = []
        """The windows ``budget_windows`` read last, with their spend."""

    def set_config(self, config: Config) -> None:
        self.config = config
        self.outbox.config = config
        self._last_gauges = -1e9

    def budget_gate(self, task_id: str, now: datetime) -> Row | None:
        """Why a scheduled fire of ``task_id`` is skipped now (a budget window full), or
        None: asked by the state inside the fire's transaction."""
        return window_blocked(self.store, self.config, task_id, now)

    def admission_gate(self, fire: Fire, now: datetime, ahead: int) -> Row | None:
        """Cost-aware admission of a scheduled fire (``ledger.fire_verdict``), asked by
        the state inside the fire's transaction (the daemon hands it in as the store's
        ``fire_admission``); one log line per verdict. None for a task without
        ``admission`` (one dict lookup)."""
        task = self.config.tasks.get(fire.task_id)
        if task is None or task.admission is None:
            return None
        verdict = fire_verdict(self.store, self.config, fire, now, ahead)
        if verdict is not None:
            log.info(
                "admission task=%s decision=%s scheduled_for=%s predicted_usd=%s scope=%s"
                " remaining_usd=%s not_before=%s: %s",
                fire.task_id,
                verdict["decision"],
                to_iso(fire.scheduled_for) if fire.scheduled_for else "-",
                verdict["predicted_usd"],
                verdict["scope"] or "-",
                verdict["remaining_usd"],
                verdict.get("not_before", "-"),
                verdict["detail"],
            )
        return verdict

    # ------------------------------------------------------------ the loop's hooks

    def on_event(self, event: Row) -> None:
        """Called after each commit; only notes that the outbox has work (no DB here)."""
        if event.get("kind") in ALERT_EVENTS:
            self._dirty = True

    def tick(self, now: datetime) -> None:
        """One cheap step of the main loop: new events to alerts, periodic checks, gauges."""
        mono = self.clock.monotonic()
        if self._delivery is None:
            self._delivery = asyncio.get_running_loop().create_task(
                self._deliver_loop(), name="agentd-alerts"
            )
        if self._heartbeat is None and self.config.daemon.heartbeat is not None:
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(), name="agentd-heartbeat"
            )
        if mono - self._last_check >= CHECK_EVERY_S:
            self._last_check = mono
            if self.outbox.needs_check():
                watched = self.outbox.watched()
                tasks = {r["id"]: r for r in self.store.task_rows(watched)} if watched else {}
                self.outbox.check(now, tasks, self.outbox.running_attempts())
            if self.outbox.repeat(now):
                self._deliver_wake.set()
            version = self.store.version()
            if version != self._seen_version:  # also events written by the CLI
                self._seen_version = version
                self._dirty = True
        if self._dirty and mono - self._last_process >= PROCESS_EVERY_S:
            self._last_process = mono
            self._dirty = False
            while self.outbox.process(now):
                pass
            due = self.outbox.next_due()
            if due is not None and due <= now:
                self._deliver_wake.set()
        if mono - self._last_gauges >= GAUGES_EVERY_S:
            self._last_gauges = mono
            self.metrics.set_budget_remaining(*self.budget_windows(now))
            self.budget_burn(now, self._window_spend)
            version = self.store.version()
            if version != self._outbox_version:  # every outbox change is a write
                self._outbox_version = version
                self.metrics.set_outbox(self.store.delivery_counts())

    def wait_s(self) -> float | None:
        """How soon ``tick`` has work, so an idle main loop sleeps no longer: the next
        events -> alerts batch while events wait for it, the per-second check while a
        dead man's switch or a run-too-long limit is watched. None when nothing here needs
        the loop before its idle poll (the budget gauges can wait for that)."""
        mono = self.clock.monotonic()
        waits: list[float] = []
        if self._dirty:
            waits.append(self._last_process + PROCESS_EVERY_S - mono)
        if self.outbox.needs_check() or self.outbox.repeats_configured():
            waits.append(self._last_check + CHECK_EVERY_S - mono)
        return max(0.0, min(waits)) if waits else None

    def reload_failed(self, error: str) -> None:
        with atomically(self.store):
            self.store.emit(self.clock.now(), EventKind.CONFIG_RELOAD_FAILED, error=error[-4000:])
        self._dirty = True

    async def aclose(self) -> None:
        for job in (self._delivery, self._heartbeat):
            if job is not None:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        if self._http is not None:
            await self._http.aclose()

    # ------------------------------------------------------------ delivery

    async def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # Made on first use, the slow parts off the loop (see agentd.tls): a daemon
            # with no alert or heartbeat to send never pays them.
            await tls.prepare()
            import httpx

            self._http = httpx.AsyncClient(follow_redirects=False, verify=tls.context())
        return self._http

    # ------------------------------------------------------------ heartbeat ping

    async def _heartbeat_loop(self) -> None:
        """Ping ``daemon.heartbeat.url`` every ``every`` while ``live()``; ends when a
        reload removes the heartbeat (the next tick starts it again if one comes back)."""
        try:
            while (hb := self.config.daemon.heartbeat) is not None:
                live = self.live()
                if live == self._ping_silent:  # a change: one line each way
                    self._ping_silent = not live
                    log.warning(
                        "heartbeat %s url=%s",
                        "resumed: the daemon is live again" if live else "paused: not live",
                        hb_url(hb.url),
                    )
                if live:
                    await self.ping_once()
                await asyncio.sleep(hb.every)
        finally:
            self._heartbeat = None

    async def ping_once(self) -> bool:
        """One heartbeat ping; never raises (but for cancellation). A failure is logged
        at once the first time, then at most every ``PING_NOTE_EVERY_S`` with how many
        failed since; the first success after failures says so."""
        hb = self.config.daemon.heartbeat
        if hb is None:
            return False
        error: str | None = None
        try:
            import httpx

            client = await self._client()
            try:
                resp = await client.request(hb.method, hb.url, timeout=hb.timeout)
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            else:
                if not resp.is_success:
                    error = f"HTTP {resp.status_code}"
        except Exception as exc:  # never fatal
            error = type(exc).__name__
        mono = self.clock.monotonic()
        if error is None:
            if self._ping_failures:
                log.warning(
                    "heartbeat ping ok again url=%s after %d failure(s)",
                    hb_url(hb.url),
                    self._ping_failures,
                )
            self._ping_failures = 0
            self._ping_noted = -1e9
            return True
        self._ping_failures += 1
        if mono - self._ping_noted >= PING_NOTE_EVERY_S:
            self._ping_noted = mono
            log.warning(
                "heartbeat ping failed url=%s: %s (%d failure(s) in a row)",
                hb_url(hb.url),
                error,
                self._ping_failures,
            )
        return False

    async def _deliver_loop(self) -> None:
        while True:
            try:
                due = self.outbox.next_due()
                if due is not None and due <= self.clock.now():
                    await self.outbox.deliver_due(await self._client())
            except Exception:  # a DB hiccup must not end delivery for good
                log.exception("alert delivery pass failed; trying again")
            self._deliver_wake.clear()
            due = self.outbox.next_due()
            # New work sets the wake event (tick, after turning events into outbox
            # rows); the cap only bounds a wake-up this loop could have missed.
            wait = DELIVERY_IDLE_S
            if due is not None:
                wait = min(wait, max(0.05, (due - self.clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deliver_wake.wait(), wait)

    # ------------------------------------------------------------ overdue tasks

    def min_misfire_grace(self) -> timedelta:
        """The shortest ``misfire_grace`` of the config's tasks: jobs due from before
        ``now`` minus this are the only candidates for overdue (once per config)."""
        if self._graced_for is not self.config:
            self._graced_for = self.config
            graces = [t.misfire_grace for t in self.config.tasks.values()]
            self._min_grace_s = min(graces, default=0.0)
        return timedelta(seconds=self._min_grace_s)

    def overdue_tasks(
        self, now: datetime, due_jobs: Mapping[str, datetime], paused: Collection[str]
    ) -> set[str]:
        """What ``agentd_task_overdue`` shows as 1: the tasks whose dead man's switch
        reported them late and that have not succeeded since, and those whose job
        (``due_jobs``: the scheduler's jobs due from before ``now`` minus
        ``min_misfire_grace``) is past by more than the task's own ``misfire_grace``.
        A paused or inactive task is never overdue: that is an operator's decision or
        the config's, and the dead man's switch does not watch it either. One indexed
        read of the alert state."""
        late = {key[len(DEADMAN_LATE) :] for key in self.store.alert_state_keys(DEADMAN_LATE)}
        for task_id, when in due_jobs.items():
            task = self.config.tasks.get(task_id)
            if task is not None and (now - when).total_seconds() > task.misfire_grace:
                late.add(task_id)
        return {
            t
            for t in late
            if t in self.config.tasks
            and t not in paused
            and not inactive_reason(self.config.tasks[t])
        }

    # ------------------------------------------------------------ budgets

    def _budgeted(self) -> list[TaskConfig]:
        """Tasks with a day or month USD limit; computed once per config, as this runs
        every few seconds and most of 10,000 tasks have none."""
        if self._budgeted_for is not self.config:
            self._budgeted_for = self.config
            self._budgeted_tasks = [
                t
                for t in self.config.tasks.values()
                if t.budget.task.usd_per_day is not None or t.budget.task.usd_per_month is not None
            ]
        return self._budgeted_tasks

    def budget_windows(self, now: datetime) -> tuple[dict[str, float], dict[str, float]]:
        """USD remaining and the limit of each configured window at ``now``, by scope
        label (``global:day``, ``<task>:month``), for the budget gauges."""
        remaining: dict[str, float] = {}
        limits: dict[str, float] = {}
        spend: list[tuple[Scope, float]] = []
        for scope in self._windows(now):
            report = window_report(self.store, scope)
            remaining[scope.label] = float(report["remaining_usd"] or 0.0)
            if report["limit_usd"] is not None:
                limits[scope.label] = float(report["limit_usd"])
            spend.append((scope, float(report["spent_usd"])))
        self._window_spend = spend
        return remaining, limits

    def _windows(self, now: datetime) -> list[Scope]:
        scopes = global_scopes(self.config, now)
        for task in self._budgeted():
            scopes += task_scopes(self.config, task, now)
        return scopes

    def budget_burn(
        self, now: datetime, spend: list[tuple[Scope, float]] | None = None
    ) -> dict[str, float]:
        """Burn-rate alarms: each configured window's projected exhaustion at its average
        rate so far (``budget.exhaustion_eta``), in seconds from ``now`` by scope label,
        for ``agentd_budget_exhaustion_eta_seconds`` (a window not projected to run out
        before its end is absent); a window that ``budget.burn_alarm`` says will run out
        well before its end records a ``budget_burn`` alarm, once per window (across
        restarts: ``Store.record_budget_burn``; in this process, not even asked again)."""
        etas: dict[str, float] = {}
        if spend is None:
            spend = [(s, float(self.store.spend_in(s)["usd"])) for s in self._windows(now)]
        self._burnt &= {(scope.key, scope.start) for scope, _ in spend if scope.start}
        for scope, usd in spend:
            assert scope.start is not None and scope.end is not None and scope.usd is not None
            eta = exhaustion_eta(usd, scope.start, scope.end, now, scope.usd)
            if eta is not None:
                etas[scope.label] = max(0.0, (eta - now).total_seconds())
            window = (scope.key, scope.start)
            alarm = burn_alarm(usd, scope.start, scope.end, now, scope.usd)
            if alarm is None or window in self._burnt:
                continue
            hours = (now - scope.start).total_seconds() / 3600
            rate = usd / hours if hours > 0 else 0.0
            with atomically(self.store):
                recorded = self.store.record_budget_burn(now, scope, usd, alarm, rate)
            self._burnt.add(window)  # only once written: a failed write is tried again
            if recorded:
                log.warning(
                    "budget burn scope=%s spent_usd=%.6f limit_usd=%g usd_per_hour=%.6f"
                    " projected_exhaustion=%s window_end=%s",
                    scope.label,
                    usd,
                    scope.usd,
                    rate,
                    to_iso(alarm),
                    to_iso(scope.end),
                )
                self._dirty = True
        self.metrics.set_budget_eta(etas)
        return etas


def hb_url(url: str) -> str:
    """A heartbeat URL fit for a log: scheme and host only. The path of a check URL
    (``https://hc-ping.com/<uuid>``) is its secret, and so may be the query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"
