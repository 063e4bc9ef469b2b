"""Where agentd's nodes spend a PG-B3 queue on PostgreSQL, seen from the server (and,
optionally, from inside one node by py-spy).

``python -m benchmarks.profile_pg --nodes K --n N [--py-spy PATH [--idle]] [--out DIR]``

A durable cluster (``benchmarks.pgcluster``), ``N`` queued runs due at one instant
(``prefill.queue_pg``), ``K`` nodes started before it. While they work, a thread samples
``pg_stat_activity`` every ``--sample-ms`` for the nodes' main connections
(``application_name='agentd'``), and ``pg_locks`` for who holds the write lock
(``WRITE_LOCK`` of ``agentd.state.postgres.engine``, a 64-bit advisory key: ``classid``
its high half, ``objid`` its low half). Each sample of a connection is one of:

- ``wait WRITE_LOCK``: active, waiting for the advisory lock (``Lock:advisory``);
- ``holds, server`` / ``holds, IO:WALSync`` / ...: holds the lock and the server is
  executing, or waiting on that event (a commit's WAL flush is ``IO:WALSync``, or
  ``LWLock:WALWrite`` behind another backend's flush);
- ``holds, idle in transaction``: holds the lock while the server waits for the client:
  the node is running Python between two statements of its transaction;
- ``no lock, ...``: a read outside a write transaction, or ``idle`` (nothing asked).

Printed: the rate, transactions committed and WAL flushes per run, and those shares per
node and in total. ``--setup-sql`` runs statements on the filled database before the
nodes start (a what-if such as an index and ``ANALYZE``, never part of the suite's
figures). With ``--py-spy``, node 0 runs under ``py-spy record`` (``--idle``: wall
clock, waiting threads included; then also per thread) and its functions are summarised
as by ``benchmarks.profile``.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from agentd.state.postgres.engine import WRITE_LOCK
from benchmarks import prefill
from benchmarks.agentd_proc import AgentdProc, unix
from benchmarks.bench_throughput import PY_TASK, QUEUE_CONCURRENCY
from benchmarks.pgcluster import running_cluster
from benchmarks.profile import child_of, summary

LOCK_HI, LOCK_LO = WRITE_LOCK >> 32, WRITE_LOCK & 0xFFFFFFFF

SAMPLE_SQL = """
SELECT a.pid, a.state, a.wait_event_type, a.wait_event, left(a.query, 90),
       EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'
               AND l.granted AND l.classid = %s AND l.objid = %s) AS holds
FROM pg_stat_activity a WHERE a.datname = %s AND a.application_name = 'agentd'
"""


def classify(state: str | None, wtype: str | None, wevent: str | None, holds: bool) -> str:
    """One sample of one connection, in the terms of the module's docstring."""
    if wtype == "Lock" and wevent == "advisory":
        return "wait WRITE_LOCK"
    what = state or "?"
    if state == "active":
        what = "server" if wtype is None else f"{wtype}:{wevent}"
    return f"{'holds' if holds else 'no lock'}, {what}"


class Sampler(threading.Thread):
    def __init__(self, url: str, db: str, every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.db, self.every_s = url, db, every_s
        self.by_pid: dict[int, Counter[str]] = {}
        self.queries: Counter[str] = Counter()
        """Active samples by statement (its first 90 characters)."""
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(SAMPLE_SQL, (LOCK_HI, LOCK_LO, self.db)).fetchall()
                self.samples += 1
                for pid, state, wtype, wevent, query, holds in rows:
                    key = classify(state, wtype, wevent, bool(holds))
                    if state == "active":
                        self.queries[" ".join(str(query).split())] += 1
                    self.by_pid.setdefault(int(pid), Counter())[key] += 1
                self.stop.wait(self.every_s)


def stats(conn: psycopg.Connection[tuple[object, ...]], db: str) -> tuple[int, int]:
    x = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname=%s", (db,))
    w = conn.execute("SELECT wal_sync FROM pg_stat_wal")
    xr, wr = x.fetchone(), w.fetchone()
    assert xr is not None and wr is not None
    return int(str(xr[0])), int(str(wr[0]))


def report(sampler: Sampler) -> str:
    lines = [f"{sampler.samples} samples of pg_stat_activity ({sampler.every_s * 1000:.0f} ms)"]
    total: Counter[str] = Counter()
    for pid, counts in sorted(sampler.by_pid.items()):
        n = sum(counts.values())
        total += counts
        shown = ", ".join(f"{k} {100 * c / n:.0f}%" for k, c in counts.most_common())
        lines.append(f"  backend {pid}: {shown}")
    n = sum(total.values()) or 1
    lines.append("  all nodes' main connections:")
    lines += [f"    {100 * c / n:5.1f}%  {k}" for k, c in total.most_common()]
    active = sum(sampler.queries.values()) or 1
    lines.append("  active samples by statement:")
    lines += [f"    {100 * c / active:5.1f}%  {q}" for q, c in sampler.queries.most_common(8)]
    held = sum(c for k, c in total.items() if k.startswith("holds"))
    lines.append(
        f"  the write lock was held in {100 * held / max(1, sampler.samples):.0f}% of samples"
    )
    return "\n".join(lines)


def by_thread(raw: Path, name: str, out: Path) -> Path:
    """The samples of the threads whose name starts with ``name`` (py-spy ``--threads``
    puts ``thread (tid): Name`` first in each stack), in a file of their own."""
    lines = [
        ln
        for ln in raw.read_text().splitlines()
        if ln.split(";", 1)[0].split(": ", 1)[-1].startswith(name)
    ]
    path = out / f"node0.{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_pg")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--sample-ms", type=float, default=20)
    p.add_argument("--py-spy", help="path to py-spy: profile node 0")
    p.add_argument("--idle", action="store_true", help="py-spy: wall clock, waiting included")
    p.add_argument("--rate", type=int, default=250)
    p.add_argument("--out", type=Path, default=Path("agentd-pg-profile"))
    p.add_argument(
        "--setup-sql",
        action="append",
        default=[],
        help="what-if: SQL run on the state database after it is filled (an index to try)",
    )
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="agentd-profile-pg-") as tmp,
        running_cluster(durable=True) as cluster,
    ):
        url = cluster.create_database("prof")
        admin = psycopg.connect(cluster.url(), autocommit=True)
        nodes = [
            AgentdProc(Path(tmp) / f"n{i}", PY_TASK, state_url=url, concurrency=QUEUE_CONCURRENCY)
            for i in range(a.nodes)
        ]
        due = time.time() + 3 + a.nodes + a.n / 10000
        prefill.queue_pg(url, nodes[0], "bench", a.n, datetime.fromtimestamp(due, UTC))
        for sql in a.setup_sql:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql)
        raw = (a.out / "node0.pyspy.txt").resolve()
        wrap: tuple[str, ...] = ()
        if a.py_spy:
            idle = ["--idle", "--threads"] if a.idle else []
            wrap = (a.py_spy, "record", "--format", "raw", "--rate", str(a.rate),
                    "--nonblocking", *idle, "-o", str(raw), "--")  # fmt: skip
        try:
            for i, node in enumerate(nodes):
                node.start(wrap=wrap if i == 0 else ())
            for node in nodes:
                node.wait_ready()
            if time.time() > due - 0.2:
                raise SystemExit("the nodes were not up before the queue fell due: raise the lead")
            sampler = Sampler(cluster.url(), "prof", a.sample_ms / 1000)
            time.sleep(max(0.0, due - 0.05 - time.time()))
            x0, w0 = stats(admin, "prof")
            sampler.start()
            with psycopg.connect(url, autocommit=True) as conn:
                polls = 0
                while True:
                    polls += 1
                    row = conn.execute("SELECT count(*) FROM runs WHERE status='succeeded'")
                    got = row.fetchone()
                    if got is not None and int(got[0]) >= a.n:
                        break
                    time.sleep(0.1)
                sampler.stop.set()
                sampler.join()
                time.sleep(1.2)  # statistics arrive at most once a second per backend
                x1, w1 = stats(admin, "prof")
                span = conn.execute(
                    "SELECT MIN(ts) FILTER (WHERE kind='claim'), MAX(ts) FILTER"
                    " (WHERE kind='success') FROM events"
                ).fetchone()
                assert span is not None
            rate = a.n / (unix(str(span[1])) - unix(str(span[0])))
            print(f"{a.nodes} node(s), {a.n:,} runs: {rate:,.0f} runs/s")
            print(
                f"transactions committed per run {(x1 - x0 - polls - 2) / a.n:.3f},"
                f" WAL flushes per run {(w1 - w0) / a.n:.3f}"
            )
            text = report(sampler)
            print(text)
            (a.out / "pg_stat_activity.txt").write_text(text + "\n")
            if a.py_spy:
                os.kill(child_of(nodes[0].pid), signal.SIGTERM)
                assert nodes[0].proc is not None
                nodes[0].proc.wait(timeout=120)
                parts = [f"== node 0, all threads\n{summary(raw, 30)}"]
                if a.idle:  # wall clock: each thread on its own, the idle pool left out
                    for name in ("MainThread", "agentd-commit"):
                        one = by_thread(raw, name, a.out)
                        parts.append(f"== node 0, {name} (wall clock)\n{summary(one, 30)}")
                text = "\n".join(parts)
                print(text)
                (a.out / "node0.summary.txt").write_text(text + "\n")
        finally:
            for node in nodes:
                node.close()
            admin.close()


if __name__ == "__main__":
    main()
