"""Where agentd's CPU goes in one benchmark scenario, sampled by py-spy.

``python -m benchmarks.profile SCENARIO --py-spy PATH [--n N] [--out FILE]``

py-spy is not a project dependency: install it anywhere (``pip install py-spy`` into a
scratch venv) and pass its path. Scenarios: ``burst`` (N runs due at once, B1),
``queue`` (N queued runs, B3), ``shell`` (N queued ``true`` runs at concurrency 4, B4),
``idle`` (N idle schedules for 15 s, B7), ``startup`` (N schedules, stopped once ready,
B5), ``metrics`` (N schedules, ``/metrics`` scraped 3 times, B10), ``agent`` (N
tool-calling agent runs triggered through the API against B11's 200 ms provider, at
``--concurrency``, B11). The raw collapsed
stacks go to ``--out`` (for flamegraph.pl or speedscope); the top functions by
inclusive share of samples are printed, which is what the README of each miss quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks import bench_agent, prefill
from benchmarks.agentd_proc import AgentdProc, idle_tasks, iso, py_task
from benchmarks.bench_throughput import PY_TASK, QUEUE_CONCURRENCY, SH_TASK

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def build(
    scenario: str, n: int, root: Path, stack: contextlib.ExitStack, concurrency: int
) -> tuple[AgentdProc, float]:
    """The daemon for a scenario and the instant its work falls due (0: at start);
    what else the scenario needs (B11's provider) lives as long as ``stack``."""
    if scenario == "agent":
        llm = stack.enter_context(bench_agent.Provider(root))
        providers, tasks = bench_agent.agent_config(llm.url)
        d = AgentdProc(
            root / "agentd", tasks, sections={"providers": providers}, concurrency=concurrency
        )
        return d, 0.0
    if scenario == "burst":
        due = time.time() + 3 + n * 0.0015
        tasks = {f"t{i:05d}": py_task({"at": iso(due)}) for i in range(n)}
        return AgentdProc(root, tasks, concurrency=256), due
    if scenario in ("queue", "shell"):
        shell = scenario == "shell"
        d = AgentdProc(
            root, SH_TASK if shell else PY_TASK, concurrency=4 if shell else QUEUE_CONCURRENCY
        )
        prefill.queue(d, "bench", n)
        return d, 0.0
    return AgentdProc(root, idle_tasks(n)), 0.0


def drive(scenario: str, n: int, d: AgentdProc, due: float) -> None:
    d.wait_ready()
    if scenario == "burst":
        time.sleep(max(0.0, due - time.time()))
        d.wait_runs("status NOT IN ('queued','running')", n, timeout=600)
    elif scenario in ("queue", "shell"):
        d.wait_runs("status='succeeded'", n, timeout=600)
    elif scenario == "idle":
        time.sleep(15)
    elif scenario == "metrics":
        for _ in range(3):
            d.get("/metrics", timeout=300)
    elif scenario == "agent":
        bench_agent.trigger_all(d, n)
        bench_agent.wait_succeeded(d, n, timeout=600)


def child_of(pid: int) -> int:
    """py-spy's child is the daemon: signals go to it, so py-spy writes its file."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        if kids:
            return int(kids[0])
    raise RuntimeError("py-spy has no child process")


def _ours(path: str) -> bool:
    return path.startswith("agentd/") or "/agentd/" in path


def summary(raw: Path, top: int) -> str:
    """agentd's own functions by inclusive share, then the leaves (self time) of all."""
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, text = line.rpartition(" ")
        if not text.isdigit():  # a frame name with a newline in it (py-spy prints some
            continue  # module docstrings as names): its stack's pieces are dropped
        count = int(text)
        total += count
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m:
                names.append((f"{m['func']} ({Path(m['file']).name})", _ours(m["file"])))
        for name in {n for n, ours in names if ours}:
            inclusive[name] += count
        if names:
            leaves[names[-1][0]] += count
    lines = [f"{total} samples. agentd functions, inclusive:"]
    lines += [f"{100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    lines += ["Leaves (self):"]
    lines += [f"{100 * c / total:5.1f}%  {name}" for name, c in leaves.most_common(top // 2)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    scenarios = ["burst", "queue", "shell", "idle", "startup", "metrics", "agent"]
    p.add_argument("scenario", choices=scenarios)
    p.add_argument("--py-spy", required=True, help="path to the py-spy executable")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("agentd-profile.txt"))
    p.add_argument("--idle", action="store_true", help="wall clock: include waiting threads")
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--concurrency", type=int, default=32, help="agent: daemon concurrency")
    a = p.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="agentd-profile-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        d, due = build(a.scenario, a.n, Path(tmp), stack, a.concurrency)
        wrap = (
            a.py_spy,
            "record",
            "--format",
            "raw",
            "--rate",
            str(a.rate),
            "--nonblocking",
            *(["--idle", "--threads"] if a.idle else []),
            "-o",
            str(a.out.resolve()),
            "--",
        )
        with d:
            d.start(wrap=wrap)
            time.sleep(0.5)
            daemon = child_of(d.pid)
            drive(a.scenario, a.n, d, due)
            os.kill(daemon, signal.SIGTERM)
            assert d.proc is not None
            d.proc.wait(timeout=120)
    print(summary(a.out, a.top))


if __name__ == "__main__":
    main()
