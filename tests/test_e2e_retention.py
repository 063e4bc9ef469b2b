"""Retention in a real daemon: with tiny ``history`` settings and a task every second,
the state DB and the workspaces stay bounded while it runs, ``agentd_pruned_total``
counts what went, a reload changes the settings without a restart, and ``agentd
prune`` works beside the running daemon."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from harness import Agentd, agentd_cli, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

TASKS = """
tick:
  schedule: {every: 1s}
  python: {callable: "sample_tasks:sync_ok"}
"""
TINY = "history: {keep_runs: 2s, keep_events: 1s, prune_every: 1s}"
FOREVER = "history: {keep_runs: forever, max_runs_per_task: null, prune_every: 1s}"


def pruned(d: Agentd, kind: str) -> float | None:
    try:
        resp = httpx.get(d.url + "/metrics", timeout=5)
    except httpx.TransportError:
        return None
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "agentd_pruned_total" and sample.labels.get("kind") == kind:
                return float(sample.value)
    return None


def workspaces(d: Agentd) -> int:
    where = d.state_dir / "runs" / "tick"
    return len(list(where.iterdir())) if where.exists() else 0


def runs_count(d: Agentd) -> int:
    return int(d.query("SELECT COUNT(*) AS n FROM runs")[0]["n"])


def test_history_stays_bounded_while_the_daemon_runs(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(TASKS, top=TINY).start()
    assert pruned(d, "runs") == 0  # every kind's series exists from the start

    seen = {"runs": 0, "workspaces": 0, "succeeded": 0}

    def enough_pruned() -> bool:
        seen["runs"] = max(seen["runs"], runs_count(d))
        seen["workspaces"] = max(seen["workspaces"], workspaces(d))
        return (pruned(d, "runs") or 0) >= 10

    wait_for(enough_pruned, timeout=90, what="ten runs pruned")
    # A run a second, each with a workspace (result.json): kept 2 s after it ends, a
    # pass every second. Ten and more have gone; what is left stays a handful.
    assert seen["runs"] <= 15, seen
    assert seen["workspaces"] <= 15, seen
    assert (pruned(d, "workspaces") or 0) >= 5
    assert (pruned(d, "events") or 0) >= 10 * 3
    assert (pruned(d, "attempts") or 0) >= 10
    assert "retention: pruned runs=" in d.log()
    assert d.query("SELECT COUNT(*) AS n FROM runs WHERE status='succeeded'")[0]["n"] >= 1

    # A reload to keep everything applies at the next pass, without a restart.
    d.top = FOREVER
    d.write_config(TASKS)
    d.signal(signal.SIGHUP)
    d.wait_log("reload ok generation=2", "the reload")
    bound = seen["runs"]
    wait_for(lambda: runs_count(d) > bound + 2, timeout=60, what="history growing again")
    before = pruned(d, "runs")
    wait_for(lambda: runs_count(d) > bound + 5, timeout=60, what="history growing further")
    assert pruned(d, "runs") == before

    # `agentd prune` beside the running daemon: its own config says what goes.
    dry = agentd_cli("prune", "--dry-run", "--json", config=d.config)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["counts"]["runs"] == 0  # the daemon's config: forever
    alt = tmp_path / "alt.yaml"
    alt.write_text(d.config.read_text().replace(FOREVER, "history: {keep_runs: 1s}"))
    dry = agentd_cli("prune", "--dry-run", "--json", config=alt)
    assert json.loads(dry.stdout)["counts"]["runs"] >= 5, dry.stdout
    real = agentd_cli("prune", "--json", config=alt)
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["counts"]["runs"] >= 5
    assert runs_count(d) <= bound
    # The daemon went on working meanwhile, and nothing of it waited on a lock too long.
    last = d.query("SELECT MAX(finished_at) AS t FROM runs WHERE status='succeeded'")[0]["t"]
    wait_for(
        lambda: (
            d.query(
                "SELECT COUNT(*) AS n FROM runs WHERE status='succeeded' AND finished_at > ?",
                (last,),
            )[0]["n"]
            > 0
        ),
        what="a run after the CLI's prune",
    )
    assert "database is locked" not in d.log()
    assert d.stop() == 0
    assert "Traceback" not in d.log()
