"""An agent run's durable steps: the SQLite engine's SQL (``agentd.state.port.AgentStepsPort``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from agentd.clock import to_iso
from agentd.models import StateRefused
from agentd.redact import Redactor
from agentd.state.port import AgentStepRecord
from agentd.state.sqlite.statements import Statements


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
        with self.tx() as conn:
            if owner is not None:
                held = conn.execute(
                    "SELECT 1 FROM runs WHERE id=? AND status='running' AND lease_owner=?"
                    " AND (? IS NULL OR attempt=?)",
                    (run_id, owner, attempt, attempt),
                ).fetchone()
                if held is None:
                    raise StateRefused(
                        "lease_lost", f"run {run_id!r} is not running under {owner!r} any more"
                    )
            # Under the write lock (BEGIN IMMEDIATE): no other writer takes the same seq.
            row = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM agent_steps WHERE run_id=?", (run_id,)
            ).fetchone()
            seq = int(row[0])
            conn.execute(
                "INSERT INTO agent_steps(run_id, seq, step, kind, call_id, payload, recorded_at)"
                " VALUES (?,?,?,?,?,?,?)",
                (run_id, seq, step, kind, call_id, blob, to_iso(now)),
            )
            return seq

    def agent_steps(self, run_id: str) -> list[AgentStepRecord]:
        rows = self._all(
            "SELECT run_id, seq, step, kind, call_id, payload, recorded_at FROM agent_steps"
            " WHERE run_id=? ORDER BY seq",
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
