"""The CLI as an operator meets it (issue 30's CLI bugs), each against a real daemon and
the CLI run as a real subprocess: no library log lines, readable text instead of Python
reprs, ``events --limit`` the newest N either way, ``--url`` without a config file, a
dropped run out of ``runs --status quarantined``, no next run for a paused task, and a
read against a running daemon that imports only what it needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Agentd, free_port, wait_for

from agentd import exitcodes

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


def test_detail_output_has_no_python_reprs(daemon: Agentd) -> None:
    status = cli("status", config=daemon.config)
    assert status.returncode == 0, status.stderr
    assert "daemon: running" in status.stdout
    assert not REPR.search(status.stdout), status.stdout
    # Nested values are indented key: value lines, not a dict's repr.
    assert re.search(r"^    main_loop: [0-9.]+$", status.stdout, re.M), status.stdout

    cli("pause", "hello", config=daemon.config)
    trig = cli("trigger", "hello", config=daemon.config)
    assert trig.returncode == 0, trig.stderr
    assert "run_id: " in trig.stdout and not REPR.search(trig.stdout), trig.stdout
    run_id = re.search(r"run_id: (\S+)", trig.stdout).group(1)  # type: ignore[union-attr]
    daemon.wait_status(run_id, "succeeded")
    shown = cli("runs", "show", run_id, config=daemon.config)
    assert shown.returncode == 0, shown.stderr
    assert f"id: {run_id}" in shown.stdout
    assert not REPR.search(shown.stdout), shown.stdout
    # --json is unchanged: the values as JSON.
    assert (
        json.loads(cli("runs", "show", run_id, "--json", config=daemon.config).stdout)["status"]
        == "succeeded"
    )


def _event_ids(out: subprocess.CompletedProcess[str]) -> list[int]:
    assert out.returncode == 0, out.stderr
    return [int(m) for m in re.findall(r"^\S+ \S+  #(\d+) ", out.stdout, re.M)]


def test_events_limit_shows_the_newest_events_with_and_without_a_daemon(daemon: Agentd) -> None:
    for _ in range(3):
        daemon.wait_status(daemon.trigger("hello"), "succeeded")
    everything = [int(e["id"]) for e in daemon.events()]
    assert len(everything) > 8
    newest = everything[-4:]
    assert _event_ids(cli("events", "--limit", "4", config=daemon.config)) == newest
    assert daemon.stop() == 0
    assert _event_ids(cli("events", "--limit", "4", config=daemon.config)) == newest
    helptext = cli("events", "--help").stdout
    assert "newest" in helptext


def test_with_url_no_config_file_is_read(daemon: Agentd, tmp_path: Path) -> None:
    # A path that cannot be read as a file (as /etc/agentd/agentd.yaml, 0640 root:agentd,
    # is for an operator outside the group): --url needs nothing from it.
    unreadable = tmp_path / "unreadable.yaml"
    unreadable.mkdir()
    for args in (("status",), ("tasks",), ("runs",)):
        out = cli(*args, "--url", daemon.url, config=unreadable)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stderr == "", (args, out.stderr)
    assert "daemon: running" in cli("status", "--url", daemon.url, config=unreadable).stdout
    # No file named at all, and none at the default places.
    assert cli("status", "--url", daemon.url).returncode == 0
    # A port-forward that is down: the daemon is not running there, whatever the local
    # state says, and no config problem is reported.
    dead = f"http://127.0.0.1:{free_port()}"
    for config in (None, unreadable, daemon.config):
        out = cli("status", "--url", dead, config=config)
        assert out.returncode == exitcodes.NOT_RUNNING, (config, out.stdout, out.stderr)
        assert f"no agentd answers at {dead}" in out.stderr, out.stderr
        assert "problem(s) in config" not in out.stderr
        runs = cli("runs", "--url", dead, config=config)
        assert runs.returncode == exitcodes.NOT_RUNNING, (config, runs.stdout, runs.stderr)
        assert "hello" not in runs.stdout  # not the local state DB's runs


def test_a_dropped_run_is_no_longer_listed_as_quarantined(daemon: Agentd) -> None:
    run_id = daemon.trigger("bad")
    daemon.wait_status(run_id, "quarantined")

    def listed(status: str) -> list[str]:
        out = cli("runs", "--status", status, "--json", config=daemon.config)
        return [r["id"] for r in json.loads(out.stdout)]

    assert listed("quarantined") == [run_id]
    dropped = cli("quarantine", "drop", run_id, config=daemon.config)
    assert dropped.returncode == 0, dropped.stderr
    assert daemon.run_status(run_id) == "dropped"
    assert listed("quarantined") == []
    assert listed("dropped") == [run_id]
    assert "dropped" in cli("runs", "show", run_id, config=daemon.config).stdout


def test_tasks_shows_no_next_run_for_a_paused_task(daemon: Agentd) -> None:
    def next_run(task: str) -> str:
        rows = json.loads(cli("tasks", "--json", config=daemon.config).stdout)
        return str(next(r for r in rows if r["task"] == task)["next_run"])

    assert re.match(r"\d{4}-\d\d-\d\d ", next_run("hello"))
    assert cli("pause", "hello", config=daemon.config).returncode == 0
    assert next_run("hello") == "paused"
    table = cli("tasks", config=daemon.config).stdout
    hello = next(line for line in table.splitlines() if line.startswith("hello"))
    assert not re.search(r"\d{4}-\d\d-\d\d", hello), hello
    assert cli("resume", "hello", config=daemon.config).returncode == 0
    assert re.match(r"\d{4}-\d\d-\d\d ", next_run("hello"))


PROBE = """
import runpy, sys
sys.argv = ["agentd", *sys.argv[1:]]
try:
    runpy.run_module("agentd.cli", run_name="__main__")
except SystemExit:
    pass
print("MODULES " + " ".join(sorted(sys.modules)), file=sys.stderr)
"""

HEAVY = (
    "agentd.control",
    "agentd.state.sqlite.engine",
    "agentd.daemon",
    "sqlalchemy",
    "aiohttp",
    "apscheduler",
    "httpx",
    "sqlite3",
)
"""What a read against a running daemon has no use for: the state engines and the
daemon's parts, and httpx (the stdlib's http.client does for a few requests)."""


def test_a_read_against_a_running_daemon_imports_only_what_it_needs(daemon: Agentd) -> None:
    for args in (("tasks",), ("runs",), ("status",)):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, *args, "--config", str(daemon.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        modules = set(out.stderr.rsplit("MODULES ", 1)[1].split())
        loaded = [m for m in HEAVY if m in modules]
        assert loaded == [], (args, loaded)
