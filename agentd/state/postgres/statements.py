"""What the engine's statement mixins (``ledger``, ``alerts``) use of ``PostgresStore``:
its connection, its write transaction and its event append. Declared here for the type
checker only; ``PostgresStore`` defines them, and inherits the mixins.

The same names as ``agentd.state.sqlite.statements``, with PostgreSQL's manners: ``%s``
placeholders, and rows as dicts (the connection's row factory is ``dict_row``, so
``conn.execute(...).fetchone()`` is a dict too, never a tuple).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agentd.models import EventKind, Row

if TYPE_CHECKING:
    import psycopg


class Statements:
    """Base of the statement mixins: nothing at run time."""

    if TYPE_CHECKING:

        @property
        def conn(self) -> psycopg.Connection[dict[str, Any]]: ...

        def tx(
            self, *, shared: bool = False
        ) -> AbstractContextManager[psycopg.Connection[dict[str, Any]]]: ...

        def _event(
            self,
            now: datetime | str,
            kind: EventKind,
            task_id: str | None = None,
            run_id: str | None = None,
            **data: Any,
        ) -> None: ...

        def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

        def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
