"""Plain value types shared across agentd; a leaf module.

Statuses are strings in the DB and in JSON, so they are ``StrEnum`` members that
compare equal to those strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Row = dict[str, Any]
"""A record as the state layer hands it out: column name to value."""


class StateRefused(Exception):
    """A request that the state does not allow; ``code`` is stable for APIs and the CLI.
    Storage-neutral: engines raise it, views map ``code`` to their answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class EventKind(StrEnum):
    """The one list of audit event kinds (the ``events`` table's ``kind``). Every other
    list of kinds (alerting, metrics, the API's schema) is derived from this one."""

    # a run's life
    ENQUEUE = "enqueue"
    SKIP = "skip"
    """A fire that made no run (overlap, full queue, paused, budget): ``reason``."""
    MISFIRE = "misfire"
    CLAIM = "claim"
    START = "start"
    HEARTBEAT = "heartbeat"
    PROGRESS = "progress"
    CHECKPOINT = "checkpoint"
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    INTERRUPT = "interrupt"
    CANCEL = "cancel"
    CANCEL_REQUESTED = "cancel_requested"
    RETRY = "retry"
    RECOVER = "recover"
    """A run lost with its process (or lease) re-queued."""
    ORPHAN_KILLED = "orphan_killed"
    """A lost run's process group still ran and was ended before the run was re-queued."""
    QUARANTINE = "quarantine"
    RELEASE = "release"
    DROP = "drop"
    # approvals of an agent run's tool calls
    AWAITING_APPROVAL = "awaiting_approval"
    """A run parked before a tool call that needs an operator (``reason``: ``sensitive``
    or ``unknown_outcome``; ``call_id``, ``tool``, ``arguments_sha256``, ``deadline``)."""
    APPROVAL = "approval"
    """An operator's (or the approval timeout's) decision on a parked run: ``decision``
    ``approve``, ``skip`` or ``deny``, ``call_id``, ``by``, ``note``."""
    RUN_EXPIRED = "run_expired"
    """A queued run not started within its task's ``start_within`` of its enqueue ended
    ``expired`` (``start_within_s``, ``queued_s``)."""
    RUN_TIMED_OUT = "run_timed_out"
    """A run ended ``timed_out``: its task's ``run_timeout`` (the whole run, over all
    its attempts and the waits between them) passed (``run_timeout_s``, ``attempts``,
    ``status_before``)."""
    RUN_RESUMED = "run_resumed"
    """A run that ended ``budget_exhausted`` queued again by an operator (``runs resume``)."""
    TOOL_CALL = "tool_call"
    """One tool call of an agent run ended: ``tool``, ``call_id``, ``step``,
    ``arguments_sha256``, ``duration_s``, ``outcome`` (``ok``, ``error``, ``refused``,
    ``skipped``)."""
    # budgets and LLM calls
    BUDGET_EXHAUSTED = "budget_exhausted"
    BUDGET_REFUSED = "budget_refused"
    BUDGET_ALARM = "budget_alarm"
    LLM_CALL = "llm_call"
    LEDGER_SETTLED = "ledger_settled"
    # tasks and config
    PAUSE = "pause"
    RESUME = "resume"
    TASK_ADDED = "task_added"
    TASK_CHANGED = "task_changed"
    TASK_REMOVED = "task_removed"
    CONFIG_RELOAD_FAILED = "config_reload_failed"
    # conditions watched by the outbox
    DEADMAN = "deadman"
    RUN_TOO_LONG = "run_too_long"
    RECOVERED = "recovered"
    # cost-aware admission and burn-rate alarms
    ADMISSION = "admission"
    """A scheduled fire of a task with ``admission`` weighed against its budget windows:
    ``decision`` (``run``, ``defer``, ``skip``), ``predicted_usd`` (None: too little
    history), ``estimate``, ``history_runs``, ``scope``, ``remaining_usd``, ``reason``,
    and ``not_before`` for a deferred run (``agentd.admission``)."""
    BUDGET_BURN = "budget_burn"
    """A window's spend rate projects its exhaustion well before the window ends:
    ``scope``, ``spent_usd``, ``limit_usd``, ``projected_exhaustion``, ``window_start``,
    ``window_end``, ``usd_per_hour`` (``budget.burn_alarm``); once per window."""


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    """Parked before an agent's tool call that needs an operator: holds no lease and no
    slot; ``approve`` or ``skip`` queues it again (it resumes at that call), ``deny`` or
    the approval timeout (its ``not_before``) ends it ``denied``."""
    SUCCEEDED = "succeeded"
    QUARANTINED = "quarantined"
    DROPPED = "dropped"
    """Quarantined, then dropped (``quarantine drop``, or ``history.keep_quarantine``):
    final, out of quarantine, kept as history until retention takes it."""
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    BUDGET_EXHAUSTED = "budget_exhausted"
    """Stopped before a call its budget could not hold; final, neither retried nor
    quarantined (a retry would hit the same limit)."""
    DENIED = "denied"
    """Parked for an approval that was refused, or not given within ``approval_timeout``;
    final."""
    EXPIRED = "expired"
    """Not started within its task's ``start_within`` of its enqueue (a queue-wait
    deadline, Temporal's schedule-to-start); final, never run."""
    TIMED_OUT = "timed_out"
    """Not finished within its task's ``run_timeout`` of its enqueue, whatever its attempts
    (a whole-run deadline, Temporal's schedule-to-close); final, neither retried nor
    quarantined. One attempt's ``timeout`` is not this: that one is retried."""


MAX_EVENT_ID = 2**63 - 1
"""Event ids are SQLite/PostgreSQL signed 64-bit integers: the largest a cursor may be."""

RUN_STATUSES: tuple[str, ...] = tuple(status.value for status in RunStatus)
"""Every run status, in lifecycle order: the API's filter and schema list these."""

FINAL_STATUSES = frozenset(
    {
        RunStatus.SUCCEEDED,
        RunStatus.QUARANTINED,
        RunStatus.DROPPED,
        RunStatus.CANCELLED,
        RunStatus.SKIPPED,
        RunStatus.BUDGET_EXHAUSTED,
        RunStatus.DENIED,
        RunStatus.EXPIRED,
        RunStatus.TIMED_OUT,
    }
)
ACTIVE_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})


class Outcome(StrEnum):
    """How one attempt ended. ``interrupted`` and ``lost`` cost no attempt."""

    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    LOST = "lost"
    BUDGET_EXHAUSTED = "budget_exhausted"
    PARKED = "parked"
    """The attempt stopped before a tool call that needs an approval; costs no attempt."""
    EXPIRED = "expired"
    """The attempt never began: the run was claimed after its ``start_within`` had
    passed (between two sweeps), so it ends ``expired`` instead; costs no attempt."""


APPROVAL_DECISIONS = ("approve", "skip", "deny")
"""What an operator may decide on a parked call: run it (``approve``), answer the model
that it was skipped (``skip``), or end the run ``denied`` (``deny``)."""
TOOL_RESULT = "tool_result"
"""The agent step kind of a tool call's result; its record also makes a ``tool_call``
audit event (see ``agentd.executors.toolloop`` for the other kinds)."""
TIMED_OUT = "approval_timeout"
"""The note of a denial made by the approval timeout, not by an operator."""


@dataclass(frozen=True)
class Park:
    """Why an agent run stops to wait for an operator, and at which call."""

    reason: str
    """``sensitive`` (the tool needs an approval) or ``unknown_outcome`` (the call was
    running when its process died, and the tool is not idempotent)."""
    call_id: str
    tool: str
    step: int
    arguments_sha256: str


@dataclass(frozen=True)
class Result:
    """What an executor reports. Timeouts, cancels and interrupts are the runner's business.

    ``retryable`` is the executor's opinion where it knows better than the task policy
    (a 401 from a provider will not get better by retrying); ``None`` defers to policy.
    """

    ok: bool
    error: str | None = None
    exit_code: int | None = None
    http_status: int | None = None
    retry_after_s: float | None = None
    retryable: bool | None = None
    budget_exhausted: bool = False
    """The run stopped before a call that its budget could not hold."""
    park: Park | None = None
    """The run waits for an operator's decision on this call (``awaiting_approval``)."""
    detail: dict[str, Any] = field(default_factory=dict)


class StopRequested(Exception):
    """Raised from ``checkpoint.save()`` when the daemon asks the run to stop there.

    The checkpoint is already durable when this is raised, so the run resumes at the
    next item on the next start.
    """


class CheckpointNotSaved(Exception):
    """Raised from ``checkpoint.save()`` when the state DB cannot be written (a full disk,
    a read-only file): the run stops there, as the daemon did not fail the task, it costs
    no attempt, and it resumes from its last saved checkpoint once writes work again."""


ALERT_EVENTS = frozenset(
    {
        EventKind.QUARANTINE,
        EventKind.PAUSE,
        EventKind.SUCCESS,
        EventKind.BUDGET_ALARM,
        EventKind.BUDGET_EXHAUSTED,
        EventKind.AWAITING_APPROVAL,
        EventKind.DEADMAN,
        EventKind.RUN_TOO_LONG,
        EventKind.CONFIG_RELOAD_FAILED,
        EventKind.RECOVERED,
        EventKind.START,
        EventKind.FAILURE,
        EventKind.TIMEOUT,
        EventKind.RUN_EXPIRED,
        EventKind.RUN_TIMED_OUT,
        EventKind.BUDGET_BURN,
    }
)
"""The event kinds that can raise an alert, fire a ping or clear a condition: what the
outbox reads, and what retention keeps until the outbox has read it."""
ALERTS_CURSOR = "alerts_cursor"
"""The key under which the state keeps the id of the last event the outbox has read."""
INSTANCE_KEY = "instance_id"
"""The key under which the state keeps its instance id: random, made once per database
(``AlertsPort.instance_id``), and made anew by ``agentd restore``. Alert delivery ids
(``X-Agentd-Delivery``) begin with it, so that they never repeat across a database
recreated or restored, whose alert ids begin again where it began."""
