"""Outcomes: an attempt's end, the retries it leaves, quarantine and what follows from
it (the task paused after so many, release and drop), one at a time or in a batch."""

from __future__ import annotations

from typing import Any

import pytest

from agentd.clock import to_iso
from agentd.models import Outcome, Row, RunStatus, StateRefused
from agentd.state.port import Finish, Store

from .helpers import (
    TASKS,
    States,
    at,
    claim_one,
    events_of_kind,
    fire_at,
    kinds,
    quarantine,
    run_and_finish,
)

# ---------------------------------------------------------------- one attempt's end


def test_finish_success(store: Store) -> None:
    run_id = run_and_finish(
        store, "a", 0, Outcome.SUCCESS, RunStatus.SUCCEEDED, exit_code=0, duration_s=0.5
    )
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.SUCCEEDED
    assert run["outcome"] == Outcome.SUCCESS
    assert run["finished_at"] == to_iso(at(1))
    assert run["lease_owner"] is None
    assert run["failures"] == 0
    task = store.task_row("a")
    assert task is not None
    assert task["last_success_at"] == to_iso(at(1))
    assert task["last_outcome"] == Outcome.SUCCESS
    (attempt,) = store.attempts(run_id)
    assert attempt["outcome"] == Outcome.SUCCESS
    assert attempt["finished_at"] == to_iso(at(1))
    assert attempt["duration_s"] == 0.5
    assert kinds(store, run_id) == ["enqueue", "claim", "success"]


def test_finish_failure_retry_waits_in_the_queue(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0))
    store.finish(
        run_id,
        at(1),
        outcome=Outcome.FAILURE,
        next_status=RunStatus.QUEUED,
        not_before=at(31),
        error="exit 1",
        exit_code=1,
    )
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 1
    assert run["not_before"] == to_iso(at(31))
    assert run["finished_at"] is None
    assert run["error"] == "exit 1"
    retry = events_of_kind(store, "retry")
    assert len(retry) == 1
    assert retry[0]["data"]["failures"] == 1
    assert retry[0]["data"]["not_before"] == to_iso(at(31))
    task = store.task_row("a")
    assert task is not None
    assert task["last_success_at"] is None
    # Not before its time; then it is attempt 2.
    assert store.claim(at(30), "w1", 30, 5, set(), set()) == []
    row = claim_one(store, at(31))
    assert row["attempt"] == 2
    assert [a["outcome"] for a in store.attempts(run_id)] == [Outcome.FAILURE, None]


def test_finish_quarantined(store: Store) -> None:
    run_id = run_and_finish(
        store, "a", 0, Outcome.FAILURE, RunStatus.QUARANTINED, error="boom", exit_code=2
    )
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUARANTINED
    assert run["finished_at"] == to_iso(at(1))
    assert run["failures"] == 1
    q = store.quarantine_get(run_id)
    assert q["task_id"] == "a"
    assert q["last_error"] == "boom"
    assert q["attempts"] == 1
    assert [r["run_id"] for r in store.quarantine_list()] == [run_id]
    events = events_of_kind(store, "quarantine")
    assert [(e["run_id"], e["data"]["error"]) for e in events] == [(run_id, "boom")]
    assert store.counts()["in_quarantine"] == 1


def test_finish_interrupted_costs_no_failure(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0))
    store.finish(run_id, at(1), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED)
    claim_one(store, at(2))
    store.finish(run_id, at(3), outcome=Outcome.INTERRUPTED, next_status=RunStatus.QUEUED)
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 1  # only the real failure counts
    assert run["attempt"] == 2
    assert kinds(store, run_id).count("retry") == 1
    assert "interrupt" in kinds(store, run_id)


def test_finish_unknown_run(store: Store) -> None:
    with pytest.raises(StateRefused) as info:
        store.finish("nope", at(0), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED)
    assert info.value.code == "unknown_run"


# ---------------------------------------------------------------- quarantines in a row


def test_consecutive_quarantines_pause_the_task(store: Store) -> None:
    quarantine(store, 0)
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    assert task["consecutive_quarantines"] == 1
    quarantine(store, 100)
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 1
    assert task["consecutive_quarantines"] == 2
    assert "2 consecutive" in task["paused_reason"]
    pauses = events_of_kind(store, "pause")
    assert len(pauses) == 1
    assert pauses[0]["data"]["by"] == "agentd"
    assert pauses[0]["task_id"] == "a"
    # The schedule now skips it.
    assert store.fire("a", at(200), scheduled_for=at(200)).reason == "paused"


def test_a_success_resets_the_quarantine_count(store: Store) -> None:
    quarantine(store, 0)
    run_and_finish(store, "a", 100, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    task = store.task_row("a")
    assert task is not None
    assert task["consecutive_quarantines"] == 0
    quarantine(store, 200)
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    assert task["consecutive_quarantines"] == 1
    assert events_of_kind(store, "pause") == []


def test_resume_clears_the_quarantine_count(store: Store) -> None:
    quarantine(store, 0)
    quarantine(store, 100)
    assert store.paused_tasks() == {"a"}
    assert store.resume("a", at(150))
    task = store.task_row("a")
    assert task is not None
    assert task["paused"] == 0
    assert task["paused_reason"] is None
    assert task["consecutive_quarantines"] == 0
    quarantine(store, 200)
    assert store.paused_tasks() == set()


def test_pause_after_zero_never_pauses(store: Store) -> None:
    for i in range(4):
        quarantine(store, i * 100, pause_after=0)
    assert store.paused_tasks() == set()


# ---------------------------------------------------------------- release and drop


def test_quarantine_release(store: Store) -> None:
    run_id = quarantine(store, 0, pause_after=0)
    store.quarantine_release(run_id, at(50))
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 0
    assert run["trigger"] == "release"
    assert run["finished_at"] is None
    assert store.quarantine_list() == []
    with pytest.raises(StateRefused) as info:
        store.quarantine_get(run_id)
    assert info.value.code == "not_quarantined"
    assert "release" in kinds(store, run_id)
    assert claim_one(store, at(51))["id"] == run_id


def test_released_run_of_a_paused_task_is_claimed(store: Store) -> None:
    first = quarantine(store, 0)
    quarantine(store, 100)
    assert store.paused_tasks() == {"a"}
    store.quarantine_release(first, at(150))
    assert claim_one(store, at(151))["id"] == first


def test_quarantine_drop(store: Store) -> None:
    run_id = quarantine(store, 0, pause_after=0)
    store.quarantine_drop(run_id, at(50))
    assert store.quarantine_list() == []
    assert store.get_run(run_id)["status"] == RunStatus.DROPPED
    assert store.list_runs(status=RunStatus.QUARANTINED) == []
    assert "drop" in kinds(store, run_id)
    with pytest.raises(StateRefused) as info:
        store.quarantine_drop(run_id, at(51))
    assert info.value.code == "not_quarantined"


def test_release_of_a_run_not_in_quarantine(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    with pytest.raises(StateRefused) as info:
        store.quarantine_release(run_id, at(1))
    assert info.value.code == "not_quarantined"
    assert store.get_run(run_id)["status"] == RunStatus.QUEUED


# ---------------------------------------------------------------- finish_many


def _finishes(rows: list[Row], plan: list[tuple[Outcome, RunStatus]]) -> list[Finish]:
    return [
        Finish(
            run_id=row["id"],
            task_id=row["task_id"],
            attempt=row["attempt"],
            failures=row["failures"],
            outcome=outcome,
            next_status=status,
            at=at(20 + i),
            not_before=at(60 + i) if status == RunStatus.QUEUED else at(20 + i),
            error=None if outcome == Outcome.SUCCESS else f"{outcome} #{i}",
            exit_code=i,
            duration_s=0.5 + i,
            pause_after_failures=1,
        )
        for i, (row, (outcome, status)) in enumerate(zip(rows, plan, strict=True))
    ]


@pytest.mark.parametrize("with_quarantine", [False, True])
def test_finish_many_is_the_same_finishes_one_after_the_other(
    states: States, with_quarantine: bool
) -> None:
    """Every outcome, and two runs of one task ending either way round, in one batch:
    the runs, attempts, task rows and events (with their ids as the sink saw them) are
    what finishing them one after the other gives. A quarantine (which reads and counts
    the task's row, and here pauses it) is part of the second batch.

    The two states are made the same way (fires with fixed keys, then one claim of all)
    and compared with each run's id replaced by its place in the claim: run ids are
    random, and what else an engine numbers (attempt and event ids) is compared within
    one state only."""
    tasks = {**TASKS, "c": ("fp3", "command"), "d": ("fp4", "command")}
    plan = [
        (Outcome.FAILURE, RunStatus.QUEUED),  # a: retry
        (Outcome.SUCCESS, RunStatus.SUCCEEDED),  # a: then success
        (Outcome.SUCCESS, RunStatus.SUCCEEDED),  # b: success
        (Outcome.TIMEOUT, RunStatus.QUEUED),  # b: then a retried timeout
        (Outcome.INTERRUPTED, RunStatus.QUEUED),  # c: resume, not counted
        (Outcome.CANCELLED, RunStatus.CANCELLED),  # c
        (
            (Outcome.FAILURE, RunStatus.QUARANTINED)
            if with_quarantine
            else (Outcome.BUDGET_EXHAUSTED, RunStatus.BUDGET_EXHAUSTED)
        ),  # d
    ]
    seen: dict[str, list[Row]] = {"one": [], "many": []}
    made: dict[str, tuple[Store, list[Row]]] = {}
    for name in ("one", "many"):
        s = states.open(name, sink=seen[name].append)
        s.sync_tasks(tasks, at(0))
        for i, task_id in enumerate(("a", "a", "b", "b", "c", "c", "d")):
            s.fire(task_id, at(0), trigger="manual", overlap="allow", key=f"{task_id}-{i}")
        rows = s.claim(at(1), "w1", 30, 10, set(), set(tasks))
        assert [r["task_id"] for r in rows] == ["a", "a", "b", "b", "c", "c", "d"]
        seen[name].clear()
        made[name] = (s, rows)

    def state(store: Store, rows: list[Row], sink: list[Row]) -> list[Any]:
        events = store.events()
        assert [(e["id"], e["kind"], e["data"]) for e in events[-len(sink) :]] == [
            (e["id"], e["kind"], e["data"]) for e in sink
        ]
        place = {row["id"]: f"run-{n}" for n, row in enumerate(rows)}

        def named(record: Row, *numbered: str) -> Row:
            """``record`` without the engine-numbered keys, its run ids by place."""
            out = {k: v for k, v in record.items() if k not in numbered}
            for key in {"id", "run_id"} & out.keys():
                out[key] = place.get(out[key], out[key])
            return out

        runs = sorted((named(r) for r in store.list_runs(limit=100)), key=lambda r: str(r["id"]))
        return [
            runs,
            [named(a, "id") for row in rows for a in store.attempts(row["id"])],
            [store.task_row(t) for t in sorted(tasks)],
            [named(e, "id") for e in events],
        ]

    one, one_rows = made["one"]
    items = _finishes(one_rows, plan)
    one_unit = one.unit()
    for f in items:
        one.finish(
            f.run_id,
            f.at,
            outcome=f.outcome,
            next_status=f.next_status,
            not_before=f.not_before,
            error=f.error,
            exit_code=f.exit_code,
            duration_s=f.duration_s,
            pause_after_failures=f.pause_after_failures,
        )
    one_unit.commit()
    many, many_rows = made["many"]
    many_unit = many.unit()
    many.finish_many(_finishes(many_rows, plan))
    many_unit.commit()
    assert len(seen["many"]) == len(seen["one"]) >= len(items)
    assert state(many, many_rows, seen["many"]) == state(one, one_rows, seen["one"])
    kinds_seen = {e["kind"] for e in seen["many"]}
    assert kinds_seen >= {"failure", "retry", "success", "timeout", "interrupt", "cancel"}
    assert ("quarantine" in kinds_seen) is with_quarantine
    assert ("pause" in kinds_seen) is with_quarantine


def test_finish_many_is_all_or_nothing(store: Store) -> None:
    """A run that is gone undoes the whole batch: its caller then records them one by
    one, and must not find half of them already done."""
    fire_at(store, "a", 0)
    row = claim_one(store, at(1))
    gone = Finish(
        run_id="r-gone", task_id="b", attempt=1, failures=0,
        outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED, at=at(2),
    )  # fmt: skip
    real = _finishes([row], [(Outcome.SUCCESS, RunStatus.SUCCEEDED)])[0]
    before = len(store.events())
    with pytest.raises(StateRefused) as caught:
        store.finish_many([real, gone])
    assert caught.value.code == "unknown_run"
    assert store.get_run(row["id"])["status"] == RunStatus.RUNNING
    assert len(store.events()) == before
    store.finish_many([real])
    assert store.get_run(row["id"])["status"] == RunStatus.SUCCEEDED


@pytest.mark.parametrize("in_unit", [False, True], ids=["alone", "in_a_unit"])
def test_finish_many_with_a_quarantine_is_all_or_nothing_too(store: Store, in_unit: bool) -> None:
    """The same promise when the batch holds a quarantine. The runner, told the batch
    failed, records each run again one by one in the same unit: the first run would be
    finished twice (two failure and two quarantine events, its task's quarantine streak
    counted twice, which can pause it)."""
    fire_at(store, "a", 0)
    row = claim_one(store, at(1))
    gone = Finish(
        run_id="r-gone", task_id="b", attempt=1, failures=0,
        outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED, at=at(2),
    )  # fmt: skip
    real = _finishes([row], [(Outcome.FAILURE, RunStatus.QUARANTINED)])[0]
    before = len(store.events())
    unit = store.unit() if in_unit else None
    with pytest.raises(StateRefused) as caught:
        store.finish_many([real, gone])
    assert caught.value.code == "unknown_run"
    assert store.get_run(row["id"])["status"] == RunStatus.RUNNING
    assert store.quarantine_list() == []
    assert len(store.events()) == before
    if unit is not None:
        unit.commit()
