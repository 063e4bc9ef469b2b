"""A real agentd process for end-to-end tests, and ways to wait on it with deadlines."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
FIXTURES = Path(__file__).parent / "fixtures"


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``.

    The deadline is generous because CI is a loaded 2-core machine; a passing test
    returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def blocked(out: Path) -> bool:
    """True once an ``e2e_tasks:batch`` run writing ``out`` is blocked past its checkpoint.
    (``out`` itself appears just before that checkpoint, so a signal sent on seeing it
    could still end the run there.)"""
    return out.with_name(out.name + ".blocked").exists()


def agentd_cli(*args: str, config: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agentd.cli", args[0], "--config", str(config), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Agentd:
    """One daemon process on a config written into a temp dir."""

    def __init__(self, root: Path, tasks_yaml: str, daemon_extra: str = "", top: str = "") -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = root / "state"
        self.config = root / "agentd.yaml"
        self.log_path = root / "agentd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.top = top
        self.write_config(tasks_yaml, daemon_extra)

    def write_config(self, tasks_yaml: str, daemon_extra: str = "") -> None:
        """``top`` (given at construction) holds other top-level sections: providers,
        limits, alerts. A key of ``daemon_extra`` replaces the default of that name (a
        key twice in one mapping is a config error)."""
        extra = textwrap.dedent(daemon_extra).strip()
        given = {line.split(":", 1)[0] for line in extra.splitlines() if line[:1].isalpha()}
        defaults = {
            "state_dir": str(self.state_dir),
            "poll_interval": "50ms",
            "lease": "5s",
            "shutdown_grace": "10s",
            "kill_grace": "1s",
            "python_path": f"[{FIXTURES}]",
            "log_level": "debug",
            "http": f"{{host: 127.0.0.1, port: {self.port}}}",
        }
        lines = "".join(f"  {k}: {v}\n" for k, v in defaults.items() if k not in given)
        self.config.write_text(
            "daemon:\n"
            f"{lines}"
            f"{textwrap.indent(extra, '  ')}\n"
            f"{textwrap.dedent(self.top).strip()}\n"
            "tasks:\n" + textwrap.indent(textwrap.dedent(tasks_yaml).strip(), "  ") + "\n"
        )

    # ------------------------------------------------------------ process

    def start(self, wait_ready: bool = True, env: dict[str, str] | None = None) -> Agentd:
        log = self.log_path.open("ab")
        begun = log.tell()  # a restart appends: only this process's lines say it started
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentd.cli", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, **(env or {})},
        )
        log.close()
        if wait_ready:
            wait_for(
                lambda: (
                    b"agentd started" in self.log_path.read_bytes()[begun:] or self.proc_exited()
                ),
                what="daemon start",
            )
            assert not self.proc_exited(), f"daemon exited early:\n{self.log()}"
        return self

    def proc_exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, what: str, timeout: float = 30.0) -> None:
        """Wait for ``text`` in the daemon's log; on timeout say whether the process is
        still alive and show the log's tail, so a flake explains itself."""
        try:
            wait_for(lambda: text in self.log(), timeout=timeout, what=what)
        except AssertionError as exc:
            code = self.proc.poll() if self.proc else None
            raise AssertionError(
                f"{exc}; exit code {code}; log tail:\n{self.log()[-4000:]}"
            ) from None

    # ------------------------------------------------------------ state, read from the DB

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        db = self.state_dir / "state.sqlite"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def runs(self, task: str | None = None) -> list[dict[str, Any]]:
        if task:
            return self.query("SELECT * FROM runs WHERE task_id=? ORDER BY id", (task,))
        return self.query("SELECT * FROM runs ORDER BY id")

    def events(self, run_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM events WHERE 1=1", []
        if run_id:
            sql += " AND run_id=?"
            params.append(run_id)
        if kind:
            sql += " AND kind=?"
            params.append(kind)
        rows = self.query(sql + " ORDER BY id", tuple(params))
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return agentd_cli(*args, config=self.config, check=check)

    def trigger(self, task: str) -> str:
        out = self.cli("trigger", task, "--json")
        return str(json.loads(out.stdout)["run_id"])

    def run_status(self, run_id: str) -> str | None:
        rows = self.query("SELECT status FROM runs WHERE id=?", (run_id,))
        return rows[0]["status"] if rows else None

    def wait_status(self, run_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
        wait_for(
            lambda: self.run_status(run_id) == status,
            timeout,
            f"run {run_id} to be {status} (now {self.run_status(run_id)})\n{self.log()}",
        )
        return self.query("SELECT * FROM runs WHERE id=?", (run_id,))[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
