"""The web console's server side, without a browser: the real aiohttp app (``HttpServer``
with ``Console``) on a loopback port over a real SqliteStore file, httpx as the client.
What is checked: everything shown is escaped, sign-in and its cookie grant what the
tokens grant (never a write on the API), actions need the CSRF value and a same-origin
form even with no token, ``http.console: false`` leaves ``/ui`` unrouted.
(tests/test_console_browser.py drives the same pages in Chromium.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agentd.clock import ManualClock
from agentd.config import HttpServerConfig, parse_config
from agentd.console.html import Markup, join, render
from agentd.control import Control
from agentd.events import EventBus
from agentd.health import Health
from agentd.http import HttpServer
from agentd.metrics import Metrics
from agentd.models import Outcome, RunStatus
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TOKEN = "write-t0ken-for-the-console"
READ = "read-t0ken-for-the-console"
HOSTILE = "<script>alert('x')</script>"
CONFIG = f"""
tasks:
  alpha:
    description: "{HOSTILE}"
    schedule: {{every: 1h}}
    command: {{argv: ["true"]}}
  beta:
    schedule: {{manual: true}}
    command: {{argv: ["true"]}}
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
    clock: ManualClock
    client: httpx.AsyncClient

    def quarantined_run(self, error: str = "boom") -> str:
        self.clock.advance(1)
        run_id = str(self.control.trigger("beta")["run_id"])
        rows = self.store.claim(self.clock.now(), "w1", 30, 10, set(), {"beta"})
        assert run_id in [r["id"] for r in rows]
        self.clock.advance(1)
        self.store.finish(
            run_id,
            self.clock.now(),
            outcome=Outcome.FAILURE,
            next_status=RunStatus.QUARANTINED,
            error=error,
        )
        return run_id


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    token: str | None = None,
    read_token: str | None = None,
    settings: HttpServerConfig | None = None,
    started: bool = True,
    registry: CollectorRegistry | None = None,
    on_auth_failure: Callable[[str], None] | None = None,
) -> AsyncIterator[Env]:
    config = parse_config(CONFIG, environ={})
    clock = ManualClock(T0)
    bus = EventBus()
    store = SqliteStore(tmp_path / "state.sqlite", event_sink=bus.publish)
    store.sync_tasks({tid: (t.fingerprint(), t.kind) for tid, t in config.tasks.items()}, T0)
    control = Control(store, config, clock)
    server = HttpServer(
        control=control,
        health=Health(started=started),
        registry=registry or CollectorRegistry(),
        bus=bus,
        status=lambda: {"pid": 1},
        clock=clock,
        token=token,
        read_token=read_token,
        settings=settings,
        on_auth_failure=on_auth_failure,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=20
        ) as client:
            yield Env(store, control, clock, client)
    finally:
        await server.stop()
        store.conn.close()


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/ui/login", data={"token": token, "next": "/ui/quarantine"})


def test_render_escapes_every_value_but_markup() -> None:
    out = render("<p title='{t}'>{b}</p>{m}", t="' onclick='x", b=HOSTILE, m=Markup("<br>"))
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert out == f"<p title='&#x27; onclick=&#x27;x'>{escaped}</p><br>"
    assert join(["<a>", Markup("<b>")]) == "&lt;a&gt;<b>"
    assert render("{v}", v=render("{x}", x="<")) == "&lt;"  # escaped once, not twice


def test_every_page_escapes_what_the_state_holds(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as env:
            run_id = env.quarantined_run(error=HOSTILE)
            pages = ["tasks", "runs", f"runs/{run_id}", "quarantine", f"quarantine/{run_id}/drop"]
            pages += ["approvals", "spend", "alerts", "nodes"]
            for page in pages:
                r = await env.client.get(f"/ui/{page}")
                assert r.status_code == 200, (page, r.text)
                assert r.headers["content-type"] == "text/html; charset=utf-8"
                assert "script-src 'self'" in r.headers["content-security-policy"]
                assert "<script>alert" not in r.text, page
                assert '<meta name="viewport"' in r.text
            tasks = await env.client.get("/ui/tasks")
            assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in tasks.text
            detail = await env.client.get(f"/ui/runs/{run_id}")
            assert "&lt;script&gt;" in detail.text
            missing = await env.client.get("/ui/runs/nope")
            assert missing.status_code == 404 and "no run" in missing.text

    run(body)


def test_sign_in_sets_a_cookie_worth_what_the_token_is(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, token=TOKEN, read_token=READ) as env:
            c = env.client
            run_id = env.quarantined_run()
            r = await c.get("/ui/tasks?x=1")
            assert r.status_code == 303
            where = httpx.URL(r.headers["location"])
            assert where.path == "/ui/login" and where.params["next"] == "/ui/tasks?x=1"
            assert (await c.get("/ui/static/console.css")).status_code == 200
            assert (await c.get("/ui/login")).status_code == 200
            wrong = await sign_in(c, "not-it")
            assert wrong.status_code == 401 and "set-cookie" not in wrong.headers

            ok = await sign_in(c, READ)
            assert ok.status_code == 303 and ok.headers["location"] == "/ui/quarantine"
            cookie = ok.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
            assert READ not in cookie and TOKEN not in cookie
            page = await c.get("/ui/quarantine")
            assert page.status_code == 200 and "signed in (read-only)" in page.text
            # The read token looks, and may not act.
            form = await c.get(f"/ui/quarantine/{run_id}/release")
            assert " disabled" in form.text
            refused = await c.post(f"/ui/quarantine/{run_id}/release", data={"csrf": csrf_of(form)})
            assert refused.status_code == 403
            assert env.store.get_run(run_id)["status"] == "quarantined"

            await sign_in(c, TOKEN)
            form = await c.get(f"/ui/quarantine/{run_id}/release")
            assert " disabled" not in form.text
            # On the API the cookie reads (the live updates' stream) and never writes.
            assert (await c.get("/v1/tasks")).status_code == 200
            write = await c.post(f"/v1/quarantine/{run_id}/release")
            assert write.status_code == 401
            assert env.store.get_run(run_id)["status"] == "quarantined"
            done = await c.post(f"/ui/quarantine/{run_id}/release", data={"csrf": csrf_of(form)})
            assert done.status_code == 303
            assert done.headers["location"] == f"/ui/quarantine?done=release&run={run_id}"
            assert env.store.get_run(run_id)["status"] == "queued"

            # A bearer header works on /ui as on the API; a forged cookie does not.
            base = str(c.base_url)
            hdr = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=base, trust_env=False, headers=hdr) as bare:
                assert (await bare.get("/ui/tasks")).status_code == 200
            forged = {"agentd_console": "w.00"}
            async with httpx.AsyncClient(base_url=base, trust_env=False, cookies=forged) as bad:
                assert (await bad.get("/ui/tasks")).status_code == 303
                assert (await bad.get("/v1/tasks")).status_code == 401

            out = await c.post("/ui/logout", data={"csrf": csrf_of(form)})
            assert out.status_code == 303 and 'agentd_console=""' in out.headers["set-cookie"]
            assert (await c.get("/ui/tasks")).status_code == 303

            nxt = await c.post("/ui/login", data={"token": TOKEN, "next": "//evil.example/ui"})
            assert nxt.headers["location"] == "/ui/tasks"  # no open redirect

    run(body)


def test_wrong_tokens_are_counted_and_logged_at_most_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client guessing tokens (console sign-ins, API bearers) moves
    ``agentd_http_auth_failures_total`` per attempt, and the log says so once per
    ``NOTE_EVERY_S``, not once per attempt."""
    metrics = Metrics("test")

    async def body() -> None:
        async with serving(
            tmp_path,
            token=TOKEN,
            registry=metrics.registry,
            on_auth_failure=lambda surface: metrics.auth_failures.labels(surface).inc(),
        ) as env:
            for i in range(20):
                assert (await sign_in(env.client, f"guess-{i}")).status_code == 401
            for i in range(7):
                bad = {"Authorization": f"Bearer guess-{i}"}
                assert (await env.client.get("/v1/tasks", headers=bad)).status_code == 401
            assert (await sign_in(env.client, TOKEN)).status_code == 303
            text = (await env.client.get("/metrics")).text
        found = {
            s.labels["surface"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "agentd_http_auth_failures_total"
        }
        assert found == {"api": 7.0, "console": 20.0}

    with caplog.at_level(logging.WARNING, logger="agentd"):
        run(body)
    refused = [r for r in caplog.records if "sign-in refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]


def test_actions_need_the_csrf_value_and_a_same_origin_form_even_without_a_token(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            run_id = env.quarantined_run()
            form = await c.get(f"/ui/quarantine/{run_id}/drop")
            csrf = csrf_of(form)
            missing = await c.post(f"/ui/quarantine/{run_id}/drop", data={})
            assert missing.status_code == 403
            forged = await c.post(f"/ui/quarantine/{run_id}/drop", data={"csrf": "0" * 40})
            assert forged.status_code == 403
            elsewhere = await c.post(
                f"/ui/quarantine/{run_id}/drop",
                data={"csrf": csrf},
                headers={"Origin": "http://evil.example"},
            )
            assert elsewhere.status_code == 403
            assert env.store.get_run(run_id)["status"] == "quarantined"
            done = await c.post(
                f"/ui/quarantine/{run_id}/drop",
                data={"csrf": csrf},
                headers={"Origin": str(c.base_url).rstrip("/")},
            )
            assert done.status_code == 303
            assert env.store.get_run(run_id)["status"] == "dropped"
            again = await c.post(f"/ui/quarantine/{run_id}/drop", data={"csrf": csrf})
            assert again.status_code == 409 and "quarantine" in again.text
            bad = await c.post(f"/ui/approvals/{run_id}/maybe", data={"csrf": csrf})
            assert bad.status_code == 404

    run(body)


def test_console_off_leaves_ui_unrouted_and_the_startup_gate(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path / "a", settings=HttpServerConfig(console=False)) as env:
            r = await env.client.get("/ui/tasks")
            assert r.status_code == 404 and r.json()["error"] == "not_found"
        async with serving(tmp_path / "b", started=False) as env:
            r = await env.client.get("/ui/tasks")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "starting up" in r.text

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(body)
