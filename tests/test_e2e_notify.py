"""Completion notices, the daemon's heartbeat ping, repeated alerts and progress ETAs,
on a real daemon: alerts go to a ``command`` channel appending to a file, the heartbeat
to a local aiohttp server, the ETA is read through the API, SSE and ``agentd runs``."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import wait_for

PY = sys.executable


def alert_channel(sink: Path, rules: str) -> str:
    script = f"import sys; open({str(sink)!r}, 'a').write(sys.stdin.read() + chr(10))"
    return f"""
    alerts:
      channels:
        pager: {{command: {{argv: [{PY!r}, -c, {script!r}]}}}}
      rules:
{rules}
    """


def sent(sink: Path, kind: str | None = None) -> list[dict[str, Any]]:
    if not sink.exists():
        return []
    alerts = [json.loads(line) for line in sink.read_text().splitlines() if line.strip()]
    return [a for a in alerts if kind is None or a["kind"] == kind]


def at_least(n: int, items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return items if len(items) >= n else None


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def sse_events(url: str, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first ``kind`` event of an SSE stream (the backfill from the DB comes first)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == kind:
                return dict(json.loads(line[len("data: ") :]))
    raise AssertionError(f"no {kind} event in the stream")


# ---------------------------------------------------------------- notify and the ETA


def test_completion_notices_and_progress_eta(make_daemon: Any, tmp_path: Path) -> None:
    sink, go = tmp_path / "alerts.jsonl", tmp_path / "go"
    rules = "        - {events: [run_succeeded, run_failed], channels: [pager], cooldown: 0s}"
    d = make_daemon(
        f"""
        paced:
          schedule: {{manual: true}}
          python: {{callable: "e2e_tasks:paced"}}
          params: {{total: 4, block_at: 2, step_s: 0.05, go: "{go}"}}
          notify: {{on: [success]}}
        broken:
          schedule: {{manual: true}}
          command: {{argv: [{PY}, -c, "import sys; sys.exit('disk on fire')"]}}
          retry: {{max_attempts: 2, backoff: 0s}}
          pause_after_failures: 0
          notify: {{on: [failure, quarantine]}}
        """,
        top=alert_channel(sink, rules),
    ).start()
    run_id = d.trigger("paced")
    wait_for(lambda: go.with_name("go.blocked").exists(), what="the run at item 2 of 4")
    wait_for(lambda: d.events(run_id, "progress")[1:], what="two progress events")
    # The SSE event carries the runner's ETA; the API computes one when read.
    event = sse_events(f"{d.url}/v1/runs/{run_id}/events/stream", "progress")
    assert event["data"]["done"] == 1 and event["data"]["total"] == 4
    assert event["data"]["eta"] > event["ts"]
    run = get(f"{d.url}/v1/runs/{run_id}")
    assert run["status"] == "running" and run["progress_done"] == 2
    assert run["progress_eta"] is not None and run["progress_eta"] >= run["started_at"]
    [listed] = [r for r in get(f"{d.url}/v1/runs?task=paced")["runs"] if r["id"] == run_id]
    assert listed["progress_eta"] is not None
    table = d.cli("runs", "--task", "paced").stdout.splitlines()
    assert "ETA" in table[0].split()
    column = table[0].index("ETA")
    assert table[1][column] != "-", table  # a timestamp, not the empty cell
    go.touch()
    d.wait_status(run_id, "succeeded")
    assert get(f"{d.url}/v1/runs/{run_id}")["progress_eta"] is None  # only while running
    [notice] = wait_for(lambda: sent(sink, "run_succeeded"), what="the success notice")
    assert notice["run_id"] == run_id and notice["task"] == "paced"
    assert notice["data"]["url"] == f"/v1/runs/{run_id}" and notice["data"]["final"] is True
    assert notice["data"]["attempt"] == 1 and notice["data"]["duration_s"] > 0
    assert f"/v1/runs/{run_id}" in notice["summary"] and "succeeded" in notice["summary"]

    bad = d.trigger("broken")
    d.wait_status(bad, "quarantined")
    failed = wait_for(
        lambda: at_least(3, [a for a in sent(sink, "run_failed") if a["run_id"] == bad]),
        what="two failed attempts and the final failure",
    )
    assert sorted((a["data"]["attempt"], a["data"]["final"]) for a in failed) == [
        (1, False),
        (2, False),
        (2, True),
    ]
    assert all(a["data"]["error"] and "disk on fire" in a["data"]["error"] for a in failed)
    assert not [a for a in sent(sink, "run_succeeded") if a["run_id"] == bad]
    assert d.stop() == 0


# ---------------------------------------------------------------- heartbeat ping


class PingServer:
    """A local aiohttp server on its own thread: counts requests, answers ``status``."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        self.status = 200
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append((request.method, request.path))
        return web.Response(status=self.status, text="ok")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def pings() -> Iterator[PingServer]:
    server = PingServer()
    yield server
    server.close()


def test_heartbeat_pings_while_healthy_and_failures_are_logged_without_the_secret(
    make_daemon: Any, pings: PingServer
) -> None:
    secret = "0f8c2a9e-5b1d-4c3e-9a7f-6d2b1e4c8a90"
    url = f"http://127.0.0.1:{pings.port}/{secret}"
    d = make_daemon(
        "idle: {schedule: {manual: true}, command: {argv: [/bin/true]}}",
        # At debug level httpx itself logs each request's URL; agentd's lines never do.
        daemon_extra=f"log_level: info\nheartbeat: {{url: {url!r}, every: 100ms, method: POST}}",
    ).start()
    wait_for(lambda: len(pings.hits) >= 3, what="three heartbeat pings")
    assert set(pings.hits) == {("POST", f"/{secret}")}
    pings.status = 503
    d.wait_log("heartbeat ping failed", "a failed ping logged")
    failed_at = len(pings.hits)
    wait_for(lambda: len(pings.hits) >= failed_at + 3, what="pings go on after failures")
    log = d.log()
    assert log.count("heartbeat ping failed") == 1, "failures are rate-limited"
    pings.status = 200
    d.wait_log("heartbeat ping ok again", "the ping recovering")
    assert not d.proc_exited()
    assert secret not in d.log()
    assert f"url=http://127.0.0.1:{pings.port}/…" in d.log()
    assert d.stop() == 0


# ---------------------------------------------------------------- repeat_every


def test_repeat_every_resends_while_late_or_failing_and_stops_at_a_success(
    make_daemon: Any, tmp_path: Path
) -> None:
    sink, flag = tmp_path / "alerts.jsonl", tmp_path / "healthy"
    check = f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 3)"
    rules = (
        "        - {events: [deadman, run_quarantined, recovered], channels: [pager],"
        " cooldown: 0s, repeat_every: 1s}"
    )
    d = make_daemon(
        f"""
        nightly:
          schedule: {{manual: true}}
          command: {{argv: [/bin/true]}}
          expect: {{every: 1s, grace: 0s}}
        flaky:
          schedule: {{manual: true}}
          command: {{argv: [{PY}, -c, "{check}"]}}
          retry: {{max_attempts: 1}}
          pause_after_failures: 0
        """,
        top=alert_channel(sink, rules),
    ).start()
    bad = d.trigger("flaky")
    d.wait_status(bad, "quarantined")
    late = wait_for(lambda: at_least(3, sent(sink, "deadman")), what="a late alert and two repeats")
    assert not late[0]["data"].get("repeat") and all(a["data"]["repeat"] for a in late[1:])
    assert "still late" in late[1]["summary"]
    failing = wait_for(
        lambda: at_least(3, sent(sink, "run_quarantined")),
        what="a quarantine alert and two repeats",
    )
    assert all(a["task"] == "flaky" for a in failing)
    assert "still failing" in failing[1]["summary"] and failing[1]["data"]["repeat"] is True
    # Repeats are at least repeat_every apart on each channel.
    stamps = [a["ts"] for a in late]
    assert len(set(stamps)) == len(stamps)

    flag.touch()
    d.wait_status(d.trigger("flaky"), "succeeded")
    wait_for(
        lambda: not d.query("SELECT key FROM alert_state WHERE key LIKE 'failing:%'"),
        what="the failing state cleared by the success",
    )
    assert "task flaky no longer failing" in d.log()

    def raised(kind: str) -> int:
        return int(d.query("SELECT COUNT(*) AS n FROM alerts WHERE kind=?", (kind,))[0]["n"])

    count, seen = raised("run_quarantined"), raised("deadman")
    # nightly stays late: two more of its repeats take over a second, in which flaky's
    # repeat would have come again had its success not ended it.
    wait_for(lambda: raised("deadman") >= seen + 2, what="two more repeats of the late task")
    assert raised("run_quarantined") == count
    assert d.stop() == 0
