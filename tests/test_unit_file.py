"""The shipped systemd unit: the directives an operator relies on, and systemd's own
verdict on it (``systemd-analyze security``; ``verify`` runs in test_systemd_real.py,
where the unit's ExecStart exists)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agentd.config import load_config
from agentd.schedule import parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "systemd" / "agentd.service"


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_has_the_lifecycle_directives() -> None:
    d = directives()
    assert d["Type"] == ["notify"]
    exec_start = d["ExecStart"][0].split()
    assert exec_start[0] == "/opt/agentd/bin/agentd" and exec_start[1] == "run"  # no shell
    # One step: the daemon checks the file and reports a rejection itself; the CLI
    # waits for its verdict, and signals only the unit's main process.
    [reload] = d["ExecReload"]
    assert reload.split()[:3] == ["/opt/agentd/bin/agentd", "reload", "--wait"]
    assert "--pid $MAINPID" in reload
    assert d["Restart"] == ["on-failure"]
    # what a person must fix: damaged state, unusable state dir, bad config
    assert d["RestartPreventExitStatus"] == ["65 73 78"]
    assert d["KillMode"] == ["mixed"] and d["WatchdogSec"] == ["30s"]
    assert d["DynamicUser"] == ["yes"]
    assert d["StateDirectory"] == ["agentd"] and d["ConfigurationDirectory"] == ["agentd"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert d["CapabilityBoundingSet"] == [""]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert d[key] in (["strict"], ["yes"]), key
    assert "@system-service" in d["SystemCallFilter"]
    for key in ("MemoryMax", "TasksMax", "LimitNOFILE"):
        assert d[key], key


def test_stop_timeout_outlasts_the_shipped_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    daemon = load_config(ROOT / "config" / "agentd.yaml").daemon
    stop_s = parse_duration(directives()["TimeoutStopSec"][0])
    assert stop_s > daemon.shutdown_grace + daemon.kill_grace


def test_security_exposure_is_ok() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for agentd\.service: (\d+\.\d+) (\w+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0 and match.group(2) == "OK", match.group(0)
