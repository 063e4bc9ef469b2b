"""APScheduler 3 decides *when*; this module turns its fires into durable runs.

Each job holds only the text reference ``agentd.scheduler:fire``, the task id and a
``SpecTrigger`` (a thin wrapper over the pure maths in ``agentd.schedule``). Fires do
not go through APScheduler's executors, which drop the scheduled time and apply their
own misfire rules silently: ``EnqueueExecutor`` receives every due time and hands it
to agentd, which applies the task's catch-up policy and records what it drops.

The jobstore lives in its own SQLite file so its commits never wait on the state DB's
lock. It holds nothing that idempotency keys in the state DB would not repair, so it
runs with ``synchronous=NORMAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import pickle
import sqlite3
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import ConflictingIdError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.util import datetime_to_utc_timestamp, utc_timestamp_to_datetime

from agentd.clock import Backoff, Clock, to_iso
from agentd.config import Config, TaskConfig, inactive_reason
from agentd.schedule import ScheduleSpec, next_fire
from agentd.state.port import Fire, Store, UnitOfWork

log = logging.getLogger("agentd.scheduler")

JOB_FUNC = "agentd.scheduler:fire"
# Each tick is a pass of APScheduler over its jobstores (a third of a millisecond of CPU
# with 10,000 jobs); liveness allows 30 s by default, i.e. two missed ticks and margin.
HEARTBEAT_S = 10.0
SYNC_SLICE_S = 0.005
"""``Scheduler.sync_async`` lets the loop run after this much work."""


def fire(task_id: str) -> None:
    """The jobs' textual target. agentd's executor enqueues fires itself, with the exact
    scheduled times that APScheduler does not pass to job functions."""
    raise RuntimeError(
        f"agentd.scheduler:fire({task_id!r}) must be handled by agentd's executor; "
        "is the jobstore being read by another program?"
    )


# APScheduler checks a job's callable against its args with inspect.signature on every
# add_job; a precomputed __signature__ is what inspect returns first (10,000 tasks: 0.3 s).
fire.__signature__ = inspect.signature(fire)  # type: ignore[attr-defined]


def _per_job_lines(record: logging.LogRecord) -> bool:
    """Drops APScheduler's "Added job"/"Removed job" INFO lines: agentd logs each task's
    arrival, change and removal itself (``event=task_added`` ...), so with 10,000 tasks
    a cold start wrote 10,000 duplicate lines, and every one-shot fire one more. Its
    other lines (started, paused, shut down, warnings) stay."""
    return not (
        record.levelno == logging.INFO
        and isinstance(record.msg, str)
        and record.msg.startswith(("Added job ", "Removed job "))
    )


@contextlib.contextmanager
def _per_job_lines_unmade() -> Iterator[None]:
    """While a sync adds and removes jobs: APScheduler's per-job INFO lines, which
    ``_per_job_lines`` drops anyway, are not even made. Making each record (the caller
    lookup, the LogRecord) before the filter drops it was 0.2 s of a 10,000-task cold
    start. Its warnings still get through; between a sync's slices, only its INFO
    lines wait (a one-shot fire's "Removed job", dropped anyway)."""
    aps_log = logging.getLogger("apscheduler.scheduler")
    level = aps_log.level
    if aps_log.getEffectiveLevel() < logging.WARNING:
        aps_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        aps_log.setLevel(level)


class SpecTrigger(BaseTrigger):  # type: ignore[misc]
    """Pickled into the jobstore; keeps only the plain schedule spec."""

    def __init__(self, spec: ScheduleSpec, task_id: str) -> None:
        self.spec = spec
        self.task_id = task_id

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        after = previous_fire_time or (now - timedelta(microseconds=1))
        return next_fire(self.spec, self.task_id, after)

    def __getstate__(self) -> dict[str, Any]:
        # All fields are immutable scalars: a shallow dict (asdict deep-copies, and was a
        # fifth of a 10,000-task cold start).
        spec = {f.name: getattr(self.spec, f.name) for f in fields(self.spec)}
        return {"version": 1, "task_id": self.task_id, "spec": spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.task_id = state["task_id"]
        self.spec = ScheduleSpec(**state["spec"])

    def __str__(self) -> str:
        return f"agentd[{self.spec.kind}]"


class PreciseAsyncIOScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """Wakes ``EARLY_S`` before the next fire time, then sleeps the rest on the loop
    thread. asyncio rounds its timers up to whole milliseconds and the wake-up from an
    idle epoll comes late on top, where ``time.sleep`` lands close to the instant. The
    loop is held at most
    ``EARLY_S`` per fire time, and only when the timer was early.

    A pass that raises still arms the next wake-up (after ``RETRY_S``): stock, an
    exception out of ``_process_jobs`` left no timer, and nothing fired again."""

    EARLY_S = 0.002
    RETRY_S = 1.0

    def _process_jobs(self) -> float | None:
        try:
            wait_s: float | None = super()._process_jobs()
        except Exception:
            log.exception("scheduler pass failed; next pass in %gs", self.RETRY_S)
            return self.RETRY_S
        return wait_s

    def _start_timer(self, wait_seconds: float | None) -> None:
        self._stop_timer()
        if wait_seconds is not None:
            loop = self._eventloop
            target = loop.time() + wait_seconds
            early = max(0.0, wait_seconds - self.EARLY_S)
            self._timeout = loop.call_later(early, self._wake_at, target)

    def _wake_at(self, target: float) -> None:
        remaining_s = target - self._eventloop.time()
        if 0 < remaining_s <= self.EARLY_S:
            time.sleep(remaining_s)
        self.wakeup()


class EnqueueExecutor(BaseExecutor):  # type: ignore[misc]
    def __init__(
        self,
        on_due: Callable[[str, list[datetime]], None],
        on_failed: Callable[[str, BaseException], None],
    ) -> None:
        super().__init__()
        self._on_due = on_due
        self._on_failed = on_failed

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        try:
            self._on_due(job.args[0], list(run_times))
        except Exception as exc:
            # Never let one task's failure to enqueue stop APScheduler's loop; the job
            # must not move on past fires that were not stored (see FiresNotStored).
            log.exception("enqueue failed task=%s", job.args[0])
            self._on_failed(job.id, exc)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        raise NotImplementedError  # submit_job is overridden


class FiresNotStored(Exception):
    """A pass's fires did not become durable: its jobs must stay where they were, so
    that they fire again with the same scheduled times (and so the same idempotency
    keys, which make the second attempt safe whatever the first one left)."""

    def __init__(self, job_ids: set[str], cause: BaseException) -> None:
        super().__init__(f"fires of {len(job_ids)} job(s) not stored: {cause}")
        self.job_ids = job_ids
        self.cause = cause


class _Backoff(Backoff):
    """``Backoff`` on ``time.monotonic``, as APScheduler keeps wall-clock time itself."""

    def __init__(self) -> None:
        super().__init__(first_s=0.5, max_s=10.0)

    def failed(self, now_mono: float | None = None) -> None:
        super().failed(time.monotonic() if now_mono is None else now_mono)

    def waiting(self, now_mono: float | None = None) -> bool:
        return super().waiting(time.monotonic() if now_mono is None else now_mono)

    def at(self) -> datetime | None:
        """When the wait ends, as an aware UTC time (for APScheduler's wake-up)."""
        left = self.remaining_s(time.monotonic())
        return None if left is None else datetime.now(UTC) + timedelta(seconds=left)


class GroupCommitJobStore(SQLAlchemyJobStore):  # type: ignore[misc]
    """APScheduler's SQLite jobstore, written behind, that never loses or skips a fire.

    Stock, APScheduler commits each job's next fire time before it looks at the next due
    job, so with 1,000 jobs due at once the last one starts 1,000 commits late. Here every
    change (``add_job``, ``update_job``, ``remove_job``) waits in ``_pending`` and the
    changes of one processing pass are written in one transaction at the pass's next
    read (``get_next_run_time`` ends every pass), right after ``before_flush`` has
    committed the fires themselves to the state DB. Invariants:

    - Every read sees the table overlaid with ``_pending``, so a change is visible at
      once whether or not it has been written yet.
    - A job moves on only once its fires are durable: when ``before_flush`` raises
      ``FiresNotStored``, the pending changes of the jobs that fired are dropped and they
      fire again, with the same scheduled times, after a backoff (0.5 s doubling to 10 s;
      ``get_due_jobs`` returns nothing until then).
    - A failed write of the table keeps the changes pending; they are written by a later
      flush, after the same kind of backoff. A crash before that re-fires those jobs on
      restart; their runs' idempotency keys make that a no-op.
    - No write failure reaches APScheduler: each is reported to ``on_fault`` (once per
      cause; None once a write works again), and ``get_next_run_time`` always gives a
      next wake-up while anything waits to be retried.

    A pass takes at most ``due_batch`` due jobs. The rest stay due, so APScheduler's
    next wake-up is immediate, and the loop serves probes and finished runs in between.
    """

    due_batch = 256
    """Jobs fired per pass: as many as the most run slots a daemon can have, so one
    pass's claim can still fill them all."""

    def __init__(
        self,
        engine: sqlalchemy.Engine,
        before_flush: Callable[[], bool],
        on_fault: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        super().__init__(engine=engine)
        self._before_flush = before_flush
        self.on_fault = on_fault
        self.fault: str | None = None
        self._pending: dict[str, Any] = {}
        """Job id -> the job as it must be stored, or None: to be deleted."""
        self._inserts: set[str] = set()
        """Pending ids with no row in the table yet."""
        self._before_pass: dict[str, tuple[Any, bool]] = {}
        """Pending jobs handed out as due in this pass, as they were before it (and
        whether they were still to be inserted)."""
        self._buffer_adds = False
        self._reader: sqlite3.Connection | None = None
        self._fire_retry = _Backoff()
        self._write_retry = _Backoff()

    @contextlib.contextmanager
    def bulk_adds(self) -> Iterator[None]:
        """Inside, ``add_job`` does not look for an existing job nor write at once: the
        jobs are inserted in one transaction at the end (a cold start with 10,000 tasks
        was 10,000 commits). Only for ids known to be absent (``Scheduler.sync`` checks)."""
        self._buffer_adds = True
        try:
            yield
        finally:
            self._buffer_adds = False
            self.flush()

    def add_job(self, job: Any) -> None:
        if not self._buffer_adds and self.lookup_job(job.id) is not None:
            raise ConflictingIdError(job.id)
        if job.id in self._pending and self._pending[job.id] is None:
            self._pending[job.id] = job  # replaces a stored row whose deletion is pending
        else:
            self._pending[job.id] = job
            self._inserts.add(job.id)
        if not self._buffer_adds:
            self.flush()

    def update_job(self, job: Any) -> None:
        self._pending[job.id] = job

    def remove_job(self, job_id: str) -> None:
        """Buffered like updates: a one-shot job is removed right after it fires."""
        if job_id in self._inserts:
            self._inserts.discard(job_id)
            self._pending.pop(job_id, None)
        else:
            self._pending[job_id] = None

    def flush(self, force: bool = False) -> None:
        """Commit the pass's fires (``before_flush``), then write what is pending; see
        the class's invariants. Never raises a storage failure. ``force`` writes even
        while a failed write's backoff lasts (at shutdown)."""
        before, self._before_pass = self._before_pass, {}
        try:
            stored = self._before_flush()
        except FiresNotStored as exc:
            for job_id in exc.job_ids:
                if job_id in before:
                    self._pending[job_id], insert = before[job_id]
                    if insert:
                        self._inserts.add(job_id)
                elif job_id not in self._inserts:
                    self._pending.pop(job_id, None)
            self._fire_retry.failed()
        else:
            if stored:
                self._fire_retry.ok()
        if not self._pending or (self._write_retry.waiting() and not force):
            return
        try:
            self._write(self._pending, self._inserts)
        except Exception as exc:
            self._write_retry.failed()
            if str(exc) != self.fault:
                log.error(
                    "jobstore write failed, %d change(s) kept in memory and retried: %s",
                    len(self._pending),
                    exc,
                )
                self.fault = str(exc)
                if self.on_fault:
                    self.on_fault(exc)
            return
        self._pending, self._inserts = {}, set()
        self._write_retry.ok()
        if self.fault is not None:
            log.info("jobstore writable again: %s", self.engine.url.database)
            self.fault = None
            if self.on_fault:
                self.on_fault(None)

    def _write(self, pending: dict[str, Any], inserts: set[str]) -> None:
        adds = [job for job_id, job in pending.items() if job_id in inserts and job is not None]
        updates = [job for job_id, job in pending.items() if job_id not in inserts and job]
        removals = [job_id for job_id, job in pending.items() if job is None]
        table = self.jobs_t
        with self.engine.begin() as conn:
            if adds:
                try:
                    conn.execute(table.insert(), [self._row(job) for job in adds])
                except sqlalchemy.exc.IntegrityError:
                    ids = ", ".join(job.id for job in adds)
                    raise ConflictingIdError(f"one of: {ids[:200]}") from None
            if updates:
                conn.execute(
                    table.update()
                    .where(table.c.id == sqlalchemy.bindparam("job_id"))
                    .values(
                        next_run_time=sqlalchemy.bindparam("nrt"),
                        job_state=sqlalchemy.bindparam("state"),
                    ),
                    [
                        {
                            "job_id": job.id,
                            "nrt": datetime_to_utc_timestamp(job.next_run_time),
                            "state": pickle.dumps(job.__getstate__(), self.pickle_protocol),
                        }
                        for job in updates
                    ],
                )
            if removals:
                conn.execute(table.delete().where(table.c.id.in_(removals)))

    # Every read flushes first and sees the table overlaid with what is still pending.

    def _copy(self, job: Any) -> Any:
        """A pending job as a fresh object, as if read from the table: APScheduler
        changes the jobs it is given in place, and the pending one must stay as it is
        until the pass's fires are stored."""
        return self._reconstitute_job(pickle.dumps(job.__getstate__(), self.pickle_protocol))

    def _unpending(self) -> str:
        return json.dumps(list(self._pending))

    def lookup_job(self, job_id: str) -> Any:
        self.flush()
        if job_id in self._pending:
            job = self._pending[job_id]
            return None if job is None else self._copy(job)
        return super().lookup_job(job_id)

    def get_due_jobs(self, now: datetime) -> Any:
        """The due jobs, earliest first and at most ``due_batch``, through plain sqlite3
        (SQLAlchemy's layer was a measurable share of a per-second task's start
        lateness); none
        while fires wait out a failure's backoff. A job that cannot be unpickled is
        logged and removed, as upstream does, with the pass's other writes."""
        self.flush()
        if self._fire_retry.waiting():
            return []
        limit = self.due_batch
        if self._pending:
            rows = self.read(
                f"SELECT id, job_state FROM {self.jobs_t.name} WHERE next_run_time <= ?"
                " AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY next_run_time LIMIT ?",
                (datetime_to_utc_timestamp(now), self._unpending(), limit),
            )
        else:
            rows = self.read(
                f"SELECT id, job_state FROM {self.jobs_t.name} WHERE next_run_time <= ?"
                " ORDER BY next_run_time LIMIT ?",
                (datetime_to_utc_timestamp(now), limit),
            )
        jobs = []
        for job_id, state in rows:
            try:
                jobs.append(self._reconstitute_job(state))
            except Exception:
                log.exception("cannot restore job %s from the jobstore; removing it", job_id)
                self._pending[job_id] = None
        for job_id, job in self._pending.items():
            if job is not None and job.next_run_time is not None and job.next_run_time <= now:
                self._before_pass[job_id] = (job, job_id in self._inserts)
                jobs.append(self._copy(job))
        if len(jobs) > len(rows):
            jobs.sort(key=lambda j: j.next_run_time)
            del jobs[limit:]
        return jobs

    def earliest(self) -> tuple[str, datetime] | None:
        """The job that fires first and when, from the indexed column (overlaid with
        what is pending): cheap enough for a status line refreshed every second."""
        if self._pending:
            rows = self.read(
                f"SELECT id, next_run_time FROM {self.jobs_t.name} WHERE next_run_time IS NOT"
                " NULL AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY next_run_time"
                " LIMIT 1",
                (self._unpending(),),
            )
        else:
            rows = self.read(
                f"SELECT id, next_run_time FROM {self.jobs_t.name}"
                " WHERE next_run_time IS NOT NULL ORDER BY next_run_time LIMIT 1"
            )
        best = (str(rows[0][0]), utc_timestamp_to_datetime(rows[0][1])) if rows else None
        for job_id, job in self._pending.items():
            when = job.next_run_time if job is not None else None
            if when is not None and (best is None or when < best[1]):
                best = (job_id, when)
        return best

    def next_run_timestamps(self, job_ids: Collection[str]) -> dict[str, float]:
        """The next fire time (Unix seconds) of each of ``job_ids`` that has one, from
        the table overlaid with what is pending (a job with none, or no job, is absent).
        By primary key for a few ids (the jobs that fired since the last look); many
        (after a start or a reload) are one scan of the two columns: 10,000 ids through
        ``json_each`` took 14 ms and their datetimes 9 ms more, the scan 8 ms."""
        if len(job_ids) > 500:
            rows = self.read(
                f"SELECT id, next_run_time FROM {self.jobs_t.name} WHERE next_run_time IS NOT NULL"
            )
        else:
            rows = self.read(
                f"SELECT id, next_run_time FROM {self.jobs_t.name} WHERE next_run_time IS NOT"
                " NULL AND id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(job_ids)),),
            )
        wanted = job_ids if isinstance(job_ids, set | frozenset) else set(job_ids)
        out = {
            str(job_id): float(ts)
            for job_id, ts in rows
            if job_id in wanted and job_id not in self._pending
        }
        for job_id in wanted & self._pending.keys():
            job = self._pending[job_id]
            if job is not None and job.next_run_time is not None:
                out[job_id] = float(datetime_to_utc_timestamp(job.next_run_time))
        return out

    def due_before(self, when: datetime, limit: int = 1000) -> dict[str, datetime]:
        """Jobs whose next fire time is before ``when`` (at most ``limit``, earliest
        first), overlaid with what is pending. On the ``next_run_time`` index: a range
        that is empty while the scheduler keeps up, however many jobs there are."""
        cut = datetime_to_utc_timestamp(when)
        rows = self.read(
            f"SELECT id, next_run_time FROM {self.jobs_t.name} WHERE next_run_time < ?"
            " ORDER BY next_run_time LIMIT ?",
            (cut, limit),
        )
        out = {
            str(job_id): utc_timestamp_to_datetime(ts)
            for job_id, ts in rows
            if job_id not in self._pending
        }
        for job_id, job in self._pending.items():
            if job is not None and job.next_run_time is not None and job.next_run_time < when:
                out[job_id] = job.next_run_time
        return out

    def get_next_run_time(self) -> Any:
        """The next wake-up APScheduler needs: the earliest job, but not before a failed
        fire's backoff ends, and no later than a failed write's retry."""
        self.flush()
        first = self.earliest()
        when = first[1] if first else None
        fire_at = self._fire_retry.at()
        if fire_at is not None and when is not None and when < fire_at:
            when = fire_at
        write_at = self._write_retry.at() if self._pending else None
        if write_at is not None and (when is None or write_at < when):
            when = write_at
        return when

    def job_ids(self) -> set[str]:
        """Every stored job's id, as the overlay sees them."""
        self.flush()
        ids = {row[0] for row in self.read(f"SELECT id FROM {self.jobs_t.name}")}
        for job_id, job in self._pending.items():
            if job is None:
                ids.discard(job_id)
            else:
                ids.add(job_id)
        return ids

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Plain sqlite3 for the reads APScheduler makes on every pass ("anything due?",
        "when next?"): through SQLAlchemy's expression layer each cost about a
        millisecond here, and an idle pass with nothing due was most of idle CPU."""
        if self._reader is None:
            self._reader = sqlite3.connect(
                self.engine.url.database, isolation_level=None, check_same_thread=False
            )
            self._reader.execute("PRAGMA busy_timeout=10000")
        return self._reader.execute(sql, params).fetchall()

    def get_all_jobs(self) -> Any:
        self.flush()
        jobs = [job for job in super().get_all_jobs() if job.id not in self._pending]
        jobs += [self._copy(job) for job in self._pending.values() if job is not None]
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def _row(self, job: Any) -> dict[str, Any]:
        return {
            "id": job.id,
            "next_run_time": datetime_to_utc_timestamp(job.next_run_time),
            "job_state": pickle.dumps(job.__getstate__(), self.pickle_protocol),
        }

    def remove_all_jobs(self) -> None:
        self.flush()
        super().remove_all_jobs()
        self._pending, self._inserts = {}, set()

    def shutdown(self) -> None:
        self.flush(force=True)
        if self._pending:
            log.warning(
                "jobstore: %d change(s) could not be written before stopping; the next "
                "start re-fires those jobs (their runs' idempotency keys make it a no-op)",
                len(self._pending),
            )
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        super().shutdown()


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    ended: list[str] = field(default_factory=list)
    """Tasks whose schedule has no fire time left (a past ``at``, a passed ``end_at``)
    and no job: they get none, as APScheduler would only store it paused for good."""


def _jobstore_engine(path: Path) -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    return engine


class Scheduler:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        jobstore_path: Path,
        on_enqueue: Callable[[], None] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.store = store
        self.clock = clock
        self.on_enqueue = on_enqueue
        self.before_commit: Callable[[], object] | None = None
        """Called inside a processing pass's group, just before its commit: the daemon
        claims the fired runs there, so they start with their fires' one fsync instead
        of after it, a main-loop wake-up and a second fsync."""
        self.tasks: Mapping[str, TaskConfig] = {}
        self.config: Config | None = None
        self._synced: dict[str, ScheduleSpec | None] = {}  # each job's spec, last sync
        self._engine = _jobstore_engine(jobstore_path)
        self._jobstore = GroupCommitJobStore(self._engine, self._commit_fires)
        """Its ``on_fault`` hears of jobstore write failures (see ``on_jobstore_fault``)."""
        self.aps = PreciseAsyncIOScheduler(
            jobstores={
                "default": self._jobstore,
                "internal": MemoryJobStore(),
            },
            executors={
                "default": EnqueueExecutor(self._on_due, self._fire_failed),
                "internal": AsyncIOExecutor(),
            },
            timezone=UTC,
        )
        self.on_tick: Callable[[], None] | None = None
        self._fires: list[Fire] = []
        """Fires of the processing pass under way, enqueued together at its end."""
        self._pass: UnitOfWork | None = None
        """The unit of work of APScheduler's processing pass under way, if any: all its
        fires and the claims they make possible commit together."""
        self._pass_jobs: set[str] = set()
        """Jobs that fired in the pass under way: they move on only if its fires commit."""
        self._pass_failed: BaseException | None = None
        self._fires_failing = False
        """The last pass's fires were not stored (said once, until they are again)."""

    def start(self, config: Config) -> SyncReport:
        """Start paused, diff jobs against the config, then let fires through (the
        daemon does the same in three steps, with ``sync_async`` in the middle)."""
        self.start_paused()
        report = self.sync(config)
        self.resume()
        return report

    def prepare(self) -> None:
        """The jobstore's table and first connection, which APScheduler's start would
        make on the loop; may run in a thread, before ``start_paused``."""
        self._jobstore.jobs_t.create(self._engine, checkfirst=True)

    def start_paused(self) -> None:
        logging.getLogger("apscheduler.executors.internal").setLevel(logging.WARNING)
        aps_log = logging.getLogger("apscheduler.scheduler")
        if _per_job_lines not in aps_log.filters:
            aps_log.addFilter(_per_job_lines)
        self.aps.start(paused=True)

    def resume(self) -> None:
        # A heartbeat job through APScheduler's own loop: if APScheduler stops processing
        # jobs, /healthz sees this tick go stale.
        self.aps.add_job(
            self._tick,
            "interval",
            seconds=self.heartbeat_s,
            id="agentd-heartbeat",
            jobstore="internal",
            executor="internal",
            misfire_grace_time=None,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self.aps.resume()

    async def _tick(self) -> None:
        """Runs every ``heartbeat_s`` on APScheduler's own loop (its executor's per-run
        INFO lines are silenced in ``start``: one every few seconds is noise)."""
        if self.on_tick:
            self.on_tick()

    def sync(self, config: Config) -> SyncReport:
        """Add, reschedule or remove jobs so they match the config; touch nothing else.

        An unchanged job keeps its stored next fire time, which is how fires missed
        during downtime are still seen (and caught up) after a restart.
        """
        steps = self._sync(config, math.inf)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def sync_async(self, config: Config, slice_s: float = SYNC_SLICE_S) -> SyncReport:
        """``sync`` in slices of ``slice_s``, the loop answering probes and running
        fires in between: registering thousands of tasks in one piece would hold it."""
        steps = self._sync(config, slice_s)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            await asyncio.sleep(0)

    def _sync(self, config: Config, slice_s: float) -> Generator[None, None, SyncReport]:
        """Yields when a slice is used up; returns the SyncReport (StopIteration.value).
        A fire between slices sees the new config's tasks: a removed task's job that
        is not removed yet does not fire, a new one's that is not added yet waits."""
        self.config = config
        self.tasks = config.tasks
        report = SyncReport()
        wanted: dict[str, ScheduleSpec] = {}
        slice_end = time.monotonic() + slice_s
        for task_id, task in config.tasks.items():
            reason = inactive_reason(task)
            if reason:
                log.info("task inactive task=%s reason=%r", task_id, reason)
            elif task.schedule.kind != "manual":
                wanted[task_id] = config.schedule_spec(task_id)
            if time.monotonic() >= slice_end:
                yield
                slice_end = time.monotonic() + slice_s
        # Job ids from the table; a job is unpickled only when its stored spec is not
        # known from the last sync (at start), so a reload of 10,000 tasks with 100
        # changed touches 100 jobs.
        ids = self._jobstore.job_ids()
        if ids - self._synced.keys():  # at start: every stored spec, in one read
            for job in self.aps.get_jobs(jobstore="default"):
                self._synced[job.id] = getattr(job.trigger, "spec", None)
        with _per_job_lines_unmade():
            for task_id in sorted(ids - wanted.keys()):
                self.aps.remove_job(task_id)
                report.removed.append(task_id)
                self._synced.pop(task_id, None)
                if time.monotonic() >= slice_end:
                    yield
                    slice_end = time.monotonic() + slice_s
            with self._jobstore.bulk_adds():
                for task_id, spec in wanted.items():
                    self._add_or_reschedule(task_id, spec, ids, report)
                    if time.monotonic() >= slice_end:
                        self._jobstore.flush()  # this slice's jobs are in before the loop runs
                        yield
                        slice_end = time.monotonic() + slice_s
        return report

    def _add_or_reschedule(
        self, task_id: str, spec: ScheduleSpec, ids: set[str], report: SyncReport
    ) -> None:
        trigger = SpecTrigger(spec, task_id)
        known = task_id in ids
        first: dict[str, Any] = {}  # computed here: APScheduler need not do it again
        if not known and (spec.kind == "once" or spec.end_at is not None):
            # A schedule that can end may have ended: a once task that fired (its job
            # is gone) or whose time passed. Its job would be stored with no next run
            # time and never fire; each restart re-added it (a restart with 10,000 such
            # tasks: ~0.4 s of add_job). A job that is still stored, fired or not, is
            # left to APScheduler (a fire missed while down is caught up from there).
            first["next_run_time"] = trigger.get_next_fire_time(None, self.clock.now())
            if first["next_run_time"] is None:
                report.ended.append(task_id)
                self._synced.pop(task_id, None)
                return
        stored = self._synced.get(task_id)
        self._synced[task_id] = spec
        if not known:
            self.aps.add_job(
                JOB_FUNC,
                trigger=trigger,
                args=[task_id],
                id=task_id,
                name=task_id,
                misfire_grace_time=None,
                coalesce=False,
                max_instances=1_000_000,
                replace_existing=False,
                **first,
            )
            report.added.append(task_id)
        elif stored != spec:
            self.aps.reschedule_job(task_id, trigger=trigger)
            report.rescheduled.append(task_id)
        else:
            report.unchanged += 1

    def next_due(self) -> tuple[str, datetime] | None:
        """The soonest job and its fire time (see ``GroupCommitJobStore.earliest``)."""
        return self._jobstore.earliest()

    def on_jobstore_fault(self, listener: Callable[[BaseException | None], None]) -> None:
        """Tell ``listener`` when jobstore writes start failing (the error) and when they
        work again (None)."""
        self._jobstore.on_fault = listener

    def next_fire_times(self, task_ids: Collection[str]) -> dict[str, float]:
        """When the jobstore fires each of ``task_ids`` next, in Unix seconds (a task
        with no job, or a job with no fire left, is absent): what
        ``agentd_task_next_fire_timestamp_seconds`` shows. Not the schedule's maths: a
        job the scheduler is late with keeps its past time here, which is what makes a
        task overdue."""
        return self._jobstore.next_run_timestamps(task_ids)

    def overdue_jobs(self, before: datetime) -> dict[str, datetime]:
        """Jobs still due from before ``before``, and when (see ``due_before``)."""
        return self._jobstore.due_before(before)

    def next_fire_time(self, task_id: str) -> datetime | None:
        job = self.aps.get_job(task_id)
        return job.next_run_time if job else None

    def pause(self) -> None:
        if self.aps.running:
            self.aps.pause()

    def shutdown(self) -> None:
        """Stop APScheduler and fold the jobstore's WAL back into its file."""
        if self.aps.running:
            self.aps.shutdown(wait=False)
        try:
            with self._engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlalchemy.exc.SQLAlchemyError as exc:
            log.warning(
                "jobstore WAL checkpoint at shutdown failed: %s", getattr(exc, "orig", None) or exc
            )
        self._engine.dispose()

    # ------------------------------------------------------------ fires

    def _commit_fires(self) -> bool:
        """End of a processing pass (the jobstore's ``before_flush``): enqueue its fires,
        let ``before_commit`` claim what they made runnable, and commit it all at once.
        True when a pass's fires were committed, False when there was no pass; raises
        ``FiresNotStored`` naming the pass's jobs when anything of it failed, so that the
        jobstore keeps them where they were and they fire again."""
        unit, self._pass = self._pass, None
        fires, self._fires = self._fires, []
        jobs, self._pass_jobs = self._pass_jobs, set()
        failed, self._pass_failed = self._pass_failed, None
        if unit is None and failed is None:
            return False
        try:
            if failed is not None:
                raise failed
            if fires:
                self._enqueue(fires)
            if self.before_commit is not None:
                try:
                    self.before_commit()
                except Exception:
                    # The fires must still be committed; the main loop claims them.
                    log.exception("claim before committing fires failed")
            if unit is not None:
                unit.commit()
        except Exception as exc:
            if unit is not None:
                unit.abort()
            log.log(
                logging.DEBUG if self._fires_failing else logging.WARNING,
                "fires not stored task(s)=%s, fired again after a backoff: %s",
                ",".join(sorted(jobs)[:10]) + (",..." if len(jobs) > 10 else ""),
                exc,
            )
            self._fires_failing = True
            raise FiresNotStored(jobs, exc) from exc
        if self._fires_failing:
            self._fires_failing = False
            log.info("fires stored again task(s)=%s", ",".join(sorted(jobs)[:10]))
        return True

    def _fire_failed(self, job_id: str, exc: BaseException) -> None:
        """A job's fire could not even be enqueued: its pass must not move it on."""
        self._pass_jobs.add(job_id)
        if self._pass_failed is None:
            self._pass_failed = exc

    def _end_pass(self) -> None:
        """Backstop for a pass that did not end with the jobstore's read: flush it, which
        commits its fires first (or keeps its jobs where they were)."""
        if self._pass is not None:
            self._jobstore.flush()

    def _on_due(self, task_id: str, run_times: list[datetime]) -> None:
        """One job's due times, from APScheduler's pass. Inside a pass the fires wait
        in ``_fires`` and are enqueued together at its end (``Store.fire_many``)."""
        task = self.tasks.get(task_id)
        if task is None or not run_times:
            return
        if self._pass is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None  # called directly, not from APScheduler's pass: no grouping
            if loop is not None:
                self._pass = self.store.unit()
                # The pass ends with a jobstore read that commits; this is the backstop.
                loop.call_soon(self._end_pass)
        if self._pass is not None:
            self._pass_jobs.add(task_id)
            if self._pass_failed is not None:
                return  # the pass is lost already: this job fires again with it
        now = self.clock.now()
        due, missed, reason = catchup_split(task, run_times, now)
        if missed:
            log.warning(
                "misfire task=%s dropped=%d reason=%s first=%s last=%s",
                task_id,
                len(missed),
                reason,
                to_iso(missed[0]),
                to_iso(missed[-1]),
            )
            self.store.record_misfire(task_id, now, missed, reason)
        fires = [
            Fire(
                task_id,
                when,
                # A run that stands in for dropped fires, or starts late, is a catch-up.
                "catchup"
                if missed or (now - when).total_seconds() > task.misfire_grace
                else "schedule",
                task.overlap,
                task.max_queued,
            )
            for when in due
        ]
        if self._pass is not None:
            self._fires += fires
        else:
            self._enqueue(fires)  # inside a caller's group, or none

    def _enqueue(self, fires: list[Fire]) -> None:
        created = False
        for fire, result in zip(fires, self.store.fire_many(fires, self.clock.now()), strict=True):
            created = created or result.created
            if result.reason == "duplicate":
                log.info(
                    "fire deduplicated task=%s scheduled_for=%s run=%s",
                    fire.task_id,
                    to_iso(fire.scheduled_for) if fire.scheduled_for else "-",
                    result.run_id,
                )
            elif result.reason == "unknown_task":
                log.error("fire of a task the state DB does not know task=%s", fire.task_id)
        if created and self.on_enqueue:
            self.on_enqueue()


def catchup_split(
    task: TaskConfig, run_times: list[datetime], now: datetime
) -> tuple[list[datetime], list[datetime], str]:
    """Which due times run and which are dropped, per the task's ``catchup`` policy."""
    grace = task.misfire_grace
    if task.catchup == "skip":
        due = [t for t in run_times if (now - t).total_seconds() <= grace]
        missed = [t for t in run_times if (now - t).total_seconds() > grace]
        return due[-1:], missed + due[:-1], "catchup=skip"
    if task.catchup == "latest":
        return run_times[-1:], run_times[:-1], "catchup=latest"
    keep = run_times[-task.catchup_max :]
    return keep, run_times[: len(run_times) - len(keep)], "catchup=all limit"
