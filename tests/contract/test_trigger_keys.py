"""A manual trigger's params and idempotency key (``Fire.params``, ``Fire.key_window_s``):
params recorded with the run (decoded on every read, carried by its claim), the same key
answering with the same run within its window and with other params refused
(``key_conflict``), and a key whose window is over freed for a new run."""

from __future__ import annotations

import pytest

from agentd.models import RunStatus
from agentd.state.port import Fire, StateRefused, Store, encode_params

from .helpers import at, claim_one

WINDOW = 3600.0


def trigger(store: Store, seconds: float, params: dict[str, object] | None, key: str) -> str:
    result = store.fire(
        "a",
        at(seconds),
        trigger="manual",
        overlap="allow",
        honour_pause=False,
        params=params,
        key=key,
        key_window_s=WINDOW,
    )
    return result.run_id


def test_params_are_recorded_with_the_run_and_carried_by_its_claim(store: Store) -> None:
    params = {"n": 3, "who": "ops", "deep": {"x": [1, 2.5, True, None]}}
    run_id = trigger(store, 0, params, "a@key:k1")
    assert store.get_run(run_id)["params"] == params
    [listed] = store.list_runs("a")
    assert listed["params"] == params
    [active] = store.active_runs("a")
    assert active["params"] == params
    row = claim_one(store, at(1))
    assert row["id"] == run_id
    assert row["params"] == encode_params(params)  # as stored: the runner decodes it
    # a run without params (a scheduled fire) has none
    other = store.fire("b", at(2), scheduled_for=at(2))
    assert store.get_run(other.run_id)["params"] is None


def test_the_same_key_within_its_window_answers_with_the_same_run(store: Store) -> None:
    params = {"n": 1}
    first = store.fire(
        "a", at(0), trigger="manual", overlap="allow", params=params, key="a@key:k",
        key_window_s=WINDOW,
    )  # fmt: skip
    assert first.created and first.status == RunStatus.QUEUED
    again = store.fire(
        "a", at(WINDOW - 1), trigger="manual", overlap="allow", params={"n": 1},
        key="a@key:k", key_window_s=WINDOW,
    )  # fmt: skip
    assert (again.run_id, again.created, again.reason) == (first.run_id, False, "duplicate")
    assert len(store.list_runs("a")) == 1
    assert [e["kind"] for e in store.events(first.run_id)] == ["enqueue"]


@pytest.mark.parametrize(
    "other",
    [{"n": 2}, {"n": 1.0}, {"n": True}, {"n": 1, "extra": 0}, None],
    ids=["value", "float", "bool", "more", "none"],
)
def test_other_params_under_the_same_key_are_refused(
    store: Store, other: dict[str, object] | None
) -> None:
    run_id = trigger(store, 0, {"n": 1}, "a@key:k")
    with pytest.raises(StateRefused) as info:
        trigger(store, 10, other, "a@key:k")
    assert info.value.code == "idempotency_conflict"
    assert run_id in str(info.value)
    assert [r["id"] for r in store.list_runs("a")] == [run_id]
    # in a batch: the result says so, and nothing is made
    [result] = store.fire_many(
        [Fire("a", None, "manual", "allow", 10, "a@key:k", False, other, WINDOW)], at(11)
    )
    assert (result.run_id, result.created, result.reason) == (run_id, False, "key_conflict")


def test_after_its_window_a_key_makes_a_new_run_and_the_old_run_keeps_its_history(
    store: Store,
) -> None:
    old = trigger(store, 0, {"n": 1}, "a@key:k")
    new = store.fire(
        "a", at(WINDOW), trigger="manual", overlap="allow", params={"n": 2}, key="a@key:k",
        key_window_s=WINDOW,
    )  # fmt: skip
    assert new.created and new.run_id != old
    assert store.get_run(new.run_id)["idempotency_key"] == "a@key:k"
    kept = store.get_run(old)
    assert kept["params"] == {"n": 1} and kept["status"] == RunStatus.QUEUED
    assert kept["idempotency_key"] == f"a@key:k retired:{old}"
    # the key now answers with the new run
    again = trigger(store, WINDOW + 1, {"n": 2}, "a@key:k")
    assert again == new.run_id


def test_a_key_without_a_window_holds_for_ever(store: Store) -> None:
    first = store.fire("a", at(0), trigger="manual", overlap="allow", key="a@key:forever")
    later = store.fire("a", at(10**7), trigger="manual", overlap="allow", key="a@key:forever")
    assert (later.run_id, later.reason) == (first.run_id, "duplicate")


def test_keys_are_per_task_as_the_caller_names_them(store: Store) -> None:
    a = trigger(store, 0, None, "a@key:same")
    b = store.fire(
        "b", at(1), trigger="manual", overlap="allow", key="b@key:same", key_window_s=WINDOW
    )
    assert b.created and b.run_id != a
