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


@pytest.mark.parametrize("how", ["killed", "late"])
def test_a_failed_child_falls_back_to_parsing_here(
    how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agentd.yaml"
    # 600 tasks pickle to more than a pipe holds (64 KiB): the child cannot have written
    # its answer and exited before result() reads, so it is alive when it fails here.
    path.write_text(tasks_yaml(600))
    load = ConfigLoad(path)
    assert load.pid is not None
    if how == "killed":
        os.kill(load.pid, signal.SIGKILL)
        config, index = load.result()
        why = "child killed by signal 9"
    else:
        config, index = load.result(timeout_s=0)
        why = "no result within 0 s, child killed"
    assert config == load_config(path) and index == task_index(config)
    assert why in caplog.text and "parsing in-process" in caplog.text
    with pytest.raises(ChildProcessError):
        os.waitpid(load.pid, os.WNOHANG)  # reaped: no zombie left behind
