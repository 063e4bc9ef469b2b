"""Helpers the benchmark modules share: timing leads, floors, sample shaping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.agentd_proc import env
from benchmarks.model import percentile
from benchmarks.reps import Rep, Sample

HUEY = ("huey-stock", "huey-tuned")
APS = ("aps-sqlite", "aps-nograce", "aps-memory")


class NotReadyInTime(Exception):
    """The contender was still starting when the work fell due: the rep would measure
    start-up, not lateness. The caller retries with a longer lead."""


class Lead:
    """How far ahead to put the due instant: enough for the contender to be up, learned
    from its last start-up, so 10,000-task runs do not idle for a fixed minute."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def get(self, key: str, guess: float) -> float:
        return max(1.0, 1.3 * self._last.get(key, guess) + 0.4)

    def seen(self, key: str, ready_s: float) -> None:
        self._last[key] = ready_s

    def retry(self, key: str) -> None:
        self._last[key] = 2 * self._last.get(key, 5.0) + 2


def with_lead(lead: Lead, key: str, guess: float, attempt: Callable[[float], Sample]) -> Sample:
    """Call ``attempt(due)`` with a due instant far enough ahead; up to three tries."""
    for _ in range(3):
        due = time.time() + lead.get(key, guess)
        try:
            return attempt(due)
        except NotReadyInTime:
            lead.retry(key)
    raise RuntimeError(f"{key} never got ready before its due instant")


def attempt_dir(rep: Rep) -> Path:
    """A fresh directory for each try of a rep: a retry must not find the last one's DB."""
    path = rep.tmp / f"try{time.monotonic_ns()}"
    path.mkdir()
    return path


def check_ready(lead: Lead, key: str, ready_s: float, due: float) -> None:
    lead.seen(key, ready_s)
    if time.time() > due - 0.2:
        raise NotReadyInTime(key)


def sleep_until(when: float) -> None:
    while (left := when - time.time()) > 0:
        time.sleep(min(left, 0.5))


def lateness_sample(late_s: list[float], n: int, cpu_s: float) -> Sample:
    ms = [x * 1000 for x in late_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
        "missed": float(n - len(ms)),
        "cpu_s_per_1k": cpu_s * 1000 / n,
    }


def floor(args: list[str], cwd: Path, timeout: float = 600) -> dict[str, object]:
    """One ``benchmarks.floor`` subcommand in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"floor {args[0]} failed: {out.stderr[-2000:]}")
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def floats(value: object) -> list[float]:
    assert isinstance(value, list)
    return [float(v) for v in value]
