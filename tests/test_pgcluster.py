"""The throwaway PostgreSQL the suite starts for itself (tests/pgcluster.py): it runs,
as an unprivileged user under root, and each test's database is its own."""

from __future__ import annotations

import os

import psycopg
from pgcluster import PgCluster


def test_the_cluster_answers_and_is_postgresql_15_or_later(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None and int(row[0]) >= 150000


def test_the_server_does_not_run_as_root(pg_cluster: PgCluster) -> None:
    owner = (pg_cluster.data / "PG_VERSION").stat().st_uid
    assert owner != 0 or os.geteuid() != 0


def test_each_test_gets_a_database_of_its_own(pg_url: str, pg_cluster: PgCluster) -> None:
    other = pg_cluster.create_database(f"apart_{os.getpid()}")
    with psycopg.connect(pg_url) as a, psycopg.connect(other) as b:
        a.execute("CREATE TABLE only_here (i int)")
        a.commit()
        row = b.execute("SELECT count(*) FROM pg_tables WHERE tablename='only_here'").fetchone()
        assert row == (0,)
