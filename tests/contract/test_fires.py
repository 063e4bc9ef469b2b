"""Fires: enqueueing runs, at most once per idempotency key, under the overlap policies."""

from __future__ import annotations

from typing import Any

from agentd.clock import to_iso
from agentd.models import Outcome, RunStatus, StateRefused
from agentd.state.port import Fire, FireResult, Store

from .helpers import TASKS, States, at, claim_one, events_of_kind, fire_at, kinds


def test_fire_with_scheduled_for_is_idempotent(store: Store) -> None:
    first = store.fire("a", at(0), scheduled_for=at(0))
    second = store.fire("a", at(5), scheduled_for=at(0))
    assert first.created
    assert first.status == RunStatus.QUEUED
    assert not second.created
    assert second.reason == "duplicate"
    assert second.run_id == first.run_id
    assert len(store.list_runs(task_id="a")) == 1
    assert kinds(store).count("enqueue") == 1


def test_a_fire_with_a_used_key_returns_the_existing_run(store: Store, second_store: Store) -> None:
    """The port's idempotent enqueue: a key already used, given explicitly, in one batch,
    or by another instance (two processes racing on one fire), gives back the run it
    made, with its status as it is now, and never a second run or a second event."""
    first = store.fire("a", at(0), trigger="manual", key="k-1")
    assert first.created and first.reason is None
    again = store.fire("a", at(1), trigger="manual", key="k-1", overlap="allow")
    assert again == FireResult(first.run_id, False, RunStatus.QUEUED, "duplicate")
    claim_one(store, at(2))
    elsewhere = second_store.fire("a", at(3), trigger="manual", key="k-1")
    assert elsewhere == FireResult(first.run_id, False, RunStatus.RUNNING, "duplicate")
    # Within one batch: the second fire of a key finds the run the first just made.
    batch = store.fire_many(
        [
            Fire("b", None, trigger="manual", key="k-2"),
            Fire("b", None, trigger="manual", key="k-2"),
        ],
        at(4),
    )
    assert batch[0].created and not batch[1].created
    assert batch[1].run_id == batch[0].run_id and batch[1].reason == "duplicate"
    assert [r["idempotency_key"] for r in store.list_runs(task_id="a")] == ["k-1"]
    assert [r["idempotency_key"] for r in store.list_runs(task_id="b")] == ["k-2"]
    assert kinds(store).count("enqueue") == 2


def test_manual_fires_are_distinct_runs(store: Store) -> None:
    one = store.fire("a", at(0), trigger="manual", overlap="allow")
    two = store.fire("a", at(0), trigger="manual", overlap="allow")
    assert one.created and two.created
    assert one.run_id != two.run_id
    assert store.get_run(one.run_id)["trigger"] == "manual"


def test_overlap_skip(store: Store) -> None:
    first = fire_at(store, "a", 0)
    result = store.fire("a", at(60), scheduled_for=at(60), overlap="skip")
    assert result.created
    assert result.status == RunStatus.SKIPPED
    assert result.reason == "overlap"
    row = store.get_run(result.run_id)
    assert row["status"] == RunStatus.SKIPPED
    assert row["skip_reason"] == "overlap"
    assert row["finished_at"] == to_iso(at(60))
    skips = events_of_kind(store, "skip")
    assert [(e["run_id"], e["data"]["reason"]) for e in skips] == [(result.run_id, "overlap")]
    # Still skipped while the first one runs.
    claim_one(store, at(61))
    assert store.fire("a", at(120), scheduled_for=at(120)).reason == "overlap"
    # Other tasks are not affected.
    assert store.fire("b", at(120), scheduled_for=at(120)).status == RunStatus.QUEUED
    assert store.get_run(first)["status"] == RunStatus.RUNNING


def test_overlap_queue_one(store: Store) -> None:
    first = fire_at(store, "a", 0, overlap="queue_one")
    claim_one(store, at(1))
    second = store.fire("a", at(60), scheduled_for=at(60), overlap="queue_one")
    third = store.fire("a", at(120), scheduled_for=at(120), overlap="queue_one")
    assert store.get_run(first)["status"] == RunStatus.RUNNING
    assert second.status == RunStatus.QUEUED
    assert third.status == RunStatus.SKIPPED
    assert third.reason == "overlap"


def test_overlap_queue_all_bounded_by_max_queued(store: Store) -> None:
    statuses = [
        store.fire("a", at(i), scheduled_for=at(i), overlap="queue_all", max_queued=3)
        for i in range(5)
    ]
    assert [r.status for r in statuses] == [RunStatus.QUEUED] * 3 + [RunStatus.SKIPPED] * 2
    assert [r.reason for r in statuses[3:]] == ["queue_full", "queue_full"]
    assert len(store.active_runs("a")) == 3


def test_overlap_cancel_previous(store: Store) -> None:
    running = fire_at(store, "a", 0)
    claim_one(store, at(1))
    queued = fire_at(store, "a", 30, overlap="allow")
    result = store.fire("a", at(60), scheduled_for=at(60), overlap="cancel_previous")
    assert result.status == RunStatus.QUEUED
    run = store.get_run(running)
    assert run["status"] == RunStatus.RUNNING
    assert run["cancel_requested"] == 1
    assert store.cancel_requests("w1") == [running]
    # A previous run that had not started yet is cancelled outright.
    assert store.get_run(queued)["status"] == RunStatus.CANCELLED
    reasons = {e["run_id"]: e["data"]["reason"] for e in store.events() if "cancel" in e["kind"]}
    assert reasons == {running: "cancel_previous", queued: "cancel_previous"}


def test_overlap_allow(store: Store) -> None:
    fire_at(store, "a", 0)
    claim_one(store, at(1))
    results = [store.fire("a", at(i), scheduled_for=at(i), overlap="allow") for i in range(10, 13)]
    assert all(r.status == RunStatus.QUEUED for r in results)
    assert len(store.active_runs("a")) == 4


def test_fire_many_is_the_same_fires_one_after_the_other(states: States) -> None:
    """Every policy, repeated keys, a paused task and an unknown one in one batch: the
    batch gives each fire the result, the row and the events that firing it alone, in
    order, gives."""
    tasks = {**TASKS, "c": ("fp3", "command")}
    fires = [
        Fire("a", at(0)),
        Fire("a", at(1)),  # skip: the first is queued
        Fire("a", at(0)),  # the first's key again
        Fire("b", at(0), overlap="queue_all", max_queued=2),
        Fire("b", at(1), overlap="queue_all", max_queued=2),
        Fire("b", at(2), overlap="queue_all", max_queued=2),  # queue_full
        Fire("b", at(3), overlap="cancel_previous"),  # cancels both, queued this batch
        Fire("b", at(4), overlap="queue_one"),  # overlap: the one before is queued
        Fire("c", at(0)),  # paused: skipped
        Fire("c", None, trigger="manual", honour_pause=False),  # manual: runs anyway
        Fire("a", at(5), overlap="allow"),
        Fire("nope", at(0)),
    ]

    def outcome(store: Store, results: list[Any], setup: int) -> list[Any]:
        runs = [
            (r.created, r.status, r.reason, store.get_run(r.run_id) if r.run_id else None)
            for r in results
        ]
        events = [(e["kind"], e["task_id"], e["run_id"], e["data"]) for e in store.events()]
        events = events[setup:]  # the fires' own events
        random = {"id": "-", "idempotency_key": "-"}  # a manual key is random too
        return [[(c, s, why, run and {**run, **random}) for c, s, why, run in runs], events]

    one, many = states.open("one"), states.open("many")
    for s in (one, many):
        s.sync_tasks(tasks, at(0))
        s.pause("c", "test", at(0))
        fire_at(s, "a", -60)  # an earlier run of a, claimed and running
        claim_one(s, at(-59))
        s.finish(
            s.list_runs(task_id="a")[0]["id"], at(-58),
            outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED,
        )  # fmt: skip
    setup = len(one.events())
    assert len(many.events()) == setup
    singly: list[FireResult | None] = []
    for f in fires:
        try:
            singly.append(
                one.fire(
                    f.task_id,
                    at(10),
                    scheduled_for=f.scheduled_for,
                    trigger=f.trigger,
                    overlap=f.overlap,
                    max_queued=f.max_queued,
                    honour_pause=f.honour_pause,
                )
            )
        except StateRefused as exc:
            assert exc.code == "unknown_task"
            singly.append(None)
    batch = many.fire_many(fires, at(10))
    assert batch[-1].reason == "unknown_task" and singly[-1] is None
    alone = [r for r in singly[:-1] if r is not None]
    assert len(alone) == len(singly) - 1
    ids = {r.run_id: b.run_id for r, b in zip(alone, batch[:-1], strict=True)}
    got = outcome(many, batch[:-1], setup)
    expected = outcome(one, alone, setup)
    # Run ids are random: compare with the batch's ids put in place of the others'.
    expected[1] = [(k, t, ids.get(r, r), d) for k, t, r, d in expected[1]]
    assert got == expected
    statuses = [r.status for r in batch[:-1]]
    assert statuses == [
        "queued", "skipped", "queued", "queued", "queued", "skipped", "queued",
        "skipped", "skipped", "queued", "queued",
    ]  # fmt: skip


def test_misfire_is_recorded(store: Store) -> None:
    store.record_misfire("a", at(100), [at(0), at(60)], "catchup=latest")
    (event,) = events_of_kind(store, "misfire")
    assert event["data"] == {
        "count": 2,
        "reason": "catchup=latest",
        "first": to_iso(at(0)),
        "last": to_iso(at(60)),
    }
