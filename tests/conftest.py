"""Shared fixtures: real daemon processes that are always reaped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Agentd


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Agentd]]:
    daemons: list[Agentd] = []

    def make(tasks: str, daemon_extra: str = "", top: str = "") -> Agentd:
        d = Agentd(tmp_path, tasks, daemon_extra, top)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
