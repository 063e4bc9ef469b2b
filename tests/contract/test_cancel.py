"""Cancel: a queued run ends at once, a running one is flagged for the runner that owns
it, an ended or unknown one is refused."""

from __future__ import annotations

import pytest

from agentd.clock import to_iso
from agentd.models import Outcome, RunStatus, StateRefused
from agentd.state.port import Store

from .helpers import at, claim_one, fire_at, kinds, run_and_finish


def test_cancel_queued_run_is_immediate(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    assert store.request_cancel(run_id, at(1)) == RunStatus.CANCELLED
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.CANCELLED
    assert run["finished_at"] == to_iso(at(1))
    assert store.claim(at(2), "w1", 30, 5, set(), set()) == []


def test_cancel_running_run_is_flagged_for_its_owner(store: Store) -> None:
    run_id = fire_at(store, "a", 0)
    claim_one(store, at(0), owner="w1")
    assert store.cancel_requests("w1") == []
    assert store.request_cancel(run_id, at(1)) == RunStatus.RUNNING
    run = store.get_run(run_id)
    assert run["status"] == RunStatus.RUNNING
    assert run["cancel_requested"] == 1
    assert store.cancel_requests("w1") == [run_id]
    assert store.cancel_requests("w2") == []
    assert "cancel_requested" in kinds(store, run_id)


def test_cancel_finished_or_unknown_run_is_an_error(store: Store) -> None:
    run_id = run_and_finish(store, "a", 0, Outcome.SUCCESS, RunStatus.SUCCEEDED)
    with pytest.raises(StateRefused) as info:
        store.request_cancel(run_id, at(5))
    assert info.value.code == "run_finished"
    assert store.get_run(run_id)["status"] == RunStatus.SUCCEEDED
    with pytest.raises(StateRefused) as info:
        store.request_cancel("20260301T120000-deadbeef", at(5))
    assert info.value.code == "unknown_run"
