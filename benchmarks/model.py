"""The suite's vocabulary: run modes, metrics with targets, and their summary statistics.

A metric holds every sample of every contender (agentd, each peer, each floor); the
table and the JSON are both derived from it, so the two can never disagree.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

AGENTD = "agentd"
Better = Literal["lower", "higher", "none"]


@dataclass(frozen=True)
class Mode:
    """Sizes and repetitions: ``full`` is the issue's suite, ``quick`` a few minutes,
    ``smoke`` only proves that every benchmark still produces a figure."""

    name: str
    reps: int
    warmup: int
    peers: bool
    b1_sizes: tuple[int, ...]
    b2_idle: int
    b2_seconds: int
    b3_runs: int
    b4_runs: int
    idle_tasks: int
    b5_changed: int
    inflight_s: float
    b6_runs: int
    b7_window_s: float
    settle_s: float
    b8_tasks: int
    b8_history: int
    calib_commits: int
    pg_b3_runs: int
    """Section PG: the queue worked off by 1, 2 and 3 nodes on PostgreSQL and the peers."""
    pg_b1_runs: int
    pg_fsync_s: int
    """Seconds per test of ``pg_test_fsync`` (0: not run)."""
    agent_runs: int
    """B11: tool-calling agent runs (3 model calls each) per contender and concurrency."""
    agent_concurrency: tuple[int, ...]


MODES = {
    "full": Mode(
        name="full",
        reps=5,
        warmup=1,
        peers=True,
        b1_sizes=(1000, 10000),
        b2_idle=10000,
        b2_seconds=15,
        b3_runs=10000,
        b4_runs=1000,
        idle_tasks=10000,
        b5_changed=100,
        inflight_s=8.0,
        b6_runs=100000,
        b7_window_s=15.0,
        settle_s=3.0,
        b8_tasks=10000,
        b8_history=100000,
        calib_commits=3000,
        pg_b3_runs=20000,
        pg_b1_runs=1000,
        pg_fsync_s=2,
        agent_runs=200,
        agent_concurrency=(8, 32),
    ),
    "quick": Mode(
        name="quick",
        reps=1,
        warmup=1,
        peers=True,
        b1_sizes=(200, 1000),
        b2_idle=1000,
        b2_seconds=5,
        b3_runs=1000,
        b4_runs=200,
        idle_tasks=1000,
        b5_changed=100,
        inflight_s=3.0,
        b6_runs=2000,
        b7_window_s=5.0,
        settle_s=1.0,
        b8_tasks=1000,
        b8_history=10000,
        calib_commits=500,
        pg_b3_runs=10000,
        pg_b1_runs=1000,
        pg_fsync_s=1,
        agent_runs=64,
        agent_concurrency=(8, 32),
    ),
    "smoke": Mode(
        name="smoke",
        reps=1,
        warmup=0,
        peers=False,
        b1_sizes=(20,),
        b2_idle=20,
        b2_seconds=2,
        b3_runs=50,
        b4_runs=10,
        idle_tasks=50,
        b5_changed=5,
        inflight_s=0.5,
        b6_runs=50,
        b7_window_s=0.5,
        settle_s=0.2,
        b8_tasks=30,
        b8_history=200,
        calib_commits=50,
        pg_b3_runs=60,
        pg_b1_runs=20,
        pg_fsync_s=0,
        agent_runs=8,
        agent_concurrency=(8,),
    ),
}


@dataclass(frozen=True)
class Target:
    """``op value``, or with ``ref`` a ratio: ``op value x`` the best median among the
    ``ref`` contenders (so "at least 2x huey" holds against the faster huey)."""

    text: str
    op: Literal["<=", ">=", "<"]
    value: float
    ref: tuple[str, ...] = ()

    def threshold(self, medians: dict[str, float], better: Better) -> float | None:
        if not self.ref:
            return self.value
        refs = [medians[r] for r in self.ref if r in medians and not math.isnan(medians[r])]
        if not refs:
            return None
        return self.value * (max(refs) if better == "higher" else min(refs))

    def met(self, figure: float, medians: dict[str, float], better: Better) -> bool | None:
        limit = self.threshold(medians, better)
        if limit is None or math.isnan(figure):
            return None
        if self.op == "<=":
            return figure <= limit
        if self.op == "<":
            return figure < limit
        return figure >= limit


@dataclass(frozen=True)
class Stats:
    median: float
    lo: float
    hi: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Stats:
        clean = [v for v in values if not math.isnan(v)]
        if not clean:
            return Stats(math.nan, math.nan, math.nan, 0)
        return Stats(statistics.median(clean), min(clean), max(clean), len(clean))


@dataclass
class Metric:
    bench: str
    label: str
    unit: str
    better: Better = "lower"
    targets: tuple[Target, ...] = ()
    values: dict[str, list[float]] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def stats(self) -> dict[str, Stats]:
        return {name: Stats.of(vals) for name, vals in self.values.items() if vals}

    def status(self) -> str:
        """``met``, ``MISSED``, or ``-`` when there is no target or nothing to judge."""
        stats = self.stats()
        if not self.targets or AGENTD not in stats:
            return "-"
        medians = {k: s.median for k, s in stats.items()}
        verdicts = [t.met(stats[AGENTD].median, medians, self.better) for t in self.targets]
        if False in verdicts:
            return "MISSED"
        return "met" if all(v is True for v in verdicts) else "-"

    @property
    def target_text(self) -> str:
        return " and ".join(t.text for t in self.targets)

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "target": self.target_text or None,
            "status": self.status(),
            "note": self.note,
            "results": {
                name: {
                    "median": _num(s.median),
                    "min": _num(s.lo),
                    "max": _num(s.hi),
                    "n": s.n,
                    "samples": [_num(v) for v in self.values[name]],
                }
                for name, s in self.stats().items()
            },
            "not_run": self.not_run,
        }


def _num(value: float) -> float | None:
    """NaN is not JSON: an absent figure is written as null."""
    return None if math.isnan(value) else value


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): always one of the observed values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
