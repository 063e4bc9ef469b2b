"""A run its budget stopped (``budget_exhausted``) queued again by an operator."""

from __future__ import annotations

import pytest

from agentd.models import Outcome, RunStatus
from agentd.state.port import StateRefused, Store

from .helpers import at, claim_one, events_of_kind, run_and_finish


def test_a_budget_exhausted_run_resumes_as_a_new_attempt(store: Store) -> None:
    run_id = run_and_finish(store, "a", 0, Outcome.BUDGET_EXHAUSTED, RunStatus.BUDGET_EXHAUSTED)
    store.save_checkpoint(run_id, {"next": 3}, at(2))
    assert store.resume_run(run_id, at(5)) == {"run_id": run_id, "status": "queued"}
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["finished_at"] is None
    [event] = events_of_kind(store, "run_resumed")
    assert event["run_id"] == run_id and event["task_id"] == "a"
    again = claim_one(store, at(6))
    assert again["id"] == run_id and again["attempt"] == 2
    assert store.load_checkpoint(run_id) == {"next": 3}


@pytest.mark.parametrize(
    ("outcome", "status"),
    [(Outcome.SUCCESS, RunStatus.SUCCEEDED), (Outcome.FAILURE, RunStatus.QUARANTINED)],
)
def test_only_a_budget_exhausted_run_resumes(
    store: Store, outcome: Outcome, status: RunStatus
) -> None:
    run_id = run_and_finish(store, "a", 0, outcome, status)
    for rid, code in ((run_id, "not_resumable"), ("nope", "unknown_run")):
        with pytest.raises(StateRefused) as refused:
            store.resume_run(rid, at(5))
        assert refused.value.code == code
    assert store.get_run(run_id)["status"] == status
