"""The tests' throwaway PostgreSQL: ``benchmarks.pgcluster`` (shared with the
benchmarks, which start theirs at full durability) at the tests' setting, ``fsync=off``
(they test agentd's logic, not the disk). Fixtures: ``pg_cluster`` and ``pg_url`` in
``tests/conftest.py``."""

from __future__ import annotations

from benchmarks.pgcluster import SUPERUSER, UNPRIVILEGED, PgCluster, pg_bin, running_cluster

__all__ = ["SUPERUSER", "UNPRIVILEGED", "PgCluster", "pg_bin", "running_cluster"]
