"""Alerts on a real state DB with a stepped clock: events become alerts once, cooldowns
hold, deliveries retry, webhook signatures verify against a real local HTTP server,
the command channel gets the JSON on stdin, the dead man's switch fires and recovers,
pings follow a run."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from agentd.alerts import SIGNATURE_HEADER, deadman_deadline, deadman_late, verify
from agentd.clock import ManualClock
from agentd.config import Config, ExpectConfig, parse_config
from agentd.metrics import Metrics
from agentd.models import Outcome, RunStatus
from agentd.outbox import Outbox, retry_delay
from agentd.oversight import CHECK_EVERY_S, PROCESS_EVERY_S, Oversight
from agentd.state.sqlite import backup, statedir
from agentd.state.sqlite.engine import SqliteStore

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from fake_llm import serve

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "whsec-test-0123456789"


# ---------------------------------------------------------------- pure parts


def test_deadman_deadline_is_period_plus_grace_after_the_last_success() -> None:
    expect = ExpectConfig(every=86400, grace=3600)
    last = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    since = datetime(2026, 2, 1, tzinfo=UTC)
    assert deadman_deadline(last, since, expect) == datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
    assert deadman_late(last, since, expect, datetime(2026, 3, 2, 3, 0, tzinfo=UTC)) is None
    late = deadman_late(last, since, expect, datetime(2026, 3, 2, 3, 0, 1, tzinfo=UTC))
    assert late == datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
    # Never succeeded: counted from when monitoring began.
    assert deadman_deadline(None, since, expect) == datetime(2026, 2, 2, 1, 0, tzinfo=UTC)
    # A success before monitoring began (an old run) does not make the task late at once.
    old = datetime(2026, 1, 1, tzinfo=UTC)
    assert deadman_deadline(old, since, expect) == deadman_deadline(None, since, expect)


def test_retry_delay_doubles_from_backoff_up_to_its_cap_then_gives_up() -> None:
    assert [retry_delay(n, retries=4, backoff=30, max_backoff=100) for n in range(1, 6)] == [
        30,
        60,
        100,
        100,
        None,
    ]
    assert retry_delay(1, retries=0, backoff=30, max_backoff=100) is None


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"kind":"deadman"}'
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert verify(body, SECRET, expected)
    assert not verify(body + b" ", SECRET, expected)
    assert not verify(body, "other", expected)


# ---------------------------------------------------------------- a receiver


class Receiver:
    """A local webhook endpoint: records each request; answers from ``statuses``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(b) for p, _, b in self.requests if p == "/hook"]


def config_for(url: str, extra_tasks: str = "", rules: str = "") -> Config:
    text = textwrap.dedent(
        f"""
        alerts:
          cooldown: 1h
          channels:
            hook:
              webhook: {{url: "{url}/hook", secret_env: AGENTD_TEST_HOOK_SECRET, timeout: 5s}}
              retries: 2
              backoff: 30s
          rules:
            - {{events: ["*"], channels: [hook]}}
        {rules}
        tasks:
          t:
            schedule: {{manual: true}}
            command: {{shell: "true"}}
            pause_after_failures: 2
        """
    ) + textwrap.indent(textwrap.dedent(extra_tasks), "  ")
    return parse_config(text, "alerts-test.yaml", {})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def quarantine(store: SqliteStore, clock: ManualClock, task: str = "t") -> str:
    run = store.fire(task, clock.now(), trigger="manual", overlap="allow", honour_pause=False)
    store.claim(clock.now(), "me", 30, 1, set(), {task})
    store.finish(
        run.run_id,
        clock.now(),
        outcome=Outcome.FAILURE,
        next_status=RunStatus.QUARANTINED,
        error="HTTP 401: Incorrect API key",
        pause_after_failures=2,
    )
    return run.run_id


def succeed(store: SqliteStore, clock: ManualClock, task: str = "t") -> str:
    run = store.fire(task, clock.now(), trigger="manual", overlap="allow", honour_pause=False)
    store.claim(clock.now(), "me", 30, 1, set(), {task})
    store.finish(
        run.run_id, clock.now(), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED,
        duration_s=0.1,
    )  # fmt: skip
    return run.run_id


def outbox_rows(store: SqliteStore) -> list[dict[str, Any]]:
    return [dict(r) for r in store.conn.execute("SELECT * FROM outbox ORDER BY id")]


async def deliver(box: Outbox) -> None:
    async with httpx.AsyncClient() as client:
        await box.deliver_due(client)


def test_quarantine_alert_is_signed_delivered_once_and_respects_cooldown(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTD_TEST_HOOK_SECRET", SECRET)
    receiver = Receiver()

    async def main() -> list[dict[str, Any]]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        async with serve(app) as url:
            clock = ManualClock(T0)
            config = config_for(url)
            store.sync_tasks({"t": ("f", "command")}, clock.now())
            box = Outbox(store, config, clock)
            assert box.process(clock.now()) == 0  # the first pass only sets the cursor
            run_id = quarantine(store, clock)
            box.process(clock.now())
            box.process(clock.now())  # nothing new: no second alert
            await deliver(box)
            await deliver(box)  # delivered rows are not sent again
            clock.advance(60)
            quarantine(store, clock)  # same task within the cooldown, and now paused
            box.process(clock.now())
            await deliver(box)
            clock.advance(3600)
            quarantine(store, clock)  # after the cooldown: alerts again
            box.process(clock.now())
            await deliver(box)
            assert run_id
        return outbox_rows(store)

    rows = run(main)
    bodies = receiver.bodies()
    assert [b["kind"] for b in bodies] == ["run_quarantined", "task_paused", "run_quarantined"]
    first = bodies[0]
    assert first["task"] == "t" and "HTTP 401: Incorrect API key" in first["summary"]
    for _, headers, body in receiver.requests:
        assert verify(body, SECRET, headers[SIGNATURE_HEADER])  # what a receiver checks
        assert headers["X-Agentd-Delivery"].endswith("-hook")
    assert all(r["status"] == "delivered" for r in rows)
    alerts = [dict(r) for r in store.conn.execute("SELECT kind FROM alerts ORDER BY id")]
    # Three quarantines and a pause were raised; the cooldown held one quarantine back.
    assert [a["kind"] for a in alerts] == [
        "run_quarantined",
        "run_quarantined",
        "task_paused",
        "run_quarantined",
    ]


def test_failed_deliveries_retry_with_backoff_then_give_up(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTD_TEST_HOOK_SECRET", SECRET)
    receiver = Receiver()
    receiver.statuses = [500, 503, 502, 500]

    async def main() -> list[list[dict[str, Any]]]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        snapshots = []
        async with serve(app) as url:
            clock = ManualClock(T0)
            store.sync_tasks({"t": ("f", "command")}, clock.now())
            box = Outbox(store, config_for(url), clock)
            box.process(clock.now())
            quarantine(store, clock)
            box.process(clock.now())
            for wait in (0, 10, 20, 40, 80):  # backoff 30s, then 60s
                clock.advance(wait)
                await deliver(box)
                snapshots.append(outbox_rows(store))
        return snapshots

    snaps = run(main)
    assert [(s[0]["status"], s[0]["attempts"]) for s in snaps] == [
        ("pending", 1),
        ("pending", 1),  # 10 s later: not due yet (30 s backoff)
        ("pending", 2),
        ("pending", 2),  # 40 s later: not due yet (60 s backoff)
        ("failed", 3),  # retries: 2 -> three attempts in all
    ]
    assert snaps[-1][0]["last_error"] == "webhook answered HTTP 502"
    assert len(receiver.requests) == 3


def test_delivery_ids_stay_across_retries_and_never_repeat_across_recreated_or_restored_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that drops what it has seen by ``X-Agentd-Delivery`` gets every alert:
    the id is the same for each attempt of one delivery, and new for an alert of a
    recreated state DB, and of one restored from a backup (whose alert ids begin again
    where the backup was taken), though their alert ids are the same."""
    monkeypatch.setenv("AGENTD_TEST_HOOK_SECRET", SECRET)
    receiver = Receiver()
    state_dir = tmp_path / "state"
    db = statedir.paths(state_dir)[0]

    async def alert_once(url: str, clock: ManualClock, path: Path, fail_first: bool) -> None:
        state = SqliteStore(path)
        try:
            state.sync_tasks({"t": ("f", "command")}, clock.now())
            box = Outbox(state, config_for(url), clock)
            box.process(clock.now())
            receiver.statuses = [500] if fail_first else []
            quarantine(state, clock)
            box.process(clock.now())
            await deliver(box)
            clock.advance(31)  # past the first backoff (30 s)
            await deliver(box)
            assert [r["status"] for r in outbox_rows(state)][-1] == "delivered"
        finally:
            state.close()

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        async with serve(app) as url:
            clock = ManualClock(T0)
            state_dir.mkdir()
            await alert_once(url, clock, db, fail_first=True)  # alert 1, sent twice
            config = parse_config(
                f"daemon: {{state_dir: {state_dir}}}\ntasks: {{}}\n", "backup.yaml", {}
            )
            backup.backup(config, tmp_path / "backup")  # holds alert 1
            clock.advance(7200)  # past the cooldown
            await alert_once(url, clock, db, fail_first=False)  # alert 2
            backup.restore(config, tmp_path / "backup")
            clock.advance(7200)
            await alert_once(url, clock, db, fail_first=False)  # alert 2 again, restored
            await alert_once(url, clock, tmp_path / "other.sqlite", fail_first=False)  # 1

    run(main)
    ids = [h["X-Agentd-Delivery"] for p, h, _ in receiver.requests if p == "/hook"]
    # The second quarantine in a row pauses the task: a task_paused alert (id 3) too.
    assert [b["id"] for b in receiver.bodies()] == [1, 1, 2, 3, 2, 3, 1]  # ids repeat
    assert ids[0] == ids[1]  # one delivery, two attempts
    assert len(set(ids)) == len(ids) - 1, ids  # every other delivery has an id of its own
    assert all(re.fullmatch(r"[0-9a-f]{32}-[123]-hook", i) for i in ids), ids


def test_missing_webhook_secret_is_a_delivery_failure_not_an_unsigned_post(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTD_TEST_HOOK_SECRET", raising=False)
    receiver = Receiver()

    async def main() -> list[dict[str, Any]]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        async with serve(app) as url:
            clock = ManualClock(T0)
            store.sync_tasks({"t": ("f", "command")}, clock.now())
            box = Outbox(store, config_for(url), clock)
            box.process(clock.now())
            quarantine(store, clock)
            box.process(clock.now())
            await deliver(box)
        return outbox_rows(store)

    [row] = run(main)
    assert receiver.requests == []
    assert (
        row["status"] == "pending"
        and "AGENTD_TEST_HOOK_SECRET is unset or empty" in row["last_error"]
    )


def test_command_channel_gets_the_alert_as_json_on_stdin(
    store: SqliteStore, tmp_path: Path
) -> None:
    out = tmp_path / "alert.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    config = parse_config(
        textwrap.dedent(
            f"""
            alerts:
              channels:
                pager: {{command: {{argv: [{sys.executable!r}, -c, {script!r}]}}}}
                journal: {{log: {{level: error}}}}
              rules:
                - {{events: [run_quarantined], channels: [pager, journal]}}
            tasks:
              t: {{schedule: {{manual: true}}, command: {{shell: "true"}}}}
            """
        ),
        "x.yaml",
        {},
    )

    async def main() -> list[dict[str, Any]]:
        clock = ManualClock(T0)
        store.sync_tasks({"t": ("f", "command")}, clock.now())
        box = Outbox(store, config, clock)
        box.process(clock.now())
        quarantine(store, clock)
        box.process(clock.now())
        await deliver(box)
        return outbox_rows(store)

    rows = run(main)
    assert [(r["channel"], r["status"]) for r in rows] == [
        ("pager", "delivered"),
        ("journal", "delivered"),
    ]
    alert = json.loads(out.read_text())
    assert alert["kind"] == "run_quarantined" and alert["task"] == "t"


DAILY_WATCHED = """
daily:
  schedule: {cron: "0 3 * * *"}
  command: {shell: "true"}
  expect: {every: 1d, grace: 1h}
"""


def test_dead_man_fires_once_when_late_and_recovers_on_the_next_success(store: SqliteStore) -> None:
    config = config_for("http://127.0.0.1:9", DAILY_WATCHED)
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command"), "daily": ("g", "command")}, clock.now())
    box = Outbox(store, config, clock)
    box.process(clock.now())

    def step(seconds: float) -> list[str]:
        clock.advance(seconds)
        box.check(clock.now(), {r["id"]: r for r in store.task_rows()}, [])
        box.process(clock.now())
        box.process(clock.now())
        return [r[0] for r in store.conn.execute("SELECT kind FROM alerts ORDER BY id")]

    assert step(0) == []  # monitoring begins now
    assert step(25 * 3600) == []  # exactly at the deadline: not late yet
    assert step(1) == ["deadman"]
    assert step(3600) == ["deadman"]  # the same missed deadline alerts once
    succeed(store, clock, "daily")
    assert step(1) == ["deadman", "recovered"]
    [recovered] = [e for e in store.events() if e["kind"] == "recovered"]
    assert recovered["task_id"] == "daily" and recovered["data"]["what"] == "deadman"
    # On time again: the next deadline is a day and an hour after this success.
    assert step(25 * 3600 - 1) == ["deadman", "recovered"]
    assert step(1) == ["deadman", "recovered", "deadman"]


def test_run_too_long_alerts_once_per_attempt(store: SqliteStore) -> None:
    config = config_for(
        "http://127.0.0.1:9",
        """
        slow:
          schedule: {manual: true}
          command: {shell: "sleep 100"}
          max_duration: 10m
        """,
    )
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command"), "slow": ("g", "command")}, clock.now())
    box = Outbox(store, config, clock)
    box.process(clock.now())
    store.fire("slow", clock.now(), trigger="manual")
    store.claim(clock.now(), "me", 3600, 1, set(), set())
    for _ in range(3):
        clock.advance(301)
        box.check(clock.now(), {}, box.running_attempts())
        box.process(clock.now())
    alerts = [dict(r) for r in store.conn.execute("SELECT * FROM alerts")]
    assert [a["kind"] for a in alerts] == ["run_too_long"]
    assert json.loads(alerts[0]["data"])["max_duration_s"] == 600


def test_pings_follow_start_success_and_failure(store: SqliteStore) -> None:
    receiver = Receiver()

    async def main() -> list[str]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        async with serve(app) as url:
            config = config_for(
                url,
                f"""
                pinged:
                  schedule: {{manual: true}}
                  command: {{shell: "true"}}
                  ping: {{url: "{url}/ping/abc"}}
                """,
            )
            clock = ManualClock(T0)
            store.sync_tasks({"t": ("f", "command"), "pinged": ("g", "command")}, clock.now())
            box = Outbox(store, config, clock)
            box.process(clock.now())
            run = store.fire("pinged", clock.now(), trigger="manual")
            store.claim(clock.now(), "me", 30, 1, set(), set())
            store.mark_started(run.run_id, "pinged", clock.now(), "/ws")
            store.finish(
                run.run_id, clock.now(), outcome=Outcome.FAILURE, next_status=RunStatus.QUEUED,
                exit_code=3, error="exit 3",
            )  # fmt: skip
            store.claim(clock.now(), "me", 30, 1, set(), set())
            store.mark_started(run.run_id, "pinged", clock.now(), "/ws")
            store.finish(
                run.run_id, clock.now(), outcome=Outcome.SUCCESS,
                next_status=RunStatus.SUCCEEDED,
            )  # fmt: skip
            box.process(clock.now())
            await deliver(box)
        return [p for p, _, _ in receiver.requests]

    paths = run(main)
    assert sorted(paths) == sorted(
        ["/ping/abc/start", "/ping/abc/3", "/ping/abc/start", "/ping/abc"]
    )


def test_alerts_about_history_are_not_raised_on_the_first_start(store: SqliteStore) -> None:
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command")}, clock.now())
    quarantine(store, clock)  # before the alerts cursor exists
    box = Outbox(store, config_for("http://127.0.0.1:9"), clock)
    box.process(clock.now())
    box.process(clock.now())
    assert outbox_rows(store) == []


def run(main: Any) -> Any:
    return asyncio.run(main())


def test_reload_failure_alert_is_deduplicated_by_message(store: SqliteStore) -> None:
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command")}, clock.now())
    box = Outbox(store, config_for("http://127.0.0.1:9"), clock)
    box.process(clock.now())
    for error in ("bad: tasks.x.schedule.cron", "bad: tasks.x.schedule.cron", "other"):
        with store.tx():
            store.emit(clock.now(), "config_reload_failed", error=error)
        clock.advance(10)
        box.process(clock.now())
    rows = outbox_rows(store)
    assert len(rows) == 2  # the repeated message waits out its cooldown


def test_run_events_are_not_read_when_no_ping_or_recovery_can_come_of_them(
    store: SqliteStore,
) -> None:
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command")}, clock.now())
    box = Outbox(store, config_for("http://127.0.0.1:9"), clock)
    box.process(clock.now())
    for _ in range(3):
        succeed(store, clock)
    assert box.process(clock.now()) == 0  # three successes, none of them read
    quarantine(store, clock)
    assert box.process(clock.now()) == 2  # its failure and its quarantine are
    assert box.process(clock.now()) == 0  # and the cursor moved past all of it


def test_auto_paused_task_gets_a_recovery_notice_at_its_next_success(store: SqliteStore) -> None:
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command")}, clock.now())
    box = Outbox(store, config_for("http://127.0.0.1:9"), clock)
    box.process(clock.now())
    quarantine(store, clock)
    quarantine(store, clock)  # pause_after_failures: 2
    store.resume("t", clock.now())
    succeed(store, clock)  # read in the pass after the one that read the pause
    while box.process(clock.now()):  # as the daemon's loop does
        pass
    kinds = [r[0] for r in store.conn.execute("SELECT kind FROM alerts ORDER BY id")]
    assert kinds == ["run_quarantined", "run_quarantined", "task_paused", "recovered"]
    [recovered] = [e for e in store.events() if e["kind"] == "recovered"]
    assert recovered["data"]["what"] == "paused"
    succeed(store, clock)
    box.process(clock.now())
    assert len([r for r in store.conn.execute("SELECT 1 FROM alerts")]) == 4  # once


def test_safety_brings_the_idle_loop_back_only_for_its_own_work(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's idle main loop sleeps until ``Oversight.wait_s``: events waiting to
    become alerts and a watched dead man's switch keep their cadence; with neither,
    Oversight leaves the sleep to the idle poll."""
    monkeypatch.setenv("AGENTD_TEST_HOOK_SECRET", SECRET)
    clock = ManualClock(T0)
    store.sync_tasks({"t": ("f", "command"), "daily": ("g", "command")}, clock.now())

    async def scenario() -> None:
        plain = Oversight(store, config_for("http://127.0.0.1:9"), clock, Metrics("test"))
        assert plain.wait_s() == 0.0  # events since the last process: now
        plain.tick(clock.now())
        assert plain.wait_s() is None  # nothing watched, nothing waiting
        plain.on_event({"kind": "quarantine", "task_id": "t", "run_id": "r", "data": {}})
        assert plain.wait_s() == pytest.approx(PROCESS_EVERY_S)
        clock.advance(PROCESS_EVERY_S)
        assert plain.wait_s() == 0.0
        plain.tick(clock.now())
        assert plain.wait_s() is None
        await plain.aclose()

        watched = config_for("http://127.0.0.1:9", DAILY_WATCHED)
        deadman = Oversight(store, watched, clock, Metrics("test"))
        deadman.tick(clock.now())
        assert deadman.wait_s() == pytest.approx(CHECK_EVERY_S)
        clock.advance(0.4)
        assert deadman.wait_s() == pytest.approx(CHECK_EVERY_S - 0.4)
        await deadman.aclose()

    asyncio.run(scenario())
