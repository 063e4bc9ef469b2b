"""B3 (durable throughput of trivial Python runs, against huey) and B4 (shell-task
throughput, against asyncio's raw spawn rate).

agentd works off a queue that was filled before it started (``benchmarks.prefill``),
as huey's consumer works off a filled queue. Rate = runs / (first ``claim`` event to
last ``success`` event), both read from the state DB: every counted run has its
started and finished records committed.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from benchmarks import common, prefill
from benchmarks.agentd_proc import AgentdProc, Tasks
from benchmarks.common import HUEY
from benchmarks.model import AGENTD, Target
from benchmarks.peers_env import PeerProc
from benchmarks.reps import Rep, RunFn, Sample, Suite, per_1k, read_trace

QUEUE_CONCURRENCY = 16
"""agentd's pool for B3. Plain functions run one thread each, so a bigger pool only adds
threads fighting for the GIL on two cores."""

PY_TASK: Tasks = {
    "bench": {
        "schedule": {"manual": True},
        "overlap": "allow",
        "python": {"callable": "benchmarks.payload:noop"},
    }
}
SH_TASK: Tasks = {
    "bench": {"schedule": {"manual": True}, "overlap": "allow", "command": {"shell": "true"}}
}


def agentd_queue(
    tasks: Tasks, n: int, concurrency: int, rep: Rep, children: bool = False
) -> Sample:
    """Fill a queue of ``n`` runs, start agentd, time how fast it empties."""
    d = AgentdProc(rep.tmp, tasks, concurrency=concurrency)
    prefill.queue(d, "bench", n)
    with d:
        d.start(rep.trace())
        ready = d.wait_ready()
        cpu0, sql0 = d.cpu_s(children), read_trace(rep)
        d.wait_runs("status='succeeded'", n, timeout=120 + n / 20)
        cpu = d.cpu_s(children) - cpu0
        time.sleep(0.15 if rep.traced else 0)
        sql = per_1k(sql0, read_trace(rep), n)
        rate = n / d.span_s("claim", "success")
    return {"runs_per_s": rate, "cpu_s_per_1k": cpu * 1000 / n, "ready_s": ready, **sql}


def huey_queue(python: Path, variant: str, n: int, rep: Rep) -> Sample:
    args = ["throughput", "--variant", variant, "--n", str(n)]
    peer = PeerProc(python, "huey_peer", args, rep.tmp, rep.trace())
    try:
        peer.wait_ready()
        sql0 = read_trace(rep)
        result = peer.result()
    finally:
        peer.close()
    return {
        "runs_per_s": float(result["runs_per_s"]),
        "cpu_s_per_1k": float(result["cpu_s"]) * 1000 / n,
        **per_1k(sql0, read_trace(rep), n),
    }


def floor_queue(n: int, rep: Rep) -> Sample:
    """The asyncio floor's burst: n runs recorded started and finished, two commits."""
    due = time.time() + 0.5
    result = common.floor(["lateness", "--n", str(n), "--due", repr(due)], rep.tmp)
    return {
        "runs_per_s": n / float(str(result["elapsed_s"])),
        "cpu_s_per_1k": float(str(result["cpu_s"])) * 1000 / n,
        "sql_commits_per_1k": 2000 / n,
    }


def b3(s: Suite) -> None:
    n = s.mode.b3_runs
    contenders: dict[str, RunFn] = {
        AGENTD: partial(agentd_queue, PY_TASK, n, QUEUE_CONCURRENCY),
        "asyncio-floor": partial(floor_queue, n),
    }
    if "huey" in s.peers:
        for variant in ("stock", "tuned"):
            contenders[f"huey-{variant}"] = partial(huey_queue, s.peers["huey"], variant, n)
    runs = s.interleave("B3", contenders)
    what = f"{n:,} python-callable runs"
    s.add(
        "B3",
        f"throughput, {what}",
        "runs/s",
        runs,
        "runs_per_s",
        better="higher",
        peers=(*HUEY, "celery"),
        target=(Target(">= 5,000/s", ">=", 5000), Target(">= 2x huey", ">=", 2, HUEY)),
    )
    s.add("B3", f"CPU per 1,000 runs, {what}", "s", runs, "cpu_s_per_1k")
    s.add(
        "B3",
        f"SQL commits per 1,000 runs, {what}",
        "commits",
        runs,
        "sql_commits_per_1k",
        counter=True,
        note="traced warm-up round",
    )
    s.add(
        "B3",
        f"SQL statements per 1,000 runs, {what}",
        "stmts",
        runs,
        "sql_statements_per_1k",
        counter=True,
    )


def spawn_floor(n: int, rep: Rep) -> Sample:
    result = common.floor(["spawn", "--n", str(n), "--concurrency", "4"], rep.tmp)
    cpu = float(str(result["cpu_s"])) + float(str(result["child_cpu_s"]))
    return {"runs_per_s": float(str(result["runs_per_s"])), "cpu_s_per_1k": cpu * 1000 / n}


def b4(s: Suite) -> None:
    n = s.mode.b4_runs
    contenders: dict[str, RunFn] = {
        AGENTD: partial(agentd_queue, SH_TASK, n, 4, children=True),
        "raw-spawn": partial(spawn_floor, n),
    }
    runs = s.interleave("B4", contenders)
    what = f"{n:,} `true` at concurrency 4"
    s.add(
        "B4",
        f"throughput, {what}",
        "runs/s",
        runs,
        "runs_per_s",
        better="higher",
        target=Target(">= 80% of raw asyncio spawn", ">=", 0.8, ("raw-spawn",)),
    )
    s.add("B4", f"CPU per 1,000 runs incl. children, {what}", "s", runs, "cpu_s_per_1k")
    s.add(
        "B4",
        f"SQL commits per 1,000 runs, {what}",
        "commits",
        runs,
        "sql_commits_per_1k",
        counter=True,
        note="traced warm-up round",
    )
