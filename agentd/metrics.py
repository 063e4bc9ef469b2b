"""Prometheus metrics, fed by the store's audit events and the main loop's state snapshot.

Scrapes never touch SQLite: a slow or stuck DB must not make ``/metrics`` hang, and a
scraper hammering the endpoint must not compete with the scheduler for the write lock.
Counters move on committed events (``Store.event_sink``); gauges about current state are
pushed by the daemon's main loop about once a second via ``set_state``.

Label sets are bounded on purpose: ``task`` (from the config) and a fixed outcome or
reason. Run ids and error text never become labels; they live in the event log. A
task's series appear on its first activity, not at config load, so that a config of
10,000 rarely-firing tasks does not make every scrape 10,000 x 60 samples long.
Everything is registered on our own ``CollectorRegistry`` so that tests, embedders and
a second daemon in one process never collide on the global ``REGISTRY``.

A task's next fire time is the scheduler's (its jobstore), read by the daemon only for
the tasks in ``stale_next_fires``: those that just got series and those that fired,
skipped or misfired since the last read (or all, after a reload). ``agentd_task_overdue``
is 1 for the tasks the daemon says are late (``set_overdue``); a task that becomes
overdue gets its series then, even with no activity before.
"""

from __future__ import annotations

import contextlib
import platform
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agentd.models import EventKind

# Event kind -> agentd_runs_total outcome. Finished attempts count once each (a run that
# fails twice then succeeds adds failure=2, success=1); a quarantine is counted in
# addition to the failure that caused it. "recover" (an attempt lost with its daemon and
# re-queued) is counted as interrupted: like an interrupt, it was not the task's fault.
# A run ended by its deadlines counts "expired" (never started within start_within) or
# "timed_out" (run_timeout), the latter beside the "timeout" of an attempt it stopped.
OUTCOMES = {
    EventKind.SUCCESS: "success",
    EventKind.FAILURE: "failure",
    EventKind.TIMEOUT: "timeout",
    EventKind.CANCEL: "cancelled",
    EventKind.INTERRUPT: "interrupted",
    EventKind.RECOVER: "interrupted",
    EventKind.SKIP: "skipped",
    EventKind.QUARANTINE: "quarantined",
    EventKind.BUDGET_EXHAUSTED: "budget_exhausted",
    EventKind.RUN_EXPIRED: "expired",
    EventKind.RUN_TIMED_OUT: "timed_out",
    EventKind.AWAITING_APPROVAL: "parked",
}
SKIP_REASONS = ("overlap", "queue_full", "paused", "budget", "admission")
# What retention prunes (agentd.state.retention), each an agentd_pruned_total series.
PRUNE_KINDS = (
    "runs",
    "attempts",
    "checkpoints",
    "events",
    "workspaces",
    "quarantine",
    "ledger",
    "budget_alarms",
    "alerts",
    "outbox",
)
# Events that move a task's job on to its next fire time (a fire makes a run, a skip or
# a misfire): its next fire time is read again.
FIRE_KINDS = frozenset({EventKind.ENQUEUE, EventKind.SKIP, EventKind.MISFIRE})
# What a delivery attempt ends as (agentd_alert_deliveries_total's outcome).
DELIVERY_OUTCOMES = ("delivered", "retry", "failed")
# The outbox rows agentd_outbox_deliveries counts (delivered ones are history).
OUTBOX_STATUSES = ("pending", "failed")
# Audit events about the config, not the task's activity: they bring no series.
CONFIG_KINDS = frozenset({EventKind.TASK_ADDED, EventKind.TASK_CHANGED, EventKind.TASK_REMOVED})

# Runs range from a quick HTTP call to an hour-long agent session.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Start lateness: milliseconds when healthy, minutes when the pool is saturated.
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)


def _unix(ts: str) -> float:
    """Store timestamps are fixed-width UTC ISO text ending in ``Z``."""
    return datetime.fromisoformat(ts).timestamp()


class TaskSeries:
    """One per-task metric family as plain numbers: ``{task: {other labels: value}}``.

    prometheus-client's labelled children carry a lock per value (per bucket, for a
    histogram): a task's first run created ~10 of them on the event loop, so a burst of
    tasks firing for the first time since start spent most of its claiming time there.
    Here a new series is a dict entry or a list. The caller (``Metrics``) holds its lock
    for every change and for ``family``."""

    def __init__(
        self,
        kind: str,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = (),
    ) -> None:
        self.kind, self.name, self.doc = kind, name, doc
        self.labels = ("task", *labels)
        self.buckets = buckets
        # As prometheus-client writes ``le`` (its floatToGoString for these bounds).
        self.les = [repr(float(b)) for b in buckets] + ["+Inf"]
        self.series: dict[str, dict[tuple[str, ...], Any]] = {}

    def inc(self, task: str, *labels: str, by: float = 1.0) -> None:
        mine = self.series.setdefault(task, {})
        mine[labels] = mine.get(labels, 0.0) + by

    def set(self, task: str, *labels: str, value: float) -> None:
        self.series.setdefault(task, {})[labels] = value

    def touch(self, task: str, *labels: str) -> None:
        """The series exists from now on, at 0 if new."""
        self.series.setdefault(task, {}).setdefault(labels, 0.0)

    def observe(self, task: str, value: float) -> None:
        """Histogram: a count per bucket (``le`` is the first bound >= value), then sum."""
        mine = self.series.setdefault(task, {})
        counts = mine.get(())
        if counts is None:
            counts = mine[()] = [0] * (len(self.buckets) + 1) + [0.0]
        counts[bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def drop(self, task: str) -> None:
        self.series.pop(task, None)

    def family(self) -> Metric:
        if self.kind == "counter":
            family: Metric = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        elif self.kind == "gauge":
            family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        else:
            family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for task, mine in self.series.items():
            for labels, value in mine.items():
                if self.kind != "histogram":
                    family.add_metric([task, *labels], value)  # type: ignore[attr-defined]
                    continue
                cumulative, running = [], 0
                for le, count in zip(self.les, value[:-1], strict=True):
                    running += count
                    cumulative.append((le, running))
                family.add_metric([task], cumulative, value[-1])  # type: ignore[attr-defined]
        return family


class _TaskCollector(Collector):
    """Exposes the per-task families; scrapes read them under ``Metrics``' lock."""

    def __init__(self, families: list[TaskSeries], lock: threading.Lock) -> None:
        self._families = families
        self._lock = lock

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = [f.family() for f in self._families]
        yield from families

    def describe(self) -> Iterator[Metric]:
        """Names only (``registry.restricted_registry`` for ``name[]`` filters)."""
        for f in self._families:
            yield TaskSeries(f.kind, f.name, f.doc, f.labels[1:], f.buckets).family()


class Metrics:
    """All of agentd's metrics, on one private registry."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._lock = threading.Lock()  # set_tasks vs on_event: no child re-created after removal
        self._tasks: set[str] = set()  # the config's tasks
        self._live: set[str] = set()  # ...of which these have series (see _ensure)
        self._running: dict[str, int] = {}  # last pushed by set_state
        self._paused: set[str] = set()
        self._overdue: set[str] = set()  # last pushed by set_overdue
        self._stale: set[str] = set()  # live tasks whose next fire time is to be read

        self.runs = TaskSeries("counter", "agentd_runs", "Run attempts by outcome", ("outcome",))
        self.duration = TaskSeries(
            "histogram",
            "agentd_run_duration_seconds",
            "Wall time of finished attempts",
            buckets=DURATION_BUCKETS,
        )
        self.lateness = TaskSeries(
            "histogram",
            "agentd_run_start_lateness_seconds",
            "Claim time minus scheduled time (early claims count as 0)",
            buckets=LATENESS_BUCKETS,
        )
        self.retries = TaskSeries("counter", "agentd_retries", "Attempts re-queued for retry")
        self.misfires = TaskSeries(
            "counter", "agentd_misfires", "Fires dropped by the catch-up policy"
        )
        self.skipped = TaskSeries(
            "counter", "agentd_skipped_fires", "Fires not enqueued, by reason", ("reason",)
        )
        self.last_run = TaskSeries(
            "gauge", "agentd_task_last_run_timestamp_seconds", "End of the last attempt"
        )
        self.last_success = TaskSeries(
            "gauge",
            "agentd_task_last_success_timestamp_seconds",
            "End of the last successful attempt",
        )
        self.running = TaskSeries("gauge", "agentd_runs_running", "Runs executing now")
        self.paused = TaskSeries("gauge", "agentd_task_paused", "1 if the task is paused")
        self.llm_tokens = TaskSeries(
            "counter",
            "agentd_llm_tokens",
            "LLM tokens charged to a task (worst case when the provider reported none)",
            ("direction",),
        )
        self.llm_cost = TaskSeries(
            "counter", "agentd_llm_cost_usd", "LLM spend in USD from the price table"
        )
        self.next_fire = TaskSeries(
            "gauge",
            "agentd_task_next_fire_timestamp_seconds",
            "When the scheduler fires the task next (a paused task's fires are skipped)",
        )
        self.overdue = TaskSeries(
            "gauge",
            "agentd_task_overdue",
            "1 while the task's dead man's switch says late, or its next fire is past"
            " by more than its misfire_grace (0 while paused)",
        )
        self._per_task = [
            self.runs,
            self.duration,
            self.lateness,
            self.retries,
            self.misfires,
            self.skipped,
            self.last_run,
            self.last_success,
            self.running,
            self.paused,
            self.llm_tokens,
            self.llm_cost,
            self.next_fire,
            self.overdue,
        ]
        r.register(_TaskCollector(self._per_task, self._lock))
        self.tasks_paused = Gauge("agentd_tasks_paused", "Number of paused tasks", registry=r)
        self.queue_depth = Gauge("agentd_queue_depth", "Runs waiting to be claimed", registry=r)
        self.quarantined = Gauge(
            "agentd_quarantined_runs", "Runs in quarantine awaiting an operator", registry=r
        )
        self.reload_ok = Gauge(
            "agentd_config_last_reload_successful", "1 if the last config load worked", registry=r
        )
        self.reload_ts = Gauge(
            "agentd_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully",
            registry=r,
        )
        self.watchdog = Counter(
            "agentd_watchdog_pings", "systemd watchdog keep-alives sent", registry=r
        )
        self.auth_failures = Counter(
            "agentd_http_auth_failures",
            "Requests refused for a missing or wrong token, by surface (api, console sign-in)",
            ["surface"],
            registry=r,
        )
        for surface in ("api", "console"):
            self.auth_failures.labels(surface)
        build = Gauge("agentd_build_info", "Always 1", ["version", "python"], registry=r)
        build.labels(version, platform.python_version()).set(1)
        self.llm_requests = Counter(
            "agentd_llm_requests",
            "LLM calls made, by provider and HTTP status (or timeout, connect_error...)",
            ["provider", "status"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "agentd_budget_remaining_usd",
            "USD left in the current window (global:day, <task>:month...)",
            ["scope"],
            registry=r,
        )
        self.budget_limit = Gauge(
            "agentd_budget_limit_usd",
            "The USD limit of the current window, by scope as agentd_budget_remaining_usd",
            ["scope"],
            registry=r,
        )
        self._budget_scopes: set[str] = set()
        self.budget_eta = Gauge(
            "agentd_budget_exhaustion_eta_seconds",
            "Seconds until the current window's USD limit runs out at its average rate so"
            " far, by scope as agentd_budget_remaining_usd (absent: not before its end)",
            ["scope"],
            registry=r,
        )
        self._eta_scopes: set[str] = set()
        self.pruned = Counter(
            "agentd_pruned",
            "History removed by retention: rows by table, and run workspaces",
            ["kind"],
            registry=r,
        )
        for kind in PRUNE_KINDS:
            self.pruned.labels(kind)
        self.outbox = Gauge(
            "agentd_outbox_deliveries",
            "Alert and ping deliveries pending (queued or between retries) or failed for"
            " good, by channel (failed rows stay until retention prunes them)",
            ["channel", "status"],
            registry=r,
        )
        self._outbox_series: set[tuple[str, str]] = set()
        self.deliveries = Counter(
            "agentd_alert_deliveries",
            "Delivery attempts of alerts and pings by channel and outcome (delivered,"
            " retry: failed and tried again later, failed: failed and given up)",
            ["channel", "outcome"],
            registry=r,
        )

        # The daemon builds this right after the config loaded at start.
        self.config_reload(True, time.time())

    def set_tasks(self, task_ids: Iterable[str]) -> None:
        """Which tasks may have series: those of the current config. Series of tasks the
        config no longer has are dropped; a removed and re-added task starts from zero."""
        new = set(task_ids)
        with self._lock:
            for task in self._live - new:
                self._drop(task)
            self._tasks = new
            self._live &= new
            self._running = {t: n for t, n in self._running.items() if t in new}
            self._paused &= new
            self._overdue &= new
            self._stale = set(self._live)  # a reload may have moved any schedule

    def _ensure(self, task: str) -> None:
        """On a task's first activity (any event, a seeded last-run time, a pause), put
        its success and failure counters at 0, so ``rate()`` and ratio alerts see its
        first outcome. Every other series of the task appears with its first count.

        Why not all series at config load: with 10,000 tasks, ~60 series each made a
        30 MiB, 4 s scrape and 200 MiB of RSS for tasks that may fire once a month; and
        creating 60 series on a task's first run was a sixth of a burst's CPU."""
        if task in self._live:
            return
        self._live.add(task)
        self._stale.add(task)
        self.runs.touch(task, "success")
        self.runs.touch(task, "failure")

    def _drop(self, task: str) -> None:
        """Remove whichever of the task's series exist."""
        for family in self._per_task:
            family.drop(task)

    def on_event(self, event: dict[str, Any]) -> None:
        """Count one committed store event. Events of tasks outside the current config are
        dropped: a late event from a removed task must not resurrect its series."""
        task, kind = event.get("task_id"), event.get("kind")
        data: dict[str, Any] = event.get("data") or {}
        with self._lock:
            if kind == EventKind.LLM_CALL and data.get("provider"):
                # Providers come from the config: a bounded label set, like tasks.
                self.llm_requests.labels(data["provider"], str(data.get("status"))).inc()
            if task is None or task not in self._tasks or kind in CONFIG_KINDS:
                return
            self._ensure(task)
            if kind in FIRE_KINDS:
                self._stale.add(task)
            if kind == EventKind.LLM_CALL:
                self.llm_cost.touch(task)  # both directions and the cost together
                self.llm_tokens.inc(task, "input", by=int(data.get("input_tokens") or 0))
                self.llm_tokens.inc(task, "output", by=int(data.get("output_tokens") or 0))
                self.llm_cost.inc(task, by=float(data.get("cost_usd") or 0.0))
                return
            if kind in OUTCOMES:
                self.runs.inc(task, OUTCOMES[kind])
            if kind == EventKind.SKIP:
                for reason in SKIP_REASONS:  # all reasons at 0 from the task's first skip
                    self.skipped.touch(task, reason)
                if data.get("reason") in SKIP_REASONS:  # anything else would be a new series
                    self.skipped.inc(task, data["reason"])
            elif kind == EventKind.MISFIRE:
                self.misfires.inc(task, by=int(data.get("count") or 0))
            elif kind == EventKind.RETRY:
                self.retries.inc(task)
            elif kind == EventKind.CLAIM and data.get("lateness_s") is not None:
                self.lateness.observe(task, max(0.0, float(data["lateness_s"])))
            elif kind in OUTCOMES and "duration_s" in data:
                # Only finished attempts carry duration_s; a queued run cancelled before it
                # started, or a startup recovery, did not run and has none.
                self.last_run.set(task, value=_unix(event["ts"]))
                if kind == EventKind.SUCCESS:
                    self.last_success.set(task, value=_unix(event["ts"]))
                if data["duration_s"] is not None:
                    self.duration.observe(task, float(data["duration_s"]))

    def set_state(
        self, *, running: dict[str, int], queued: int, quarantined: int, paused: Iterable[str]
    ) -> None:
        """Current-state gauges, computed by the main loop so scrapes stay DB-free."""
        running = {t: n for t, n in running.items() if n and t in self._tasks}
        with self._lock:
            paused_set = set(paused) & self._tasks
            # Only what changed since the last push: this runs every second, and a pass
            # over 10,000 tasks was most of agentd's idle CPU.
            for task in running.keys() | self._running.keys():
                if running.get(task) != self._running.get(task):
                    self._ensure(task)
                    self.running.set(task, value=running.get(task, 0))
            for task in paused_set ^ self._paused:
                self._ensure(task)
                self.paused.set(task, value=1 if task in paused_set else 0)
            self._running, self._paused = running, paused_set
            self.tasks_paused.set(len(paused_set))
        self.queue_depth.set(queued)
        self.quarantined.set(quarantined)

    def set_last_times(
        self, task_id: str, *, last_run: float | None, last_success: float | None
    ) -> None:
        """Seed from the DB at start, so a restart does not look like a task that never ran."""
        with self._lock:
            if task_id not in self._tasks or (last_run is None and last_success is None):
                return
            self._ensure(task_id)
            if last_run is not None:
                self.last_run.set(task_id, value=last_run)
            if last_success is not None:
                self.last_success.set(task_id, value=last_success)

    def stale_next_fires(self) -> set[str]:
        """Tasks whose next fire time is to be read from the scheduler (and given to
        ``set_next_fires``): a copy, so a failed read leaves them stale."""
        with self._lock:
            return set(self._stale)

    def set_next_fires(self, asked: Iterable[str], times: Mapping[str, float]) -> None:
        """The next fire times (Unix seconds) of the ``asked`` tasks; one asked but not
        in ``times`` has no fire left (manual, a one-shot that fired, inactive) and
        loses the series. Each asked task has ``agentd_task_overdue`` from now on."""
        with self._lock:
            for task in asked:
                self._stale.discard(task)
                if task not in self._live:
                    continue  # removed by a reload since it was asked for
                if task in times:
                    self.next_fire.set(task, value=times[task])
                else:
                    self.next_fire.drop(task)
                self.overdue.touch(task)

    def set_overdue(self, overdue: Iterable[str]) -> None:
        """The tasks overdue now; only those that changed since the last call are
        touched (a task that turns overdue gets its series)."""
        with self._lock:
            now = set(overdue) & self._tasks
            for task in now ^ self._overdue:
                self._ensure(task)
                self.overdue.set(task, value=1 if task in now else 0)
            self._overdue = now

    def set_outbox(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Pending and failed deliveries by (channel, status), as the state counts them.
        Both statuses of a channel that has any are shown (0 for the other); a channel
        with none left loses its series."""
        with self._lock:
            channels = {channel for channel, _ in counts}
            series = {(c, status) for c in channels for status in OUTBOX_STATUSES}
            for key in self._outbox_series - series:
                self.outbox.remove(*key)
            for channel, status in series:
                self.outbox.labels(channel, status).set(counts.get((channel, status), 0))
            self._outbox_series = series

    def delivery_attempt(self, channel: str, outcome: str) -> None:
        """One delivery attempt ended (``DELIVERY_OUTCOMES``); channels come from the
        config (and ``ping``), a bounded label set."""
        if outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(channel, outcome).inc()

    def set_budget_remaining(
        self, remaining: dict[str, float], limits: Mapping[str, float] | None = None
    ) -> None:
        """Current windows' remaining USD by scope, and their limits (a scope in
        ``remaining`` has one: the share spent is ``1 - remaining / limit``, what an
        alert at 80 % needs); scopes no longer configured go away from both."""
        limits = limits or {}
        with self._lock:
            for scope in self._budget_scopes - set(remaining):
                self.budget_remaining.remove(scope)
                with contextlib.suppress(KeyError):
                    self.budget_limit.remove(scope)
            for scope, usd in remaining.items():
                self.budget_remaining.labels(scope).set(usd)
                if scope in limits:
                    self.budget_limit.labels(scope).set(limits[scope])
            self._budget_scopes = set(remaining)

    def set_budget_eta(self, etas: Mapping[str, float]) -> None:
        """Each window's projected exhaustion, in seconds from now, by scope; a scope not
        in ``etas`` (no longer projected to run out before its window ends) goes away."""
        with self._lock:
            for scope in self._eta_scopes - set(etas):
                self.budget_eta.remove(scope)
            for scope, seconds in etas.items():
                self.budget_eta.labels(scope).set(seconds)
            self._eta_scopes = set(etas)

    def pruned_history(self, counts: Mapping[str, int]) -> None:
        """One retention pass's counts (from the pruner's thread: counters are
        thread-safe)."""
        for kind, n in counts.items():
            if n and kind in PRUNE_KINDS:
                self.pruned.labels(kind).inc(n)

    def config_reload(self, ok: bool, when: float) -> None:
        """A failed reload keeps the old config running; alert on this gauge being 0."""
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_ts.set(when)

    def watchdog_ping(self) -> None:
        self.watchdog.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
