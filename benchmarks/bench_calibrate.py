"""Calibration, first in every run: raw SQLite commit rates on this disk, right now.

WAL with ``synchronous`` NORMAL and FULL, one and 100 rows per commit. A FULL commit is
agentd's unit of durable work, so runs/s can be read against commits/s: a design that
needs k FULL commits per run cannot beat (FULL commits/s) / k.
"""

from __future__ import annotations

from functools import partial

from benchmarks import common
from benchmarks.reps import Rep, RunFn, Sample, Suite


def rates(sync: str, rows: int, commits: int, rep: Rep) -> Sample:
    args = ["sqlite", "--sync", sync, "--rows", str(rows), "--n", str(commits), "--db", "c.sqlite"]
    result = common.floor(args, rep.tmp)
    return {
        "commits_per_s": float(str(result["commits_per_s"])),
        "rows_per_s": float(str(result["rows_per_s"])),
    }


def run(s: Suite) -> None:
    n = s.mode.calib_commits
    contenders: dict[str, RunFn] = {}
    for sync in ("NORMAL", "FULL"):
        for rows in (1, 100):
            name = f"WAL {sync}, {rows} row{'s' if rows > 1 else ''}/commit"
            contenders[name] = partial(rates, sync, rows, n if rows == 1 else max(n // 5, 20))
    runs = s.interleave("calibrate", contenders, warmup=0)
    s.add("C", "SQLite commits/s", "commits/s", runs, "commits_per_s", better="higher")
    s.add("C", "SQLite rows/s", "rows/s", runs, "rows_per_s", better="higher")
