"""A run's layered deadlines in the state (``Store.expire_runs``, and finishes that end a
run ``timed_out`` or ``expired``): a queued run never started past ``start_within`` ends
``expired``, a waiting run (queued for a retry, parked) past ``run_timeout`` ends
``timed_out``, each with its event, in one transaction; running runs, tasks without
deadlines and runs still in time are left alone."""

from __future__ import annotations

import pytest

from agentd.models import EventKind, Outcome, RunStatus
from agentd.policy import Deadlines
from agentd.state.port import Finish, RunEnded, Store

from .helpers import at, claim_one, events_of_kind, fire_at


def test_a_run_not_started_within_start_within_expires(store: Store) -> None:
    late = fire_at(store, "a", 0)
    young = fire_at(store, "a", 20, overlap="allow")
    other = fire_at(store, "b", 0)  # task b has no deadline
    deadlines = {"a": Deadlines(start_within=30.0)}
    assert store.expire_runs(at(29.9), deadlines) == []
    ended = store.expire_runs(at(30), deadlines)
    assert ended == [RunEnded(late, "a", RunStatus.EXPIRED)]
    run = store.get_run(late)
    assert run["status"] == RunStatus.EXPIRED
    assert run["finished_at"] is not None and run["started_at"] is None
    assert run["error"] == "not started within start_within (30s)"
    [event] = events_of_kind(store, EventKind.RUN_EXPIRED)
    assert event["run_id"] == late and event["task_id"] == "a"
    assert event["data"]["start_within_s"] == 30.0 and event["data"]["queued_s"] == 30.0
    assert store.get_run(young)["status"] == RunStatus.QUEUED
    assert store.get_run(other)["status"] == RunStatus.QUEUED
    # ended once: a second sweep finds nothing; an expired run is never claimed
    assert store.expire_runs(at(31), deadlines) == []
    row = claim_one(store, at(31))
    assert row["id"] in (young, other)


def test_a_running_run_is_the_runner_s_to_stop(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(1))
    everything = {"a": Deadlines(start_within=1.0, run_timeout=2.0)}
    assert store.expire_runs(at(100), everything) == []
    assert store.get_run(run_id)["status"] == RunStatus.RUNNING


def test_a_retry_waiting_past_run_timeout_ends_timed_out_and_start_within_no_longer_counts(
    store: Store,
) -> None:
    run_id = fire_at(store, "a", 0)
    row = claim_one(store, at(1))
    store.finish(
        run_id, at(2), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED,
        not_before=at(500), error="boom", owner="w1", attempt=row["attempt"],
    )  # fmt: skip
    deadlines = {"a": Deadlines(start_within=1.0, run_timeout=300.0)}
    assert store.expire_runs(at(299), deadlines) == []  # it started: start_within is met
    [ended] = store.expire_runs(at(300), deadlines)
    assert ended == RunEnded(run_id, "a", RunStatus.TIMED_OUT)
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.TIMED_OUT and run["finished_at"] is not None
    assert run["error"] == "run_timeout (300s) passed after 1 attempt(s)"
    [event] = events_of_kind(store, EventKind.RUN_TIMED_OUT)
    assert event["data"] == {
        "error": run["error"],
        "run_timeout_s": 300.0,
        "attempts": 1,
        "status_before": "queued",
    }


def test_a_parked_run_past_run_timeout_ends_timed_out(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    row = claim_one(store, at(0))
    store.record_agent_step(
        run_id, 1, "approval_requested", "c1", {"tool": "push"}, at(0), owner="w1", attempt=1
    )
    store.finish(
        run_id, at(1), outcome=Outcome.PARKED, next_status=RunStatus.AWAITING_APPROVAL,
        not_before=at(86400), owner="w1", attempt=row["attempt"],
    )  # fmt: skip
    [ended] = store.expire_runs(at(60), {"a": Deadlines(run_timeout=60.0)})
    assert ended.status == RunStatus.TIMED_OUT
    assert store.get_run(run_id)["status"] == RunStatus.TIMED_OUT
    assert events_of_kind(store, EventKind.RUN_TIMED_OUT)[0]["data"]["status_before"] == (
        "awaiting_approval"
    )
    assert store.expire_approvals(at(86401)) == []  # final: no approval timeout after it


@pytest.mark.parametrize("batch", [False, True], ids=["finish", "finish_many"])
def test_an_attempt_ended_timed_out_by_its_runner_is_final_with_its_event(
    store: Store, batch: bool
) -> None:
    run_id = fire_at(store, "a", 0)
    row = claim_one(store, at(1))
    end = {
        "outcome": Outcome.TIMEOUT,
        "next_status": RunStatus.TIMED_OUT,
        "error": "run_timeout (60s) passed: stopped after 59s",
        "duration_s": 59.0,
        "owner": "w1",
    }
    if batch:
        store.finish_many([Finish(run_id, "a", row["attempt"], row["failures"], at=at(60), **end)])
    else:
        store.finish(run_id, at(60), attempt=row["attempt"], **end)
    run = store.get_run(run_id)
    assert (run["status"], run["outcome"]) == (RunStatus.TIMED_OUT, Outcome.TIMEOUT)
    assert run["finished_at"] is not None
    kinds = [e["kind"] for e in store.events(run_id)]
    assert kinds[-2:] == [EventKind.TIMEOUT, EventKind.RUN_TIMED_OUT]
    [event] = events_of_kind(store, EventKind.RUN_TIMED_OUT)
    assert event["data"]["attempts"] == 1 and event["data"]["status_before"] == "running"
    assert store.quarantine_list() == []


def test_an_attempt_claimed_too_late_ends_expired_without_costing_a_failure(
    store: Store,
) -> None:
    run_id = fire_at(store, "a", 0)
    row = claim_one(store, at(100))
    store.finish(
        run_id, at(100), outcome=Outcome.EXPIRED, next_status=RunStatus.EXPIRED,
        error="not started within start_within (30s)", owner="w1", attempt=row["attempt"],
    )  # fmt: skip
    run = store.get_run(run_id)
    assert (run["status"], run["failures"]) == (RunStatus.EXPIRED, 0)
    assert [e["kind"] for e in store.events(run_id)][-1] == EventKind.RUN_EXPIRED
