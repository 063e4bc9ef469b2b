"""The state layer's port: what every module above it may ask of agentd's state, and
nothing of how an engine keeps it.

An engine (``agentd.state.sqlite`` today, PostgreSQL next) implements ``Store``; the
contract suite (``tests/contract``) runs one set of tests against each. Above this
line nobody sees a connection, a cursor, SQL or a driver's exception.

Invariants every engine keeps:

- **One owner per commit.** Writes happen inside a unit of work (``Store.unit``). The
  first unit opened is the *owner*; units opened while it is open *join* it, and their
  ``commit``/``abort`` do nothing. Only the owner's ``commit`` makes the work durable,
  and only then are its events published (to ``event_sink``), in order, exactly once.
  A verb called outside any unit is its own unit.
- **Events never precede their change.** An event is appended in the transaction of
  the change it describes and nobody sees it before that transaction commits.
- **Errors are storage-neutral.** A refused request raises ``StateRefused`` (stable
  ``code``); a failure of the storage itself (disk full, I/O, a lock held too long, a
  lost connection) raises ``StorageFault``; anything else the engine cannot do raises
  ``StorageError``. A driver's own exceptions never leave the engine.
- **Idempotent enqueue.** A fire with an idempotency key already used returns the
  existing run (``created=False``, ``reason="duplicate"``), never a second one; a fire
  with a ``key_window_s`` only while that run is younger than it (after, the key is
  free again: the old run's key is retired and a new run is made). A keyed fire whose
  ``params`` differ from that run's makes none (``reason="key_conflict"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

from agentd.budget import Scope
from agentd.clock import median
from agentd.models import EventKind, Outcome, Row, RunStatus, StateRefused
from agentd.policy import Deadlines
from agentd.procs import GroupEnd, GroupRecord
from agentd.redact import Redactor

__all__ = [
    "Admission",
    "AgentStepRecord",
    "AgentStepsPort",
    "AlertRecord",
    "AlertsPort",
    "AttemptRecord",
    "ClaimedRun",
    "EventRecord",
    "EventSink",
    "Finish",
    "Fire",
    "FireAdmission",
    "FireGate",
    "FireResult",
    "LedgerEntry",
    "LedgerPort",
    "NewAlert",
    "NodeRecord",
    "NodesPort",
    "OutboxRecord",
    "QuarantineRecord",
    "Reservation",
    "RunCost",
    "RunEnded",
    "RunIds",
    "RunRecord",
    "RunUsage",
    "RunningAttempt",
    "ScopeRefused",
    "SpendTotals",
    "StateRefused",
    "StorageError",
    "StorageFault",
    "Store",
    "TaskRecord",
    "UnitOfWork",
    "Usage",
    "WindowUsage",
    "WriteListener",
    "WriteLost",
    "atomically",
    "decode_params",
    "encode_params",
    "wait_commit",
]


# ---------------------------------------------------------------- errors


class StorageError(Exception):
    """The state could not be read or written for a reason of the engine (a constraint,
    a damaged file, a bug): what callers above the port catch instead of a driver's
    exceptions. The driver's exception is the ``__cause__``."""


class StorageFault(StorageError):
    """A failure of the storage itself (disk full, read-only, I/O error, a lock held too
    long, damage): retryable once the cause is gone; what turns readiness off and makes
    an API answer 503."""


class WriteLost(StorageFault):
    """A write inside a unit of work whose transaction an earlier failure already rolled
    back (SQLite ends the whole transaction on some errors: a full disk, an I/O error).
    Every write after that fails too, until the unit's owner ends it, so that no later
    part of the unit can commit without the earlier ones."""


# ---------------------------------------------------------------- records


class RunRecord(TypedDict):
    """A run as the state keeps it (``runs``): one per enqueue, whatever its attempts."""

    id: str
    task_id: str
    trigger: str
    scheduled_for: str | None
    idempotency_key: str
    status: str
    attempt: int
    failures: int
    not_before: str | None
    lease_owner: str | None
    lease_expires_at: str | None
    cancel_requested: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    outcome: str | None
    exit_code: int | None
    error: str | None
    duration_s: float | None
    skip_reason: str | None
    progress_done: int | None
    progress_total: int | None
    progress_message: str | None
    params: Row | None
    """A manual trigger's params as given (decoded), None for any other run; the run
    starts with them merged over its task's ``params`` (top-level keys)."""


class ClaimedRun(TypedDict):
    """What a claim hands its runner: the columns a run needs to start, no more."""

    id: str
    task_id: str
    trigger: str
    scheduled_for: str | None
    idempotency_key: str
    status: str
    attempt: int
    failures: int
    not_before: str | None
    created_at: str
    params: str | None
    """As stored: canonical JSON text (``encode_params``), or None."""


class AttemptRecord(TypedDict):
    """One attempt of a run (``attempts``): who ran it, how it ended."""

    id: int
    run_id: str
    attempt: int
    worker: str | None
    started_at: str | None
    finished_at: str | None
    outcome: str | None
    exit_code: int | None
    http_status: int | None
    error: str | None
    duration_s: float | None
    pgid: int | None
    pgid_start: int | None
    boot_id: str | None


class TaskRecord(TypedDict):
    """A task as the state knows it (``tasks``): the config's fingerprint and the
    operator-visible state the config does not hold (paused, last outcome)."""

    id: str
    fingerprint: str
    kind: str
    present: int
    paused: int
    paused_reason: str | None
    paused_at: str | None
    consecutive_quarantines: int
    last_run_at: str | None
    last_outcome: str | None
    last_success_at: str | None
    updated_at: str | None


class EventRecord(TypedDict):
    """One audit event: ``id`` increases with commit order within one engine."""

    id: int
    ts: str
    kind: str
    task_id: str | None
    run_id: str | None
    data: Row


class QuarantineRecord(TypedDict):
    """A run that used up its retries, kept for an operator to release or drop."""

    run_id: str
    task_id: str
    quarantined_at: str
    last_error: str | None
    attempts: int


class AgentStepRecord(TypedDict):
    """One durable step of an agent run (``agent_steps``): a model reply, or a tool
    call's start or result. ``payload`` is decoded JSON."""

    run_id: str
    seq: int
    step: int
    kind: str
    call_id: str | None
    payload: Any
    recorded_at: str


class NodeRecord(TypedDict):
    """A daemon that has opened this state (``nodes``): one row per process, kept after
    it stops (``stopped_at``) until a node starting a while later forgets it
    (``forget_nodes``)."""

    id: str
    host: str
    pid: int
    version: str
    config_generation: str
    started_at: str
    last_seen: str
    stopped_at: str | None


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Fire:
    """One enqueue request for ``Store.fire_many`` (see ``Store.fire`` for each field)."""

    task_id: str
    scheduled_for: datetime | None = None
    trigger: str = "schedule"
    overlap: str = "skip"
    max_queued: int = 10
    key: str | None = None
    honour_pause: bool = True
    params: Row | None = None
    """A manual trigger's params, recorded with the run (``RunRecord.params``); with a
    ``key``, part of what must match for a duplicate (else ``key_conflict``)."""
    key_window_s: float | None = None
    """How long ``key`` holds (``limits.trigger_key_window``); None: for ever (a
    scheduled fire's key, ``task@scheduled_for``)."""


def encode_params(params: Row | None) -> str | None:
    """Params as the state keeps and compares them: canonical JSON (sorted keys, no
    spaces), so that two bodies equal as JSON compare equal as text, and 1, 1.0 and
    true do not."""
    if params is None:
        return None
    return json.dumps(
        params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


TYPICAL_OF = 20
"""How many of a task's newest successes its typical duration is the median of."""


def typical_duration_s(store: Store, task_id: str, of: int = TYPICAL_OF) -> float | None:
    """The median ``duration_s`` of the task's ``of`` newest successful runs (one indexed
    read), or None before its first: the history half of a progress ETA."""
    runs = store.list_runs(task_id, RunStatus.SUCCEEDED, of)
    return median([float(r["duration_s"]) for r in runs if r["duration_s"] is not None])


def decode_params(text: Any) -> Row | None:
    """``encode_params`` undone: the column's text (a row read with ``SELECT *``) as a
    dict, or None."""
    return None if text is None else dict(json.loads(text))


@dataclass(frozen=True)
class FireResult:
    run_id: str
    created: bool
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class Finish:
    """One attempt's end for ``Store.finish_many`` (see ``Store.finish`` for the fields).
    ``attempt`` and ``failures`` are the run's as claimed: its runner holds them, so the
    batch need not read them back."""

    run_id: str
    task_id: str
    attempt: int
    failures: int
    outcome: Outcome
    next_status: RunStatus
    at: datetime
    """When the attempt ended (``finish``'s ``now``)."""
    not_before: datetime | None = None
    error: str | None = None
    exit_code: int | None = None
    http_status: int | None = None
    duration_s: float | None = None
    pause_after_failures: int = 0
    cancel_reason: str | None = None
    """Why a run that would have been re-queued ends cancelled instead (its task left
    the config: ``task_removed``); recorded as a ``cancel`` event."""
    owner: str | None = None
    """The lease holder recording this outcome. Set (the runner always sets it), the
    finish is fenced: it records only while the run is still ``running`` under this
    owner at this ``attempt``. A batch with one that is not records nothing and raises
    ``StateRefused("lease_lost")``: another process or node took the run over (its
    lease expired and it was recovered), and only the new holder's outcome counts."""


# ---------------------------------------------------------------- spend ledger records


class LedgerEntry(TypedDict):
    """One LLM call in the spend ledger: ``reserved`` at its worst case before the call,
    ``committed`` with what it really used after it (or charged at its worst case when
    its process died in between: ``status`` ``lost``, ``usage_missing`` 1)."""

    id: int
    ts: str
    run_id: str | None
    task_id: str | None
    provider: str | None
    model: str | None
    item: int | None
    state: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    reserved_tokens: int
    reserved_usd: float
    status: str | None
    duration_s: float | None
    usage_missing: int


class SpendTotals(TypedDict):
    """What a scope has spent: committed calls at their cost, reservations (calls in
    flight) at their worst case."""

    usd: float
    tokens: int


class WindowUsage(TypedDict):
    """A scope's calls and tokens, and its spend counted as ``SpendTotals.usd`` is."""

    calls: int
    input_tokens: int
    output_tokens: int
    spent_usd: float


class RunUsage(TypedDict):
    """One run's LLM calls; ``cost_usd`` counts a reservation at its worst case."""

    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class RunCost(TypedDict):
    """One finished run's LLM spend (``LedgerPort.task_run_costs``): a run that never
    called a model costs 0 in 0 calls."""

    run_id: str
    calls: int
    usd: float
    tokens: int


@dataclass(frozen=True)
class Reservation:
    """A call about to be made, and its worst case (``budget.Need``)."""

    run_id: str
    task_id: str
    provider: str
    model: str
    item: int | None
    tokens: int
    usd: float


@dataclass(frozen=True)
class Usage:
    """What a call really used, to replace its reservation."""

    input_tokens: int
    output_tokens: int
    cost_usd: float
    status: str
    duration_s: float | None
    usage_missing: bool


@dataclass(frozen=True)
class ScopeRefused:
    """The first scope a reservation did not fit, with what it had spent then."""

    scope: Scope
    spent_usd: float
    spent_tokens: int


Admission = Callable[[Scope, float, int], bool]
"""Budget admission (``budget.fits`` bound to a call's need): may a call be made in this
scope, which has spent this much USD and these many tokens? Policy above the port,
asked inside the reservation's transaction."""


# ---------------------------------------------------------------- alert records


@dataclass(frozen=True)
class NewAlert:
    """An alert to record (its text already scrubbed of secret values by the caller)."""

    kind: str
    dedup_key: str
    task_id: str | None
    run_id: str | None
    event_id: int | None
    summary: str
    data: Row


class AlertRecord(TypedDict):
    """A raised alert (``alerts``); ``data`` decoded."""

    id: int
    ts: str
    kind: str
    dedup_key: str
    task_id: str | None
    run_id: str | None
    event_id: int | None
    summary: str
    data: Row


class OutboxRecord(TypedDict):
    """One delivery of an alert (or a ping) to one channel: ``pending`` until it is
    ``delivered``, or ``failed`` once its retries are spent; ``payload`` decoded."""

    id: int
    alert_id: int | None
    channel: str
    dedup_key: str
    created_at: str
    status: str
    attempts: int
    next_attempt_at: str
    last_error: str | None
    delivered_at: str | None
    payload: Row


@dataclass(frozen=True)
class RunEnded:
    """A run ``Store.expire_runs`` ended: its id, task, and the status it ended in."""

    run_id: str
    task_id: str
    status: RunStatus


class RunningAttempt(TypedDict):
    """A running run and when its current attempt started (None before it has)."""

    id: str
    task_id: str
    attempt: int
    attempt_started: str | None


EventSink = Callable[[Row], None]
"""Given each event once its transaction has committed, in commit order."""
FireGate = Callable[[str, datetime], "dict[str, Any] | None"]
"""Budget admission, asked inside a scheduled fire's transaction: a reason to record the
fire as skipped (a budget window full), or None. Policy above the port, handed in."""
FireAdmission = Callable[[Fire, datetime, int], "dict[str, Any] | None"]
"""Cost-aware admission, asked inside a scheduled fire's transaction (a fire with
``honour_pause``, once neither pause, ``fire_gate`` nor the overlap policy skipped it),
with how many fires of the same task this batch has already queued and not yet
written (those written are among the task's active runs): None (admitted,
nothing to say), or a verdict whose ``decision`` is ``run``, ``defer`` (queued with its
``not_before``, ISO) or ``skip`` (recorded skipped, reason ``admission``); the engine
appends the verdict as the run's ``admission`` event. Policy above the port, handed in."""
WriteListener = Callable[[BaseException | None], None]
"""Told of the state's write health when it changes: the error that made a write fail
(disk full, read-only, I/O error, a lock held too long), or None once one works."""


RUN_ID_RANDOM_BITS = 80
_RUN_ID_TOP = 1 << RUN_ID_RANDOM_BITS


class RunIds:
    """Run ids: ``YYYYMMDDTHHMMSS-`` (the creation second, UTC) then 80 random bits as 20
    hex digits, e.g. ``20260301T120000-9f2c4e0b7a1d3c5e8f60``. They sort by creation
    time to the second; within a second, the ids of one generator increase (the
    second's first id draws its random part, each later one adds 1, as ULID's monotonic
    rule does), so one process's ids sort in the order they were made. Two processes'
    ids of the same second are unordered against each other and collide with a chance
    of about n**2 / 2**81 (engines draw again on a collision anyway)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._last = 0

    def __call__(self, now: datetime) -> str:
        second = int(now.timestamp())
        if second != self._second:
            self._second = second
            self._prefix = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S-")
            self._last = secrets.randbits(RUN_ID_RANDOM_BITS)
        else:
            self._last += 1
            if self._last >= _RUN_ID_TOP:  # out of room above this second's draw
                self._last = secrets.randbits(RUN_ID_RANDOM_BITS - 1)
        return f"{self._prefix}{self._last:020x}"


async def wait_commit(commit: Future[BaseException | None]) -> BaseException | None:
    """Await a commit running off the event loop without letting the waiter's
    cancellation reach it. ``wrap_future`` alone cancels the thread's future when its
    waiter is cancelled (an API request dropped, the loop shutting down): a commit still
    queued behind another would then never run, and its unit (run outcomes, events)
    would never become durable."""
    return await asyncio.shield(asyncio.wrap_future(commit))


@contextlib.contextmanager
def atomically(store: Store, *, shared: bool = False) -> Iterator[UnitOfWork]:
    """A block of verbs as one unit of work (``shared``: see ``Store.unit``): opened
    here, committed when the block ends, aborted when it raises. Inside a unit someone
    else owns it joins theirs (and their commit makes it durable)."""
    unit = store.unit(shared=shared)
    try:
        yield unit
    except BaseException:
        unit.abort()
        raise
    unit.commit()


# ---------------------------------------------------------------- the port


class UnitOfWork(Protocol):
    """One commit's worth of writes (see the module's "one owner per commit").

    Opened by ``Store.unit``; ``owner`` says whether this handle's ``commit`` is the one
    that makes the work durable. Every verb called while a unit is open writes into it."""

    @property
    def owner(self) -> bool: ...

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` if the unit does not commit (its commit fails, an earlier failure
        lost it, or it is aborted): for work done in memory on the strength of the
        unit's writes, such as runs started on a claim it holds."""
        ...

    def commit(self) -> None:
        """The owner: commit, then publish the unit's events; on failure everything in it
        is undone (the rollback hooks run) and the error raised. A joined handle: no-op."""
        ...

    def commit_off_loop(self) -> Future[BaseException | None] | None:
        """``commit`` with the durable write off the calling thread, so an event loop
        goes on meanwhile. The future gives what undid the unit, or None; the events
        are published (or rollback hooks run) when the commit is completed
        (``Store.complete_commit``), which every later use of the state does first.
        None from a joined handle."""
        ...

    def abort(self) -> None:
        """The owner: roll the unit back (its rollback hooks run). A joined handle: no-op."""
        ...


class NodesPort(Protocol):
    """The node registry: every daemon on this state says it is alive (``node_seen``, at
    start and then every few seconds) and that it stopped (``node_stopped``). With one
    node (SQLite) it is what ``agentd nodes`` shows; with several it is also who is alive:
    a node not seen for longer than its lease is dead, and its runs are recovered."""

    def node_seen(
        self,
        node_id: str,
        now: datetime,
        *,
        host: str,
        pid: int,
        version: str,
        config_generation: str,
    ) -> None:
        """Record that ``node_id`` is alive now, running ``version`` with the config of
        ``config_generation`` (registering it the first time; ``started_at`` is then)."""
        ...

    def node_stopped(self, node_id: str, now: datetime) -> None:
        """``node_id`` stopped cleanly: it holds nothing any more."""
        ...

    def nodes(self) -> list[NodeRecord]:
        """Every node, the most recently seen first."""
        ...

    def live_nodes(self, now: datetime, stale_after_s: float) -> set[str]:
        """The nodes seen within ``stale_after_s`` of ``now`` and not stopped."""
        ...

    def forget_nodes(self, before: datetime) -> int:
        """Drop the nodes last seen before ``before`` (stopped or dead long ago: a pod
        restarted a hundred times leaves a hundred rows); returns how many. Attempts
        keep the worker id they name."""
        ...


class LedgerPort(Protocol):
    """The spend ledger: every LLM call reserved at its worst case before it is made,
    committed with its real usage after; and budget alarms, once per window.

    Spend is always counted the same way (``SpendTotals``): committed rows at their
    cost, reserved rows at their reservation, so a call in flight is already spent."""

    def spend_in(self, scope: Scope, run_id: str | None = None) -> SpendTotals:
        """What ``scope`` has spent: a ``run`` scope counts ``run_id``'s calls, a window
        scope the calls of its task (or of every task, for a global scope) with
        ``start <= ts < end``."""
        ...

    def reserve_budget(
        self, now: datetime, reservation: Reservation, scopes: Sequence[Scope], admit: Admission
    ) -> int | ScopeRefused:
        """Reserve a call against every scope, or against none: inside one transaction
        that holds the write lock from the first read (no other writer, in this process
        or another, can reserve in between), ask ``admit`` of each scope in order with
        what it has spent. If every scope admits, insert the reservation and return its
        ledger id; at the first refusal, insert nothing, append one ``budget_refused``
        event, and return the scope and its spend."""
        ...

    def commit_spend(self, now: datetime, entry_id: int, usage: Usage) -> LedgerEntry | None:
        """Replace a reservation by what the call used and append its ``llm_call``
        event; the entry as committed, or None (and nothing written) if there is no
        such entry."""
        ...

    def charge_stale_reservations(self, now: datetime) -> int:
        """Charge every reservation still open at its worst case (status ``lost``,
        ``usage_missing``), with one ``ledger_settled`` event when there were any;
        returns how many. Only while no call can be in flight (at start, the state
        dir's lock held): a reservation left open is one whose process died mid-call,
        and the provider may have billed it. A second call charges nothing again."""
        ...

    def record_budget_alarm(
        self, now: datetime, scope: Scope, threshold: float, spent_usd: float
    ) -> bool:
        """Record that a window ``scope`` reached ``threshold`` (a fraction of its USD
        limit), with its ``budget_alarm`` event, once per (scope, window, threshold):
        True when this call recorded it, False when it was recorded already (across
        restarts too)."""
        ...

    def full_alarm_limit(self, scope: Scope) -> float | None:
        """The highest USD limit recorded with an alarm at threshold 1 or above in this
        window of ``scope`` (a refused call records one), or None."""
        ...

    def window_usage(self, scope: Scope) -> WindowUsage:
        """A window scope's calls, tokens and spend (see ``spend_in``)."""
        ...

    def run_usage(self, run_id: str) -> RunUsage:
        """One run's calls, tokens and spend."""
        ...

    def ledger_entry(self, entry_id: int) -> LedgerEntry | None: ...

    def task_run_costs(self, task_id: str, limit: int) -> list[RunCost]:
        """The spend of the task's ``limit`` newest finished runs that ran (a final status,
        at least one attempt), newest first, counted as ``SpendTotals.usd`` is: the cost
        history that cost-aware admission predicts from."""
        ...

    def record_budget_burn(
        self, now: datetime, scope: Scope, spent_usd: float, eta: datetime, usd_per_hour: float
    ) -> bool:
        """Record that a window ``scope`` is projected to run out at ``eta``, with its
        ``budget_burn`` event, once per (scope, window) (``budget.BURN_ALARM``): True when
        this call recorded it, False when it was recorded already (across restarts too)."""
        ...


class AlertsPort(Protocol):
    """The durable side of alerts: a cursor over the event log, the small state alerts
    keep, raised alerts, and their outbox of deliveries (at least once: a delivery in
    flight at a crash is still pending afterwards)."""

    # the event cursor ------------------------------------------------------------
    def event_cursor(self, name: str) -> int | None:
        """The last event id the reader ``name`` has handled, None before its first."""
        ...

    def move_event_cursor(self, name: str, event_id: int) -> None:
        """Set reader ``name``'s cursor (inside the unit that handled the events up to
        it, so a crash before its commit makes the reader see them again)."""
        ...

    def events_of_kinds(
        self, after_id: int, up_to_id: int, kinds: Collection[str], limit: int
    ) -> list[Row]:
        """Events with ``after_id < id <= up_to_id`` whose kind is one of ``kinds``, in id
        order, at most ``limit``, ``data`` decoded."""
        ...

    def instance_id(self) -> str:
        """This database's instance id (``models.INSTANCE_KEY``): 32 random hex digits,
        made and stored on the first ask (by whichever node asks first), the same ever
        after, and new in a restored copy (``agentd restore``)."""
        ...

    # alert state -----------------------------------------------------------------
    def alert_state(self, key: str) -> str | None: ...
    def set_alert_state(self, key: str, value: str, now: datetime) -> None:
        """Set ``key`` to ``value``, replacing what it held."""
        ...

    def clear_alert_state(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""
        ...

    def has_alert_state(self, *prefixes: str) -> bool:
        """Whether any key starts with one of ``prefixes``."""
        ...

    def alert_state_keys(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``, in order."""
        ...

    # alerts and their outbox -------------------------------------------------------
    def record_alert(self, now: datetime, alert: NewAlert) -> int:
        """Store a raised alert; its id (increasing)."""
        ...

    def alert(self, alert_id: int) -> AlertRecord | None: ...
    def queued_since(self, channel: str, dedup_key: str, since: datetime) -> bool:
        """Whether a delivery of ``dedup_key`` to ``channel`` was queued after ``since``
        (whatever became of it): the cooldown's question."""
        ...

    def enqueue_delivery(
        self, now: datetime, channel: str, dedup_key: str, payload: Row, alert_id: int | None
    ) -> int:
        """Queue one delivery, due now, ``pending``; its outbox id."""
        ...

    def pending_deliveries(self, now: datetime, limit: int) -> list[OutboxRecord]:
        """Pending deliveries due at ``now``, oldest first, at most ``limit``."""
        ...

    def next_delivery_at(self) -> datetime | None:
        """When the earliest pending delivery is due, or None when none is pending."""
        ...

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """Deliveries ``pending`` or ``failed`` right now, by (channel, status): the
        outbox gauges. Delivered rows are not counted (they are most of the table)."""
        ...

    def mark_delivered(self, outbox_id: int, now: datetime) -> bool:
        """A pending delivery was delivered: it is never due again. False (and nothing
        changed) when it was not pending."""
        ...

    def schedule_redelivery(self, outbox_id: int, attempts: int, error: str, at: datetime) -> None:
        """A delivery attempt failed and is tried again at ``at``; ``attempts`` made so far."""
        ...

    def give_up_delivery(self, outbox_id: int, attempts: int, error: str) -> None:
        """A delivery attempt failed and none follows: the row is ``failed`` for good."""
        ...

    def delivery(self, outbox_id: int) -> OutboxRecord | None: ...

    # what the checks look at ------------------------------------------------------------
    def running_attempts(self) -> list[RunningAttempt]:
        """Every running run with its current attempt's start."""
        ...


class AgentStepsPort(Protocol):
    """An agent run's transcript, step by step, kept so that a run resumed after a crash,
    a stop or a retry goes on from where it was: a recorded model reply is not asked for
    (nor paid for) again, a recorded tool result is not executed again, and a tool call
    recorded as started with no result is known to have an unknown outcome."""

    def record_agent_step(
        self,
        run_id: str,
        step: int,
        kind: str,
        call_id: str | None,
        payload: Any,
        now: datetime,
        *,
        owner: str | None = None,
        attempt: int | None = None,
    ) -> int:
        """Append one record to ``run_id``'s steps, after every one before it; returns its
        ``seq`` (1 for a run's first). ``payload`` is encoded as JSON (scrubbed by the
        redactor). Durable when this returns, as a checkpoint is (inside a unit: with its
        owner's commit).

        Fenced like a ``Finish``: with ``owner`` (and ``attempt``) given, only while the
        run is running under that owner at that attempt; else nothing is written and
        ``StateRefused("lease_lost")`` is raised (another node holds the run now, and
        its copy goes on from the steps recorded so far)."""
        ...

    def agent_steps(self, run_id: str) -> list[AgentStepRecord]:
        """Every record of ``run_id``, in ``seq`` order (none: an empty list)."""
        ...

    def decide_approval(
        self,
        run_id: str,
        decision: str,
        now: datetime,
        *,
        call_id: str | None = None,
        note: str | None = None,
        by: str = "operator",
    ) -> Row:
        """An operator's decision (``models.APPROVAL_DECISIONS``) on the call a parked run
        (``awaiting_approval``) asked about in its last ``approval_requested`` step, in
        one transaction: a ``decision`` step, the run ``queued`` (approve, skip: it
        resumes at that call) or ``denied`` (deny), an ``approval`` event. ``call_id``,
        given, must be that call's. Refused (``StateRefused``): ``unknown_run``,
        ``not_awaiting_approval``, ``wrong_call``, ``bad_decision``."""
        ...

    def expire_approvals(self, now: datetime) -> list[str]:
        """Deny (by ``agentd``, note ``models.TIMED_OUT``) every parked run whose approval
        deadline (its ``not_before``) has passed; their ids."""
        ...

    def expire_runs(self, now: datetime, deadlines: Mapping[str, Deadlines]) -> list[RunEnded]:
        """End every run that is not running (``queued``, ``awaiting_approval``) of a task
        in ``deadlines`` whose deadline has passed, as ``policy.overdue_status`` says:
        ``timed_out`` (``run_timeout``) or ``expired`` (``start_within``, a run never
        started), in one transaction, with a ``run_timed_out`` or ``run_expired`` event
        each; what it ended. A running run is not touched: its runner stops it (its
        attempt's timeout is bounded by the deadline), or, once its lease is lost and
        it is recovered to ``queued``, a later sweep ends it."""
        ...


class Store(LedgerPort, AlertsPort, NodesPort, AgentStepsPort, Protocol):
    """agentd's state, as every module above the state layer sees it."""

    event_sink: EventSink | None
    redactor: Redactor
    """Secret values scrubbed from every text written: run and attempt errors, event
    data, progress messages. Set by the daemon for each config it applies."""
    fire_gate: FireGate | None
    fire_admission: FireAdmission | None
    on_write: WriteListener | None
    write_error: str | None
    """Why the last write failed, until a commit succeeds again."""
    read_only: bool
    shared: bool
    """Several daemons may run on this state at once (PostgreSQL). Then a run held by
    another owner is another node's, alive while the node registry says so
    (``live_nodes``); on a state only one daemon may hold (SQLite, under the state dir's
    lock) every other owner is a process that is gone."""

    # unit of work ------------------------------------------------------------
    def unit(self, *, shared: bool = False) -> UnitOfWork:
        """Open a unit of work (the owner), or join the open one. A unit excludes every
        other writer from its start, so what its verbs read decides what they write,
        unless it is ``shared``: it holds only verbs that are safe beside other writers
        (the runner's claims, starts, heartbeats and finishes, checkpoints, budget
        reservations and their settling), and an engine with several writers
        (PostgreSQL) may run it beside other shared units, beginning it at its first
        write. On SQLite every unit is exclusive."""
        ...

    @property
    def committing(self) -> bool:
        """A commit is running off the loop right now: a use of the state would wait."""
        ...

    def complete_commit(self) -> BaseException | None:
        """Wait for the commit running off the loop (if any), then publish its events or
        run its rollback hooks. Returns what undid it, or None."""
        ...

    async def commit_done(self) -> None:
        """Returns once the commit running off the loop (if any) is done, without holding
        the event loop: for readers on the loop that can wait (API requests)."""
        ...

    def flush(self) -> None:
        """At stop: commit a unit its owner left open and complete a commit running off
        the loop; raises what undid either."""
        ...

    def close(self) -> None: ...

    # tasks -------------------------------------------------------------------
    def sync_tasks(
        self,
        tasks: dict[str, tuple[str, str]],
        now: datetime,
        synced: dict[str, tuple[str, str]] | None = None,
        *,
        keep_absent: bool = False,
    ) -> None:
        """Record which tasks the config has (id -> (fingerprint, kind)); a task it
        lacks is marked removed and its queued runs cancelled, unless ``keep_absent``
        (another live node may define it: see the daemon's ``_sync_tasks``)."""
        ...

    def task_rows(self, ids: Sequence[str] | None = None) -> list[TaskRecord]: ...
    def task_row(self, task_id: str) -> TaskRecord | None: ...
    def paused_tasks(self) -> set[str]: ...
    def pause(self, task_id: str, reason: str, now: datetime, actor: str = "operator") -> bool: ...
    def resume(self, task_id: str, now: datetime) -> bool: ...

    # fires -------------------------------------------------------------------
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
        """``fire_many`` of one ``Fire``; refused (``StateRefused``): ``unknown_task``, and
        ``idempotency_conflict`` for a key held by a run with other ``params``."""
        ...

    def fire_many(self, fires: Sequence[Fire], now: datetime) -> list[FireResult]: ...
    def record_misfire(
        self, task_id: str, now: datetime, missed: list[datetime], reason: str
    ) -> None: ...

    # claims and leases ---------------------------------------------------------
    def version(self) -> tuple[int, int]:
        """Compares unequal after any change to the state, by anyone (change detection:
        a cheap check before an idle loop's reads)."""
        ...

    def first_queued_at(self) -> datetime | None: ...
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
        """Take up to ``limit`` due runs under a lease (see the engines). With
        ``only_tasks``, none but runs of those tasks: a node claims only what its own
        config defines (nodes on two config generations during a rollout)."""
        ...

    def heartbeat(
        self, run_ids: Sequence[str], owner: str, now: datetime, lease_s: float
    ) -> set[str]:
        """Extend ``owner``'s leases on ``run_ids``; returns those it no longer holds
        (recovered by another process or node after their lease expired, or gone): the
        caller must stop its copy of each and record nothing for it."""
        ...

    def mark_started(self, run_id: str, task_id: str, now: datetime, workspace: str) -> None: ...
    def mark_started_many(self, runs: Sequence[tuple[str, str, str]], now: datetime) -> None: ...
    def record_group(self, run_id: str, attempt: int, group: GroupRecord) -> None: ...
    def lost_groups(
        self,
        now: datetime,
        live_owners: set[str] | None = None,
        keep: set[str] | None = None,
    ) -> dict[str, GroupRecord]: ...
    def recover(
        self,
        now: datetime,
        owner: str,
        live_owners: set[str] | None = None,
        keep: set[str] | None = None,
        *,
        only: set[str] | None = None,
        ended: Mapping[str, GroupEnd] | None = None,
    ) -> list[str]: ...
    def cancel_requests(self, owner: str) -> list[str]: ...

    # outcomes ------------------------------------------------------------------
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
        """Close the run's current attempt and move it on (``next_status``). With
        ``owner`` and ``attempt``, fenced as ``Finish.owner`` says."""
        ...

    def finish_many(self, items: Sequence[Finish]) -> None: ...
    def request_cancel(self, run_id: str, now: datetime) -> str: ...

    # quarantine ------------------------------------------------------------------
    def quarantine_list(self) -> list[QuarantineRecord]: ...
    def quarantine_get(self, run_id: str) -> Row: ...
    def quarantine_release(self, run_id: str, now: datetime) -> None: ...
    def quarantine_drop(self, run_id: str, now: datetime) -> None: ...
    def resume_run(self, run_id: str, now: datetime) -> Row:
        """A ``budget_exhausted`` run queued again, as a new attempt that goes on from its
        checkpoint and agent steps (a ``run_resumed`` event). Refused: ``unknown_run``,
        ``not_resumable`` (any other status)."""
        ...

    # checkpoints and progress ------------------------------------------------------
    def load_checkpoint(self, run_id: str) -> Any | None: ...
    def save_checkpoint(self, run_id: str, data: Any, now: datetime) -> int: ...
    def progress(
        self,
        run_id: str,
        done: int,
        total: int | None,
        message: str,
        now: datetime,
        eta: str | None = None,
    ) -> None:
        """Record a run's progress and its ``progress`` event (``done``, ``total``,
        ``message`` and, when the runner could estimate one, ``eta``: ISO text)."""
        ...

    # events ------------------------------------------------------------------------
    def emit(
        self,
        now: datetime,
        kind: EventKind,
        task_id: str | None = None,
        run_id: str | None = None,
        **data: Any,
    ) -> None:
        """Append an audit event inside the open unit of work (or as its own)."""
        ...

    def events(
        self, run_id: str | None = None, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]: ...
    def recent_events(self, limit: int = 50) -> list[EventRecord]: ...
    def latest_event_id(self) -> int: ...

    # reads for views -----------------------------------------------------------------
    def get_run(self, run_id: str) -> RunRecord: ...
    def list_runs(
        self,
        task_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[RunRecord]: ...
    def attempts(self, run_id: str) -> list[AttemptRecord]: ...
    def active_runs(self, task_id: str) -> list[RunRecord]: ...
    def counts(self) -> dict[str, int]: ...
    def gauge_counts(self) -> tuple[int, int]: ...
    def recent_alerts(self, limit: int) -> list[Row]: ...
    def running_ids(self, owner: str) -> set[str]: ...

    # change notification -------------------------------------------------------------
    def watch(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> bool:
        """Call ``on_change`` on ``loop`` soon after another process changes the state
        (a CLI's direct write; on a shared engine, another node), so the caller looks now
        rather than at its next idle poll. A hint, never the truth: a lost notice costs
        one idle poll (``version`` still moves). False when notices are off (said in the
        log); only the process that holds the state may watch it."""
        ...

    def unwatch(self) -> None:
        """Stop watching (at stop, before the state is let go)."""
        ...

    def announce_change(self) -> None:
        """Tell the process watching the state that this one changed it (after a commit).
        Never blocks and never raises: the change is durable already."""
        ...

    # health ----------------------------------------------------------------------------
    def probe_write(self, now: datetime) -> None:
        """One small durable write: does the state accept writes right now?"""
        ...
