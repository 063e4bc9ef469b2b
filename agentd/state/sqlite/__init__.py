"""The SQLite engine: agentd's embedded, zero-setup state (one file under ``state_dir``,
WAL mode, ``synchronous=FULL``)."""

from agentd.state.port import Store
from agentd.state.sqlite.engine import (
    SqliteStore,
    is_storage_fault,
    neutral,
)
from agentd.state.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SqliteStore",
    "is_storage_fault",
    "neutral",
]


def _implements_the_port(engine: SqliteStore) -> Store:
    """Never called: mypy checks here that ``SqliteStore`` implements the port."""
    return engine
