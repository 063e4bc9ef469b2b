"""Budget maths, pure: windows, prices, worst cases, which limits apply, thresholds.

Nothing here reads a clock or a database: every function takes ``now`` and the numbers
it needs, so the rules are tested with explicit datetimes (a 23-hour DST day included).
``agentd.ledger`` applies them to the ledger table.

Money is USD as float; comparisons allow ``EPS`` so that 0.1 + 0.2 spent against a 0.3
limit counts as exactly full, not as over.
"""

from __future__ import annotations

import math
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
