"""An agent run's durable steps: appended in order, kept across reopening and between
instances, scrubbed of secrets, removed with their run."""

from __future__ import annotations

import pytest

from agentd.redact import Redactor
from agentd.state.port import StateRefused, Store

from .helpers import States, at, claim_one, fire_at


def test_steps_are_appended_in_order_and_survive_reopening(states: States, store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    other = fire_at(store, "b", 0)
    assert store.agent_steps(run_id) == []
    reply = {"content": None, "tool_calls": [{"id": "c1", "function": {"name": "t"}}]}
    assert store.record_agent_step(run_id, 1, "model", None, reply, at(1)) == 1
    assert store.record_agent_step(other, 1, "model", None, {"content": "x"}, at(1)) == 1
    assert store.record_agent_step(run_id, 1, "tool_started", "c1", {"n": 1.5}, at(2)) == 2
    assert store.record_agent_step(run_id, 1, "tool_result", "c1", "ünï", at(3)) == 3
    states.close(store)

    again = states.open()
    steps = again.agent_steps(run_id)
    assert [(s["seq"], s["step"], s["kind"], s["call_id"]) for s in steps] == [
        (1, 1, "model", None),
        (2, 1, "tool_started", "c1"),
        (3, 1, "tool_result", "c1"),
    ]
    assert [s["payload"] for s in steps] == [reply, {"n": 1.5}, "ünï"]
    assert {s["run_id"] for s in steps} == {run_id}
    assert steps[0]["recorded_at"] < steps[2]["recorded_at"]
    assert [s["payload"] for s in again.agent_steps(other)] == [{"content": "x"}]
    assert again.record_agent_step(run_id, 2, "model", None, {}, at(4)) == 4


def test_a_step_is_visible_to_another_instance_at_once(store: Store, second_store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    store.record_agent_step(run_id, 1, "model", None, {"content": "hi"}, at(1))
    assert [s["payload"] for s in second_store.agent_steps(run_id)] == [{"content": "hi"}]
    assert second_store.record_agent_step(run_id, 1, "tool_started", "c", {}, at(2)) == 2
    assert [s["seq"] for s in store.agent_steps(run_id)] == [1, 2]


def test_a_step_inside_a_unit_is_kept_with_its_commit(store: Store, second_store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    unit = store.unit()
    store.record_agent_step(run_id, 1, "model", None, {"content": "no"}, at(1))
    unit.abort()
    assert second_store.agent_steps(run_id) == []
    unit = store.unit()
    store.record_agent_step(run_id, 1, "model", None, {"content": "yes"}, at(1))
    unit.commit()
    assert [s["payload"] for s in second_store.agent_steps(run_id)] == [{"content": "yes"}]


def test_secret_values_are_scrubbed_from_steps(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    store.redactor = Redactor(["sk-live-0123456789"])
    store.record_agent_step(run_id, 1, "tool_result", "c", {"out": "key sk-live-0123456789"}, at(1))
    [step] = store.agent_steps(run_id)
    assert step["payload"] == {"out": "key [redacted]"}


def test_a_fenced_step_is_recorded_only_under_the_runs_lease(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    with pytest.raises(StateRefused) as queued:
        store.record_agent_step(run_id, 1, "model", None, {}, at(1), owner="w1", attempt=1)
    assert queued.value.code == "lease_lost"
    claimed = claim_one(store, at(1), owner="w1")
    attempt = claimed["attempt"]
    assert store.record_agent_step(run_id, 1, "model", None, {}, at(2), owner="w1", attempt=attempt)
    for owner, at_attempt in (("w2", attempt), ("w1", attempt + 1)):
        with pytest.raises(StateRefused) as lost:
            store.record_agent_step(
                run_id, 1, "tool_started", "c", {}, at(3), owner=owner, attempt=at_attempt
            )
        assert lost.value.code == "lease_lost"
    assert [s["seq"] for s in store.agent_steps(run_id)] == [1]
    # Unfenced (the CLI's, a test's): recorded whatever holds the run.
    assert store.record_agent_step(run_id, 1, "tool_started", "c", {}, at(4)) == 2
