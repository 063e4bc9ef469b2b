"""Checkpoints and progress: what a run saves of its work, kept across restarts."""

from __future__ import annotations

from agentd.models import Row
from agentd.state.port import Store

from .helpers import States, at, claim_one, events_of_kind, fire_at


def test_checkpoints_keep_the_last_and_survive_reopening(states: States, store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    assert store.load_checkpoint(run_id) is None
    assert store.save_checkpoint(run_id, {"done": ["x"]}, at(1)) == 1
    assert store.save_checkpoint(run_id, {"done": ["x", "y"], "n": 2}, at(2)) == 2
    assert store.load_checkpoint(run_id) == {"done": ["x", "y"], "n": 2}
    assert [e["data"]["seq"] for e in events_of_kind(store, "checkpoint")] == [1, 2]
    states.close(store)

    again = states.open()
    assert again.load_checkpoint(run_id) == {"done": ["x", "y"], "n": 2}
    assert again.save_checkpoint(run_id, [3], at(3)) == 3


def test_progress_is_kept_on_the_run_and_told_as_an_event(
    store: Store, second_store: Store, events_seen: list[Row]
) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0))
    events_seen.clear()
    store.progress(run_id, 3, 10, "three of ten", at(1))
    store.progress(run_id, 4, None, "four, total unknown", at(2))
    run = second_store.get_run(run_id)
    assert (run["progress_done"], run["progress_total"], run["progress_message"]) == (
        4,
        None,
        "four, total unknown",
    )
    assert [(e["kind"], e["task_id"], e["run_id"], e["data"]) for e in events_seen] == [
        ("progress", "a", run_id, {"done": 3, "total": 10, "message": "three of ten"}),
        ("progress", "a", run_id, {"done": 4, "total": None, "message": "four, total unknown"}),
    ]
