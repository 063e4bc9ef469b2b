"""Domain policy as plain functions over records: what a fire does given the task's
active runs (overlap), and when consecutive quarantines pause a task (auto-pause).

The state layer asks these inside its transaction and carries out the answer; they
read nothing and write nothing, so they are tested without a database (and a second
engine asks the same functions). Retry decisions live in ``runner.decide``, catch-up in
``scheduler.catchup_split``, budget admission in ``budget``.

Imports only ``models``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
