"""The PostgreSQL engine behind ``agentd.state.port.Store``: agentd's state in a database
that several nodes (and a CLI beside each) share.

Invariants, and how this engine keeps them:

- **Writers side by side where that is safe, one at a time where it is not.** Every
  write transaction (a verb's own, or a unit of work from its first write) takes one
  transaction-level advisory lock, ``WRITE_LOCK``, which PostgreSQL releases at its
  commit or rollback, in one of two modes:

  - *shared*, by the runner's verbs, whose writes are safe beside each other: claims
    (rows locked as they are read, ``FOR UPDATE SKIP LOCKED``; a task that may not
    overlap is taken under a per-task ``pg_try_advisory_xact_lock``, then looked at
    again), starts, heartbeats, finishes without a quarantine (fenced by lease owner
    and attempt), checkpoints, progress, process groups, budget reservations (their
    own per-scope locks, see ``ledger``), a node's own registry row, events alone;
  - *exclusive*, by every verb whose reads decide its writes (a fire's overlap check,
    sync, pause, cancel, recovery, a quarantine's auto-pause, the alert outbox's
    cursor, retention): SQLite's ``BEGIN IMMEDIATE`` across nodes; it waits for the
    shared holders to commit and holds every other writer off until its own commit.

  What shared writers would otherwise contend for waits until the commit (``_Pending``):
  the events and the tasks' last outcomes are written in the commit's round trip,
  after the version counter's row, which every write transaction updates first and
  which stays locked until its commit. So event ids increase in commit order (readers
  page the event log by id: an id committed after a higher one would be skipped for
  good), and no shared writer holds a task's row while it runs. A shared transaction
  waits for no lock but the write lock and that row at its commit, so writers cannot
  deadlock (only a shared holder that asks for the exclusive mode could, and the
  runner's units never do; PostgreSQL would end one). Any lock is waited for at most
  ``lock_timeout`` (a ``StorageFault`` after that).
- **One connection, reads on it.** The unit's transaction is the connection's; reads
  inside a unit see its writes (the port requires it), reads outside one are each their
  own autocommit statement and see everything committed. A pool would give a
  single-threaded loop nothing. A connection found broken is replaced at the next use
  outside a unit; inside a unit, the unit is lost (``WriteLost``) until its owner ends it.
- **Events after their commit.** As on SQLite: appended in the change's transaction,
  handed to ``event_sink`` once its owner's commit succeeded, in order, once.
- **Errors are the port's.** Every public method raises ``StorageFault`` for a failure
  of the server or the connection (``psycopg.OperationalError``: a lost connection, an
  administrator's shutdown, a full disk, a lock timeout; and a server that takes no
  writes) and ``StorageError`` for any
  other of psycopg's errors, the driver's error as ``__cause__``.
- **``version()``** is a counter row (``meta.version_counter``) that every write
  transaction bumps in the same round trip as its ``COMMIT``: it moves at the commit of
  any change by any agentd process, never before (a reader that saw it move reads the
  change), and costs a reader one primary-key lookup. A write by hand (psql) does not
  move it.
- **Change notices** are ``NOTIFY agentd_changes`` sent after the commit on a connection
  of their own (``announce_change``, from a background thread: never inside a write
  transaction, where a NOTIFY would serialise every commit behind a global lock), and
  ``LISTEN`` on another one that the event loop reads (``watch``).
- **The schema** is created from ``agentd.state.schema.metadata`` (its DDL compiled for
  PostgreSQL by SQLAlchemy, executed with psycopg) on the first open, under a
  transaction-level advisory lock (``MIGRATE_LOCK``), so several nodes that start
  together create it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from agentd.clock import from_iso, to_iso
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
from agentd.state.postgres.alerts import AlertStatements
from agentd.state.postgres.ledger import LedgerStatements
from agentd.state.postgres.nodes import NodeStatements
from agentd.state.postgres.steps import StepStatements, steps_table_ddl
from agentd.state.schema import metadata

log = logging.getLogger("agentd.state.postgres")

Conn = psycopg.Connection[dict[str, Any]]

SCHEMA_VERSION = 5
"""This engine's schema version: 1 is ``state.schema.metadata`` as first released;
each later one is ``UPGRADES[n]`` from the one before. A new database is created from
the metadata as it is now, at this version."""
WRITE_LOCK = 0x61676E74_64570001
"""The advisory lock every write transaction holds, shared or exclusive (see the
module's first invariant).
Advisory locks are per database: another database on the server is not held up."""
_NO_LOCK, _SHARED, _EXCLUSIVE = 0, 1, 2
_LOCK_FUNCTION = {_SHARED: "pg_advisory_xact_lock_shared", _EXCLUSIVE: "pg_advisory_xact_lock"}
_PAYLOAD = "_payload"
"""A pending event's encoded ``data``, as it will be inserted (redacted)."""
MIGRATE_LOCK = 0x61676E74_644D0001
"""The advisory lock of the schema's creation and migrations."""
CHANNEL = "agentd_changes"
"""The NOTIFY channel of change notices; the payload is the announcing store's token."""
LOCK_TIMEOUT_MS = 10_000
"""How long a transaction waits for a lock (the write lock, a row) before it fails with
a ``StorageFault``: SQLite's busy timeout."""
CONNECT_TIMEOUT_S = 10
RELISTEN_S = 1.0
"""After the LISTEN connection is lost, the delay before ``watch`` connects again."""
MAX_ID_DRAWS = 5
"""Draws of fresh ids for a batch whose ids collide before ``fire_many`` gives up."""


def is_storage_fault(exc: BaseException) -> bool:
    """A failure of the server or the connection (lost, shut down, disk full, a lock
    timeout, a deadlock; a server that takes no writes: a standby, a read-only
    database), as opposed to a refused request or a constraint."""
    return isinstance(
        exc, (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction, StorageFault)
    )


def neutral(exc: BaseException) -> BaseException:
    """The port's exception for one of psycopg's: a storage fault is a ``StorageFault``,
    any other ``psycopg.Error`` a ``StorageError``, each with the same message; anything
    else is returned as it is."""
    if not isinstance(exc, psycopg.Error):
        return exc
    kind = StorageFault if is_storage_fault(exc) else StorageError
    out = kind(str(exc).strip() or type(exc).__name__)
    out.__cause__ = exc
    return out


def _translated(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def verb(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except psycopg.Error as exc:
            raise neutral(exc) from exc

    return verb


def _speak_the_port(cls: type) -> type:
    """Class decorator: every public method of ``cls`` (and of its mixins) raises the
    port's exceptions, never psycopg's. Inside, the engine works with psycopg's own."""
    for klass in reversed(cls.__mro__[:-1]):
        for name, member in vars(klass).items():
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            if inspect.iscoroutinefunction(member) or inspect.isgeneratorfunction(member):
                continue
            setattr(cls, name, _translated(member))
    return cls


@dataclass
class _Pending:
    """What a transaction writes only at its commit (``PostgresStore._commit``): its
    events, each with its encoded payload under ``_PAYLOAD`` until then, numbered by the
    insert; and, from verbs that hold the write lock shared, the tasks' last outcomes
    (task, finished at, outcome, succeeded), in the order they happened."""

    events: list[Row] = field(default_factory=list)
    outcomes: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def mark(self) -> tuple[int, int]:
        return len(self.events), len(self.outcomes)

    def trim(self, mark: tuple[int, int]) -> None:
        """Forget what came after ``mark`` (a savepoint rolled back)."""
        del self.events[mark[0] :]
        del self.outcomes[mark[1] :]

    def folded_outcomes(self) -> tuple[list[str], list[str], list[str], list[str | None]]:
        """``_TASK_OUTCOMES``'s arrays: per task, its last outcome and its last success."""
        last: dict[str, tuple[str, str]] = {}
        success: dict[str, str] = {}
        for task_id, ts, outcome, succeeded in self.outcomes:
            last[task_id] = (ts, outcome)
            if succeeded:
                success[task_id] = ts
        ids = sorted(last)
        return (
            ids,
            [last[t][0] for t in ids],
            [last[t][1] for t in ids],
            [success.get(t) for t in ids],
        )


_TASK_OUTCOMES = (
    "UPDATE tasks AS t SET last_run_at = u.ts, last_outcome = u.outcome,"
    " last_success_at = COALESCE(u.success, t.last_success_at),"
    " consecutive_quarantines = CASE WHEN u.success IS NULL"
    " THEN t.consecutive_quarantines ELSE 0 END"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS u(id, ts, outcome, success)"
    " WHERE t.id = u.id"
)
"""The tasks' last outcomes of one transaction, written at its commit (``_Pending``)."""

_NewEvent = tuple[str, EventKind, str | None, str | None, Row]
"""An event to insert: (ts, kind, task_id, run_id, data)."""
_encode = json.JSONEncoder(default=str, sort_keys=True).encode

CLAIM_COLUMNS = (
    "r.id, r.task_id, r.trigger, r.scheduled_for, r.idempotency_key, r.status, r.attempt,"
    " r.failures, r.not_before, r.created_at, r.params"
)
"""What a claimed run's row carries (all a runner needs)."""

_INSERT_EVENTS = (
    "INSERT INTO events(ts, kind, task_id, run_id, data)"
    " SELECT ts, kind, task_id, run_id, data FROM unnest("
    "%s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
    " WITH ORDINALITY AS e(ts, kind, task_id, run_id, data, n) ORDER BY n RETURNING id"
)
"""Many events in one statement (one round trip): inserted, and so numbered, in the
order given; their ids come back (sorted, they are that order)."""


def schema_ddl() -> list[str]:
    """The statements that create ``state.schema.metadata`` on PostgreSQL, in order."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    out: list[str] = []
    for table in metadata.sorted_tables:
        out.append(str(CreateTable(table).compile(dialect=dialect)).strip())
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            out.append(str(CreateIndex(index).compile(dialect=dialect)).strip())
    return out


def _index_ddl(name: str) -> list[str]:
    """Drop and create again one index of ``state.schema.metadata``, as it is now."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    [index] = [i for t in metadata.sorted_tables for i in t.indexes if i.name == name]
    return [f"DROP INDEX IF EXISTS {name}", str(CreateIndex(index).compile(dialect=dialect))]


UPGRADES: dict[int, Callable[[], list[str]]] = {
    2: lambda: _index_ddl("idx_runs_due"),  # the claim's whole ORDER BY in the index
    3: steps_table_ddl,  # an agent run's durable steps
    4: lambda: _index_ddl("idx_runs_parked"),  # the approval timeout's sweep
    5: lambda: ["ALTER TABLE runs ADD COLUMN IF NOT EXISTS params TEXT"],  # trigger params
}
"""The statements that bring a database from the schema version before each key to
that version (this engine's own numbering; SQLite's is ``state.sqlite.migrations``)."""


_FENCE = " AND (%s::text IS NULL OR (status='running' AND lease_owner=%s AND attempt=%s::integer))"
"""The lease fence of a finish (``Finish.owner``): with no owner given, none."""


@_speak_the_port
class PostgresStore(LedgerStatements, AlertStatements, NodeStatements, StepStatements):
    """The PostgreSQL engine behind ``agentd.state.port.Store`` (see the module)."""

    shared = True
    """Every node pointed at the database runs on this state at once."""

    def __init__(
        self,
        url: str,
        event_sink: EventSink | None = None,
        *,
        password: str | None = None,
        lock_timeout_ms: int = LOCK_TIMEOUT_MS,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """Connect to ``url`` (a libpq URL or conninfo) and create the schema if the
        database has none yet. ``password``, when given, is passed apart from the URL so
        that it appears in no URL, log line or error message."""
        self.url = url
        self._password = password
        self._lock_timeout_ms = int(lock_timeout_ms)
        self._connect_timeout_s = connect_timeout_s
        self.read_only = False
        self.new_run_id: Callable[[datetime], str] = RunIds()
        self.event_sink = event_sink
        self.redactor: Redactor = NOTHING
        """Secret values scrubbed from every text written here (see the port)."""
        self.fire_gate: FireGate | None = None
        """Asked inside ``fire()``'s transaction for scheduled fires (see the port)."""
        self.fire_admission: FireAdmission | None = None
        """Cost-aware admission of scheduled fires (``port.FireAdmission``), or None."""
        self.on_write: WriteListener | None = None
        self.write_error: str | None = None
        self._pending = _Pending()
        """What the open transaction writes at its commit (see ``_commit``)."""
        self._group_open = False
        self._group_begun = False
        """The open unit's transaction has begun on the server (at its first write)."""
        self._lock_held = _NO_LOCK
        """The write lock's mode the open transaction holds (``_SHARED``, ``_EXCLUSIVE``)."""
        self._tx_open = False
        """A ``tx()`` of its own (outside a unit) is open."""
        self._group_lost: BaseException | None = None
        self._rollback_hooks: list[Callable[[], None]] = []
        self._inflight: Future[BaseException | None] | None = None
        self._inflight_pending = _Pending()
        self._inflight_hooks: list[Callable[[], None]] = []
        self._writer: ThreadPoolExecutor | None = None
        self._token = secrets.token_hex(8)
        """This instance's name in its own change notices, which its ``watch`` ignores."""
        self._notifier: ThreadPoolExecutor | None = None
        self._notify_conn: psycopg.Connection[Any] | None = None
        self._notify_queued = False
        self._notify_lock = threading.Lock()
        self._listen: _Listener | None = None
        self._reconnecting = False
        self._closed = False
        self._conn: Conn = self._connect()
        try:
            self._migrate()
        except psycopg.Error as exc:
            self._conn.close()
            raise neutral(exc) from exc
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------ plumbing

    def _connect(self) -> Conn:
        """A new connection in autocommit mode (transactions are explicit) that returns
        rows as dicts and waits at most the lock timeout for any lock."""
        try:
            return psycopg.connect(
                self.url,
                password=self._password,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, int(self._connect_timeout_s)),
                options=f"-c lock_timeout={self._lock_timeout_ms}",
                application_name="agentd",
            )
        except psycopg.Error as exc:
            raise neutral(exc) from exc

    def _migrate(self) -> None:
        """Create the schema, or check it, under ``MIGRATE_LOCK``: of several nodes that
        open a new database at once, the first creates it and the others find it."""
        conn = self._conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            exists = conn.execute("SELECT to_regclass('meta') IS NOT NULL AS e").fetchone()
            version = 0
            if exists and exists["e"]:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row["value"]) if row else 0
            if version > SCHEMA_VERSION:
                raise StateRefused(
                    "schema_too_new",
                    f"the state database has schema version {version}; this agentd knows"
                    f" up to {SCHEMA_VERSION}. Upgrade agentd or use another database.",
                )
            if 0 < version < SCHEMA_VERSION:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    if step not in UPGRADES:
                        raise StateRefused(
                            "schema_too_old",
                            f"the state database has schema version {version}, which this"
                            f" agentd cannot upgrade to {SCHEMA_VERSION}",
                        )
                    for ddl in UPGRADES[step]():
                        conn.execute(ddl)
                conn.execute(
                    "UPDATE meta SET value=%s WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                )
                log.info(
                    "state database schema upgraded from version %d to %d",
                    version,
                    SCHEMA_VERSION,
                )
            if version == 0:
                for ddl in schema_ddl():
                    conn.execute(ddl)
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', %s),"
                    " ('version_counter', '0')",
                    (str(SCHEMA_VERSION),),
                )
                log.info("state database schema created (version %d)", SCHEMA_VERSION)

    @property
    def conn(self) -> Conn:
        """The connection, once any commit on the writer thread has finished; a broken
        one is replaced first, unless a unit is open on it (that unit is lost)."""
        if self._inflight is not None:
            self.complete_commit()
        if self._closed:
            raise StorageError("the state store is closed")
        if self._conn.closed and not (self._group_open and self._group_begun):
            if not self._reconnecting:  # one line per outage, not one per use
                log.warning("state database connection lost; connecting again")
                self._reconnecting = True
            self._conn = self._connect()
            self._reconnecting = False
            log.info("state database connected again")
        return self._conn

    def _begin(self, conn: Conn, shared: bool) -> None:
        """A write transaction holding the write lock in ``shared`` or exclusive mode
        (see the module), in one round trip."""
        mode = _SHARED if shared else _EXCLUSIVE
        conn.execute(f"BEGIN; SELECT {_LOCK_FUNCTION[mode]}({WRITE_LOCK})")
        self._lock_held = mode

    def _hold(self, conn: Conn, shared: bool) -> None:
        """Inside the open transaction: hold the write lock at least in this mode. A
        shared holder that asks for it exclusively waits until it is the only holder;
        two that do so at once deadlock, and PostgreSQL ends one (a ``StorageFault``).
        The runner's units ask only for shared mode, so that never happens to them."""
        mode = _SHARED if shared else _EXCLUSIVE
        if self._lock_held >= mode:
            return
        conn.execute(f"SELECT {_LOCK_FUNCTION[mode]}({WRITE_LOCK})")
        self._lock_held = mode

    def _commit(self, conn: Conn, pending: _Pending) -> None:
        """Bump the version counter, write what waited for the commit (the tasks' last
        outcomes, the events) and commit, in one round trip. The counter's row is locked
        until the commit, and every write transaction updates it first: so the events'
        ids are handed out in commit order, whoever else writes beside it, and the
        tasks' rows are written by one committer at a time (no shared writer locks them
        before, so none waits there). (In an aborted transaction the UPDATE fails, where
        a bare COMMIT would quietly roll back.)"""
        self._lock_held = _NO_LOCK
        events = pending.events
        with conn.pipeline():
            conn.execute(
                "UPDATE meta SET value = (value::bigint + 1)::text WHERE key='version_counter'"
            )
            if pending.outcomes:
                conn.execute(_TASK_OUTCOMES, pending.folded_outcomes())
            cur = (
                conn.execute(
                    _INSERT_EVENTS,
                    (
                        [ev["ts"] for ev in events],
                        [str(ev["kind"]) for ev in events],
                        [ev["task_id"] for ev in events],
                        [ev["run_id"] for ev in events],
                        [ev[_PAYLOAD] for ev in events],
                    ),
                )
                if events
                else None
            )
            conn.execute("COMMIT")
        if cur is not None:
            ids = sorted(row["id"] for row in cur.fetchall())
            for event, event_id in zip(events, ids, strict=True):
                event["id"] = event_id
                del event[_PAYLOAD]

    def _rollback(self, conn: Conn) -> None:
        self._lock_held = _NO_LOCK
        if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
            return
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")

    def _publish(self, events: list[Row]) -> None:
        if self.event_sink:
            for event in events:
                self.event_sink(event)

    @contextlib.contextmanager
    def tx(self, *, shared: bool = False) -> Iterator[Conn]:
        """One write transaction, holding the write lock from its start: exclusively,
        unless the verb is one whose writes are safe beside other writers (``shared``,
        see the module).

        Inside a unit it is a savepoint instead: its writes become durable with the
        unit's one commit, and a failure undoes only its own part -- unless the unit's
        transaction itself is gone (the connection lost), in which case the unit is lost
        and every later write in it raises ``WriteLost``. A storage fault in either case
        is reported to ``on_write``; a successful commit reports recovery.

        Inside another ``tx()`` (a statement mixin's, calling a verb) it is a savepoint
        too: only the outermost commits. (A second BEGIN would be only a warning to
        PostgreSQL, and the inner COMMIT would commit the outer transaction's half.)"""
        if self._group_open or self._tx_open:
            if self._group_lost is not None:
                raise WriteLost(f"the unit's transaction was rolled back: {self._group_lost}")
            mark = self._pending.mark()
            conn = self.conn
            self._lock_for_nested(conn, shared)
            try:
                conn.execute("SAVEPOINT tx")
                yield conn
                conn.execute("RELEASE SAVEPOINT tx")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK TO SAVEPOINT tx")
                    conn.execute("RELEASE SAVEPOINT tx")
                    self._pending.trim(mark)
                except psycopg.Error:
                    if self._group_open:
                        self._group_lost = exc
                    self._pending = _Pending()
                self._write_failed(exc)
                raise
            return
        try:
            conn = self.conn
            self._tx_open = True
            try:
                self._begin(conn, shared)  # BEGIN may succeed and the lock's wait fail
                yield conn
                self._commit(conn, self._pending)
            except BaseException:
                self._rollback(conn)
                self._pending = _Pending()
                raise
            finally:
                self._tx_open = False
        except BaseException as exc:
            self._write_failed(exc)
            raise
        self._write_ok()
        pending, self._pending = self._pending, _Pending()
        self._publish(pending.events)

    def unit(self, *, shared: bool = False) -> UnitOfWork:
        """Open a unit of work (see ``agentd.state.port``): the owner when no unit is
        open, else a handle that joins the open one (or the open ``tx()``, whose end
        commits or undoes it). An owner begins its transaction and takes the write lock
        exclusively now, so every read in it is under the lock; a ``shared`` one begins
        at its first write, in that verb's mode (its verbs are the runner's, which read
        nothing they decide on outside their own statements)."""
        if self._group_open or self._tx_open:
            return _Unit(self, owner=False)
        if not shared:
            try:
                self._begin(self.conn, False)
            except BaseException as exc:
                self._rollback(self._conn)
                self._write_failed(exc)
                raise
        self._group_open = True
        self._group_begun = not shared
        self._group_lost = None
        return _Unit(self, owner=True)

    def _lock_for_nested(self, conn: Conn, shared: bool) -> None:
        """A ``tx()`` inside the open unit or transaction: begin the unit's transaction
        at its first write, else hold the write lock in this verb's mode too. A failed
        BEGIN leaves the unit as it was (nothing written yet); a failed escalation
        loses it (its transaction is aborted)."""
        if self._group_open and not self._group_begun:
            try:
                self._begin(conn, shared)
            except BaseException as exc:
                self._rollback(conn)
                self._write_failed(exc)
                raise
            self._group_begun = True
            return
        try:
            self._hold(conn, shared)
        except BaseException as exc:
            if self._group_open:
                self._group_lost = exc
            self._write_failed(exc)
            raise

    def _after_rollback(self, undo: Callable[[], None]) -> None:
        if self._group_open:
            self._rollback_hooks.append(undo)

    def _commit_group(self) -> None:
        """Commit the open unit; on failure everything in it is undone (the rollback
        hooks run) and the error is raised."""
        if not self._group_open:
            return
        self._group_open = False
        hooks, self._rollback_hooks = self._rollback_hooks, []
        lost, self._group_lost = self._group_lost, None
        if not self._group_begun:
            return  # nothing was written: nothing to commit
        self._group_begun = False
        conn = self._conn
        try:
            if lost is not None:
                raise WriteLost(f"the unit's transaction was rolled back: {lost}")
            self._commit(conn, self._pending)
        except BaseException as exc:
            self._rollback(conn)
            self._pending = _Pending()
            self._write_failed(exc)
            _run_hooks(hooks)
            raise
        self._write_ok()
        pending, self._pending = self._pending, _Pending()
        self._publish(pending.events)

    def _abort_group(self) -> None:
        if not self._group_open:
            return
        self._group_open = False
        self._group_lost = None
        hooks, self._rollback_hooks = self._rollback_hooks, []
        if self._group_begun:
            self._group_begun = False
            self._rollback(self._conn)
        self._pending = _Pending()
        _run_hooks(hooks)

    def _commit_group_off_loop(self) -> Future[BaseException | None] | None:
        """``_commit_group`` with the COMMIT on the writer thread; any use of ``conn``
        before it is done waits for it (``complete_commit``), which publishes the unit's
        events then, or runs its rollback hooks."""
        if not self._group_open:
            return None
        if not self._group_begun:
            self._commit_group()  # nothing was written: nothing to commit
            return None
        self._group_begun = False
        self._group_open = False
        self._inflight_pending, self._pending = self._pending, _Pending()
        self._inflight_hooks, self._rollback_hooks = self._rollback_hooks, []
        lost, self._group_lost = self._group_lost, None
        if lost is not None:
            self._rollback(self._conn)
            done: Future[BaseException | None] = Future()
            done.set_result(WriteLost(f"the unit's transaction was rolled back: {lost}"))
            self._inflight = done
            return done
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="agentd-commit")
        self._inflight = self._writer.submit(self._commit_or_rollback)
        return self._inflight

    def _commit_or_rollback(self) -> BaseException | None:
        """On the writer thread; the loop thread keeps off ``_conn`` until this is done."""
        conn = self._conn
        try:
            self._commit(conn, self._inflight_pending)
            return None
        except BaseException as exc:
            self._rollback(conn)
            return neutral(exc)

    async def commit_done(self) -> None:
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            await wait_commit(inflight)

    @property
    def committing(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def complete_commit(self) -> BaseException | None:
        """Wait for the in-flight commit (if any), then hand its events to the sink.
        Returns what undid it, or None."""
        fut, self._inflight = self._inflight, None
        if fut is None:
            return None
        error = fut.result()
        pending, self._inflight_pending = self._inflight_pending, _Pending()
        hooks, self._inflight_hooks = self._inflight_hooks, []
        if error is not None:
            self._write_failed(error)
            _run_hooks(hooks)
            return error
        self._write_ok()
        self._publish(pending.events)
        return None

    def flush(self) -> None:
        self._commit_group()
        error = self.complete_commit()
        if error is not None:
            raise error

    def close(self) -> None:
        """Commit a unit its owner left open, stop watching, send the last notice, and
        let the connections go."""
        try:
            self._commit_group()
        finally:
            self.complete_commit()
            self.unwatch()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._notifier is not None:
                self._notifier.shutdown(wait=True)
            if self._notify_conn is not None:
                self._notify_conn.close()
            self._closed = True
            self._conn.close()

    def _write_ok(self) -> None:
        if self.write_error is not None:
            log.info("state database writable again")
            self.write_error = None
            if self.on_write:
                self.on_write(None)

    def _write_failed(self, exc: BaseException) -> None:
        """Note a storage fault; one log line per new cause, not one per failed write."""
        if not is_storage_fault(exc):
            return
        message = str(exc).strip() or type(exc).__name__
        if message == self.write_error:
            return
        log.error("state database write failed: %s", message)
        self.write_error = message
        if self.on_write:
            self.on_write(neutral(exc))

    def _event(
        self,
        now: datetime | str,
        kind: EventKind,
        task_id: str | None = None,
        run_id: str | None = None,
        **data: Any,
    ) -> None:
        """Append one event inside the caller's ``tx()``; ``now`` may come formatted."""
        ts = now if isinstance(now, str) else to_iso(now)
        self._insert_events([(ts, kind, task_id, run_id, data)])

    def _insert_events(self, events: Sequence[_NewEvent]) -> None:
        """Append events to the open transaction: inserted, in this order, by its commit
        (``_commit``), which numbers them; so ids increase in commit order."""
        if not events:
            return
        payloads = [_encode(ev[4]) for ev in events]
        redactor = self.redactor
        if redactor and any(redactor.contains(p) for p in payloads):
            payloads = [redactor.text(p) for p in payloads]
            events = [(*ev[:4], json.loads(p)) for ev, p in zip(events, payloads, strict=True)]
        self._pending.events.extend(
            {"id": None, "ts": ts, "kind": kind, "task_id": task_id, "run_id": run_id,
             "data": data, _PAYLOAD: payload}
            for (ts, kind, task_id, run_id, data), payload in zip(events, payloads, strict=True)
        )  # fmt: skip

    def emit(
        self,
        now: datetime,
        kind: EventKind,
        task_id: str | None = None,
        run_id: str | None = None,
        **data: Any,
    ) -> None:
        """Append an audit event inside the open unit of work (or as its own)."""
        with self.tx(shared=True):
            self._event(now, kind, task_id, run_id, **data)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """One row as a dict (the record type the verb's signature names), or None."""
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows as dicts (the record type the verb's signature names)."""
        return self.conn.execute(sql, params).fetchall()

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """``sql`` once per row (psycopg pipelines them: one round trip); rows changed."""
        if not rows:
            return 0
        with self.conn.cursor() as cur:
            cur.executemany(sql, rows)
            return cur.rowcount

    # ------------------------------------------------------------ change notification

    def watch(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> bool:
        """``LISTEN`` on a connection of its own, read by ``loop`` when its socket is
        readable; ``on_change`` runs for every notice another store sent. A lost LISTEN
        connection is connected again (``RELISTEN_S`` later), with one ``on_change``
        then for what may have been missed."""
        self.unwatch()
        listener = _Listener(self, loop, on_change)
        if not listener.start():
            return False
        self._listen = listener
        return True

    def unwatch(self) -> None:
        listener, self._listen = self._listen, None
        if listener is not None:
            listener.stop()

    def announce_change(self) -> None:
        """Queue a NOTIFY for the notifier thread and return at once; several calls before
        it runs send one. Never inside a transaction of this store's."""
        with self._notify_lock:
            if self._notify_queued:
                return
            self._notify_queued = True
        try:
            if self._notifier is None:
                self._notifier = ThreadPoolExecutor(1, thread_name_prefix="agentd-notify")
            self._notifier.submit(self._notify)
        except RuntimeError:  # shut down: the change is durable, the poll finds it
            with self._notify_lock:
                self._notify_queued = False

    def _notify(self) -> None:
        with self._notify_lock:
            self._notify_queued = False
        try:
            if self._notify_conn is None or self._notify_conn.closed:
                self._notify_conn = psycopg.connect(
                    self.url,
                    password=self._password,
                    autocommit=True,
                    connect_timeout=max(1, int(self._connect_timeout_s)),
                    application_name="agentd-notify",
                )
            self._notify_conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._token))
        except psycopg.Error as exc:
            log.warning("change notice not sent (the next poll finds the change): %s", exc)
            if self._notify_conn is not None:
                self._notify_conn.close()
                self._notify_conn = None

    # ------------------------------------------------------------ tasks

    def sync_tasks(
        self,
        tasks: dict[str, tuple[str, str]],
        now: datetime,
        synced: dict[str, tuple[str, str]] | None = None,
        *,
        keep_absent: bool = False,
    ) -> None:
        """Record which tasks the config has (id -> (fingerprint, kind)); paused state
        survives. With ``synced`` (what the last call recorded) only the rows of tasks
        that differ from it are read and written."""
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
                    "SELECT id, fingerprint, present FROM tasks WHERE id = ANY(%s::text[])",
                    (ids,),
                )
                tasks = {t: tasks[t] for t in ids if t in tasks}
            known = {r["id"]: r for r in rows}
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
            self._many(
                "INSERT INTO tasks(id, fingerprint, kind, present, paused,"
                " consecutive_quarantines, updated_at) VALUES (%s,%s,%s,1,0,0,%s)",
                added,
            )
            self._many(
                "UPDATE tasks SET fingerprint=%s, kind=%s, present=1, updated_at=%s WHERE id=%s",
                changed,
            )
            self._many("UPDATE tasks SET present=0, updated_at=%s WHERE id=%s", gone)
            if gone or synced is None:
                events += self._cancel_orphans(ts)
            self._insert_events(events)

    def _cancel_orphans(self, ts: str) -> list[_NewEvent]:
        """Queued runs of tasks no longer in the config end ``cancelled`` (nothing would
        ever claim them); their cancel events, for the caller's insert."""
        rows = self._all(
            "UPDATE runs r SET status='cancelled', outcome='cancelled', finished_at=%s,"
            " error='task removed from the config', not_before=NULL FROM tasks t"
            " WHERE t.id = r.task_id AND r.status='queued' AND t.present=0"
            " RETURNING r.id, r.task_id",
            (ts,),
        )
        if not rows:
            return []
        rows.sort(key=lambda r: r["id"])
        log.warning(
            "cancelled %d queued run(s) of task(s) no longer in the config: %s",
            len(rows),
            " ".join(r["id"] for r in rows),
        )
        return [
            (ts, EventKind.CANCEL, r["task_id"], r["id"], {"reason": "task_removed"}) for r in rows
        ]

    def task_rows(self, ids: Sequence[str] | None = None) -> list[TaskRecord]:
        """Present tasks, or those of ``ids`` (one statement, any number of ids)."""
        if ids is None:
            return self._all("SELECT * FROM tasks WHERE present=1 ORDER BY id")
        return self._all(
            "SELECT * FROM tasks WHERE present=1 AND id = ANY(%s::text[]) ORDER BY id",
            (list(ids),),
        )

    def task_row(self, task_id: str) -> TaskRecord | None:
        return cast("TaskRecord | None", self._one("SELECT * FROM tasks WHERE id=%s", (task_id,)))

    def paused_tasks(self) -> set[str]:
        return {r["id"] for r in self._all("SELECT id FROM tasks WHERE paused=1")}

    def pause(self, task_id: str, reason: str, now: datetime, actor: str = "operator") -> bool:
        """Idempotent: pausing a paused task changes nothing and returns False."""
        with self.tx():
            row = self._require_task(task_id)
            if row["paused"]:
                return False
            self.conn.execute(
                "UPDATE tasks SET paused=1, paused_reason=%s, paused_at=%s WHERE id=%s",
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
                " consecutive_quarantines=0 WHERE id=%s",
                (task_id,),
            )
            self._event(now, EventKind.RESUME, task_id)
            return True

    def _require_task(self, task_id: str) -> Row:
        row = self._one("SELECT * FROM tasks WHERE id=%s AND present=1", (task_id,))
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
        """Enqueue one run, at most once per idempotency key (default
        ``task@scheduled_for``), applying the overlap policy."""
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
        """``fire`` for many, in order, as if one after the other, in one transaction;
        what each must look at (its key, its task, the task's active runs) read for all
        at once. A fire of a task not in the tasks table gets ``reason="unknown_task"``."""
        ts = to_iso(now)
        whens = [to_iso(f.scheduled_for) if f.scheduled_for else None for f in fires]
        keys = [
            f.key
            or (f"{f.task_id}@{when}" if when else f"{f.task_id}@manual:{secrets.token_hex(6)}")
            for f, when in zip(fires, whens, strict=True)
        ]
        ids = sorted({f.task_id for f in fires})
        watched = sorted({f.task_id for f in fires if f.overlap != "allow"})
        results: list[FireResult] = []
        with self.tx():
            seen: dict[str, tuple[str, str, str, str | None]] = {
                r["idempotency_key"]: (r["id"], r["status"], r["created_at"], r["params"])
                for r in self._all(
                    "SELECT idempotency_key, id, status, created_at, params FROM runs"
                    " WHERE idempotency_key = ANY(%s::text[])",
                    (keys,),
                )
            }
            paused: dict[str, int] = {
                r["id"]: r["paused"]
                for r in self._all(
                    "SELECT id, paused FROM tasks WHERE present=1 AND id = ANY(%s::text[])",
                    (ids,),
                )
            }
            active: dict[str, list[Row]] = {}
            if watched:  # overlap=allow needs no look at what is active
                for run in self._all(
                    "SELECT id, task_id, status FROM runs WHERE status IN ('queued','running')"
                    " AND task_id = ANY(%s::text[]) ORDER BY created_at, id",
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
                        "UPDATE runs SET idempotency_key=%s WHERE id=%s",
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
                        run_id, f.task_id, f.trigger, when, key, str(status), due, ts,
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
        can be taken before they are used), last to be used first."""
        ids = [self.new_run_id(now) for _ in range(count)]
        for _ in range(MAX_ID_DRAWS):
            taken = {
                r["id"] for r in self._all("SELECT id FROM runs WHERE id = ANY(%s::text[])", (ids,))
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
        """New runs from ``fire_many``; empties ``rows``."""
        self._many(
            "INSERT INTO runs(id, task_id, trigger, scheduled_for, idempotency_key, status,"
            " attempt, failures, not_before, cancel_requested, created_at, finished_at,"
            " skip_reason, outcome, params) VALUES (%s,%s,%s,%s,%s,%s,0,0,%s,0,%s,%s,%s,%s,%s)",
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
        with self.tx(shared=True):
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
        """The version counter (see the module): moves at every commit of a change by
        any agentd process, and only then. One primary-key read."""
        row = self._one("SELECT value FROM meta WHERE key='version_counter'")
        return (int(row["value"]) if row else 0), 0

    def first_queued_at(self) -> datetime | None:
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
        """Take up to ``limit`` due runs under a lease (with ``only_tasks``, of those
        tasks alone); at most one per task unless allowed, counting the runs every node
        holds (``busy_tasks`` are this node's own). The rows are locked as they are read
        (``FOR UPDATE SKIP LOCKED``): a run another transaction holds is passed over,
        never waited for nor taken twice. Claims on several nodes run side by side
        (the write lock in shared mode); a task that may not overlap is taken only
        under its task lock (``_free_tasks``)."""
        if limit <= 0:
            return []
        claimed: list[Row] = []
        excluded = set(busy_tasks) - allow_overlap
        allowed = sorted(allow_overlap)
        only = [] if only_tasks is None else [sorted(only_tasks)]
        expires = to_iso(_plus(now, lease_s))
        with self.tx(shared=True):
            while len(claimed) < limit:
                want = limit - len(claimed)
                rows = self._planned_without_sort(
                    f"SELECT {CLAIM_COLUMNS} FROM runs r JOIN tasks t ON t.id = r.task_id"
                    " WHERE r.status='queued' AND r.not_before <= %s AND t.present=1"
                    " AND (t.paused=0 OR r.trigger IN ('manual','release'))"
                    " AND r.task_id <> ALL(%s::text[])"
                    " AND (r.task_id = ANY(%s::text[]) OR NOT EXISTS (SELECT 1 FROM runs x"
                    " WHERE x.task_id = r.task_id AND x.status = 'running'))"
                    + (" AND r.task_id = ANY(%s::text[])" if only else "")
                    + " ORDER BY r.not_before, r.scheduled_for, r.created_at, r.id"
                    " LIMIT %s FOR UPDATE OF r SKIP LOCKED",
                    (to_iso(now), sorted(excluded), allowed, *only, want),
                )
                taken = []
                for row in rows:
                    if row["task_id"] in excluded:
                        continue
                    if row["task_id"] not in allow_overlap:
                        excluded.add(row["task_id"])
                    taken.append(row)
                single = {row["task_id"] for row in taken} - allow_overlap
                if single:
                    free = self._free_tasks(single)
                    taken = [r for r in taken if r["task_id"] in free or r["task_id"] not in single]
                self._claim_rows(taken, now, owner, expires)
                claimed += taken
                if len(rows) < want:
                    break  # that was every eligible due run
        return cast(list[ClaimedRun], claimed)

    def _free_tasks(self, tasks: set[str]) -> set[str]:
        """Of tasks that may not overlap, those this transaction may start a run of now:
        it got the task's lock (``pg_try_advisory_xact_lock``, held to its commit; taken
        by another claim meanwhile means that claim is about to start one) and, read
        after that in a statement of its own, no run of the task is running (another
        node's claim committed since this claim's first read). Both statements go in one
        round trip; no lock is waited for. A hash collision of two tasks' keys only
        makes one of them wait for the next claim."""
        names = sorted(tasks)
        conn = self.conn
        with conn.pipeline():
            locked = conn.execute(
                "SELECT t FROM unnest(%s::text[]) AS t WHERE pg_try_advisory_xact_lock("
                "hashtextextended('agentd.task:' || current_schema() || ':' || t, 0))",
                (names,),
            )
            running = conn.execute(
                "SELECT DISTINCT task_id FROM runs WHERE status='running'"
                " AND task_id = ANY(%s::text[])",
                (names,),
            )
        got = {row["t"] for row in locked.fetchall()}
        return got - {row["task_id"] for row in running.fetchall()}

    def _planned_without_sort(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """``_all`` with the planner told not to sort (``enable_sort`` off for this one
        statement, in the same round trip): the claim's order is ``idx_runs_due``'s, and
        read off it the claim stops after its rows. With statistics that lag (a fresh
        database filled at once, before autovacuum analyzed it, believes ``runs`` holds
        one row) the planner otherwise picks another index and sorts the whole queue,
        for every claim."""
        conn = self.conn
        with conn.pipeline():
            conn.execute("SET LOCAL enable_sort = off")
            cur = conn.execute(sql, params)
            conn.execute("SET LOCAL enable_sort TO DEFAULT")
        return cur.fetchall()

    def _claim_rows(self, rows: list[Row], now: datetime, owner: str, expires: str) -> None:
        if not rows:
            return
        ts = to_iso(now)
        for row in rows:
            row.update(status="running", attempt=row["attempt"] + 1, lease_owner=owner)
        self._many(
            "UPDATE runs SET status='running', attempt=%s, lease_owner=%s,"
            " lease_expires_at=%s, started_at=COALESCE(started_at, %s) WHERE id=%s",
            [(row["attempt"], owner, expires, ts, row["id"]) for row in rows],
        )
        self._many(
            "INSERT INTO attempts(run_id, attempt, worker, started_at) VALUES (%s,%s,%s,%s)",
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
        """Extend leases in one statement, with one audit event per run. Returns the runs
        of ``run_ids`` that ``owner`` no longer holds (see the port)."""
        if not run_ids:
            return set()
        expires = to_iso(_plus(now, lease_s))
        with self.tx(shared=True):
            rows = self._all(
                "UPDATE runs SET lease_expires_at=%s WHERE lease_owner=%s AND status='running'"
                " AND id = ANY(%s::text[]) RETURNING id, task_id",
                (expires, owner, list(run_ids)),
            )
            order = {run_id: i for i, run_id in enumerate(run_ids)}
            rows.sort(key=lambda r: order.get(r["id"], 0))
            self._insert_events(
                [
                    (to_iso(now), EventKind.HEARTBEAT, r["task_id"], r["id"],
                     {"lease_expires_at": expires})
                    for r in rows
                ]
            )  # fmt: skip
        return set(run_ids) - {r["id"] for r in rows}

    def mark_started(self, run_id: str, task_id: str, now: datetime, workspace: str) -> None:
        """The executor is about to begin: separate from ``claim`` so the audit shows a run
        that was claimed but never started."""
        self.mark_started_many([(run_id, task_id, workspace)], now)

    def mark_started_many(self, runs: Sequence[tuple[str, str, str]], now: datetime) -> None:
        ts = to_iso(now)
        events = [
            (ts, EventKind.START, task_id, run_id, {"workspace": ws})
            for run_id, task_id, ws in runs
        ]
        with self.tx(shared=True):
            self._insert_events(events)

    def record_group(self, run_id: str, attempt: int, group: GroupRecord) -> None:
        """Record the process group an attempt just spawned. Outside a unit it commits
        without waiting for the server's WAL flush (``synchronous_commit=off``, as SQLite
        commits it with ``synchronous=NORMAL``): a crash of agentd keeps it; a crash of
        the server loses at most the last moments, and ends no process of ours."""
        sql = (
            "UPDATE attempts SET pgid=%s, pgid_start=%s, boot_id=%s WHERE run_id=%s AND attempt=%s"
        )
        params = (group.pgid, group.start, group.boot, run_id, attempt)
        own = not (self._group_open or self._tx_open)  # its own commit, no one else's
        with self.tx(shared=True) as conn:
            if own:
                conn.execute("SET LOCAL synchronous_commit = off")
            conn.execute(sql, params)

    def _recoverable(
        self, now: datetime, live: set[str], held: set[str], only: set[str] | None
    ) -> list[Row]:
        rows = self._all(
            "SELECT r.id, r.task_id, r.attempt, r.lease_owner, r.lease_expires_at, a.pgid,"
            " a.pgid_start, a.boot_id FROM runs r LEFT JOIN attempts a ON a.run_id = r.id"
            " AND a.attempt = r.attempt WHERE r.status='running' ORDER BY r.id"
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
        """The process groups recorded for the attempts ``recover`` would re-queue now."""
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
        """Re-queue runs whose owner is gone or whose lease expired, except ``keep``;
        with ``only``, none but those. ``ended``: process groups found still alive,
        recorded as ``orphan_killed`` events."""
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
                    "UPDATE runs SET status='queued', not_before=%s, lease_owner=NULL,"
                    " lease_expires_at=NULL, cancel_requested=0 WHERE id=%s",
                    (to_iso(now), row["id"]),
                )
                self.conn.execute(
                    "UPDATE attempts SET finished_at=%s, outcome=%s, error=%s WHERE run_id=%s"
                    " AND attempt=%s AND finished_at IS NULL",
                    (to_iso(now), str(Outcome.LOST), "owner gone", row["id"], row["attempt"]),
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
                " AND lease_owner=%s ORDER BY id",
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
        """Close the current attempt and move the run on, in one transaction (see
        ``SqliteStore.finish``). Returns the run's id, task_id, attempt and failures.
        With ``owner``, fenced (see ``Finish.owner``)."""
        counted = outcome in (Outcome.FAILURE, Outcome.TIMEOUT)
        final = next_status not in _OPEN
        ts = to_iso(now)
        due = to_iso(not_before) if not_before else ts
        error = self.redactor.optional(error)
        # A quarantine counts and may pause the task: a decision on what it reads.
        with self.tx(shared=next_status != RunStatus.QUARANTINED):
            run = self._one(
                "UPDATE runs SET status=%s, failures=failures+%s, not_before=%s,"
                " lease_owner=NULL, lease_expires_at=NULL, cancel_requested=0, outcome=%s,"
                f" exit_code=%s, error=%s, duration_s=%s, finished_at=%s WHERE id=%s{_FENCE}"
                " RETURNING id, task_id, attempt, failures",
                (
                    str(next_status),
                    1 if counted else 0,
                    due,
                    str(outcome),
                    exit_code,
                    error,
                    duration_s,
                    ts if final else None,
                    run_id,
                    owner,
                    owner,
                    attempt,
                ),
            )
            if run is None:
                if owner is not None and self._one("SELECT 1 FROM runs WHERE id=%s", (run_id,)):
                    raise StateRefused("lease_lost", f"run {run_id} is no longer held by {owner}")
                raise StateRefused("unknown_run", f"no run {run_id!r}")
            self.conn.execute(
                "UPDATE attempts SET finished_at=%s, outcome=%s, exit_code=%s, http_status=%s,"
                " error=%s, duration_s=%s WHERE run_id=%s AND attempt=%s AND finished_at IS NULL",
                (ts, str(outcome), exit_code, http_status, error, duration_s, run_id,
                 run["attempt"]),
            )  # fmt: skip
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
            self._task_outcomes([(task_id, ts, str(outcome), next_status == RunStatus.SUCCEEDED)])
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
        """``finish`` for many, in one transaction, each statement once over all of them.
        All or nothing: a run that is not there undoes the batch (StateRefused). A batch
        with a quarantine goes one by one (still all or nothing), as on SQLite."""
        if not items:
            return
        if any(f.next_status == RunStatus.QUARANTINED for f in items):
            unit = self.unit()  # exclusive, as finish's quarantine
            try:
                with self.tx():  # exclusive, as finish's quarantine
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
        outcomes: list[tuple[str, str, str, bool]] = []
        scrub = self.redactor.optional
        for f in items:
            ts = to_iso(f.at)
            counted = f.outcome in (Outcome.FAILURE, Outcome.TIMEOUT)
            due = to_iso(f.not_before) if f.not_before else ts
            final = f.next_status not in _OPEN
            error = scrub(f.error)
            runs.append(
                (str(f.next_status), 1 if counted else 0, due, str(f.outcome), f.exit_code,
                 error, f.duration_s, ts if final else None, f.run_id, f.owner, f.owner,
                 f.attempt)
            )  # fmt: skip
            attempts.append(
                (ts, str(f.outcome), f.exit_code, f.http_status, error, f.duration_s,
                 f.run_id, f.attempt)
            )  # fmt: skip
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
            outcomes.append((f.task_id, ts, str(f.outcome), f.next_status == RunStatus.SUCCEEDED))
        with self.tx(shared=True):
            updated = self._many(
                "UPDATE runs SET status=%s, failures=failures+%s, not_before=%s,"
                " lease_owner=NULL, lease_expires_at=NULL, cancel_requested=0, outcome=%s,"
                f" exit_code=%s, error=%s, duration_s=%s, finished_at=%s WHERE id=%s{_FENCE}",
                runs,
            )
            if updated != len(items):
                ids = [f.run_id for f in items]
                found = self._all("SELECT id FROM runs WHERE id = ANY(%s::text[])", (ids,))
                if len(found) != len(set(ids)):
                    raise StateRefused(
                        "unknown_run", f"{len(set(ids)) - len(found)} of the runs are gone"
                    )
                raise StateRefused(
                    "lease_lost", "a run of the batch is no longer held by its finisher"
                )
            self._many(
                "UPDATE attempts SET finished_at=%s, outcome=%s, exit_code=%s, http_status=%s,"
                " error=%s, duration_s=%s WHERE run_id=%s AND attempt=%s AND finished_at IS NULL",
                attempts,
            )
            self._task_outcomes(outcomes)
            self._insert_events(events)

    def _task_outcomes(self, outcomes: list[tuple[str, str, str, bool]]) -> None:
        """Tasks' last outcomes (task, finished at, outcome, succeeded), in the order
        they happened: written now under the exclusive lock; else at the commit, where
        the committers take the tasks' rows one at a time (see ``_Pending``), so that
        finishes of one task's runs on several nodes never wait for each other's
        open transaction."""
        if self._lock_held == _EXCLUSIVE:
            self.conn.execute(_TASK_OUTCOMES, _Pending(outcomes=outcomes).folded_outcomes())
        else:
            self._pending.outcomes.extend(outcomes)

    def _quarantine_locked(
        self, run: Row, now: datetime, error: str | None, pause_after: int
    ) -> None:
        task_id = run["task_id"]
        self.conn.execute(
            "INSERT INTO quarantine(run_id, task_id, quarantined_at, last_error, attempts)"
            " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (run_id) DO UPDATE SET"
            " task_id=excluded.task_id, quarantined_at=excluded.quarantined_at,"
            " last_error=excluded.last_error, attempts=excluded.attempts",
            (run["id"], task_id, to_iso(now), error, run["attempt"]),
        )
        self._event(
            now, EventKind.QUARANTINE, task_id, run["id"], error=error, attempts=run["attempt"]
        )
        task = self._one(
            "UPDATE tasks SET consecutive_quarantines = consecutive_quarantines + 1"
            " WHERE id=%s RETURNING consecutive_quarantines, paused",
            (task_id,),
        )
        reason = (
            auto_pause_reason(task["consecutive_quarantines"], pause_after, bool(task["paused"]))
            if task
            else None
        )
        if reason:
            self.conn.execute(
                "UPDATE tasks SET paused=1, paused_reason=%s, paused_at=%s WHERE id=%s",
                (reason, to_iso(now), task_id),
            )
            self._event(now, EventKind.PAUSE, task_id, reason=reason, by="agentd")

    def request_cancel(self, run_id: str, now: datetime) -> str:
        """Queued runs are cancelled at once; running ones are flagged for their runner.
        Returns the run's status afterwards; a finished run is a conflict."""
        with self.tx():
            run = self._one("SELECT * FROM runs WHERE id=%s FOR UPDATE", (run_id,))
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
                "UPDATE runs SET status='cancelled', outcome='cancelled', finished_at=%s"
                " WHERE id=%s",
                (to_iso(now), run["id"]),
            )
            self._event(now, EventKind.CANCEL, run.get("task_id"), run["id"], reason=reason)
            return RunStatus.CANCELLED
        self.conn.execute("UPDATE runs SET cancel_requested=1 WHERE id=%s", (run["id"],))
        self._event(now, EventKind.CANCEL_REQUESTED, run.get("task_id"), run["id"], reason=reason)
        return RunStatus.RUNNING

    # ------------------------------------------------------------ quarantine

    def quarantine_list(self) -> list[QuarantineRecord]:
        return self._all(
            "SELECT q.*, r.scheduled_for, r.trigger FROM quarantine q JOIN runs r"
            " ON r.id = q.run_id ORDER BY q.quarantined_at DESC, q.run_id DESC"
        )

    def quarantine_get(self, run_id: str) -> Row:
        row = self._one("SELECT * FROM quarantine WHERE run_id=%s", (run_id,))
        if row is None:
            raise StateRefused("not_quarantined", f"run {run_id!r} is not in quarantine")
        return cast(Row, row)

    def quarantine_release(self, run_id: str, now: datetime) -> None:
        """Back to the queue as a new attempt with a fresh retry budget."""
        with self.tx():
            row = self._one("DELETE FROM quarantine WHERE run_id=%s RETURNING task_id", (run_id,))
            if row is None:
                raise StateRefused("not_quarantined", f"run {run_id!r} is not in quarantine")
            self.conn.execute(
                "UPDATE runs SET status='queued', failures=0, not_before=%s, finished_at=NULL,"
                " trigger='release' WHERE id=%s",
                (to_iso(now), run_id),
            )
            self._event(now, EventKind.RELEASE, row["task_id"], run_id)

    def resume_run(self, run_id: str, now: datetime) -> Row:
        """A run that ended ``budget_exhausted`` back in the queue as a new attempt (its
        checkpoint and agent steps kept: it goes on where it stopped)."""
        with self.tx():
            run = self._one("SELECT id, task_id, status FROM runs WHERE id=%s", (run_id,))
            if run is None:
                raise StateRefused("unknown_run", f"no run {run_id!r}")
            if run["status"] != RunStatus.BUDGET_EXHAUSTED:
                raise StateRefused(
                    "not_resumable",
                    f"run {run_id} is {run['status']}: only a budget_exhausted run resumes",
                )
            self.conn.execute(
                "UPDATE runs SET status='queued', not_before=%s, finished_at=NULL WHERE id=%s",
                (to_iso(now), run_id),
            )
            self._event(now, EventKind.RUN_RESUMED, run["task_id"], run_id)
            return {"run_id": run_id, "status": str(RunStatus.QUEUED)}

    def quarantine_drop(self, run_id: str, now: datetime) -> None:
        """Acknowledge and forget: out of quarantine, the run's status ``dropped``."""
        with self.tx():
            row = self._one("DELETE FROM quarantine WHERE run_id=%s RETURNING task_id", (run_id,))
            if row is None:
                raise StateRefused("not_quarantined", f"run {run_id!r} is not in quarantine")
            self.conn.execute("UPDATE runs SET status='dropped' WHERE id=%s", (run_id,))
            self._event(now, EventKind.DROP, row["task_id"], run_id)

    # ------------------------------------------------------------ checkpoints, progress

    def load_checkpoint(self, run_id: str) -> Any | None:
        row = self._one("SELECT data FROM checkpoints WHERE run_id=%s", (run_id,))
        return json.loads(row["data"]) if row else None

    def save_checkpoint(self, run_id: str, data: Any, now: datetime) -> int:
        blob = json.dumps(data)
        with self.tx(shared=True):
            row = self._one(
                "INSERT INTO checkpoints(run_id, data, seq, saved_at) VALUES (%s,%s,1,%s)"
                " ON CONFLICT (run_id) DO UPDATE SET data=excluded.data,"
                " seq=COALESCE(checkpoints.seq, 0) + 1, saved_at=excluded.saved_at"
                " RETURNING seq",
                (run_id, blob, to_iso(now)),
            )
            seq = int(row["seq"]) if row else 1
            task = self._one("SELECT task_id FROM runs WHERE id=%s", (run_id,))
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
        with self.tx(shared=True):
            task = self._one(
                "UPDATE runs SET progress_done=%s, progress_total=%s, progress_message=%s"
                " WHERE id=%s RETURNING task_id",
                (done, total, self.redactor.text(message[:500]), run_id),
            )
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
        rows = self._all("SELECT * FROM alerts ORDER BY id DESC LIMIT %s", (limit,))
        if not rows:
            return rows
        deliveries: dict[int, list[Row]] = {}
        for d in self._all(
            "SELECT alert_id, channel, status, attempts, last_error, delivered_at FROM outbox"
            " WHERE alert_id = ANY(%s::bigint[]) ORDER BY id",
            ([r["id"] for r in rows],),
        ):
            deliveries.setdefault(d.pop("alert_id"), []).append(d)
        for row in rows:
            row["data"] = json.loads(row["data"])
            row["deliveries"] = deliveries.get(row["id"], [])
        return rows

    def running_ids(self, owner: str) -> set[str]:
        rows = self._all("SELECT id FROM runs WHERE status='running' AND lease_owner=%s", (owner,))
        return {row["id"] for row in rows}

    def get_run(self, run_id: str) -> RunRecord:
        row = self._one("SELECT * FROM runs WHERE id=%s", (run_id,))
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
        ``since``/``until`` bound ``created_at`` (ISO text, compared as stored: bytewise,
        the schema's collation)."""
        where: list[str] = []
        params: list[Any] = []
        if status in ("queued", "running"):
            # Literal, so the partial index of that status serves it.
            where.append(f"status='{status}'")
            status = None
        for clause, value in (
            ("task_id=%s", task_id),
            ("status=%s", status),
            ("id < %s", before_id),
            ("created_at >= %s", since),
            ("created_at < %s", until),
        ):
            if value:
                where.append(clause)
                params.append(value)
        sql_where = ("WHERE " + " AND ".join(where)) if where else ""
        rows: list[RunRecord] = self._all(
            f"SELECT * FROM runs {sql_where} ORDER BY id DESC LIMIT %s",
            (*params, limit),
        )
        for row in rows:
            row["params"] = decode_params(row["params"])
        return rows

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        return self._all("SELECT * FROM attempts WHERE run_id=%s ORDER BY attempt, id", (run_id,))

    def events(
        self, run_id: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        if run_id:
            rows = self._all(
                "SELECT * FROM events WHERE run_id=%s AND id>%s ORDER BY id LIMIT %s",
                (run_id, after_id, limit),
            )
        else:
            rows = self._all(
                "SELECT * FROM events WHERE id>%s ORDER BY id LIMIT %s", (after_id, limit)
            )
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    def probe_write(self, now: datetime) -> None:
        """A real row write and commit, so a server that cannot write shows up here."""
        with self.tx(shared=True):
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES ('last_probe', %s)"
                " ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (to_iso(now),),
            )

    def latest_event_id(self) -> int:
        row = self._one("SELECT COALESCE(MAX(id), 0) AS id FROM events")
        return int(row["id"]) if row else 0

    def recent_events(self, limit: int = 50) -> list[EventRecord]:
        """The newest ``limit`` events, oldest first."""
        rows = self._all("SELECT * FROM events ORDER BY id DESC LIMIT %s", (limit,))
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows[::-1]

    def gauge_counts(self) -> tuple[int, int]:
        row = self._one(
            "SELECT (SELECT COUNT(*) FROM runs WHERE status='queued') AS queued,"
            " (SELECT COUNT(*) FROM quarantine) AS quarantined"
        )
        return (int(row["queued"]), int(row["quarantined"])) if row else (0, 0)

    def counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        result = {r["status"]: int(r["n"]) for r in rows}
        q = self._one("SELECT COUNT(*) AS n FROM quarantine")
        result["in_quarantine"] = int(q["n"]) if q else 0
        return result

    def active_runs(self, task_id: str) -> list[RunRecord]:
        rows: list[RunRecord] = self._all(
            "SELECT * FROM runs WHERE task_id=%s AND status IN ('queued','running') ORDER BY id",
            (task_id,),
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
            log.exception("undoing in-memory work of a rolled-back unit failed")


def _plus(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


class _Listener:
    """``watch``'s LISTEN connection, read by the event loop (``loop.add_reader`` on its
    socket). Lost, it is connected again off the loop (a connect may wait
    ``connect_timeout``, which the loop must not), every ``RELISTEN_S`` until it works:
    one log line when notices stop, one when they are back."""

    def __init__(
        self, store: PostgresStore, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]
    ) -> None:
        self.store = store
        self.loop = loop
        self.on_change = on_change
        self.conn: psycopg.Connection[Any] | None = None
        self.fd: int | None = None
        self.stopped = False
        self.retry: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Future[psycopg.Connection[Any]] | None = None
        self.heard = 0
        """Notices read, this store's own included."""
        self.failed = 0
        """Attempts to listen again that failed."""

    def _open(self) -> psycopg.Connection[Any]:
        """A connection that listens (blocking: on the loop only at ``start``)."""
        conn = psycopg.connect(
            self.store.url,
            password=self.store._password,
            autocommit=True,
            connect_timeout=max(1, int(self.store._connect_timeout_s)),
            application_name="agentd-listen",
        )
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def start(self) -> bool:
        """Listen now (``watch``: it says whether notices are on)."""
        try:
            conn = self._open()
        except psycopg.Error as exc:
            log.warning("change notices off (LISTEN failed): %s", exc)
            return False
        self._listen_on(conn)
        log.info("change notices on: LISTEN %s", CHANNEL)
        return True

    def _listen_on(self, conn: psycopg.Connection[Any]) -> None:
        self.conn, self.fd = conn, conn.pgconn.socket
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        conn = self.conn
        if conn is None:
            return
        pgconn = conn.pgconn
        changed = False
        try:
            pgconn.consume_input()
            while (notice := pgconn.notifies()) is not None:
                self.heard += 1
                if notice.extra.decode(errors="replace") != self.store._token:
                    changed = True
        except psycopg.Error as exc:
            log.warning("change notices lost (LISTEN connection): %s; listening again", exc)
            self._drop()
            self.retry = self.loop.call_later(RELISTEN_S, self._again)
            return
        if changed:
            self.on_change()

    def _again(self) -> None:
        self.retry = None
        if self.stopped:
            return
        self.connecting = self.loop.run_in_executor(None, self._open)
        self.connecting.add_done_callback(self._connected)

    def _connected(self, done: asyncio.Future[psycopg.Connection[Any]]) -> None:
        self.connecting = None
        if done.cancelled():
            return
        error = done.exception()
        if error is not None or self.stopped:
            if error is None:
                done.result().close()  # stopped meanwhile
            elif not self.stopped:
                self.failed += 1
                self.retry = self.loop.call_later(RELISTEN_S, self._again)
            return
        self._listen_on(done.result())
        log.info("change notices on again: LISTEN %s", CHANNEL)
        self.on_change()  # whatever changed while nobody listened

    def _drop(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
            self.fd = None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def stop(self) -> None:
        self.stopped = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self._drop()


@_speak_the_port
class _Unit:
    """A handle on ``PostgresStore``'s open unit: the owner's ends it, a joined one's
    ``commit``/``abort`` do nothing (``agentd.state.port.UnitOfWork``)."""

    __slots__ = ("_store", "owner")

    def __init__(self, store: PostgresStore, *, owner: bool) -> None:
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


def _implements_the_port(engine: PostgresStore) -> Store:
    """Never called: mypy checks here that ``PostgresStore`` implements the port."""
    return engine
