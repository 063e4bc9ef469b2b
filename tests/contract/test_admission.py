"""Cost-aware admission and burn-rate alarms on every engine: a task's cost history
(``task_run_costs``), the admission hook a scheduled fire asks (``fire_admission``: run,
defer or skip, each with its ``admission`` event) and the once-per-window burn alarm
(``record_budget_burn``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from agentd.budget import Scope, window_at
from agentd.models import Outcome, Row, RunStatus
from agentd.state.port import Fire, Reservation, Store, Usage

from .helpers import T0, at, claim_one, events_of_kind, fire_at, kinds, run_and_finish

DAY_START, DAY_END = window_at("day", T0, "UTC")
TASK_DAY = Scope("task:a:day", "a:day", "a", "day", 1.0, None, DAY_START, DAY_END)


def spend(store: Store, run_id: str, task: str, usd: float, commit: bool = True) -> None:
    """One LLM call of ``run_id`` at ``usd`` (left reserved, in flight, unless ``commit``)."""
    entry = store.reserve_budget(
        T0, Reservation(run_id, task, "p", "m", None, 100, usd), [], lambda s, u, t: True
    )
    assert isinstance(entry, int)
    if commit:
        store.commit_spend(T0, entry, Usage(60, 20, usd, "200", 0.1, False))


def test_task_run_costs_are_the_newest_finished_runs_that_ran(store: Store) -> None:
    ok = run_and_finish(store, "a", 1, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    spend(store, ok, "a", 0.1)
    spend(store, ok, "a", 0.2)
    free = run_and_finish(store, "a", 10, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    failed = run_and_finish(store, "a", 20, Outcome.FAILURE, RunStatus.QUARANTINED, error="boom")
    spend(store, failed, "a", 0.05, commit=False)  # a reservation counts at its worst case
    queued = fire_at(store, "a", 30, overlap="allow")  # not finished
    spend(store, queued, "a", 9.0)
    store.pause("a", "x", at(31))
    skipped = store.fire("a", at(32), scheduled_for=at(32))  # never ran
    assert skipped.status == RunStatus.SKIPPED
    other = run_and_finish(store, "b", 40, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    spend(store, other, "b", 5.0)
    costs = store.task_run_costs("a", 10)
    assert [c["run_id"] for c in costs] == [failed, free, ok]
    assert [c["calls"] for c in costs] == [1, 0, 2]
    assert [c["usd"] for c in costs] == pytest.approx([0.05, 0.0, 0.3])
    assert [c["tokens"] for c in costs] == [100, 0, 160]
    assert [c["run_id"] for c in store.task_run_costs("a", 2)] == [failed, free]
    assert store.task_run_costs("nope", 5) == []


class Hook:
    """A scripted ``fire_admission``: the verdicts to give, in order, and what it was
    asked (task, trigger, ahead)."""

    def __init__(self, *verdicts: Row | None) -> None:
        self.verdicts = list(verdicts)
        self.asked: list[tuple[str, str, int]] = []

    def __call__(self, fire: Fire, now: datetime, ahead: int) -> dict[str, Any] | None:
        self.asked.append((fire.task_id, fire.trigger, ahead))
        return self.verdicts.pop(0) if self.verdicts else None


def test_admission_skip_records_the_fire_skipped_with_its_verdict(store: Store) -> None:
    verdict = {"decision": "skip", "predicted_usd": 0.4, "remaining_usd": 0.1, "scope": "a:day"}
    store.fire_admission = Hook(verdict)
    result = store.fire("a", at(1), scheduled_for=at(1))
    assert (result.status, result.reason) == (RunStatus.SKIPPED, "admission")
    run = store.get_run(result.run_id)
    assert run["skip_reason"] == "admission"
    assert kinds(store, result.run_id) == ["admission", "skip"]
    [admission] = events_of_kind(store, "admission")
    assert admission["data"] == verdict
    [skip] = events_of_kind(store, "skip")
    assert skip["data"]["reason"] == "admission" and skip["data"]["predicted_usd"] == 0.4


def test_admission_defer_queues_the_run_for_later(store: Store) -> None:
    later = at(3600)
    iso = later.isoformat(timespec="microseconds").replace("+00:00", "Z")
    store.fire_admission = Hook({"decision": "defer", "not_before": iso, "scope": "a:day"})
    result = store.fire("a", at(1), scheduled_for=at(1))
    assert (result.status, result.reason) == (RunStatus.QUEUED, None)
    assert kinds(store, result.run_id) == ["admission", "enqueue"]
    [enqueue] = events_of_kind(store, "enqueue")
    assert enqueue["data"]["not_before"] == iso
    assert store.claim(at(2), "w1", 30, 5, set(), set()) == []
    assert claim_one(store, later)["id"] == result.run_id


def test_admission_run_only_explains_and_is_asked_with_what_the_batch_queued(
    store: Store,
) -> None:
    hook = Hook(
        {"decision": "run", "detail": "fits"},
        {"decision": "skip"},
        {"decision": "run"},
        None,
    )
    store.fire_admission = hook
    fires = [Fire("a", at(i), "catchup", "allow") for i in range(4)]
    results = store.fire_many(fires, at(10))
    assert [r.status for r in results] == ["queued", "skipped", "queued", "queued"]
    # The skipped one is not counted ahead of the next.
    assert [ahead for _, _, ahead in hook.asked] == [0, 1, 1, 2]
    assert {(task, trigger) for task, trigger, _ in hook.asked} == {("a", "catchup")}
    assert len(events_of_kind(store, "admission")) == 3  # None writes no event
    first = store.get_run(results[0].run_id)
    assert first["not_before"] == first["created_at"]


def test_admission_is_not_asked_of_manual_fires_nor_of_fires_overlap_skips(
    store: Store,
) -> None:
    hook = Hook()
    store.fire_admission = hook
    fire_at(store, "a", 1)  # asked: queued
    assert store.fire("a", at(2), scheduled_for=at(2)).reason == "overlap"
    store.fire("a", at(3), trigger="manual", honour_pause=False)
    assert hook.asked == [("a", "schedule", 0)]


def test_a_cancel_previous_fire_that_admission_skips_cancels_nothing(store: Store) -> None:
    first = fire_at(store, "a", 1, overlap="cancel_previous")
    store.fire_admission = Hook({"decision": "skip"})
    second = store.fire("a", at(2), scheduled_for=at(2), overlap="cancel_previous")
    assert second.reason == "admission"
    assert store.get_run(first)["status"] == RunStatus.QUEUED


def test_a_burn_alarm_is_recorded_once_per_window_and_is_not_a_full_one(store: Store) -> None:
    eta = T0 + timedelta(hours=3)
    assert store.record_budget_burn(T0, TASK_DAY, 0.5, eta, 0.04) is True
    assert store.record_budget_burn(at(60), TASK_DAY, 0.6, eta, 0.05) is False
    [event] = events_of_kind(store, "budget_burn")
    assert event["task_id"] == "a"
    assert event["data"] == {
        "scope": "a:day",
        "spent_usd": 0.5,
        "limit_usd": 1.0,
        "projected_exhaustion": "2026-03-01T15:00:00.000000Z",
        "usd_per_hour": 0.04,
        "window_start": "2026-03-01T00:00:00.000000Z",
        "window_end": "2026-03-02T00:00:00.000000Z",
    }
    assert store.full_alarm_limit(TASK_DAY) is None
    # The next window alarms again; a threshold alarm is its own.
    tomorrow = Scope("task:a:day", "a:day", "a", "day", 1.0, None, DAY_END, DAY_END + timedelta(1))
    assert store.record_budget_burn(DAY_END, tomorrow, 0.5, DAY_END, 0.1) is True
    assert store.record_budget_alarm(T0, TASK_DAY, 0.5, 0.5) is True
