"""The unit of work (``Store.unit``): one owner per commit, joined handles that commit
nothing, rollback hooks, events published only once their unit has committed and then
exactly once, and the commit off the event loop."""

from __future__ import annotations

import asyncio

import pytest

from agentd.models import EventKind, Outcome, Row, RunStatus, StateRefused
from agentd.state.port import Finish, Store

from .helpers import at, claim_one, fire_at


def _published(seen: list[Row]) -> list[tuple[str, str | None]]:
    return [(e["kind"], e["run_id"]) for e in seen]


def test_a_joined_units_commit_does_nothing_the_owners_does(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    owner = store.unit()
    joined = store.unit()
    assert owner.owner and not joined.owner
    first = fire_at(store, "a", 0)
    joined.commit()
    assert joined.commit_off_loop() is None
    joined.abort()  # does nothing either: the owner's unit goes on
    assert events_seen == []
    assert second_store.list_runs() == []  # nothing durable yet
    assert store.get_run(first)["status"] == RunStatus.QUEUED  # still in the owner's unit
    second = fire_at(store, "b", 0)
    owner.commit()
    assert _published(events_seen) == [("enqueue", first), ("enqueue", second)]
    assert {r["id"] for r in second_store.list_runs()} == {first, second}
    after = store.unit()
    assert after.owner  # the owner's commit ended the unit
    after.abort()


def test_an_event_is_published_only_after_its_unit_commits_and_once(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    latest = store.latest_event_id()
    unit = store.unit()
    store.pause("a", "maintenance", at(1))
    store.emit(at(2), EventKind.MISFIRE, "b", count=1, reason="test")
    assert events_seen == []
    assert second_store.events(after_id=latest) == []
    unit.commit()
    stored = second_store.events(after_id=latest)
    assert [(e["kind"], e["task_id"]) for e in stored] == [("pause", "a"), ("misfire", "b")]
    assert events_seen == stored  # in commit order, with the ids they are stored under
    assert store.complete_commit() is None
    fire_at(store, "b", 3)
    assert [e["kind"] for e in events_seen] == ["pause", "misfire", "enqueue"]  # never twice


def test_a_verb_outside_any_unit_is_its_own_unit(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    run_id = fire_at(store, "a", 0)
    # Committed on return: published, and visible to everyone.
    assert _published(events_seen) == [("enqueue", run_id)]
    assert second_store.get_run(run_id)["status"] == RunStatus.QUEUED
    # It left no unit open for the next to join, and neither does one that is refused.
    with pytest.raises(StateRefused):
        store.pause("nope", "x", at(1))
    unit = store.unit()
    assert unit.owner
    unit.abort()
    assert store.get_run(run_id)["status"] == RunStatus.QUEUED  # the abort undid nothing of it


def test_rollback_hooks_run_when_the_unit_does_not_commit_and_only_then(
    store: Store, events_seen: list[Row]
) -> None:
    undone: list[str] = []
    owner = store.unit()
    owner.on_rollback(lambda: undone.append("owner's"))
    run_id = fire_at(store, "a", 0)
    joined = store.unit()
    joined.on_rollback(lambda: undone.append("joined's"))  # a hook of the owner's unit
    joined.abort()
    assert undone == []
    owner.abort()
    assert sorted(undone) == ["joined's", "owner's"]
    assert events_seen == []
    with pytest.raises(StateRefused):
        store.get_run(run_id)
    # A unit that commits drops its hooks, on the loop or off it.
    undone.clear()
    for off_loop in (False, True):
        unit = store.unit()
        unit.on_rollback(lambda: undone.append("committed"))
        fire_at(store, "b", 10 + off_loop, overlap="allow")
        if off_loop:
            commit = unit.commit_off_loop()
            assert commit is not None and commit.result(timeout=60) is None
            assert store.complete_commit() is None
        else:
            unit.commit()
    assert undone == []
    assert [e["kind"] for e in events_seen] == ["enqueue", "enqueue"]


def test_an_aborted_unit_emits_nothing_and_leaves_no_rows(
    store: Store, events_seen: list[Row]
) -> None:
    n_events = len(store.events())
    unit = store.unit()
    store.pause("a", "doomed", at(1))
    store.emit(at(1), EventKind.MISFIRE, "a", count=1, reason="doomed")
    unit.abort()
    assert events_seen == []
    assert len(store.events()) == n_events
    assert store.paused_tasks() == set()
    # The next unit publishes only its own events, not the aborted ones.
    run_id = fire_at(store, "b", 2)
    assert _published(events_seen) == [("enqueue", run_id)]


def test_a_failed_verb_in_a_unit_undoes_only_its_own_part(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    running = fire_at(store, "a", 0)
    row = claim_one(store, at(0))
    events_seen.clear()
    unit = store.unit()
    first = fire_at(store, "b", 1)
    ends = [
        Finish(running, "a", row["attempt"], row["failures"], Outcome.SUCCESS,
               RunStatus.SUCCEEDED, at(1)),
        Finish("r-gone", "a", 1, 0, Outcome.SUCCESS, RunStatus.SUCCEEDED, at(1)),
    ]  # fmt: skip
    with pytest.raises(StateRefused):
        store.finish_many(ends)  # it writes the first run's end, then finds the second gone
    second = fire_at(store, "a", 1, overlap="allow")
    assert events_seen == []  # nothing announced before it is durable
    assert second_store.list_runs(status="queued") == []  # nor visible
    unit.commit()
    assert _published(events_seen) == [("enqueue", first), ("enqueue", second)]
    assert {r["id"] for r in second_store.list_runs(status="queued")} == {first, second}
    assert second_store.get_run(running)["status"] == RunStatus.RUNNING
    assert [a["finished_at"] for a in second_store.attempts(running)] == [None]


def test_off_loop_commit_events_come_once_after_it_and_before_later_ones(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    unit = store.unit()
    first = fire_at(store, "a", 0)
    commit = unit.commit_off_loop()
    assert commit is not None
    # Done or not, nothing reaches the sink before someone completes the commit.
    assert events_seen == []
    # The next use of the state waits for it and hands its events on first.
    second = fire_at(store, "b", 1)
    assert _published(events_seen) == [("enqueue", first), ("enqueue", second)]
    assert commit.result(timeout=60) is None
    assert store.complete_commit() is None and len(events_seen) == 2  # never twice
    assert {r["id"] for r in second_store.list_runs()} == {first, second}


def test_commit_done_returns_once_the_off_loop_commit_is_done(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    """What API requests await before they read."""

    async def scenario() -> str:
        unit = store.unit()
        run_id = fire_at(store, "a", 0)
        commit = unit.commit_off_loop()
        assert commit is not None
        await asyncio.wait_for(store.commit_done(), 60)
        assert commit.done() and not store.committing
        assert second_store.get_run(run_id)["status"] == RunStatus.QUEUED  # durable
        await asyncio.wait_for(store.commit_done(), 60)  # nothing in flight: at once
        return run_id

    run_id = asyncio.run(scenario())
    assert store.complete_commit() is None
    assert _published(events_seen) == [("enqueue", run_id)]
    assert not store.committing
