"""The spend ledger's policy: every LLM call reserved before it is made, committed after.

A call first *reserves* its worst case (``budget.Need``) against every limit that
applies (``Store.reserve_budget``, which asks ``budget.fits`` of each scope inside the
transaction that holds the budget lock): concurrent runs, in this process or another,
cannot both squeeze into the last dollar. After the call the row is *committed* with the
provider's usage. Spend counts reserved rows at their reservation, so a call in flight
is already spent.

A reservation left behind by a dead process (``kill -9`` mid-call) is charged at its
worst case at the next start (``charge_stale``): the provider may well have billed it.

Budget alarms are once per (scope, window, threshold) (``Store.record_budget_alarm``),
across restarts. Nothing here speaks SQL: the statements are the engine's
(``agentd.state.sqlite.ledger``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agentd.budget import (
    EPS,
    Need,
    Period,
    Scope,
    admit,
    cost_history,
    fits,
    full,
    global_scopes,
    reached,
    task_scopes,
    window_at,
)
from agentd.clock import to_iso
from agentd.config import Config
from agentd.models import Row
from agentd.state.port import Fire, Reservation, ScopeRefused, Store, Usage, atomically


@dataclass(frozen=True)
class Refusal:
    """A call that did not fit ``scope``: it was not made."""

    scope: Scope
    spent_usd: float
    spent_tokens: int
    need: Need

    def message(self) -> str:
        s = self.scope
        if s.tokens is not None and self.spent_tokens + self.need.tokens > s.tokens:
            return (
                f"budget {s.label} tokens exhausted: {self.spent_tokens} of {s.tokens} used,"
                f" the next call may need up to {self.need.tokens}"
            )
        return (
            f"budget {s.label} exhausted: {self.spent_usd:.6f} of {s.usd:g} USD spent,"
            f" the next call may cost up to {self.need.usd:.6f}"
        )


def spent(store: Store, scope: Scope, run_id: str | None = None) -> tuple[float, int]:
    """USD and tokens spent (reservations included) in ``scope``."""
    totals = store.spend_in(scope, run_id)
    return totals["usd"], totals["tokens"]


def reserve(
    store: Store,
    now: datetime,
    *,
    run_id: str,
    task_id: str,
    provider: str,
    model: str,
    item: int | None,
    need: Need,
    scopes: list[Scope],
) -> int | Refusal:
    """Reserve ``need`` against every scope, or refuse without reserving anything.

    Admission is ``budget.fits``; a window that refuses a call is marked full (its
    100 % alarm), so its scheduled fires are skipped until it ends or its limit rises."""
    reservation = Reservation(run_id, task_id, provider, model, item, need.tokens, need.usd)

    def admit(scope: Scope, spent_usd: float, spent_tokens: int) -> bool:
        return fits(scope, spent_usd, spent_tokens, need)

    with atomically(store, shared=True):  # the scopes' own locks serialise it
        result = store.reserve_budget(now, reservation, scopes, admit)
        if not isinstance(result, ScopeRefused):
            return result
        if result.scope.is_window:  # the window cannot take another call
            store.record_budget_alarm(now, result.scope, 1.0, result.spent_usd)
    return Refusal(result.scope, result.spent_usd, result.spent_tokens, need)


def commit(
    store: Store,
    now: datetime,
    entry_id: int,
    *,
    input_tokens: int,
    output_tokens: int,
    cost: float,
    status: str,
    duration_s: float | None,
    usage_missing: bool,
    scopes: list[Scope],
) -> None:
    """Replace a reservation by what the call really used; raise any alarm it crossed
    (``budget.reached``), in the same unit of work."""
    usage = Usage(input_tokens, output_tokens, cost, status, duration_s, usage_missing)
    with atomically(store, shared=True):  # an alarm once per threshold by its key
        if store.commit_spend(now, entry_id, usage) is None:
            return
        for scope in scopes:
            if scope.is_window and scope.usd is not None:
                usd, _ = spent(store, scope)
                for threshold in reached(usd, scope.usd):
                    store.record_budget_alarm(now, scope, threshold, usd)


def charge_stale(store: Store, now: datetime) -> int:
    """At start (the state-dir lock held): reservations of a dead process are charged
    at their worst case, since the call may have been made and billed; how many."""
    return store.charge_stale_reservations(now)


def window_blocked(store: Store, config: Config, task_id: str, now: datetime) -> Row | None:
    """Why a scheduled fire of this task must be skipped for budget, or None.

    A window is full when its spend reached the limit, or when a call was refused in it
    (its 100 % alarm) and the limit has not been raised since. Global windows gate only
    agent tasks: a python task may not call a model at all.
    """
    task = config.tasks.get(task_id)
    if task is None:
        return None
    scopes = task_scopes(config, task, now)
    if task.agent is not None:
        scopes += global_scopes(config, now)
    for scope in scopes:
        assert scope.start is not None and scope.end is not None and scope.usd is not None
        usd, _ = spent(store, scope)
        marked = store.full_alarm_limit(scope)
        if full(scope, usd) or (marked is not None and marked >= scope.usd - EPS):
            return {
                "reason": "budget",
                "scope": scope.label,
                "spent_usd": round(usd, 6),
                "limit_usd": scope.usd,
                "window_end": to_iso(scope.end),
            }
    return None


BATCH_TRIGGERS = frozenset({"catchup", "backfill"})
"""Fires of occurrences that were due already (a catch-up after downtime, a backfill):
admission skips what does not fit rather than deferring it (a pile of them deferred to
the next window would all run at its start)."""


def fire_verdict(store: Store, config: Config, fire: Fire, now: datetime, ahead: int) -> Row | None:
    """Cost-aware admission of one scheduled fire (``budget.admit``), as the ``admission``
    event's data, or None for a task without ``admission``: predicted from the task's own
    history (``Store.task_run_costs``, the p50 or p95 USD of its newest finished runs),
    against every window the task is under (its day/month, the global day/month) with
    what each has spent, calls in flight included, less what the task's own queued and
    running runs may still spend (the prediction less what each spent so far; a deferred
    run counts too) and ``ahead`` fires of the task this batch queued already at the same
    prediction. Other tasks' queued runs are not counted against a global window. A
    deferred run is weighed once, when it is deferred, not again when it starts."""
    task = config.tasks.get(fire.task_id)
    if task is None or task.admission is None:
        return None
    policy = task.admission
    costs = store.task_run_costs(task.id, policy.history)
    history = cost_history([(c["usd"], c["tokens"]) for c in costs], policy.min_runs)
    predicted = None if history is None else history.usd(policy.estimate)
    scopes = task_scopes(config, task, now) + global_scopes(config, now)
    windows = [(scope, spent(store, scope)[0]) for scope in scopes]
    pending, active = 0.0, 0
    if predicted is not None and predicted > EPS:
        for run in store.active_runs(task.id):  # each may still spend up to the prediction
            active += 1
            pending += max(0.0, predicted - store.run_usage(run["id"])["cost_usd"])
    catchup = fire.trigger in BATCH_TRIGGERS
    verdict = admit(
        policy.on_budget, predicted, windows, ahead, pending_usd=pending, catchup=catchup
    )
    detail = verdict.reason
    if history is None:
        detail = f"too little history: {len(costs)} of {policy.min_runs} finished runs"
    row: Row = {
        "decision": verdict.decision,
        "detail": detail,
        "on_budget": policy.on_budget,
        "estimate": policy.estimate,
        "predicted_usd": None if predicted is None else round(predicted, 6),
        "history_runs": len(costs),
        "scope": verdict.scope,
        "remaining_usd": verdict.remaining_usd,
        "active_runs": active,
        "pending_usd": round(pending, 6),
        "ahead": ahead,
    }
    if history is not None:
        row["p50_usd"] = round(history.p50_usd, 6)
        row["p95_usd"] = round(history.p95_usd, 6)
        row["p95_tokens"] = history.p95_tokens
    if verdict.not_before is not None:
        row["not_before"] = to_iso(verdict.not_before)
    return row


def run_usage(store: Store, run_id: str) -> Row:
    """One run's LLM calls, tokens and spend, for the run's view."""
    return dict(store.run_usage(run_id))


def window_report(store: Store, scope: Scope) -> Row:
    """One window's spend, for the API, the CLI and the remaining-budget gauge."""
    assert scope.start is not None and scope.end is not None
    usage = store.window_usage(scope)
    usd = usage["spent_usd"]
    return {
        "scope": scope.label,
        "period": scope.period,
        "start": to_iso(scope.start),
        "end": to_iso(scope.end),
        "calls": usage["calls"],
        "input_tokens": usage["input_tokens"],
        "output_tokens": usage["output_tokens"],
        "spent_usd": round(usd, 6),
        "limit_usd": scope.usd,
        "remaining_usd": None if scope.usd is None else round(max(0.0, scope.usd - usd), 6),
    }


def spend_report(store: Store, config: Config, now: datetime) -> Row:
    """Spend per task and window (day and month in the task's zone) and globally, for
    the API and the CLI. Tasks that cannot call a model and have no budget are left out."""

    def window(task_id: str | None, period: Period, zone: str, usd: float | None) -> Row:
        start, end = window_at(period, now, zone)
        label = f"{task_id or 'global'}:{period}"
        key = f"task:{label}" if task_id else label
        scope = Scope(key, label, task_id, period, usd, None, start, end)
        return {**window_report(store, scope), "timezone": zone}

    tasks = []
    for task_id, task in config.tasks.items():
        budget = task.budget.task
        if config.llm_target(task) is None and budget.usd_per_day is None:
            continue
        zone = config.task_timezone(task)
        tasks.append(
            {
                "task": task_id,
                "day": window(task_id, "day", zone, budget.usd_per_day),
                "month": window(task_id, "month", zone, budget.usd_per_month),
                "run_budget": task.budget.run.model_dump(),
            }
        )
    zone, limits = config.limits_timezone, config.limits
    return {
        "tasks": tasks,
        "global": {
            "day": window(None, "day", zone, limits.usd_per_day),
            "month": window(None, "month", zone, limits.usd_per_month),
        },
    }
