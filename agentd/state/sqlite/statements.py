"""What the engine's statement mixins (``ledger``, ``alerts``) use of ``SqliteStore``: its
connection, its write transaction and its event append. Declared here for the type
checker only; ``SqliteStore`` defines them, and inherits the mixins."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agentd.models import EventKind, Row


class Statements:
    """Base of the statement mixins: nothing at run time."""

    if TYPE_CHECKING:

        @property
        def conn(self) -> sqlite3.Connection: ...

        def tx(self) -> AbstractContextManager[sqlite3.Connection]: ...

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
