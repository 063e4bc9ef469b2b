"""httpx and its TLS context are made once, off the loop, and only when needed."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys

from agentd import tls


def test_the_daemon_does_not_import_httpx_at_start() -> None:
    """What the daemon imports at start; a module that imports httpx at its top would
    put ~50 ms and a few MiB back on every start of a daemon that sends no HTTP."""
    code = (
        "import sys, agentd.cli, agentd.daemon, agentd.executors.http, agentd.providers;"
        " print('httpx' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_prepare_builds_the_shared_verifying_context_and_forget_drops_it() -> None:
    tls.forget()
    asyncio.run(tls.prepare())
    first = tls._context
    assert first is not None  # built by prepare(), in its thread
    assert tls.context() is first and tls.context() is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    tls.forget()
    assert tls.context() is not first
