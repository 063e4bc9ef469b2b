"""SIGHUP with a config that cannot be applied, and tasks that leave the config, on a
real daemon: the running config stays, the daemon says why everywhere, nothing hangs."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

GOOD = """
tick:
  schedule: {every: 1s}
  command: {argv: ["true"]}
"""
"""A config's tasks (``Agentd.write_config`` puts the daemon section above them)."""


def _get(d: Agentd, path: str) -> Any:
    return httpx.get(d.url + path, timeout=10).json()


def _metric(d: Agentd, name: str) -> float | None:
    text = httpx.get(d.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def _reloads_seen(d: Agentd) -> int:
    return d.log().count("reload failed, keeping the running config") + d.log().count(
        "reload ok generation="
    )


def _append(raw: bytes) -> Any:
    return lambda d: d.config.write_bytes(d.config.read_bytes() + raw)


def _tasks(yaml: str) -> Any:
    return lambda d: d.write_config(GOOD + yaml)


def _daemon(extra: str) -> Any:
    return lambda d: d.write_config(GOOD, extra)


def _deep(levels: int) -> str:
    return "  x:\n    schedule: {every: 1m}\n    command: {argv: [true]}\n    params: " + (
        "[" * levels + "]" * levels
    )


# Each breaks the file in a way that took the daemon down (a traceback, exit 1), or that
# validation let through and the scheduler could not take.
HOSTILE: dict[str, Any] = {
    "latin1_text": _append(b"# caf\xe9\n"),
    "byte_0xff": _append(b"\xff\n"),
    "zone_is_a_directory": _daemon("timezone: America"),
    "zone_300_chars": _daemon("timezone: " + "A" * 300),
    "cron_never_fires": _tasks('x: {schedule: {cron: "0 0 31 2 *"}, command: {argv: [true]}}'),
    "interval_overflows": _tasks("x: {schedule: {every: 100000000d}, command: {argv: [true]}}"),
    "interval_1e300": _tasks("x: {schedule: {every: 1e300}, command: {argv: [true]}}"),
    "jitter_1e300": _tasks("x: {schedule: {every: 1m, jitter: 1e300}, command: {argv: [true]}}"),
    "params_600_deep": lambda d: d.write_config(GOOD + _deep(600)),
    "self_alias": _tasks("x: {schedule: {every: 1m}, command: {argv: [true]}, params: &a {a: *a}}"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_config_sent_by_sighup_keeps_the_running_config(
    make_daemon: Any, name: str
) -> None:
    d = make_daemon(GOOD).start()
    wait_for(lambda: d.runs("tick"), what="a first fire")
    good = d.config.read_bytes()
    HOSTILE[name](d)
    seen = _reloads_seen(d)
    d.signal(signal.SIGHUP)
    wait_for(lambda: _reloads_seen(d) > seen, timeout=60, what="the reload's outcome")
    assert "reload failed, keeping the running config" in d.log(), d.log()[-3000:]
    assert not d.proc_exited(), d.log()[-3000:]
    status = _get(d, "/v1/status")
    assert status["last_reload_ok"] is False
    assert status["last_reload_error"], status
    assert status["config_generation"] == 1
    assert _metric(d, "agentd_config_last_reload_successful") == 0
    # Still scheduling on the old config.
    count = len(d.runs("tick"))
    wait_for(lambda: len(d.runs("tick")) > count + 1, what="fires after the failed reload")
    # Mended, the next SIGHUP applies and clears the failure.
    d.config.write_bytes(good)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload ok generation=2" in d.log(), what="the mended reload")
    status = _get(d, "/v1/status")
    assert status["last_reload_ok"] is True and status["last_reload_error"] is None
    assert d.stop() == 0


def test_a_slow_reload_does_not_stop_the_loop_and_shutdown_does_not_wait_for_it(
    make_daemon: Any, tmp_path: Path
) -> None:
    """The config path turned into a FIFO nobody writes: the parse child blocks opening
    it. Meanwhile the daemon goes on ticking (liveness stays 200), and SIGTERM ends the
    reload with the daemon."""
    import os

    d = make_daemon(GOOD).start()
    wait_for(lambda: d.runs("tick"), what="a first fire")
    d.config.unlink()
    os.mkfifo(d.config)
    d.signal(signal.SIGHUP)
    d.wait_log("signal SIGHUP: reload requested", "the reload request")
    count = len(d.runs("tick"))
    wait_for(lambda: len(d.runs("tick")) > count + 2, what="fires while the reload waits")
    health = httpx.get(d.url + "/healthz", timeout=10)
    assert health.status_code == 200, health.text
    assert d.stop(timeout=30) == 0


def test_queued_retry_of_a_task_removed_by_a_reload_is_cancelled(make_daemon: Any) -> None:
    d = make_daemon(
        """
        flaky:
          schedule: {manual: true}
          command: {shell: "exit 3"}
          retry: {max_attempts: 5, backoff: 1h, max_backoff: 1h}
        other:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    ).start()
    run_id = d.trigger("flaky")
    wait_for(lambda: d.events(run_id, "retry"), what="the retry waiting in the queue")
    assert d.run_status(run_id) == "queued"
    wait_for(lambda: _metric(d, "agentd_queue_depth") == 1, what="queue depth 1")
    d.write_config(
        """
        other:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    )
    d.signal(signal.SIGHUP)
    d.wait_log("reload ok generation=2", "the reload")
    row = d.wait_status(run_id, "cancelled")
    assert "removed from the config" in row["error"]
    [cancel] = d.events(run_id, "cancel")
    assert cancel["data"]["reason"] == "task_removed"
    wait_for(lambda: _metric(d, "agentd_queue_depth") == 0, what="the queue drained")
    listed = json.loads(d.cli("runs", "--status", "queued", "--json").stdout)
    assert listed == []
    assert d.stop() == 0


TWO = (
    GOOD
    + """
tock:
  schedule: {manual: true}
  command: {argv: ["true"]}
"""
)


def test_reload_wait_returns_once_the_new_config_is_in_force_or_rejected(
    make_daemon: Any,
) -> None:
    """``agentd reload --wait`` (the unit's ExecReload): when it returns 0 the added task
    is there already; a broken file is rejected by the daemon itself (exit 78, the
    config path in the message) and reported wherever the daemon reports."""
    d = make_daemon(GOOD).start()
    d.write_config(TWO)
    done = d.cli("reload", "--wait", check=False)
    assert done.returncode == 0, done.stderr
    assert "reload ok: generation 2, 2 task(s)" in done.stdout
    assert {t["id"] for t in _get(d, "/v1/tasks")["tasks"]} == {"tick", "tock"}  # no wait
    d.write_config(TWO + "broken: {schedule: {}}\n")
    rejected = d.cli("reload", "--wait", check=False)
    assert rejected.returncode == 78, (rejected.stdout, rejected.stderr)
    assert "reload failed, keeping the running config" in rejected.stderr
    assert "tasks.broken" in rejected.stderr
    status = _get(d, "/v1/status")
    assert status["last_reload_ok"] is False and "tasks.broken" in status["last_reload_error"]
    assert _metric(d, "agentd_config_last_reload_successful") == 0
    assert {t["id"] for t in _get(d, "/v1/tasks")["tasks"]} == {"tick", "tock"}
    assert status["reloads_done"] == 2
    assert d.stop() == 0


def test_reload_signals_only_the_daemon_the_supervisor_names(make_daemon: Any) -> None:
    d = make_daemon(GOOD).start()
    assert d.proc is not None
    other = d.cli("reload", "--wait", "--pid", str(d.proc.pid + 100_000), check=False)
    assert other.returncode == 1 and "not signalling it" in other.stderr
    assert _get(d, "/v1/status")["reloads_started"] == 0
    d.write_config(TWO)
    asked = d.cli("reload", "--pid", str(d.proc.pid), check=False)
    assert asked.returncode == 0 and f"SIGHUP to pid {d.proc.pid}" in asked.stdout
    wait_for(lambda: _get(d, "/v1/status")["reloads_done"] == 1, what="the reload")
    assert d.stop() == 0
    stopped = d.cli("reload", "--wait", check=False)
    assert stopped.returncode == 3 and "no daemon answers" in stopped.stderr


def test_a_reload_of_many_tasks_is_one_short_line_and_check_config_can_be_quiet(
    make_daemon: Any,
) -> None:
    d = make_daemon(GOOD).start()
    many = GOOD + "".join(
        f"\nt{i:03d}:\n  schedule: {{manual: true}}\n  command: {{argv: ['true']}}\n"
        for i in range(45)
    )
    d.write_config(many)
    assert d.cli("reload", "--wait", check=False).returncode == 0
    [line] = [ln for ln in d.log().splitlines() if "reload ok generation=2" in ln]
    assert "added=t000,t001," in line and "t019,+25 more" in line and "t044" not in line
    quiet = d.cli("check-config", "--quiet", check=False)
    assert quiet.returncode == 0 and quiet.stdout.count("\n") == 1, quiet.stdout
    assert "OK, 46 task(s)" in quiet.stdout
    assert d.stop() == 0


def test_every_daemon_setting_is_applied_by_a_reload_or_said_to_need_a_restart() -> None:
    from agentd.config import DaemonConfig
    from agentd.daemon import LIVE_SETTINGS, RESTART_SETTINGS

    assert set(LIVE_SETTINGS) | set(RESTART_SETTINGS) == set(DaemonConfig.model_fields)
    assert not set(LIVE_SETTINGS) & set(RESTART_SETTINGS)


def test_a_reload_applies_log_level_and_python_path_and_says_what_waits(
    make_daemon: Any, tmp_path: Path
) -> None:
    """Debug lines start after log_level: debug is reloaded, a module in a directory
    added to python_path runs without a restart, and a changed lease is named as
    waiting for one."""
    lib = tmp_path / "extra_lib"
    lib.mkdir()
    (lib / "reloaded_mod.py").write_text("def hello(ctx):\n    return {'hi': 1}\n")
    d = make_daemon(GOOD, daemon_extra="log_level: info").start()
    assert "DEBUG" not in d.log()
    d.write_config(
        GOOD + "late:\n  schedule: {manual: true}\n  python: {callable: 'reloaded_mod:hello'}\n",
        daemon_extra=f"log_level: debug\npython_path: [{lib}]\nlease: 7s",
    )
    assert d.cli("reload", "--wait", check=False).returncode == 0
    log = d.log()
    assert "reload: daemon.log_level changed; applied now" in log
    assert "reload: daemon.python_path changed; applied now" in log
    assert "reload: daemon.lease changed; it takes effect after a restart" in log
    run_id = d.trigger("late")
    d.wait_status(run_id, "succeeded")
    wait_for(lambda: " DEBUG " in d.log(), what="debug lines after the reload")
    assert d.stop() == 0


class KubeletVolume:
    """A ConfigMap volume as the kubelet writes it: each version in a timestamped
    directory, ``..data`` a symlink to the current one, each key a symlink through
    ``..data``; an update writes a new directory, swaps ``..data`` atomically (a new
    symlink renamed over it) and deletes the old directory. No signal is sent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.version = 0
        self.path = root / "agentd.yaml"

    def publish(self, text: str) -> None:
        self.version += 1
        new = self.root / f"..2026_12_03_10_00_0{self.version}.{self.version}"
        new.mkdir()
        (new / "agentd.yaml").write_text(text)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        tmp.rename(self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/agentd.yaml")
        if old is not None:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def test_a_configmap_update_is_reloaded_without_a_signal_and_a_broken_one_refused(
    make_daemon: Any, tmp_path: Path
) -> None:
    d = make_daemon(GOOD)
    d.write_config(GOOD, "poll_interval: 50ms")
    volume = KubeletVolume(tmp_path / "configmap")
    watch = "config: {watch: true, watch_interval: 100ms}\n"
    base = watch + d.config.read_text()
    volume.publish(base)
    d.config = volume.path  # the daemon and the CLI read the mounted file
    d.start()
    wait_for(lambda: "config watch: on, every 0.1s" in d.log(), what="the watch")
    volume.publish(base + TWO[len(GOOD) :].replace("\n", "\n  "))
    wait_for(
        lambda: {t["id"] for t in _get(d, "/v1/tasks")["tasks"]} == {"tick", "tock"},
        what="the update applied",
    )
    assert f"config watch: {volume.path} changed; reloading" in d.log()
    assert _get(d, "/v1/status")["reloads_done"] == 1  # one reload per update
    volume.publish(base + "  broken: {schedule: {}}\n")
    wait_for(lambda: _get(d, "/v1/status")["last_reload_ok"] is False, what="the refusal")
    assert "tasks.broken" in _get(d, "/v1/status")["last_reload_error"]
    seen = len(d.runs("tick"))
    wait_for(lambda: len(d.runs("tick")) >= seen + 2, what="the old config running on")
    assert _get(d, "/v1/status")["reloads_done"] == 2  # the broken file is not retried
    assert d.stop() == 0
