"""Budget maths, pure: windows, prices, worst cases, which limits apply, thresholds.

Nothing here reads a clock or a database: every function takes ``now`` and the numbers
it needs, so the rules are tested with explicit datetimes (a 23-hour DST day included).
``agentd.ledger`` applies them to the ledger table.

Money is USD as float; comparisons allow ``EPS`` so that 0.1 + 0.2 spent against a 0.3
limit counts as exactly full, not as over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from agentd.config import Config, PriceConfig, TaskConfig

EPS = 1e-9
THRESHOLDS = (0.5, 0.8, 1.0)
"""Alarm levels, as fractions of a window's USD limit; each fires once per window."""

Period = Literal["day", "month"]


def window_at(period: Period, now: datetime, timezone: str) -> tuple[datetime, datetime]:
    """The calendar day or month holding ``now`` in ``timezone``, as [start, end) in UTC.

    Local midnights are converted through the zone, so a DST day in Europe/Berlin is
    23 or 25 hours long, as its wall clock says.
    """
    zone = ZoneInfo(timezone)
    local = now.astimezone(zone)
    start = datetime(local.year, local.month, 1 if period == "month" else local.day)
    if period == "day":
        end = start + timedelta(days=1)
    else:
        end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1)
    return (
        start.replace(tzinfo=zone).astimezone(UTC),
        end.replace(tzinfo=zone).astimezone(UTC),
    )


def cost_usd(price: PriceConfig | None, input_tokens: int, output_tokens: int) -> float:
    """Prices are per million tokens; no price means a free (local) model."""
    if price is None:
        return 0.0
    return (input_tokens * price.input + output_tokens * price.output) / 1_000_000


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A deliberately high guess of a prompt's tokens, without a tokenizer.

    English averages about four bytes a token; counting three (plus a few per message
    for the chat framing) over-reserves a little rather than under-reserving.
    """
    total = 3
    for message in messages:
        text = str(message.get("content") or "")
        total += 4 + math.ceil(len(text.encode("utf-8")) / 3)
    return total


@dataclass(frozen=True)
class Need:
    """What one call may cost at worst: its prompt estimate plus its full output cap."""

    input_tokens: int
    output_tokens: int
    usd: float

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def worst_case(price: PriceConfig | None, prompt_tokens: int, max_tokens: int) -> Need:
    return Need(prompt_tokens, max_tokens, cost_usd(price, prompt_tokens, max_tokens))


@dataclass(frozen=True)
class Scope:
    """One limit that applies to a call: a run's, a task's window or the global window."""

    key: str
    """Stable name: ``run``, ``task:<id>:day``, ``task:<id>:month``, ``global:day``..."""
    label: str
    """For metrics and people: ``run``, ``<task>:day``, ``global:month``."""
    task_id: str | None
    period: Literal["run", "day", "month"]
    usd: float | None = None
    tokens: int | None = None
    start: datetime | None = None
    end: datetime | None = None

    @property
    def is_window(self) -> bool:
        return self.period != "run"


def task_scopes(config: Config, task: TaskConfig, now: datetime) -> list[Scope]:
    """The window limits of one task (its own day/month, in its zone)."""
    budget, task_id = task.budget.task, task.id
    zone = config.task_timezone(task)
    limits: tuple[tuple[Period, float | None], ...] = (
        ("day", budget.usd_per_day),
        ("month", budget.usd_per_month),
    )
    scopes = []
    for period, usd in limits:
        if usd is not None:
            start, end = window_at(period, now, zone)
            key, label = f"task:{task_id}:{period}", f"{task_id}:{period}"
            scopes.append(Scope(key, label, task_id, period, usd, None, start, end))
    return scopes


def global_scopes(config: Config, now: datetime) -> list[Scope]:
    limits: tuple[tuple[Period, float | None], ...] = (
        ("day", config.limits.usd_per_day),
        ("month", config.limits.usd_per_month),
    )
    scopes = []
    for period, usd in limits:
        if usd is not None:
            start, end = window_at(period, now, config.limits_timezone)
            key = f"global:{period}"
            scopes.append(Scope(key, key, None, period, usd, None, start, end))
    return scopes


def call_scopes(config: Config, task: TaskConfig, now: datetime) -> list[Scope]:
    """Every limit a call of this task must fit: run, task windows, global windows. A
    task without ``budget.run.usd`` has ``limits.max_run_usd`` (if set) as its run cap
    (one a task sets is never above it: config validation)."""
    run = task.budget.run
    run_usd = run.usd if run.usd is not None else config.limits.max_run_usd
    scopes = []
    if run_usd is not None or run.tokens is not None:
        scopes.append(Scope("run", "run", task.id, "run", run_usd, run.tokens))
    return scopes + task_scopes(config, task, now) + global_scopes(config, now)


def fits(scope: Scope, spent_usd: float, spent_tokens: int, need: Need) -> bool:
    if scope.usd is not None and spent_usd + need.usd > scope.usd + EPS:
        return False
    return not (scope.tokens is not None and spent_tokens + need.tokens > scope.tokens)


def full(scope: Scope, spent_usd: float) -> bool:
    return scope.usd is not None and spent_usd >= scope.usd - EPS


def reached(spent_usd: float, limit_usd: float) -> list[float]:
    """The alarm thresholds that ``spent_usd`` has reached."""
    if limit_usd <= 0:
        return list(THRESHOLDS)
    return [t for t in THRESHOLDS if spent_usd >= t * limit_usd - EPS]


# ---------------------------------------------------------------- cost history


@dataclass(frozen=True)
class CostHistory:
    """What a task's finished runs cost: percentiles of USD and tokens per run."""

    runs: int
    """How many finished runs the figures are of."""
    p50_usd: float
    p95_usd: float
    p50_tokens: int
    p95_tokens: int

    def usd(self, estimate: Literal["p50", "p95"]) -> float:
        return self.p50_usd if estimate == "p50" else self.p95_usd


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 1) of a non-empty sequence: the
    smallest value with at least ``q`` of them at or below it, so always one that was
    observed (p95 of 20 runs is the 19th smallest, of 3 runs the largest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) - EPS))
    return ordered[rank - 1]


def cost_history(costs: Sequence[tuple[float, int]], min_runs: int) -> CostHistory | None:
    """p50 and p95 of ``costs`` ((USD, tokens) of each finished run, any order), or
    None with fewer than ``min_runs`` of them: too little history to predict from."""
    if not costs or len(costs) < min_runs:
        return None
    usd = [c[0] for c in costs]
    tokens = [float(c[1]) for c in costs]
    return CostHistory(
        len(costs),
        percentile(usd, 0.5),
        percentile(usd, 0.95),
        int(percentile(tokens, 0.5)),
        int(percentile(tokens, 0.95)),
    )


# ---------------------------------------------------------------- admission

OnBudget = Literal["defer", "skip", "run"]


@dataclass(frozen=True)
class Verdict:
    """What cost-aware admission decided about one fire, and why (the ``admission``
    event's data). ``not_before`` is set for ``defer`` alone."""

    decision: Literal["run", "defer", "skip"]
    reason: str
    predicted_usd: float | None = None
    scope: str | None = None
    """The window that does not fit (the one that frees it last, for ``defer``)."""
    remaining_usd: float | None = None
    """What that window has left, after the fires admitted before this one in its batch."""
    not_before: datetime | None = None


def admit(
    on_budget: OnBudget,
    predicted_usd: float | None,
    windows: Sequence[tuple[Scope, float]],
    ahead: int = 0,
    *,
    pending_usd: float = 0.0,
    catchup: bool = False,
) -> Verdict:
    """Whether a fire predicted to cost ``predicted_usd`` fits every window, with what
    each has spent (``windows``: window scopes with a USD limit, and their spend so far,
    calls in flight included), after ``pending_usd`` (what the task's runs queued or
    running already may still cost) and ``ahead`` fires admitted before it in the same
    batch at the same prediction (a catch-up's earlier occurrences).

    Invariants: no prediction (None: too little history) or a free prediction always
    runs; a fire that fits runs; ``on_budget=run`` always runs (it only explains). A fire
    that does not fit is skipped (``skip``), or deferred (``defer``) to the end of the
    latest window that does not fit (where each starts again empty), unless the
    prediction exceeds that window's whole limit (then no later window helps: skipped) or
    the fire is a ``catchup`` of occurrences due already (a catch-up, a backfill: replayed
    together at the start of the next window they would burst; skipped).
    """
    if predicted_usd is None:
        return Verdict("run", "too little history to predict")
    left: list[tuple[Scope, float]] = [
        (scope, scope.usd - spent_usd - pending_usd - ahead * predicted_usd)
        for scope, spent_usd in windows
        if scope.usd is not None
    ]
    blocking = [(s, r) for s, r in left if predicted_usd > EPS and predicted_usd > r + EPS]
    if not blocking:
        if not left:
            return Verdict("run", "fits: no USD window", predicted_usd)
        tightest, rest = min(left, key=lambda b: b[1])
        return Verdict("run", "fits", predicted_usd, tightest.label, round(max(0.0, rest), 6))
    scope, remaining = max(blocking, key=lambda b: b[0].end or datetime.min.replace(tzinfo=UTC))
    rest = round(max(0.0, remaining), 6)
    why = f"predicted {predicted_usd:.6f} USD, {scope.label} has {rest:.6f} left"
    if on_budget == "run":
        return Verdict("run", f"{why}; on_budget=run", predicted_usd, scope.label, rest)
    too_big = [s.label for s, _ in blocking if s.usd is not None and predicted_usd > s.usd + EPS]
    if on_budget == "skip" or catchup or too_big:
        if too_big:
            why += f"; more than the whole limit of {too_big[0]}"
        elif catchup and on_budget == "defer":
            why += "; a catch-up is skipped, not deferred"
        return Verdict("skip", why, predicted_usd, scope.label, rest)
    return Verdict("defer", why, predicted_usd, scope.label, rest, scope.end)


# ---------------------------------------------------------------- burn rate

BURN_ALARM = 0.0
"""The ``budget_alarms`` threshold a burn-rate alarm is recorded under (below every one
of ``THRESHOLDS``, so it never counts as full): once per (scope, window)."""
BURN_MIN_ELAPSED = 0.05
"""A window is projected only once this share of it has passed (a call in its first
minute would project any window exhausted)."""
BURN_MARGIN = 0.1
"""Alarm when the projected exhaustion comes more than this share of the window before
its end."""


def exhaustion_eta(
    spent_usd: float, start: datetime, end: datetime, now: datetime, limit_usd: float
) -> datetime | None:
    """When the window [start, end) runs out at its average rate so far (spend / elapsed
    time, in real seconds: a 23-hour DST day is 23 hours), or None when nothing is
    spent, ``now`` is outside it, or the projection falls after its end. A window already
    full gives ``now``."""
    elapsed = (now - start).total_seconds()
    if not start < now < end or spent_usd <= EPS:
        return None
    if spent_usd >= limit_usd - EPS:
        return now
    eta = now + timedelta(seconds=(limit_usd - spent_usd) * elapsed / spent_usd)
    return eta if eta < end else None


def burn_alarm(
    spent_usd: float, start: datetime, end: datetime, now: datetime, limit_usd: float
) -> datetime | None:
    """The projected exhaustion (``exhaustion_eta``) when it warrants a ``budget_burn``
    alarm, else None: at least ``BURN_MIN_ELAPSED`` of the window has passed, the window
    is not full yet (the 100 % alarm says that), and the projection is more than
    ``BURN_MARGIN`` of the window before its end."""
    length = (end - start).total_seconds()
    if length <= 0 or (now - start).total_seconds() < BURN_MIN_ELAPSED * length:
        return None
    if spent_usd >= limit_usd - EPS:
        return None
    eta = exhaustion_eta(spent_usd, start, end, now, limit_usd)
    if eta is None or (end - eta).total_seconds() <= BURN_MARGIN * length:
        return None
    return eta
