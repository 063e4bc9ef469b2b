"""An agent run's durable steps: the PostgreSQL engine's SQL
(``agentd.state.port.AgentStepsPort``), and the upgrade that creates their table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from agentd.clock import from_iso, to_iso
from agentd.models import (
    APPROVAL_DECISIONS,
    TIMED_OUT,
    TOOL_RESULT,
    EventKind,
    Row,
    RunStatus,
    StateRefused,
)
from agentd.policy import Deadlines, overdue_status
from agentd.redact import Redactor
from agentd.state.port import AgentStepRecord, RunEnded
from agentd.state.postgres.statements import Statements
from agentd.state.schema import agent_steps


def steps_table_ddl() -> list[str]:
    """Schema version 3 from 2 (``engine.UPGRADES``): create ``agent_steps`` as
    ``state.schema`` defines it (it has no index beyond its primary key)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return [str(CreateTable(agent_steps).compile(dialect=dialect)).strip()]


class StepStatements(Statements):
    redactor: Redactor

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
        blob = self.redactor.text(json.dumps(payload, default=str))
        # Fenced, it is the lease holder's own write to its own run: safe beside other
        # writers (the write lock shared, as the runner's verbs hold it), so a step in the
        # runner's group does not make the group exclusive. Unfenced (the CLI's), the
        # lock exclusive: the seq is read and taken under it.
        with self.tx(shared=owner is not None) as conn:
            if owner is not None:
                held = conn.execute(
                    "SELECT task_id FROM runs WHERE id=%s AND status='running' AND lease_owner=%s"
                    " AND (%s::integer IS NULL OR attempt=%s::integer)",
                    (run_id, owner, attempt, attempt),
                ).fetchone()
                if held is None:
                    raise StateRefused(
                        "lease_lost", f"run {run_id!r} is not running under {owner!r} any more"
                    )
            if kind == TOOL_RESULT and isinstance(payload, dict):
                self._tool_call_event(run_id, step, call_id, payload, now)
            return self._append_step(run_id, step, kind, call_id, blob, now)

    def _tool_call_event(
        self, run_id: str, step: int, call_id: str | None, result: dict[str, Any], now: datetime
    ) -> None:
        """The audit event of one tool call, derived from its result record, in the same
        transaction (so the audit log has every call whose result is recorded)."""
        run = self._one("SELECT task_id FROM runs WHERE id=%s", (run_id,))
        self._event(
            now,
            EventKind.TOOL_CALL,
            run["task_id"] if run else None,
            run_id,
            tool=result.get("tool"),
            call_id=call_id,
            step=step,
            arguments_sha256=result.get("arguments_sha256"),
            duration_s=result.get("duration_s"),
            outcome=result.get("outcome") or ("ok" if result.get("ok") else "error"),
        )

    def _append_step(
        self, run_id: str, step: int, kind: str, call_id: str | None, blob: str, now: datetime
    ) -> int:
        """Insert one record after the run's last, inside the caller's ``tx()``: under the
        write lock, so that no other writer (on this node or another) takes the same seq."""
        row = self._one(
            "SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM agent_steps WHERE run_id=%s", (run_id,)
        )
        seq = int(row["seq"]) if row else 1
        self.conn.execute(
            "INSERT INTO agent_steps(run_id, seq, step, kind, call_id, payload, recorded_at)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s)",
            (run_id, seq, step, kind, call_id, blob, to_iso(now)),
        )
        return seq

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
        with self.tx():
            return self._decide_locked(run_id, decision, now, call_id, note, by)

    def expire_approvals(self, now: datetime) -> list[str]:
        with self.tx():
            due = self._all(
                "SELECT id FROM runs WHERE status='awaiting_approval' AND not_before <= %s"
                " ORDER BY not_before",
                (to_iso(now),),
            )
            for row in due:
                self._decide_locked(str(row["id"]), "deny", now, None, TIMED_OUT, "agentd")
            return [str(row["id"]) for row in due]

    def expire_runs(self, now: datetime, deadlines: Mapping[str, Deadlines]) -> list[RunEnded]:
        # Only runs enqueued before the earliest of their task's deadlines could be
        # overdue: the read is bounded by that, the policy decides each.
        cutoffs = {
            task_id: to_iso(now - timedelta(seconds=d.shortest))
            for task_id, d in sorted(deadlines.items())
            if d
        }
        if not cutoffs:
            return []
        ended: list[RunEnded] = []
        ts = to_iso(now)
        with self.tx():
            rows = self._all(
                "SELECT r.id, r.task_id, r.status, r.created_at, r.started_at, r.attempt"
                " FROM runs r"
                " JOIN unnest(%s::text[], %s::text[]) AS u(task_id, cutoff)"
                " ON u.task_id = r.task_id"
                " WHERE r.status IN ('queued','awaiting_approval') AND r.created_at <= u.cutoff"
                " ORDER BY r.created_at, r.id",
                (list(cutoffs), list(cutoffs.values())),
            )
            for row in rows:
                d = deadlines[row["task_id"]]
                started = row["started_at"] is not None
                status = overdue_status(from_iso(row["created_at"]), started, d, now)
                if status is None:
                    continue
                run_id, task_id = str(row["id"]), str(row["task_id"])
                if status == RunStatus.EXPIRED:
                    error = f"not started within start_within ({d.start_within:g}s)"
                    kind = EventKind.RUN_EXPIRED
                    data: Row = {
                        "start_within_s": d.start_within,
                        "queued_s": round((now - from_iso(row["created_at"])).total_seconds(), 3),
                    }
                else:
                    error = (
                        f"run_timeout ({d.run_timeout:g}s) passed after {row['attempt']} attempt(s)"
                    )
                    kind = EventKind.RUN_TIMED_OUT
                    data = {
                        "run_timeout_s": d.run_timeout,
                        "attempts": row["attempt"],
                        "status_before": row["status"],
                    }
                self.conn.execute(
                    "UPDATE runs SET status=%s, error=%s, finished_at=%s WHERE id=%s",
                    (str(status), error, ts, run_id),
                )
                self._event(ts, kind, task_id, run_id, error=error, **data)
                ended.append(RunEnded(run_id, task_id, status))
        return ended

    def _decide_locked(
        self,
        run_id: str,
        decision: str,
        now: datetime,
        call_id: str | None,
        note: str | None,
        by: str,
    ) -> Row:
        if decision not in APPROVAL_DECISIONS:
            raise StateRefused(
                "bad_decision", f"decision must be one of {', '.join(APPROVAL_DECISIONS)}"
            )
        run = self._one("SELECT id, task_id, status FROM runs WHERE id=%s", (run_id,))
        if run is None:
            raise StateRefused("unknown_run", f"no run {run_id!r}")
        asked = self._one(
            "SELECT step, call_id, payload FROM agent_steps WHERE run_id=%s"
            " AND kind='approval_requested' ORDER BY seq DESC LIMIT 1",
            (run_id,),
        )
        if run["status"] != RunStatus.AWAITING_APPROVAL or asked is None:
            raise StateRefused(
                "not_awaiting_approval",
                f"run {run_id} is {run['status']}, not awaiting an approval",
            )
        if call_id is not None and call_id != asked["call_id"]:
            raise StateRefused(
                "wrong_call", f"run {run_id} waits for call {asked['call_id']}, not {call_id}"
            )
        note = self.redactor.optional(note)
        blob = self.redactor.text(json.dumps({"decision": decision, "by": by, "note": note}))
        self._append_step(run_id, int(asked["step"]), "decision", asked["call_id"], blob, now)
        ts = to_iso(now)
        if decision == "deny":
            error = (
                "approval timed out (approval_timeout)"
                if note == TIMED_OUT
                else f"denied by {by}" + (f": {note}" if note else "")
            )
            self.conn.execute(
                "UPDATE runs SET status='denied', error=%s, finished_at=%s WHERE id=%s",
                (error, ts, run_id),
            )
            status = RunStatus.DENIED
        else:
            self.conn.execute(
                "UPDATE runs SET status='queued', not_before=%s WHERE id=%s", (ts, run_id)
            )
            status = RunStatus.QUEUED
        asked_payload = json.loads(asked["payload"])
        self._event(
            ts,
            EventKind.APPROVAL,
            run["task_id"],
            run_id,
            decision=decision,
            call_id=asked["call_id"],
            tool=asked_payload.get("tool"),
            by=by,
            note=note,
        )
        return {
            "run_id": run_id,
            "status": str(status),
            "decision": decision,
            "call_id": asked["call_id"],
        }

    def agent_steps(self, run_id: str) -> list[AgentStepRecord]:
        rows = self._all(
            "SELECT run_id, seq, step, kind, call_id, payload, recorded_at FROM agent_steps"
            " WHERE run_id=%s ORDER BY seq",
            (run_id,),
        )
        return [
            AgentStepRecord(
                run_id=str(r["run_id"]),
                seq=int(r["seq"]),
                step=int(r["step"]),
                kind=str(r["kind"]),
                call_id=r["call_id"],
                payload=json.loads(r["payload"]),
                recorded_at=str(r["recorded_at"]),
            )
            for r in rows
        ]
