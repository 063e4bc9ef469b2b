"""An agent run parked for an operator's decision on a tool call (``awaiting_approval``):
parked by its attempt's finish, decided on in one transaction (a ``decision`` step, the
run queued or denied, an ``approval`` event), denied by its deadline, cancellable; and
every recorded tool result makes a ``tool_call`` audit event."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agentd.models import TIMED_OUT, Outcome, RunStatus
from agentd.state.port import Finish, StateRefused, Store

from .helpers import at, claim_one, events_of_kind, fire_at

ASKED = {"tool": "push", "arguments": {"branch": "main"}, "reason": "sensitive", "step": 1}


def park(store: Store, seconds: float = 0, deadline_s: float = 3600, batch: bool = False) -> str:
    """A run of ``a`` claimed, asking about call ``c1`` and parked until its deadline."""
    run_id = fire_at(store, "a", seconds)
    row = claim_one(store, at(seconds), owner="w1")
    store.record_agent_step(
        run_id, 1, "approval_requested", "c1", ASKED, at(seconds), owner="w1", attempt=1
    )
    end = {
        "outcome": Outcome.PARKED,
        "next_status": RunStatus.AWAITING_APPROVAL,
        "not_before": at(seconds + 1 + deadline_s),
        "error": "awaiting approval of tool call c1 (push, step 1)",
        "owner": "w1",
    }
    if batch:
        store.finish_many(
            [Finish(run_id, "a", row["attempt"], row["failures"], at=at(seconds + 1), **end)]
        )
    else:
        store.finish(run_id, at(seconds + 1), attempt=row["attempt"], **end)
    return run_id


@pytest.mark.parametrize("batch", [False, True], ids=["finish", "finish_many"])
def test_a_parked_run_holds_no_lease_is_not_claimed_and_is_not_final(
    store: Store, batch: bool
) -> None:
    run_id = park(store, batch=batch)
    run = store.get_run(run_id)
    assert run["status"] == "awaiting_approval"
    assert run["finished_at"] is None and run["lease_owner"] is None
    assert run["failures"] == 0  # a park costs no attempt
    assert store.claim(at(2), "w2", 30, 10, set(), set()) == []
    [event] = events_of_kind(store, "awaiting_approval")
    assert event["run_id"] == run_id and "push" in event["data"]["error"]
    assert store.active_runs("a") == []


@pytest.mark.parametrize("decision", ["approve", "skip"])
def test_approve_or_skip_queues_the_run_again_with_a_decision_step(
    store: Store, second_store: Store, decision: str
) -> None:
    run_id = park(store)
    row = second_store.decide_approval(run_id, decision, at(5), call_id="c1", note="ok by me")
    assert row == {"run_id": run_id, "status": "queued", "decision": decision, "call_id": "c1"}
    last = store.agent_steps(run_id)[-1]
    assert (last["step"], last["kind"], last["call_id"]) == (1, "decision", "c1")
    assert last["payload"] == {"decision": decision, "by": "operator", "note": "ok by me"}
    [event] = events_of_kind(store, "approval")
    assert event["data"]["decision"] == decision and event["data"]["tool"] == "push"
    again = claim_one(store, at(6), owner="w2")
    assert again["id"] == run_id and again["attempt"] == 2


def test_deny_ends_the_run_denied(store: Store) -> None:
    run_id = park(store)
    assert store.decide_approval(run_id, "deny", at(5), note="not today")["status"] == "denied"
    run = store.get_run(run_id)
    assert run["status"] == "denied" and run["finished_at"] is not None
    assert run["error"] == "denied by operator: not today"
    assert store.claim(at(6), "w2", 30, 10, set(), set()) == []


def test_a_decision_is_refused_unless_the_run_waits_on_that_call(store: Store) -> None:
    run_id = park(store, 0)
    queued = fire_at(store, "b", 1)
    cases = [
        (queued, "approve", None, "not_awaiting_approval"),
        ("no-such-run", "approve", None, "unknown_run"),
        (run_id, "approve", "c2", "wrong_call"),
        (run_id, "maybe", None, "bad_decision"),
    ]
    for rid, decision, call_id, code in cases:
        with pytest.raises(StateRefused) as refused:
            store.decide_approval(rid, decision, at(5), call_id=call_id)
        assert refused.value.code == code, (rid, decision, call_id)
    assert store.get_run(run_id)["status"] == "awaiting_approval"
    store.decide_approval(run_id, "approve", at(6))
    with pytest.raises(StateRefused) as twice:
        store.decide_approval(run_id, "deny", at(7))
    assert twice.value.code == "not_awaiting_approval"


def test_the_deadline_denies_a_parked_run(store: Store) -> None:
    early = park(store, 0, deadline_s=10)
    late = park(store, 2, deadline_s=100)
    assert store.expire_approvals(at(5)) == []
    assert store.expire_approvals(at(11) + timedelta(milliseconds=1)) == [early]
    run = store.get_run(early)
    assert run["status"] == "denied" and run["error"] == "approval timed out (approval_timeout)"
    assert store.agent_steps(early)[-1]["payload"]["note"] == TIMED_OUT
    assert store.get_run(late)["status"] == "awaiting_approval"


def test_a_parked_run_is_cancelled_at_once(store: Store) -> None:
    run_id = park(store)
    assert store.request_cancel(run_id, at(5)) == "cancelled"
    assert store.get_run(run_id)["status"] == "cancelled"


def test_a_recorded_tool_result_is_an_audit_event(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    result = {"tool": "push", "ok": False, "content": "error: x", "duration_s": 0.25,
              "outcome": "error", "arguments_sha256": "ab" * 32}  # fmt: skip
    store.record_agent_step(run_id, 2, "tool_result", "c9", result, at(1))
    store.record_agent_step(run_id, 2, "tool_started", "c10", {"tool": "push"}, at(1))
    [event] = events_of_kind(store, "tool_call")
    assert event["task_id"] == "a" and event["run_id"] == run_id
    assert event["data"] == {
        "tool": "push",
        "call_id": "c9",
        "step": 2,
        "arguments_sha256": "ab" * 32,
        "duration_s": 0.25,
        "outcome": "error",
    }
