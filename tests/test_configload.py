"""Tests for agentd.configload: the config parsed in a forked child, and its fallbacks."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

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


def test_a_killed_child_falls_back_to_parsing_here(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agentd.yaml"
    # 600 tasks pickle to more than a pipe holds (64 KiB): the child cannot have written
    # its answer and exited before result() reads, so the kill finds it alive.
    path.write_text(tasks_yaml(600))
    load = ConfigLoad(path)
    assert load.pid is not None
    os.kill(load.pid, signal.SIGKILL)
    config, index = load.result()
    assert config == load_config(path) and index == task_index(config)
    assert "child killed by signal 9" in caplog.text
    assert "parsing in-process" in caplog.text


def test_a_child_past_its_deadline_is_killed_and_the_parse_done_here(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text(tasks_yaml(5))
    load = ConfigLoad(path)
    config, _ = load.result(timeout_s=0)
    assert config == load_config(path)
    assert "no result within 0 s, child killed" in caplog.text
    assert load.pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(load.pid, os.WNOHANG)  # reaped: no zombie left behind
