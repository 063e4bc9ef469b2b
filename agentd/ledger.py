"""The spend ledger: every LLM call reserved before it is made, committed after.

A call first *reserves* its worst case (``budget.Need``) in one ``BEGIN IMMEDIATE``
transaction that checks every limit that applies: concurrent runs cannot both squeeze
into the last dollar. After the call the row is *committed* with the provider's usage.
Sums count reserved rows at their reservation, so a call in flight is already spent.

A reservation left behind by a dead process (``kill -9`` mid-call) is settled at its
worst case at the next start: the provider may well have billed it.

Budget alarms live in ``budget_alarms``, one row per (scope, window, threshold): the
primary key is what makes each alarm fire once per window, across restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentd.budget import (
    EPS,
    Need,
    Period,
    Scope,
    fits,
    full,
    global_scopes,
    reached,
    task_scopes,
    window_at,
)
from agentd.clock import to_iso
from agentd.config import Config
from agentd.models import EventKind, Row
from agentd.state.sqlite import SqliteStore as Store  # until its SQL moves behind the port

_SPENT_USD = "COALESCE(SUM(CASE WHEN state='reserved' THEN reserved_usd ELSE cost_usd END), 0)"
_SPENT_TOKENS = (
    "COALESCE(SUM(CASE WHEN state='reserved' THEN reserved_tokens"
    " ELSE input_tokens + output_tokens END), 0)"
)


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


def _where(scope: Scope, run_id: str | None) -> tuple[str, tuple[Any, ...]]:
    if scope.period == "run":
        return "run_id=?", (run_id,)
    assert scope.start is not None and scope.end is not None
    bounds = (to_iso(scope.start), to_iso(scope.end))
    if scope.task_id is not None:
        return "task_id=? AND ts>=? AND ts<?", (scope.task_id, *bounds)
    return "ts>=? AND ts<?", bounds


def spent(store: Store, scope: Scope, run_id: str | None = None) -> tuple[float, int]:
    """USD and tokens spent (reservations included) in ``scope``."""
    where, params = _where(scope, run_id)
    row = store.conn.execute(
        f"SELECT {_SPENT_USD}, {_SPENT_TOKENS} FROM ledger WHERE {where}", params
    ).fetchone()
    return float(row[0]), int(row[1])


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
    """Reserve ``need`` against every scope, or refuse without reserving anything."""
    with store.tx():
        for scope in scopes:
            usd, tokens = spent(store, scope, run_id)
            if not fits(scope, usd, tokens, need):
                refusal = Refusal(scope, usd, tokens, need)
                store.emit(
                    now,
                    EventKind.BUDGET_REFUSED,
                    task_id,
                    run_id,
                    scope=scope.label,
                    spent_usd=round(usd, 9),
                    limit_usd=scope.usd,
                    spent_tokens=tokens,
                    limit_tokens=scope.tokens,
                    need_usd=round(need.usd, 9),
                    need_tokens=need.tokens,
                    item=item,
                )
                if scope.is_window:
                    _alarm(store, now, scope, 1.0, usd)  # the window cannot take another call
                return refusal
        cur = store.conn.execute(
            "INSERT INTO ledger(ts, run_id, task_id, provider, model, item, state,"
            " reserved_tokens, reserved_usd) VALUES (?,?,?,?,?,?,'reserved',?,?)",
            (to_iso(now), run_id, task_id, provider, model, item, need.tokens, need.usd),
        )
        return int(cur.lastrowid or 0)


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
    """Replace a reservation by what the call really used; raise any alarm it crossed."""
    with store.tx():
        row = store.conn.execute(
            "SELECT run_id, task_id, provider, model, item FROM ledger WHERE id=?", (entry_id,)
        ).fetchone()
        if row is None:
            return
        store.conn.execute(
            "UPDATE ledger SET state='committed', input_tokens=?, output_tokens=?, cost_usd=?,"
            " status=?, duration_s=?, usage_missing=? WHERE id=?",
            (input_tokens, output_tokens, cost, status, duration_s, int(usage_missing), entry_id),
        )
        data: dict[str, Any] = {
            "provider": row["provider"],
            "model": row["model"],
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cost_usd": round(cost, 9),
            "status": status,
            "duration_s": duration_s,
            "item": row["item"],
        }
        if usage_missing:
            data["usage_missing"] = True
        store.emit(now, EventKind.LLM_CALL, row["task_id"], row["run_id"], **data)
        for scope in scopes:
            if scope.is_window and scope.usd is not None:
                usd, _ = spent(store, scope)
                for threshold in reached(usd, scope.usd):
                    _alarm(store, now, scope, threshold, usd)


def _alarm(store: Store, now: datetime, scope: Scope, threshold: float, usd: float) -> None:
    """Insert the alarm row if it is new for this window, with its audit event."""
    assert scope.start is not None and scope.end is not None
    cur = store.conn.execute(
        "INSERT OR IGNORE INTO budget_alarms(scope, window_start, threshold, ts, limit_usd,"
        " spent_usd) VALUES (?,?,?,?,?,?)",
        (scope.key, to_iso(scope.start), threshold, to_iso(now), scope.usd, usd),
    )
    if cur.rowcount:
        store.emit(
            now,
            EventKind.BUDGET_ALARM,
            scope.task_id,
            scope=scope.label,
            threshold_pct=round(threshold * 100),
            spent_usd=round(usd, 6),
            limit_usd=scope.usd,
            window_start=to_iso(scope.start),
            window_end=to_iso(scope.end),
        )


def settle_stale(store: Store, now: datetime) -> int:
    """At start (the state-dir lock held): reservations of a dead process become spent
    at their worst case, since the call may have been made and billed."""
    with store.tx():
        cur = store.conn.execute(
            "UPDATE ledger SET state='committed', cost_usd=reserved_usd,"
            " input_tokens=reserved_tokens, output_tokens=0, status='lost', usage_missing=1"
            " WHERE state='reserved'"
        )
        if cur.rowcount:
            store.emit(now, EventKind.LEDGER_SETTLED, reservations=cur.rowcount)
        return int(cur.rowcount)


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
        marked = store.conn.execute(
            "SELECT 1 FROM budget_alarms WHERE scope=? AND window_start=? AND threshold>=1"
            " AND limit_usd>=?",
            (scope.key, to_iso(scope.start), scope.usd - EPS),
        ).fetchone()
        if full(scope, usd) or marked:
            return {
                "reason": "budget",
                "scope": scope.label,
                "spent_usd": round(usd, 6),
                "limit_usd": scope.usd,
                "window_end": to_iso(scope.end),
            }
    return None


def run_usage(store: Store, run_id: str) -> Row:
    row = store.conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
        f" {_SPENT_USD} FROM ledger WHERE run_id=?",
        (run_id,),
    ).fetchone()
    return {
        "calls": int(row[0]),
        "input_tokens": int(row[1]),
        "output_tokens": int(row[2]),
        "cost_usd": round(float(row[3]), 9),
    }


def window_report(store: Store, scope: Scope) -> Row:
    """One window's spend, for the API, the CLI and the remaining-budget gauge."""
    assert scope.start is not None and scope.end is not None
    where, params = _where(scope, None)
    row = store.conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
        f" {_SPENT_USD} FROM ledger WHERE {where}",
        params,
    ).fetchone()
    usd = float(row[3])
    return {
        "scope": scope.label,
        "period": scope.period,
        "start": to_iso(scope.start),
        "end": to_iso(scope.end),
        "calls": int(row[0]),
        "input_tokens": int(row[1]),
        "output_tokens": int(row[2]),
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
