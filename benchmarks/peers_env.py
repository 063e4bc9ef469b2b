"""The peers' virtualenvs, and a peer program as a subprocess.

Each peer gets its own venv under a cache dir (``AGENTD_BENCH_CACHE`` or
``~/.cache/agentd-bench``), built once with pip and rebuilt when its requirements
change. Peers never share agentd's venv: their dependency versions must not bend
agentd's, nor the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.agentd_proc import REPO, env

CACHE = Path(os.environ.get("AGENTD_BENCH_CACHE", Path.home() / ".cache" / "agentd-bench"))
REQUIREMENTS = {
    "aps": ["apscheduler>=3.11,<3.12", "sqlalchemy>=2.0", "aiohttp>=3.9"],
    "huey": ["huey>=2.5,<3"],
    "celery": ["celery[redis]>=5.3,<6"],
    "procrastinate": ["procrastinate>=3.10,<4", "psycopg[binary]>=3.2,<4"],
    "dbos": ["dbos>=3.4,<4", "psycopg[binary]>=3.2,<4"],
}


def build_venv(name: str, log: Path) -> Path:
    """The venv's python, building the venv first if needed. Raises on failure."""
    reqs = REQUIREMENTS[name]
    root = CACHE / "peers" / name
    stamp = root / ".requirements"
    want = hashlib.sha256(json.dumps(reqs).encode()).hexdigest()
    python = root / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    shutil.rmtree(root, ignore_errors=True)
    with log.open("ab") as out:
        subprocess.run(
            [sys.executable, "-m", "venv", str(root)],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *reqs],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    stamp.write_text(want)
    return python


def versions(python: Path, packages: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    )
    out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    result: dict[str, str] = json.loads(out.stdout) if out.returncode == 0 else {}
    return result


class PeerProc:
    """``python -m benchmarks.peers.<module> ARGS`` in a peer venv, in a temp dir."""

    def __init__(
        self, python: Path, module: str, args: list[str], cwd: Path, trace: Path | None = None
    ) -> None:
        cmd = [str(python), "-m", f"benchmarks.peers.{module}", *args]
        if trace is not None:
            cmd[1:2] = ["-m", "benchmarks.sqltrace", str(trace), "-m"]
        self.stderr = (cwd / "peer.stderr").open("wb")
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.ready_at: float | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY") and self.ready_at is None:
                self.ready_at = time.monotonic()
                self._ready.set()
            else:
                self.lines.append(line)
        self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 600.0) -> float:
        """Seconds from spawn to the peer's READY line."""
        self._ready.wait(timeout)
        if self.ready_at is None:
            raise RuntimeError(f"peer not ready: {self._stderr_tail()}")
        return self.ready_at - self.spawned

    def result(self, timeout: float = 600.0) -> dict[str, Any]:
        """Wait for exit; the last stdout line is the peer's JSON report."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.close()
        self._ready.wait(5)
        if code != 0 or not self.lines:
            raise RuntimeError(f"peer exited {code}: {self._stderr_tail()}")
        result: dict[str, Any] = json.loads(self.lines[-1])
        return result

    def sigterm_exit_s(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout=timeout)
        return time.monotonic() - t0

    def cpu_s(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.stderr.close()

    def _stderr_tail(self) -> str:
        path = Path(self.stderr.name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-15:])


__all__ = ["CACHE", "REPO", "PeerProc", "build_venv", "versions"]
