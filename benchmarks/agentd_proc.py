"""The real agentd, as a subprocess on a generated config in a temp dir.

Everything the benchmarks know about agentd comes from outside: the process (``/proc``),
its HTTP endpoints and its state DB, opened read-only. Nothing is patched; a traced run
only wraps the interpreter with ``benchmarks.sqltrace`` to count SQL.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import procstat

REPO = Path(__file__).resolve().parent.parent
Task = Mapping[str, Any]
Tasks = dict[str, dict[str, Any]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def idle_cron() -> str:
    """A daily cron 12 hours from now: a registered schedule that is never due soon."""
    t = time.gmtime(time.time() + 12 * 3600)
    return f"{t.tm_min} {t.tm_hour} * * *"


def py_task(schedule: Mapping[str, Any], func: str = "noop", **extra: Any) -> dict[str, Any]:
    return {
        "schedule": dict(schedule),
        "python": {"callable": f"benchmarks.payload:{func}"},
        **extra,
    }


def idle_tasks(n: int) -> dict[str, dict[str, Any]]:
    cron = idle_cron()
    return {f"idle{i:05d}": py_task({"cron": cron}) for i in range(n)}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


class AgentdProc:
    """One daemon: ``start()``, measure, then ``close()`` (always, in a ``with``)."""

    def __init__(
        self,
        root: Path,
        tasks: Mapping[str, Task],
        state_url: str | None = None,
        sections: Mapping[str, Any] | None = None,
        **daemon: Any,
    ) -> None:
        """``state_url``: a ``postgresql://`` URL to keep the state in (``state: {url:}``)
        instead of SQLite in the state dir; the ``query`` helpers below read SQLite only.
        ``sections``: more top-level config sections as they are (``providers``, ...)."""
        self.root = root
        self.state_url = state_url
        self.sections = dict(sections or {})
        root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.db_path = self.state_dir / "state.sqlite"
        self.config = root / "agentd.yaml"
        self.log_path = root / "agentd.log"
        self.port = free_port()
        self.daemon: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "concurrency": 4,
            "shutdown_grace": "5s",
            "kill_grace": "1s",
            "python_path": [str(REPO)],
            "http": {"host": "127.0.0.1", "port": self.port},
            **daemon,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self.write_config(tasks)

    def write_config(self, tasks: Mapping[str, Task]) -> None:
        """JSON is YAML: one flow mapping per task keeps 10,000 tasks quick to write."""
        lines = ["daemon: " + json.dumps(self.daemon), "tasks:" if tasks else "tasks: {}"]
        if self.state_url is not None:
            lines.insert(0, "state: " + json.dumps({"url": self.state_url}))
        lines[:0] = [f"{name}: {json.dumps(body)}" for name, body in self.sections.items()]
        lines += [f"  {json.dumps(tid)}: {json.dumps(body)}" for tid, body in tasks.items()]
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config)

    # ------------------------------------------------------------ process

    def start(self, trace: Path | None = None, wrap: tuple[str, ...] = ()) -> AgentdProc:
        """Spawn the daemon; ``trace`` counts its SQL, ``wrap`` prefixes the command (a
        profiler, as in ``benchmarks.profile``)."""
        cmd = [sys.executable, "-m", "agentd.cli", "run", "--config", str(self.config)]
        if trace is not None:
            cmd[1:2] = ["-m", "benchmarks.sqltrace", str(trace), "-m"]
        cmd = [*wrap, *cmd]
        with self.log_path.open("ab") as log:
            self.spawned = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env()
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds from spawn to the first ``/readyz`` 200, polled every 10 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"agentd exited early:\n{self.log_tail()}")
            try:
                if self.get("/readyz", timeout=timeout)[0] == 200:
                    return time.monotonic() - self.spawned
            except OSError:
                pass
            time.sleep(0.01)
        raise TimeoutError(f"agentd not ready after {timeout}s:\n{self.log_tail()}")

    def sigterm_exit_s(self, timeout: float = 120.0) -> float:
        """Seconds from SIGTERM to the process being reaped."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - t0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        """Stop gracefully so a traced run writes its counts; kill if that hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> AgentdProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------ /proc

    def cpu_s(self, children: bool = False) -> float:
        return procstat.cpu_seconds(self.pid, children)

    def rss_mib(self) -> float:
        return procstat.rss_mib(self.pid)

    def peak_rss_mib(self) -> float:
        return procstat.peak_rss_mib(self.pid)

    def wakeups(self) -> int:
        return procstat.wakeups(self.pid)

    # ------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, timeout: float = 30.0) -> tuple[int, bytes, float]:
        """(status, body, seconds) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            t0 = time.perf_counter()
            conn.request(
                method,
                path,
                body=b"{}" if method == "POST" else None,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, body, time.perf_counter() - t0
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes, float]:
        return self.request("GET", path, timeout)

    def post(self, path: str) -> dict[str, Any]:
        status, body, _ = self.request("POST", path)
        if status >= 300:
            raise RuntimeError(f"POST {path}: {status} {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    # ------------------------------------------------------------ state DB, read-only

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def count(self, where: str, params: tuple[Any, ...] = ()) -> int:
        return int(self.query(f"SELECT COUNT(*) FROM runs WHERE {where}", params)[0][0])

    def wait_runs(self, where: str, n: int, timeout: float) -> None:
        """Poll (every 100 ms) until ``n`` runs match ``where``."""
        deadline = time.monotonic() + timeout
        while self.count(where) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count(where)}/{n} runs with {where} after {timeout}s")
            if not self.alive():
                raise RuntimeError(f"agentd exited:\n{self.log_tail()}")
            time.sleep(0.1)

    def start_lateness_s(self, task_prefix: str) -> list[float]:
        """Per run: its first ``start`` event's time minus its scheduled time."""
        rows = self.query(
            "SELECT r.scheduled_for AS due, MIN(e.ts) AS started FROM runs r JOIN events e"
            " ON e.run_id = r.id AND e.kind = 'start' WHERE r.task_id LIKE ? GROUP BY r.id",
            (task_prefix + "%",),
        )
        return [unix(r["started"]) - unix(r["due"]) for r in rows]

    def span_s(self, first_kind: str, last_kind: str) -> float:
        """From the first ``first_kind`` event to the last ``last_kind`` event."""
        row = self.query(
            "SELECT (SELECT MIN(ts) FROM events WHERE kind=?) AS a,"
            " (SELECT MAX(ts) FROM events WHERE kind=?) AS b",
            (first_kind, last_kind),
        )[0]
        return unix(row["b"]) - unix(row["a"])
