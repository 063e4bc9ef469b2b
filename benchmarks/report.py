"""The results as a table (terminal and Markdown) and as JSON, from the same metrics.

For each metric: every contender's median and min-max over the timed repetitions, the
ratio agentd/contender (with which way is better), the target and whether agentd's
median meets it.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.model import AGENTD, Metric, Stats

TITLES = {
    "C": "Calibration: raw SQLite on this machine",
    "B1": "Start lateness of runs due at the same instant",
    "B2": "Per-second timer lateness beside idle schedules",
    "B3": "Durable throughput, trivial Python runs",
    "B4": "Shell-task throughput",
    "B5": "Registering tasks: cold start and SIGHUP reload",
    "B6": "Resident memory",
    "B7": "Idle cost",
    "B8": "kill -9 mid-burst, restart and reconcile",
    "B9": "SIGTERM to exit",
    "B10": "Probe and /metrics latency",
    "B11": "Agent loop: 3-call tool-using runs against a 200 ms provider, and its floor",
    "PG-C": "Calibration: PostgreSQL at full durability on this machine",
    "PG-B3": "Durable throughput on PostgreSQL, 1-3 agentd nodes beside Procrastinate and DBOS",
    "PG-B1": "Start lateness on PostgreSQL, 1-3 agentd nodes beside Procrastinate and DBOS",
}
ORDER = list(TITLES)
HEADER = ["metric", "contender", "median", "min-max", "agentd / it", "target", "agentd"]


def fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1 or size == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratio(metric: Metric, agentd: Stats | None, other: Stats) -> str:
    if agentd is None or not other.median or math.isnan(agentd.median * other.median):
        return ""
    r = agentd.median / other.median
    if r == 0 and metric.better == "lower":
        return "(better)"
    if metric.better == "none" or math.isclose(r, 1.0, rel_tol=0.02):
        return f"{r:.3g}x"
    good = r < 1 if metric.better == "lower" else r > 1
    return f"{r:.3g}x ({'better' if good else 'worse'})"


def rows(metric: Metric) -> list[list[str]]:
    stats = metric.stats()
    agentd = stats.get(AGENTD)
    names = sorted(stats, key=lambda n: (n != AGENTD, n))
    out = []
    for i, name in enumerate(names):
        s = stats[name]
        out.append(
            [
                f"{metric.label} [{metric.unit}]" if i == 0 else "",
                name,
                fmt(s.median),
                f"{fmt(s.lo)}-{fmt(s.hi)}" if s.n > 1 else f"(n={s.n})",
                "" if name == AGENTD else ratio(metric, agentd, s),
                metric.target_text if i == 0 else "",
                metric.status() if i == 0 else "",
            ]
        )
    for name, why in metric.not_run.items():
        label = f"{metric.label} [{metric.unit}]" if not out else ""
        out.append([label, name, "not run", why, "", metric.target_text if not out else "", ""])
    return out


def by_bench(metrics: list[Metric]) -> list[tuple[str, list[Metric]]]:
    groups: dict[str, list[Metric]] = {}
    for m in metrics:
        groups.setdefault(m.bench, []).append(m)
    return [(b, groups[b]) for b in sorted(groups, key=lambda b: ORDER.index(b))]


def text(metrics: list[Metric]) -> str:
    lines: list[str] = []
    for bench, group in by_bench(metrics):
        table = [HEADER] + [r for m in group for r in rows(m)]
        widths = [min(max(len(r[i]) for r in table), 72) for i in range(len(HEADER))]
        lines += ["", f"== {bench}: {TITLES[bench]}"]
        for r in table:
            lines.append("  ".join(cell[:72].ljust(w) for cell, w in zip(r, widths, strict=True)))
    return "\n".join(lines).rstrip() + "\n"


def summary(metrics: list[Metric]) -> str:
    judged = [m for m in metrics if m.status() in ("met", "MISSED")]
    missed = [f"{m.bench} {m.label}" for m in judged if m.status() == "MISSED"]
    text = f"{len(judged) - len(missed)} of {len(judged)} met."
    return text + (" Missed: " + "; ".join(missed) + "." if missed else "")


def markdown(metrics: list[Metric], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Mode `{meta['mode']}`, {meta['reps']} timed repetition(s) after {meta['warmup']} "
        f"warm-up, run {meta['started']} to {meta['finished']} ({meta['duration_s'] / 60:.0f} "
        f"min) on commit `{meta['commit']}`.",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux "
        f"{m['kernel']}, Python {meta['python']}; load average at start {m['loadavg']}, at "
        f"end {meta['loadavg_end']}. Peers: {meta['peer_versions'] or 'none'}.",
        "",
        "Figures are medians over the timed repetitions with min-max; `agentd / it` is "
        "agentd's median divided by that contender's. See `benchmarks/README.md`.",
        "",
        "The machine is shared with other engineers' test runs, so figures are noisy: "
        "compare contenders within this run, not with another run's figures.",
        "",
        "Targets: " + summary(metrics),
    ]
    for bench, group in by_bench(metrics):
        lines += [
            "",
            f"## {bench}: {TITLES[bench]}",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "---|" * len(HEADER),
        ]
        for m in group:
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows(m)]
        notes = [f"- {m.label}: {m.note}" for m in group if m.note]
        lines += ["", *notes] if notes else []
    if meta.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in meta["errors"]]
    return "\n".join(lines) + "\n"
