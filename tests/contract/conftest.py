"""Fixtures of the contract suite: every test here runs once per engine in ``ENGINES``.

A new engine registers with one entry in ``ENGINES``: its name (the test id, as in
``test_fire_...[sqlite]``) and a function that, given the test's ``request`` (to use
fixtures: ``request.getfixturevalue``), returns the function that opens an instance of
it on the state kept under a directory. The same directory must give the same state (a
second instance, or one opened after another was closed, sees everything committed
before); another directory, a state of its own, empty until its first ``sync_tasks``.
An engine that needs a server (PostgreSQL) derives its database from the directory:
PostgreSQL runs on the session's throwaway cluster (``pg_cluster``; a test fails, never
skips, where the server's binaries are missing).

The tests use only the port (``agentd.state.port``): the ``Store`` verbs and attributes,
``UnitOfWork``, the records and the errors. No ``conn``, no SQL, no ``sqlite3``, no
private attributes, nothing an engine keeps for itself: what an engine-specific test
needs to look at belongs in that engine's own tests (``tests/test_sqlite_engine.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentd.models import Row
from agentd.state.port import EventSink, Store
from agentd.state.postgres.engine import PostgresStore
from agentd.state.sqlite.engine import SqliteStore

from .helpers import T0, TASKS, Engine, States


def _sqlite(request: pytest.FixtureRequest) -> Engine:
    def open_state(where: Path, sink: EventSink | None) -> Store:
        return SqliteStore(where / "state.sqlite", event_sink=sink)

    return open_state


def _postgres(request: pytest.FixtureRequest) -> Engine:
    """One database per directory: the test's own (``pg_url``) for the first, a new one
    on the same cluster for each other."""
    cluster = request.getfixturevalue("pg_cluster")
    first: str = request.getfixturevalue("pg_url")
    urls: dict[Path, str] = {}

    def open_state(where: Path, sink: EventSink | None) -> Store:
        url = urls.get(where)
        if url is None:
            if not urls:
                url = first
            else:
                url = cluster.create_database(f"{first.rsplit('/', 1)[1]}_{len(urls)}")
            urls[where] = url
        return PostgresStore(url, event_sink=sink)

    return open_state


ENGINES: dict[str, Callable[[pytest.FixtureRequest], Engine]] = {
    "postgres": _postgres,
    "sqlite": _sqlite,
}


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> Engine:
    """The engine under test: one run of each contract test per entry of ``ENGINES``."""
    return ENGINES[request.param](request)


@pytest.fixture
def states(engine: Engine, tmp_path: Path) -> Iterator[States]:
    opened = States(engine, tmp_path)
    try:
        yield opened
    finally:
        opened.close_all()


@pytest.fixture
def events_seen() -> list[Row]:
    """What reached ``store``'s ``event_sink``, in order (from after its task sync)."""
    return []


@pytest.fixture
def store(states: States, events_seen: list[Row]) -> Store:
    """An instance on a new state with ``TASKS`` synced at ``T0``; its sink appends to
    ``events_seen``, which starts empty after that sync."""
    opened = states.open(sink=events_seen.append)
    opened.sync_tasks(TASKS, T0)
    events_seen.clear()
    return opened


@pytest.fixture
def second_store(states: States, store: Store) -> Store:
    """Another instance on ``store``'s state (a second process: the CLI beside the
    daemon), without a sink."""
    return states.open()
