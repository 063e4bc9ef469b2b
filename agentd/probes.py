"""``/healthz`` and ``/readyz`` on a listener of their own: own thread, own event loop.

The API's listener shares the daemon's event loop with the scheduler, the runner and
every run's bookkeeping, so during a burst a probe waits its turn behind them (tens of
ms) and a loop that blocks answers nothing at all. ``daemon.http.probe_port`` adds a
second listener that only answers the two probes, on a thread that never runs daemon
work: its answer is read from ``Health`` (written by the main loop, read under its
lock), so it is what the API's ``/healthz`` and ``/readyz`` would answer, computed at
the moment of the request.

Invariants: the probe thread never touches the store, the config or anything but
``Health`` and the clock's ``monotonic``; liveness still judges the main loop (its
ticks age while it is blocked, and after ``liveness_stale_after`` the probe turns
503 naming ``main_loop``), so a wedged daemon is restarted as before, only now with an
answer instead of a timeout. The listener binds before ``start`` returns (a bind error
is raised there) and is closed by ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Final

from aiohttp import web

from agentd.health import Health

log = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 10.0
"""How long ``start`` waits for the probe thread to bind."""

_NO_STORE: Final = {"Cache-Control": "no-store"}


class ProbeServer:
    """The probe listener. One instance serves one ``start``/``stop`` cycle."""

    def __init__(
        self, health: Health, monotonic: Callable[[], float], *, client_timeout_s: float
    ) -> None:
        self.health = health
        self.monotonic = monotonic
        self.client_timeout_s = client_timeout_s
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None

    def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0 picks a free port) on the probe thread; the bound port.
        Raises the bind's ``OSError`` (address in use, not an address of this host)."""
        self._thread = threading.Thread(
            target=self._main, args=(host, port), name="agentd-probes", daemon=True
        )
        self._thread.start()
        if not self._bound.wait(START_TIMEOUT_S):
            raise OSError(f"the probe listener did not bind within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            self._thread.join(START_TIMEOUT_S)
            raise self._error
        assert self.port is not None
        log.info("probes listening on %s:%d (own thread)", host or "*", self.port)
        return self.port

    def stop(self, timeout_s: float = 3.0) -> None:
        """Close the listener and end the thread (idempotent)."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed in between: nothing to stop
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("probes: the probe thread did not end within %.1f s", timeout_s)
        self._thread = None

    # ------------------------------------------------------------ the probe thread

    def _main(self, host: str, port: int) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(host, port))
        except BaseException as exc:  # never leave start() waiting
            if not self._bound.is_set():
                self._error = exc
                self._bound.set()
            else:
                log.exception("probes: the probe listener failed")
        finally:
            loop.close()

    async def _serve(self, host: str, port: int) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=self.client_timeout_s
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            self.port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._bound.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, body = self.health.liveness(self.monotonic())
        return web.json_response(body, status=200 if ok else 503, headers=_NO_STORE)

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, body = self.health.readiness()
        return web.json_response(body, status=200 if ok else 503, headers=_NO_STORE)
