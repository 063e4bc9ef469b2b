"""Tasks and pause: what the config has (``sync_tasks``), a task paused by an operator
or by agentd, and what both do to the runs of a task."""

from __future__ import annotations

import pytest

from agentd.clock import to_iso
from agentd.models import Outcome, Row, RunStatus, StateRefused
from agentd.state.port import Fire, Store

from .helpers import TASKS, States, at, events_of_kind, fire_at, kinds

# ---------------------------------------------------------------- sync_tasks


def test_sync_tasks_adds_changes_removes_and_keeps_pause(store: Store) -> None:
    store.pause("a", "maintenance", at(1))
    store.sync_tasks({"a": ("fp1-changed", "command"), "c": ("fp3", "http")}, at(2))
    rows = {r["id"]: r for r in store.task_rows()}
    assert set(rows) == {"a", "c"}
    assert rows["a"]["fingerprint"] == "fp1-changed"
    assert rows["a"]["paused"] == 1
    assert rows["a"]["paused_reason"] == "maintenance"
    b = store.task_row("b")
    assert b is not None
    assert b["present"] == 0
    assert {"task_added", "task_changed", "task_removed"} <= set(kinds(store))
    with pytest.raises(StateRefused) as info:
        store.fire("b", at(3))
    assert info.value.code == "unknown_task"


def test_sync_tasks_keeping_absent_ones_removes_nothing_and_cancels_nothing(
    store: Store,
) -> None:
    """``keep_absent`` (another live node may define what this config lacks): a task
    missing from the config stays present with its queued run, fully or against the
    last sync; the next sync without it removes the task and cancels the run."""
    run_id = store.fire("b", at(1)).run_id
    store.sync_tasks({"a": TASKS["a"]}, at(2), keep_absent=True)
    store.sync_tasks({"a": TASKS["a"]}, at(3), synced=TASKS, keep_absent=True)
    b = store.task_row("b")
    assert b is not None and b["present"] == 1
    assert store.get_run(run_id)["status"] == "queued"
    assert "task_removed" not in kinds(store)
    store.sync_tasks({"a": TASKS["a"]}, at(4))
    b = store.task_row("b")
    assert b is not None and b["present"] == 0
    assert store.get_run(run_id)["status"] == "cancelled"


def test_sync_tasks_events_come_in_config_order_with_the_ids_the_sink_saw(
    store: Store, events_seen: list[Row]
) -> None:
    """The batched writes keep what one-by-one writing said: adds and changes in the
    config's order, then removals; each event's id in the sink is its row's id."""
    store.sync_tasks(
        {"z": ("fz", "http"), "a": ("fp1-changed", "command"), "c": ("fp3", "http")}, at(1)
    )
    expected = [
        ("task_added", "z", {"fingerprint": "fz"}),
        ("task_changed", "a", {"fingerprint": "fp1-changed"}),
        ("task_added", "c", {"fingerprint": "fp3"}),
        ("task_removed", "b", {}),
    ]
    assert [(e["kind"], e["task_id"], e["data"]) for e in events_seen] == expected
    stored = [e for e in store.events() if e["ts"] == to_iso(at(1))]
    assert [(e["id"], e["kind"], e["task_id"]) for e in stored] == [
        (e["id"], e["kind"], e["task_id"]) for e in events_seen
    ]
    rows = {}
    for task_id in "abcz":
        row = store.task_row(task_id)
        assert row is not None
        rows[task_id] = (row["fingerprint"], row["kind"], row["present"])
    assert rows == {
        "a": ("fp1-changed", "command", 1),
        "b": ("fp2", "command", 0),
        "c": ("fp3", "http", 1),
        "z": ("fz", "http", 1),
    }
    assert [r["id"] for r in store.task_rows()] == ["a", "c", "z"]  # present ones only


def test_sync_tasks_against_the_last_sync_writes_what_a_full_sync_writes(
    states: States,
) -> None:
    """A reload passes what it synced last, and only the differing rows are read."""
    steps = [
        {"a": ("fp1-changed", "command"), "c": ("fp3", "http")},  # change, remove, add
        {"a": ("fp1-changed", "command"), "b": ("fp2", "command"), "c": ("fp3", "http")},
        {"a": ("fp1-changed", "command"), "b": ("fp2", "command"), "c": ("fp3", "http")},
        {"b": ("fp2b", "http")},
    ]
    full, diff = states.open("full"), states.open("diff")
    for s in (full, diff):
        s.sync_tasks(TASKS, at(0))
    last = TASKS
    for n, step in enumerate(steps, start=1):
        full.sync_tasks(step, at(n))
        diff.sync_tasks(step, at(n), synced=last)
        last = step

    def rows(store: Store) -> list[tuple[object, ...]]:
        found = [store.task_row(t) for t in "abc"]
        return [
            (r["id"], r["fingerprint"], r["kind"], r["present"], r["updated_at"])
            for r in found
            if r is not None
        ]

    assert len(rows(full)) == 3
    assert rows(diff) == rows(full)
    seen = [(e["kind"], e["task_id"], e["ts"], e["data"]) for e in full.events()]
    assert [(e["kind"], e["task_id"], e["ts"], e["data"]) for e in diff.events()] == seen
    assert ("task_changed", "b", to_iso(at(2)), {"fingerprint": "fp2"}) in seen  # back
    assert not [e for e in seen if e[2] == to_iso(at(3))]  # nothing changed, nothing said


def test_a_reopened_state_keeps_its_runs_tasks_and_events(states: States, store: Store) -> None:
    """What a restart finds: everything committed, and a sync of the same tasks again
    changes nothing and records nothing."""
    run_id = fire_at(store, "a", 0)
    n_events = len(store.events())
    states.close(store)
    again = states.open()
    assert again.get_run(run_id)["status"] == RunStatus.QUEUED
    assert [r["id"] for r in again.task_rows()] == ["a", "b"]
    assert len(again.events()) == n_events
    again.sync_tasks(TASKS, at(60))
    assert len(again.events()) == n_events


def test_queued_runs_of_a_removed_task_are_cancelled_when_it_goes(store: Store) -> None:
    [retry] = store.fire_many([Fire("b", at(0))], at(0))
    store.claim(at(0), "w1", 30, 10, set(), set())
    store.finish(retry.run_id, at(1), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED)
    [queued] = store.fire_many([Fire("b", at(5), overlap="allow")], at(2))
    [kept] = store.fire_many([Fire("a", at(5))], at(2))
    assert store.counts()["queued"] == 3
    store.sync_tasks({"a": TASKS["a"]}, at(3), synced=TASKS)
    for run_id in (retry.run_id, queued.run_id):
        run = store.get_run(run_id)
        assert run["status"] == RunStatus.CANCELLED
        assert run["finished_at"] == to_iso(at(3))
        assert "removed from the config" in run["error"]
        [event] = [e for e in store.events(run_id) if e["kind"] == "cancel"]
        assert event["data"]["reason"] == "task_removed"
    assert store.get_run(kept.run_id)["status"] == RunStatus.QUEUED
    assert store.gauge_counts()[0] == 1
    # The task coming back does not bring its cancelled runs back.
    store.sync_tasks(TASKS, at(4), synced={"a": TASKS["a"]})
    assert store.get_run(retry.run_id)["status"] == RunStatus.CANCELLED


def test_queued_runs_of_a_task_gone_while_the_daemon_was_down_are_cancelled_at_start(
    states: States, store: Store
) -> None:
    [queued] = store.fire_many([Fire("b", at(5))], at(0))
    states.close(store)
    again = states.open()
    again.sync_tasks({"a": TASKS["a"]}, at(10))  # a start with a config without b
    assert again.get_run(queued.run_id)["status"] == RunStatus.CANCELLED


# ---------------------------------------------------------------- pause


def test_paused_task_skips_scheduled_fires_but_not_manual_ones(store: Store) -> None:
    assert store.pause("a", "maintenance", at(0)) is True
    assert store.pause("a", "again", at(0)) is False  # idempotent
    assert store.paused_tasks() == {"a"}
    scheduled = store.fire("a", at(10), scheduled_for=at(10))
    assert scheduled.status == RunStatus.SKIPPED
    assert scheduled.reason == "paused"
    manual = store.fire("a", at(20), trigger="manual", honour_pause=False)
    assert manual.status == RunStatus.QUEUED
    pause_events = events_of_kind(store, "pause")
    assert len(pause_events) == 1
    assert pause_events[0]["data"] == {"reason": "maintenance", "by": "operator"}


def test_claim_skips_scheduled_runs_of_a_paused_task_but_takes_manual_ones(
    store: Store,
) -> None:
    scheduled = fire_at(store, "a", 0)
    store.pause("a", "maintenance", at(1))
    assert store.claim(at(2), "w1", 30, 5, set(), set()) == []
    manual = store.fire("a", at(3), trigger="manual", overlap="allow", honour_pause=False)
    claimed = store.claim(at(4), "w1", 30, 5, set(), {"a"})
    assert [r["id"] for r in claimed] == [manual.run_id]
    assert store.get_run(scheduled)["status"] == RunStatus.QUEUED
    # Resuming lets the scheduled run through.
    assert store.resume("a", at(5)) is True
    assert store.resume("a", at(5)) is False
    assert [r["id"] for r in store.claim(at(6), "w1", 30, 5, set(), {"a"})] == [scheduled]
