"""TEST-ONLY PLUMBING: the PostgreSQL ledger and alerts mixins
(``agentd.state.postgres.ledger`` / ``alerts``) on a real PostgreSQL 15, through a
minimal stand-in for ``PostgresStore`` (``TestOnlyPgPlumbing``: a connection, ``tx``,
``_event``, ``_one``, ``_all``, the schema from ``agentd.state.schema``). Not an engine:
no units of work, no event sink. For while the real engine is not merged; the contract
suite (``tests/contract``) is the test of record once it is."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy
from psycopg.rows import dict_row

from agentd.budget import EPS, Need, Scope, fits, window_at
from agentd.clock import to_iso
from agentd.models import EventKind, Row
from agentd.state.port import NewAlert, Reservation, ScopeRefused, Usage
from agentd.state.postgres.alerts import AlertStatements
from agentd.state.postgres.ledger import LedgerStatements
from agentd.state.schema import metadata

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY_START, DAY_END = window_at("day", T0, "UTC")
TASK_DAY = Scope("task:t:day", "t:day", "t", "day", 1.0, None, DAY_START, DAY_END)


class TestOnlyPgPlumbing(LedgerStatements, AlertStatements):
    """The plumbing the mixins use, and nothing else (test-only)."""

    __test__ = False

    def __init__(self, url: str) -> None:
        self._conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)

    @property
    def conn(self) -> psycopg.Connection[dict[str, Any]]:
        return self._conn

    @contextlib.contextmanager
    def tx(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        with self._conn.transaction():
            yield self._conn

    def _event(
        self,
        now: datetime | str,
        kind: EventKind,
        task_id: str | None = None,
        run_id: str | None = None,
        **data: Any,
    ) -> None:
        ts = now if isinstance(now, str) else to_iso(now)
        self._conn.execute(
            "INSERT INTO events(ts, kind, task_id, run_id, data) VALUES (%s,%s,%s,%s,%s)",
            (ts, str(kind), task_id, run_id, json.dumps(data, sort_keys=True)),
        )

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def events(self) -> list[Row]:
        rows = self._all("SELECT * FROM events ORDER BY id")
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    def close(self) -> None:
        self._conn.close()


@pytest.fixture
def nodes(pg_url: str) -> Iterator[list[TestOnlyPgPlumbing]]:
    engine = sqlalchemy.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    metadata.create_all(engine)
    engine.dispose()
    opened = [TestOnlyPgPlumbing(pg_url) for _ in range(3)]
    yield opened
    for node in opened:
        node.close()


def call(run_id: str, usd: float, tokens: int = 1, task: str = "t") -> Reservation:
    return Reservation(run_id, task, "p", "m", None, tokens, usd)


def test_ledger_verbs(nodes: list[TestOnlyPgPlumbing]) -> None:
    store = nodes[0]
    need = Need(1, 0, 0.3)
    first = store.reserve_budget(T0, call("r1", 0.3, 300), [TASK_DAY], lambda s, u, t: True)
    assert isinstance(first, int)
    assert store.spend_in(TASK_DAY) == {"usd": pytest.approx(0.3), "tokens": 300}
    entry = store.commit_spend(T0, first, Usage(40, 10, 0.05, "200", 0.2, False))
    assert entry is not None and entry["state"] == "committed" and entry["cost_usd"] == 0.05
    assert store.window_usage(TASK_DAY)["calls"] == 1
    assert store.run_usage("r1")["cost_usd"] == 0.05
    assert store.commit_spend(T0, 999, Usage(1, 1, 0.1, "200", None, False)) is None
    refused = store.reserve_budget(
        T0, call("r2", 0.99), [TASK_DAY], lambda s, u, t: fits(s, u, t, Need(1, 0, 0.99))
    )
    assert isinstance(refused, ScopeRefused)
    assert fits(TASK_DAY, 0, 0, need)
    stale = store.reserve_budget(T0, call("r3", 0.15, 150), [], lambda s, u, t: True)
    assert isinstance(stale, int)
    assert store.charge_stale_reservations(T0) == 1
    assert nodes[1].charge_stale_reservations(T0) == 0
    assert store.record_budget_alarm(T0, TASK_DAY, 0.5, 0.5)
    assert not nodes[1].record_budget_alarm(T0, TASK_DAY, 0.5, 0.6)
    assert store.record_budget_alarm(T0, TASK_DAY, 1.0, 1.0)
    assert store.full_alarm_limit(TASK_DAY) == 1.0
    assert [e["kind"] for e in store.events()] == [
        "llm_call",
        "budget_refused",
        "ledger_settled",
        "budget_alarm",
        "budget_alarm",
    ]


def test_alerts_verbs(nodes: list[TestOnlyPgPlumbing]) -> None:
    store = nodes[0]
    store.set_alert_state("deadman_since:t", "x", T0)
    store.set_alert_state("too_long:run_1:1", "x", T0)
    assert not store.has_alert_state("deadman:", "paused:")
    store.set_alert_state("paused:t", "a", T0)
    store.set_alert_state("paused:t", "b", T0)
    assert store.has_alert_state("deadman:", "paused:") and store.alert_state("paused:t") == "b"
    assert store.alert_state_keys("too_long:") == ["too_long:run_1:1"]
    assert store.clear_alert_state("paused:t") and not store.clear_alert_state("paused:t")
    assert store.event_cursor("reader") is None
    store.move_event_cursor("reader", 5)
    store.move_event_cursor("reader", 7)
    assert nodes[1].event_cursor("reader") == 7
    for kind in (EventKind.PAUSE, EventKind.CLAIM, EventKind.QUARANTINE):
        store._event(T0, kind, "t")
    picked = store.events_of_kinds(0, 100, {"pause", "quarantine"}, 10)
    assert [e["kind"] for e in picked] == ["pause", "quarantine"]
    assert isinstance(picked[0]["data"], dict)
    alert_id = store.record_alert(T0, NewAlert("deadman", "k", "t", None, None, "late", {"a": 1}))
    record = store.alert(alert_id)
    assert record is not None and record["data"] == {"a": 1}
    first = store.enqueue_delivery(T0, "hook", "k", {"id": alert_id}, alert_id)
    assert store.queued_since("hook", "k", T0 - timedelta(seconds=1))
    assert not store.queued_since("hook", "k", T0)
    assert store.pending_deliveries(T0, 10)[0]["payload"] == {"id": alert_id}
    later = T0 + timedelta(seconds=30)
    store.schedule_redelivery(first, 1, "HTTP 500", later)
    assert store.pending_deliveries(T0, 10) == [] and store.next_delivery_at() == later
    assert store.mark_delivered(first, later) and not store.mark_delivered(first, later)
    assert store.next_delivery_at() is None and store.running_attempts() == []


def test_three_nodes_against_one_cap(nodes: list[TestOnlyPgPlumbing]) -> None:
    """The contract suite's three-node test, on the mixins alone: each day, three nodes
    race for a 1.0 cap with 0.4 each; exactly two fit, the spend never passes it."""
    start = threading.Barrier(3)
    errors: list[BaseException] = []
    seen: list[float] = []
    admitted = dict.fromkeys(range(8), 0)
    lock = threading.Lock()

    def day(d: int) -> Scope:
        begin = DAY_START + timedelta(days=d)
        return Scope(
            "global:day", "global:day", None, "day", 1.0, None, begin, begin + timedelta(days=1)
        )

    def admit(scope: Scope, usd: float, tokens: int) -> bool:
        time.sleep(0.005)  # not a wait: widens the race an unserialised engine would lose
        return fits(scope, usd, tokens, Need(1, 0, 0.4))

    def node(index: int, store: TestOnlyPgPlumbing) -> None:
        try:
            for d in range(8):
                cap = day(d)
                start.wait(30)
                now = cap.start + timedelta(hours=1)  # type: ignore[operator]
                entry = store.reserve_budget(now, call(f"n{index}-{d}", 0.4), [cap], admit)
                with lock:
                    seen.append(store.spend_in(cap)["usd"])
                if isinstance(entry, int):
                    store.commit_spend(now, entry, Usage(1, 0, 0.4, "200", 0.0, False))
                    with lock:
                        admitted[d] += 1
        except BaseException as exc:
            start.abort()
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(i, s)) for i, s in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert max(seen) <= 1.0 + EPS, max(seen)
    assert admitted == dict.fromkeys(range(8), 2)
