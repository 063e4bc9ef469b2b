"""B1 (start lateness of a burst of due runs) and B2 (per-second timer with 10,000 idle
schedules): agentd beside APScheduler, huey and the asyncio floor.

agentd's lateness is read from its state DB: per run, the time of its first ``start``
event (written just before the executor begins) minus ``scheduled_for``. A peer's is
taken where its job function starts. Missed = due runs that never started.
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from pathlib import Path

from benchmarks import common, procstat
from benchmarks.agentd_proc import AgentdProc, idle_tasks, iso, py_task, unix
from benchmarks.common import APS, HUEY, Lead, attempt_dir, check_ready, lateness_sample, with_lead
from benchmarks.model import AGENTD, Target, percentile
from benchmarks.peers_env import PeerProc
from benchmarks.reps import Rep, RunFn, Sample, Suite, per_1k, read_trace

BURST_CONCURRENCY = 256  # agentd's maximum: the burst is limited by agentd, not by a pool


def agentd_due(lead: Lead, n: int, rep: Rep) -> Sample:
    def attempt(due: float) -> Sample:
        root = attempt_dir(rep)
        tasks = {f"t{i:05d}": py_task({"at": iso(due)}) for i in range(n)}
        with AgentdProc(root, tasks, concurrency=BURST_CONCURRENCY) as d:
            d.start(rep.trace())
            ready = d.wait_ready()
            check_ready(lead, f"agentd{n}", ready, due)
            common.sleep_until(due - 0.05)
            cpu0, sql0 = d.cpu_s(), read_trace(rep)
            with contextlib.suppress(TimeoutError):  # what did not run counts as missed
                d.wait_runs("status NOT IN ('queued','running')", n, timeout=60 + n / 50)
            cpu = d.cpu_s() - cpu0
            time.sleep(0.15 if rep.traced else 0)  # let the trace file catch up
            late = d.start_lateness_s("t")
            sql = per_1k(sql0, read_trace(rep), n)
        return {**lateness_sample(late, n, cpu), **sql, "ready_s": ready}

    return with_lead(lead, f"agentd{n}", 1.0 + n * 0.0012, attempt)


def peer_due(lead: Lead, python: Path, module: str, variant: str, n: int, rep: Rep) -> Sample:
    def attempt(due: float) -> Sample:
        args = ["due", "--variant", variant, "--n", str(n), "--due", repr(due)]
        peer = PeerProc(python, module, args, attempt_dir(rep), rep.trace())
        try:
            ready = peer.wait_ready()
            check_ready(lead, f"{module}{variant}{n}", ready, due)
            common.sleep_until(due - 0.05)
            # CPU from here on: /proc now, the peer's own total when it is done.
            cpu0, sql0 = procstat.cpu_seconds(peer.pid), read_trace(rep)
            result = peer.result()
        finally:
            peer.close()
        late = common.floats(result["lateness_s"])
        sample = lateness_sample(late, n, float(result["cpu_total_s"]) - cpu0)
        return {**sample, **per_1k(sql0, read_trace(rep), n), "ready_s": ready}

    return with_lead(lead, f"{module}{variant}{n}", 1.0 + n * 0.0015, attempt)


def floor_due(n: int, rep: Rep) -> Sample:
    due = time.time() + 0.5
    result = common.floor(
        ["lateness", "--n", str(n), "--due", repr(due), "--db", "f.sqlite"], rep.tmp
    )
    sample = lateness_sample(common.floats(result["lateness_s"]), n, float(str(result["cpu_s"])))
    return {**sample, "sql_commits_per_1k": 2 * 1000 / n}


def b1(s: Suite) -> None:
    lead = Lead()
    for size, limit in zip(s.mode.b1_sizes, (15.0, 150.0), strict=False):
        contenders: dict[str, RunFn] = {
            AGENTD: partial(agentd_due, lead, size),
            "asyncio-floor": partial(floor_due, size),
        }
        peers = {
            "aps-sqlite": ("aps", "aps_peer", "sqlite"),
            "aps-nograce": ("aps", "aps_peer", "nograce"),
            "aps-memory": ("aps", "aps_peer", "memory"),
            "huey-stock": ("huey", "huey_peer", "stock"),
            "huey-tuned": ("huey", "huey_peer", "tuned"),
        }
        for name, (venv, module, variant) in peers.items():
            if venv in s.peers:
                contenders[name] = partial(peer_due, lead, s.peers[venv], module, variant, size)
        runs = s.interleave(f"B1/{size}", contenders)
        what = f"{size:,} due at once"
        expect = (*APS, *HUEY, "celery")
        s.add("B1", f"p50 start lateness, {what}", "ms", runs, "p50_ms", peers=expect)
        s.add(
            "B1",
            f"p99 start lateness, {what}",
            "ms",
            runs,
            "p99_ms",
            peers=expect,
            target=Target(f"<= {limit:g} ms", "<=", limit),
        )
        s.add("B1", f"max start lateness, {what}", "ms", runs, "max_ms")
        s.add(
            "B1",
            f"missed runs, {what}",
            "runs",
            runs,
            "missed",
            target=Target("none missed", "<=", 0),
        )
        s.add("B1", f"CPU per 1,000 runs, {what}", "s", runs, "cpu_s_per_1k")
        s.add(
            "B1",
            f"SQL commits per 1,000 runs, {what}",
            "commits",
            runs,
            "sql_commits_per_1k",
            counter=True,
            note="traced warm-up round, due..done",
        )
        s.add(
            "B1",
            f"SQL statements per 1,000 runs, {what}",
            "stmts",
            runs,
            "sql_statements_per_1k",
            counter=True,
        )
        s.add(
            "B1",
            f"spawn to ready with {size:,} tasks",
            "s",
            runs,
            "ready_s",
            note="includes registering the schedules",
        )


# ---------------------------------------------------------------- B2


def tick_sample(late_s: list[float], expected: int) -> Sample:
    """Drift: median lateness of the second half of the window minus the first half's."""
    ms = [x * 1000 for x in late_s]
    half = len(ms) // 2
    drift = percentile(ms[half:], 50) - percentile(ms[:half], 50) if half else math.nan
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "missed": float(expected - len(ms)),
        "drift_ms": abs(drift),
    }


def agentd_tick(idle: int, seconds: int, rep: Rep) -> Sample:
    tasks = {**idle_tasks(idle), "tick": py_task({"every": "1s"})}
    with AgentdProc(rep.tmp, tasks) as d:
        d.start(rep.trace())
        d.wait_ready()
        first = math.ceil(time.time() + 0.3)  # a whole second, not hurried by start-up
        common.sleep_until(first + seconds + 0.5)
        rows = d.query(
            "SELECT r.scheduled_for AS due, MIN(e.ts) AS started FROM runs r JOIN events e"
            " ON e.run_id = r.id AND e.kind = 'start' WHERE r.task_id = 'tick' GROUP BY r.id"
        )
    late = []
    for row in rows:
        due = unix(row["due"])
        if first <= due < first + seconds and due == int(due):  # on the whole-second grid
            late.append(unix(row["started"]) - due)
    return tick_sample(late, seconds)


def peer_tick(python: Path, variant: str, idle: int, seconds: int, rep: Rep) -> Sample:
    args = ["tick", "--variant", variant, "--n", str(idle), "--seconds", str(seconds)]
    peer = PeerProc(python, "aps_peer", args, rep.tmp, rep.trace())
    try:
        peer.wait_ready()
        result = peer.result()
    finally:
        peer.close()
    return tick_sample(common.floats(result["lateness_s"]), seconds)


def floor_tick(seconds: int, rep: Rep) -> Sample:
    result = common.floor(["periodic", "--n", str(seconds), "--db", "f.sqlite"], rep.tmp)
    return tick_sample(common.floats(result["lateness_s"]), seconds)


def b2(s: Suite) -> None:
    idle, secs = s.mode.b2_idle, s.mode.b2_seconds
    contenders: dict[str, RunFn] = {
        AGENTD: partial(agentd_tick, idle, secs),
        "asyncio-floor": partial(floor_tick, secs),
    }
    if "aps" in s.peers:
        for variant in ("sqlite", "nograce", "memory"):
            contenders[f"aps-{variant}"] = partial(peer_tick, s.peers["aps"], variant, idle, secs)
    runs = s.interleave("B2", contenders)
    what = f"every 1 s beside {idle:,} idle schedules"
    absent = {"huey": "huey's periodic tasks have minute resolution"}
    s.add(
        "B2",
        f"p50 lateness, {what}",
        "ms",
        runs,
        "p50_ms",
        peers=APS,
        absent=absent,
        target=Target("<= 2 ms", "<=", 2),
    )
    s.add("B2", f"p99 lateness, {what}", "ms", runs, "p99_ms", target=Target("<= 5 ms", "<=", 5))
    s.add(
        "B2",
        f"missed fires in {secs} s",
        "fires",
        runs,
        "missed",
        target=Target("no miss", "<=", 0),
    )
    s.add(
        "B2",
        "drift (2nd-half minus 1st-half median)",
        "ms",
        runs,
        "drift_ms",
        target=Target("no drift (<= 1 ms)", "<=", 1),
    )
