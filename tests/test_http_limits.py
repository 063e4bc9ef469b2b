"""Bounded connections (issue 23): a header timeout, caps on connections and event
streams that the probes survive, parser refusals as JSON without tracebacks, and a
client that goes away as no error.

The real aiohttp app on a loopback port (``serving`` from test_http) spoken to with raw
sockets, and real daemons for the log's view of resets and of running out of file
descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd, wait_for
from test_http import TOKEN, Env, assert_error, run, serving, wait_until

from agentd.config import HttpServerConfig

JOB = """
job:
  schedule: {manual: true}
  command: {argv: ["true"]}
"""


def busy(env: Env) -> int:
    """Connections the server has that are not waiting for a request."""
    return sum(not c.waiting() for c in env.server._connections.open)


def port_of(env: Env) -> int:
    return int(str(env.client.base_url).rsplit(":", 1)[1].rstrip("/"))


async def raw(env: Env, data: bytes = b"", rcvbuf: int | None = None) -> tuple[Any, Any]:
    """A connection that sends ``data`` and then nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port_of(env)))
    reader, writer = await asyncio.open_connection(sock=sock)
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 20.0) -> bytes:
    """Everything the server sent until it closed the connection (fails on a timeout)."""
    return await asyncio.wait_for(reader.read(), timeout)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@contextlib.asynccontextmanager
async def streams(env: Env, count: int) -> AsyncIterator[list[httpx.Response]]:
    """``count`` open global event streams, each known to the server."""
    async with contextlib.AsyncExitStack() as stack:
        opened = []
        for _ in range(count):
            response = await stack.enter_async_context(
                env.client.stream("GET", "/v1/events/stream")
            )
            assert response.status_code == 200
            opened.append(response)
        await wait_until(lambda: env.bus.subscribers == count, "the streams to subscribe")
        yield opened


def test_half_sent_and_silent_connections_are_closed_after_client_timeout(tmp_path: Path) -> None:
    """50 half-sent request lines, 10 connections that send nothing and an idle keep-alive
    connection are all closed by the server within ``client_timeout`` (0.5 s here), and
    the server answers meanwhile. (Before: nothing closed them for an hour.)"""
    settings = HttpServerConfig(client_timeout=0.5)

    async def main() -> None:
        async with serving(tmp_path, settings=settings) as env:
            started = time.monotonic()
            half = [await raw(env, b"GET /v1/status HTT") for _ in range(50)]
            half += [
                await raw(env, b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(5)
            ]
            silent = [await raw(env) for _ in range(10)]
            keep = await raw(env, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await env.client.get("/healthz")).status_code == 200
            for reader, _ in [*half, *silent]:
                assert await closed_by_server(reader) == b""
            answered = await closed_by_server(keep[0])
            assert parse_response(answered)[0] == 200  # answered, then closed when idle
            assert time.monotonic() - started < 15
            for _, writer in [*half, *silent, keep]:
                writer.close()
            # (env.client's own idle connection was closed too: a fresh one.)
            async with httpx.AsyncClient(base_url=env.client.base_url, trust_env=False) as fresh:
                assert (await fresh.get("/healthz")).status_code == 200

    run(main)


def test_a_body_that_does_not_arrive_is_408_json(tmp_path: Path) -> None:
    settings = HttpServerConfig(client_timeout=0.5)

    async def main() -> None:
        async with serving(tmp_path, settings=settings) as env:
            reader, writer = await raw(
                env,
                b"POST /v1/tasks/beta/trigger HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            )
            status, headers, body = parse_response(await closed_by_server(reader))
            assert status == 408 and headers["content-type"].startswith("application/json")
            assert json.loads(body)["error"] == "request_timeout"
            assert env.store.list_runs() == []
            writer.close()

    run(main)


def test_streams_past_max_streams_get_503_with_retry_after(tmp_path: Path) -> None:
    settings = HttpServerConfig(max_streams=2, max_connections=16)

    async def main() -> None:
        async with serving(tmp_path, settings=settings) as env:
            async with streams(env, 2):
                for path in ("/v1/events/stream", f"/v1/runs/{env.fire()}/events/stream"):
                    refused = await env.client.get(path)
                    assert_error(refused, 503, "too_many_streams")
                    assert int(refused.headers["retry-after"]) >= 1
                for path in ("/healthz", "/readyz", "/v1/tasks"):
                    assert (await env.client.get(path)).status_code == 200
            await wait_until(lambda: env.bus.subscribers == 0, "the streams to end")
            async with streams(env, 2):
                pass

    run(main)


def test_probes_answer_when_every_connection_is_taken(tmp_path: Path) -> None:
    """At ``max_connections`` (4): a new connection evicts the oldest one waiting for a
    request; with all four busy (three streams and a POST whose body is coming), it is
    one of the probes' reserve: /healthz and /readyz answer, the API says 503."""
    settings = HttpServerConfig(max_connections=4, max_streams=3, client_timeout=60)

    async def main() -> None:
        async with serving(tmp_path, settings=settings) as env:
            waiting = [await raw(env, b"GET /v1/status HTT") for _ in range(4)]
            await wait_until(lambda: len(env.server._connections.open) == 4, "4 connections")
            async with httpx.AsyncClient(base_url=env.client.base_url, trust_env=False) as fresh:
                assert (await fresh.get("/healthz")).status_code == 200
            assert await closed_by_server(waiting[0][0]) == b""  # the oldest went
            for _, writer in waiting:
                writer.close()

            async with streams(env, 3):
                body = await raw(
                    env,
                    b"POST /v1/tasks/beta/trigger HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 10\r\n\r\n{",
                )
                await wait_until(lambda: busy(env) == 4, "4 busy")
                for _ in range(3):  # fresh connections each time: every one a reserve one
                    async with httpx.AsyncClient(
                        base_url=env.client.base_url, trust_env=False, timeout=20
                    ) as fresh:
                        assert (await fresh.get("/healthz")).status_code == 200
                        assert (await fresh.get("/readyz")).status_code == 200
                    async with httpx.AsyncClient(
                        base_url=env.client.base_url, trust_env=False, timeout=20
                    ) as fresh:
                        refused = await fresh.get("/v1/tasks")
                        assert_error(refused, 503, "too_many_connections")
                        assert refused.headers["retry-after"] == "1"
                body[1].close()

    run(main)


def test_past_the_reserve_a_connection_gets_a_503_json_and_is_closed(tmp_path: Path) -> None:
    settings = HttpServerConfig(max_connections=2, max_streams=1, client_timeout=60)

    async def main() -> None:
        async with serving(tmp_path, settings=settings, probe_reserve=0) as env, streams(env, 1):
            body = await raw(
                env, b"POST /v1/tasks/beta/trigger HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
            )
            await wait_until(lambda: busy(env) == 2, "2 busy")
            reader, writer = await raw(env)
            status, headers, body_bytes = parse_response(await closed_by_server(reader))
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["content-type"].startswith("application/json")
            assert json.loads(body_bytes)["error"] == "too_many_connections"
            writer.close()
            body[1].close()
            await wait_until(lambda: len(env.server._connections.open) == 1, "the POST gone")
            assert (await env.client.get("/healthz")).status_code == 200

    run(main)


def test_a_stream_client_that_stops_reading_is_cut_off(tmp_path: Path) -> None:
    settings = HttpServerConfig(client_timeout=0.5)

    async def main() -> None:
        async with serving(tmp_path, settings=settings) as env:
            _, writer = await raw(
                env, b"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n", rcvbuf=4096
            )
            await wait_until(lambda: env.bus.subscribers == 1, "the stream to subscribe")
            big = "x" * (1 << 20)
            for i in range(1, 21):  # 20 MiB: more than both sockets' buffers hold
                env.bus.publish(
                    {"id": 10**6 + i, "ts": "t", "kind": "progress", "task_id": "beta",
                     "run_id": None, "data": {"message": big}}
                )  # fmt: skip
            await wait_until(lambda: env.bus.subscribers == 0, "the stalled stream to end")
            assert (await env.client.get("/healthz")).status_code == 200
            writer.close()

    run(main)


MALFORMED = [
    b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 65536 + b"\r\n\r\n",
    b"NOT A REQUEST LINE\r\n\r\n",
    b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b"\x01\r\n\r\n",
    b"GET /v1/tasks HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to the HTTP port
]


def test_parser_refusals_are_json_and_logged_once_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(tmp_path, token=TOKEN) as env:
            for _ in range(5):
                for request in MALFORMED:
                    reader, writer = await raw(env, request)
                    status, headers, body = parse_response(await closed_by_server(reader))
                    assert status == 400, request[:40]
                    assert headers["content-type"].startswith("application/json"), request[:40]
                    error = json.loads(body)
                    assert set(error) == {"error", "message"} and error["error"] == "bad_request"
                    assert TOKEN not in error["message"] and len(error["message"]) < 300
                    writer.close()
            assert (await env.client.get("/healthz")).status_code == 200

    with caplog.at_level(logging.DEBUG):
        run(main)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert TOKEN not in caplog.text
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # 30 refusals, one line a minute


@pytest.mark.e2e
def test_clients_resetting_streams_before_their_headers_log_no_error(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """50 clients send a stream request and reset the connection at once (SO_LINGER 0):
    before, 50 'ERROR unhandled error' tracebacks and 500s; now not one."""
    d = make_daemon(JOB).start()
    run_id = d.trigger("job")
    d.wait_status(run_id, "succeeded")
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        path = "/v1/events/stream" if i % 2 else f"/v1/runs/{run_id}/events/stream?after=0"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.close()
    # The last one's access line follows its handler: wait for 50 of them.
    wait_for(lambda: d.log().count("events/stream") >= 50, what="50 access lines")
    assert httpx.get(d.url + "/healthz", timeout=10).status_code == 200
    log = d.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    assert '/stream HTTP/1.1" 500' not in log
    assert d.stop() == 0


@pytest.mark.e2e
def test_running_out_of_file_descriptors_is_one_log_line_and_probes_recover(
    tmp_path: Path,
) -> None:
    """A daemon allowed 64 file descriptors, 200 connections that send nothing: accept()
    fails with EMFILE. Before: ~2,000 asyncio tracebacks a second (10,164 in this test).
    Now one warning line (a minute), the oldest waiting connections are closed to make
    room, so probes still answer, and all is well once the clients are gone."""
    d = Agentd(tmp_path, JOB)
    limit = 64

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with d.log_path.open("ab") as out:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "agentd.cli", "run", "--config", str(d.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            preexec_fn=low_nofile,
        )
    try:
        d.wait_log("agentd started", "the daemon to start")
        clients = []
        for _ in range(200):
            clients.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
        # (asyncio's own accept loop says "socket.accept() out of system resource".)
        wait_for(
            lambda: "cannot accept connections" in d.log() or "out of system resource" in d.log(),
            what="accept() to fail with EMFILE",
        )
        probe = wait_for(
            lambda: httpx.get(d.url + "/healthz", timeout=5).status_code == 200,
            what="a probe through the full daemon",
        )
        assert probe
        time.sleep(2)  # what would have been ~4,000 tracebacks
        for sock in clients:
            sock.close()
        wait_for(
            lambda: httpx.get(d.url + "/v1/status", timeout=5).status_code == 200,
            what="the API once the clients are gone",
        )
        run_id = d.trigger("job")
        d.wait_status(run_id, "succeeded")
    finally:
        code = d.stop()
    log = d.log()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert log.count("cannot accept connections") == 1
    assert "RLIMIT_NOFILE is 64, below daemon.http.max_connections" in log
    assert len(log) < 200_000
