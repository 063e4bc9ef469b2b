"""The CLI's view of a running daemon: its JSON API over the standard library's
``http.client`` (one keep-alive connection per command).

``Unreachable`` means no daemon answered (not running, wrong port): the connection
could not be made, so nothing was sent, and the CLI may work on the state DB directly.
An ``ApiError`` is the daemon's own refusal and is final, and so is a connection that
fails once a request is on its way (``no_answer``): the daemon may have acted on it, so
a write is not tried again elsewhere.

Not httpx: a command makes one to three requests, and httpx with its dependencies is
most of a read command's start (0.08 s of imports, where ``http.client`` takes 0.01 s).
Proxies from the environment are not used (the daemon's API is local, or a port-forward
or tunnel the operator set up); certificates for an ``https`` URL are verified with the
system's trust store (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` apply).
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentd.config import HttpServerConfig


class Unreachable(Exception):
    pass


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def default_url(http: HttpServerConfig) -> str:
    """The URL the CLI reaches a daemon serving on ``http`` at (a wildcard is loopback)."""
    host = http.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{http.port}"


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(0, "bad_url", f"not an http(s) URL: {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path
        self._timeout = timeout_s
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        """A connected ``HTTPConnection``; ``Unreachable`` when none can be made."""
        conn: http.client.HTTPConnection
        if self._https:
            import ssl  # only for an https URL: 0.01 s

            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.connect()
        except OSError as exc:  # refused, no route, no such host, timed out, TLS
            conn.close()
            raise Unreachable(f"no agentd answers at {self.url}: {exc}") from None
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _send(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        """Send on the kept connection, or a new one. A kept connection the daemon has
        closed meanwhile (an idle keep-alive) fails before any answer: a GET is then
        sent once more on a new connection; anything else is ``no_answer``."""
        for fresh in (self._conn is None, True):
            if self._conn is None:
                self._conn = self._connect(self._timeout)
            try:
                self._conn.request(method, target, body=body, headers=headers)
                return self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh or method != "GET":
                    raise ApiError(
                        0, "no_answer", f"the daemon at {self.url} closed the connection"
                    ) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise ApiError(0, "no_answer", f"no answer from {self.url}: {exc}") from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def _target(self, path: str, params: dict[str, Any] | None = None) -> str:
        query = urllib.parse.urlencode(params) if params else ""
        return self._prefix + path + (f"?{query}" if query else "")

    def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        headers = {**self._headers, **(headers or {})}
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        resp = self._send(method, self._target(path, params), body, headers)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ApiError(0, "no_answer", f"no answer from {self.url}: {exc}") from None
        if resp.will_close:
            self.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": "bad_response", "message": raw[:200].decode(errors="replace")}
        if resp.status >= 400 and resp.status != 503:
            raise ApiError(resp.status, str(answer.get("error")), str(answer.get("message")))
        return answer

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean)

    def post(
        self, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        return self.request("POST", path, json_body=body or {}, headers=headers)

    def stream(self, path: str, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Follow a Server-Sent Events stream; yields each event's JSON data. On its own
        connection, with no read timeout (a quiet stream is not a dead one)."""
        headers = {**self._headers, "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = str(last_event_id)
        conn = self._connect(None)
        try:
            try:
                conn.request("GET", self._target(path), headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"no agentd answers at {self.url}: {exc}") from None
            if resp.status >= 400:
                try:
                    answer = json.loads(resp.read() or b"{}")
                except ValueError:
                    answer = {}
                raise ApiError(resp.status, str(answer.get("error")), str(answer.get("message")))
            data: list[str] = []
            while True:
                try:
                    raw = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise Unreachable(f"the stream from {self.url} ended: {exc}") from None
                if not raw:
                    return
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line == "" and data:
                    yield json.loads("\n".join(data))
                    data = []
        finally:
            conn.close()
