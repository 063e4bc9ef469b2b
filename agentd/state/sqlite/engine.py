"""agentd's durable state: runs, attempts, events, checkpoints, quarantine, tasks.

This file is the truth; APScheduler's jobstore only remembers *when* to fire next.
Every transition is one ``BEGIN IMMEDIATE`` transaction (read-then-write without a
race against the CLI, which writes the same file), with ``synchronous=FULL``: a "done"
row lost to a power cut would mean running an agent twice.

Events are appended in the same transaction as the change they describe and handed
to ``event_sink`` only after the commit, so nobody ever sees an event that rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import sqlite_utils

from agentd.clock import from_iso, to_iso
from agentd.doorbell import Doorbell, ring
from agentd.models import ACTIVE_STATUSES, EventKind, Outcome, Row, RunStatus, StateRefused
from agentd.policy import auto_pause_reason, overlap_decision
from agentd.procs import GroupEnd, GroupRecord
from agentd.redact import NOTHING, Redactor
from agentd.state.port import (
    AttemptRecord,
    ClaimedRun,
    EventRecord,
    EventSink,
    Finish,
    Fire,
    FireAdmission,
    FireGate,
    FireResult,
    QuarantineRecord,
    RunIds,
    RunRecord,
    StorageError,
    StorageFault,
    Store,
    TaskRecord,
    UnitOfWork,
    WriteListener,
    WriteLost,
    decode_params,
    encode_params,
    wait_commit,
)
from agentd.state.sqlite.alerts import AlertStatements
from agentd.state.sqlite.ledger import LedgerStatements
from agentd.state.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION
from agentd.state.sqlite.nodes import NodeStatements
from agentd.state.sqlite.steps import StepStatements

log = logging.getLogger("agentd.state.sqlite")

CHECKPOINT_EVERY = 64
"""Commits between WAL checkpoints: a few hundred pages at a busy pool's group sizes,
about SQLite's own 1,000-page default."""
WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""The WAL's size past which it is made to start over and cut back to this size (see
``SqliteStore._restart_wal``)."""
RESTART_WAIT_MS = 2000
"""How long a restarting checkpoint may wait for readers (a CLI, the checkpoint thread)
before it gives up, to try again after the next checkpoint."""


def is_storage_fault(exc: BaseException) -> bool:
    """An error of the storage (disk full, read-only, I/O, locked, damaged), as opposed to
    a refused request or a constraint: what turns readiness off."""
    return isinstance(exc, (sqlite3.OperationalError, StorageFault)) or (
        type(exc) is sqlite3.DatabaseError
    )


def neutral(exc: BaseException) -> BaseException:
    """The port's exception for one of SQLite's (``agentd.state.port``): a storage fault
    is a ``StorageFault``, any other ``sqlite3.Error`` a ``StorageError``, each with the
    same message; anything else is returned as it is."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    kind = StorageFault if is_storage_fault(exc) else StorageError
    out = kind(str(exc))
    out.__cause__ = exc
    return out


def _translated(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def verb(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as exc:
            raise neutral(exc) from exc

    return verb


def _speak_the_port(cls: type) -> type:
    """Class decorator: every public method of ``cls`` (and of its mixins) raises the
    port's exceptions, never ``sqlite3``'s. Inside, the engine works with SQLite's own."""
    for klass in reversed(cls.__mro__[:-1]):
        for name, member in vars(klass).items():
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            if inspect.iscoroutinefunction(member) or inspect.isgeneratorfunction(member):
                continue
            setattr(cls, name, _translated(member))
    return cls


MAX_ID_DRAWS = 5
"""Draws of fresh ids for a batch whose ids collide before ``fire_many`` gives up."""


# One encoder for every event: ``json.dumps`` with options builds a new one per call.
_NewEvent = tuple[str, EventKind, str | None, str | None, Row]
"""An event to insert: (ts, kind, task_id, run_id, data)."""
_encode = json.JSONEncoder(default=str, sort_keys=True).encode


_FENCE = " AND (? IS NULL OR (status='running' AND lease_owner=? AND attempt=?))"
"""The lease fence of a finish (``Finish.owner``): with no owner given, none."""

CLAIM_COLUMNS = (
    "r.id, r.task_id, r.trigger, r.scheduled_for, r.idempotency_key, r.status, r.attempt,"
    " r.failures, r.not_before, r.created_at, r.params"
)
"""What a claimed run's row carries (all a runner needs): converting all 23 columns
of each row to a dict was a tenth of claiming."""


_NOT_RUNNING_ELSEWHERE = (
    "(r.task_id IN (SELECT value FROM json_each(?)) OR NOT EXISTS (SELECT 1 FROM runs x"
    " WHERE x.task_id = r.task_id AND x.status IN ('queued','running')"
    " AND x.status = 'running'))"
)
"""A claim's condition that a task that may not overlap has no run running in any
process (a CLI's second instance, a restored DB's old owner). The IN term, implied by
the equality, lets SQLite use the partial index ``idx_runs_active``."""


@_speak_the_port
class SqliteStore(LedgerStatements, AlertStatements, NodeStatements, StepStatements):
    """The SQLite engine behind ``agentd.state.port.Store``."""

    shared = False
    """One daemon at a time: the state dir's lock (``statedir.StateLock``) says so."""

    def __init__(
        self,
        path: Path,
        event_sink: EventSink | None = None,
        *,
        defer_open: bool = False,
        wal_limit_bytes: int = WAL_LIMIT_BYTES,
        read_only: bool = False,
        immutable: bool = False,
    ) -> None:
        """``defer_open`` leaves the pragmas and migrations to ``open()``, which may block
        on another process's lock: the daemon runs it in a thread while probes answer.

        ``read_only``: for the CLI's reads while no daemon runs. The file must exist and
        be at this agentd's schema version (a ``StateRefused`` says what to do otherwise);
        nothing is migrated, written or folded, and any write fails. ``immutable`` too
        when no process holds the state dir's lock: SQLite then reads the files as they
        are and creates no ``-wal``/``-shm`` beside them (which, made by another user,
        root say, the daemon could not open)."""
        self.path = path
        self.read_only = read_only
        self.wal_limit_bytes = wal_limit_bytes
        self.new_run_id: Callable[[datetime], str] = RunIds()
        """Makes the id of each new run (see ``RunIds``)."""
        self.event_sink = event_sink
        self.redactor: Redactor = NOTHING
        """Secret values scrubbed from every text written here: run and attempt errors,
        event data (so the API, SSE, run.json, events.jsonl and alerts, all read from
        here), progress messages. Set by the daemon for each config it applies."""
        self.fire_gate: FireGate | None = None
        """Asked inside ``fire()``'s transaction for scheduled fires: a reason to record
        the fire as skipped (budget window full), or None."""
        self.fire_admission: FireAdmission | None = None
        """Cost-aware admission of scheduled fires (``port.FireAdmission``), or None."""
        self._pending_events: list[Row] = []
        self._group_open = False
        self._group_lost: BaseException | None = None
        """Why the open group's transaction is gone (see ``WriteLost``), if it is."""
        self._rollback_hooks: list[Callable[[], None]] = []
        self._inflight_hooks: list[Callable[[], None]] = []
        self.on_write: WriteListener | None = None
        self.write_error: str | None = None
        """Why the last write failed, until a commit succeeds again."""
        # A group's COMMIT may run on the writer thread (``_commit_group_off_loop``);
        # until it is settled, nobody else may touch the connection (``conn``).
        self._inflight: Future[BaseException | None] | None = None
        self._inflight_events: list[Row] = []
        self._writer: ThreadPoolExecutor | None = None
        self._commits = 0
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpointing: Future[None] | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._restart_due = False
        self._doorbell: Doorbell | None = None
        if read_only:
            if not path.exists():
                raise StateRefused("no_state", f"there is no state DB at {path} yet")
            self._conn = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro" + ("&immutable=1" if immutable else ""),
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout = 10000")
        self.db = sqlite_utils.Database(self.conn)
        if read_only:
            self._check_version()
        elif not defer_open:
            self.open()

    def open(self) -> None:
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            # Checkpoints run on their own thread and connection (``_committed``): done
            # by the commit that crosses 1,000 pages, whoever waited on that commit (the
            # event loop) would wait for the checkpoint too.
            self.conn.execute("PRAGMA wal_autocheckpoint = 0")
            # When a checkpoint lets the WAL start over, its file is cut back to this.
            self.conn.execute(f"PRAGMA journal_size_limit = {int(self.wal_limit_bytes)}")
            self._migrate()
        except BaseException:
            self.conn.close()
            raise

    # ------------------------------------------------------------ plumbing

    def _check_version(self) -> None:
        """A read-only store reads only a DB at this agentd's schema version."""
        try:
            found = self.conn.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
        except sqlite3.OperationalError:
            found = None
        version = int(found[0]) if found else 0
        if version != SCHEMA_VERSION:
            self.conn.close()
            raise StateRefused(
                "state_version",
                f"{self.path} has schema version {version}, this agentd {SCHEMA_VERSION}: "
                "start the daemon once (it migrates the DB), then ask again",
            )

    def _migrate(self) -> None:
        with self.tx():
            has_meta = self.db.table("meta").exists()
            version = 0
            if has_meta:
                row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'")
                found = row.fetchone()
                version = int(found[0]) if found else 0
            if version > SCHEMA_VERSION:
                raise StateRefused(
                    "schema_too_new",
                    f"{self.path} has schema version {version}; this agentd knows up to "
                    f"{SCHEMA_VERSION}. Upgrade agentd or use another state_dir.",
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[number - 1](self.db)
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)",
                    (str(number),),
                )

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so read-then-write cannot race.

        Inside a group (``_begin_group``) it is a savepoint instead: its writes become
        durable with the group's one commit, and a failure undoes only its own part --
        unless SQLite ended the whole transaction (a full disk), in which case the group
        is lost and every later write in it raises ``WriteLost``. A storage fault in
        either case is reported to ``on_write``; a successful commit reports recovery.
        """
        if self._group_open:
            if self._group_lost is not None:
                raise WriteLost(f"the group's transaction was rolled back: {self._group_lost}")
            mark = len(self._pending_events)
            try:
                self._conn.execute("SAVEPOINT tx")
                yield self.conn
                self._conn.execute("RELEASE tx")
            except BaseException as exc:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK TO tx")
                        self._conn.execute("RELEASE tx")
                    del self._pending_events[mark:]
                else:
                    self._group_lost = exc
                    self._pending_events.clear()
                self._write_failed(exc)
                raise
            return
        try:
            conn = self.conn
            if self._restart_due:
                self._restart_wal()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                self._pending_events.clear()
                raise
        except BaseException as exc:
            self._write_failed(exc)
            raise
        self._write_ok()
        self._committed()
        events, self._pending_events = self._pending_events, []
        if self.event_sink:
            for event in events:
                self.event_sink(event)

    def unit(self, *, shared: bool = False) -> UnitOfWork:
        """Open a unit of work (see ``agentd.state.port``): the owner when no unit is
        open, which takes the write lock now (``BEGIN IMMEDIATE``: one fsync for all it
        holds), else a handle that joins the open one. ``shared`` changes nothing here:
        a file has one writer at a time."""
        if self._group_open:
            return _Unit(self, owner=False)
        self._begin_group()
        return _Unit(self, owner=True)

    def flush(self) -> None:
        """At stop: commit a unit its owner left open, and complete a commit running
        off the loop; raises what undid either."""
        self._commit_group()
        error = self.complete_commit()
        if error is not None:
            raise error

    # ------------------------------------------------------------ change notification

    def watch(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> bool:
        """SQLite's notices are the doorbell (``agentd.doorbell``): a datagram socket in
        the state dir that a CLI rings after writing the file itself."""
        self.unwatch()
        self._doorbell = Doorbell(self.path.parent, on_change)
        return self._doorbell.open(loop)

    def unwatch(self) -> None:
        bell, self._doorbell = self._doorbell, None
        if bell is not None:
            with contextlib.suppress(OSError):  # a read-only state dir keeps the socket file
                bell.close()

    def announce_change(self) -> None:
        ring(self.path.parent)

    def _begin_group(self) -> None:
        """Group commit: the transactions that follow, up to ``_commit_group``, share one
        commit and so one fsync. The scheduler uses it for all fires of one due instant,
        where a commit each would make the thousandth run wait for 999 fsyncs."""
        if not self._group_open:
            try:
                conn = self.conn
                if self._restart_due:
                    self._restart_wal()
                conn.execute("BEGIN IMMEDIATE")
            except BaseException as exc:
                self._write_failed(exc)
                raise
            self._group_open = True
            self._group_lost = None

    def _after_rollback(self, undo: Callable[[], None]) -> None:
        """Inside a group: call ``undo`` if the group does not commit (its COMMIT fails,
        an earlier failure lost it, or it is aborted). For work done in memory on the
        strength of the group's writes, such as runs started on a claim the group holds;
        dropped when the group commits. Outside a group a failed write raises to its
        caller, so there is nothing to do."""
        if self._group_open:
            self._rollback_hooks.append(undo)

    def _commit_group(self) -> None:
        """Commit the open group; on failure everything in it is undone (the rollback
        hooks run) and the error is raised."""
        if not self._group_open:
            return
        self._group_open = False
        hooks, self._rollback_hooks = self._rollback_hooks, []
        lost, self._group_lost = self._group_lost, None
        try:
            if lost is not None:
                raise WriteLost(f"the group's transaction was rolled back: {lost}")
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            self._pending_events.clear()
            self._write_failed(exc)
            _run_hooks(hooks)
            raise
        self._write_ok()
        self._committed()
        events, self._pending_events = self._pending_events, []
        if self.event_sink:
            for event in events:
                self.event_sink(event)

    def _abort_group(self) -> None:
        """Roll the open group back (its rollback hooks run); nothing of it is kept."""
        if not self._group_open:
            return
        self._group_open = False
        self._group_lost = None
        hooks, self._rollback_hooks = self._rollback_hooks, []
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        self._pending_events.clear()
        _run_hooks(hooks)

    def _commit_group_off_loop(self) -> Future[BaseException | None] | None:
        """``_commit_group`` with the COMMIT and its fsync on the writer thread, so the
        event loop answers probes and gathers the next group meanwhile (the fsync was a
        fifth of the loop's time draining a queue).

        The future gives the exception that undid the group, or None. Any use of
        ``conn`` before it is done waits for it (``complete_commit``); the group's events reach
        the sink at that point, in order, never before the commit and never twice, and
        its rollback hooks run there if it failed.
        """
        if not self._group_open:
            return None
        self._group_open = False
        self._inflight_events, self._pending_events = self._pending_events, []
        self._inflight_hooks, self._rollback_hooks = self._rollback_hooks, []
        lost, self._group_lost = self._group_lost, None
        if lost is not None:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            done: Future[BaseException | None] = Future()
            done.set_result(WriteLost(f"the group's transaction was rolled back: {lost}"))
            self._inflight = done
            return done
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="agentd-commit")
        self._inflight = self._writer.submit(self._commit_or_rollback)
        self._committed()
        return self._inflight

    def _write_ok(self) -> None:
        if self.write_error is not None:
            log.info("state DB writable again: %s", self.path)
            self.write_error = None
            if self.on_write:
                self.on_write(None)

    def _write_failed(self, exc: BaseException) -> None:
        """Note a storage fault (see ``is_storage_fault``); one log line per new cause,
        not one per failed write, so a full disk cannot flood the journal."""
        if not is_storage_fault(exc):
            return
        message = str(exc)
        if message == self.write_error:
            return
        log.error("state DB write failed: %s: %s", self.path, message)
        self.write_error = message
        if self.on_write:
            self.on_write(neutral(exc))

    def _committed(self) -> None:
        """Every CHECKPOINT_EVERY commits, fold the WAL into the file on the checkpoint
        thread, with its own connection. A PASSIVE checkpoint takes no lock a writer
        needs, so commits (and the loop) go on while it copies pages and fsyncs. A WAL
        past ``wal_limit_bytes`` (looked at after every commit: one stat) is checkpointed
        at once, then made to start over before this connection's next transaction
        (``_restart_wal``)."""
        self._commits += 1
        over = self._wal_bytes() > self.wal_limit_bytes
        if not over and self._commits % CHECKPOINT_EVERY:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        if self._checkpointer is None:
            self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="agentd-checkpoint")
        self._checkpointing = self._checkpointer.submit(self._checkpoint, over)

    def _checkpoint(self, over_limit: bool = False) -> None:
        """On the checkpoint thread. A failure only leaves the WAL longer until the next.
        ``over_limit``: the WAL is past its limit; once this PASSIVE checkpoint has
        copied it, the writer makes it start over (``_restart_wal``) with little left to
        copy."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(
                    str(self.path), isolation_level=None, check_same_thread=False
                )
                self._checkpoint_conn.execute("PRAGMA busy_timeout = 10000")
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint of %s failed, retried later: %s", self.path, exc)
            return
        if over_limit:
            self._restart_due = True

    def _wal_bytes(self) -> int:
        try:
            return os.path.getsize(f"{self.path}-wal")
        except OSError:
            return 0

    def _restart_wal(self) -> None:
        """Let the WAL start over, on the writing connection itself, between two
        transactions; ``journal_size_limit`` then cuts its file back to the limit.

        A PASSIVE checkpoint never lets the WAL start over while a writer commits back
        to back (it always leaves the frames written meanwhile), so under steady load the
        WAL only grew. A RESTART checkpoint needs the write lock, which a second
        connection would have to win in the gaps between commits; taken here, between
        this writer's own transactions, it only waits for readers, and copies only what
        the PASSIVE checkpoint just before it (see ``_checkpoint``) left. (TRUNCATE would
        also cut the file to nothing, which on a large WAL took hundreds of ms.)"""
        self._restart_due = False
        conn = self._conn
        if self._checkpointing is not None:
            # Two checkpoints cannot run at once: the second would give up at once.
            self._checkpointing.result()
        try:
            conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                conn.execute("PRAGMA busy_timeout = 10000")
        except sqlite3.Error as exc:
            log.warning("WAL of %s over its limit, not restarted: %s", self.path, exc)
            return
        if busy:
            log.warning("WAL of %s over its limit, not restarted yet: readers", self.path)

    def _commit_or_rollback(self) -> BaseException | None:
        """On the writer thread; the loop thread keeps off ``_conn`` until this is done."""
        try:
            self._conn.execute("COMMIT")
            return None
        except BaseException as exc:
            # A failed COMMIT may already have ended the transaction.
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            return neutral(exc)

    async def commit_done(self) -> None:
        """Returns once the commit on the writer thread (if any) is done, without holding
        the event loop meanwhile: for readers on the loop that can wait (API requests).
        Only that one commit: under a steady stream of commits, waiting for a gap could
        starve the caller."""
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            await wait_commit(inflight)

    @property
    def committing(self) -> bool:
        """A commit is on the writer thread right now: touching ``conn`` would block the
        caller (the loop) until its fsync is done."""
        return self._inflight is not None and not self._inflight.done()

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection, once any commit on the writer thread has finished."""
        if self._inflight is not None:
            self.complete_commit()
        return self._conn

    def complete_commit(self) -> BaseException | None:
        """Wait for the in-flight commit (if any), then hand its events to the sink.
        Returns what undid it, or None."""
        fut, self._inflight = self._inflight, None
        if fut is None:
            return None
        error = fut.result()
        events, self._inflight_events = self._inflight_events, []
        hooks, self._inflight_hooks = self._inflight_hooks, []
        if error is not None:
            self._write_failed(error)
            _run_hooks(hooks)
            return error
        self._write_ok()
        if self.event_sink:
            for event in events:
                self.event_sink(event)
        return None

    def close(self) -> None:
        """Fold the WAL back into the main file so a copy of the DB alone is complete."""
        if self.read_only:
            self._conn.close()
            return
        try:
            self._commit_group()
            if self._checkpointing is not None:
                self._checkpointing.result()  # TRUNCATE below would wait for it anyway
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.complete_commit()
            self._conn.close()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._checkpointer is not None:
                self._checkpointer.shutdown(wait=True)
            if self._checkpoint_conn is not None:
                self._checkpoint_conn.close()

    def _event(
        self,
        now: datetime | str,
        kind: EventKind,
        task_id: str | None = None,
        run_id: str | None = None,
        **data: Any,
    ) -> None:
        """``now`` may come already formatted: a run's finish writes one timestamp to
        four places, and formatting is a measurable share of a trivial run's cost."""
        ts = now if isinstance(now, str) else to_iso(now)
        payload = _encode(data)
        if self.redactor and self.redactor.contains(payload):
            payload = self.redactor.text(payload)
            data = json.loads(payload)
        cur = self.conn.execute(
            "INSERT INTO events(ts, kind, task_id, run_id, data) VALUES (?,?,?,?,?)",
            (ts, kind, task_id, run_id, payload),
        )
        self._pending_events.append(
            {
                "id": cur.lastrowid,
                "ts": ts,
                "kind": kind,
                "task_id": task_id,
                "run_id": run_id,
                "data": data,
            }
        )

    def _insert_events(self, events: Sequence[_NewEvent]) -> None:
        """``_event`` for many (ts, kind, task_id, run_id, data): one executemany. Their ids
        are the consecutive run ending at ``last_insert_rowid()``: inside the write
        transaction nothing else inserts, and AUTOINCREMENT hands out max + 1 each time."""
        if not events:
            return
        conn = self.conn
        rows = [
            (ts, kind, task_id, run_id, _encode(data)) for ts, kind, task_id, run_id, data in events
        ]
        redactor = self.redactor
        if redactor and any(redactor.contains(row[4]) for row in rows):
            # Rare: a secret in an event's data, scrubbed in both copies (the row and the
            # one the live views get). One search per event otherwise, no re-encoding.
            rows = [(*row[:4], redactor.text(row[4])) for row in rows]
            events = [(*ev[:4], json.loads(row[4])) for ev, row in zip(events, rows, strict=True)]
        conn.executemany(
            "INSERT INTO events(ts, kind, task_id, run_id, data) VALUES (?,?,?,?,?)", rows
        )
        first = conn.execute("SELECT last_insert_rowid()").fetchone()[0] - len(events) + 1
        self._pending_events.extend(
            {
                "id": first + i,
                "ts": ts,
                "kind": kind,
                "task_id": task_id,
                "run_id": run_id,
                "data": data,
            }
            for i, (ts, kind, task_id, run_id, data) in enumerate(events)
        )

    def emit(
        self,
        now: datetime,
        kind: EventKind,
        task_id: str | None = None,
        run_id: str | None = None,
        **data: Any,
    ) -> None:
        """Append an audit event inside the caller's ``tx()`` (for agentd's own modules
        that keep their tables in this file: ledger, alerts)."""
        self._event(now, kind, task_id, run_id, **data)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """One row as a dict (the record type the verb's signature names), or None."""
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row else None

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows as dicts (the record type the verb's signature names)."""
        return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    # ------------------------------------------------------------ tasks

    def sync_tasks(
        self,
        tasks: dict[str, tuple[str, str]],
        now: datetime,
        synced: dict[str, tuple[str, str]] | None = None,
        *,
        keep_absent: bool = False,
    ) -> None:
        """Record which tasks the config has (id -> (fingerprint, kind)); paused state survives.

        ``synced`` is what the last call recorded: then only the rows of tasks that
        differ from it are read and written: a reload that changes 100 of 10,000 tasks
        reads 100 rows, not 10,000."""
        ts = to_iso(now)
        with self.tx():
            if synced is None:
                rows = self._all("SELECT id, fingerprint, present FROM tasks")
            else:
                ids = [t for t, entry in tasks.items() if synced.get(t) != entry]
                ids += [t for t in synced if t not in tasks]
                if not ids:
                    return
                rows = self._all(
                    "SELECT id, fingerprint, present FROM tasks"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(ids),),
                )
                tasks = {t: tasks[t] for t in ids if t in tasks}
            known = {r["id"]: r for r in rows}
            # Each statement once over all the rows it touches, events in one insert, in
            # the order one-by-one writing gave (one at a time, a cold start with 10,000
            # tasks executed 20,000 statements).
            added: list[tuple[str, str, str, str]] = []
            changed: list[tuple[str, str, str, str]] = []
            gone: list[tuple[str, str]] = []
            events: list[_NewEvent] = []
            for task_id, (fingerprint, kind) in tasks.items():
                old = known.get(task_id)
                if old is None:
                    added.append((task_id, fingerprint, kind, ts))
                    events.append(
                        (ts, EventKind.TASK_ADDED, task_id, None, {"fingerprint": fingerprint})
                    )
                elif old["fingerprint"] != fingerprint or not old["present"]:
                    changed.append((fingerprint, kind, ts, task_id))
                    events.append(
                        (ts, EventKind.TASK_CHANGED, task_id, None, {"fingerprint": fingerprint})
                    )
            for task_id, old in known.items():
                if task_id not in tasks and old["present"] and not keep_absent:
                    gone.append((ts, task_id))
                    events.append((ts, EventKind.TASK_REMOVED, task_id, None, {}))
            conn = self.conn
            conn.executemany(
                "INSERT INTO tasks(id, fingerprint, kind, present, paused,"
                " consecutive_quarantines, updated_at) VALUES (?,?,?,1,0,0,?)",
                added,
            )
            conn.executemany(
                "UPDATE tasks SET fingerprint=?, kind=?, present=1, updated_at=? WHERE id=?",
                changed,
            )
            conn.executemany("UPDATE tasks SET present=0, updated_at=? WHERE id=?", gone)
            if gone or synced is None:
                events += self._cancel_orphans(ts)
            self._insert_events(events)

    def _cancel_orphans(self, ts: str) -> list[_NewEvent]:
        """Queued runs of tasks that are no longer in the config end ``cancelled``: nothing
        would ever claim them (a retry waiting for a task removed by a reload, or by a
        restart with another config). A task that comes back later starts afresh. Their
        cancel events, for the caller's insert."""
        rows = self.conn.execute(
            "SELECT r.id, r.task_id FROM runs r JOIN tasks t ON t.id = r.task_id"
            " WHERE r.status='queued' AND t.present=0"
        ).fetchall()
        if not rows:
            return []
        self.conn.executemany(
            "UPDATE runs SET status='cancelled', outcome='cancelled', finished_at=?,"
            " error='task removed from the config', not_before=NULL WHERE id=?",
            [(ts, run_id) for run_id, _ in rows],
        )
        log.warning(
            "cancelled %d queued run(s) of task(s) no longer in the config: %s",
            len(rows),
            " ".join(run_id for run_id, _ in rows),
        )
        return [
            (ts, EventKind.CANCEL, task_id, run_id, {"reason": "task_removed"})
            for run_id, task_id in rows
        ]

    def task_rows(self, ids: Sequence[str] | None = None) -> list[TaskRecord]:
        """Present tasks, or those of ``ids`` (one statement, any number of ids)."""
        if ids is None:
            return self._all("SELECT * FROM tasks WHERE present=1 ORDER BY id")
        return self._all(
            "SELECT * FROM tasks WHERE present=1 AND id IN (SELECT value FROM json_each(?))"
            " ORDER BY id",
            (json.dumps(list(ids)),),
        )

    def task_row(self, task_id: str) -> TaskRecord | None:
        return cast("TaskRecord | None", self._one("SELECT * FROM tasks WHERE id=?", (task_id,)))

    def paused_tasks(self) -> set[str]:
        return {r["id"] for r in self._all("SELECT id FROM tasks WHERE paused=1")}

    def pause(self, task_id: str, reason: str, now: datetime, actor: str = "operator") -> bool:
        """Idempotent: pausing a paused task changes nothing and returns False."""
        with self.tx():
            row = self._require_task(task_id)
            if row["paused"]:
                return False
            self.conn.execute(
                "UPDATE tasks SET paused=1, paused_reason=?, paused_at=? WHERE id=?",
                (reason, to_iso(now), task_id),
            )
            self._event(now, EventKind.PAUSE, task_id, reason=reason, by=actor)
            return True

    def resume(self, task_id: str, now: datetime) -> bool:
        with self.tx():
            row = self._require_task(task_id)
            if not row["paused"]:
                return False
            self.conn.execute(
                "UPDATE tasks SET paused=0, paused_reason=NULL, paused_at=NULL,"
                " consecutive_quarantines=0 WHERE id=?",
                (task_id,),
            )
            self._event(now, EventKind.RESUME, task_id)
            return True

    def _require_task(self, task_id: str) -> Row:
        row = self._one("SELECT * FROM tasks WHERE id=? AND present=1", (task_id,))
        if row is None:
            raise StateRefused("unknown_task", f"no task named {task_id!r}")
        return cast(Row, row)

    # ------------------------------------------------------------ enqueue

    def fire(
        self,
        task_id: str,
        now: datetime,
        *,
        scheduled_for: datetime | None = None,
        trigger: str = "schedule",
        overlap: str = "skip",
        max_queued: int = 10,
        key: str | None = None,
        honour_pause: bool = True,
        params: Row | None = None,
        key_window_s: float | None = None,
    ) -> FireResult:
        """Enqueue one run, at most once per idempotency key, applying the overlap policy.

        The key defaults to ``task@scheduled_for``: a fire that APScheduler repeats after
        a crash, or that two processes race on, lands on the same row.
        """
        fire = Fire(
            task_id, scheduled_for, trigger, overlap, max_queued, key, honour_pause, params,
            key_window_s,
        )  # fmt: skip
        [result] = self.fire_many([fire], now)
        if result.reason == "unknown_task":
            raise StateRefused("unknown_task", f"no task named {task_id!r}")
        if result.reason == "key_conflict":
            raise StateRefused(
                "idempotency_conflict",
                f"idempotency key already used for run {result.run_id} with other params",
            )
        return result

    def fire_many(self, fires: Sequence[Fire], now: datetime) -> list[FireResult]:
        """``fire`` for many, in order, as if one after the other, in one transaction.

        What each fire must look at (its key, its task, the task's active runs) is read
        for all of them at once, not one by one.
        A fire of a task not in the tasks table gets ``reason="unknown_task"``.
        """
        ts = to_iso(now)
        whens = [to_iso(f.scheduled_for) if f.scheduled_for else None for f in fires]
        keys = [
            f.key
            or (f"{f.task_id}@{when}" if when else f"{f.task_id}@manual:{secrets.token_hex(6)}")
            for f, when in zip(fires, whens, strict=True)
        ]
        ids = json.dumps(sorted({f.task_id for f in fires}))
        watched = json.dumps(sorted({f.task_id for f in fires if f.overlap != "allow"}))
        results: list[FireResult] = []
        with self.tx():
            conn = self.conn
            seen: dict[str, tuple[str, str, str, str | None]] = {
                k: (run_id, status, created, params)
                for k, run_id, status, created, params in conn.execute(
                    "SELECT idempotency_key, id, status, created_at, params FROM runs"
                    " WHERE idempotency_key IN (SELECT value FROM json_each(?))",
                    (json.dumps(keys),),
                )
            }
            paused: dict[str, int] = dict(
                conn.execute(
                    "SELECT id, paused FROM tasks WHERE present=1"
                    " AND id IN (SELECT value FROM json_each(?))",
                    (ids,),
                ).fetchall()
            )
            active: dict[str, list[Row]] = {}
            if watched != "[]":  # overlap=allow needs no look at what is active
                for run in self._all(
                    "SELECT id, task_id, status FROM runs WHERE status IN ('queued','running')"
                    " AND task_id IN (SELECT value FROM json_each(?))",
                    (watched,),
                ):
                    active.setdefault(run["task_id"], []).append(run)
            inserts: list[tuple[Any, ...]] = []
            events: list[_NewEvent] = []
            fresh_ids = self._fresh_run_ids(now, len(fires))
            queued: dict[str, int] = {}  # fires of each task this batch has queued
            for f, key, scheduled in zip(fires, keys, whens, strict=True):
                params = encode_params(f.params)
                if key in seen:
                    run_id, status, created, held = seen[key]
                    if f.key_window_s is None or from_iso(created) > now - timedelta(
                        seconds=f.key_window_s
                    ):
                        why = "duplicate" if held == params else "key_conflict"
                        results.append(FireResult(run_id, False, status, why))
                        continue
                    # The key's window is over: free it (the old run keeps its history
                    # under a retired key no request can send) for the run made now.
                    self.conn.execute(
                        "UPDATE runs SET idempotency_key=? WHERE id=?",
                        (f"{key} retired:{run_id}", run_id),
                    )
                    del seen[key]
                if f.task_id not in paused:
                    results.append(FireResult("", False, "", "unknown_task"))
                    continue
                if f.overlap == "cancel_previous" and inserts:
                    # What it cancels may be in this batch; its cancel events come after
                    # the events of the fires before it.
                    self._insert_runs(inserts)
                    self._insert_events(events)
                    events.clear()
                    queued.clear()  # inserted: admission sees them as the task's active runs
                skip, gate, verdict = self._fire_policy(
                    f, now, paused[f.task_id], active, queued.get(f.task_id, 0)
                )
                run_id = fresh_ids.pop()
                status = RunStatus.SKIPPED if skip else RunStatus.QUEUED
                when = scheduled or ts
                due = ts
                if verdict is not None:
                    events.append((ts, EventKind.ADMISSION, f.task_id, run_id, dict(verdict)))
                    if not skip and verdict.get("not_before"):
                        due = max(ts, str(verdict["not_before"]))
                inserts.append(
                    (
                        run_id, f.task_id, f.trigger, when, key, status, due, ts,
                        ts if skip else None, skip, "skipped" if skip else None, params,
                    )
                )  # fmt: skip
                seen[key] = (run_id, status, ts, params)
                if skip:
                    extra = {k: v for k, v in (gate or {}).items() if k != "reason"}
                    data = {"reason": skip, "scheduled_for": when, **extra}
                    events.append((ts, EventKind.SKIP, f.task_id, run_id, data))
                else:
                    active.setdefault(f.task_id, []).append(
                        {"id": run_id, "task_id": f.task_id, "status": RunStatus.QUEUED}
                    )
                    queued[f.task_id] = queued.get(f.task_id, 0) + 1
                    data = {"trigger": f.trigger, "scheduled_for": when}
                    if due != ts:
                        data["not_before"] = due
                    events.append((ts, EventKind.ENQUEUE, f.task_id, run_id, data))
                results.append(FireResult(run_id, True, status, skip))
            self._insert_runs(inserts)
            self._insert_events(events)
        return results

    def _fresh_run_ids(self, now: datetime, count: int) -> list[str]:
        """``count`` new run ids that no run has (inside the write transaction, so none
        can be taken before they are used), last to be used first. A collision with a
        stored run or within the batch draws again: a batch is never lost to one."""
        ids = [self.new_run_id(now) for _ in range(count)]
        for _ in range(MAX_ID_DRAWS):
            taken = {
                row[0]
                for row in self.conn.execute(
                    "SELECT id FROM runs WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(ids),),
                )
            }
            seen: set[str] = set()
            clashes = 0
            for i, run_id in enumerate(ids):
                if run_id in taken or run_id in seen:
                    ids[i] = self.new_run_id(now)
                    clashes += 1
                seen.add(ids[i])
            if not clashes:
                ids.reverse()
                return ids
            log.warning("%d new run id(s) were taken already; drew them again", clashes)
        raise StateRefused("run_id_collision", f"new run ids kept colliding ({MAX_ID_DRAWS} draws)")

    def _insert_runs(self, rows: list[tuple[Any, ...]]) -> None:
        """New runs from ``fire_many``, in one statement; empties ``rows``."""
        self.conn.executemany(
            "INSERT INTO runs(id, task_id, trigger, scheduled_for, idempotency_key, status,"
            " attempt, failures, not_before, cancel_requested, created_at, finished_at,"
            " skip_reason, outcome, params) VALUES (?,?,?,?,?,?,0,0,?,0,?,?,?,?,?)",
            rows,
        )
        rows.clear()

    def _fire_policy(
        self, f: Fire, now: datetime, paused: int, active: dict[str, list[Row]], queued: int
    ) -> tuple[str | None, Row | None, Row | None]:
        """Why this fire is skipped (and the budget gate's details), or None, and the
        admission verdict (``fire_admission``, asked with the fires of this task the batch
        has queued before it), if any. A ``cancel_previous`` fire cancels what is active
        here and updates ``active``, unless admission skips it."""
        if f.honour_pause and paused:
            return "paused", None, None
        if f.honour_pause and self.fire_gate and (gate := self.fire_gate(f.task_id, now)):
            return str(gate.get("reason", "budget")), gate, None
        decision = overlap_decision(f.overlap, active.get(f.task_id, []), f.max_queued)
        if decision.skip:
            return decision.skip, None, None
        verdict = None
        if f.honour_pause and self.fire_admission:
            verdict = self.fire_admission(f, now, queued)
            if verdict is not None and verdict.get("decision") == "skip":
                return "admission", verdict, verdict
        if decision.cancel:
            still = []
            for run in decision.cancel:
                if self._request_cancel_locked(run, now, reason="cancel_previous") == "running":
                    still.append(run)
            active[f.task_id] = still
        return None, None, verdict

    def record_misfire(
        self, task_id: str, now: datetime, missed: list[datetime], reason: str
    ) -> None:
        """Fires dropped by the catch-up policy: counted and logged, never silently lost."""
        if not missed:
            return
        with self.tx():
            self._event(
                now,
                EventKind.MISFIRE,
                task_id,
                count=len(missed),
                reason=reason,
                first=to_iso(missed[0]),
                last=to_iso(missed[-1]),
            )

    # ------------------------------------------------------------ claim / lease

    def version(self) -> tuple[int, int]:
        """Changes since the last call compare unequal: rows this connection changed
        (a C counter, no SQL) and SQLite's ``data_version``, which moves when another
        connection (the CLI) commits. Lets a once-a-second idle check skip its reads when
        nothing can have changed: on a cold cache those reads were most of its cost."""
        conn = self.conn
        return conn.total_changes, int(conn.execute("PRAGMA data_version").fetchone()[0])

    def first_queued_at(self) -> datetime | None:
        """The earliest ``not_before`` of any queued run: one read on the (status,
        not_before) index, which tells the main loop's idle tick both whether anything is
        due and how long it may sleep."""
        row = self._one("SELECT MIN(not_before) AS t FROM runs WHERE status='queued'")
        return from_iso(row["t"]) if row and row["t"] else None

    def claim(
        self,
        now: datetime,
        owner: str,
        lease_s: float,
        limit: int,
        busy_tasks: set[str],
        allow_overlap: set[str],
        *,
        only_tasks: Sequence[str] | None = None,
    ) -> list[ClaimedRun]:
        """Take up to ``limit`` due runs under a lease; at most one per task unless allowed,
        counting the runs any process holds (``busy_tasks`` are this process's own);
        with ``only_tasks``, runs of those tasks alone."""
        if limit <= 0:
            return []
        claimed: list[Row] = []
        # Tasks that may not take (another) run now; overlap=allow tasks never are.
        excluded = set(busy_tasks) - allow_overlap
        allowed = json.dumps(sorted(allow_overlap))
        only = [] if only_tasks is None else [json.dumps(sorted(only_tasks))]
        expires = to_iso(_plus(now, lease_s))
        with self.tx():
            while len(claimed) < limit:
                # Due runs in due order, straight off the partial index idx_runs_due
                # (not_before, scheduled_for, created_at, id): the query stops after
                # ``want`` rows however long the queue. (A window function over every
                # queued run made each claim O(queue), half the CPU of draining 5,000
                # queued runs.) A run of a task
                # taken earlier in this round is skipped, and the next round's query
                # excludes that task: one task's backlog cannot hide another's run.
                want = limit - len(claimed)
                rows = self._all(
                    f"SELECT {CLAIM_COLUMNS} FROM runs r JOIN tasks t ON t.id = r.task_id"
                    " WHERE r.status='queued' AND r.not_before <= ? AND t.present=1"
                    " AND (t.paused=0 OR r.trigger IN ('manual','release'))"
                    " AND r.task_id NOT IN (SELECT value FROM json_each(?))"
                    f" AND {_NOT_RUNNING_ELSEWHERE}"
                    + (" AND r.task_id IN (SELECT value FROM json_each(?))" if only else "")
                    + " ORDER BY r.not_before, r.scheduled_for, r.created_at, r.id LIMIT ?",
                    (to_iso(now), json.dumps(sorted(excluded)), allowed, *only, want),
                )
                taken = []
                for row in rows:
                    if row["task_id"] in excluded:
                        continue
                    if row["task_id"] not in allow_overlap:
                        excluded.add(row["task_id"])
                    taken.append(row)
                self._claim_rows(taken, now, owner, expires)
                claimed += taken
                if len(rows) < want:
                    break  # that was every eligible due run
        return cast(list[ClaimedRun], claimed)

    def _claim_rows(self, rows: list[Row], now: datetime, owner: str, expires: str) -> None:
        """Each statement once over all the rows (executemany): row by row, three
        statements per run were most of a claim's cost."""
        if not rows:
            return
        ts = to_iso(now)
        for row in rows:
            row.update(status="running", attempt=row["attempt"] + 1, lease_owner=owner)
        self.conn.executemany(
            "UPDATE runs SET status='running', attempt=?, lease_owner=?,"
            " lease_expires_at=?, started_at=COALESCE(started_at, ?) WHERE id=?",
            [(row["attempt"], owner, expires, ts, row["id"]) for row in rows],
        )
        self.conn.executemany(
            "INSERT INTO attempts(run_id, attempt, worker, started_at) VALUES (?,?,?,?)",
            [(row["id"], row["attempt"], owner, ts) for row in rows],
        )
        self._insert_events(
            [
                (
                    ts,
                    EventKind.CLAIM,
                    row["task_id"],
                    row["id"],
                    {
                        "attempt": row["attempt"],
                        "lateness_s": round(
                            (now - from_iso(row["scheduled_for"])).total_seconds(), 6
                        ),
                    },
                )
                for row in rows
            ]
        )

    def heartbeat(
        self, run_ids: Sequence[str], owner: str, now: datetime, lease_s: float
    ) -> set[str]:
        """Extend leases in one statement, with one audit event per run (every lease/3,
        so a one-hour run adds about a hundred rows: cheap, and it shows liveness).
        Returns the runs of ``run_ids`` that ``owner`` no longer holds."""
        if not run_ids:
            return set()
        marks = ",".join("?" * len(run_ids))
        expires = to_iso(_plus(now, lease_s))
        with self.tx():
            rows = self._all(
                f"UPDATE runs SET lease_expires_at=? WHERE lease_owner=? AND status='running'"
                f" AND id IN ({marks}) RETURNING id, task_id",
                (expires, owner, *run_ids),
            )
            for row in rows:
                self._event(
                    now, EventKind.HEARTBEAT, row["task_id"], row["id"], lease_expires_at=expires
                )
        return set(run_ids) - {row["id"] for row in rows}

    def mark_started(self, run_id: str, task_id: str, now: datetime, workspace: str) -> None:
        """The executor is about to begin: separate from ``claim`` so the audit shows a run
        that was claimed but never started (workspace not writable, task removed)."""
        self.mark_started_many([(run_id, task_id, workspace)], now)

    def mark_started_many(self, runs: Sequence[tuple[str, str, str]], now: datetime) -> None:
        """``mark_started`` for (run_id, task_id, workspace) of each run a tick starts."""
        ts = to_iso(now)
        events = [
            (ts, EventKind.START, task_id, run_id, {"workspace": ws})
            for run_id, task_id, ws in runs
        ]
        if self._group_open:
            # One statement is atomic by itself: no savepoint around it.
            self._insert_events(events)
            return
        with self.tx():
            self._insert_events(events)

    def record_group(self, run_id: str, attempt: int, group: GroupRecord) -> None:
        """Record the process group an attempt just spawned, so that whoever recovers
        the run can end it first (``recover``). Outside a group this commits with
        ``synchronous=NORMAL``: the WAL write reaches the kernel, which is what survives
        a ``kill -9`` of the daemon; a power loss, which the record would not survive,
        ends the group too. (An fsync here was one more per command run.)"""
        sql = "UPDATE attempts SET pgid=?, pgid_start=?, boot_id=? WHERE run_id=? AND attempt=?"
        params = (group.pgid, group.start, group.boot, run_id, attempt)
        if self._group_open:
            with self.tx() as conn:
                conn.execute(sql, params)
            return
        conn = self.conn
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with self.tx() as conn:
                conn.execute(sql, params)
        finally:
            conn.execute("PRAGMA synchronous = FULL")

    def _recoverable(
        self, now: datetime, live: set[str], held: set[str], only: set[str] | None
    ) -> list[Row]:
        rows = self._all(
            "SELECT r.id, r.task_id, r.attempt, r.lease_owner, r.lease_expires_at, a.pgid,"
            " a.pgid_start, a.boot_id FROM runs r LEFT JOIN attempts a ON a.run_id = r.id"
            " AND a.attempt = r.attempt WHERE r.status='running'"
        )
        found = []
        for row in rows:
            if row["id"] in held or (only is not None and row["id"] not in only):
                continue
            owner_live = row["lease_owner"] in live
            expired = (row["lease_expires_at"] or "") < to_iso(now)
            if owner_live and not expired:
                continue
            found.append(row)
        return found

    def lost_groups(
        self,
        now: datetime,
        live_owners: set[str] | None = None,
        keep: set[str] | None = None,
    ) -> dict[str, GroupRecord]:
        """The process groups recorded for the attempts ``recover`` would re-queue now
        (same arguments), by run id: to be ended (``procs.end_groups``) before."""
        return {
            row["id"]: GroupRecord(row["pgid"], row["pgid_start"], row["boot_id"] or "")
            for row in self._recoverable(now, live_owners or set(), keep or set(), None)
            if row["pgid"] is not None and row["pgid_start"] is not None
        }

    def recover(
        self,
        now: datetime,
        owner: str,
        live_owners: set[str] | None = None,
        keep: set[str] | None = None,
        *,
        only: set[str] | None = None,
        ended: Mapping[str, GroupEnd] | None = None,
    ) -> list[str]:
        """Re-queue runs whose owner is gone or whose lease expired, except ``keep``
        (runs the caller still holds in memory, whatever their lease says); with
        ``only``, none but those.

        Called at start under the state-dir lock, every running row belongs to a dead
        process. The lost attempt costs nothing: the run did not fail, the daemon did.
        The caller has ended the attempts' process groups first (``lost_groups``);
        ``ended`` says what it found still alive, recorded as ``orphan_killed`` events.
        """
        live = live_owners or set()
        held = keep or set()
        found = ended or {}
        recovered: list[str] = []
        with self.tx():
            for row in self._recoverable(now, live, held, only):
                end = found.get(row["id"])
                if end is not None:
                    self._event(
                        now,
                        EventKind.ORPHAN_KILLED,
                        row["task_id"],
                        row["id"],
                        attempt=row["attempt"],
                        **end.data(),
                    )
                self.conn.execute(
                    "UPDATE runs SET status='queued', not_before=?, lease_owner=NULL,"
                    " lease_expires_at=NULL, cancel_requested=0 WHERE id=?",
                    (to_iso(now), row["id"]),
                )
                self.conn.execute(
                    "UPDATE attempts SET finished_at=?, outcome=?, error=? WHERE run_id=?"
                    " AND attempt=? AND finished_at IS NULL",
                    (to_iso(now), Outcome.LOST, "owner gone", row["id"], row["attempt"]),
                )
                self._event(
                    now,
                    EventKind.RECOVER,
                    row["task_id"],
                    row["id"],
                    attempt=row["attempt"],
                    previous_owner=row["lease_owner"],
                    by=owner,
                    pgid=row["pgid"],
                )
                recovered.append(row["id"])
        return recovered

    def cancel_requests(self, owner: str) -> list[str]:
        return [
            r["id"]
            for r in self._all(
                "SELECT id FROM runs WHERE status='running' AND cancel_requested=1"
                " AND lease_owner=?",
                (owner,),
            )
        ]

    # ------------------------------------------------------------ finishing

    def finish(
        self,
        run_id: str,
        now: datetime,
        *,
        outcome: Outcome,
        next_status: RunStatus,
        not_before: datetime | None = None,
        error: str | None = None,
        exit_code: int | None = None,
        http_status: int | None = None,
        duration_s: float | None = None,
        pause_after_failures: int = 0,
        cancel_reason: str | None = None,
        owner: str | None = None,
        attempt: int | None = None,
    ) -> Row:
        """Close the current attempt and move the run on, in one transaction.

        ``next_status`` is the runner's decision: SUCCEEDED, QUEUED (retry or resume),
        QUARANTINED or CANCELLED. Failures count toward retries; interrupts do not.
        Returns the run's id, task_id, attempt and failures, as they are now.
        """
        counted = outcome in (Outcome.FAILURE, Outcome.TIMEOUT)
        final = next_status not in _OPEN
        ts = to_iso(now)
        due = to_iso(not_before) if not_before else ts
        error = self.redactor.optional(error)
        with self.tx():
            # UPDATE, then SELECT the row: SQLite's RETURNING costs more than both together
            # (it goes through a temporary table), once per attempt, on the loop.
            matched = self.conn.execute(
                "UPDATE runs SET status=?, failures=failures+?, not_before=?, lease_owner=NULL,"
                " lease_expires_at=NULL, cancel_requested=0, outcome=?, exit_code=?, error=?,"
                f" duration_s=?, finished_at=? WHERE id=?{_FENCE}",
                (
                    next_status,
                    1 if counted else 0,
                    due,
                    outcome,
                    exit_code,
                    error,
                    duration_s,
                    ts if final else None,
                    run_id,
                    owner,
                    owner,
                    attempt,
                ),
            ).rowcount
            run = self._one("SELECT id, task_id, attempt, failures FROM runs WHERE id=?", (run_id,))
            if run is None:
                raise StateRefused("unknown_run", f"no run {run_id!r}")
            if not matched:
                raise StateRefused("lease_lost", f"run {run_id} is no longer held by {owner}")
            self.conn.execute(
                "UPDATE attempts SET finished_at=?, outcome=?, exit_code=?, http_status=?,"
                " error=?, duration_s=? WHERE run_id=? AND attempt=? AND finished_at IS NULL",
                (ts, outcome, exit_code, http_status, error, duration_s, run_id, run["attempt"]),
            )
            task_id = run["task_id"]
            self._event(
                ts,
                _FINISH_EVENT[outcome],
                task_id,
                run_id,
                attempt=run["attempt"],
                error=error,
                exit_code=exit_code,
                http_status=http_status,
                duration_s=duration_s,
            )
            if next_status == RunStatus.TIMED_OUT:
                self._event(
                    ts,
                    EventKind.RUN_TIMED_OUT,
                    task_id,
                    run_id,
                    error=error,
                    attempts=run["attempt"],
                    status_before=RunStatus.RUNNING,
                )
            if next_status == RunStatus.SUCCEEDED:
                self.conn.execute(
                    "UPDATE tasks SET last_run_at=?, last_outcome=?, last_success_at=?,"
                    " consecutive_quarantines=0 WHERE id=?",
                    (ts, outcome, ts, task_id),
                )
            else:
                self.conn.execute(
                    "UPDATE tasks SET last_run_at=?, last_outcome=? WHERE id=?",
                    (ts, outcome, task_id),
                )
            if next_status == RunStatus.QUEUED and counted:
                self._event(
                    ts,
                    EventKind.RETRY,
                    task_id,
                    run_id,
                    attempt=run["attempt"],
                    not_before=due,
                    failures=run["failures"],
                )
            elif next_status == RunStatus.QUARANTINED:
                self._quarantine_locked(run, now, error, pause_after_failures)
            elif next_status == RunStatus.CANCELLED and cancel_reason:
                self._event(ts, EventKind.CANCEL, task_id, run_id, reason=cancel_reason)
            return cast(Row, run)

    def finish_many(self, items: Sequence[Finish]) -> None:
        """``finish`` for the attempts a runner saw end since its last flush, in one
        transaction, each statement once over all of them (executemany), which costs the
        loop a fraction of finishing them one by one.

        All or nothing: a run that is not there undoes the batch (StateRefused), and the
        caller finishes them one by one to isolate it. A batch with a quarantine goes
        one by one too: a quarantine reads and counts the task's row, so its order
        against the others' success matters, and it is rare.
        """
        if not items:
            return
        if any(f.next_status == RunStatus.QUARANTINED for f in items):
            # One after the other, but still all or nothing: inside a unit (this one's
            # own, or the caller's), the batch is one savepoint.
            unit = self.unit()
            try:
                with self.tx():
                    for f in items:
                        self.finish(
                            f.run_id,
                            f.at,
                            outcome=f.outcome,
                            next_status=f.next_status,
                            not_before=f.not_before,
                            error=f.error,
                            exit_code=f.exit_code,
                            http_status=f.http_status,
                            duration_s=f.duration_s,
                            pause_after_failures=f.pause_after_failures,
                            cancel_reason=f.cancel_reason,
                            owner=f.owner,
                            attempt=f.attempt,
                        )
            except BaseException:
                unit.abort()
                raise
            unit.commit()
            return
        runs: list[tuple[Any, ...]] = []
        attempts: list[tuple[Any, ...]] = []
        events: list[_NewEvent] = []
        last: dict[str, tuple[str, Outcome]] = {}  # task -> (ts, outcome) of its last run
        succeeded: dict[str, str] = {}  # task -> ts of its last success
        scrub = self.redactor.optional
        for f in items:
            ts = to_iso(f.at)
            counted = f.outcome in (Outcome.FAILURE, Outcome.TIMEOUT)
            due = to_iso(f.not_before) if f.not_before else ts
            final = f.next_status not in _OPEN
            error = scrub(f.error)
            runs.append(
                (
                    f.next_status,
                    1 if counted else 0,
                    due,
                    f.outcome,
                    f.exit_code,
                    error,
                    f.duration_s,
                    ts if final else None,
                    f.run_id,
                    f.owner,
                    f.owner,
                    f.attempt,
                )
            )
            attempts.append(
                (
                    ts,
                    f.outcome,
                    f.exit_code,
                    f.http_status,
                    error,
                    f.duration_s,
                    f.run_id,
                    f.attempt,
                )
            )
            events.append(
                (
                    ts,
                    _FINISH_EVENT[f.outcome],
                    f.task_id,
                    f.run_id,
                    {
                        "attempt": f.attempt,
                        "error": error,
                        "exit_code": f.exit_code,
                        "http_status": f.http_status,
                        "duration_s": f.duration_s,
                    },
                )
            )
            if f.next_status == RunStatus.TIMED_OUT:
                data = {"error": error, "attempts": f.attempt, "status_before": RunStatus.RUNNING}
                events.append((ts, EventKind.RUN_TIMED_OUT, f.task_id, f.run_id, data))
            if not final and counted:
                events.append(
                    (
                        ts,
                        EventKind.RETRY,
                        f.task_id,
                        f.run_id,
                        {"attempt": f.attempt, "not_before": due, "failures": f.failures + 1},
                    )
                )
            if f.cancel_reason and f.next_status == RunStatus.CANCELLED:
                events.append(
                    (ts, EventKind.CANCEL, f.task_id, f.run_id, {"reason": f.cancel_reason})
                )
            last[f.task_id] = (ts, f.outcome)
            if f.next_status == RunStatus.SUCCEEDED:
                succeeded[f.task_id] = ts
        with self.tx():
            conn = self.conn
            updated = conn.executemany(
                "UPDATE runs SET status=?, failures=failures+?, not_before=?, lease_owner=NULL,"
                " lease_expires_at=NULL, cancel_requested=0, outcome=?, exit_code=?, error=?,"
                f" duration_s=?, finished_at=? WHERE id=?{_FENCE}",
                runs,
            ).rowcount
            if updated != len(items):
                raise self._why_not_finished(items)
            conn.executemany(
                "UPDATE attempts SET finished_at=?, outcome=?, exit_code=?, http_status=?,"
                " error=?, duration_s=? WHERE run_id=? AND attempt=? AND finished_at IS NULL",
                attempts,
            )
            # One row per task however many of its runs ended: the last one's time and
            # outcome, and a success resets the quarantine streak as ``finish`` does.
            conn.executemany(
                "UPDATE tasks SET last_run_at=?, last_outcome=?, last_success_at=?,"
                " consecutive_quarantines=0 WHERE id=?",
                [(*last[t], succeeded[t], t) for t in last if t in succeeded],
            )
            conn.executemany(
                "UPDATE tasks SET last_run_at=?, last_outcome=? WHERE id=?",
                [(*last[t], t) for t in last if t not in succeeded],
            )
            self._insert_events(events)

    def _why_not_finished(self, items: Sequence[Finish]) -> StateRefused:
        """The refusal for a batch in which some runs did not match: gone, or (fenced) no
        longer held by the finishing owner at that attempt."""
        ids = [f.run_id for f in items]
        marks = ",".join("?" * len(ids))
        found = {r[0] for r in self.conn.execute(f"SELECT id FROM runs WHERE id IN ({marks})", ids)}
        gone = [i for i in ids if i not in found]
        if gone:
            return StateRefused("unknown_run", f"{len(gone)} of the runs are gone")
        return StateRefused("lease_lost", "a run of the batch is no longer held by its finisher")

    def _quarantine_locked(
        self, run: Row, now: datetime, error: str | None, pause_after: int
    ) -> None:
        task_id = run["task_id"]
        self.conn.execute(
            "INSERT OR REPLACE INTO quarantine(run_id, task_id, quarantined_at, last_error,"
            " attempts) VALUES (?,?,?,?,?)",
            (run["id"], task_id, to_iso(now), error, run["attempt"]),
        )
        self._event(
            now, EventKind.QUARANTINE, task_id, run["id"], error=error, attempts=run["attempt"]
        )
        self.conn.execute(
            "UPDATE tasks SET consecutive_quarantines = consecutive_quarantines + 1 WHERE id=?",
            (task_id,),
        )
        task = self._one("SELECT * FROM tasks WHERE id=?", (task_id,))
        reason = (
            auto_pause_reason(task["consecutive_quarantines"], pause_after, bool(task["paused"]))
            if task
            else None
        )
        if reason:
            self.conn.execute(
                "UPDATE tasks SET paused=1, paused_reason=?, paused_at=? WHERE id=?",
                (reason, to_iso(now), task_id),
            )
            self._event(now, EventKind.PAUSE, task_id, reason=reason, by="agentd")

    def request_cancel(self, run_id: str, now: datetime) -> str:
        """Queued runs are cancelled at once; running ones are flagged for their runner.

        Returns the run's status afterwards. A finished run is a conflict, not a no-op:
        the caller asked for something that can no longer happen.
        """
        with self.tx():
            run = self._one("SELECT * FROM runs WHERE id=?", (run_id,))
            if run is None:
                raise StateRefused("unknown_run", f"no run {run_id!r}")
            if run["status"] not in ACTIVE_STATUSES | {RunStatus.AWAITING_APPROVAL}:
                raise StateRefused(
                    "run_finished", f"run {run_id} already ended with status {run['status']}"
                )
            return self._request_cancel_locked(run, now, reason="operator")

    def _request_cancel_locked(self, run: Row, now: datetime, reason: str) -> str:
        if run["status"] in (RunStatus.QUEUED, RunStatus.AWAITING_APPROVAL):
            self.conn.execute(
                "UPDATE runs SET status='cancelled', outcome='cancelled', finished_at=? WHERE id=?",
                (to_iso(now), run["id"]),
            )
            self._event(now, EventKind.CANCEL, run.get("task_id"), run["id"], reason=reason)
            return RunStatus.CANCELLED
        self.conn.execute("UPDATE runs SET cancel_requested=1 WHERE id=?", (run["id"],))
        self._event(now, EventKind.CANCEL_REQUESTED, run.get("task_id"), run["id"], reason=reason)
        return RunStatus.RUNNING

    # ------------------------------------------------------------ quarantine

    def quarantine_list(self) -> list[QuarantineRecord]:
        return self._all(
            "SELECT q.*, r.scheduled_for, r.trigger FROM quarantine q JOIN runs r"
            " ON r.id = q.run_id ORDER BY q.quarantined_at DESC"
        )

    def quarantine_get(self, run_id: str) -> Row:
        row = self._one("SELECT * FROM quarantine WHERE run_id=?", (run_id,))
        if row is None:
            raise StateRefused("not_quarantined", f"run {run_id!r} is not in quarantine")
        return cast(Row, row)

    def quarantine_release(self, run_id: str, now: datetime) -> None:
        """Back to the queue as a new attempt with a fresh retry budget."""
        with self.tx():
            row = self._one("SELECT * FROM quarantine WHERE run_id=?", (run_id,))
            if row is None:
                raise StateRefused("not_quarantined", f"run {run_id!r} is not in quarantine")
            self.conn.execute("DELETE FROM quarantine WHERE run_id=?", (run_id,))
            self.conn.execute(
                "UPDATE runs SET status='queued', failures=0, not_before=?, finished_at=NULL,"
                " trigger='release' WHERE id=?",
                (to_iso(now), run_id),
            )
            self._event(now, EventKind.RELEASE, row["task_id"], run_id)

    def resume_run(self, run_id: str, now: datetime) -> Row:
        """A run that ended ``budget_exhausted`` back in the queue as a new attempt (its
        checkpoint and agent steps kept: it goes on where it stopped)."""
        with self.tx():
            run = self._one("SELECT id, task_id, status FROM runs WHERE id=?", (run_id,))
            if run is None:
                raise StateRefused("unknown_run", f"no run {run_id!r}")
            if run["status"] != RunStatus.BUDGET_EXHAUSTED:
                raise StateRefused(
                    "not_resumable",
                    f"run {run_id} is {run['status']}: only a budget_exhausted run resumes",
                )
            self.conn.execute(
                "UPDATE runs SET status='queued', not_before=?, finished_at=NULL WHERE id=?",
                (to_iso(now), run_id),
            )
            self._event(now, EventKind.RUN_RESUMED, run["task_id"], run_id)
            return {"run_id": run_id, "status": str(RunStatus.QUEUED)}

    def quarantine_drop(self, run_id: str, now: datetime) -> None:
        """Acknowledge and forget: out of quarantine, the run's status ``dropped`` (so
        ``status=quarantined`` lists only runs still in quarantine), kept as history."""
        with self.tx():
            row = self._one("SELECT * FROM quarantine WHERE run_id=?", (run_id,))
            if row is None:
                raise StateRefused("not_quarantined", f"run {run_id!r} is not in quarantine")
            self.conn.execute("DELETE FROM quarantine WHERE run_id=?", (run_id,))
            self.conn.execute("UPDATE runs SET status='dropped' WHERE id=?", (run_id,))
            self._event(now, EventKind.DROP, row["task_id"], run_id)

    # ------------------------------------------------------------ checkpoints, progress

    def load_checkpoint(self, run_id: str) -> Any | None:
        row = self._one("SELECT data FROM checkpoints WHERE run_id=?", (run_id,))
        return json.loads(row["data"]) if row else None

    def save_checkpoint(self, run_id: str, data: Any, now: datetime) -> int:
        blob = json.dumps(data)
        with self.tx():
            row = self._one("SELECT seq, run_id FROM checkpoints WHERE run_id=?", (run_id,))
            seq = (row["seq"] if row else 0) + 1
            self.conn.execute(
                "INSERT OR REPLACE INTO checkpoints(run_id, data, seq, saved_at) VALUES (?,?,?,?)",
                (run_id, blob, seq, to_iso(now)),
            )
            task = self._one("SELECT task_id FROM runs WHERE id=?", (run_id,))
            self._event(
                now, EventKind.CHECKPOINT, task["task_id"] if task else None, run_id, seq=seq
            )
            return seq

    def progress(
        self,
        run_id: str,
        done: int,
        total: int | None,
        message: str,
        now: datetime,
        eta: str | None = None,
    ) -> None:
        with self.tx():
            self.conn.execute(
                "UPDATE runs SET progress_done=?, progress_total=?, progress_message=? WHERE id=?",
                (done, total, self.redactor.text(message[:500]), run_id),
            )
            task = self._one("SELECT task_id FROM runs WHERE id=?", (run_id,))
            self._event(
                now,
                EventKind.PROGRESS,
                task["task_id"] if task else None,
                run_id,
                done=done,
                total=total,
                message=message[:500],
                **({"eta": eta} if eta else {}),
            )

    # ------------------------------------------------------------ reads

    def recent_alerts(self, limit: int) -> list[Row]:
        """The newest ``limit`` alerts, newest first, each with its ``deliveries``."""
        rows = self._all("SELECT * FROM alerts ORDER BY id DESC LIMIT ?", (limit,))
        for row in rows:
            row["data"] = json.loads(row["data"])
            row["deliveries"] = self._all(
                "SELECT channel, status, attempts, last_error, delivered_at FROM outbox"
                " WHERE alert_id=? ORDER BY id",
                (row["id"],),
            )
        return rows

    def running_ids(self, owner: str) -> set[str]:
        """The runs the state records as ``running`` under ``owner``."""
        rows = self.conn.execute(
            "SELECT id FROM runs WHERE status='running' AND lease_owner=?", (owner,)
        ).fetchall()
        return {row[0] for row in rows}

    def get_run(self, run_id: str) -> RunRecord:
        row = self._one("SELECT * FROM runs WHERE id=?", (run_id,))
        if row is None:
            raise StateRefused("unknown_run", f"no run {run_id!r}")
        row["params"] = decode_params(row["params"])
        return cast(RunRecord, row)

    def list_runs(
        self,
        task_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[RunRecord]:
        """Newest first; page with ``before_id`` (the last id of the previous page).
        ``since``/``until`` bound ``created_at`` (ISO text, compared as stored)."""
        where, params = [], []
        if status in ("queued", "running"):
            # Literal, so the partial index of that status serves it (see _migrate_5).
            where.append(f"status='{status}'")
            status = None
        for clause, value in (
            ("task_id=?", task_id),
            ("status=?", status),
            ("id<?", before_id),
            ("created_at>=?", since),
            ("created_at<?", until),
        ):
            if value:
                where.append(clause)
                params.append(value)
        sql_where = ("WHERE " + " AND ".join(where)) if where else ""
        rows: list[RunRecord] = self._all(
            f"SELECT * FROM runs {sql_where} ORDER BY id DESC LIMIT ?", (*params, limit)
        )
        for row in rows:
            row["params"] = decode_params(row["params"])
        return rows

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        return self._all("SELECT * FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,))

    def events(
        self, run_id: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        if run_id:
            rows = self._all(
                "SELECT * FROM events WHERE run_id=? AND id>? ORDER BY id LIMIT ?",
                (run_id, after_id, limit),
            )
        else:
            rows = self._all(
                "SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?", (after_id, limit)
            )
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    def probe_write(self, now: datetime) -> None:
        """A real page write, so a full disk or read-only file shows up as an error."""
        with self.tx():
            self.conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('last_probe', ?)", (to_iso(now),)
            )

    def latest_event_id(self) -> int:
        row = self._one("SELECT COALESCE(MAX(id), 0) AS id FROM events")
        return int(row["id"]) if row else 0

    def recent_events(self, limit: int = 50) -> list[EventRecord]:
        """The newest ``limit`` events, oldest first."""
        rows = self._all("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows[::-1]

    def gauge_counts(self) -> tuple[int, int]:
        """Queued runs and quarantined runs, for gauges refreshed every second: indexed
        counts, where ``counts()`` walks every row of the runs history."""
        queued = self._one("SELECT COUNT(*) AS n FROM runs WHERE status='queued'")
        quarantined = self._one("SELECT COUNT(*) AS n FROM quarantine")
        return (queued["n"] if queued else 0), (quarantined["n"] if quarantined else 0)

    def counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        result = {r["status"]: r["n"] for r in rows}
        q = self._one("SELECT COUNT(*) AS n FROM quarantine")
        result["in_quarantine"] = q["n"] if q else 0
        return result

    def active_runs(self, task_id: str) -> list[RunRecord]:
        rows: list[RunRecord] = self._all(
            "SELECT * FROM runs WHERE task_id=? AND status IN ('queued','running')", (task_id,)
        )
        for row in rows:
            row["params"] = decode_params(row["params"])
        return rows


_FINISH_EVENT = {
    Outcome.SUCCESS: EventKind.SUCCESS,
    Outcome.FAILURE: EventKind.FAILURE,
    Outcome.TIMEOUT: EventKind.TIMEOUT,
    Outcome.CANCELLED: EventKind.CANCEL,
    Outcome.INTERRUPTED: EventKind.INTERRUPT,
    Outcome.LOST: EventKind.RECOVER,
    Outcome.BUDGET_EXHAUSTED: EventKind.BUDGET_EXHAUSTED,
    Outcome.PARKED: EventKind.AWAITING_APPROVAL,
    Outcome.EXPIRED: EventKind.RUN_EXPIRED,
}
_OPEN = (RunStatus.QUEUED, RunStatus.AWAITING_APPROVAL)
"""Where a finish leaves a run unfinished (no ``finished_at``)."""


def _run_hooks(hooks: list[Callable[[], None]]) -> None:
    for undo in hooks:
        try:
            undo()
        except Exception:
            log.exception("undoing in-memory work of a rolled-back group failed")


def _plus(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


@_speak_the_port
class _Unit:
    """A handle on ``SqliteStore``'s open group: the owner's ends it, a joined one's
    ``commit``/``abort`` do nothing (``agentd.state.port.UnitOfWork``)."""

    __slots__ = ("_store", "owner")

    def __init__(self, store: SqliteStore, *, owner: bool) -> None:
        self._store = store
        self.owner = owner

    def on_rollback(self, undo: Callable[[], None]) -> None:
        self._store._after_rollback(undo)

    def commit(self) -> None:
        if self.owner:
            self._store._commit_group()

    def commit_off_loop(self) -> Future[BaseException | None] | None:
        return self._store._commit_group_off_loop() if self.owner else None

    def abort(self) -> None:
        if self.owner:
            self._store._abort_group()


def _implements_the_port(engine: SqliteStore) -> Store:
    """Never called: mypy checks here that ``SqliteStore`` implements the port."""
    return engine
