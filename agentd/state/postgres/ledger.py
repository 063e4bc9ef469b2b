"""The spend ledger's statements (``agentd.state.port.LedgerPort``) on PostgreSQL.

**The budget lock.** Several nodes share one database, so two reservations against one
budget can run at the same moment on different machines; SQLite's ``BEGIN IMMEDIATE``
(one writer per file) has no equivalent here. A reservation therefore takes, inside its
transaction and before it reads any spend, a transaction-level advisory lock per budget
scope it is checked against (``pg_advisory_xact_lock``, keyed by the scope: ``run:<run
id>`` for a run scope, ``Scope.key`` for a window), in sorted order so that two
reservations never wait on each other in a cycle. The lock is held until the
transaction commits or rolls back, so a second reservation against a common scope reads
that scope's spend only after the first's row is committed (or gone).

Why an advisory lock and not row locks on the ledger: a reservation's conflict is with
a row that does not exist yet (the other node's insert), which ``SELECT ... FOR UPDATE``
on existing rows cannot lock, and ``SKIP LOCKED`` makes each node look at a different
subset of rows, which is right for handing out distinct jobs and wrong for a sum over
everyone's spend: DBOS Transact's ``start_queued_workflows`` uses SKIP LOCKED only for a
queue without a global concurrency limit and, with one, switches to NOWAIT under
REPEATABLE READ "to ensure all processes have a consistent view of the table" (and
retries on conflict). An advisory lock on the scope exists before any row of it does,
waits instead of failing, and needs no new table (a scope row to ``FOR UPDATE`` would).

``PostgresStore``'s write lock (``WRITE_LOCK``) is held in shared mode by these
statements (see ``agentd.state.postgres.engine``), so reservations on several nodes run
side by side and the scope locks are what serialises them: they are the ledger's own
guarantee, not a side effect of an engine-wide lock. A reservation waits for no other
lock while holding one of them (the scope locks are taken in sorted order, before any
row is written), so they cannot take part in a deadlock.

Invariants this relies on:

- Every reservation that counts against a scope names it in ``scopes`` (as
  ``budget.call_scopes`` does: run, task windows, global windows of one config), so two
  reservations that can overfill one scope both take its lock. A reservation that names
  no scope takes no lock and is checked against nothing.
- The transaction runs at READ COMMITTED (PostgreSQL's default): each statement reads
  what was committed before it started, so the reads after the lock see the previous
  holder's insert. Under REPEATABLE READ the snapshot would predate the wait; the lock
  statement reports the isolation level and a reservation under any other level is
  refused with ``StorageError`` rather than trusted.
- A lock key is a 64-bit hash of the state's schema and the scope's name: a collision
  only makes two reservations wait for each other, never lets one skip the lock.

Alarms are once per (scope, window, threshold) by the ``budget_alarms`` primary key
(``ON CONFLICT DO NOTHING``).
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
    StorageError,
    Usage,
    WindowUsage,
)
from agentd.state.postgres.statements import Statements

_SPENT_USD = "COALESCE(SUM(CASE WHEN state='reserved' THEN reserved_usd ELSE cost_usd END), 0)"
_SPENT_TOKENS = (
    "COALESCE(SUM(CASE WHEN state='reserved' THEN reserved_tokens"
    " ELSE input_tokens + output_tokens END), 0)"
)
_FINAL = ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES))
_RUN_COSTS = (
    f"SELECT r.id AS run_id, COUNT(l.id) AS calls, {_SPENT_USD} AS usd, {_SPENT_TOKENS} AS tokens"
    " FROM (SELECT id, created_at FROM runs WHERE task_id=%s AND attempt > 0"
    f" AND status IN ({_FINAL}) ORDER BY created_at DESC, id DESC LIMIT %s) r"
    " LEFT JOIN ledger l ON l.run_id = r.id"
    " GROUP BY r.id, r.created_at ORDER BY r.created_at DESC, r.id DESC"
)
_USAGE = (
    "SELECT COUNT(*) AS calls, COALESCE(SUM(input_tokens), 0) AS input_tokens,"
    f" COALESCE(SUM(output_tokens), 0) AS output_tokens, {_SPENT_USD} AS usd FROM ledger WHERE "
)
_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtextextended('agentd.budget:' || current_schema()"
    " || ':' || %s, 0)) AS locked, current_setting('transaction_isolation') AS isolation"
)


def _where(scope: Scope, run_id: str | None) -> tuple[str, tuple[Any, ...]]:
    if scope.period == "run":
        return "run_id=%s", (run_id,)
    assert scope.start is not None and scope.end is not None
    bounds = (to_iso(scope.start), to_iso(scope.end))
    if scope.task_id is not None:
        return "task_id=%s AND ts>=%s AND ts<%s", (scope.task_id, *bounds)
    return "ts>=%s AND ts<%s", bounds


def budget_lock_names(reservation: Reservation, scopes: Sequence[Scope]) -> list[str]:
    """The advisory locks a reservation takes, in the order it takes them (sorted, no
    repeats): one per scope it is checked against."""
    names = {f"run:{reservation.run_id}" if s.period == "run" else s.key for s in scopes}
    return sorted(names)


class LedgerStatements(Statements):
    """``LedgerPort`` for ``PostgresStore``."""

    def spend_in(self, scope: Scope, run_id: str | None = None) -> SpendTotals:
        where, params = _where(scope, run_id)
        row = self._one(
            f"SELECT {_SPENT_USD} AS usd, {_SPENT_TOKENS} AS tokens FROM ledger WHERE {where}",
            params,
        )
        assert row is not None
        return {"usd": float(row["usd"]), "tokens": int(row["tokens"])}

    def reserve_budget(
        self, now: datetime, reservation: Reservation, scopes: Sequence[Scope], admit: Admission
    ) -> int | ScopeRefused:
        r = reservation
        with self.tx(shared=True):
            for name in budget_lock_names(r, scopes):
                row = self._one(_LOCK, (name,))
                assert row is not None
                if row["isolation"] != "read committed":
                    raise StorageError(
                        "the budget lock needs READ COMMITTED, the transaction is"
                        f" {row['isolation']}"
                    )
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
            inserted = self._one(
                "INSERT INTO ledger(ts, run_id, task_id, provider, model, item, state,"
                " reserved_tokens, reserved_usd) VALUES (%s,%s,%s,%s,%s,%s,'reserved',%s,%s)"
                " RETURNING id",
                (to_iso(now), r.run_id, r.task_id, r.provider, r.model, r.item, r.tokens, r.usd),
            )
            assert inserted is not None
            return int(inserted["id"])

    def commit_spend(self, now: datetime, entry_id: int, usage: Usage) -> LedgerEntry | None:
        u = usage
        with self.tx(shared=True) as conn:
            cur = conn.execute(
                "UPDATE ledger SET state='committed', input_tokens=%s, output_tokens=%s,"
                " cost_usd=%s, status=%s, duration_s=%s, usage_missing=%s WHERE id=%s",
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
        with self.tx(shared=True) as conn:
            cur = conn.execute(
                "INSERT INTO budget_alarms(scope, window_start, threshold, ts, limit_usd,"
                " spent_usd) VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
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
        row = self._one(
            "SELECT MAX(limit_usd) AS limit_usd FROM budget_alarms WHERE scope=%s"
            " AND window_start=%s AND threshold>=1",
            (scope.key, to_iso(scope.start)),
        )
        return None if row is None or row["limit_usd"] is None else float(row["limit_usd"])

    def window_usage(self, scope: Scope) -> WindowUsage:
        where, params = _where(scope, None)
        row = self._one(_USAGE + where, params)
        assert row is not None
        return {
            "calls": int(row["calls"]),
            "input_tokens": int(row["input_tokens"]),
            "output_tokens": int(row["output_tokens"]),
            "spent_usd": float(row["usd"]),
        }

    def run_usage(self, run_id: str) -> RunUsage:
        row = self._one(_USAGE + "run_id=%s", (run_id,))
        assert row is not None
        return {
            "calls": int(row["calls"]),
            "input_tokens": int(row["input_tokens"]),
            "output_tokens": int(row["output_tokens"]),
            "cost_usd": round(float(row["usd"]), 9),
        }

    def ledger_entry(self, entry_id: int) -> LedgerEntry | None:
        row = self._one("SELECT * FROM ledger WHERE id=%s", (entry_id,))
        return None if row is None else cast(LedgerEntry, row)

    def task_run_costs(self, task_id: str, limit: int) -> list[RunCost]:
        return [
            {
                "run_id": str(r["run_id"]),
                "calls": int(r["calls"]),
                "usd": float(r["usd"]),
                "tokens": int(r["tokens"]),
            }
            for r in self._all(_RUN_COSTS, (task_id, limit))
        ]

    def record_budget_burn(
        self, now: datetime, scope: Scope, spent_usd: float, eta: datetime, usd_per_hour: float
    ) -> bool:
        assert scope.start is not None and scope.end is not None
        with self.tx(shared=True) as conn:
            cur = conn.execute(
                "INSERT INTO budget_alarms(scope, window_start, threshold, ts, limit_usd,"
                " spent_usd) VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
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
