"""The ledger and alerts verbs of the state port (``LedgerPort``, ``AlertsPort``), against
a real SQLite file, through nothing but the port; and the policy above them, without a
database."""

from __future__ import annotations

import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentd.budget import EPS, Need, Scope, fits, window_at
from agentd.clock import ManualClock
from agentd.config import parse_config
from agentd.ledger import Refusal, charge_stale, reserve
from agentd.ledger import spent as ledger_spent
from agentd.models import EventKind
from agentd.outbox import Outbox, retry_delay
from agentd.state.port import Reservation, ScopeRefused, Store, Usage, atomically
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
DAY_START, DAY_END = window_at("day", T0, "UTC")
TASK_DAY = Scope("task:t:day", "t:day", "t", "day", 1.0, None, DAY_START, DAY_END)
GLOBAL_DAY = Scope("global:day", "global:day", None, "day", 2.0, None, DAY_START, DAY_END)
RUN = Scope("run", "run", "t", "run", 0.5, 1000)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    s: Store = SqliteStore(path)
    yield s
    s.close()


def reopen(path: Path) -> Store:
    """Another process's view of the same file (its own connection)."""
    return SqliteStore(path)


def call(run_id: str = "r1", usd: float = 0.1, tokens: int = 100, task: str = "t") -> Reservation:
    return Reservation(run_id, task, "p", "m", None, tokens, usd)


def admit_need(need_usd: float, need_tokens: int = 0) -> Any:
    need = Need(need_tokens, 0, need_usd)
    return lambda scope, usd, tokens: fits(scope, usd, tokens, need)


def kinds(store: Store) -> list[str]:
    return [e["kind"] for e in store.events()]


# ---------------------------------------------------------------- the ledger


def test_spend_counts_reservations_at_worst_case_and_commits_at_cost(store: Store) -> None:
    first = store.reserve_budget(T0, call("r1", 0.3, 300), [TASK_DAY], admit_need(0.3))
    other_task = store.reserve_budget(T0, call("r2", 0.2, 50, task="u"), [], admit_need(0.2))
    assert isinstance(first, int) and isinstance(other_task, int)
    assert store.spend_in(TASK_DAY) == {"usd": pytest.approx(0.3), "tokens": 300}
    assert store.spend_in(GLOBAL_DAY) == {"usd": pytest.approx(0.5), "tokens": 350}
    assert store.spend_in(RUN, "r1")["usd"] == pytest.approx(0.3)
    entry = store.commit_spend(T0, first, Usage(40, 10, 0.05, "200", 0.2, False))
    assert entry is not None and entry["state"] == "committed" and entry["cost_usd"] == 0.05
    assert store.spend_in(TASK_DAY) == {"usd": pytest.approx(0.05), "tokens": 50}
    assert store.window_usage(TASK_DAY) == {
        "calls": 1,
        "input_tokens": 40,
        "output_tokens": 10,
        "spent_usd": pytest.approx(0.05),
    }
    assert store.run_usage("r1") == {
        "calls": 1,
        "input_tokens": 40,
        "output_tokens": 10,
        "cost_usd": 0.05,
    }
    # Outside the window: not counted in it.
    late = store.reserve_budget(DAY_END, call("r3", 0.4), [], admit_need(0.4))
    assert isinstance(late, int) and store.spend_in(TASK_DAY)["usd"] == pytest.approx(0.05)
    [llm_call] = [e for e in store.events() if e["kind"] == "llm_call"]
    assert llm_call["run_id"] == "r1" and llm_call["data"]["cost_usd"] == 0.05


def test_a_refused_reservation_writes_no_row_and_one_event(store: Store) -> None:
    assert isinstance(store.reserve_budget(T0, call("a", 0.9), [TASK_DAY], admit_need(0.9)), int)
    refused = store.reserve_budget(T0, call("b", 0.2), [RUN, TASK_DAY], admit_need(0.2))
    assert isinstance(refused, ScopeRefused)
    assert refused.scope is TASK_DAY and refused.spent_usd == pytest.approx(0.9)
    assert store.run_usage("b")["calls"] == 0
    [event] = [e for e in store.events() if e["kind"] == "budget_refused"]
    assert (event["run_id"], event["data"]["scope"]) == ("b", "t:day")
    assert event["data"]["need_usd"] == 0.2 and event["data"]["spent_usd"] == 0.9


def test_commit_of_an_unknown_entry_writes_nothing(store: Store) -> None:
    before = store.latest_event_id()
    assert store.commit_spend(T0, 999, Usage(1, 1, 0.1, "200", None, False)) is None
    assert store.latest_event_id() == before and store.ledger_entry(999) is None


def test_two_stores_racing_for_the_last_headroom_the_second_is_refused(path: Path) -> None:
    """Two processes on one file, each reserving 0.6 of a 1.0 window. The first holds
    the budget lock while its admission runs; the second's reservation, started in that
    moment, may not read the window's spend until the first has committed, so it sees
    the first's reservation and is refused."""
    a, b = reopen(path), reopen(path)
    try:
        b_admitted_while_a_held_the_lock = threading.Event()
        b_result: list[int | ScopeRefused] = []
        b_started = threading.Event()
        a_holds = threading.Event()

        def b_admit(scope: Scope, usd: float, tokens: int) -> bool:
            if a_holds.is_set():
                b_admitted_while_a_held_the_lock.set()
            return fits(scope, usd, tokens, Need(1, 0, 0.6))

        def reserve_b() -> None:
            b_started.set()
            b_result.append(b.reserve_budget(T0, call("b", 0.6, 1), [TASK_DAY], b_admit))

        racer = threading.Thread(target=reserve_b)

        def a_admit(scope: Scope, usd: float, tokens: int) -> bool:
            a_holds.set()
            racer.start()
            assert b_started.wait(10)
            # B is now blocked on the lock A holds: were it not, it would have read
            # the window (still empty) and admitted itself by now.
            b_admitted_while_a_held_the_lock.wait(0.5)
            return fits(scope, usd, tokens, Need(1, 0, 0.6))

        first = a.reserve_budget(T0, call("a", 0.6, 1), [TASK_DAY], a_admit)
        a_holds.clear()
        racer.join(30)
        assert not racer.is_alive()
        assert isinstance(first, int)
        assert not b_admitted_while_a_held_the_lock.is_set()
        [second] = b_result
        assert isinstance(second, ScopeRefused) and second.spent_usd == pytest.approx(0.6)
        assert a.spend_in(TASK_DAY)["usd"] == pytest.approx(0.6)  # one reservation, not two
        # And plainly, one after the other, through the ledger's policy.
        again = reserve(
            b, T0, run_id="c", task_id="t", provider="p", model="m", item=None,
            need=Need(1, 0, 0.6), scopes=[TASK_DAY],
        )  # fmt: skip
        assert isinstance(again, Refusal) and again.scope.key == "task:t:day"
    finally:
        a.close()
        b.close()


def test_a_stale_reservation_is_charged_at_worst_case_once_and_only_once(path: Path) -> None:
    dead = reopen(path)
    entry = dead.reserve_budget(T0, call("r", 0.15, 150), [TASK_DAY], admit_need(0.15))
    assert isinstance(entry, int)
    dead.close()  # the process died mid-call: the reservation was never committed

    first, second = reopen(path), reopen(path)
    try:
        assert first.spend_in(TASK_DAY) == {"usd": pytest.approx(0.15), "tokens": 150}
        assert charge_stale(first, T0) == 1
        assert first.charge_stale_reservations(T0) == 0  # again: nothing left to charge
        assert second.charge_stale_reservations(T0) == 0  # nor from another process
        row = second.ledger_entry(entry)
        assert row is not None
        assert (row["state"], row["status"], row["usage_missing"]) == ("committed", "lost", 1)
        assert (row["cost_usd"], row["input_tokens"], row["output_tokens"]) == (0.15, 150, 0)
        # Charged once: the window's spend is the worst case, not twice it.
        assert second.spend_in(TASK_DAY) == {"usd": pytest.approx(0.15), "tokens": 150}
        settled = [e for e in second.events() if e["kind"] == "ledger_settled"]
        assert [e["data"]["reservations"] for e in settled] == [1]
    finally:
        first.close()
        second.close()
    after_restart = reopen(path)
    try:
        assert after_restart.charge_stale_reservations(T0) == 0
        assert after_restart.spend_in(TASK_DAY)["usd"] == pytest.approx(0.15)
    finally:
        after_restart.close()


def test_a_budget_alarm_is_recorded_once_per_window_across_restarts(path: Path) -> None:
    store = reopen(path)
    try:
        assert store.full_alarm_limit(TASK_DAY) is None
        assert store.record_budget_alarm(T0, TASK_DAY, 0.5, 0.5)
        assert not store.record_budget_alarm(T0, TASK_DAY, 0.5, 0.6)
        assert store.full_alarm_limit(TASK_DAY) is None  # 50 % does not fill it
        assert store.record_budget_alarm(T0, TASK_DAY, 1.0, 1.0)
    finally:
        store.close()
    store = reopen(path)
    try:
        assert not store.record_budget_alarm(T0, TASK_DAY, 1.0, 1.0)
        assert store.full_alarm_limit(TASK_DAY) == 1.0
        tomorrow = Scope("task:t:day", "t:day", "t", "day", 1.0, None, DAY_END, DAY_END)
        assert store.full_alarm_limit(tomorrow) is None
        assert store.record_budget_alarm(DAY_END, tomorrow, 0.5, 0.5)  # a new window
        alarms = [e["data"]["threshold_pct"] for e in store.events() if e["kind"] == "budget_alarm"]
        assert alarms == [50, 100, 50]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("spent", "need_usd", "admitted"),
    [
        ((0.1, 0.2), 0.7, True),  # 0.1 + 0.2 + 0.7 fills 1.0 exactly: it fits
        ((0.1, 0.2), 0.7 + 2 * EPS, False),
        ((), 1.0, True),
        ((1.0,), 0.0, True),
        ((1.0,), 0.01, False),
    ],
)
def test_admission_is_budget_fits(
    store: Store, spent: tuple[float, ...], need_usd: float, admitted: bool
) -> None:
    """The ledger admits exactly what ``budget.fits`` admits, and a window that refuses
    a call is marked full (so its scheduled fires are skipped)."""
    for i, usd in enumerate(spent):
        assert isinstance(store.reserve_budget(T0, call(f"x{i}", usd), [], admit_need(0)), int)
    need = Need(1, 0, need_usd)
    usd, tokens = ledger_spent(store, TASK_DAY)
    assert fits(TASK_DAY, usd, tokens, need) is admitted
    result = reserve(
        store, T0, run_id="y", task_id="t", provider="p", model="m", item=None, need=need,
        scopes=[TASK_DAY],
    )  # fmt: skip
    assert isinstance(result, int) is admitted
    assert (store.full_alarm_limit(TASK_DAY) is None) is admitted


def test_a_unit_of_work_that_raises_leaves_no_reservation(store: Store) -> None:
    with pytest.raises(RuntimeError), atomically(store):
        store.reserve_budget(T0, call("r", 0.2), [TASK_DAY], admit_need(0.2))
        raise RuntimeError("the caller failed after reserving")
    assert store.spend_in(TASK_DAY)["usd"] == 0.0 and "budget_refused" not in kinds(store)


# ---------------------------------------------------------------- alerts and the outbox


def test_alert_state_keys_and_prefixes(store: Store) -> None:
    store.set_alert_state("deadman_since:t", "x", T0)
    store.set_alert_state("too_long:run_1:1", "x", T0)
    assert not store.has_alert_state("deadman:", "paused:")  # deadman_since: is not deadman:
    store.set_alert_state("paused:t", "a", T0)
    store.set_alert_state("paused:t", "b", T0)  # replaces
    assert store.has_alert_state("deadman:", "paused:") and store.alert_state("paused:t") == "b"
    assert store.alert_state_keys("too_long:") == ["too_long:run_1:1"]
    assert store.clear_alert_state("paused:t") and not store.clear_alert_state("paused:t")
    assert store.alert_state("paused:t") is None and not store.has_alert_state()


def test_the_event_cursor_and_kind_filter_survive_a_restart(path: Path) -> None:
    store = reopen(path)
    try:
        assert store.event_cursor("reader") is None
        with atomically(store):
            for kind in (EventKind.PAUSE, EventKind.CLAIM, EventKind.QUARANTINE, EventKind.CLAIM):
                store.emit(T0, kind, "t")
        top = store.latest_event_id()
        picked = store.events_of_kinds(0, top, {"pause", "quarantine"}, 10)
        assert [e["kind"] for e in picked] == ["pause", "quarantine"]
        assert isinstance(picked[0]["data"], dict)
        assert [e["kind"] for e in store.events_of_kinds(0, top, {"pause", "quarantine"}, 1)] == [
            "pause"
        ]
        store.move_event_cursor("reader", picked[0]["id"])
    finally:
        store.close()
    store = reopen(path)
    try:
        cursor = store.event_cursor("reader")
        assert cursor is not None
        assert [e["kind"] for e in store.events_of_kinds(cursor, top, {"quarantine"}, 10)] == [
            "quarantine"
        ]
    finally:
        store.close()


def test_alerts_deliveries_cooldown_redelivery_and_give_up(store: Store) -> None:
    from agentd.state.port import NewAlert

    alert_id = store.record_alert(T0, NewAlert("deadman", "k", "t", None, None, "late", {"a": 1}))
    record = store.alert(alert_id)
    assert record is not None and record["data"] == {"a": 1} and record["summary"] == "late"
    first = store.enqueue_delivery(T0, "hook", "k", {"id": alert_id}, alert_id)
    assert store.queued_since("hook", "k", T0 - timedelta(seconds=1))
    assert not store.queued_since("hook", "k", T0)  # not after its own creation
    assert not store.queued_since("other", "k", T0 - timedelta(seconds=1))
    assert [d["id"] for d in store.pending_deliveries(T0, 10)] == [first]
    assert store.pending_deliveries(T0, 10)[0]["payload"] == {"id": alert_id}
    later = T0 + timedelta(seconds=30)
    store.schedule_redelivery(first, 1, "HTTP 500", later)
    assert store.pending_deliveries(T0, 10) == [] and store.next_delivery_at() == later
    store.give_up_delivery(first, 2, "HTTP 502")
    row = store.delivery(first)
    assert row is not None and (row["status"], row["attempts"], row["last_error"]) == (
        "failed",
        2,
        "HTTP 502",
    )
    assert store.next_delivery_at() is None and not store.mark_delivered(first, later)


def test_a_delivery_is_made_once_across_a_restart(path: Path, tmp_path: Path) -> None:
    """A real command channel appends each alert it is given to a file: one alert, one
    line, however often the daemon restarts and delivers again; a delivery that was
    pending at the stop is made after it."""
    out = tmp_path / "delivered.jsonl"
    script = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    config = parse_config(
        textwrap.dedent(
            f"""
            alerts:
              channels:
                pager: {{command: {{argv: [{sys.executable!r}, -c, {script!r}]}}}}
              rules:
                - {{events: [deadman, run_quarantined], channels: [pager]}}
            tasks:
              t: {{schedule: {{manual: true}}, command: {{shell: "true"}}}}
            """
        ),
        "x.yaml",
        {},
    )
    import asyncio

    from agentd.alerts import Alert

    clock = ManualClock(T0)
    before = reopen(path)
    try:
        box = Outbox(before, config, clock)
        box.raise_alert(Alert("deadman", "k1", "one is late", "t"), clock.now())
        assert asyncio.run(box.deliver_due(None)) == 1  # type: ignore[arg-type]
        box.raise_alert(Alert("run_quarantined", "k2", "two", "t"), clock.now())
        # The daemon stops before delivering the second.
    finally:
        before.close()
    after = reopen(path)
    try:
        box = Outbox(after, config, clock)
        assert asyncio.run(box.deliver_due(None)) == 1  # type: ignore[arg-type]
        assert asyncio.run(box.deliver_due(None)) == 0  # type: ignore[arg-type]
        assert after.next_delivery_at() is None
    finally:
        after.close()
    lines = out.read_text().splitlines()
    assert [line.count('"kind"') for line in lines if line] == [1, 1]
    assert ['"one is late"' in lines[0], '"two"' in lines[1]] == [True, True]


def test_running_attempts_are_the_running_runs_with_their_attempts_start(store: Store) -> None:
    store.sync_tasks({"t": ("f", "command")}, T0)
    run = store.fire("t", T0, trigger="manual")
    assert store.running_attempts() == []
    store.claim(T0, "me", 30, 1, set(), set())
    store.mark_started(run.run_id, "t", T0, "/ws")
    [running] = store.running_attempts()
    assert (running["id"], running["task_id"], running["attempt"]) == (run.run_id, "t", 1)
    assert running["attempt_started"] is not None


# ---------------------------------------------------------------- policy, no database


def test_retry_delay_doubles_from_backoff_up_to_its_cap_then_gives_up() -> None:
    assert [retry_delay(n, retries=4, backoff=30, max_backoff=100) for n in range(1, 6)] == [
        30,
        60,
        100,
        100,
        None,
    ]
    assert retry_delay(1, retries=0, backoff=30, max_backoff=100) is None
