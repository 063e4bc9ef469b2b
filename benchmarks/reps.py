"""Repetitions: warm-up, then interleaved runs, each in a fresh process and temp dir.

Interleaving (agentd, peer, peer, agentd, ...) with the order rotated every round means
a slow minute on this shared machine hurts every contender about equally instead of
all repetitions of one. The warm-up round is never timed: it runs with SQL tracing on
and supplies the exact counters (commits, statements); in smoke mode, which has no
warm-up, the one round is both traced and reported.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.model import AGENTD, Better, Metric, Mode, Target

Sample = dict[str, float]


@dataclass(frozen=True)
class Rep:
    index: int
    warm: bool
    traced: bool
    tmp: Path

    def trace(self) -> Path | None:
        """Where a traced run writes its SQL counts (None: run untraced)."""
        return self.tmp / "sqltrace.json" if self.traced else None


RunFn = Callable[[Rep], Sample]


def read_trace(rep: Rep) -> dict[str, int]:
    """The SQL counts a traced run has written so far (empty when untraced)."""
    path = rep.trace()
    if path is None or not path.exists():
        return {}
    counts: dict[str, int] = json.loads(path.read_text())
    return counts


def per_1k(before: dict[str, int], after: dict[str, int], runs: int) -> Sample:
    """SQL counts between two snapshots, per 1,000 runs."""
    if not after or runs <= 0:
        return {}
    keys = ("statements", "commits", "write_commits")
    return {f"sql_{k}_per_1k": (after.get(k, 0) - before.get(k, 0)) * 1000 / runs for k in keys}


@dataclass
class Runs:
    timed: dict[str, list[Sample]]
    counters: dict[str, Sample]

    def values(self, name: str, key: str) -> list[float]:
        return [s[key] for s in self.timed.get(name, []) if key in s]


@dataclass
class Suite:
    mode: Mode
    tmp_root: Path
    metrics: list[Metric] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peers: dict[str, Path] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)
    extra_meta: dict[str, object] = field(default_factory=dict)
    """Facts a section learns about its setup (a server's version and settings), put
    into the JSON's ``meta`` as they are."""

    def log(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    def interleave(
        self,
        bench: str,
        contenders: dict[str, RunFn],
        warmup: int | None = None,
        reps: int | None = None,
    ) -> Runs:
        warmup = self.mode.warmup if warmup is None else warmup
        reps = self.mode.reps if reps is None else reps
        runs = Runs({name: [] for name in contenders}, {})
        names = list(contenders)
        for index in range(warmup + reps):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                warm = index < warmup
                rep = Rep(index, warm, traced=warm or (warmup == 0 and index == 0), tmp=Path())
                label = "warm-up" if warm else f"rep {index + 1 - warmup}/{reps}"
                sample = self._one(bench, name, contenders[name], rep, label)
                if sample is None:
                    continue
                if rep.traced:
                    runs.counters[name] = sample
                if not warm:
                    runs.timed[name].append(sample)
        return runs

    def _one(self, bench: str, name: str, fn: RunFn, rep: Rep, label: str) -> Sample | None:
        t0 = time.monotonic()
        prefix = bench.replace("/", "-") + "-"
        with tempfile.TemporaryDirectory(prefix=prefix, dir=self.tmp_root) as tmp:
            try:
                sample = fn(Rep(rep.index, rep.warm, rep.traced, Path(tmp)))
            except Exception as exc:
                self.errors.append(f"{bench} {name} {label}: {type(exc).__name__}: {exc}")
                self.log(f"[{bench}] {name} {label}: FAILED {exc}")
                traceback.print_exc(file=sys.stderr)
                return None
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(sample.items())[:4])
        self.log(f"[{bench}] {name} {label}: {time.monotonic() - t0:.1f}s {shown}")
        return sample

    def add(
        self,
        bench: str,
        label: str,
        unit: str,
        runs: Runs | None,
        key: str,
        *,
        better: Better = "lower",
        target: Target | tuple[Target, ...] = (),
        note: str = "",
        peers: tuple[str, ...] = (),
        absent: dict[str, str] | None = None,
        counter: bool = False,
    ) -> Metric:
        """One metric from ``key`` of every contender's samples (or, with ``counter``,
        of the traced round). ``peers`` names the peers this metric expects, so the
        ones that did not run are listed with their reason; ``absent`` gives reasons
        for peers that have no equivalent of this benchmark at all."""
        targets = (target,) if isinstance(target, Target) else target
        metric = Metric(bench, label, unit, better, targets, note=note)
        if runs is not None:
            for name in runs.timed:
                if counter:
                    vals = [runs.counters[name][key]] if key in runs.counters.get(name, {}) else []
                else:
                    vals = runs.values(name, key)
                if vals:
                    metric.values[name] = [v for v in vals if not math.isnan(v)] or vals
        for peer in peers:
            if peer not in metric.values:
                venv = peer.split("-")[0]
                reason = self.not_run.get(peer) or self.not_run.get(venv)
                metric.not_run[peer] = reason or "no result (see errors)"
        metric.not_run |= {k: v for k, v in (absent or {}).items() if k not in metric.values}
        if AGENTD not in metric.values and runs is not None and AGENTD in runs.timed:
            metric.not_run[AGENTD] = "no result (see errors)"
        self.metrics.append(metric)
        return metric
