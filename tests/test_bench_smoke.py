"""The benchmark harness (benchmarks/, issue 5) in smoke mode, so that it cannot rot.

Smoke mode runs every benchmark once at tiny sizes against agentd and the stdlib
floors only: no peer virtualenvs, no network. Section PG starts its own PostgreSQL (as
the tests' fixture does) and runs agentd on 1, 2 and 3 nodes; its peers are skipped.
Nothing about speed is asserted here, only that the suite ran end to end and every
benchmark produced a figure in the documented JSON shape. Timing belongs in ``make
bench``, never in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_postgres import Snapshot, window_counts
from benchmarks.cli import SECTIONS, default_out

REPO = Path(__file__).resolve().parent.parent
BENCHES = {"C", *(f"B{i}" for i in range(1, 12)), "PG-C", "PG-B3", "PG-B1"}
CALIBRATIONS = {"C", "PG-C"}
METRIC_KEYS = {"bench", "label", "unit", "better", "target", "status", "note", "results", "not_run"}
RESULT_KEYS = {"median", "min", "max", "n", "samples"}
SMOKE_TIMEOUT_S = 360
# The smoke run happens in whichever of these tests comes first (a module fixture).
pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT_S + 20)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        # ~65 s on an idle 2-core machine (PG ~35 of it), ~150 s beside a test suite.
        timeout=SMOKE_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.e2e
def test_every_benchmark_produced_a_figure(smoke: tuple[dict[str, Any], str]) -> None:
    data, _ = smoke
    assert data["meta"]["errors"] == []
    metrics = data["metrics"]
    assert {m["bench"] for m in metrics} == BENCHES
    with_agentd = {m["bench"] for m in metrics if "agentd" in m["results"]}
    assert with_agentd == BENCHES - CALIBRATIONS
    for m in metrics:
        assert "agentd" not in m["not_run"], m["label"]
        assert m["results"], m["label"]


@pytest.mark.e2e
def test_json_shape(smoke: tuple[dict[str, Any], str]) -> None:
    data, _ = smoke
    assert set(data) == {"meta", "metrics"}
    meta = data["meta"]
    assert meta["mode"] == "smoke"
    for key in ("machine", "commit", "python", "started", "duration_s", "not_run"):
        assert key in meta
    assert {"cpu_model", "cores", "ram_gib", "kernel"} <= set(meta["machine"])
    for m in data["metrics"]:
        assert set(m) == METRIC_KEYS
        assert m["status"] in ("met", "MISSED", "-")
        for result in m["results"].values():
            assert set(result) == RESULT_KEYS
            assert result["n"] == len([v for v in result["samples"] if v is not None]) >= 1


@pytest.mark.e2e
def test_peers_skipped_with_reasons_and_counters_recorded(
    smoke: tuple[dict[str, Any], str],
) -> None:
    data, stdout = smoke
    not_run = data["meta"]["not_run"]
    assert {"aps", "huey", "celery", "procrastinate", "dbos"} <= set(not_run)
    counters = [m for m in data["metrics"] if m["label"].startswith("SQL commits per 1,000")]
    assert counters and all("agentd" in m["results"] for m in counters)
    assert "== B1" in stdout and "== B10" in stdout and "== PG-B3" in stdout


@pytest.mark.e2e
def test_the_postgresql_section_ran_every_node_count_and_counted_from_the_server(
    smoke: tuple[dict[str, Any], str],
) -> None:
    data, _ = smoke
    assert data["meta"]["postgresql"]["fsync"] == "on"  # the benchmarks' cluster is durable
    assert data["meta"]["postgresql"]["synchronous_commit"] == "on"
    pg = {m["label"].split(",")[0]: m for m in data["metrics"] if m["bench"] == "PG-B3"}
    runs = pg["throughput"]["results"]
    assert {"agentd", "agentd-pg-1node", "agentd-pg-2nodes", "agentd-sqlite"} <= set(runs)
    assert set(pg["throughput"]["not_run"]) == {
        "procrastinate-1w", "procrastinate-3w", "dbos-1p", "dbos-3p"
    }  # fmt: skip
    commits = pg["transactions committed per 1"]["results"]
    assert all(commits[k]["median"] > 0 for k in ("agentd", "agentd-pg-1node"))
    share = pg["busiest process's share of the runs"]["results"]
    assert share["agentd-pg-1node"]["median"] == 1.0


@pytest.mark.e2e
def test_the_agent_loop_ran_against_its_floor(smoke: tuple[dict[str, Any], str]) -> None:
    data, _ = smoke
    b11 = {m["label"].split(",")[0]: m for m in data["metrics"] if m["bench"] == "B11"}
    wall = b11["wall time"]
    assert set(wall["results"]) == {"agentd", "asyncio-httpx-floor"}
    assert wall["status"] in ("met", "MISSED")  # judged against the floor of the same run
    assert b11["CPU per model call"]["results"]["agentd"]["median"] > 0


def test_server_counts_leave_out_the_harness_and_count_new_backends_from_zero() -> None:
    before = Snapshot(at=0.0, xact=100, wal_sync=10, harness=5, server_cpu={1: 2.0, 2: 1.0})
    after = Snapshot(at=1.0, xact=160, wal_sync=14, harness=15, server_cpu={1: 2.5, 3: 0.5})
    counts = window_counts(before, after, 1000)
    assert counts == {
        "commits_per_1k": 50.0,  # 60 committed, 10 of them the harness's polls
        "wal_syncs_per_1k": 4.0,
        "server_cpu_s_per_1k": 1.0,  # 0.5 of pid 1, 0.5 of the new pid 3
    }


def test_a_run_of_some_sections_never_takes_the_whole_runs_json() -> None:
    whole = list(SECTIONS)
    assert default_out("full", whole) == "results-full.json"
    assert default_out("full", ["B4"]) == "results-full-B4.json"
    assert default_out("quick", ["B1", "load"]) == "results-quick-B1-load.json"
