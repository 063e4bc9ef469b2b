"""Tests for agentd.configload: the config parsed in a forked child, and its fallbacks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import wait_for

from agentd.config import ConfigError, load_config, task_index
from agentd.configload import ConfigLoad

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "agentd.yaml"


def tasks_yaml(n: int, cron: str = "5 4 * * *", changed: int = 0) -> str:
    lines = ["daemon:", "  http: {port: 0}", "tasks:"]
    for i in range(n):
        when = "7 4 * * *" if i < changed else cron
        lines.append(f'  t{i:03d}: {{schedule: {{cron: "{when}"}}, command: {{argv: ["true"]}},')
        lines.append(f"         params: {{n: {i}, tags: [a, b]}}}}")
    return "\n".join(lines) + "\n"


def test_the_child_gives_what_an_in_process_parse_gives(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    config, index = ConfigLoad(SHIPPED).result()
    expected = load_config(SHIPPED)
    assert config == expected
    assert config.source == expected.source
    assert index == task_index(expected)
    assert not caplog.records  # no fallback was needed


def test_a_reload_reuses_the_unchanged_tasks_it_did_not_send(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text(tasks_yaml(40))
    before = load_config(path)
    before_index = task_index(before)
    path.write_text(
        tasks_yaml(40, changed=3) + "  extra: {schedule: {every: 1h}, python: {callable: 'm:f'}}\n"
    )
    config, index = ConfigLoad(path, (before, before_index)).result()
    expected = load_config(path)
    assert config == expected
    assert list(config.tasks) == list(expected.tasks)  # the file's order
    assert index == task_index(expected)
    for tid in ("t000", "t001", "t002", "extra"):
        assert config.tasks[tid] is not before.tasks.get(tid)
        assert index[tid] != before_index.get(tid)
    for tid in ("t003", "t039"):
        assert config.tasks[tid] is before.tasks[tid]  # the running object, kept
        assert index[tid] == before_index[tid]


def test_an_invalid_config_is_reported_from_the_child(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "agentd.yaml"
    path.write_text(tasks_yaml(3).replace('"5 4 * * *"', '"61 4 * * *"', 1))
    with pytest.raises(ConfigError) as child:
        ConfigLoad(path).result()
    with pytest.raises(ConfigError) as here:
        load_config(path)
    assert child.value.render() == here.value.render()
    assert "tasks.t000.schedule.cron" in child.value.render()
    assert not caplog.records  # an invalid file is an answer, not a failed child


@pytest.mark.parametrize("how", ["killed", "late"])
def test_a_failed_child_is_a_config_error_and_nothing_is_parsed_here(
    how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that dies or runs late says nothing about the file but that it could not
    be parsed within bounds: parsing it here instead is how a bomb would block the
    daemon. The caller keeps its running config (or exits 78 at start)."""
    path = tmp_path / "agentd.yaml"
    # 600 tasks pickle to more than a pipe holds (64 KiB): the child cannot have written
    # its answer and exited before result() reads, so it is alive when it fails here.
    path.write_text(tasks_yaml(600))
    load = ConfigLoad(path)
    assert load.pid is not None
    with pytest.raises(ConfigError) as info:
        if how == "killed":
            os.kill(load.pid, signal.SIGKILL)
            load.result()
        else:
            load.result(timeout_s=0)
    why = "killed by signal 9 (SIGKILL)" if how == "killed" else "not parsed within 0 s"
    assert info.value.source == str(path)
    assert why in info.value.render(), info.value.render()
    assert "parsing in-process" not in caplog.text
    with pytest.raises(ChildProcessError):
        os.waitpid(load.pid, os.WNOHANG)  # reaped: no zombie left behind


def test_a_child_blocked_on_a_fifo_times_out_as_a_config_error(tmp_path: Path) -> None:
    fifo = tmp_path / "agentd.yaml"
    os.mkfifo(fifo)  # no writer: opening it blocks for ever
    load = ConfigLoad(fifo)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"not parsed within 0\.5 s"):
        load.result(timeout_s=0.5)
    assert time.monotonic() - started < 10


def test_a_child_over_its_memory_bound_is_config_too_large(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text(tasks_yaml(4000))  # parsing needs well over 16 MiB
    with pytest.raises(ConfigError) as info:
        ConfigLoad(path, memory_mib=16).result()
    assert "config too large: parsing needed more than 16 MiB" in info.value.render()
    config, _ = ConfigLoad(path).result()  # the default bound holds it easily
    assert len(config.tasks) == 4000


def test_a_child_over_its_cpu_bound_is_stopped(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text(tasks_yaml(60_000))  # several seconds of CPU on any machine
    started = time.monotonic()
    with pytest.raises(ConfigError, match="more than 1 s of CPU"):
        ConfigLoad(path, cpu_s=1).result(timeout_s=60)
    assert time.monotonic() - started < 30


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for whoever adopted it to reap it."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    """``agentd run`` killed with SIGKILL while its child parses: the child must not
    live on (before: at 8 GiB of a bomb, adopted by PID 1)."""
    fifo = tmp_path / "agentd.yaml"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "agentd.cli", "run", "--config", str(fifo)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    child = None
    try:
        child = wait_for(lambda: _children(daemon.pid), what="the parse child")[0]
        daemon.kill()
        daemon.wait(timeout=30)
        wait_for(lambda: _gone(child), timeout=10, what=f"child {child} to die with its parent")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)  # the test's own orphan, by its pid


def test_only_a_failed_fork_or_pipe_parses_in_process(tmp_path: Path) -> None:
    """With one file descriptor left, os.pipe() (two) fails and open() (one) does not:
    the config is parsed in-process, with a warning."""
    path = tmp_path / "agentd.yaml"
    path.write_text(tasks_yaml(5))
    script = (
        "import os, resource, sys\n"
        "from agentd.configload import ConfigLoad\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "fds = []\n"
        "try:\n"
        "    while True:\n"
        "        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "os.close(fds.pop())\n"
        "load = ConfigLoad(sys.argv[1])\n"
        "assert load.pid is None\n"
        "config, index = load.result()\n"
        "print(len(config.tasks), len(index))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", "5"]
    assert "pipe failed" in result.stderr and "parsing in-process" in result.stderr
