"""httpx and its TLS context, made once per process and off the event loop.

Importing httpx and reading the CA bundle into a verifying ``SSLContext`` are both slow.
A daemon whose tasks send no HTTP should pay neither; one that does should not pay them
on the event loop, where they stall every probe and every run. Each
``httpx.AsyncClient()`` built without ``verify=`` reads the bundle again: an http task
made one per run, so every run stalled the loop.

The context follows httpx's own rules (``SSL_CERT_FILE``, then ``SSL_CERT_DIR``, then
certifi's bundle), is shared by every client (an ``SSLContext`` is safe to share), and
is read again after a config reload (``forget``), so a rotated CA bundle is picked up
by SIGHUP.
"""

from __future__ import annotations

import asyncio
import ssl
import threading

_lock = threading.Lock()
_context: ssl.SSLContext | None = None


def context() -> ssl.SSLContext:
    """The shared verifying context; built here if nobody prepared it (``prepare``)."""
    global _context
    with _lock:
        if _context is None:
            import httpx

            _context = httpx.create_ssl_context()
        return _context


async def prepare() -> None:
    """Import httpx and build the shared context, in a thread, the first time; after
    this ``import httpx`` and ``context()`` are instant on the loop."""
    if _context is None:
        await asyncio.to_thread(context)


def forget() -> None:
    """Read the CA bundle again on next use (after SIGHUP)."""
    global _context
    with _lock:
        _context = None
