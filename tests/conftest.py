"""Shared fixtures: real daemon processes that are always reaped."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Agentd
from pgcluster import PgCluster, running_cluster


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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL for the session, started on first use (see pgcluster)."""
    with running_cluster() as cluster:
        yield cluster


_databases = itertools.count(1)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A new, empty database on the session's cluster, for one test."""
    return pg_cluster.create_database(f"t{os.getpid()}_{next(_databases)}")
