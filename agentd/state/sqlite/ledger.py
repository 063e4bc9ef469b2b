"""The spend ledger's statements (``agentd.state.port.LedgerPort``) on SQLite.

``BEGIN IMMEDIATE`` (``SqliteStore.tx``) is the budget lock: a reservation's reads of
what each scope has spent and its insert are one transaction that holds the write lock
from its first read, so two processes on one file cannot both squeeze into the last
dollar. Alarms are once per (scope, window, threshold) by the ``budget_alarms`` primary
key (``INSERT OR IGNORE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from agentd.budget import BURN_ALARM, Scope
from agentd.clock import to_iso
from agentd.models import FINAL_STATUSES, EventKind
from agentd.state.port import (
    Admission,
    LedgerEntry,
    Reservation,
    RunCost,
    RunUsage,
    ScopeRefused,
    SpendTotals,
    Usage,
    WindowUsage,
)
from agentd.state.sqlite.statements import Statements

_SPENT_USD = "COALESCE(SUM(CASE WHEN state='reserved' THEN reserved_usd ELSE cost_usd END), 0)"
_SPENT_TOKENS = (
    "COALESCE(SUM(CASE WHEN state='reserved' THEN reserved_tokens"
    " ELSE input_tokens + output_tokens END), 0)"
)
_FINAL = ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES))
_RUN_COSTS = (
    f"SELECT r.id AS run_id, COUNT(l.id) AS calls, {_SPENT_USD} AS usd, {_SPENT_TOKENS} AS tokens"
    " FROM (SELECT id, created_at FROM runs WHERE task_id=? AND attempt > 0"
    f" AND status IN ({_FINAL}) ORDER BY created_at DESC, id DESC LIMIT ?) r"
    " LEFT JOIN ledger l ON l.run_id = r.id"
    " GROUP BY r.id, r.created_at ORDER BY r.created_at DESC, r.id DESC"
)
_USAGE = (
    f"SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
    f" {_SPENT_USD} FROM ledger WHERE "
)


def _where(scope: Scope, run_id: str | None) -> tuple[str, tuple[Any, ...]]:
    if scope.period == "run":
        return "run_id=?", (run_id,)
    assert scope.start is not None and scope.end is not None
    bounds = (to_iso(scope.start), to_iso(scope.end))
    if scope.task_id is not None:
        return "task_id=? AND ts>=? AND ts<?", (scope.task_id, *bounds)
    return "ts>=? AND ts<?", bounds


class LedgerStatements(Statements):
    """``LedgerPort`` for ``SqliteStore``."""

    def spend_in(self, scope: Scope, run_id: str | None = None) -> SpendTotals:
        where, params = _where(scope, run_id)
        row = self.conn.execute(
            f"SELECT {_SPENT_USD}, {_SPENT_TOKENS} FROM ledger WHERE {where}", params
        ).fetchone()
        return {"usd": float(row[0]), "tokens": int(row[1])}

    def reserve_budget(
        self, now: datetime, reservation: Reservation, scopes: Sequence[Scope], admit: Admission
    ) -> int | ScopeRefused:
        r = reservation
        with self.tx() as conn:
            for scope in scopes:
                spent = self.spend_in(scope, r.run_id)
                if not admit(scope, spent["usd"], spent["tokens"]):
                    self._event(
                        now,
                        EventKind.BUDGET_REFUSED,
                        r.task_id,
                        r.run_id,
                        scope=scope.label,
                        spent_usd=round(spent["usd"], 9),
                        limit_usd=scope.usd,
                        spent_tokens=spent["tokens"],
                        limit_tokens=scope.tokens,
                        need_usd=round(r.usd, 9),
                        need_tokens=r.tokens,
                        item=r.item,
                    )
                    return ScopeRefused(scope, spent["usd"], spent["tokens"])
            cur = conn.execute(
                "INSERT INTO ledger(ts, run_id, task_id, provider, model, item, state,"
                " reserved_tokens, reserved_usd) VALUES (?,?,?,?,?,?,'reserved',?,?)",
                (to_iso(now), r.run_id, r.task_id, r.provider, r.model, r.item, r.tokens, r.usd),
            )
            return int(cur.lastrowid or 0)

    def commit_spend(self, now: datetime, entry_id: int, usage: Usage) -> LedgerEntry | None:
        u = usage
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE ledger SET state='committed', input_tokens=?, output_tokens=?,"
                " cost_usd=?, status=?, duration_s=?, usage_missing=? WHERE id=?",
                (
                    u.input_tokens,
                    u.output_tokens,
                    u.cost_usd,
                    u.status,
                    u.duration_s,
                    int(u.usage_missing),
                    entry_id,
                ),
            )
            if not cur.rowcount:
                return None
            entry = self.ledger_entry(entry_id)
            assert entry is not None
            data: dict[str, Any] = {
                "provider": entry["provider"],
                "model": entry["model"],
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "cost_usd": round(u.cost_usd, 9),
                "status": u.status,
                "duration_s": u.duration_s,
                "item": entry["item"],
            }
            if u.usage_missing:
                data["usage_missing"] = True
            self._event(now, EventKind.LLM_CALL, entry["task_id"], entry["run_id"], **data)
            return entry

    def charge_stale_reservations(self, now: datetime) -> int:
        with self.tx() as conn:
            cur = conn.execute(
                "UPDATE ledger SET state='committed', cost_usd=reserved_usd,"
                " input_tokens=reserved_tokens, output_tokens=0, status='lost', usage_missing=1"
                " WHERE state='reserved'"
            )
            if cur.rowcount:
                self._event(now, EventKind.LEDGER_SETTLED, reservations=cur.rowcount)
            return int(cur.rowcount)

    def record_budget_alarm(
        self, now: datetime, scope: Scope, threshold: float, spent_usd: float
    ) -> bool:
        assert scope.start is not None and scope.end is not None
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO budget_alarms(scope, window_start, threshold, ts,"
                " limit_usd, spent_usd) VALUES (?,?,?,?,?,?)",
                (scope.key, to_iso(scope.start), threshold, to_iso(now), scope.usd, spent_usd),
            )
            if not cur.rowcount:
                return False
            self._event(
                now,
                EventKind.BUDGET_ALARM,
                scope.task_id,
                scope=scope.label,
                threshold_pct=round(threshold * 100),
                spent_usd=round(spent_usd, 6),
                limit_usd=scope.usd,
                window_start=to_iso(scope.start),
                window_end=to_iso(scope.end),
            )
            return True

    def full_alarm_limit(self, scope: Scope) -> float | None:
        assert scope.start is not None
        row = self.conn.execute(
            "SELECT MAX(limit_usd) FROM budget_alarms WHERE scope=? AND window_start=?"
            " AND threshold>=1",
            (scope.key, to_iso(scope.start)),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def window_usage(self, scope: Scope) -> WindowUsage:
        where, params = _where(scope, None)
        row = self.conn.execute(_USAGE + where, params).fetchone()
        return {
            "calls": int(row[0]),
            "input_tokens": int(row[1]),
            "output_tokens": int(row[2]),
            "spent_usd": float(row[3]),
        }

    def run_usage(self, run_id: str) -> RunUsage:
        row = self.conn.execute(_USAGE + "run_id=?", (run_id,)).fetchone()
        return {
            "calls": int(row[0]),
            "input_tokens": int(row[1]),
            "output_tokens": int(row[2]),
            "cost_usd": round(float(row[3]), 9),
        }

    def ledger_entry(self, entry_id: int) -> LedgerEntry | None:
        row = self._one("SELECT * FROM ledger WHERE id=?", (entry_id,))
        return None if row is None else cast(LedgerEntry, row)

    def task_run_costs(self, task_id: str, limit: int) -> list[RunCost]:
        rows = self.conn.execute(_RUN_COSTS, (task_id, limit)).fetchall()
        return [
            {"run_id": str(r[0]), "calls": int(r[1]), "usd": float(r[2]), "tokens": int(r[3])}
            for r in rows
        ]

    def record_budget_burn(
        self, now: datetime, scope: Scope, spent_usd: float, eta: datetime, usd_per_hour: float
    ) -> bool:
        assert scope.start is not None and scope.end is not None
        with self.tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO budget_alarms(scope, window_start, threshold, ts,"
                " limit_usd, spent_usd) VALUES (?,?,?,?,?,?)",
                (scope.key, to_iso(scope.start), BURN_ALARM, to_iso(now), scope.usd, spent_usd),
            )
            if not cur.rowcount:
                return False
            self._event(
                now,
                EventKind.BUDGET_BURN,
                scope.task_id,
                **_burn_data(scope, spent_usd, eta, usd_per_hour),
            )
            return True


def _burn_data(
    scope: Scope, spent_usd: float, eta: datetime, usd_per_hour: float
) -> dict[str, Any]:
    assert scope.start is not None and scope.end is not None
    return {
        "scope": scope.label,
        "spent_usd": round(spent_usd, 6),
        "limit_usd": scope.usd,
        "projected_exhaustion": to_iso(eta),
        "usd_per_hour": round(usd_per_hour, 6),
        "window_start": to_iso(scope.start),
        "window_end": to_iso(scope.end),
    }
