"""Who may ask what (issue 23): with a token configured every request but the probes
needs one, a read token only reads, and ``/metrics`` is open unless told otherwise.

The real aiohttp app on a loopback port (``serving`` from test_http), and a real daemon
bound beyond loopback with the CLI in front of it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd
from test_http import TOKEN, assert_error, run, serving

from agentd.config import ConfigError, HttpServerConfig, parse_config

READ_TOKEN = "r3ad-only-t0ken-value"
WRITE = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
PROBES = ("/healthz", "/readyz")


def operations(doc: dict[str, Any], run_id: str) -> list[tuple[str, str]]:
    """Every documented (method, path) but the probes, with real ids filled in."""
    out = []
    for path, ops in doc["paths"].items():
        if path in PROBES:
            continue
        concrete = path.replace("{task_id}", "alpha").replace("{run_id}", run_id)
        out += [(method.upper(), concrete) for method in ops]
    return out


async def status_of(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> int:
    """The status only: a stream is closed as soon as its head is in."""
    async with client.stream(method, path, headers=headers) as response:
        return response.status_code


def test_every_route_but_the_probes_needs_a_token_and_a_read_token_only_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(tmp_path, token=TOKEN, read_token=READ_TOKEN) as env:
            c = env.client
            run_id = env.fire()
            doc = (await c.get("/v1/openapi.json", headers=READ)).json()
            ops = operations(doc, run_id)
            assert len(ops) == 28  # the 30 documented operations but /healthz and /readyz
            assert ("GET", "/metrics") in ops and ("GET", "/v1/openapi.json") in ops
            for method, path in ops:
                if path == "/metrics":
                    continue  # open by default: below
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    response = await c.request(method, path, headers=headers)
                    assert_error(response, 401, "unauthorized")
                    assert response.headers["www-authenticate"] == "Bearer", (method, path)
                reading = await status_of(c, method, path, READ)
                if method == "POST":
                    assert reading == 403, (method, path)
                    body = (await c.request(method, path, headers=READ)).json()
                    assert body["error"] == "forbidden"
                else:  # 404 for the quarantine entry of a run not in quarantine
                    assert reading in (200, 204, 404), (method, path, reading)
            # Nothing was triggered, paused or cancelled by the refused POSTs.
            assert [(r["id"], r["status"]) for r in env.store.list_runs()] == [(run_id, "queued")]
            assert not env.control.get_task("alpha")["paused"]
            for method, path in ops:
                writing = await status_of(c, method, path, WRITE)
                assert writing not in (401, 403), (method, path, writing)
            # Unknown routes are no map for the unauthenticated either.
            assert_error(await c.get("/v1/nope"), 401, "unauthorized")
            assert_error(await c.get("/v1/nope", headers=READ), 404, "not_found")
            for path in (*PROBES, "/metrics"):
                assert (await c.get(path)).status_code == 200, path
            assert (await c.head("/v1/tasks")).status_code == 401
            assert (await c.head("/v1/tasks", headers=READ)).status_code == 200

    with caplog.at_level(logging.DEBUG):
        run(main)
    assert TOKEN not in caplog.text and READ_TOKEN not in caplog.text


def test_metrics_require_token_guards_metrics_but_never_the_probes(tmp_path: Path) -> None:
    settings = HttpServerConfig(token_env="T", metrics_require_token=True)

    async def main() -> None:
        async with serving(tmp_path, token=TOKEN, settings=settings) as env:
            assert_error(await env.client.get("/metrics"), 401, "unauthorized")
            assert (await env.client.get("/metrics", headers=WRITE)).status_code == 200
            for path in PROBES:
                assert (await env.client.get(path)).status_code == 200

    run(main)


def test_without_a_token_configured_everything_stays_open(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            for path in ("/v1/tasks", "/v1/events", "/v1/openapi.json", "/metrics"):
                assert (await env.client.get(path)).status_code == 200

    run(main)


def test_a_read_token_alone_and_metrics_require_token_alone_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="read token alone"):
        parse_config("daemon: {http: {read_token_env: R}}\ntasks: {}\n", environ={"R": READ_TOKEN})
    with pytest.raises(ConfigError, match="no token to require"):
        parse_config("daemon: {http: {metrics_require_token: true}}\ntasks: {}\n", environ={})
    ok = parse_config(
        "daemon: {http: {token_env: W, read_token_file: /r, metrics_require_token: true}}\n"
        "tasks: {}\n",
        environ={},
    )
    assert ok.daemon.http.read_token_file == Path("/r")


@pytest.mark.e2e
def test_the_cli_reads_through_a_guarded_daemon_with_either_token(tmp_path: Path) -> None:
    """A daemon on all interfaces with both tokens: a bare GET is refused, and the CLI's
    reads (status, runs, events, the live stream) carry the token it finds: the full one,
    or the read token where only that is configured for it."""
    tasks = """
        job:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    d = Agentd(tmp_path, tasks)
    d.write_config(
        tasks,
        f"http: {{host: 0.0.0.0, port: {d.port}, token_env: AGENTD_T, read_token_env: AGENTD_R}}",
    )
    secrets = {"AGENTD_T": TOKEN, "AGENTD_R": READ_TOKEN}
    d.start(env=secrets)
    try:
        assert httpx.get(f"{d.url}/v1/runs", timeout=10).status_code == 401
        assert httpx.get(f"{d.url}/readyz", timeout=10).status_code == 200

        def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            base = {k: v for k, v in os.environ.items() if k not in (*secrets, "AGENTD_TOKEN")}
            cmd = [sys.executable, "-m", "agentd.cli", args[0], "--config", str(d.config)]
            return subprocess.run(
                [*cmd, *args[1:]], capture_output=True, text=True, timeout=60, env={**base, **env}
            )

        full = cli("trigger", "job", "--json", env=secrets)
        assert full.returncode == 0, full.stderr
        run_id = json.loads(full.stdout)["run_id"]
        d.wait_status(run_id, "succeeded")
        reader = {"AGENTD_R": READ_TOKEN}  # this operator has only the read token
        status = cli("status", "--json", env=reader)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["daemon"] == "running"
        runs = cli("runs", "--json", env=reader)
        assert runs.returncode == 0, runs.stderr
        assert run_id in runs.stdout
        events = cli("events", "--json", env=reader)
        assert events.returncode == 0 and run_id in events.stdout, events.stderr
        watch = cli("runs", "watch", run_id, env=reader)
        assert watch.returncode == 0 and "success" in watch.stdout, watch.stderr
        # The read token cannot write; the daemon's 403 is the CLI's error.
        refused = cli("trigger", "job", env=reader)
        assert refused.returncode == 1 and "only reads" in refused.stderr, refused.stderr
        # No token at all: the daemon's 401, not a silent fall back to the state DB.
        bare = cli("runs", env={})
        assert bare.returncode == 1 and "Authorization" in bare.stderr, bare.stderr
        assert len(d.runs()) == 1
    finally:
        assert d.stop() == 0
    assert TOKEN not in d.log() and READ_TOKEN not in d.log()
