"""agentd's HTTP surface: probes, metrics, the JSON operator API and live event streams.

Handlers are thin: parse and check the input, call ``Control`` (the one implementation
of every operator operation, shared with the CLI), shape the output. State work is
synchronous SQLite on the loop thread, by design: a request is a few indexed queries.

Every error is JSON ``{"error": <stable code>, "message": ...}``, whatever raised it: a
refusal from the store, bad input, aiohttp's own 404/405, or a bug (500, logged with
its traceback, answered without it).

Auth: with a token configured (``token_env``/``token_file``), every request but the
probes, and ``/metrics`` unless ``metrics_require_token``, needs ``Authorization: Bearer``
with either that token (full access) or the read token (``read_token_*``: GET and HEAD
only, the event streams included; anything else with it is 403). No token or a wrong
one is 401 with ``WWW-Authenticate: Bearer``. Tokens are only compared
(``hmac.compare_digest``), never logged, and neither is the Authorization header: the
access log line carries the request line, status, size, referer and user agent only.

Connections are bounded (``HttpServerConfig``): agentd runs its own accept loop, so a
connection past ``max_connections`` evicts the oldest one waiting for a request, then
uses a small reserve that may only ask the probes, and past that is answered 503 and
closed; running out of file descriptors (EMFILE) is one log line a minute, not one per
attempt. A client gets ``client_timeout`` for its request head, again for a body, and
again for each event-stream write it does not read. Parser-level refusals (a 64 KiB
line, a malformed header) are JSON errors too, logged in one rate-limited line that
never repeats the request's bytes (they may hold a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import resource
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from agentd.clock import Clock, to_iso
from agentd.config import HttpServerConfig
from agentd.console import Console
from agentd.control import Control
from agentd.events import Event, EventBus, Subscription
from agentd.health import Health
from agentd.models import (
    APPROVAL_DECISIONS,
    FINAL_STATUSES,
    MAX_EVENT_ID,
    EventKind,
    StateRefused,
)
from agentd.openapi import openapi_document
from agentd.redact import SecretUnavailable, read_secret
from agentd.runner import workspace_path
from agentd.runoutput import (
    MAX_OUTPUT_OFFSET,
    MIN_PAGE,
    OUTPUT_PAGE,
    OUTPUT_STREAMS,
    read_output,
)
from agentd.state.port import StorageFault

log = logging.getLogger("agentd.http")
access_log = logging.getLogger("agentd.http.access")

QUIET_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
"""Polled every few seconds by kubelet and Prometheus: no access log line for them."""
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz"})
"""Never need a token, and are what the connection reserve may still ask."""

READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
UNGATED_PATHS: Final = frozenset({"/v1/openapi.json"})
RETRY_LATER: Final[Mapping[str, str]] = {"Retry-After": "1"}
STREAMS_RETRY_S: Final = 5
PROBE_RESERVE: Final = 8
"""Connections past ``max_connections`` that may only ask ``/healthz`` and ``/readyz``
(when no connection waiting for a request can be evicted for a new one)."""
ACCEPT_RETRY_S: Final = 0.5
"""After an accept failed for lack of resources (EMFILE) with nothing to evict."""
NOTE_EVERY_S: Final = 60.0
"""A spammable condition (refused connections, malformed requests, EMFILE) is logged
at most once per this, with the count of the ones held back."""
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FD_HEADROOM: Final = 64
"""File descriptors the rest of the daemon wants beside ``max_connections`` (the DB,
commands' pipes, providers' sockets): less than that under RLIMIT_NOFILE is warned of."""
BACKFILL_PAGE: Final = 500
DEFAULT_PAUSE_REASON: Final = "paused via API"
KEEPALIVE: Final = b": keep-alive\n\n"

STORE_ERROR_STATUS: Final[Mapping[str, int]] = {
    "unknown_task": 404,
    "unknown_run": 404,
    "not_quarantined": 404,
    "not_awaiting_approval": 409,
    "wrong_call": 409,
    "bad_decision": 400,
    "not_resumable": 409,
    "run_finished": 409,
    "task_inactive": 409,
    "idempotency_conflict": 409,
    "bad_request": 400,
}
HTTP_ERROR_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    414: "uri_too_long",
    431: "header_too_large",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}
FINAL_EVENT_KINDS: Final = frozenset(
    {
        EventKind.SUCCESS,
        EventKind.FAILURE,
        EventKind.TIMEOUT,
        EventKind.CANCEL,
        EventKind.QUARANTINE,
        EventKind.SKIP,
        EventKind.BUDGET_EXHAUSTED,
    }
)
"""Event kinds after which a run may have reached a final status (checked in the DB)."""

_UINT_RE = re.compile(r"[0-9]{1,19}")
_SPACED_OFFSET_RE = re.compile(r"(?<=\d) (?=\d{2}(:?\d{2})?$)")


class BindRefused(Exception):
    """Listening beyond loopback without a token would hand the API to the network."""


class TokenError(BindRefused):
    """A token source is configured but yields no token; the message never holds the token.

    A ``BindRefused``: an operator who asked for a token must not get an open API."""


class RequestRefused(Exception):
    """A request this API refuses: answered as JSON ``{"error": code, "message"}`` with
    ``status`` (and ``headers``). Not ``client.ApiError``, which is the CLI's view of
    such an answer."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


# ---------------------------------------------------------------- token and bind


def _load_secret(
    env_name: str | None, path: Path | None, env: Mapping[str, str], what: str
) -> str | None:
    """``redact.read_secret``, its refusal a ``TokenError``: an operator who asked for a
    token must not get an open API."""
    try:
        return read_secret(env_name, path, what, env)
    except SecretUnavailable as exc:
        raise TokenError(str(exc)) from None


def load_token(cfg: HttpServerConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The full-access API token from ``token_env`` (preferred) or ``token_file``.

    None when neither is configured. A configured source that is empty or unreadable is
    a ``TokenError``: an operator who asked for a token must not get an open API.
    """
    env = os.environ if environ is None else environ
    return _load_secret(cfg.token_env, cfg.token_file, env, "API token")


def load_read_token(cfg: HttpServerConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The read-only token from ``read_token_env`` (preferred) or ``read_token_file``;
    None when neither is configured, a ``TokenError`` when a configured one yields none."""
    env = os.environ if environ is None else environ
    return _load_secret(cfg.read_token_env, cfg.read_token_file, env, "read token")


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def check_bind(cfg: HttpServerConfig, token: str | None) -> None:
    """Refuse a non-loopback listen address unless a token guards it (or the operator
    explicitly said ``allow_insecure_bind``)."""
    if is_loopback(cfg.host) or token or cfg.allow_insecure_bind:
        return
    shown = cfg.host or "<all interfaces>"
    raise BindRefused(
        f"refusing to serve the API on {shown}:{cfg.port} without a token: anyone who can "
        "reach it could trigger, pause and cancel tasks. Set daemon.http.token_env or "
        "daemon.http.token_file, bind to 127.0.0.1, or set "
        "daemon.http.allow_insecure_bind: true if something else guards the port."
    )


# ---------------------------------------------------------------- small helpers


class _QuietAccessLogger(AccessLogger):
    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in QUIET_PATHS:
            return
        super().log(request, response, time)


_dumps = partial(json.dumps, default=str)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json({"error": code, "message": message}, status, headers)


def _bad(message: str) -> RequestRefused:
    return RequestRefused(400, "bad_request", message)


def _query(request: web.Request, name: str) -> str | None:
    """A query parameter; absent and empty are the same (HTML forms send empty ones)."""
    value = request.query.get(name)
    return value if value else None


def _parse_uint(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    if not _UINT_RE.fullmatch(value) or not lo <= int(value) <= hi:
        raise _bad(f"{name} must be an integer from {lo} to {hi}")
    return int(value)


def _parse_instant(value: str, name: str) -> datetime:
    """An aware ISO 8601 date-time (a body field), within datetime's range in UTC."""
    hint = f"{name} must be an ISO 8601 date-time with a UTC offset, e.g. 2026-03-01T12:00:00Z"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(hint) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _bad(hint + " (no offset given)")
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise _bad(f"{name} is out of range") from None
    return moment


def _parse_time(value: str | None, name: str) -> str | None:
    """An aware ISO 8601 date-time, as the store's fixed-width UTC text."""
    if value is None:
        return None
    # An unencoded '+' in a query string arrives as a space: "12:00:00 02:00".
    text = _SPACED_OFFSET_RE.sub("+", value)
    hint = f"{name} must be an ISO 8601 date-time with a UTC offset, e.g. 2026-03-01T12:00:00Z"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(hint) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _bad(hint + " (no offset given)")
    try:
        return to_iso(moment)
    except (OverflowError, ValueError):
        raise _bad(f"{name} is out of range") from None


async def _json_body(
    request: web.Request, fields: frozenset[str] = frozenset(), timeout_s: float = 10.0
) -> dict[str, Any]:
    """An optional JSON object body with only ``fields``; no body is ``{}``. A body not
    in within ``timeout_s`` is a 408 (and the connection is closed)."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestRefused(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s",
        ) from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
    return body


INLINE_METRICS_S: Final = 0.005
"""A scrape that last rendered faster than this renders on the loop: a hop to a thread
costs more than it saves when the loop is busy and the text small."""


def _metrics_handler(registry: CollectorRegistry) -> Handler:
    """The exposition, rendered (and compressed) in a thread once it is big.

    Every task that has run has ~40 lines (two histograms): with hundreds of active
    tasks the text is large, and rendering it on the loop stalled probes, fires and runs
    for each scrape. In a thread the loop gets the GIL back every switch interval.
    prometheus-client's registry is safe to read from a thread while the loop
    counts. Content negotiation (OpenMetrics), ``name[]`` filtering and gzip are as
    with prometheus-client's own handlers.
    """
    last_render_s = 0.0

    def render(accept: str, accept_encoding: str, names: list[str]) -> tuple[bytes, str, bool]:
        nonlocal last_render_s
        started = time.perf_counter()
        encoder, content_type = choose_encoder(accept)
        source = registry.restricted_registry(names) if names else registry
        body = encoder(source)
        gzipped = gzip_accepted(accept_encoding)
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        last_render_s = time.perf_counter() - started
        return body, content_type, gzipped

    async def metrics(request: web.Request) -> web.StreamResponse:
        args = (
            ",".join(request.headers.getall("Accept", [])),
            request.headers.get("Accept-Encoding", ""),
            request.query.getall("name[]", []),
        )
        if last_render_s < INLINE_METRICS_S:
            body, content_type, gzipped = render(*args)
        else:
            body, content_type, gzipped = await asyncio.to_thread(render, *args)
        headers = {"Content-Type": content_type}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    return metrics


def _sse_frame(event: Mapping[str, Any]) -> bytes:
    data = json.dumps(event, default=str, separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['kind']}\ndata: {data}\n\n".encode()


# ---------------------------------------------------------------- connections


class _Notes:
    """Rate-limited log lines for what a client can cause at will: the first of a kind
    is logged at once, later ones at most once per ``every_s``, saying how many were
    held back since the last line."""

    def __init__(self, logger: logging.Logger, every_s: float = NOTE_EVERY_S) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def note(self, level: int, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self.every_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        self._last[kind] = now
        if held:
            message += f" (and {held} more since the last such line)"
        self.logger.log(level, message, *args)


def _client_message(exc: BaseException | None) -> str:
    """What a parser refusal tells the client: aiohttp's reason without the request
    bytes it quotes (they may hold a token; the client has them anyway)."""
    if isinstance(exc, LineTooLong):
        return f"the request line or a header is longer than {exc.args[1]} bytes"
    if isinstance(exc, HttpProcessingError):
        first = (exc.message or "").split("\n", 1)[0].strip().rstrip(":").strip()
        if first and "'" not in first and '"' not in first:
            return f"malformed request: {first[:200]}"
    return "malformed request"


class _Connection(RequestHandler):
    """aiohttp's connection handler, counted by ``_Connections`` and answering parser
    refusals (and its own 500s) with the API's JSON error instead of plain text."""

    def __init__(self, manager: Server, *, connections: _Connections, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.connections = connections
        self.reserve = False
        """Admitted past ``max_connections``: may only ask the probes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connections.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.connections.closed(self)
        super().connection_lost(exc)

    def waiting(self) -> bool:
        """Waiting for a (complete) request: idle keep-alive, or a head half-sent. (The
        two attributes are aiohttp's own, the state its keep-alive timer also reads.)"""
        return not self._request_in_progress and not self._messages

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            # Not a client's doing: a bug below the middleware, with its traceback.
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
            text = "internal error; see the agentd log" if status == 500 else f"error {status}"
        else:
            self.connections.notes.note(
                logging.INFO,
                "malformed",
                "http: refused a malformed request from %s with %d (%s)",
                request.remote or "?",
                status,
                type(exc).__name__ if exc is not None else "parser",
            )
            text = _client_message(exc)
        code = HTTP_ERROR_CODES.get(status, f"http_{status}")
        response = _error(status, code, text)
        response.force_close()
        return response


class _Server(Server):
    """aiohttp's low-level server, making ``_Connection``s."""

    def __init__(self, inner: Server, connections: _Connections) -> None:
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=inner._loop,
            **inner._kwargs,
        )
        self.registry = connections

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, connections=self.registry, **self._kwargs)


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, connections: _Connections, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.connections = connections

    async def _make_server(self) -> Server:
        return _Server(await super()._make_server(), self.connections)


_REFUSED_BODY: Final = json.dumps(
    {
        "error": "too_many_connections",
        "message": "agentd has as many connections open as it allows; retry later",
    }
).encode()
REFUSED_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)
"""Written straight to a socket accepted past every limit, before reading from it."""


class _Connections:
    """The open connections, oldest first, and the accept loops that admit new ones.

    Invariants: at most ``limit`` ordinary connections plus ``reserve`` reserve
    ones are open (an evicted one leaves the count at once, before its socket closes);
    a new connection past ``limit`` first evicts the oldest connection waiting for a
    request, and is a reserve one only when none waits.
    """

    def __init__(self, limit: int, reserve: int = PROBE_RESERVE) -> None:
        self.limit = limit
        self.reserve = reserve
        self.open: dict[_Connection, None] = {}
        self.notes = _Notes(log)
        self._tasks: list[asyncio.Task[None]] = []
        self._tasks_loop: asyncio.AbstractEventLoop | None = None
        self._sockets: list[socket.socket] = []

    def opened(self, conn: _Connection) -> None:
        self.open[conn] = None

    def closed(self, conn: _Connection) -> None:
        self.open.pop(conn, None)

    def evict_waiting(self) -> bool:
        for conn in self.open:
            if conn.waiting():
                del self.open[conn]
                conn.force_close()
                return True
        return False

    def admit(self) -> bool | None:
        """True: an ordinary connection; False: a reserve one; None: refuse it."""
        if len(self.open) < self.limit:
            return True
        if self.evict_waiting():
            self.notes.note(
                logging.INFO,
                "evict",
                "http: %d connections open (daemon.http.max_connections): closed the oldest "
                "one waiting for a request to admit a new one",
                self.limit,
            )
            return True
        if len(self.open) < self.limit + self.reserve:
            self.notes.note(
                logging.WARNING,
                "reserve",
                "http: %d connections open and busy (daemon.http.max_connections): a new "
                "one may only ask /healthz and /readyz",
                self.limit,
            )
            return False
        self.notes.note(
            logging.WARNING,
            "refuse",
            "http: %d connections open and busy and the probes' reserve in use: refusing "
            "new connections with 503",
            len(self.open),
        )
        return None

    async def listen(self, host: str, port: int, factory: Server) -> int:
        """Bind every address ``host`` resolves to (all interfaces for an empty host) and
        start accepting; returns the first socket's port."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, Any]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(128)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._tasks_loop = loop
        self._tasks = [loop.create_task(self._accept(sock, factory)) for sock in self._sockets]
        return int(self._sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting (open connections are the runner's to end)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for sock in self._sockets:
            if self._tasks_loop is not None and sock.fileno() >= 0:
                self._tasks_loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def _accept(self, sock: socket.socket, factory: Server) -> None:
        """asyncio's own accept loop logs a traceback per failed ``accept()`` and, on
        EMFILE, retries it up to its backlog times per wake-up (about 2,000 tracebacks a
        second measured); this one logs a line a minute and frees a descriptor by
        evicting a waiting connection, or waits ``ACCEPT_RETRY_S``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                await _readable(loop, sock)
                continue
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    log.error("http: accept() failed: %s; retrying", exc)
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    continue
                evicted = self.evict_waiting()
                self.notes.note(
                    logging.WARNING,
                    "accept",
                    "http: cannot accept connections: %s (RLIMIT_NOFILE %d, %d connections open)%s",
                    exc.strerror or exc,
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    len(self.open),
                    "; closed the oldest waiting one" if evicted else "",
                )
                # An evicted socket closes on the loop's next turn.
                await asyncio.sleep(0.01 if evicted else ACCEPT_RETRY_S)
                continue
            try:
                admitted = self.admit()
                if admitted is None:
                    with contextlib.suppress(OSError):
                        conn.send(REFUSED_RESPONSE)
                    conn.close()
                    continue
                conn.setblocking(False)
                _, protocol = await loop.connect_accepted_socket(factory, conn)
                if not admitted and isinstance(protocol, _Connection):
                    protocol.reserve = True
            except OSError as exc:
                log.debug("http: dropped a connection while admitting it: %s", exc)
                conn.close()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if sock.fileno() == fd:  # not closed meanwhile (``_Connections.close``)
            loop.remove_reader(fd)


def _fd_headroom_warning(max_connections: int) -> str | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= max_connections + FD_HEADROOM:
        return None
    return (
        f"RLIMIT_NOFILE is {soft}, below daemon.http.max_connections ({max_connections}) "
        f"plus {FD_HEADROOM} for the rest of agentd: accepts may fail with EMFILE before "
        "the connection limit applies (raise LimitNOFILE= or lower max_connections)"
    )


# ---------------------------------------------------------------- the server


class HttpServer:
    def __init__(
        self,
        *,
        control: Control,
        health: Health,
        registry: CollectorRegistry,
        bus: EventBus,
        status: Callable[[], dict[str, Any]],
        clock: Clock,
        token: str | None,
        read_token: str | None = None,
        settings: HttpServerConfig | None = None,
        sse_heartbeat_s: float = 15.0,
        sse_queue_max: int = 1000,
        probe_reserve: int = PROBE_RESERVE,
        on_auth_failure: Callable[[str], None] | None = None,
    ) -> None:
        """``token``: full access; ``read_token``: GET/HEAD only (needs ``token``: a read
        token alone is refused, it would leave the writes open). ``settings``: the limits
        and ``metrics_require_token``; its host, port and token sources are not read.
        ``on_auth_failure(surface)``: each request refused for a missing or wrong token
        (``"api"``: a 401; ``"console"``: a refused sign-in), for a counter."""
        if read_token and not token:
            raise BindRefused("a read token without a full-access token leaves writes open")
        self.control = control
        self.health = health
        self.registry = registry
        self.bus = bus
        self.status = status
        self.clock = clock
        self.settings = settings or HttpServerConfig()
        self._token = token.encode("utf-8", "surrogatepass") if token else None
        self._read_token = read_token.encode("utf-8", "surrogatepass") if read_token else None
        self.sse_heartbeat_s = sse_heartbeat_s
        self.sse_queue_max = sse_queue_max
        self._closing = asyncio.Event()
        self._streams: set[asyncio.Future[None]] = set()
        self._runner: web.AppRunner | None = None
        self._connections = _Connections(self.settings.max_connections, probe_reserve)
        self._notes = self._connections.notes
        self._on_auth_failure = on_auth_failure or (lambda surface: None)
        self._openapi = openapi_document()
        self._console = (
            Console(
                control=control,
                clock=clock,
                started=lambda: self.health.started,
                token=token,
                read_token=read_token,
                client_timeout=self.settings.client_timeout,
                on_refused=self._sign_in_refused,
            )
            if self.settings.console
            else None
        )
        self.app = self._build_app()

    def _sign_in_refused(self, peer: str) -> None:
        """A console sign-in with a wrong token: counted, and logged at most once per
        ``NOTE_EVERY_S`` (a client may send them as fast as it likes)."""
        self._on_auth_failure("console")
        self._notes.note(
            logging.WARNING,
            "console sign-in",
            "console: sign-in refused (wrong token) from=%s",
            peer,
        )

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the bound port."""
        runner = _Runner(
            self.app,
            self._connections,
            handle_signals=False,
            access_log_class=_QuietAccessLogger,
            access_log=access_log,
            # aiohttp closes a connection still waiting for a complete request this
            # long after it connected or after its last response: the header timeout.
            keepalive_timeout=self.settings.client_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        try:
            bound = await self._connections.listen(host, port, runner.server)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._closing.clear()
        warning = _fd_headroom_warning(self.settings.max_connections)
        if warning:
            log.warning("http: %s", warning)
        log.debug("HTTP API listening on %s:%d", host or "*", bound)
        return bound

    async def stop(self, timeout_s: float = 3.0) -> None:
        """End live streams, then stop listening and let in-flight requests finish."""
        self._closing.set()
        self._connections.close()
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=timeout_s)
        runner, self._runner = self._runner, None
        if runner is not None:
            # The runner reads its shutdown timeout at cleanup; aiohttp sets it the same way
            # for the deprecated per-site argument.
            runner._shutdown_timeout = timeout_s
            await runner.cleanup()

    # ------------------------------------------------------------ app and middleware

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[
                self._errors_middleware(),
                self._reserve_middleware(),
                self._auth_middleware(),
                self._startup_middleware(),
            ]
        )
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", _metrics_handler(self.registry))
        r.add_get("/v1/openapi.json", self.openapi)
        r.add_get("/v1/status", self.get_status)
        r.add_get("/v1/tasks", self.list_tasks)
        r.add_get("/v1/tasks/{task_id}", self.get_task)
        r.add_post("/v1/tasks/{task_id}/trigger", self.trigger)
        r.add_post("/v1/tasks/{task_id}/backfill", self.backfill)
        r.add_post("/v1/tasks/{task_id}/pause", self.pause)
        r.add_post("/v1/tasks/{task_id}/resume", self.resume)
        r.add_get("/v1/runs", self.list_runs)
        r.add_get("/v1/runs/{run_id}", self.get_run)
        r.add_post("/v1/runs/{run_id}/cancel", self.cancel)
        r.add_post("/v1/runs/{run_id}/resume", self.resume_run)
        r.add_get("/v1/runs/{run_id}/transcript", self.run_transcript)
        r.add_get("/v1/runs/{run_id}/output", self.run_output)
        r.add_get("/v1/runs/{run_id}/events", self.run_events)
        r.add_get("/v1/runs/{run_id}/events/stream", self.run_stream, allow_head=False)
        r.add_get("/v1/events", self.events)
        r.add_get("/v1/events/stream", self.stream, allow_head=False)
        r.add_get("/v1/spend", self.spend)
        r.add_get("/v1/alerts", self.alerts)
        r.add_get("/v1/nodes", self.nodes)
        r.add_get("/v1/approvals", self.approvals)
        r.add_post("/v1/approvals/{run_id}/{decision}", self.decide)
        r.add_get("/v1/quarantine", self.quarantine_list)
        r.add_get("/v1/quarantine/{run_id}", self.quarantine_show)
        r.add_post("/v1/quarantine/{run_id}/release", self.quarantine_release)
        r.add_post("/v1/quarantine/{run_id}/drop", self.quarantine_drop)
        if self._console is not None:
            self._console.register(r)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()

    def _errors_middleware(self) -> Middleware:
        @web.middleware
        async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                if request.path.startswith("/v1/"):
                    # The API reads the state DB on the loop: not while the runner's
                    # commit is on the writer thread, or the loop waits for its fsync.
                    await self.control.commit_done()
                return await handler(request)
            except RequestRefused as exc:
                response = _error(exc.status, exc.code, exc.message, exc.headers)
                if exc.status == 408:
                    response.force_close()  # the rest of the body may still come
                return response
            except StateRefused as exc:
                return _error(STORE_ERROR_STATUS.get(exc.code, 400), exc.code, str(exc))
            except StorageFault as exc:
                # Disk full, I/O error, a lock held past busy_timeout: not a bug, retryable.
                log.warning("state DB error in %s %s: %s", request.method, request.path, exc)
                return _error(503, "db_unavailable", f"state DB error: {exc}", RETRY_LATER)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return self._http_exception(request, exc)
            except (ConnectionError, RuntimeError) as exc:
                transport = request.transport
                if transport is not None and not transport.is_closing():
                    log.exception("unhandled error in %s %s", request.method, request.path)
                    return _error(500, "internal", "internal error; see the agentd log")
                # The client went away (reset before the headers were written, or while
                # its body was coming: aiohttp's RuntimeError "Connection closed."):
                # nobody to answer, and nothing wrong here.
                log.debug("client went away in %s %s: %s", request.method, request.path, exc)
                return web.Response(status=499, reason="Client Closed Request")
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.path)
                return _error(500, "internal", "internal error; see the agentd log")

        return errors

    @staticmethod
    def _http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
        code = HTTP_ERROR_CODES.get(exc.status, f"http_{exc.status}")
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        if isinstance(exc, web.HTTPNotFound):
            message = f"no such endpoint: {request.path}"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed here; allowed: {allowed}"
        else:
            message = exc.text if exc.text and exc.content_type == "text/plain" else exc.reason
        return _error(exc.status, code, message, headers)

    def _startup_middleware(self) -> Middleware:
        @web.middleware
        async def startup(request: web.Request, handler: Handler) -> web.StreamResponse:
            # Until startup is done the state DB may be mid-migration on another thread:
            # the API waits (probes and the OpenAPI document answer from the start).
            if (
                not self.health.started
                and request.path.startswith("/v1/")
                and request.path not in UNGATED_PATHS
                and request.match_info.http_exception is None
            ):
                raise RequestRefused(503, "unavailable", "agentd is starting up", RETRY_LATER)
            return await handler(request)

        return startup

    def _reserve_middleware(self) -> Middleware:
        @web.middleware
        async def reserve(request: web.Request, handler: Handler) -> web.StreamResponse:
            # A connection admitted past max_connections, from the probes' reserve.
            if getattr(request.protocol, "reserve", False) and request.path not in PROBE_PATHS:
                response = _error(
                    503,
                    "too_many_connections",
                    "agentd has as many connections open as it allows; retry later",
                    RETRY_LATER,
                )
                response.force_close()
                return response
            return await handler(request)

        return reserve

    def _auth_middleware(self) -> Middleware:
        @web.middleware
        async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
            console = self._console
            if console is not None and console.owns(request.path):
                # The console's pages: a bearer header, or the cookie its sign-in set.
                grant = None
                if self._token is not None:
                    grant = self._granted(request) or console.cookie_grant(request)
                return await console.guard(request, handler, grant)
            if self._token is None or request.path in PROBE_PATHS:
                return await handler(request)
            if request.path == "/metrics" and not self.settings.metrics_require_token:
                return await handler(request)
            granted = self._granted(request)
            if granted is None and console is not None and request.method in READ_METHODS:
                # The console's live updates (an EventSource sends no header): its
                # cookie reads the API, never writes it.
                granted = "read" if console.cookie_grant(request) else None
            if granted is None:
                self._on_auth_failure("api")
                raise RequestRefused(
                    401,
                    "unauthorized",
                    "this request needs the header 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
            if granted == "read" and request.method not in READ_METHODS:
                raise RequestRefused(
                    403, "forbidden", f"the read token may not {request.method}; it only reads"
                )
            return await handler(request)

        return auth

    def _granted(self, request: web.Request) -> str | None:
        """``"write"``, ``"read"`` or None for the request's bearer token. Both tokens
        are compared every time (``hmac.compare_digest``), so the time taken does not
        say which one came close."""
        assert self._token is not None
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        offered = credentials.strip().encode("utf-8", "surrogatepass")
        write = hmac.compare_digest(offered, self._token)
        read = hmac.compare_digest(offered, self._read_token or self._token) and bool(
            self._read_token
        )
        return "write" if write else "read" if read else None

    # ------------------------------------------------------------ probes and metadata

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        ok, body = self.health.liveness(self.clock.monotonic())
        return _json(body, 200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        ok, body = self.health.readiness()
        return _json(body, 200 if ok else 503)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(self._openapi)

    async def get_status(self, request: web.Request) -> web.StreamResponse:
        return _json(self.status())

    # ------------------------------------------------------------ tasks

    async def list_tasks(self, request: web.Request) -> web.StreamResponse:
        return _json({"tasks": self.control.list_tasks()})

    async def get_task(self, request: web.Request) -> web.StreamResponse:
        return _json(self.control.get_task(request.match_info["task_id"]))

    async def trigger(self, request: web.Request) -> web.StreamResponse:
        """202 with the run; the same ``Idempotency-Key`` again (within the window) is
        answered as the first was, with ``Idempotent-Replayed: true`` (as Stripe does)."""
        body = await _json_body(
            request, frozenset({"approve_sensitive", "params"}), self.settings.client_timeout
        )
        approve = body.get("approve_sensitive", False)
        if not isinstance(approve, bool):
            raise _bad("approve_sensitive must be true or false")
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            raise _bad("params must be a JSON object")
        key = request.headers.get("Idempotency-Key")
        result = self.control.trigger(request.match_info["task_id"], approve, params, key)
        replayed = {"Idempotent-Replayed": "true"} if result["reason"] == "duplicate" else None
        return _json(result, 202, replayed)

    async def backfill(self, request: web.Request) -> web.StreamResponse:
        """202 with each occurrence's run (a ``duplicate`` for one that ran already); a
        dry run is a 200 with the instants and writes nothing."""
        body = await _json_body(
            request, frozenset({"from", "to", "dry_run"}), self.settings.client_timeout
        )
        bounds: list[datetime] = []
        for name in ("from", "to"):
            value = body.get(name)
            if not isinstance(value, str):
                raise _bad(f"{name} is required: an ISO 8601 date-time with a UTC offset")
            bounds.append(_parse_instant(value, name))
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise _bad("dry_run must be true or false")
        result = self.control.backfill(
            request.match_info["task_id"], bounds[0], bounds[1], dry_run=dry_run
        )
        return _json(result, 200 if dry_run else 202)

    async def pause(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request, frozenset({"reason"}), self.settings.client_timeout)
        reason = body.get("reason", DEFAULT_PAUSE_REASON)
        if not isinstance(reason, str) or not 1 <= len(reason) <= 500:
            raise _bad("reason must be a string of 1 to 500 characters")
        try:
            reason.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad("reason must be valid Unicode text") from None
        return _json(self.control.pause(request.match_info["task_id"], reason))

    async def resume(self, request: web.Request) -> web.StreamResponse:
        await _json_body(request, timeout_s=self.settings.client_timeout)
        return _json(self.control.resume(request.match_info["task_id"]))

    # ------------------------------------------------------------ runs

    async def resume_run(self, request: web.Request) -> web.StreamResponse:
        await _json_body(request, timeout_s=self.settings.client_timeout)
        return _json(self.control.resume_run(request.match_info["run_id"]))

    async def list_runs(self, request: web.Request) -> web.StreamResponse:
        limit = _parse_uint(_query(request, "limit"), "limit", 50, 1, 1000)
        runs = self.control.list_runs(
            task=_query(request, "task"),
            status=_query(request, "status"),
            limit=limit,
            before=_query(request, "before"),
            since=_parse_time(_query(request, "since"), "since"),
            until=_parse_time(_query(request, "until"), "until"),
        )
        next_before = runs[-1]["id"] if len(runs) == limit else None
        return _json({"runs": runs, "next_before": next_before})

    async def get_run(self, request: web.Request) -> web.StreamResponse:
        return _json(self.control.get_run(request.match_info["run_id"]))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        await _json_body(request, timeout_s=self.settings.client_timeout)
        return _json(self.control.cancel(request.match_info["run_id"]), 202)

    async def run_transcript(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        return _json({"run_id": run_id, "steps": self.control.transcript(run_id)})

    async def run_output(self, request: web.Request) -> web.StreamResponse:
        """A slice of a run's captured stdout or stderr (``read_output``): what
        ``agentd logs RUN [-f]`` polls, from ``offset`` on, so the CLI needs no access to
        the daemon's state directory."""
        run_id = request.match_info["run_id"]
        stream = _query(request, "stream") or "stdout"
        if stream not in OUTPUT_STREAMS:
            raise _bad("stream must be stdout or stderr")
        offset = _parse_uint(_query(request, "offset"), "offset", 0, 0, MAX_OUTPUT_OFFSET)
        limit = _parse_uint(_query(request, "limit"), "limit", OUTPUT_PAGE, MIN_PAGE, OUTPUT_PAGE)
        run = self.control.get_run(run_id)
        workspace = workspace_path(self.control.config.daemon.state_dir, run["task_id"], run_id)
        final = run["status"] in FINAL_STATUSES
        page = await asyncio.to_thread(
            read_output, workspace / f"{stream}.log", offset, limit, final
        )
        total = run.get("progress_total")
        attempts = run.get("attempts") or []
        return _json(
            {
                "run_id": run_id,
                "stream": stream,
                "status": run["status"],
                # What `agentd logs -f` draws its progress line and ETA from.
                "attempt_started_at": attempts[-1]["started_at"] if attempts else None,
                "progress": {
                    "done": run.get("progress_done") or 0,
                    "total": total,
                    "message": run.get("progress_message") or "",
                }
                if total
                else None,
                **page,
            }
        )

    # ------------------------------------------------------------ events

    async def events(self, request: web.Request) -> web.StreamResponse:
        tail = _query(request, "tail")
        if tail is not None:
            if _query(request, "after") is not None:
                raise _bad("tail and after exclude each other")
            count = _parse_uint(tail, "tail", 50, 1, 5000)
            return _json({"events": self.control.recent_events(count)})
        return self._event_page(request, None)

    async def run_events(self, request: web.Request) -> web.StreamResponse:
        return self._event_page(request, request.match_info["run_id"])

    def _event_page(self, request: web.Request, run_id: str | None) -> web.StreamResponse:
        after = _parse_uint(_query(request, "after"), "after", 0, 0, MAX_EVENT_ID)
        limit = _parse_uint(_query(request, "limit"), "limit", 500, 1, 5000)
        return _json({"events": self.control.events(run_id, after=after, limit=limit)})

    # ------------------------------------------------------------ spend and alerts

    async def spend(self, request: web.Request) -> web.StreamResponse:
        return _json(self.control.spend(_query(request, "task")))

    async def alerts(self, request: web.Request) -> web.StreamResponse:
        limit = _parse_uint(_query(request, "limit"), "limit", 50, 1, 1000)
        return _json({"alerts": self.control.alerts(limit)})

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        return _json({"nodes": self.control.nodes()})

    # ------------------------------------------------------------ approvals

    async def approvals(self, request: web.Request) -> web.StreamResponse:
        limit = _parse_uint(_query(request, "limit"), "limit", 100, 1, 1000)
        return _json({"approvals": self.control.approvals(limit)})

    async def decide(self, request: web.Request) -> web.StreamResponse:
        decision = request.match_info["decision"]
        if decision not in APPROVAL_DECISIONS:
            raise RequestRefused(
                404, "not_found", f"no decision {decision[:40]!r}: approve, skip or deny"
            )
        body = await _json_body(
            request, frozenset({"call_id", "note"}), self.settings.client_timeout
        )
        call_id, note = body.get("call_id"), body.get("note")
        if call_id is not None and (not isinstance(call_id, str) or not 1 <= len(call_id) <= 200):
            raise _bad("call_id must be a string of 1 to 200 characters")
        if note is not None and (not isinstance(note, str) or len(note) > 2000):
            raise _bad("note must be a string of at most 2000 characters")
        for text in (call_id, note):
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("call_id and note must be valid Unicode text") from None
        row = self.control.decide(request.match_info["run_id"], decision, call_id, note)
        return _json(row)

    # ------------------------------------------------------------ quarantine

    async def quarantine_list(self, request: web.Request) -> web.StreamResponse:
        return _json({"quarantine": self.control.quarantine_list()})

    async def quarantine_show(self, request: web.Request) -> web.StreamResponse:
        return _json(self.control.quarantine_show(request.match_info["run_id"]))

    async def quarantine_release(self, request: web.Request) -> web.StreamResponse:
        await _json_body(request, timeout_s=self.settings.client_timeout)
        return _json(self.control.quarantine_release(request.match_info["run_id"]))

    async def quarantine_drop(self, request: web.Request) -> web.StreamResponse:
        await _json_body(request, timeout_s=self.settings.client_timeout)
        return _json(self.control.quarantine_drop(request.match_info["run_id"]))

    # ------------------------------------------------------------ server-sent events

    async def stream(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, None)

    async def run_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, request.match_info["run_id"])

    def _resume_point(self, request: web.Request) -> int | None:
        header = request.headers.get("Last-Event-ID", "").strip()
        if header:
            return _parse_uint(header, "Last-Event-ID", 0, 0, MAX_EVENT_ID)
        after = _query(request, "after")
        return None if after is None else _parse_uint(after, "after", 0, 0, MAX_EVENT_ID)

    def _latest_event_id(self) -> int:
        return self.control.latest_event_id()

    def _run_final(self, run_id: str) -> bool:
        return self.control.run_is_final(run_id)

    async def _sse(self, request: web.Request, run_id: str | None) -> web.StreamResponse:
        """Subscribe first, then backfill from the DB, then follow the bus: an event
        committed at any point lands in the DB page or the queue (or both, and the id
        check drops the copy), all of it on the loop thread, so none is lost."""
        if self._closing.is_set():
            raise RequestRefused(503, "unavailable", "the server is shutting down", RETRY_LATER)
        if len(self._streams) >= self.settings.max_streams:
            self._notes.note(
                logging.WARNING,
                "streams",
                "http: %d event streams open (daemon.http.max_streams): refusing another",
                len(self._streams),
            )
            raise RequestRefused(
                503,
                "too_many_streams",
                f"{len(self._streams)} event streams are open, as many as agentd allows "
                "(daemon.http.max_streams); retry later",
                {"Retry-After": str(STREAMS_RETRY_S)},
            )
        resume = self._resume_point(request)
        if run_id is not None:
            self.control.get_run(run_id)  # unknown run: 404 before any streaming
        sub = self.bus.subscribe(run_id, maxsize=self.sse_queue_max)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._streams.add(done)
        try:
            if resume is None:
                resume = 0 if run_id is not None else self._latest_event_id()
            if (
                run_id is not None
                and self._run_final(run_id)
                and not self.control.events(run_id, after=resume, limit=1)
            ):
                # Nothing more will come: 204 tells an EventSource to stop reconnecting.
                return web.Response(status=204)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            try:
                await self._pump(response, sub, run_id, resume)
            except ConnectionError:
                pass  # the client went away
            except TimeoutError:
                self._notes.note(
                    logging.INFO,
                    "stalled",
                    "http: closed an event stream whose client read nothing for %g s",
                    self.settings.client_timeout,
                )
                request.protocol.force_close()
            except Exception:
                # Too late for an error response: end the stream; the client reconnects.
                log.exception("event stream failed run=%s; closing it", run_id or "-")
            return response
        finally:
            sub.close()
            self._streams.discard(done)
            done.set_result(None)

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """One write to a stream; a client that reads nothing for ``client_timeout``
        makes it a ``TimeoutError`` (a stalled reader would hold a stream forever)."""
        async with asyncio.timeout(self.settings.client_timeout):
            await response.write(data)

    async def _backfill(self, response: web.StreamResponse, run_id: str | None, last: int) -> int:
        while True:
            page = self.control.events(run_id, after=last, limit=BACKFILL_PAGE)
            for event in page:
                await self._write(response, _sse_frame(event))
                last = event["id"]
            if len(page) < BACKFILL_PAGE:
                return last

    async def _pump(
        self, response: web.StreamResponse, sub: Subscription, run_id: str | None, last: int
    ) -> None:
        last = await self._backfill(response, run_id, last)
        if run_id is not None and self._run_final(run_id):
            return
        closing: asyncio.Future[Any] = asyncio.ensure_future(self._closing.wait())
        getter: asyncio.Future[Any] | None = None
        try:
            while not sub.overflowed:
                # An overflowed subscription lost events: end, and the client comes back
                # with Last-Event-ID to read them from the DB.
                if getter is None:
                    getter = asyncio.ensure_future(sub.queue.get())
                finished, _ = await asyncio.wait(
                    {getter, closing},
                    timeout=self.sse_heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closing in finished:
                    return
                if getter not in finished:
                    await self._write(response, KEEPALIVE)
                    continue
                event: Event = getter.result()
                getter = None
                if event["id"] <= last:
                    continue
                await self._write(response, _sse_frame(event))
                last = event["id"]
                if (
                    run_id is not None
                    and event["kind"] in FINAL_EVENT_KINDS
                    and self._run_final(run_id)
                ):
                    # The final transaction may hold more events (failure, then quarantine):
                    # read the rest from the DB rather than the queue.
                    await self._backfill(response, run_id, last)
                    return
        finally:
            closing.cancel()
            if getter is not None:
                getter.cancel()
