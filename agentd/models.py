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


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
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
        EventKind.DEADMAN,
        EventKind.RUN_TOO_LONG,
        EventKind.CONFIG_RELOAD_FAILED,
        EventKind.RECOVERED,
        EventKind.START,
        EventKind.FAILURE,
        EventKind.TIMEOUT,
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
