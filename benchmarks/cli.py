"""``python -m benchmarks [--quick | --smoke] [--only SECTIONS] [--no-peers]``.

Builds the peers' venvs, runs the sections in order (calibration first), prints the
table and writes the JSON (``--out``). A full run of the whole suite also rewrites
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks import (
    bench_agent,
    bench_calibrate,
    bench_idle,
    bench_lateness,
    bench_lifecycle,
    bench_load,
    bench_postgres,
    bench_throughput,
    procstat,
    report,
)
from benchmarks.agentd_proc import REPO
from benchmarks.model import MODES
from benchmarks.peers_env import build_venv, versions
from benchmarks.reps import Suite

HERE = Path(__file__).resolve().parent
SECTIONS: dict[str, Callable[[Suite], None]] = {
    "C": bench_calibrate.run,
    "B1": bench_lateness.b1,
    "B2": bench_lateness.b2,
    "B3": bench_throughput.b3,
    "B4": bench_throughput.b4,
    "idle": bench_idle.run,  # B5, B6 idle, B7, B9 idle, B10 /metrics with 10,000 tasks
    "B8": bench_lifecycle.run,  # B8, B9 loaded
    "load": bench_load.run,  # B6 after runs, B10 under load
    "B11": bench_agent.run,  # the tool-calling agent loop against a 200 ms provider (issue 27)
    "PG": bench_postgres.run,  # PG-C, PG-B3, PG-B1: 1-3 nodes on PostgreSQL and its peers
}
PEER_PACKAGES = {
    "aps": ["apscheduler", "sqlalchemy", "aiohttp"],
    "huey": ["huey"],
    "procrastinate": ["procrastinate", "psycopg"],
    "dbos": ["dbos", "psycopg", "sqlalchemy"],
}
PEERS_OF = {"procrastinate": {"PG"}, "dbos": {"PG"}}
"""Peers only some sections use: their venvs are built only when one of those runs."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 repetition, small sizes")
    size.add_argument("--smoke", action="store_true", help="agentd only, tiny: for the tests")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--no-peers", action="store_true", help="agentd and floors only")
    p.add_argument("--reps", type=int, help="timed repetitions (default: 5, quick/smoke 1)")
    p.add_argument(
        "--out",
        type=Path,
        help="JSON file (default benchmarks/results-MODE.json, results-MODE-SECTIONS.json"
        " with --only)",
    )
    p.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    return p.parse_args(argv)


def setup_peers(
    s: Suite, enabled: bool, why_not: str, sections: list[str]
) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    redis = shutil.which("redis-server")
    s.not_run["celery"] = (
        "redis-server not on PATH"
        if redis is None
        else f"redis-server found ({redis}) but the Celery peer is not written yet"
    )
    for name, packages in PEER_PACKAGES.items():
        if name in PEERS_OF and not PEERS_OF[name] & set(sections):
            continue
        if not enabled:
            s.not_run[name] = why_not
            continue
        s.log(f"peer venv {name}: building or reusing")
        try:
            s.peers[name] = build_venv(name, s.tmp_root / "pip.log")
            found[name] = versions(s.peers[name], packages)
        except (subprocess.SubprocessError, OSError) as exc:
            s.not_run[name] = f"venv build failed: {exc}"
    return found


def git_commit() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--", "agentd", "benchmarks")
    return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")


def default_out(mode: str, only: list[str]) -> str:
    """``results-full.json`` belongs to a run of the whole suite: a run of some sections
    gets a file of its own, so it never replaces the full run's figures."""
    whole = list(only) == list(SECTIONS)
    return f"results-{mode}.json" if whole else f"results-{mode}-{'-'.join(only)}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.reps:
        mode = replace(mode, reps=args.reps)
    only = [x.strip() for x in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        print(f"unknown section(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.monotonic()
    tmp_root = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
    s = Suite(mode, tmp_root)
    why_not = "--no-peers" if args.no_peers else "peers are skipped in smoke mode"
    peer_versions = setup_peers(s, mode.peers and not args.no_peers, why_not, only)
    machine = procstat.machine()
    try:
        for name in only:
            s.log(f"section {name}")
            try:
                SECTIONS[name](s)
            except Exception as exc:  # one broken section must not lose the others
                s.errors.append(f"section {name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    meta = {
        "mode": mode.name,
        "reps": mode.reps,
        "warmup": mode.warmup,
        "sections": only,
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": time.monotonic() - t0,
        "commit": git_commit(),
        "python": platform.python_version(),
        "machine": machine,
        "loadavg_end": procstat.loadavg(),
        "peer_versions": peer_versions,
        "not_run": s.not_run,
        "errors": s.errors,
        **s.extra_meta,
    }
    print(report.text(s.metrics))
    for err in s.errors:
        print(f"error: {err}")
    out = args.out or HERE / default_out(mode.name, only)
    out.write_text(
        json.dumps(
            {"meta": meta, "metrics": [m.to_json() for m in s.metrics]}, indent=1, default=str
        )
    )
    print(f"JSON: {out}")
    md = args.markdown or (HERE / "RESULTS.md" if mode.name == "full" and not args.only else None)
    if md:
        md.write_text(report.markdown(s.metrics, meta))
        print(f"Markdown: {md}")
    return 0
