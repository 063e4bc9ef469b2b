"""One idle daemon with 10,000 schedules, measured in turn: cold start (B5), idle RSS
(B6), idle CPU and wake-ups (B7), ``/metrics`` (B10), a SIGHUP reload with runs in
flight (B5) and SIGTERM to exit (B9). Peers do the parts they have an equivalent for.

Event-loop stalls are seen from outside: a thread requests ``/healthz`` every 5 ms, and
a request that waits N ms means the loop did something else for N ms.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from benchmarks import procstat
from benchmarks.agentd_proc import AgentdProc, free_port, idle_cron, idle_tasks, py_task
from benchmarks.model import AGENTD, Target
from benchmarks.peers_env import PeerProc
from benchmarks.poller import Poller
from benchmarks.reps import Rep, RunFn, Runs, Sample, Suite


def idle_window(pid: int, seconds: float) -> Sample:
    cpu0, wake0 = procstat.thread_cpu_seconds(pid), procstat.wakeups(pid)
    time.sleep(seconds)
    cpu, wake = procstat.thread_cpu_seconds(pid) - cpu0, procstat.wakeups(pid) - wake0
    return {
        "idle_cpu_ms_per_s": cpu * 1000 / seconds,
        "wakeups_per_s": wake / seconds,
        "rss_mib": procstat.rss_mib(pid),
    }


def reload(
    d: AgentdProc, tasks: dict[str, dict[str, object]], changed: int, inflight_s: float
) -> Sample:
    """SIGHUP with ``changed`` schedules edited while a run is in flight."""
    run_id = d.post("/v1/tasks/inflight/trigger")["run_id"]
    d.wait_runs("status='running'", 1, timeout=30)
    other = idle_cron().split(" ", 1)
    minute = (int(other[0]) + 1) % 60
    for tid in list(tasks)[:changed]:
        tasks[tid] = py_task({"cron": f"{minute} {other[1]}"})
    d.write_config(tasks)
    with Poller(d.port, {"/healthz": 0.005}) as poll:
        time.sleep(0.1)
        t0 = time.monotonic()
        assert d.proc is not None
        d.proc.send_signal(1)  # SIGHUP
        reload_s = float("nan")
        while time.monotonic() - t0 < 120:
            status = json.loads(d.get("/v1/status")[1])
            if status.get("config_generation", 1) >= 2:
                reload_s = time.monotonic() - t0
                break
            time.sleep(0.005)
        time.sleep(0.1)
    stall = max(poll.latency["/healthz"], default=float("nan"))
    d.wait_runs("status='succeeded' AND task_id='inflight'", 1, timeout=inflight_s + 60)
    row = d.query("SELECT attempt FROM runs WHERE id=?", (run_id,))[0]
    bad = d.query(
        "SELECT COUNT(*) FROM events WHERE run_id=? AND kind IN"
        " ('interrupt','cancel','cancel_requested','recover')",
        (run_id,),
    )[0][0]
    return {
        "reload_s": reload_s,
        "reload_stall_ms": stall * 1000,
        "inflight_disturbed": float(row["attempt"] != 1 or bad > 0),
    }


def agentd_idle(s: Suite, rep: Rep) -> Sample:
    m = s.mode
    tasks: dict[str, dict[str, object]] = {
        **idle_tasks(m.idle_tasks),
        "inflight": py_task({"manual": True}, "sleep", params={"ms": m.inflight_s * 1000}),
    }
    with AgentdProc(rep.tmp, tasks) as d:
        with Poller(d.port, {"/healthz": 0.005}) as poll:
            d.start()
            ready = d.wait_ready()
        stall = max(poll.latency["/healthz"], default=float("nan"))
        time.sleep(m.settle_s)
        sample = idle_window(d.pid, m.b7_window_s)
        scrapes = [d.get("/metrics", timeout=120) for _ in range(3)]
        sample |= {
            "metrics_ms": sorted(x[2] for x in scrapes)[1] * 1000,
            "metrics_mib": len(scrapes[0][1]) / 2**20,
        }
        sample |= reload(d, tasks, m.b5_changed, m.inflight_s)
        sample |= {"exit_s": d.sigterm_exit_s(), "ready_s": ready, "start_stall_ms": stall * 1000}
    return sample


def agentd_empty(rep: Rep) -> Sample:
    """Cold start and exit with no tasks: the fixed cost that B5's figure sits on."""
    with AgentdProc(rep.tmp, {}) as d:
        d.start()
        ready = d.wait_ready()
        time.sleep(0.2)
        return {"ready_s": ready, "exit_s": d.sigterm_exit_s()}


def peer_idle(python: Path, module: str, args: list[str], s: Suite, rep: Rep) -> Sample:
    if module == "aps_peer":  # it serves HTTP beside the scheduler, as agentd does
        args = [*args, "--port", str(free_port())]
    peer = PeerProc(python, module, ["idle", *args], rep.tmp)
    try:
        ready = peer.wait_ready()
        time.sleep(s.mode.settle_s)
        sample = idle_window(peer.pid, s.mode.b7_window_s)
        sample["exit_s"] = peer.sigterm_exit_s()
        if module == "aps_peer":  # spawn to READY = registering its jobs; huey has none
            sample["ready_s"] = ready
    finally:
        peer.close()
    return sample


def run(s: Suite) -> None:
    n = s.mode.idle_tasks
    contenders: dict[str, RunFn] = {AGENTD: partial(agentd_idle, s)}
    contenders["agentd-0-tasks"] = agentd_empty
    if "aps" in s.peers:
        for variant in ("sqlite", "memory"):
            args = ["--variant", variant, "--n", str(n)]
            contenders[f"aps-{variant}"] = partial(peer_idle, s.peers["aps"], "aps_peer", args, s)
    if "huey" in s.peers:
        for variant in ("stock", "tuned"):
            contenders[f"huey-{variant}"] = partial(
                peer_idle, s.peers["huey"], "huey_peer", ["--variant", variant], s
            )
    # No warm-up round: nothing here is counted with the tracer, and B1-B4 have warmed
    # the machine. Each of the 5 rounds is a long session (10,000 tasks, /metrics).
    runs = s.interleave("idle", contenders, warmup=0)
    aps = ("aps-sqlite", "aps-memory")
    no_sched = {
        "huey-stock": "huey keeps no schedules to register",
        "huey-tuned": "huey keeps no schedules to register",
    }
    s.add(
        "B5",
        f"spawn to /readyz 200 with {n:,} tasks",
        "s",
        runs,
        "ready_s",
        peers=aps,
        absent=no_sched,
        note="peers: spawn to registered; agentd-0-tasks: the fixed part",
    )
    full, empty = runs.values(AGENTD, "ready_s"), runs.values("agentd-0-tasks", "ready_s")
    pairs = zip(full, empty, strict=False)
    register = Runs({AGENTD: [{"register_s": a - b} for a, b in pairs]}, {})
    s.add(
        "B5",
        f"registering {n:,} tasks (cold start minus 0-task start)",
        "s",
        register,
        "register_s",
        target=Target("< 0.5 s", "<", 0.5),
    )
    s.add(
        "B5",
        "event-loop stall during cold start (max /healthz wait)",
        "ms",
        runs,
        "start_stall_ms",
        target=Target("<= 50 ms", "<=", 50),
    )
    s.add(
        "B5",
        f"SIGHUP reload, {s.mode.b5_changed} of {n:,} changed",
        "s",
        runs,
        "reload_s",
        target=Target("< 1 s", "<", 1),
    )
    s.add(
        "B5",
        "event-loop stall during reload (max /healthz wait)",
        "ms",
        runs,
        "reload_stall_ms",
        target=Target("<= 50 ms", "<=", 50),
    )
    s.add(
        "B5",
        "run in flight disturbed by the reload (0 = untouched)",
        "runs",
        runs,
        "inflight_disturbed",
        target=Target("untouched", "<=", 0),
    )
    s.add(
        "B6",
        f"RSS idle, {n:,} tasks, HTTP up",
        "MiB",
        runs,
        "rss_mib",
        peers=aps,
        target=Target("<= 60 MiB", "<=", 60),
        note="huey: idle consumer, no schedules",
    )
    s.add(
        "B7",
        f"idle CPU, {n:,} tasks",
        "ms CPU/s",
        runs,
        "idle_cpu_ms_per_s",
        peers=aps,
        target=Target("<= 0.5 ms/s", "<=", 0.5),
    )
    s.add(
        "B7",
        f"idle wake-ups, {n:,} tasks",
        "wake-ups/s",
        runs,
        "wakeups_per_s",
        note="voluntary context switches, all threads",
    )
    s.add("B9", "SIGTERM to exit, idle", "s", runs, "exit_s", target=Target("< 100 ms", "<", 0.1))
    s.add(
        "B10",
        f"/metrics with {n:,} tasks",
        "ms",
        runs,
        "metrics_ms",
        target=Target("<= 50 ms", "<=", 50),
    )
    s.add("B10", f"/metrics size with {n:,} tasks", "MiB", runs, "metrics_mib")
