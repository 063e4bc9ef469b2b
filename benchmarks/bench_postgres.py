"""Section PG (issue 25): agentd on PostgreSQL with 1, 2 and 3 nodes, beside Procrastinate
and DBOS Transact on the same server, and agentd on SQLite for reference.

One cluster for the section, at production durability (``fsync``, ``synchronous_commit``
and ``full_page_writes`` on: ``benchmarks.pgcluster``), in the suite's temp dir, on the
disk the SQLite figures use. Every try of every contender gets a database of its own,
dropped afterwards. Nodes and workers are separate processes (agentd: each its own
state dir and port), all started before the work falls due.

- **PG-C**: the disk and the server: ``pg_test_fsync``'s one-8kB-write ``fdatasync``
  rate, and commits/s of one-row transactions from 1 and from 4 clients.
- **PG-B3** (B3's workload): a queue of trivial Python runs filled before any node starts,
  every run due at one instant a little after the slowest node is up. Rate = runs /
  (first claim to last recorded success), read from the database: agentd's ``claim``
  and ``success`` events; Procrastinate's ``started`` and ``succeeded`` events; DBOS's
  first ``started_at_epoch_ms`` and last ``updated_at`` of a ``SUCCESS``. agentd on
  SQLite is B3's own measurement (``bench_throughput.agentd_queue``).
- **PG-B1** (B1's workload): 1,000 runs due at one instant. agentd's lateness per run is
  its first ``start`` event minus ``scheduled_for`` (as in B1), each node firing every
  task (one run per occurrence by the idempotency key); a peer's is taken on the first
  line of its job function, against the same instant (Procrastinate: ``schedule_at``;
  DBOS: ``delay_seconds``).

Counted from the server for every contender over the same window (due instant to the
last run done, plus ``STATS_SETTLE_S`` for the statistics to arrive): transactions
committed in the contender's database (``pg_stat_database.xact_commit``, read-only ones
included, the harness's own polls taken out) and WAL flushes of the whole cluster
(``pg_stat_wal.wal_sync``: the fsyncs a commit waits for), per 1,000 runs; CPU of the
contender's processes and, apart, of the PostgreSQL server's.

In the metrics ``agentd`` is agentd on **3 nodes**, so ``agentd / it`` reads as the 3-node
figure against each of the others.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import bench_lateness, bench_throughput, common, prefill, procstat
from benchmarks.agentd_proc import AgentdProc, env, iso, py_task, unix
from benchmarks.common import Lead, attempt_dir, check_ready, lateness_sample
from benchmarks.model import AGENTD, Target
from benchmarks.peers_env import PeerProc
from benchmarks.pgcluster import PgCluster, pg_bin, running_cluster
from benchmarks.reps import Rep, RunFn, Sample, Suite

NODES = (1, 2, 3)
NAMES = {1: "agentd-pg-1node", 2: "agentd-pg-2nodes", 3: AGENTD}
PEER_PROCS = (1, 3)
PEER_CONCURRENCY = 16
"""Jobs in flight per peer process, as agentd's B3 pool."""
PEER_POLL_S = {"procrastinate": 0.005, "dbos": 0.005}
"""The peers' polls, tuned to huey-tuned's 5 ms (stock: Procrastinate 5 s, DBOS 1 s)."""
PEERS = {
    f"{peer}-{k}{unit}": (peer, k)
    for peer, unit in (("procrastinate", "w"), ("dbos", "p"))
    for k in PEER_PROCS
}
STATS_SETTLE_S = 1.2
"""A PostgreSQL backend reports its statistics at most once a second (when it goes
idle, or ends): the due instant is at least this long after the last process is up (its
start-up's transactions are in before the window opens), and the window closes this
long after the last run."""
POLL_S = 0.1


# ---------------------------------------------------------------- the server


@dataclass
class Db:
    """One contender's database, and the harness's one connection to it. Every
    statement the harness runs there is counted, to be taken out of ``xact_commit``;
    ``reconnect`` before each snapshot, so that the statistics of the harness's own
    statements so far are in (a backend reports them when it ends, else at most once a
    second) and none arrive late into another window."""

    url: str
    name: str
    conn: psycopg.Connection[Any]
    statements: int = 0

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = psycopg.connect(self.url, autocommit=True)

    def one(self, sql: str) -> tuple[Any, ...]:
        self.statements += 1
        row = self.conn.execute(sql).fetchone()
        assert row is not None
        return tuple(row)

    def all(self, sql: str) -> list[tuple[Any, ...]]:
        self.statements += 1
        return [tuple(r) for r in self.conn.execute(sql).fetchall()]

    def wait_count(self, sql: str, n: int, timeout: float, alive: Callable[[], None]) -> None:
        """Poll ``sql`` (a count) every 100 ms until it reaches ``n``; ``alive`` raises
        when a contender's process died."""
        deadline = time.monotonic() + timeout
        while (got := int(self.one(sql)[0])) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{got}/{n} after {timeout:.0f}s: {sql}")
            alive()
            time.sleep(POLL_S)


@dataclass
class Snapshot:
    at: float
    xact: int
    wal_sync: int
    harness: int
    server_cpu: dict[int, float]


@dataclass
class Pg:
    """The section's cluster: databases for the contenders, and the server's counters."""

    cluster: PgCluster
    admin: psycopg.Connection[Any]
    made: int = 0
    versions: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def database(self, tag: str) -> Iterator[Db]:
        self.made += 1
        name = f"{tag}_{self.made}"
        url = self.cluster.create_database(name)
        db = Db(url, name, psycopg.connect(url, autocommit=True))
        try:
            yield db
        finally:
            db.conn.close()
            with contextlib.suppress(psycopg.Error):
                self.admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

    def snapshot(self, db: Db) -> Snapshot:
        xact = self.admin.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname=%s", (db.name,)
        ).fetchone()
        wal = self.admin.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
        assert xact is not None and wal is not None
        cpu: dict[int, float] = {}
        for pid in self.cluster.server_pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                cpu[pid] = procstat.cpu_seconds(pid)
        return Snapshot(time.monotonic(), int(xact[0]), int(wal[0]), db.statements, cpu)


def window_counts(before: Snapshot, after: Snapshot, n: int) -> Sample:
    """Per 1,000 runs, between two snapshots: the contender's transactions (the
    harness's own statements in its database taken out), the cluster's WAL flushes, and
    the server's CPU (a backend that started in between counts from zero; one that
    ended in between is lost, which the contenders' long-lived connections make rare)."""
    xact = after.xact - before.xact - (after.harness - before.harness)
    cpu = sum(t - before.server_cpu.get(pid, 0.0) for pid, t in after.server_cpu.items())
    return {
        "commits_per_1k": xact * 1000 / n,
        "wal_syncs_per_1k": (after.wal_sync - before.wal_sync) * 1000 / n,
        "server_cpu_s_per_1k": cpu * 1000 / n,
    }


@contextlib.contextmanager
def started(s: Suite) -> Iterator[Pg]:
    with running_cluster(durable=True) as cluster:
        admin = psycopg.connect(cluster.url(), autocommit=True)
        try:
            pg = Pg(cluster, admin)
            row = admin.execute("SHOW server_version").fetchone()
            pg.versions["postgresql"] = str(row[0]) if row else "?"
            for key in ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method"):
                row = admin.execute(f"SHOW {key}").fetchone()
                pg.versions[key] = str(row[0]) if row else "?"
            s.log(f"PG cluster at {cluster.url()}: {pg.versions}")
            yield pg
        finally:
            admin.close()


def stamp() -> str:
    return datetime.now(UTC).strftime("%H%M%S")


# ---------------------------------------------------------------- PG-C


def fsync_rate(seconds: int, where: Path) -> float:
    """``pg_test_fsync``'s rate for one 8 kB write and ``fdatasync`` (PostgreSQL's WAL
    flush on Linux) on the disk holding ``where``."""
    out = subprocess.run(
        [pg_bin("pg_test_fsync"), "-s", str(seconds), "-f", str(where / "fsync.test")],
        capture_output=True,
        text=True,
        timeout=60 * seconds + 60,
        check=True,
    ).stdout
    # The first block, "Compare file sync methods using one 8kB write".
    block = out.split("Compare file sync methods using one", 1)[1].split("Compare", 1)[0]
    found = re.search(r"fdatasync\s+([\d.]+) ops/sec", block)
    if not found:
        raise RuntimeError(f"pg_test_fsync: no fdatasync rate in {out[:2000]}")
    return float(found.group(1))


def commit_rate(url: str, clients: int, commits: int) -> float:
    """One-row INSERT transactions per second from ``clients`` connections at once."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS calib (c int, i int)")

    def client(c: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(commits // clients):
                conn.execute("INSERT INTO calib VALUES (%s, %s)", (c, i))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (commits // clients) * clients / (time.perf_counter() - t0)


def calibrate(s: Suite, pg: Pg) -> None:
    def commits(clients: int, rep: Rep) -> Sample:
        with pg.database("calib") as db:
            return {"commits_per_s": commit_rate(db.url, clients, s.mode.calib_commits)}

    def disk(rep: Rep) -> Sample:
        return {"ops_per_s": fsync_rate(s.mode.pg_fsync_s, rep.tmp)}

    runs = s.interleave(
        "PG-C", {f"{k} client{'s' if k > 1 else ''}": partial(commits, k) for k in (1, 4)}, 0
    )
    s.add(
        "PG-C",
        "PostgreSQL one-row commits/s",
        "commits/s",
        runs,
        "commits_per_s",
        better="higher",
        note="fsync, synchronous_commit and full_page_writes on",
    )
    if s.mode.pg_fsync_s:
        runs = s.interleave("PG-C", {"disk": disk}, warmup=0, reps=1)
        s.add(
            "PG-C",
            "fdatasync of one 8 kB write (pg_test_fsync)",
            "ops/s",
            runs,
            "ops_per_s",
            better="higher",
            note="the disk under the cluster and the SQLite figures",
        )


# ---------------------------------------------------------------- agentd


def agentd_pg(pg: Pg, lead: Lead, nodes: int, n: int, burst: bool, rep: Rep) -> Sample:
    """``nodes`` daemons on one fresh database: a prefilled queue (``burst=False``, B3)
    or ``n`` one-shot tasks due at once (``burst=True``, B1)."""
    key = f"agentd-{'b1' if burst else 'b3'}-{nodes}"

    def attempt(due: float) -> Sample:
        t0 = time.monotonic()
        root = attempt_dir(rep)
        with pg.database(f"agentd{nodes}_{stamp()}") as db:
            if burst:
                tasks: dict[str, dict[str, Any]] = {
                    f"t{i:05d}": py_task({"at": iso(due)}) for i in range(n)
                }
                concurrency = bench_lateness.BURST_CONCURRENCY
            else:
                tasks, concurrency = bench_throughput.PY_TASK, bench_throughput.QUEUE_CONCURRENCY
            procs = [
                AgentdProc(root / f"node{i}", tasks, state_url=db.url, concurrency=concurrency)
                for i in range(nodes)
            ]
            if not burst:
                prefill.queue_pg(db.url, procs[0], "bench", n, datetime.fromtimestamp(due, UTC))
            try:
                for proc in procs:
                    proc.start()
                for proc in procs:
                    proc.wait_ready()
                check_ready(lead, key, time.monotonic() - t0 + STATS_SETTLE_S, due)
                return measure(pg, db, procs, n, burst, due)
            finally:
                for proc in procs:
                    proc.close()

    guess = 1.5 + nodes * 0.7 + (n * 0.0015 if burst else n * 0.0002)
    return common.with_lead(lead, key, guess, attempt)


def measure(pg: Pg, db: Db, procs: list[AgentdProc], n: int, burst: bool, due: float) -> Sample:
    def alive() -> None:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"agentd node exited:\n{proc.log_tail()}")

    common.sleep_until(due - 0.05)
    db.reconnect()
    cpu0 = [p.cpu_s() for p in procs]
    before = pg.snapshot(db)
    done = "status NOT IN ('queued','running')" if burst else "status='succeeded'"
    timeout = 60 + n / 20
    if burst:
        with contextlib.suppress(TimeoutError):  # what did not run counts as missed
            db.wait_count(f"SELECT count(*) FROM runs WHERE {done}", n, timeout, alive)
    else:
        db.wait_count(f"SELECT count(*) FROM runs WHERE {done}", n, timeout, alive)
    cpu = sum(p.cpu_s() - c for p, c in zip(procs, cpu0, strict=True))
    db.reconnect()
    time.sleep(STATS_SETTLE_S)
    counts = window_counts(before, pg.snapshot(db), n)
    by_node = [int(r[0]) for r in db.all("SELECT count(*) FROM attempts GROUP BY worker")]
    share = {"busiest_node_share": max(by_node) / max(1, sum(by_node))} if by_node else {}
    if burst:
        rows = db.all(
            "SELECT r.scheduled_for, MIN(e.ts) FROM runs r JOIN events e ON e.run_id = r.id"
            " AND e.kind = 'start' GROUP BY r.id, r.scheduled_for"
        )
        late = [unix(started) - unix(sched) for sched, started in rows]
        return {**lateness_sample(late, n, cpu), **counts, **share}
    first, last = db.one(
        "SELECT MIN(ts) FILTER (WHERE kind='claim'), MAX(ts) FILTER (WHERE kind='success')"
        " FROM events"
    )
    rate = n / (unix(last) - unix(first))
    return {"runs_per_s": rate, "cpu_s_per_1k": cpu * 1000 / n, **counts, **share}


# ---------------------------------------------------------------- peers

DONE_SQL = {
    "procrastinate": "SELECT count(*) FROM procrastinate_jobs WHERE status"
    " IN ('succeeded','failed')",
    "dbos": "SELECT count(*) FROM dbos.workflow_status WHERE status IN ('SUCCESS','ERROR')",
}
SPAN_SQL = {
    "procrastinate": "SELECT EXTRACT(EPOCH FROM MIN(at) FILTER (WHERE type='started')),"
    " EXTRACT(EPOCH FROM MAX(at) FILTER (WHERE type='succeeded')) FROM procrastinate_events",
    "dbos": "SELECT MIN(started_at_epoch_ms) / 1000.0, MAX(updated_at) / 1000.0"
    " FROM dbos.workflow_status WHERE status='SUCCESS'",
}


def peer_pg(
    pg: Pg, lead: Lead, python: Path, peer: str, procs: int, n: int, burst: bool, rep: Rep
) -> Sample:
    """``procs`` worker processes of ``peer`` on one fresh database holding ``n`` jobs
    due at one instant (prepared by the peer's own ``prepare`` mode before any worker
    starts)."""
    module = f"{peer}_peer"
    key = f"{peer}-{'b1' if burst else 'b3'}-{procs}"
    common_args = ["--concurrency", str(PEER_CONCURRENCY), "--poll", str(PEER_POLL_S[peer])]

    def attempt(due: float) -> Sample:
        t0 = time.monotonic()
        root = attempt_dir(rep)
        with pg.database(f"{peer}{procs}_{stamp()}") as db:
            args = ["--url", db.url, "--n", str(n), "--due", repr(due), *common_args]
            out = subprocess.run(
                [str(python), "-m", f"benchmarks.peers.{module}", "prepare", *args],
                cwd=root,
                env=env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            if out.returncode != 0:
                raise RuntimeError(f"{peer} prepare failed: {out.stderr[-2000:]}")
            workers: list[PeerProc] = []
            try:
                for i in range(procs):
                    cwd = root / f"w{i}"
                    cwd.mkdir()
                    own = ["--executor", f"w{i}"] if peer == "dbos" else []
                    workers.append(PeerProc(python, module, ["work", *args, *own], cwd))
                for w in workers:
                    w.wait_ready()
                check_ready(lead, key, time.monotonic() - t0 + STATS_SETTLE_S, due)
                return measure_peer(pg, db, peer, workers, n, burst, due)
            finally:
                for w in workers:
                    w.close()

    guess = 2.0 + procs * 0.8 + n * (0.0008 if peer == "dbos" else 0.0002)
    return common.with_lead(lead, key, guess, attempt)


def measure_peer(
    pg: Pg, db: Db, peer: str, workers: list[PeerProc], n: int, burst: bool, due: float
) -> Sample:
    def alive() -> None:
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"{peer} worker exited: {w.proc.returncode}")

    common.sleep_until(due - 0.05)
    db.reconnect()
    cpu0 = [procstat.cpu_seconds(w.pid) for w in workers]
    before = pg.snapshot(db)
    timeout = 60 + n / 20
    if burst:
        with contextlib.suppress(TimeoutError):
            db.wait_count(DONE_SQL[peer], n, timeout, alive)
    else:
        db.wait_count(DONE_SQL[peer], n, timeout, alive)
    cpu = sum(procstat.cpu_seconds(w.pid) - c for w, c in zip(workers, cpu0, strict=True))
    db.reconnect()
    time.sleep(STATS_SETTLE_S)
    counts = window_counts(before, pg.snapshot(db), n)
    late: list[float] = []
    ran: list[int] = []
    for w in workers:
        w.proc.terminate()  # both peers stop gracefully on SIGTERM and then report
    for w in workers:
        result = w.result(timeout=60)
        late += common.floats(result["lateness_s"])
        ran.append(int(result["ran"]))
    share = {"busiest_node_share": max(ran) / max(1, sum(ran))}
    if burst:
        return {**lateness_sample(late, n, cpu), **counts, **share}
    first, last = db.one(SPAN_SQL[peer])
    rate = n / (float(last) - float(first))
    return {"runs_per_s": rate, "cpu_s_per_1k": cpu * 1000 / n, **counts, **share}


# ---------------------------------------------------------------- the section


def contenders(s: Suite, pg: Pg, lead: Lead, n: int, burst: bool) -> dict[str, RunFn]:
    fns: dict[str, RunFn] = {NAMES[k]: partial(agentd_pg, pg, lead, k, n, burst) for k in NODES}
    if burst:
        fns["agentd-sqlite"] = partial(bench_lateness.agentd_due, lead, n)
    else:
        fns["agentd-sqlite"] = partial(
            bench_throughput.agentd_queue,
            bench_throughput.PY_TASK,
            n,
            bench_throughput.QUEUE_CONCURRENCY,
        )
    for name, (peer, procs) in PEERS.items():
        if peer in s.peers:
            fns[name] = partial(peer_pg, pg, lead, s.peers[peer], peer, procs, n, burst)
    return fns


def run(s: Suite) -> None:
    with started(s) as pg:
        calibrate(s, pg)
        lead = Lead()
        b3(s, pg, lead)
        b1(s, pg, lead)
        s.extra_meta["postgresql"] = pg.versions


PEER_NAMES = tuple(PEERS)
SERVER_NOTE = "pg_stat_database.xact_commit of its database (read-only ones included)"


def shared_rows(s: Suite, bench: str, what: str, runs: Any) -> None:
    s.add(
        bench,
        f"transactions committed per 1,000 runs, {what}",
        "commits",
        runs,
        "commits_per_1k",
        note=SERVER_NOTE,
    )
    s.add(
        bench,
        f"WAL flushes per 1,000 runs, {what}",
        "fsyncs",
        runs,
        "wal_syncs_per_1k",
        note="pg_stat_wal.wal_sync, the whole cluster",
    )
    s.add(bench, f"PostgreSQL server CPU per 1,000 runs, {what}", "s", runs, "server_cpu_s_per_1k")
    s.add(
        bench,
        f"busiest process's share of the runs, {what}",
        "share",
        runs,
        "busiest_node_share",
        note="agentd: attempts.worker; peers: their job function",
    )


def b3(s: Suite, pg: Pg, lead: Lead) -> None:
    n = s.mode.pg_b3_runs
    runs = s.interleave("PG-B3", contenders(s, pg, lead, n, burst=False))
    what = f"{n:,} python runs"
    s.add(
        "PG-B3",
        f"throughput, {what} (agentd = 3 nodes on PostgreSQL)",
        "runs/s",
        runs,
        "runs_per_s",
        better="higher",
        peers=PEER_NAMES,
        target=(
            Target(">= 2x agentd on 1 node", ">=", 2, (NAMES[1],)),
            Target(">= the best peer", ">=", 1, PEER_NAMES),
        ),
    )
    s.add(
        "PG-B3",
        f"CPU per 1,000 runs, {what}",
        "s",
        runs,
        "cpu_s_per_1k",
        note="all the contender's processes",
    )
    shared_rows(s, "PG-B3", what, runs)


def b1(s: Suite, pg: Pg, lead: Lead) -> None:
    n = s.mode.pg_b1_runs
    runs = s.interleave("PG-B1", contenders(s, pg, lead, n, burst=True))
    what = f"{n:,} due at once"
    s.add(
        "PG-B1",
        f"p50 start lateness, {what} (agentd = 3 nodes)",
        "ms",
        runs,
        "p50_ms",
        peers=PEER_NAMES,
    )
    s.add(
        "PG-B1",
        f"p99 start lateness, {what} (agentd = 3 nodes)",
        "ms",
        runs,
        "p99_ms",
        peers=PEER_NAMES,
        target=Target("<= the best peer", "<=", 1, PEER_NAMES),
    )
    s.add("PG-B1", f"max start lateness, {what}", "ms", runs, "max_ms")
    s.add(
        "PG-B1",
        f"missed runs, {what}",
        "runs",
        runs,
        "missed",
        target=Target("none missed", "<=", 0),
    )
    s.add("PG-B1", f"CPU per 1,000 runs, {what}", "s", runs, "cpu_s_per_1k")
    shared_rows(s, "PG-B1", what, runs)
