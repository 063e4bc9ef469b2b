"""The node registry's SQL for the PostgreSQL engine (``agentd.state.port.NodesPort``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import cast

from agentd.clock import to_iso
from agentd.state.port import NodeRecord
from agentd.state.postgres.statements import Statements


class NodeStatements(Statements):
    def node_seen(
        self,
        node_id: str,
        now: datetime,
        *,
        host: str,
        pid: int,
        version: str,
        config_generation: str,
    ) -> None:
        ts = to_iso(now)
        with self.tx(shared=True) as conn:
            conn.execute(
                "INSERT INTO nodes(id, host, pid, version, config_generation, started_at,"
                " last_seen) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT(id) DO UPDATE SET"
                " version=excluded.version, config_generation=excluded.config_generation,"
                " last_seen=excluded.last_seen, stopped_at=NULL",
                (node_id, host, pid, version, config_generation, ts, ts),
            )

    def node_stopped(self, node_id: str, now: datetime) -> None:
        ts = to_iso(now)
        with self.tx(shared=True) as conn:
            conn.execute(
                "UPDATE nodes SET stopped_at=%s, last_seen=%s WHERE id=%s", (ts, ts, node_id)
            )

    def nodes(self) -> list[NodeRecord]:
        return cast(list[NodeRecord], self._all("SELECT * FROM nodes ORDER BY last_seen DESC, id"))

    def live_nodes(self, now: datetime, stale_after_s: float) -> set[str]:
        since = to_iso(now - timedelta(seconds=stale_after_s))
        rows = self._all(
            "SELECT id FROM nodes WHERE stopped_at IS NULL AND last_seen >= %s", (since,)
        )
        return {str(row["id"]) for row in rows}

    def forget_nodes(self, before: datetime) -> int:
        with self.tx() as conn:
            cur = conn.execute("DELETE FROM nodes WHERE last_seen < %s", (to_iso(before),))
            return int(cur.rowcount)
