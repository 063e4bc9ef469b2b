"""B11 (issue 27): agentd's overhead for its real job, tool-calling agent runs.

N runs (full 200) of an ``agent`` task with ``tools`` against a provider that answers
every call after 200 ms (``benchmarks.fake_provider``, a process of its own whose CPU is
counted for no one): two replies that ask for one call each of the python tool
``benchmarks.payload:lookup``, then a plain answer, so 3 model calls and 2 tool calls a
run. At concurrency 8 and 32, against the floor (``benchmarks.agent_floor``): the same
conversations with the same request bodies from a bare asyncio + httpx script, as many
at once, the tool run in process between calls, nothing durable.

* **agentd**: a real daemon (``AgentdProc``) on SQLite with its default durability
  (``synchronous=FULL``), ``daemon.concurrency`` 8 resp. 32, one manual task with
  ``overlap: allow`` (all N may run at once, the daemon's pool is the only limit). Once
  ``/readyz`` answers, the N runs are triggered through the API (``POST
  /v1/tasks/agent/trigger``, from 8 client threads): nothing is pre-filled, so firing
  is part of the figure. Wall = first trigger sent to the last run's ``finished_at``
  in the state DB (status ``succeeded``, all N).
* **Same measures on both sides**: CPU = user+system of the process over the window
  (agentd from ``/proc``, the floor from its own ``getrusage``), CPU per model call =
  CPU / (3 N), peak RSS = ``VmHWM`` (the whole life of the process, start-up included).
* **Checked, not assumed**: the provider counts the requests it answered; a try where
  either side did not make exactly 3 N calls, or a run did not succeed, is an error.

Goal (issue 27): agentd's wall within 10 % of the floor's.
"""

from __future__ import annotations

import json
import math
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import IO, Any

from benchmarks import agent_floor as af
from benchmarks.agentd_proc import REPO, AgentdProc, Tasks, env, unix
from benchmarks.model import AGENTD, Target
from benchmarks.reps import Rep, RunFn, Sample, Suite, per_1k, read_trace

FLOOR = "asyncio-httpx-floor"
DELAY_S = 0.2
"""The provider's answer time per call (issue 27)."""
TOOL_STEPS = 2
CALLS_PER_RUN = TOOL_STEPS + 1
TASK = "agent"
TRIGGER_THREADS = 8
FAILED = ("quarantined", "dropped", "cancelled", "skipped", "budget_exhausted")


class Provider:
    """``benchmarks.fake_provider`` as a subprocess: ``url`` once up, ``close()`` returns
    how many requests it answered (and how many it refused as malformed)."""

    def __init__(self, root: Path, delay_s: float = DELAY_S, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "benchmarks.fake_provider", "--delay", repr(delay_s)]
        cmd += ["--tool-steps", str(TOOL_STEPS)]
        self._log = (root / "provider.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, env=env()
        )
        assert self.proc.stdout is not None
        self.url = str(json.loads(self._line(self.proc.stdout, timeout))["url"])

    def _line(self, stream: IO[bytes], timeout: float) -> str:
        ready, _, _ = select.select([stream], [], [], timeout)
        line = stream.readline() if ready else b""
        if not line:
            self.close()
            raise RuntimeError(f"fake provider did not start within {timeout}s")
        return line.decode()

    def close(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=15)
        finally:
            self._log.close()
        for line in out.decode().splitlines():
            if line.startswith('{"requests"'):
                counts = json.loads(line)
        return counts

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.close()


def check_calls(who: str, served: dict[str, int], made: int, n: int) -> None:
    """Both sides must have had the same conversation: exactly 3 calls a run."""
    want = CALLS_PER_RUN * n
    if served.get("requests") != want or served.get("bad", 0) or made != want:
        raise RuntimeError(
            f"{who}: {made} model calls made, provider answered {served} (want {want} each)"
        )


def agent_config(url: str) -> tuple[dict[str, Any], Tasks]:
    """The ``providers`` section and the task: the floor's conversation, as agentd's."""
    providers = {"fake": {"base_url": url, "default_model": af.MODEL, "max_tokens": af.MAX_TOKENS}}
    tool = {
        "name": af.TOOL_NAME,
        "description": af.TOOL_DESCRIPTION,
        "parameters": af.TOOL_PARAMETERS,
        "idempotent": True,
        "python": {"callable": "benchmarks.payload:lookup"},
    }
    task = {
        "schedule": {"manual": True},
        "overlap": "allow",
        "agent": {
            "provider": "fake",
            "system": af.SYSTEM,
            "prompt": af.PROMPT,
            "max_steps": af.MAX_STEPS,
            "tools": [tool],
        },
    }
    return providers, {TASK: task}


def trigger_all(d: AgentdProc, n: int) -> None:
    def one(_: int) -> None:
        result = d.post(f"/v1/tasks/{TASK}/trigger")
        if result.get("status") != "queued":
            raise RuntimeError(f"trigger not queued: {result}")

    with ThreadPoolExecutor(TRIGGER_THREADS) as pool:
        list(pool.map(one, range(n)))


def wait_succeeded(d: AgentdProc, n: int, timeout: float) -> None:
    """Poll the state DB (every 50 ms) until all ``n`` runs succeeded; fail fast on a run
    that ended any other way."""
    deadline = time.monotonic() + timeout
    while True:
        rows = d.query("SELECT status, COUNT(*) AS k FROM runs GROUP BY status")
        by = {r["status"]: int(r["k"]) for r in rows}
        if by.get("succeeded", 0) >= n:
            return
        bad = {s: by[s] for s in FAILED if by.get(s)}
        if bad:
            raise RuntimeError(f"runs did not succeed: {by}\n{d.log_tail()}")
        if not d.alive():
            raise RuntimeError(f"agentd exited:\n{d.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs after {timeout}s: {by}")
        time.sleep(0.05)


def window_s(n: int, concurrency: int) -> float:
    """The wall time with no overhead at all: each of the ``concurrency`` slots holds
    its share of the conversations one after the other, 3 x 200 ms each."""
    return math.ceil(n / concurrency) * CALLS_PER_RUN * DELAY_S


def agentd_side(n: int, concurrency: int, rep: Rep) -> Sample:
    with Provider(rep.tmp) as llm:
        providers, tasks = agent_config(llm.url)
        d = AgentdProc(
            rep.tmp / "agentd", tasks, sections={"providers": providers}, concurrency=concurrency
        )
        with d:
            d.start(rep.trace())
            ready = d.wait_ready()
            cpu0, sql0 = d.cpu_s(), read_trace(rep)
            t0 = time.time()
            trigger_all(d, n)
            triggered = time.time() - t0
            wait_succeeded(d, n, timeout=60 + 5 * window_s(n, concurrency))
            cpu = d.cpu_s() - cpu0
            peak = d.peak_rss_mib()
            time.sleep(0.15 if rep.traced else 0)
            sql = per_1k(sql0, read_trace(rep), n)
            row = d.query("SELECT MAX(finished_at) AS last FROM runs WHERE status='succeeded'")
            wall = unix(row[0]["last"]) - t0
            made = int(d.query("SELECT COUNT(*) FROM ledger WHERE run_id IS NOT NULL")[0][0])
        served = llm.close()
    check_calls(AGENTD, served, made, n)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_ms_per_call": cpu * 1000 / (CALLS_PER_RUN * n),
        "peak_rss_mib": peak,
        "trigger_s": triggered,
        "ready_s": ready,
        **sql,
    }


def floor_side(n: int, concurrency: int, rep: Rep) -> Sample:
    with Provider(rep.tmp) as llm:
        args = ["--url", llm.url, "--n", str(n), "--concurrency", str(concurrency)]
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.agent_floor", *args],
            cwd=rep.tmp,
            env=env(),
            capture_output=True,
            text=True,
            timeout=60 + 5 * window_s(n, concurrency),
        )
        served = llm.close()
    if out.returncode != 0:
        raise RuntimeError(f"agent floor failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.splitlines()[-1])
    check_calls(FLOOR, served, int(result["calls"]), n)
    cpu = float(result["cpu_s"])
    return {
        "wall_s": float(result["wall_s"]),
        "cpu_s": cpu,
        "cpu_ms_per_call": cpu * 1000 / (CALLS_PER_RUN * n),
        "peak_rss_mib": float(result["peak_rss_mib"]),
    }


def run(s: Suite) -> None:
    n = s.mode.agent_runs
    for c in s.mode.agent_concurrency:
        contenders: dict[str, RunFn] = {
            AGENTD: partial(agentd_side, n, c),
            FLOOR: partial(floor_side, n, c),
        }
        runs = s.interleave(f"B11/c{c}", contenders)
        what = f"{n:,} runs x {CALLS_PER_RUN} calls at concurrency {c}"
        ideal = window_s(n, c)
        s.add(
            "B11",
            f"wall time, {what}",
            "s",
            runs,
            "wall_s",
            target=Target("within 10% of the floor", "<=", 1.1, (FLOOR,)),
            note=f"first trigger to the last run succeeded; with no overhead at all"
            f" ceil({n}/{c}) x {CALLS_PER_RUN} x {DELAY_S * 1000:.0f} ms = {ideal:.1f} s."
            f" {FLOOR} is not durable: the floor, not a peer",
        )
        s.add("B11", f"CPU, {what}", "s", runs, "cpu_s")
        s.add("B11", f"CPU per model call, {what}", "ms", runs, "cpu_ms_per_call")
        s.add(
            "B11",
            f"peak RSS, {what}",
            "MiB",
            runs,
            "peak_rss_mib",
            note="VmHWM: the process's whole life, start-up included",
        )
        s.add(
            "B11",
            f"{n:,} triggers through the API, concurrency {c}",
            "s",
            runs,
            "trigger_s",
            note=f"first POST sent to the last answered, {TRIGGER_THREADS} client threads",
        )
        s.add(
            "B11",
            f"SQL commits per 1,000 runs, {what}",
            "commits",
            runs,
            "sql_commits_per_1k",
            counter=True,
            note="traced warm-up round",
        )
