"""Tests for agentd.http: the real aiohttp app on a loopback port, a real SqliteStore on a
SQLite file, real Control/Health/EventBus, and httpx as the client.

Each test runs its own event loop (``asyncio.run``); waits are awaits or polls with
deadlines, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from agentd.clock import ManualClock, to_iso
from agentd.config import HttpServerConfig, parse_config
from agentd.control import Control
from agentd.events import EventBus
from agentd.health import Health
from agentd.http import BindRefused, HttpServer, TokenError, check_bind, load_token
from agentd.models import Outcome, RunStatus
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TOKEN = "s3cret-t0ken-value"
CONFIG = """
tasks:
  alpha:
    description: hourly
    schedule: {every: 1h}
    command: {argv: ["true"]}
  beta:
    description: on demand
    schedule: {manual: true}
    command: {argv: ["true"]}
    overlap: allow
"""


def run(test: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), timeout)

    asyncio.run(bounded())


@dataclass
class Env:
    store: SqliteStore
    control: Control
    health: Health
    bus: EventBus
    clock: ManualClock
    registry: CollectorRegistry
    server: HttpServer
    client: httpx.AsyncClient

    def fire(self, task_id: str = "beta") -> str:
        """A manual run of ``task_id`` at the clock's now, one second after the last."""
        self.clock.advance(1)
        return str(self.control.trigger(task_id)["run_id"])

    def claim(self, run_id: str) -> None:
        rows = self.store.claim(self.clock.now(), "w1", 30, 10, set(), {"beta"})
        assert run_id in [r["id"] for r in rows]

    def finish(self, run_id: str, status: RunStatus, outcome: Outcome) -> None:
        self.clock.advance(1)
        self.store.finish(
            run_id, self.clock.now(), outcome=outcome, next_status=status, error="boom"
        )

    def quarantined_run(self) -> str:
        run_id = self.fire()
        self.claim(run_id)
        self.finish(run_id, RunStatus.QUARANTINED, Outcome.FAILURE)
        return run_id

    def event_ids(self, run_id: str | None = None, after: int = 0) -> list[int]:
        return [e["id"] for e in self.store.events(run_id, after, 10_000)]


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    token: str | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
    **server_kwargs: Any,
) -> AsyncIterator[Env]:
    config = parse_config(CONFIG, environ={})
    clock = ManualClock(T0)
    bus = EventBus()
    store = SqliteStore(tmp_path / "state.sqlite", event_sink=bus.publish)
    store.sync_tasks({tid: (t.fingerprint(), t.kind) for tid, t in config.tasks.items()}, T0)
    control = Control(store, config, clock)
    health = Health(started=True)
    registry = CollectorRegistry()
    server = HttpServer(
        control=control,
        health=health,
        registry=registry,
        bus=bus,
        status=status or (lambda: {"pid": 1, "generation": 1}),
        clock=clock,
        token=token,
        **server_kwargs,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=20
        ) as client:
            yield Env(store, control, health, bus, clock, registry, server, client)
    finally:
        await server.stop()
        store.conn.close()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) == {"error", "message"}
    return body


# ---------------------------------------------------------------- SSE client side


class Sse:
    """Reads one ``text/event-stream`` response: events as dicts, comments as text."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.status_code
        assert response.headers["content-type"].startswith("text/event-stream")
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 20.0) -> dict[str, Any] | None:
        """The next event (``{"id", "event", "data"}``) or comment (``{"comment"}``);
        None when the server ended the stream."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> dict[str, Any] | None:
        fields: dict[str, str] = {}
        comment: str | None = None
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                assert not fields and comment is None, "stream ended mid-event"
                return None
            if line == "":
                if comment is not None:
                    return {"comment": comment}
                if fields:
                    return {
                        "id": int(fields["id"]),
                        "event": fields["event"],
                        "data": json.loads(fields["data"]),
                    }
                continue
            if line.startswith(":"):
                comment = line[1:].strip()
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    async def next_event(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next event, skipping keep-alive comments; fails if the stream ends."""
        while True:
            item = await self.next(timeout)
            assert item is not None, "stream ended"
            if "comment" not in item:
                return item

    async def events_until_end(self, timeout: float = 20.0) -> list[dict[str, Any]]:
        out = []
        while (item := await self.next(timeout)) is not None:
            if "comment" not in item:
                out.append(item)
        return out


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- probes, metrics, docs


def test_healthz_ok_when_components_tick(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            env.health.tick("main_loop", env.clock.monotonic())
            env.health.tick("scheduler", env.clock.monotonic())
            response = await env.client.get("/healthz")
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ok"
            assert set(body["last_tick_age_s"]) == {"main_loop", "scheduler"}

    run(main)


def test_healthz_503_names_the_stale_component(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            env.health.tick("scheduler", env.clock.monotonic())
            env.clock.advance(env.health.stale_after_s + 5)
            env.health.tick("main_loop", env.clock.monotonic())
            response = await env.client.get("/healthz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "unhealthy"
            assert body["stale"] == ["scheduler"]

    run(main)


def test_healthz_does_not_touch_the_db(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            env.store.conn.close()  # any DB access would now raise -> 500
            assert (await env.client.get("/healthz")).status_code == 200

    run(main)


def test_readyz_follows_startup_stopping_and_db_state(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            env.health.started = False
            response = await env.client.get("/readyz")
            assert response.status_code == 503
            assert response.json() == {"status": "not_ready", "reason": "starting up"}

            env.health.started = True
            response = await env.client.get("/readyz")
            assert response.status_code == 200
            assert response.json() == {"status": "ready"}

            env.health.fault("state DB", "disk I/O error")
            response = await env.client.get("/readyz")
            assert response.status_code == 503
            assert "disk I/O error" in response.json()["reason"]

            env.health.fault("state DB", None)
            env.health.stopping = True
            response = await env.client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["reason"] == "shutting down"

    run(main)


def test_metrics_is_prometheus_text(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            counter = Counter("agentd_test_things", "Things.", ["kind"], registry=env.registry)
            counter.labels(kind="x").inc(3)
            response = await env.client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(response.text)}
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for s in families["agentd_test_things"].samples
            }
            assert samples[("agentd_test_things_total", (("kind", "x"),))] == 3.0

    run(main)


def test_metrics_negotiates_openmetrics_gzip_and_name_filter(tmp_path: Path) -> None:
    """Rendered off the loop, the exposition still honours what scrapers ask for."""

    async def main() -> None:
        async with serving(tmp_path) as env:
            Counter("agentd_test_a", "A.", registry=env.registry).inc()
            Counter("agentd_test_b", "B.", registry=env.registry).inc(2)
            response = await env.client.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert response.headers["content-type"].startswith("application/openmetrics-text")
            assert response.text.endswith("# EOF\n")
            response = await env.client.get("/metrics", params={"name[]": "agentd_test_b_total"})
            assert "agentd_test_b_total 2.0" in response.text
            assert "agentd_test_a" not in response.text
            async with env.client.stream(
                "GET", "/metrics", headers={"Accept-Encoding": "gzip"}
            ) as raw:
                assert raw.headers["content-encoding"] == "gzip"
                body = b"".join([chunk async for chunk in raw.aiter_raw()])
            assert b"agentd_test_a_total 1.0" in gzip.decompress(body)
            response = await env.client.get("/metrics", headers={"Accept-Encoding": "identity"})
            assert "content-encoding" not in response.headers
            assert "agentd_test_a_total 1.0" in response.text

    run(main)


def test_openapi_document_describes_every_route(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            response = await env.client.get("/v1/openapi.json")
            assert response.status_code == 200
            doc = response.json()
            assert doc["openapi"] == "3.0.3"
            served = {
                (route.resource.canonical, route.method.lower())
                for route in env.server.app.router.routes()
                if route.method != "HEAD"
                and route.resource is not None
                and not route.resource.canonical.startswith("/ui")  # the console's pages
            }
            documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
            assert served == documented
            for path, ops in doc["paths"].items():
                for method, op in ops.items():
                    assert "500" in op["responses"], (path, method)
                    if "{" in path:
                        assert "404" in op["responses"], (path, method)
                    if method == "post":
                        assert {"400", "401"} <= set(op["responses"]), (path, method)

    run(main)


def test_status_is_the_status_callable(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, status=lambda: {"pid": 42, "tasks": 2}) as env:
            response = await env.client.get("/v1/status")
            assert response.status_code == 200
            assert response.json() == {"pid": 42, "tasks": 2}

    run(main)


# ---------------------------------------------------------------- tasks


def test_list_and_get_tasks(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            response = await env.client.get("/v1/tasks")
            assert response.status_code == 200
            tasks = {t["id"]: t for t in response.json()["tasks"]}
            assert set(tasks) == {"alpha", "beta"}
            assert tasks["alpha"]["schedule_kind"] == "interval"
            assert len(tasks["alpha"]["next_runs"]) == 1
            assert tasks["beta"]["next_runs"] == []

            response = await env.client.get("/v1/tasks/alpha")
            assert response.status_code == 200
            alpha = response.json()
            assert alpha["id"] == "alpha" and alpha["paused"] is False
            assert len(alpha["next_runs"]) == 5

    run(main)


def test_trigger_pause_resume(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            response = await env.client.post("/v1/tasks/beta/trigger")
            assert response.status_code == 202
            body = response.json()
            assert body["status"] == "queued" and body["reason"] is None
            assert env.store.get_run(body["run_id"])["trigger"] == "manual"

            response = await env.client.post("/v1/tasks/alpha/pause", json={"reason": "maint"})
            assert response.status_code == 200
            assert response.json() == {"task": "alpha", "paused": True, "changed": True}
            again = await env.client.post("/v1/tasks/alpha/pause", json={"reason": "x"})
            assert again.json()["changed"] is False
            task = (await env.client.get("/v1/tasks/alpha")).json()
            assert task["paused"] is True and task["paused_reason"] == "maint"

            response = await env.client.post("/v1/tasks/alpha/resume")
            assert response.status_code == 200
            assert response.json() == {"task": "alpha", "paused": False, "changed": True}
            response = await env.client.post("/v1/tasks/alpha/resume")
            assert response.status_code == 200
            assert response.json()["changed"] is False

            # No body: the default reason; an empty JSON object is fine too.
            await env.client.post("/v1/tasks/beta/pause")
            assert env.store.task_row("beta")["paused_reason"] == "paused via API"  # type: ignore[index]
            response = await env.client.post("/v1/tasks/beta/resume", json={})
            assert response.status_code == 200

    run(main)


def test_every_write_wakes_the_daemon_and_a_refusal_does_not(tmp_path: Path) -> None:
    """The daemon's main loop sleeps up to its idle poll; ``on_change`` (its wake-up) is
    what makes a triggered or released run be claimed now."""

    async def main() -> None:
        async with serving(tmp_path) as env:
            q1, q2 = env.quarantined_run(), env.quarantined_run()
            woken: list[str] = []
            env.control.on_change = lambda: woken.append("wake")
            response = await env.client.post("/v1/tasks/beta/trigger")
            assert response.status_code == 202, response.text
            run_id = response.json()["run_id"]
            for path in ("/v1/tasks/alpha/pause", "/v1/tasks/alpha/resume"):
                response = await env.client.post(path)
                assert response.status_code == 200, response.text
            for path in (
                f"/v1/runs/{run_id}/cancel",
                f"/v1/quarantine/{q1}/release",
                f"/v1/quarantine/{q2}/drop",
            ):
                response = await env.client.post(path)
                assert response.status_code in (200, 202), response.text
            assert len(woken) == 6
            assert_error(await env.client.post("/v1/tasks/nope/trigger"), 404, "unknown_task")
            assert_error(await env.client.post(f"/v1/quarantine/{q2}/drop"), 404, "not_quarantined")
            assert len(woken) == 6

    run(main)


# ---------------------------------------------------------------- runs


def test_list_runs_pages_and_filters(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            ids = [env.fire("beta") for _ in range(5)]
            alpha_run = env.fire("alpha")
            env.claim(ids[0])
            env.finish(ids[0], RunStatus.SUCCEEDED, Outcome.SUCCESS)

            newest_first = sorted([*ids, alpha_run], reverse=True)
            seen: list[str] = []
            before: str | None = None
            pages = 0
            while True:
                params = {"limit": "2", **({"before": before} if before else {})}
                response = await env.client.get("/v1/runs", params=params)
                assert response.status_code == 200
                body = response.json()
                seen += [r["id"] for r in body["runs"]]
                pages += 1
                before = body["next_before"]
                if before is None:
                    break
                assert before == body["runs"][-1]["id"]
            assert seen == newest_first
            assert pages == 4  # 2 + 2 + 2 + an empty last page

            response = await env.client.get("/v1/runs", params={"task": "alpha"})
            assert [r["id"] for r in response.json()["runs"]] == [alpha_run]
            assert response.json()["next_before"] is None
            response = await env.client.get("/v1/runs", params={"status": "succeeded"})
            assert [r["id"] for r in response.json()["runs"]] == [ids[0]]

            # Runs were created at T0+1s .. T0+6s. Offsets are converted to UTC.
            since = (T0 + timedelta(seconds=3)).astimezone(timezone(timedelta(hours=2)))
            params = {"since": since.isoformat(), "until": "2026-03-01T12:00:05Z"}
            response = await env.client.get("/v1/runs", params=params)
            assert response.status_code == 200
            created = sorted(r["created_at"] for r in response.json()["runs"])
            assert created == [to_iso(T0 + timedelta(seconds=s)) for s in (3, 4)]

            # An unencoded '+' in the offset arrives as a space: still understood.
            url = "/v1/runs?since=2026-03-01T14:00:04+02:00"
            response = await env.client.get(url)
            assert response.status_code == 200
            assert len(response.json()["runs"]) == 3

    run(main)


def test_get_run_and_cancel(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            run_id = env.fire()
            response = await env.client.get(f"/v1/runs/{run_id}")
            assert response.status_code == 200
            body = response.json()
            assert body["id"] == run_id and body["status"] == "queued"
            assert body["attempts"] == [] and body["checkpoint"] is None

            response = await env.client.post(f"/v1/runs/{run_id}/cancel")
            assert response.status_code == 202
            assert response.json() == {"run_id": run_id, "status": "cancelled"}

            response = await env.client.post(f"/v1/runs/{run_id}/cancel")
            assert_error(response, 409, "run_finished")

            running = env.fire()
            env.claim(running)
            response = await env.client.post(f"/v1/runs/{running}/cancel")
            assert response.status_code == 202
            assert response.json()["status"] == "running"
            assert env.store.get_run(running)["cancel_requested"] == 1
            detail = (await env.client.get(f"/v1/runs/{running}")).json()
            assert detail["attempts"][0]["worker"] == "w1"

    run(main)


def test_run_transcript(tmp_path: Path) -> None:
    """An agent run's recorded steps in order (as the state keeps them, scrubbed); an
    empty list for a run that recorded none; 404 for no run at all."""

    async def main() -> None:
        async with serving(tmp_path) as env:
            quiet, agent = env.fire(), env.fire()
            env.claim(agent)
            reply = {"content": "", "tool_calls": [{"id": "c1", "name": "add", "arguments": "{}"}]}
            env.store.record_agent_step(agent, 1, "model", None, reply, env.clock.now())
            started = {"tool": "add", "arguments": {}}
            env.store.record_agent_step(agent, 1, "tool_started", "c1", started, env.clock.now())
            response = await env.client.get(f"/v1/runs/{agent}/transcript")
            assert response.status_code == 200
            body = response.json()
            assert body["run_id"] == agent
            assert [(s["seq"], s["step"], s["kind"], s["call_id"]) for s in body["steps"]] == [
                (1, 1, "model", None),
                (2, 1, "tool_started", "c1"),
            ]
            assert body["steps"][0]["payload"] == reply
            assert body["steps"][1]["recorded_at"] == to_iso(env.clock.now())
            response = await env.client.get(f"/v1/runs/{quiet}/transcript")
            assert response.status_code == 200
            assert response.json() == {"run_id": quiet, "steps": []}

    run(main)


def test_event_pages(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            first = env.fire()
            env.fire()
            all_ids = env.event_ids()
            response = await env.client.get("/v1/events", params={"after": "0", "limit": "2"})
            assert response.status_code == 200
            assert [e["id"] for e in response.json()["events"]] == all_ids[:2]
            response = await env.client.get("/v1/events", params={"after": str(all_ids[0])})
            assert [e["id"] for e in response.json()["events"]] == all_ids[1:]
            # tail: the newest ones, still oldest first.
            response = await env.client.get("/v1/events", params={"tail": "2"})
            assert [e["id"] for e in response.json()["events"]] == all_ids[-2:]
            response = await env.client.get("/v1/events", params={"tail": "5000"})
            assert [e["id"] for e in response.json()["events"]] == all_ids

            response = await env.client.get(f"/v1/runs/{first}/events")
            assert response.status_code == 200
            events = response.json()["events"]
            assert [e["kind"] for e in events] == ["enqueue"]
            assert events[0]["run_id"] == first
            assert events[0]["data"]["trigger"] == "manual"

    run(main)


# ---------------------------------------------------------------- quarantine


def test_quarantine_list_show_release_drop(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            q1 = env.quarantined_run()
            q2 = env.quarantined_run()
            response = await env.client.get("/v1/quarantine")
            assert response.status_code == 200
            entries = response.json()["quarantine"]
            assert {e["run_id"] for e in entries} == {q1, q2}
            assert all(e["last_error"] == "boom" for e in entries)

            response = await env.client.get(f"/v1/quarantine/{q1}")
            assert response.status_code == 200
            body = response.json()
            assert body["quarantine"]["run_id"] == q1
            assert body["run"]["status"] == "quarantined"
            assert len(body["run"]["attempts"]) == 1

            response = await env.client.post(f"/v1/quarantine/{q1}/release")
            assert response.status_code == 200
            assert response.json() == {"run_id": q1, "status": "queued"}
            assert env.store.get_run(q1)["status"] == "queued"
            assert_error(
                await env.client.post(f"/v1/quarantine/{q1}/release"), 404, "not_quarantined"
            )

            response = await env.client.post(f"/v1/quarantine/{q2}/drop")
            assert response.status_code == 200
            assert response.json() == {"run_id": q2, "dropped": True}
            assert_error(await env.client.get(f"/v1/quarantine/{q2}"), 404, "not_quarantined")
            assert_error(await env.client.post(f"/v1/quarantine/{q2}/drop"), 404, "not_quarantined")
            assert (await env.client.get("/v1/quarantine")).json() == {"quarantine": []}

    run(main)


# ---------------------------------------------------------------- errors


def test_unknown_things_are_404(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            assert_error(await c.get("/v1/tasks/nope"), 404, "unknown_task")
            for action in ("trigger", "pause", "resume"):
                assert_error(await c.post(f"/v1/tasks/nope/{action}"), 404, "unknown_task")
            assert_error(await c.get("/v1/runs/nope"), 404, "unknown_run")
            assert_error(await c.post("/v1/runs/nope/cancel"), 404, "unknown_run")
            assert_error(await c.get("/v1/runs/nope/events"), 404, "unknown_run")
            assert_error(await c.get("/v1/runs/nope/transcript"), 404, "unknown_run")
            assert_error(await c.get("/v1/runs/nope/events/stream"), 404, "unknown_run")
            assert_error(await c.get("/v1/quarantine/nope"), 404, "not_quarantined")
            assert_error(await c.post("/v1/quarantine/nope/release"), 404, "not_quarantined")
            assert_error(await c.post("/v1/quarantine/nope/drop"), 404, "not_quarantined")
            body = assert_error(await c.get("/v1/nothing/here"), 404, "not_found")
            assert "/v1/nothing/here" in body["message"]
            assert_error(await c.get("/"), 404, "not_found")

    run(main)


def test_wrong_method_is_405_json(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            response = await env.client.delete("/v1/tasks/alpha")
            assert_error(response, 405, "method_not_allowed")
            assert "GET" in response.headers["allow"]
            response = await env.client.get("/v1/tasks/alpha/trigger")
            assert_error(response, 405, "method_not_allowed")
            assert response.headers["allow"] == "POST"

    run(main)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/runs", {"limit": "abc"}),
        ("/v1/runs", {"limit": "0"}),
        ("/v1/runs", {"limit": "1001"}),
        ("/v1/runs", {"limit": "1.5"}),
        ("/v1/runs", {"limit": "٣"}),  # a Unicode digit int() would accept
        ("/v1/runs", {"since": "yesterday"}),
        ("/v1/runs", {"since": "2026-03-01T12:00:00"}),  # no offset
        ("/v1/runs", {"until": "2026-03-01"}),
        ("/v1/runs", {"since": "0001-01-01T00:00:00+05:00"}),  # before year 1 in UTC
        ("/v1/runs", {"status": "exploded"}),
        ("/v1/events", {"after": "-1"}),
        ("/v1/events", {"after": "99999999999999999999"}),
        ("/v1/events", {"limit": "5001"}),
        ("/v1/events", {"limit": "x"}),
        ("/v1/events", {"tail": "0"}),
        ("/v1/events", {"tail": "5001"}),
        ("/v1/events", {"tail": "2", "after": "1"}),
        ("/v1/events/stream", {"after": "x"}),
    ],
)
def test_bad_query_parameters_are_400(tmp_path: Path, path: str, params: dict[str, str]) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            assert_error(await env.client.get(path, params=params), 400, "bad_request")

    run(main)


def test_bad_bodies_are_400(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            headers = {"content-type": "application/json"}
            for raw in (b"{not json", b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b"[" * 100_000):
                response = await c.post("/v1/tasks/alpha/pause", content=raw, headers=headers)
                assert_error(response, 400, "bad_request")
            for body in ({"reason": ""}, {"reason": 7}, {"reason": "x" * 501}, {"why": "x"}):
                response = await c.post("/v1/tasks/alpha/pause", json=body)
                assert_error(response, 400, "bad_request")
            response = await c.post("/v1/tasks/alpha/pause", content=b'{"reason": "\\ud800"}')
            assert_error(response, 400, "bad_request")
            assert_error(await c.post("/v1/tasks/alpha/trigger", json={"x": 1}), 400, "bad_request")
            assert_error(await c.post("/v1/tasks/alpha/trigger", content=b"{"), 400, "bad_request")
            assert env.store.task_row("alpha")["paused"] == 0  # type: ignore[index]
            assert env.store.list_runs() == []

    run(main)


def test_oversized_body_is_413_json(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            body = b'{"reason": "' + b"x" * (2 * 1024 * 1024) + b'"}'
            response = await env.client.post("/v1/tasks/alpha/pause", content=body)
            assert_error(response, 413, "payload_too_large")

    run(main)


def test_last_event_id_must_be_an_event_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            response = await env.client.get("/v1/events/stream", headers={"Last-Event-ID": "abc"})
            assert_error(response, 400, "bad_request")

    run(main)


def test_unexpected_exception_is_500_json_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("kaboom-detail")

    async def main() -> None:
        async with serving(tmp_path, status=broken) as env:
            with caplog.at_level(logging.ERROR, logger="agentd.http"):
                response = await env.client.get("/v1/status")
            body = assert_error(response, 500, "internal")
            assert "kaboom" not in body["message"] and "Traceback" not in response.text

    run(main)
    records = [r for r in caplog.records if r.name == "agentd.http" and r.exc_info]
    assert records and "kaboom-detail" in str(records[0].exc_info[1])  # type: ignore[index]


def test_api_answers_503_until_startup_is_done(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            env.health.started = False
            response = await env.client.get("/v1/tasks")
            assert_error(response, 503, "unavailable")
            assert response.headers["retry-after"] == "1"
            assert_error(await env.client.post("/v1/tasks/alpha/trigger"), 503, "unavailable")
            assert_error(await env.client.get("/v1/events/stream"), 503, "unavailable")
            assert env.store.list_runs() == []
            assert (await env.client.get("/v1/openapi.json")).status_code == 200
            assert (await env.client.get("/healthz")).status_code == 200
            assert (await env.client.get("/metrics")).status_code == 200
            assert_error(await env.client.get("/v1/nothing"), 404, "not_found")

            env.health.started = True
            assert (await env.client.get("/v1/tasks")).status_code == 200

    run(main)


def test_state_db_errors_are_503_not_500(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            env.store.conn.execute("PRAGMA busy_timeout = 50")
            other = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
                response = await env.client.post("/v1/tasks/beta/trigger")
                body = assert_error(response, 503, "db_unavailable")
                assert "locked" in body["message"]
            finally:
                other.close()
            assert (await env.client.post("/v1/tasks/beta/trigger")).status_code == 202

    run(main)


# ---------------------------------------------------------------- auth


def test_token_guards_posts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """(GETs need it too: tests/test_http_auth.py has the whole matrix.)"""

    async def main() -> None:
        async with serving(tmp_path, token=TOKEN) as env:
            c = env.client
            header_sets: list[dict[str, Any]] = [
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": "Bearer"},
                {"Authorization": "Bearer ünïcode".encode()},
            ]
            for headers in header_sets:
                response = await c.post("/v1/tasks/alpha/trigger", headers=headers)
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
            # Refused before any work: nothing was enqueued, even for unknown tasks.
            assert env.store.list_runs() == []
            response = await c.post("/v1/tasks/nope/pause")
            assert_error(response, 401, "unauthorized")

            good = {"Authorization": f"Bearer {TOKEN}"}
            response = await c.post("/v1/tasks/alpha/trigger", headers=good)
            assert response.status_code == 202
            response = await c.post(
                "/v1/tasks/alpha/pause", headers={"authorization": f"bearer {TOKEN}"}
            )
            assert response.status_code == 200

            for path in ("/v1/tasks", "/v1/runs", "/v1/status"):
                assert_error(await c.get(path), 401, "unauthorized")
                assert (await c.get(path, headers=good)).status_code == 200, path
            for path in ("/healthz", "/readyz", "/metrics"):
                assert (await c.get(path)).status_code == 200, path

    with caplog.at_level(logging.DEBUG):
        run(main)
    assert TOKEN not in caplog.text


def test_without_token_posts_are_open(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            response = await env.client.post(
                "/v1/tasks/alpha/trigger", headers={"Authorization": "Bearer anything"}
            )
            assert response.status_code == 202

    run(main)


def test_access_log_skips_probes_and_never_shows_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(tmp_path, token=TOKEN) as env:
            for path in ("/healthz", "/readyz", "/metrics", "/v1/tasks"):
                await env.client.get(path)
            await env.client.post(
                "/v1/tasks/alpha/trigger", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            # The access line is written after the response is sent: poll for it.
            await wait_until(
                lambda: any("/trigger" in r.getMessage() for r in caplog.records),
                "the access log line of the POST",
            )

    with caplog.at_level(logging.INFO, logger="agentd.http.access"):
        run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "agentd.http.access"]
    assert any("GET /v1/tasks" in line for line in lines)
    assert not any(p in line for line in lines for p in ("/healthz", "/readyz", "/metrics"))
    assert TOKEN not in caplog.text and "Bearer" not in caplog.text


def test_load_token(tmp_path: Path) -> None:
    assert load_token(HttpServerConfig(), {}) is None
    cfg = HttpServerConfig(token_env="AGENTD_TOKEN")
    assert load_token(cfg, {"AGENTD_TOKEN": f"  {TOKEN}\n"}) == TOKEN
    with pytest.raises(TokenError, match="AGENTD_TOKEN") as info:
        load_token(cfg, {"AGENTD_TOKEN": "  "})
    assert TOKEN not in str(info.value)

    assert issubclass(TokenError, BindRefused)  # the daemon refuses to start on either

    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    by_file = HttpServerConfig(token_file=token_file)
    assert load_token(by_file, {}) == TOKEN
    both = HttpServerConfig(token_env="AGENTD_TOKEN", token_file=token_file)
    assert load_token(both, {"AGENTD_TOKEN": "from-env"}) == "from-env"
    assert load_token(both, {}) == TOKEN

    token_file.write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        load_token(by_file, {})
    with pytest.raises(TokenError, match="cannot be read"):
        load_token(HttpServerConfig(token_file=tmp_path / "missing"), {})


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.9.8.7", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"]
)
def test_check_bind_allows_loopback_without_token(host: str) -> None:
    check_bind(HttpServerConfig(host=host), None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "10.0.0.1", "example.com"])
def test_check_bind_refuses_open_bind_without_token(host: str) -> None:
    with pytest.raises(BindRefused, match="token"):
        check_bind(HttpServerConfig(host=host), None)
    check_bind(HttpServerConfig(host=host), TOKEN)
    check_bind(HttpServerConfig(host=host, allow_insecure_bind=True), None)


# ---------------------------------------------------------------- server-sent events


def test_global_stream_delivers_new_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            earlier = env.fire()  # before connecting: not in a stream that starts "now"
            env.control.cancel(earlier)
            async with env.client.stream("GET", "/v1/events/stream") as response:
                sse = Sse(response)
                run_id = env.fire()
                env.claim(run_id)
                got = [await sse.next_event(), await sse.next_event()]
            assert [e["event"] for e in got] == ["enqueue", "claim"]
            assert all(e["data"]["run_id"] == run_id for e in got)
            db = env.store.events(run_id)
            assert [e["id"] for e in got] == [e["id"] for e in db]
            assert got[0]["data"] == json.loads(json.dumps(db[0]))

    run(main)


def test_reconnect_with_last_event_id_gets_exactly_the_missed_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, sse_heartbeat_s=0.2) as env:
            async with env.client.stream("GET", "/v1/events/stream") as response:
                sse = Sse(response)
                env.fire()
                env.fire()
                seen = [(await sse.next_event())["id"] for _ in range(2)]
            last = seen[-1]
            missed_runs = [env.fire() for _ in range(3)]  # while disconnected
            env.claim(missed_runs[0])
            missed = env.event_ids(after=last)
            assert len(missed) >= 4

            headers = {"Last-Event-ID": str(last)}
            # ?after is overridden by the header.
            async with env.client.stream(
                "GET", "/v1/events/stream", params={"after": "0"}, headers=headers
            ) as response:
                sse = Sse(response)
                got = [(await sse.next_event())["id"] for _ in missed]
                assert got == missed
                env.fire()  # live, after the backfill
                live = await sse.next_event()
                assert live["id"] == env.event_ids()[-1]
                # Nothing further (no duplicate of anything): the next item is a keep-alive.
                following = await sse.next()
                assert following == {"comment": "keep-alive"}

            # ?after works as the resume point when there is no header.
            async with env.client.stream(
                "GET", "/v1/events/stream", params={"after": str(missed[-1])}
            ) as response:
                sse = Sse(response)
                assert (await sse.next_event())["id"] == live["id"]

    run(main)


def test_events_committed_during_backfill_are_sent_once(tmp_path: Path) -> None:
    """The race the subscribe-first order exists for: an event commits (and reaches the
    subscription) while the backfill is reading the DB, so it is in both."""

    async def main() -> None:
        async with serving(tmp_path) as env:
            for _ in range(3):
                env.fire()
            real_events = env.control.events
            calls = 0

            def events_with_a_commit(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
                nonlocal calls
                calls += 1
                if calls == 1:
                    env.fire()  # commits and publishes to the already subscribed stream
                return real_events(*args, **kwargs)

            env.control.events = events_with_a_commit  # type: ignore[method-assign]
            async with env.client.stream(
                "GET", "/v1/events/stream", headers={"Last-Event-ID": "0"}
            ) as response:
                sse = Sse(response)
                await wait_until(lambda: calls >= 1, "the backfill to start")
                expected = env.event_ids()
                got = [(await sse.next_event())["id"] for _ in expected]
                assert got == expected
                env.fire()
                assert (await sse.next_event())["id"] == env.event_ids()[-1]

    run(main)


def test_run_stream_replays_history_and_ends_when_the_run_is_final(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            run_id = env.fire()
            other = env.fire()
            async with env.client.stream("GET", f"/v1/runs/{run_id}/events/stream") as response:
                sse = Sse(response)
                assert (await sse.next_event())["event"] == "enqueue"  # history from 0
                env.claim(run_id)
                assert (await sse.next_event())["event"] == "claim"
                env.store.progress(run_id, 1, 2, "half", env.clock.now())
                env.store.progress(other, 1, 2, "other run", env.clock.now())
                assert (await sse.next_event())["data"]["data"]["message"] == "half"
                env.finish(run_id, RunStatus.SUCCEEDED, Outcome.SUCCESS)
                rest = await sse.events_until_end()
            assert [e["event"] for e in rest] == ["success"]
            assert all(e["data"]["run_id"] == run_id for e in rest)

            # Reconnecting after the end: nothing newer, so 204 (EventSource stops).
            last = env.event_ids(run_id)[-1]
            response = await env.client.get(
                f"/v1/runs/{run_id}/events/stream", headers={"Last-Event-ID": str(last)}
            )
            assert response.status_code == 204
            # From the start, a finished run's stream is its history, then the end.
            async with env.client.stream("GET", f"/v1/runs/{run_id}/events/stream") as response:
                replay = await Sse(response).events_until_end()
            assert [e["id"] for e in replay] == env.event_ids(run_id)

    run(main)


@pytest.mark.parametrize(
    ("status", "outcome", "final_events"),
    [
        # A quarantine commits 'failure' then 'quarantine' together; the run is final
        # after the first, and the stream must still deliver the second.
        (RunStatus.QUARANTINED, Outcome.FAILURE, ["failure", "quarantine"]),
        # budget_exhausted is final too: the stream ends on it, as on a success.
        (RunStatus.BUDGET_EXHAUSTED, Outcome.BUDGET_EXHAUSTED, ["budget_exhausted"]),
    ],
)
def test_run_stream_gets_every_event_of_the_final_transaction(
    tmp_path: Path, status: RunStatus, outcome: Outcome, final_events: list[str]
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            run_id = env.fire()
            env.claim(run_id)
            async with env.client.stream(
                "GET", f"/v1/runs/{run_id}/events/stream", params={"after": "0"}
            ) as response:
                sse = Sse(response)
                assert [(await sse.next_event())["event"] for _ in range(2)] == [
                    "enqueue",
                    "claim",
                ]
                env.finish(run_id, status, outcome)
                rest = await sse.events_until_end(timeout=10.0)
            assert [e["event"] for e in rest] == final_events

    run(main)


def test_slow_subscriber_overflow_ends_the_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, sse_queue_max=2) as env:
            async with env.client.stream("GET", "/v1/events/stream") as response:
                sse = Sse(response)
                first = env.event_ids()[-1] if env.event_ids() else 0
                for _ in range(5):  # no await in between: the queue overflows
                    env.fire()
                got = await sse.events_until_end()
            assert env.bus.subscribers == 0
            ids = [e["id"] for e in got]
            assert len(ids) < 5 and ids == env.event_ids(after=first)[: len(ids)]
            # The client resumes from its last id and gets the rest from the DB.
            resume = ids[-1] if ids else first
            async with env.client.stream(
                "GET", "/v1/events/stream", headers={"Last-Event-ID": str(resume)}
            ) as response:
                sse = Sse(response)
                rest = [(await sse.next_event())["id"] for _ in range(5 - len(ids))]
            assert ids + rest == env.event_ids(after=first)

    run(main)


def test_a_failing_stream_ends_cleanly_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:

            def broken(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
                raise RuntimeError("backfill exploded")

            env.control.events = broken  # type: ignore[method-assign]
            async with env.client.stream(
                "GET", "/v1/events/stream", headers={"Last-Event-ID": "0"}
            ) as response:
                assert await Sse(response).events_until_end() == []
            assert env.bus.subscribers == 0

    with caplog.at_level(logging.ERROR, logger="agentd.http"):
        run(main)
    assert "backfill exploded" in caplog.text


def test_heartbeat_comment_while_idle(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            serving(tmp_path, sse_heartbeat_s=0.05) as env,
            env.client.stream("GET", "/v1/events/stream") as response,
        ):
            sse = Sse(response)
            assert await sse.next() == {"comment": "keep-alive"}
            assert await sse.next() == {"comment": "keep-alive"}
            env.fire()
            assert (await sse.next_event())["event"] == "enqueue"

    run(main)


def test_stop_ends_open_streams(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            async with env.client.stream("GET", "/v1/events/stream") as response:
                sse = Sse(response)
                assert env.bus.subscribers == 1
                stopping = asyncio.ensure_future(env.server.stop(timeout_s=5))
                assert await sse.events_until_end() == []
                await stopping
            assert env.bus.subscribers == 0

    run(main)


def test_disconnected_client_is_unsubscribed(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, sse_heartbeat_s=0.05) as env:
            async with env.client.stream("GET", "/v1/events/stream") as response:
                Sse(response)
                assert env.bus.subscribers == 1
            await wait_until(lambda: env.bus.subscribers == 0, "the stream to notice")

    run(main)
