"""The figures behind deploy/k8s/: start-up times and memory of agentd on the configs
a pod runs, for the probes' budgets and the memory request and limit.

``python -m benchmarks.k8s_sizing [--reps 3] [--tasks 10000] [--runs 100000]`` starts
the real daemon (a subprocess, as in the rest of the suite) on:

- ``shipped``: ``config/agentd.yaml`` (the shipped tasks), state dir and port moved to a temp dir;
- ``configmap``: the base ConfigMap's config (``deploy/k8s/base/agentd.yaml``), with its
  secret files and state dir moved to a temp dir and bound to 127.0.0.1;
- ``tasks``: ``--tasks`` idle cron tasks on an empty state (a first start);
- ``large``: the same tasks restarted on a state that holds ``--runs`` finished runs
  (with their attempts and four events each) spread over 100 tasks, and a jobstore
  that holds every task's job (a pod rescheduled onto its volume);
- ``large-changed``: that restart with every task's schedule changed (a config edit
  applied by a restart: 10,000 jobs rescheduled before the daemon is ready).

For each it reports seconds from spawn to the first ``/healthz`` 200 (what the
startupProbe waits for) and to ``/readyz`` 200, and the memory of the daemon and its
children (the config-parse child counts against the pod's limit too): the largest sum
of their PSS seen while starting, while answering ``/metrics`` and across a SIGHUP
reload, and the idle figure after that. PSS of the process tree is what the container's
cgroup charges for those processes' pages, less the page cache it may reclaim.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from benchmarks import prefill, procstat
from benchmarks.agentd_proc import REPO, AgentdProc, Tasks, free_port, idle_tasks

HISTORY_TASKS = 100
SETTLE_S = 10.0


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from the kernel's children lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
    return out


def pss_mib(pid: int) -> float:
    """Proportional set size of one process (shared pages split among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_pss_mib(pid: int) -> float:
    return sum(pss_mib(p) for p in tree(pid))


class PeakSampler:
    """The largest tree PSS seen, sampled every ``every_s`` on a thread."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mib(self.pid))
            self._stop.wait(self.every_s)

    @contextmanager
    def running(self) -> Iterator[PeakSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


class Daemon:
    """One agentd on a config file, started with the suite's interpreter."""

    def __init__(self, root: Path, config: Path, port: int, token: str | None = None) -> None:
        self.root, self.config, self.port, self.token = root, config, port, token
        self.log = root / "agentd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "agentd.cli", "run", "--config", str(self.config)]
        with self.log.open("ab") as log:
            self.spawned = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def get(self, path: str, timeout: float = 120.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_for(self, path: str, timeout: float = 600.0) -> float:
        """Seconds from spawn to the first 200 on ``path``, polled every 10 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get(path, timeout=timeout)[0] == 200:
                    return time.monotonic() - self.spawned
            except OSError:
                pass
            time.sleep(0.01)
        raise TimeoutError(f"no 200 on {path} after {timeout}s:\n{self.tail()}")

    def generation(self) -> int:
        return int(json.loads(self.get("/v1/status")[1]).get("config_generation", 0))

    def stop(self) -> float:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        return time.monotonic() - t0

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def measure(d: Daemon) -> dict[str, float]:
    """Start, wait, scrape, reload, stop: every figure of one start. A daemon left
    running by a failure is killed."""
    try:
        return _measure(d)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)


def _measure(d: Daemon) -> dict[str, float]:
    d.start()
    with PeakSampler(d.pid).running() as start:
        healthz = d.wait_for("/healthz")
        readyz = d.wait_for("/readyz")
    time.sleep(SETTLE_S)
    with PeakSampler(d.pid).running() as scrape:
        for _ in range(3):
            d.get("/metrics")
    generation = d.generation()
    with PeakSampler(d.pid).running() as reload:
        t0 = time.monotonic()
        os.kill(d.pid, signal.SIGHUP)
        while d.generation() == generation:
            if time.monotonic() - t0 > 300:
                raise TimeoutError(f"no reload after 300s:\n{d.tail()}")
            time.sleep(0.02)
        reload_s = time.monotonic() - t0
    time.sleep(SETTLE_S)
    idle_pss = tree_pss_mib(d.pid)
    idle_rss = procstat.rss_mib(d.pid)
    hwm = 0.0
    for line in Path(f"/proc/{d.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    exit_s = d.stop()
    return {
        "healthz_s": healthz,
        "readyz_s": readyz,
        "reload_s": reload_s,
        "exit_s": exit_s,
        "start_peak_pss_mib": start.peak,
        "scrape_peak_pss_mib": scrape.peak,
        "reload_peak_pss_mib": reload.peak,
        "idle_pss_mib": idle_pss,
        "idle_rss_mib": idle_rss,
        "daemon_hwm_mib": hwm,
    }


def adapted(source: Path, root: Path, port: int) -> tuple[Path, str | None]:
    """``source`` with its state dir, listener and secret files moved into ``root``, and
    the API token if it names one. A ``*_file`` secret gets a file with a made-up value;
    tasks are kept as written."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    daemon = config.setdefault("daemon", {})
    daemon["state_dir"] = str(root / "state")
    http_cfg = daemon.setdefault("http", {})
    http_cfg.update(host="127.0.0.1", port=port)
    secrets = root / "secrets"
    secrets.mkdir(exist_ok=True)

    def move_secrets(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_file") and isinstance(value, str):
                    path = secrets / Path(value).name
                    path.write_text(f"sizing-{Path(value).name}-value\n")
                    node[key] = str(path)
                else:
                    move_secrets(value)
        elif isinstance(node, list):
            for item in node:
                move_secrets(item)

    move_secrets(config)
    out = root / "agentd.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    token_file = http_cfg.get("token_file")
    return out, Path(token_file).read_text().strip() if token_file else None


def large_template(root: Path, tasks: Tasks, runs: int) -> AgentdProc:
    """A stopped daemon's state with ``tasks``' jobs and ``runs`` finished runs."""
    proc = AgentdProc(root, tasks)
    ids = list(tasks)[:HISTORY_TASKS]
    prefill.histories(proc, ids, runs // HISTORY_TASKS)
    proc.start()
    proc.wait_ready(timeout=600)
    proc.close()
    return proc


def moved(tasks: Tasks) -> Tasks:
    """The same tasks with every cron a minute later: each one's definition changed."""
    out = {}
    for tid, body in tasks.items():
        minute, rest = body["schedule"]["cron"].split(" ", 1)
        out[tid] = {**body, "schedule": {"cron": f"{(int(minute) + 1) % 60} {rest}"}}
    return out


def run(scenario: str, args: argparse.Namespace, base: Path) -> list[dict[str, float]]:
    samples = []
    template = None
    tasks = idle_tasks(args.tasks)
    if scenario.startswith("large"):
        t0 = time.monotonic()
        template = large_template(base / f"{scenario}-template", tasks, args.runs)
        print(f"{scenario}: template built in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        if scenario == "large-changed":
            tasks = moved(tasks)
    for rep in range(args.reps):
        root = base / f"{scenario}-{rep}"
        root.mkdir()
        port = free_port()
        token = None
        if scenario == "shipped":
            config, token = adapted(REPO / "config/agentd.yaml", root, port)
        elif scenario == "configmap":
            config, token = adapted(REPO / "deploy/k8s/base/agentd.yaml", root, port)
        else:
            proc = AgentdProc(root, tasks, http={"host": "127.0.0.1", "port": port})
            if template is not None:
                shutil.copytree(template.state_dir, proc.state_dir)
            config = proc.config
        sample = measure(Daemon(root, config, port, token))
        print(f"{scenario} rep {rep}: " + json.dumps(sample), file=sys.stderr)
        samples.append(sample)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.k8s_sizing", description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument(
        "--only",
        default="shipped,configmap,tasks,large,large-changed",
        help="comma-separated scenarios",
    )
    p.add_argument("--out", type=Path, help="write the samples as JSON here too")
    p.add_argument("--keep", type=Path, help="work in this (new) directory and keep it")
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "machine": procstat.machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="agentd-k8s-sizing-") as tmp:
        base = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True)
            base = args.keep
        for scenario in args.only.split(","):
            samples = run(scenario, args, base)
            result[scenario] = {
                key: {
                    "median": round(statistics.median(s[key] for s in samples), 3),
                    "max": round(max(s[key] for s in samples), 3),
                }
                for key in samples[0]
            }
    result["machine"]["loadavg_end"] = procstat.loadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, args.only.split(",")))
    return 0


def table(result: dict[str, Any], scenarios: list[str]) -> str:
    """One row per figure, one column per scenario: median (max)."""
    keys = list(result[scenarios[0]])
    lines = [
        "| figure | " + " | ".join(scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    for key in keys:
        cells = [f"{result[s][key]['median']:g} ({result[s][key]['max']:g})" for s in scenarios]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
