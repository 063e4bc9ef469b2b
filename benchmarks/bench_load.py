"""B6 after work (RSS growth over many runs) and B10 under load (probe and ``/metrics``
latency while a B1 burst or a B3 queue is being worked off). agentd only: these are
properties of agentd's own process, with no peer equivalent worth the time.
"""

from __future__ import annotations

import time
from functools import partial

from benchmarks import common, prefill
from benchmarks.agentd_proc import AgentdProc, idle_tasks, iso, py_task
from benchmarks.bench_lateness import BURST_CONCURRENCY
from benchmarks.bench_throughput import PY_TASK, QUEUE_CONCURRENCY
from benchmarks.common import Lead, attempt_dir, check_ready, with_lead
from benchmarks.model import AGENTD, Target, percentile
from benchmarks.poller import Poller
from benchmarks.reps import Rep, Sample, Suite

GROWTH_CHUNK = 1000
PROBES = {"/healthz": 0.02, "/metrics": 0.25}
"""A probe every 20 ms and a scrape every 250 ms: far more than kubelet and Prometheus
send, to get enough samples within a burst that lasts seconds."""


def growth(tasks: int, n: int, settle: float, rep: Rep) -> Sample:
    """Idle RSS with a paused, filled queue; resume; RSS again once all ``n`` ran.

    The queue is topped up in chunks while agentd works. When this was written, each
    claim cost time in proportion to the queue's length (a window function over every
    queued run, since replaced by a due-order index), so 100,000 runs queued at once
    measured that, for most of an hour, instead of memory."""
    cfg = {**idle_tasks(tasks), "bench": PY_TASK["bench"]}
    d = AgentdProc(rep.tmp, cfg, concurrency=QUEUE_CONCURRENCY)
    chunk = min(n, GROWTH_CHUNK)
    prefill.queue(d, "bench", chunk, trigger="schedule", paused=True)
    with d:
        d.start()
        d.wait_ready()
        time.sleep(settle)
        before = d.rss_mib()
        cpu0 = d.cpu_s()
        d.post("/v1/tasks/bench/resume")
        fed = chunk
        deadline = time.monotonic() + 600 + n / 20
        while fed < n and time.monotonic() < deadline:
            if d.count("status='queued'") < chunk // 2:
                more = min(chunk, n - fed)
                prefill.queue(d, "bench", more, trigger="schedule", offset=fed)
                fed += more
            time.sleep(0.2)
        d.wait_runs("status='succeeded'", n, timeout=max(60.0, deadline - time.monotonic()))
        cpu = d.cpu_s() - cpu0
        time.sleep(settle)
        after = d.rss_mib()
        rate = n / d.span_s("claim", "success")
    return {
        "rss_before": before,
        "rss_after": after,
        "growth_pct": (after / before - 1) * 100,
        "runs_per_s": rate,
        "cpu_s_per_1k": cpu * 1000 / n,
    }


def latency_sample(poll: Poller) -> Sample:
    health = [x * 1000 for x in poll.latency["/healthz"]]
    metrics = [x * 1000 for x in poll.latency["/metrics"]]
    return {
        "healthz_p99_ms": percentile(health, 99),
        "metrics_p99_ms": percentile(metrics, 99),
        "healthz_n": float(len(health)),
        "metrics_n": float(len(metrics)),
    }


def probed_burst(lead: Lead, n: int, rep: Rep) -> Sample:
    def attempt(due: float) -> Sample:
        root = attempt_dir(rep)
        tasks = {f"t{i:05d}": py_task({"at": iso(due)}) for i in range(n)}
        with AgentdProc(root, tasks, concurrency=BURST_CONCURRENCY) as d:
            d.start()
            check_ready(lead, "burst", d.wait_ready(), due)
            common.sleep_until(due - 0.1)
            with Poller(d.port, PROBES) as poll:
                d.wait_runs("status NOT IN ('queued','running')", n, timeout=60 + n / 50)
        return latency_sample(poll)

    return with_lead(lead, "burst", 1.0 + n * 0.0012, attempt)


def probed_queue(n: int, rep: Rep) -> Sample:
    d = AgentdProc(rep.tmp, PY_TASK, concurrency=QUEUE_CONCURRENCY)
    prefill.queue(d, "bench", n)
    with d, Poller(d.port, PROBES) as poll:
        d.start()
        d.wait_ready()
        d.wait_runs("status='succeeded'", n, timeout=120 + n / 20)
    return latency_sample(poll)


def run(s: Suite) -> None:
    m = s.mode
    runs = s.interleave(
        "B6", {AGENTD: partial(growth, m.idle_tasks, m.b6_runs, m.settle_s)}, warmup=0, reps=1
    )
    what = f"{m.b6_runs:,} runs ({m.idle_tasks:,} idle tasks)"
    s.add("B6", f"RSS before {what}", "MiB", runs, "rss_before")
    s.add("B6", f"RSS after {what}", "MiB", runs, "rss_after")
    s.add(
        "B6",
        f"RSS growth over {what}",
        "%",
        runs,
        "growth_pct",
        target=Target("< 5 %", "<", 5),
        note="one long repetition: memory, not timing",
    )
    s.add("B6", f"throughput during {what}", "runs/s", runs, "runs_per_s", better="higher")
    n1, n3 = m.b1_sizes[0], m.b3_runs
    runs = s.interleave("B10", {AGENTD: partial(probed_burst, Lead(), n1)}, warmup=0)
    s.add(
        "B10",
        f"/healthz p99 during B1 ({n1:,} due)",
        "ms",
        runs,
        "healthz_p99_ms",
        target=Target("<= 10 ms", "<=", 10),
    )
    s.add(
        "B10",
        f"/metrics p99 during B1 ({n1:,} due)",
        "ms",
        runs,
        "metrics_p99_ms",
        target=Target("<= 10 ms", "<=", 10),
    )
    runs = s.interleave("B10", {AGENTD: partial(probed_queue, n3)}, warmup=0)
    s.add(
        "B10",
        f"/healthz p99 during B3 ({n3:,} runs)",
        "ms",
        runs,
        "healthz_p99_ms",
        target=Target("<= 10 ms", "<=", 10),
    )
    s.add(
        "B10",
        f"/metrics p99 during B3 ({n3:,} runs)",
        "ms",
        runs,
        "metrics_p99_ms",
        target=Target("<= 10 ms", "<=", 10),
    )
