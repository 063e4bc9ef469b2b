"""The CLI's view of a running daemon: its JSON API over httpx.

``Unreachable`` means no daemon answered (not running, wrong port); the CLI then works
on the state DB directly. An ``ApiError`` is the daemon's own refusal and is final.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

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
        # Imported here, not at the top: the daemon imports this module (through the
        # CLI) and never uses it, and httpx is a large share of its start.
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(f"no agentd answers at {self.url}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": "bad_response", "message": resp.text[:200]}
        if resp.status_code >= 400 and resp.status_code not in (503,):
            raise ApiError(resp.status_code, str(body.get("error")), str(body.get("message")))
        return body

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body or {})

    def stream(self, path: str, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Follow a Server-Sent Events stream; yields each event's JSON data."""
        import httpx

        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        try:
            with self._http.stream(
                "GET", path, headers=headers, timeout=httpx.Timeout(10.0, read=None)
            ) as resp:
                if resp.status_code >= 400:
                    body = json.loads(resp.read() or b"{}")
                    raise ApiError(
                        resp.status_code, str(body.get("error")), str(body.get("message"))
                    )
                data: list[str] = []
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif line == "" and data:
                        yield json.loads("\n".join(data))
                        data = []
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Unreachable(f"no agentd answers at {self.url}: {exc}") from None
