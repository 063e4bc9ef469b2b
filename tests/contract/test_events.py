"""Events and publication order: each committed change's events reach ``event_sink`` in
commit order, once, after the change is visible to everyone; a refused request changes
nothing, tells nothing and says why with a stable code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agentd.models import Outcome, Row, RunStatus, StateRefused
from agentd.state.port import StorageError, Store

from .helpers import at, claim_one, fire_at


def test_event_sink_gets_committed_events_in_order(store: Store, second_store: Store) -> None:
    seen: list[Row] = []
    visible: list[bool] = []

    def sink(event: Row) -> None:
        seen.append(event)
        # Another instance (like the CLI) must already see the event: it is committed.
        found = second_store.events(after_id=event["id"] - 1, limit=1)
        visible.append([(e["id"], e["kind"]) for e in found] == [(event["id"], event["kind"])])

    store.event_sink = sink
    running = fire_at(store, "a", 0)
    claim_one(store, at(1))
    queued = fire_at(store, "a", 2, overlap="allow")
    seen.clear()

    new = store.fire("a", at(3), scheduled_for=at(3), overlap="cancel_previous")
    # One transaction, three events: two cancels, then the enqueue; all after commit.
    assert {(e["kind"], e["run_id"]) for e in seen[:2]} == {
        ("cancel_requested", running),
        ("cancel", queued),
    }
    assert (seen[2]["kind"], seen[2]["run_id"]) == ("enqueue", new.run_id)
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert visible and all(visible)
    # Exactly what was stored, nothing more.
    assert seen == store.events(after_id=ids[0] - 1)
    assert store.latest_event_id() == ids[-1]
    assert store.recent_events(3) == seen


def test_failed_operation_emits_nothing(store: Store, events_seen: list[Row]) -> None:
    with pytest.raises(StateRefused):
        store.pause("missing", "x", at(0))
    with pytest.raises(StateRefused):
        store.request_cancel("missing", at(0))
    assert events_seen == []


def _nothing(store: Store) -> str:
    return "r-nope"


def _queued(store: Store) -> str:
    return fire_at(store, "a", 0)


def _quarantined(store: Store) -> str:
    run_id = fire_at(store, "b", 0)
    claim_one(store, at(0))
    store.finish(run_id, at(1), outcome=Outcome.FAILURE, next_status=RunStatus.QUARANTINED)
    return run_id


def _dropped(store: Store) -> str:
    run_id = _quarantined(store)
    store.quarantine_drop(run_id, at(2))
    return run_id


Setup = Callable[[Store], str]
"""Makes the run a refused request names (or names one that does not exist)."""
Request = Callable[[Store, str], Any]
REFUSALS: dict[str, tuple[str, Setup, Request]] = {
    "quarantine_get-unknown": ("not_quarantined", _nothing, lambda s, r: s.quarantine_get(r)),
    "quarantine_get-queued": ("not_quarantined", _queued, lambda s, r: s.quarantine_get(r)),
    "quarantine_release-unknown": (
        "not_quarantined",
        _nothing,
        lambda s, r: s.quarantine_release(r, at(5)),
    ),
    "quarantine_drop-dropped": (
        "not_quarantined",
        _dropped,
        lambda s, r: s.quarantine_drop(r, at(5)),
    ),
    "get_run-unknown": ("unknown_run", _nothing, lambda s, r: s.get_run(r)),
    "finish-unknown": (
        "unknown_run",
        _nothing,
        lambda s, r: s.finish(r, at(5), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED),
    ),
    "request_cancel-unknown": ("unknown_run", _nothing, lambda s, r: s.request_cancel(r, at(5))),
    "request_cancel-ended": ("run_finished", _dropped, lambda s, r: s.request_cancel(r, at(5))),
    "fire-unknown_task": ("unknown_task", _nothing, lambda s, r: s.fire("nope", at(5))),
    "pause-unknown_task": ("unknown_task", _nothing, lambda s, r: s.pause("nope", "x", at(5))),
    "resume-unknown_task": ("unknown_task", _nothing, lambda s, r: s.resume("nope", at(5))),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_request_raises_state_refused_with_a_stable_code(
    store: Store, events_seen: list[Row], case: str
) -> None:
    """The port's errors: a request the state does not allow raises ``StateRefused``
    with the code views map to their answer (a 404, a 409), never a storage error or a
    driver's exception, and it changes nothing and tells nothing."""
    code, setup, request = REFUSALS[case]
    run_id = setup(store)
    runs = store.list_runs(limit=100)
    counts = store.counts()
    latest = store.latest_event_id()
    events_seen.clear()
    with pytest.raises(StateRefused) as info:
        request(store, run_id)
    assert info.value.code == code
    assert not isinstance(info.value, StorageError)
    assert store.list_runs(limit=100) == runs
    assert store.counts() == counts
    assert store.latest_event_id() == latest
    assert events_seen == []
