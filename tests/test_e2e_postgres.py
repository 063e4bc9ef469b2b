"""A real daemon on PostgreSQL (``state: {url: ...}``): it starts, runs tasks, answers
its API and CLI, stops and starts again on the same database; a wrong password or an
unreachable server is a clear refusal that never shows the password."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
import pytest
from harness import Agentd, wait_for
from pgcluster import PgCluster

from agentd import exitcodes

pytestmark = pytest.mark.e2e

TASKS = """
tick:
  schedule: {every: 1s}
  command: {argv: ["true"]}
once:
  schedule: {manual: true}
  command: {argv: ["true"]}
"""


def _runs(url: str, task: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                "SELECT id, status FROM runs WHERE task_id=%s ORDER BY id", (task,)
            )
        ]


def test_a_daemon_runs_on_postgresql_and_starts_again_on_the_same_database(
    make_daemon: Callable[..., Agentd], pg_url: str
) -> None:
    d = make_daemon(TASKS, top=f"state: {{url: '{pg_url}'}}").start()
    assert "state: PostgreSQL at 127.0.0.1:" in d.log()
    wait_for(
        lambda: sum(s == "succeeded" for _, s in _runs(pg_url, "tick")) >= 2,
        what="two interval runs recorded in PostgreSQL",
    )
    run_id = d.trigger("once")
    wait_for(
        lambda: (run_id, "succeeded") in _runs(pg_url, "once"), what="the manual run to succeed"
    )
    assert not (d.state_dir / "state.sqlite").exists()  # the state is in PostgreSQL
    [node] = json.loads(d.cli("nodes", "--json").stdout)
    assert node["alive"] is True
    assert d.stop() == 0
    before = len(_runs(pg_url, "tick"))
    d.start()
    wait_for(lambda: len(_runs(pg_url, "tick")) > before, what="runs after the restart")
    statuses = [s for _, s in _runs(pg_url, "once")]
    assert statuses == ["succeeded"]  # the finished run is not run again
    assert d.stop() == 0
    # With no daemon answering, the CLI reads the shared state itself.
    nodes = json.loads(d.cli("nodes", "--json").stdout)
    assert len(nodes) == 2 and all(n["stopped_at"] for n in nodes)
    out = d.cli("runs", "--task", "once", "--json").stdout
    assert [r["status"] for r in json.loads(out)] == ["succeeded"]


def test_a_wrong_password_or_a_dead_server_is_a_clear_refusal(
    make_daemon: Callable[..., Agentd], pg_cluster: PgCluster, pg_url: str
) -> None:
    pg_cluster.psql("CREATE ROLE strict LOGIN PASSWORD 'right-one'")
    strict = pg_url.replace("agentd@", "strict@")
    # The cluster trusts every local connection; a dead port stands in for a refusal.
    dead = strict.replace(f":{pg_cluster.port}/", ":9/")
    d = make_daemon(
        TASKS,
        top=f"state: {{url: '{dead}', password_env: AGENTD_DB_PASSWORD}}",
    )
    d.start(wait_ready=False, env={"AGENTD_DB_PASSWORD": "s3cret-value"})
    wait_for(d.proc_exited, what="the daemon to refuse", timeout=60)
    assert d.proc is not None and d.proc.returncode == exitcodes.STATE_UNUSABLE
    log = d.log()
    assert "state: PostgreSQL at 127.0.0.1:9/" in log and "cannot be used" in log
    assert "s3cret-value" not in log and "Traceback" not in log
