"""Calibration: what this machine's SQLite and asyncio can do with no scheduler at all.

Each subcommand runs in a fresh process and prints one JSON line. The figures put
agentd's in context: a target like "p99 <= 15 ms" means little without knowing that a
bare asyncio loop with one durable, batched write takes 8 ms here.

* ``sqlite``: commits/s and rows/s, WAL, ``synchronous`` NORMAL or FULL, R rows per commit.
* ``lateness``: the asyncio floor for B1 -- sleep to the due instant, write one durable
  row per run in one transaction, start every run; lateness is measured at run start.
* ``periodic``: the floor for B2 -- a timer on every whole second, one durable row each.
* ``spawn``: raw asyncio spawn rate for B4 -- ``sh -c true`` at a given concurrency.

Standard library only, so its cost is the floor and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sqlite3
import time
from pathlib import Path

ROW = ("task-00042", "queued", "2026-01-01T00:00:00.000000Z", "{}")


def _cpu(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _open(path: Path, sync: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, task TEXT, status TEXT,"
        " ts TEXT, data TEXT, started REAL, finished REAL)"
    )
    return conn


def sqlite_rates(db: Path, sync: str, rows: int, commits: int) -> dict[str, float]:
    conn = _open(db, sync)
    t0 = time.perf_counter()
    for _ in range(commits):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO runs(task, status, ts, data) VALUES (?,?,?,?)", [ROW] * rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    return {"commits_per_s": commits / elapsed, "rows_per_s": commits * rows / elapsed}


async def lateness(db: Path, n: int, due: float) -> dict[str, object]:
    """The ~40-line loop of issue 5: the least any durable scheduler must do."""
    conn = _open(db, "FULL")
    late: list[float] = []

    async def run() -> None:
        late.append(time.time() - due)  # the run starts here; its work is nothing

    await asyncio.sleep(max(0.0, due - time.time()))
    while time.time() < due:  # sleep() may wake a hair early
        await asyncio.sleep(0)
    cpu0 = _cpu()
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO runs(task, status, ts, data, started) VALUES (?,?,?,?,?)",
        [(f"t{i}", "running", ROW[2], "{}", now) for i in range(n)],
    )
    conn.execute("COMMIT")  # every run's record is durable before any run starts
    await asyncio.gather(*(run() for _ in range(n)))
    conn.execute("BEGIN")
    conn.execute("UPDATE runs SET status='succeeded', finished=?", (time.time(),))
    conn.execute("COMMIT")
    elapsed = time.time() - due
    return {
        "lateness_s": late,
        "missed": n - len(late),
        "cpu_s": _cpu() - cpu0,
        "elapsed_s": elapsed,
        "commits": 2,
    }


async def periodic(db: Path, seconds: int) -> dict[str, object]:
    conn = _open(db, "FULL")
    late: list[float] = []
    first = math.floor(time.time()) + 1
    for k in range(seconds):
        due = first + k
        await asyncio.sleep(max(0.0, due - time.time()))
        while time.time() < due:
            await asyncio.sleep(0)
        late.append(time.time() - due)
        conn.execute("INSERT INTO runs(task, status, ts, data) VALUES (?,?,?,?)", ROW)
    return {"lateness_s": late, "expected": seconds, "fired": len(late)}


async def spawn(n: int, concurrency: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            proc = await asyncio.create_subprocess_shell(
                "true",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            await proc.communicate()

    cpu0, kids0, t0 = _cpu(), _cpu(True), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    return {"runs_per_s": n / elapsed, "cpu_s": _cpu() - cpu0, "child_cpu_s": _cpu(True) - kids0}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    p.add_argument("what", choices=["sqlite", "lateness", "periodic", "spawn"])
    p.add_argument("--db", type=Path, default=Path("floor.sqlite"))
    p.add_argument("--sync", default="FULL")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--due", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args()
    result: object
    if a.what == "sqlite":
        result = sqlite_rates(a.db, a.sync, a.rows, a.n)
    elif a.what == "lateness":
        result = asyncio.run(lateness(a.db, a.n, a.due))
    elif a.what == "periodic":
        result = asyncio.run(periodic(a.db, a.n))
    else:
        result = asyncio.run(spawn(a.n, a.concurrency))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
