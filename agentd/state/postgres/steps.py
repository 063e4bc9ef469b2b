"""An agent run's durable steps: the PostgreSQL engine's SQL
(``agentd.state.port.AgentStepsPort``), and the upgrade that creates their table."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from agentd.clock import to_iso
from agentd.models import StateRefused
from agentd.redact import Redactor
from agentd.state.port import AgentStepRecord
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
        with self.tx() as conn:
            if owner is not None:
                held = conn.execute(
                    "SELECT 1 FROM runs WHERE id=%s AND status='running' AND lease_owner=%s"
                    " AND (%s::integer IS NULL OR attempt=%s::integer)",
                    (run_id, owner, attempt, attempt),
                ).fetchone()
                if held is None:
                    raise StateRefused(
                        "lease_lost", f"run {run_id!r} is not running under {owner!r} any more"
                    )
            # Under the write lock (every tx() takes it first): no other writer, on this
            # node or another, takes the same seq.
            row = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM agent_steps WHERE run_id=%s",
                (run_id,),
            ).fetchone()
            seq = int(row["seq"]) if row else 1
            conn.execute(
                "INSERT INTO agent_steps(run_id, seq, step, kind, call_id, payload, recorded_at)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                (run_id, seq, step, kind, call_id, blob, to_iso(now)),
            )
            return seq

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
