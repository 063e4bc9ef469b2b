"""What the engine is handed from above the port and must honour: the budget gate of a
scheduled fire (``fire_gate``, asked inside the fire's transaction) and the redactor
(secret values scrubbed from every text written: run and attempt errors, event data in
the store and in what the sink gets, progress messages)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from agentd.models import EventKind, Outcome, Row, RunStatus
from agentd.redact import Redactor
from agentd.state.port import Finish, Fire, Store

from .helpers import at, claim_one, events_of_kind, fire_at

SECRET = "sk-very-secret-value-123"


def test_fire_gate_skips_a_scheduled_fire_with_its_reason(store: Store) -> None:
    asked: list[tuple[str, datetime]] = []

    def gate(task_id: str, now: datetime) -> dict[str, Any] | None:
        asked.append((task_id, now))
        return {"reason": "budget", "scope": "day", "spent_usd": 5.0} if task_id == "a" else None

    store.fire_gate = gate
    gated = store.fire("a", at(1), scheduled_for=at(1))
    assert (gated.created, gated.status, gated.reason) == (True, RunStatus.SKIPPED, "budget")
    assert store.get_run(gated.run_id)["skip_reason"] == "budget"
    [skip] = events_of_kind(store, "skip")
    assert skip["run_id"] == gated.run_id
    assert skip["data"] == {
        "reason": "budget",
        "scheduled_for": store.get_run(gated.run_id)["scheduled_for"],
        "scope": "day",
        "spent_usd": 5.0,
    }
    free = store.fire("b", at(1), scheduled_for=at(1))
    assert (free.status, free.reason) == (RunStatus.QUEUED, None)
    # A fire that does not honour pause (a manual one, say) is not asked either.
    manual = store.fire("a", at(2), trigger="manual", honour_pause=False)
    assert manual.status == RunStatus.QUEUED
    assert asked == [("a", at(1)), ("b", at(1))]


def _scrubbed(rows: list[Row]) -> bool:
    return not any(SECRET in json.dumps(row, default=str) for row in rows)


def test_the_redactor_scrubs_every_text_written(store: Store, events_seen: list[Row]) -> None:
    store.redactor = Redactor([SECRET])
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0))
    store.progress(run_id, 1, 2, f"using {SECRET}", at(1))
    store.emit(at(1), EventKind.MISFIRE, "a", count=1, reason=f"key {SECRET}")
    store.finish(
        run_id,
        at(2),
        outcome=Outcome.FAILURE,
        next_status=RunStatus.QUEUED,
        error=f"401 for {SECRET}",
    )
    again = claim_one(store, at(3))
    store.finish_many(
        [
            Finish(run_id, "a", again["attempt"], again["failures"], Outcome.FAILURE,
                   RunStatus.QUARANTINED, at(4), error=f"still {SECRET}"),
        ]
    )  # fmt: skip
    other = fire_at(store, "b", 5)
    row = claim_one(store, at(5))
    store.finish_many(
        [Finish(other, "b", row["attempt"], row["failures"], Outcome.FAILURE,
                RunStatus.CANCELLED, at(6), error=f"batch {SECRET}")]
    )  # fmt: skip
    assert events_seen[-1]["data"]["error"] == "batch [redacted]"
    # Event data from above the port (a gate's details) is scrubbed too, in a batch.
    store.fire_gate = lambda task_id, now: {"reason": "budget", "detail": f"key {SECRET}"}
    gated = store.fire_many([Fire("a", at(7)), Fire("b", at(7))], at(7))
    assert [r.status for r in gated] == [RunStatus.SKIPPED, RunStatus.SKIPPED]
    assert events_seen[-1]["data"]["detail"] == "key [redacted]"
    runs = [dict(store.get_run(r)) for r in (run_id, other)]
    attempts = [dict(a) for r in (run_id, other) for a in store.attempts(r)]
    stored = [dict(e) for e in store.events()]
    assert _scrubbed(runs) and _scrubbed(attempts)
    assert _scrubbed(stored) and _scrubbed(events_seen)
    assert _scrubbed([dict(q) for q in store.quarantine_list()])
    assert "[redacted]" in (store.get_run(other)["error"] or "")
    assert any("[redacted]" in json.dumps(e["data"]) for e in stored if e["kind"] == "misfire")
