"""The CLI as an operator meets it (issue 30's CLI bugs), each against a real daemon and
the CLI run as a real subprocess: no library log lines, readable text instead of Python
reprs, ``events --limit`` the newest N either way, ``--url`` without a config file, a
dropped run out of ``runs --status quarantined``, no next run for a paused task, and a
read against a running daemon that imports only what it needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Agentd, wait_for

pytestmark = pytest.mark.e2e

TASKS = """
hello:
  schedule: {every: 1h}
  command: {shell: "echo hi"}
bad:
  schedule: {manual: true}
  command: {shell: "exit 3"}
  retry: {max_attempts: 1}
"""

REPR = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\{'|\['")
"""What Python's repr of a value looks like in the CLI's text output."""


def cli(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("AGENTD_TOKEN", "AGENTD_CONFIG")}
    where = ["--config", str(config)] if config is not None else []
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli", args[0], *where, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=Path(__file__).parent,  # no config/agentd.yaml to fall back on
    )


@pytest.fixture
def daemon(make_daemon: Callable[..., Agentd]) -> Agentd:
    d = make_daemon(TASKS).start()
    wait_for(lambda: d.cli("status", check=False).returncode == 0, what="the API answers")
    return d


def test_commands_print_no_library_log_lines(daemon: Agentd) -> None:
    run_id = daemon.trigger("hello")
    daemon.wait_status(run_id, "succeeded")
    for args in (("status",), ("tasks",), ("runs",), ("events",), ("pause", "hello")):
        out = cli(*args, config=daemon.config)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stderr == "", (args, out.stderr)  # e.g. `INFO httpx HTTP Request: ...`
