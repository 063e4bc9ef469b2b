"""Claims and leases: due runs taken under a lease, extended by heartbeats, recovered
when their owner is gone; and the change detection an idle loop relies on."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from agentd.clock import to_iso
from agentd.models import Outcome, RunStatus, StateRefused
from agentd.state.port import Finish, Store

from .helpers import T0, at, claim_one, events_of_kind, fire_at


def test_claim_respects_not_before(store: Store) -> None:
    run_id = fire_at(store, "a", 10)
    assert store.claim(at(9), "w1", 30, 5, set(), set()) == []
    assert [r["id"] for r in store.claim(at(10), "w1", 30, 5, set(), set())] == [run_id]


def test_claim_sets_running_attempt_lease_and_records_it(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    row = claim_one(store, at(2.5), owner="host:1", lease_s=30)
    assert row["id"] == run_id
    assert row["status"] == RunStatus.RUNNING
    assert row["attempt"] == 1
    stored = store.get_run(run_id)
    assert stored["status"] == RunStatus.RUNNING
    assert stored["attempt"] == 1
    assert stored["lease_owner"] == "host:1"
    assert stored["lease_expires_at"] == to_iso(at(32.5))
    assert stored["started_at"] == to_iso(at(2.5))
    attempts = store.attempts(run_id)
    assert len(attempts) == 1
    assert attempts[0]["attempt"] == 1
    assert attempts[0]["worker"] == "host:1"
    assert attempts[0]["started_at"] == to_iso(at(2.5))
    assert attempts[0]["finished_at"] is None
    claim_events = events_of_kind(store, "claim")
    assert len(claim_events) == 1
    assert claim_events[0]["run_id"] == run_id
    assert claim_events[0]["data"] == {"attempt": 1, "lateness_s": 2.5}


def test_claim_respects_limit(store: Store) -> None:
    store.sync_tasks({t: ("fp", "command") for t in "abcd"}, T0)
    for task_id in "abcd":
        fire_at(store, task_id, 0)
    first = store.claim(at(1), "w1", 30, 2, set(), set())
    assert len(first) == 2
    second = store.claim(at(1), "w1", 30, 5, {r["task_id"] for r in first}, set())
    assert len(second) == 2
    assert {r["task_id"] for r in first + second} == set("abcd")
    assert store.claim(at(1), "w1", 30, 0, set(), set()) == []


def test_claim_one_per_task_unless_overlap_allowed(store: Store) -> None:
    ids = [fire_at(store, "a", i, overlap="allow") for i in range(3)]
    claimed = store.claim(at(5), "w1", 30, 5, set(), set())
    assert [r["id"] for r in claimed] == [ids[0]]
    claimed = store.claim(at(5), "w1", 30, 5, set(), {"a"})
    assert sorted(r["id"] for r in claimed) == sorted(ids[1:])


def test_claim_skips_busy_tasks(store: Store) -> None:
    fire_at(store, "a", 0)
    b = fire_at(store, "b", 0)
    claimed = store.claim(at(1), "w1", 30, 5, {"a"}, set())
    assert [r["id"] for r in claimed] == [b]


def test_claim_takes_runs_of_one_task_in_fire_order(store: Store) -> None:
    """Catch-up fires many due times at one ``now``; they must run in their own order."""
    ids = [
        store.fire(
            "a", T0, scheduled_for=T0 - timedelta(minutes=10 - i), overlap="queue_all"
        ).run_id
        for i in range(8)
    ]
    claimed = store.claim(at(1), "w1", 30, 8, set(), {"a"})
    assert [r["id"] for r in claimed] == ids


def test_claim_is_not_starved_by_a_backlog_of_a_busy_task(store: Store) -> None:
    """A long queue of one busy task must not hide another task's due run."""
    # More runs of "a" than any engine would look at for a claim of 2 (SQLite's reads
    # 2 * 4 + 1 = 9 rows).
    for i in range(12):
        fire_at(store, "a", i / 100, overlap="queue_all", max_queued=100)
    claim_one(store, at(1))  # one run of "a" is now running
    b = fire_at(store, "b", 2)
    claimed = store.claim(at(3), "w1", 30, 2, {"a"}, set())
    assert [r["id"] for r in claimed] == [b]


def test_heartbeat_extends_only_own_leases(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0), owner="w1", lease_s=30)
    store.heartbeat([run_id], "someone-else", at(20), 30)
    assert store.get_run(run_id)["lease_expires_at"] == to_iso(at(30))
    store.heartbeat([run_id], "w1", at(20), 30)
    assert store.get_run(run_id)["lease_expires_at"] == to_iso(at(50))


def test_recover_requeues_runs_of_a_dead_owner(store: Store, second_store: Store) -> None:
    """``store`` is the old process, which dies holding a claim without cleaning up;
    ``second_store`` is the one started after it."""
    old, new = store, second_store
    run_id = fire_at(old, "a", 0)
    claim_one(old, at(0), owner="host:111")
    old.finish(run_id, at(1), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED)
    claim_one(old, at(2), owner="host:111")

    assert new.recover(at(5), owner="host:222") == [run_id]
    run = new.get_run(run_id)
    assert run["status"] == RunStatus.QUEUED
    assert run["failures"] == 1  # the lost attempt costs nothing
    assert run["lease_owner"] is None
    assert run["not_before"] == to_iso(at(5))
    attempts = new.attempts(run_id)
    assert [a["outcome"] for a in attempts] == [Outcome.FAILURE, Outcome.LOST]
    assert attempts[1]["finished_at"] == to_iso(at(5))
    recover = events_of_kind(new, "recover")
    assert len(recover) == 1
    assert recover[0]["run_id"] == run_id
    assert recover[0]["data"]["previous_owner"] == "host:111"
    assert recover[0]["data"]["by"] == "host:222"
    assert claim_one(new, at(6), owner="host:222")["attempt"] == 3


def test_recover_leaves_live_owners_with_valid_leases(store: Store) -> None:
    live = fire_at(store, "a", 0)
    claim_one(store, at(0), owner="alive", lease_s=30)
    expired = fire_at(store, "b", 0)
    claim_one(store, at(0), owner="alive-but-stuck", lease_s=5)
    recovered = store.recover(at(10), owner="me", live_owners={"alive", "alive-but-stuck"})
    assert recovered == [expired]
    assert store.get_run(live)["status"] == RunStatus.RUNNING
    assert store.get_run(expired)["status"] == RunStatus.QUEUED


def test_version_moves_on_any_write_and_only_then(store: Store, second_store: Store) -> None:
    """What lets an idle tick skip its reads: unchanged means nobody wrote."""
    v0 = store.version()
    store.first_queued_at()
    assert store.version() == v0  # reads move nothing
    fire_at(store, "a", 0)
    v1 = store.version()
    assert v1 != v0  # this instance's write
    second_store.pause("a", "maintenance", at(1))
    v2 = store.version()
    assert v2 != v1  # another instance's commit (the CLI's)
    assert store.version() == v2


def _taken_over(old: Store, new: Store) -> str:
    """A run claimed by ``node-a``, whose lease expired (node-a stopped, say) and which
    ``node-b`` recovered and claimed again: attempt 1 is a's, attempt 2 b's."""
    run_id = fire_at(old, "a", 0)
    claim_one(old, at(0), owner="node-a", lease_s=5)
    assert new.recover(at(10), owner="node-b", live_owners={"node-a", "node-b"}) == [run_id]
    assert claim_one(new, at(11), owner="node-b", lease_s=30)["attempt"] == 2
    return run_id


def test_heartbeat_returns_the_runs_the_caller_no_longer_holds(
    store: Store, second_store: Store
) -> None:
    run_id = _taken_over(store, second_store)
    assert store.heartbeat([run_id], "node-a", at(12), 30) == {run_id}
    assert second_store.heartbeat([run_id], "node-b", at(12), 30) == set()
    gone = "20260301T120000-00000000000000000000"
    assert second_store.heartbeat([run_id, gone], "node-b", at(13), 30) == {gone}
    run = store.get_run(run_id)
    assert run["lease_owner"] == "node-b" and run["lease_expires_at"] == to_iso(at(43))


def test_a_fenced_finish_by_a_node_that_lost_the_lease_records_nothing(
    store: Store, second_store: Store
) -> None:
    """The old holder comes back (SIGCONT, a healed partition) and reports its outcome:
    refused, and nothing of it lands; the new holder's outcome is the run's."""
    run_id = _taken_over(store, second_store)
    before = len(store.events())
    stale = Finish(
        run_id=run_id, task_id="a", attempt=1, failures=0, outcome=Outcome.SUCCESS,
        next_status=RunStatus.SUCCEEDED, at=at(12), owner="node-a",
    )  # fmt: skip
    for finish in ([stale], [stale, replace(stale, run_id="other")]):
        with pytest.raises(StateRefused) as caught:
            store.finish_many(finish)
        assert caught.value.code in ("lease_lost", "unknown_run")
    with pytest.raises(StateRefused) as single:
        store.finish_many([stale])
    assert single.value.code == "lease_lost"
    with pytest.raises(StateRefused) as one:
        store.finish(
            run_id, at(12), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED,
            owner="node-a", attempt=1,
        )  # fmt: skip
    assert one.value.code == "lease_lost"
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.RUNNING and run["lease_owner"] == "node-b"
    assert len(store.events()) == before
    # The same attempt number under the wrong owner is refused too (generation and
    # holder both count), and the holder's own outcome lands.
    with pytest.raises(StateRefused):
        store.finish_many([replace(stale, attempt=2)])
    second_store.finish_many([replace(stale, attempt=2, owner="node-b", at=at(13))])
    assert store.get_run(run_id)["status"] == RunStatus.SUCCEEDED
    assert [a["outcome"] for a in store.attempts(run_id)] == [Outcome.LOST, Outcome.SUCCESS]


def test_a_task_that_may_not_overlap_waits_while_any_process_runs_one(
    store: Store, second_store: Store
) -> None:
    """``busy_tasks`` is what the claiming process runs itself; a run of the task that
    another process holds (another node on a shared state) keeps the task busy too, so
    a queued run behind it waits, on every process, until it ends."""
    first = fire_at(store, "a", 0, overlap="queue_all")
    second = fire_at(store, "a", 1, overlap="queue_all")
    b = fire_at(store, "b", 1)
    assert [r["id"] for r in store.claim(at(2), "node1", 30, 5, set(), set())] == [first, b]
    assert second_store.claim(at(2), "node2", 30, 5, set(), set()) == []
    assert store.claim(at(2), "node1", 30, 5, set(), set()) == []
    store.finish(first, at(3), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED)
    assert [r["id"] for r in second_store.claim(at(3), "node2", 30, 5, set(), set())] == [second]


def test_a_task_that_may_overlap_is_claimed_beside_its_running_runs(
    store: Store, second_store: Store
) -> None:
    ids = [fire_at(store, "a", i, overlap="allow") for i in range(2)]
    assert [r["id"] for r in store.claim(at(2), "node1", 30, 1, set(), {"a"})] == ids[:1]
    assert [r["id"] for r in second_store.claim(at(2), "node2", 30, 5, set(), {"a"})] == ids[1:]


def test_a_claim_limited_to_tasks_takes_runs_of_those_alone(store: Store) -> None:
    """A node on an older config (a rollout) claims none of a task it does not define;
    the run stays queued for a node that does."""
    a = fire_at(store, "a", 0)
    b = fire_at(store, "b", 0)
    assert [r["id"] for r in store.claim(at(1), "old", 30, 5, set(), set(), only_tasks=["a"])] == [
        a
    ]
    assert store.get_run(b)["status"] == RunStatus.QUEUED
    assert [r["id"] for r in store.claim(at(1), "new", 30, 5, set(), set())] == [b]
