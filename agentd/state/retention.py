"""Retention's engine-neutral half: what the ``history:`` settings keep, as plain
functions of the settings and a time, and every part of a prune pass that speaks no SQL.
Each engine's ``retention`` module (``state.sqlite.retention``,
``state.postgres.retention``) imports this one and adds its own SQL: the selectors, the
deletes, their transactions and locks.

What goes, on every engine (``history:`` in the config, see ``HistoryConfig``):

- finished runs (succeeded, cancelled, skipped, budget_exhausted, dropped, and
  quarantined ones once out of quarantine) that finished more than ``keep_runs`` ago,
  and those beyond a task's newest ``max_runs_per_task``; each with its attempts,
  checkpoint, events and workspace directory. Queued and running runs never go, nor a
  run still in the ``quarantine`` table, nor a run with an event the alert outbox has
  yet to read (of the kinds it reads, ``ALERT_KINDS``);
- quarantine entries older than ``keep_quarantine`` (dropped, with a ``drop`` event);
- events tied to no run, older than ``keep_events`` (and already read by the outbox);
- ledger rows and budget alarms older than ``keep_ledger`` (never under 32 days: budget
  windows count them), except a reservation in flight and the spend of a run that may
  still call a model (queued, running or in quarantine);
- alerts and their finished (delivered or failed) deliveries older than ``keep_alerts``;
  never an alert with a delivery pending, nor a pending delivery.

Here: ``cutoffs`` (settings and a time in, the cut of each kind out) and the judgements
of a run (``run_finished_before``, ``run_may_go``); ``walk``, the batch rule of the
tables read in id order; ``Selection`` and ``Report``, what a batch and a pass carry;
the workspace paths and their removal; ``Pruner``, the thread's timing (a first pass a
while after start, then one every ``prune_every``, the settings read anew at each
pass, ``stop()`` within a batch), of which each engine's ``Pruner`` says how one pass
runs; and ``print_report``, ``agentd prune``'s output.

Invariants every engine keeps with these: a batch is selected again under the engine's
write lock, so what it deletes is what is true at its commit; a workspace directory is
removed only after its run's deletion is durable (a crash in between leaves a directory
without a run, never a run without its directory); the pause between two batches is
``gap`` of the time the last one held the write lock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentd.clock import Clock, SystemClock, to_iso
from agentd.config import LEDGER_FLOOR_S, HistoryConfig
from agentd.metrics import PRUNE_KINDS
from agentd.models import ALERT_EVENTS, FINAL_STATUSES

log = logging.getLogger("agentd.retention")

PRUNABLE_STATUSES = FINAL_STATUSES
"""Succeeded, cancelled, skipped, budget_exhausted, dropped, and quarantined once out of
the quarantine table (a run dropped before the ``dropped`` status existed): never queued
or running."""
BATCH_RUNS = 50
"""Runs per transaction: each brings its events (about four), attempts and checkpoint,
so a batch is a few hundred rows and a few milliseconds."""
BATCH_ROWS = 300
"""Rows per transaction for the one-row kinds (events, ledger, alerts...)."""
GAP_MIN_S = 0.02
GAP_FACTOR = 4.0
"""Between batches the pruner waits GAP_FACTOR times as long as the last batch held the
write lock (at least GAP_MIN_S): it holds the lock at most a fifth of the time while it
works, and still deletes a couple of thousand runs a second."""
FIRST_PASS_S = 60.0
"""The first pass waits this long after start (or ``prune_every``, if shorter): the
start's own work (catch-up fires, recovery) comes first."""
STOP_JOIN_S = 5.0
SETTINGS_POLL_S = 30.0
"""While waiting for its next pass the pruner looks at ``prune_every`` this often."""
ALERT_KINDS: tuple[str, ...] = tuple(sorted(ALERT_EVENTS))
"""The events the alert outbox reads: a run with one it has not read yet stays."""
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A task or run id that may be a path component under the state dir."""

Row = dict[str, Any]


# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class Cutoffs:
    """For each kind, the instant before which its rows go (None: kept forever)."""

    now: datetime
    runs: datetime | None
    max_runs_per_task: int | None
    events: datetime | None
    quarantine: datetime | None
    ledger: datetime | None
    alerts: datetime | None


def cutoffs(history: HistoryConfig, now: datetime) -> Cutoffs:
    """What ``history`` keeps, as instants before ``now``. The ledger's is never later
    than 32 days before ``now``, whatever the settings say: budget months count it."""

    def before(keep_s: float | None) -> datetime | None:
        return None if keep_s is None else now - timedelta(seconds=keep_s)

    ledger = history.keep_ledger
    return Cutoffs(
        now=now,
        runs=before(history.keep_runs),
        max_runs_per_task=history.max_runs_per_task,
        events=before(history.keep_events),
        quarantine=before(history.keep_quarantine),
        ledger=before(None if ledger is None else max(ledger, LEDGER_FLOOR_S)),
        alerts=before(history.keep_alerts),
    )


def run_id_bound(cut: datetime) -> str:
    """Every run id below this was created before ``cut``'s second (ids begin with
    their creation second in UTC), so only those can have finished before ``cut``."""
    return cut.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def run_finished_before(run: Row, cut: datetime | None) -> bool:
    """A finished run that ended before ``cut`` (a run without an end time: created)."""
    if cut is None or run["status"] not in PRUNABLE_STATUSES:
        return False
    return str(run["finished_at"] or run["created_at"]) < to_iso(cut)


def run_may_go(run: Row, held: set[str], unread: set[str]) -> bool:
    """Never a queued or running run, one in quarantine, or one with an event the alert
    outbox has not read."""
    return run["status"] in PRUNABLE_STATUSES and run["id"] not in held | unread


@dataclass
class Selection:
    """The next batch of one kind: ``keys`` go; ``times`` are the instants each was
    judged by (for the dry run's oldest and newest); ``cursor`` is where the next
    batch of the kind starts and ``more`` whether there may be one."""

    keys: list[Any]
    cursor: Any
    more: bool
    times: list[str] = field(default_factory=list)
    runs: list[tuple[str, str]] = field(default_factory=list)
    """For runs: (task_id, run_id) of each, for their workspaces."""


def run_selection(rows: list[Row], cursor: Any, more: bool) -> Selection:
    """The batch of ``rows`` (runs that go), with their end times and workspaces."""
    return Selection(
        keys=[r["id"] for r in rows],
        cursor=cursor,
        more=more,
        times=[str(r["finished_at"] or r["created_at"]) for r in rows],
        runs=[(r["task_id"], r["id"]) for r in rows],
    )


def walk(
    rows: Sequence[Sequence[Any]],
    edge: str,
    cursor: Any,
    limit: int,
    keep: Callable[[Sequence[Any]], bool] = lambda _row: False,
    ceiling: int | None = None,
) -> Selection:
    """``rows`` are (id, instant, ...) in id order, in which instants grow: they go up
    to the first one at or after ``edge``, or above ``ceiling``, where the walk stops;
    ``keep`` holds some back (the walk goes past them)."""
    keys: list[Any] = []
    times: list[str] = []
    for row in rows:
        if str(row[1]) >= edge or (ceiling is not None and row[0] > ceiling):
            return Selection(keys, cursor, False, times)
        cursor = row[0]
        if not keep(row):
            keys.append(row[0])
            times.append(str(row[1]))
    return Selection(keys, cursor, len(rows) == limit, times)


def gap(batch_s: float) -> float:
    """The pause after a batch that held the write lock ``batch_s`` (``GAP_FACTOR``)."""
    return max(GAP_MIN_S, GAP_FACTOR * batch_s)


# ---------------------------------------------------------------- a pass's report


@dataclass
class Report:
    """What one pass pruned (or, dry, would prune): counts per kind, and for each kind
    the oldest and newest instant it was judged by among what went."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRUNE_KINDS, 0))
    oldest: dict[str, str] = field(default_factory=dict)
    newest: dict[str, str] = field(default_factory=dict)
    workspace_bytes: int = 0
    """Dry run: the size of the workspaces that would go."""
    batches: int = 0
    seconds: float = 0.0
    stopped: bool = False
    """The pass was stopped (shutdown) before it was done."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, counts: Mapping[str, int], kind: str, times: Sequence[str]) -> None:
        for name, n in counts.items():
            self.counts[name] = self.counts.get(name, 0) + n
        if times:
            low, high = min(times), max(times)
            if kind not in self.oldest or low < self.oldest[kind]:
                self.oldest[kind] = low
            if kind not in self.newest or high > self.newest[kind]:
                self.newest[kind] = high

    def summary(self) -> str:
        return " ".join(f"{k}={n}" for k, n in self.counts.items() if n) or "nothing"

    def as_dict(self) -> Row:
        return {
            "counts": self.counts,
            "oldest": self.oldest,
            "newest": self.newest,
            "workspace_bytes": self.workspace_bytes,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "stopped": self.stopped,
        }


# ---------------------------------------------------------------- workspaces


def workspace_dir(state_dir: Path, task_id: str, run_id: str) -> Path | None:
    """``<state_dir>/runs/<task>/<run>`` (``runner.workspace_path``), or None for a name
    that could lead out of it."""
    if not (SAFE_NAME.match(task_id) and SAFE_NAME.match(run_id)):
        return None
    return state_dir / "runs" / task_id / run_id


def existing_workspaces(state_dir: Path, runs: Sequence[tuple[str, str]]) -> list[Path]:
    """The workspace directories of ``runs`` (task_id, run_id) that are there."""
    paths = [workspace_dir(state_dir, task_id, run_id) for task_id, run_id in runs]
    return [p for p in paths if p is not None and (p.is_dir() or p.is_symlink())]


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def remove_trees(paths: Sequence[Path], stopped: Callable[[], bool]) -> int:
    """Remove these workspace directories (a symlink: the link only); returns how many
    went. A failure is logged and costs only that directory (it stays)."""
    removed = 0
    for path in paths:
        if stopped():
            break
        try:
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path)
            removed += 1
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError as exc:
            log.warning("retention: could not remove workspace %s: %s", path, exc)
    return removed


# ---------------------------------------------------------------- the thread


class Pruner:
    """Prune passes on a thread of its own: the first ``first_pass_s`` (or
    ``prune_every``, if shorter) after ``start``, then ``prune_every`` after each pass
    ends. ``settings`` is read at each pass, so a reloaded config applies from the next
    one. ``on_pruned`` gets each pass's counts (metrics) when it pruned anything.

    An engine's subclass runs one pass in ``_one_pass`` (on a connection of its own,
    which it opens there when it has none and closes in ``_close``), pausing between
    batches with ``_pace`` and asking ``_stop.is_set`` between workspace removals;
    ``_interrupt`` is called while ``stop()`` waits (to cut short a statement that is
    not a batch). A failure of a pass is logged and the next pass comes as usual; one
    of ``expected_errors`` (the driver's) without a traceback."""

    expected_errors: tuple[type[Exception], ...] = ()
    thread_name = "agentd-retention"

    def __init__(
        self,
        settings: Callable[[], HistoryConfig],
        clock: Clock | None = None,
        on_pruned: Callable[[Mapping[str, int]], None] | None = None,
        *,
        first_pass_s: float = FIRST_PASS_S,
        settings_poll_s: float = SETTINGS_POLL_S,
        batch_runs: int = BATCH_RUNS,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.on_pruned = on_pruned
        self.first_pass_s = first_pass_s
        self.settings_poll_s = settings_poll_s
        self.batch_runs = batch_runs
        self.batch_rows = batch_rows
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_JOIN_S) -> bool:
        """Stop the thread and wait for it: a batch in flight commits first, a pass
        ends after it. False if it had not ended within ``timeout_s``."""
        self._stop.set()
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("retention: the pruner did not stop within %gs", timeout_s)
                return False
            self._interrupt()
            self._thread.join(min(left, 0.1))
        return True

    def _pace(self, batch_s: float) -> bool:
        return not self._stop.wait(gap(batch_s))

    def _one_pass(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """The thread ends: let its connection go."""

    def _interrupt(self) -> None:
        """Called (repeatedly) while ``stop()`` waits for the thread."""

    def _counted(self, report: Report) -> None:
        """After a pass: one log line and the metrics, when it pruned anything."""
        self.passes += 1
        if report.total:
            log.info(
                "retention: pruned %s in %.2fs, %d batch(es)%s",
                report.summary(),
                report.seconds,
                report.batches,
                " (stopped for shutdown)" if report.stopped else "",
            )
            if self.on_pruned:
                self.on_pruned(report.counts)

    def _due_in(self, since: float, first: bool) -> float:
        """Seconds until the next pass: ``prune_every`` after the last one ended (read
        now, so a reload that shortens it applies without waiting out the old one)."""
        every = self.settings().prune_every
        return since + (min(self.first_pass_s, every) if first else every) - time.monotonic()

    def _main(self) -> None:
        since, first = time.monotonic(), True
        try:
            while not self._stop.is_set():
                wait_s = self._due_in(since, first)
                if wait_s > 0:
                    self._stop.wait(min(wait_s, self.settings_poll_s))
                    continue
                try:
                    self._one_pass()
                except self.expected_errors as exc:
                    log.warning("retention: prune pass failed, the next one is as usual: %s", exc)
                except Exception:
                    log.exception("retention: prune pass failed, the next one is as usual")
                since, first = time.monotonic(), False
        finally:
            self._close()


# ---------------------------------------------------------------- agentd prune


@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[threading.Event]:
    """While inside, Ctrl-C (SIGINT) sets the event instead of raising: ``agentd
    prune`` ends between batches and still reports what went."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def print_report(
    args: argparse.Namespace, history: HistoryConfig, cut: Cutoffs, report: Report
) -> None:
    """``agentd prune``'s output: text, or with ``--json`` one object."""
    settings = history.model_dump()
    edges = {
        kind: None if when is None else to_iso(when)
        for kind, when in (
            ("runs", cut.runs),
            ("events", cut.events),
            ("quarantine", cut.quarantine),
            ("ledger", cut.ledger),
            ("alerts", cut.alerts),
        )
    }
    if args.json:
        out = {
            "dry_run": bool(args.dry_run),
            "history": settings,
            "before": edges,
            **report.as_dict(),
        }
        print(json.dumps(out, indent=2))
        return
    shown = ", ".join(f"{k}: {_setting(v)}" for k, v in settings.items())
    print(f"{'would prune' if args.dry_run else 'pruned'} (history: {shown})")
    print("  before: " + ", ".join(f"{k} {v or 'never'}" for k, v in edges.items()))
    if report.stopped:
        print("  (interrupted: the counts are what went until then)")
    for kind in PRUNE_KINDS:
        line = f"  {kind:<14}{report.counts.get(kind, 0):>10,}"
        if kind == "workspaces" and args.dry_run and report.counts.get(kind):
            line += f"  {_size(report.workspace_bytes)}"
        if kind in report.oldest:
            line += f"  oldest {report.oldest[kind]}  newest {report.newest[kind]}"
        print(line)


def _setting(value: Any) -> str:
    if value is None:
        return "forever"
    if isinstance(value, float):
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return f"{value / seconds:g}{unit}"
        return f"{value:g}s"
    return str(value)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
