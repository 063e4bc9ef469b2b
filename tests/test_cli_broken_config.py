"""The CLI while the config file on disk is broken: an operator who just broke it runs
``agentd status`` next, and must get the running daemon's answer (and a warning), not
exit 78. Without a daemon to ask, the config error is the answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Agentd, free_port, wait_for

from agentd import config as agentd_config
from agentd import exitcodes

pytestmark = pytest.mark.e2e

TASKS = """
tick:
  schedule: {manual: true}
  command: {shell: "echo tick"}
"""

# How the file is broken, and the first problem the warning names.
BREAKS: dict[str, tuple[bytes, str]] = {
    "invalid-task": (
        b'  bad:\n    schedule: {cron: "61 * * * *"}\n    command: {argv: [echo]}\n',
        "tasks.bad.schedule.cron",
    ),
    "garbage-0xff": (b"  broken: [\xff {{{ ]]\n\t: :\n", "not UTF-8"),
}


def cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("AGENTD_TOKEN", "AGENTD_CONFIG")}
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli", args[0], "--config", str(config), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def break_file(path: Path, how: str) -> None:
    path.write_bytes(path.read_bytes() + BREAKS[how][0])


def started(make_daemon: Callable[..., Agentd]) -> Agentd:
    d = make_daemon(TASKS).start()
    wait_for(lambda: d.cli("status", check=False).returncode == 0, what="the API answers")
    run_id = d.trigger("tick")
    d.wait_status(run_id, "succeeded")
    return d


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_commands_reach_the_daemon_and_say_the_file_is_broken(
    how: str, make_daemon: Callable[..., Agentd]
) -> None:
    d = started(make_daemon)
    break_file(d.config, how)
    first_problem = BREAKS[how][1]
    for url in ([], ["--url", d.url]):
        for command, expect in (("status", "daemon: running"), ("tasks", "tick"), ("runs", "tick")):
            result = cli(d.config, command, *url)
            assert result.returncode == 0, (command, url, result.stderr)
            assert expect in result.stdout, (command, url, result.stdout)
            warnings = [line for line in result.stderr.splitlines() if "broken" in line]
            assert len(warnings) == 1, result.stderr
            assert str(d.config) in warnings[0] and first_problem in warnings[0], warnings
            assert "Traceback" not in result.stderr
    listed = json.loads(cli(d.config, "tasks", "--json").stdout)
    assert [t["task"] for t in listed] == ["tick"]

    # No daemon to ask: the whole config error, exit 78; with --url, the file was not
    # needed, and what went wrong is that no daemon answers there.
    assert d.stop() == 0
    result = cli(d.config, "status")
    assert result.returncode == exitcodes.CONFIG, result.stderr
    assert "problem(s) in config" in result.stderr and first_problem in result.stderr
    assert "Traceback" not in result.stderr
    result = cli(d.config, "status", "--url", d.url)
    assert result.returncode == exitcodes.NOT_RUNNING, result.stderr
    assert f"no agentd answers at {d.url}" in result.stderr
    assert "problem(s) in config" not in result.stderr and "Traceback" not in result.stderr


def test_with_url_the_config_file_is_not_needed(make_daemon: Callable[..., Agentd]) -> None:
    d = started(make_daemon)
    missing = d.root / "no-such-file.yaml"
    result = cli(missing, "runs", "--url", d.url)
    assert result.returncode == 0, result.stderr
    assert "tick" in result.stdout
    assert "warning" not in result.stderr  # no file was given, none was needed
    # A broken daemon: section: its address is unknown, --url still works.
    d.config.write_text(d.config.read_text().replace("lease: 5s", "lease: 0s"))
    result = cli(d.config, "tasks", "--url", d.url)
    assert result.returncode == 0 and "tick" in result.stdout, result.stderr
    assert "daemon.lease" in result.stderr


def test_the_token_comes_from_agentd_token_or_the_readable_daemon_section(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TASKS)
    d.config.write_text(
        d.config.read_text().replace(
            f"port: {d.port}}}", f"port: {d.port}, token_env: AGENTD_TEST_TOKEN}}"
        )
    )
    d.start(env={"AGENTD_TEST_TOKEN": "s3cret"})
    break_file(d.config, "invalid-task")
    refused = cli(d.config, "trigger", "tick", "--url", d.url)
    assert refused.returncode == 1 and "Authorization" in refused.stderr, refused.stderr
    by_env = cli(d.config, "trigger", "tick", "--url", d.url, env={"AGENTD_TOKEN": "s3cret"})
    assert by_env.returncode == 0, by_env.stderr
    by_section = cli(d.config, "trigger", "tick", "--json", env={"AGENTD_TEST_TOKEN": "s3cret"})
    assert by_section.returncode == 0, by_section.stderr
    assert json.loads(by_section.stdout)["run_id"]


def test_lenient_daemon_reads_the_section_that_still_validates(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    port = free_port()
    good = f"daemon:\n  http: {{host: 127.0.0.2, port: {port}}}\n  state_dir: /srv/x\n"
    path.write_bytes(good.encode() + b"tasks:\n" + BREAKS["invalid-task"][0])
    daemon = agentd_config.lenient_daemon(path)
    assert daemon is not None and daemon.http.port == port and daemon.http.host == "127.0.0.2"
    path.write_bytes(good.encode() + b"tasks:\n" + BREAKS["garbage-0xff"][0])
    daemon = agentd_config.lenient_daemon(path)
    assert daemon is not None and str(daemon.state_dir) == "/srv/x"
    path.write_text(good.replace("state_dir", "no_such_key"))
    assert agentd_config.lenient_daemon(path) is None  # the caller takes the defaults
    path.write_bytes(b"\xff\xfe garbage")
    assert agentd_config.lenient_daemon(path) is None
    assert agentd_config.lenient_daemon(tmp_path / "missing.yaml") is None


def test_check_config_json_reports_an_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_bytes(b"tasks:\n" + BREAKS["invalid-task"][0] + b"  other: {}\n")
    result = cli(path, "check-config", "--json")
    assert result.returncode == exitcodes.CONFIG
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["source"] == str(path)
    paths = [p["path"] for p in report["problems"]]
    assert "tasks.bad.schedule.cron" in paths and "tasks.other.schedule" in paths
    assert all(p["message"] for p in report["problems"])
