"""The durable side of alerts (``AlertsPort``) on every engine: alert state and its key
prefixes, the event cursor, raised alerts and their outbox of deliveries (once each,
across a restart), and the running attempts the checks look at."""

from __future__ import annotations

import asyncio
import re
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

from agentd.alerts import Alert
from agentd.clock import ManualClock
from agentd.config import parse_config
from agentd.models import EventKind
from agentd.outbox import Outbox
from agentd.state.port import NewAlert, Store, atomically

from .helpers import T0, States


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


def test_the_event_cursor_and_kind_filter_survive_a_restart(states: States) -> None:
    store = states.open()
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
    states.close(store)
    store = states.open()
    cursor = store.event_cursor("reader")
    assert cursor is not None
    assert [e["kind"] for e in store.events_of_kinds(cursor, top, {"quarantine"}, 10)] == [
        "quarantine"
    ]


def test_alerts_deliveries_cooldown_redelivery_and_give_up(store: Store) -> None:
    alert_id = store.record_alert(T0, NewAlert("deadman", "k", "t", None, None, "late", {"a": 1}))
    record = store.alert(alert_id)
    assert record is not None and record["data"] == {"a": 1} and record["summary"] == "late"
    assert store.delivery_counts() == {}
    first = store.enqueue_delivery(T0, "hook", "k", {"id": alert_id}, alert_id)
    second = store.enqueue_delivery(T0, "pager", "k", {"id": alert_id}, alert_id)
    assert store.delivery_counts() == {("hook", "pending"): 1, ("pager", "pending"): 1}
    assert store.mark_delivered(second, T0)
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
    assert store.delivery_counts() == {("hook", "failed"): 1}  # delivered rows not counted


def test_a_delivery_is_made_once_across_a_restart(states: States, tmp_path: Path) -> None:
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
    clock = ManualClock(T0)
    before = states.open()
    box = Outbox(before, config, clock)
    box.raise_alert(Alert("deadman", "k1", "one is late", "t"), clock.now())
    assert asyncio.run(box.deliver_due(None)) == 1  # type: ignore[arg-type]
    box.raise_alert(Alert("run_quarantined", "k2", "two", "t"), clock.now())
    states.close(before)  # the daemon stops before delivering the second
    after = states.open()
    box = Outbox(after, config, clock)
    assert asyncio.run(box.deliver_due(None)) == 1  # type: ignore[arg-type]
    assert asyncio.run(box.deliver_due(None)) == 0  # type: ignore[arg-type]
    assert after.next_delivery_at() is None
    lines = out.read_text().splitlines()
    assert [line.count('"kind"') for line in lines if line] == [1, 1]
    assert ['"one is late"' in lines[0], '"two"' in lines[1]] == [True, True]


def test_running_attempts_are_the_running_runs_with_their_attempts_start(store: Store) -> None:
    run = store.fire("a", T0, trigger="manual")
    assert store.running_attempts() == []
    store.claim(T0, "me", 30, 1, set(), set())
    store.mark_started(run.run_id, "a", T0, "/ws")
    [running] = store.running_attempts()
    assert (running["id"], running["task_id"], running["attempt"]) == (run.run_id, "a", 1)
    assert running["attempt_started"] is not None


def test_the_instance_id_is_made_once_per_state_and_differs_between_states(
    states: States,
) -> None:
    first = states.open("one")
    made = first.instance_id()
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert first.instance_id() == made
    beside = states.open("one")  # another process on the same state agrees
    assert beside.instance_id() == made
    states.close(first)
    states.close(beside)
    assert states.open("one").instance_id() == made  # kept across a restart
    other = states.open("two")  # a state recreated elsewhere: alert ids begin again
    assert other.instance_id() != made
