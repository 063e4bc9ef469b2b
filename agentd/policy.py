"""Domain policy as plain functions over records: what a fire does given the task's
active runs (overlap), when consecutive quarantines pause a task (auto-pause), and the
layered deadlines of a run (``start_within``, ``run_timeout``, and what remains of them
for one attempt or a retry).

The state layer asks these inside its transaction and carries out the answer; they
read nothing and write nothing, so they are tested without a database (and a second
engine asks the same functions). Retry decisions live in ``runner.decide``, catch-up in
``scheduler.catchup_split``, budget admission in ``budget``.

Imports only ``models``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from agentd.models import Row, RunStatus

OVERLAPS = ("allow", "skip", "queue_one", "queue_all", "cancel_previous")


@dataclass(frozen=True)
class OverlapDecision:
    """``skip``: the reason the fire makes no run (``overlap``, ``queue_full``), or None.
    ``cancel``: the active runs to cancel before the new one is enqueued
    (``cancel_previous``)."""

    skip: str | None = None
    cancel: tuple[Row, ...] = ()


ENQUEUE = OverlapDecision()


def overlap_decision(overlap: str, active: Sequence[Row], max_queued: int) -> OverlapDecision:
    """What a fire of a task whose queued and running runs are ``active`` does:
    - ``allow``: always a new run;
    - ``skip``: none while any run is queued or running;
    - ``queue_one``: none while one is queued (a running one may have one successor);
    - ``queue_all``: none once ``max_queued`` are queued;
    - ``cancel_previous``: a new run, and every active one is cancelled."""
    if overlap == "allow":
        return ENQUEUE
    queued = [r for r in active if r["status"] == RunStatus.QUEUED]
    if (overlap == "skip" and active) or (overlap == "queue_one" and queued):
        return OverlapDecision(skip="overlap")
    if overlap == "queue_all" and len(queued) >= max_queued:
        return OverlapDecision(skip="queue_full")
    if overlap == "cancel_previous" and active:
        return OverlapDecision(cancel=tuple(active))
    return ENQUEUE


def auto_pause_reason(consecutive_quarantines: int, pause_after: int, paused: bool) -> str | None:
    """Why a task is to be paused now that ``consecutive_quarantines`` of its runs in a
    row were quarantined, or None: ``pause_after`` 0 never pauses, and a paused task is
    not paused again."""
    if pause_after <= 0 or paused or consecutive_quarantines < pause_after:
        return None
    return f"{consecutive_quarantines} consecutive runs quarantined"


def node_stale_after_s(lease_s: float) -> float:
    """How long a node may go unseen in the registry before the others take it as dead
    and recover its runs: two leases. A live node beats every third of a lease; a beat
    late by a whole lease (a loop held up, a slow database) must not make a live node's
    freshly claimed runs look lost. A dead node's runs wait no longer for it: their
    leases, no longer renewed, expire within one lease, and expired leases are
    recovered whoever holds them."""
    return 2 * lease_s


# ---------------------------------------------------------------- layered deadlines
#
# As Temporal separates schedule-to-start, start-to-close and schedule-to-close, a run
# has three deadlines, each optional:
# - ``start_within`` (queue wait): from its enqueue (``created_at``) to its first start;
#   a run not started by then ends ``expired`` and never runs;
# - ``timeout`` (one attempt): from the attempt's start; a timed-out attempt is retried
#   as the task's retry policy says (this one is the runner's ``asyncio.timeout``);
# - ``run_timeout`` (the whole run): from its enqueue to its end, over every attempt and
#   every wait between them (backoff, an approval); the run ends ``timed_out``, final.


@dataclass(frozen=True)
class Deadlines:
    """A task's queue-wait and whole-run deadlines, in seconds (None: none)."""

    start_within: float | None = None
    run_timeout: float | None = None

    def __bool__(self) -> bool:
        return self.start_within is not None or self.run_timeout is not None

    @property
    def shortest(self) -> float:
        """The shorter of the two (one that is set): a run enqueued less than this ago
        cannot be overdue. Only for deadlines that are not empty."""
        return min(s for s in (self.start_within, self.run_timeout) if s is not None)


def _after(start: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else start + timedelta(seconds=seconds)


def run_deadline(created_at: datetime, run_timeout: float | None) -> datetime | None:
    """When a run enqueued at ``created_at`` must have ended, or None."""
    return _after(created_at, run_timeout)


def start_deadline(created_at: datetime, start_within: float | None) -> datetime | None:
    """When a run enqueued at ``created_at`` must have started, or None."""
    return _after(created_at, start_within)


def overdue_status(
    created_at: datetime, started: bool, deadlines: Deadlines, now: datetime
) -> RunStatus | None:
    """What a run that is not running (queued, or parked for an approval) becomes at
    ``now``: ``timed_out`` once its whole-run deadline has passed (whether it ever
    started or not: the run's deadline is the stronger statement), else ``expired`` if
    it never started and its queue-wait deadline has passed, else None (it waits on).
    A deadline is passed when ``now`` is at or after it."""
    end = run_deadline(created_at, deadlines.run_timeout)
    if end is not None and now >= end:
        return RunStatus.TIMED_OUT
    begin = start_deadline(created_at, deadlines.start_within)
    if not started and begin is not None and now >= begin:
        return RunStatus.EXPIRED
    return None


def attempt_timeout_s(
    attempt_timeout: float | None, deadline: datetime | None, now: datetime
) -> tuple[float | None, bool]:
    """How long an attempt starting at ``now`` may run: the task's per-attempt
    ``timeout`` or what is left of the run's deadline, whichever is shorter (never
    below 0), and whether the run's deadline is the shorter (an attempt stopped by it
    ends the run ``timed_out``, where the attempt's own timeout may be retried)."""
    if deadline is None:
        return attempt_timeout, False
    left = max(0.0, (deadline - now).total_seconds())
    if attempt_timeout is None or left < attempt_timeout:
        return left, True
    return attempt_timeout, False


def retry_fits(not_before: datetime, deadline: datetime | None) -> bool:
    """Whether a retry due at ``not_before`` can still start before the run's deadline
    (a retry that cannot is not queued: the run ends ``timed_out`` at once)."""
    return deadline is None or not_before < deadline
