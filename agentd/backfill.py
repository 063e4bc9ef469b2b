"""A schedule's occurrences over a range, and the shortest gap between two of them.

Pure functions over ``agentd.schedule`` (no state, no clock, no I/O):

- ``occurrences``: the fire instants of a task's schedule in ``[start, end)``, exactly
  the instants the scheduler fires (jitter included, ``next_fire`` one after the other),
  so a backfill keys each one as a real fire of it would be (``task@instant``).
- ``shortest_gap_s``: the smallest time between two fires of a schedule, DST included,
  for ``limits.min_interval``.
"""

from __future__ import annotations

import functools
import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from agentd.schedule import Cron, ScheduleSpec, next_fire, parse_cron

__all__ = ["MAX_BACKFILL", "TooManyOccurrences", "occurrences", "shortest_gap_s"]

MAX_BACKFILL = 1000
"""The most occurrences one backfill enqueues (a range with more is refused, not cut)."""

_WINDOW_DAYS = 800
"""The representative window ``shortest_gap_s`` looks at: over two years, so every
weekday/month combination, a 29 February and each DST transition of the zone's current
rules are in it."""


class TooManyOccurrences(ValueError):
    """The range holds more than ``limit`` occurrences; ``count`` is ``limit + 1`` (the
    count is not finished: the range is refused as soon as it is known to be too long)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} occurrences in the range (at most {limit})")
        self.limit = limit


def occurrences(
    spec: ScheduleSpec, task_id: str, start: datetime, end: datetime, limit: int = MAX_BACKFILL
) -> list[datetime]:
    """The fire instants (UTC, jittered as the scheduler fires them) in ``[start, end)``,
    in order. Raises ``TooManyOccurrences`` past ``limit``, ``ValueError`` for a naive or
    reversed range. A manual schedule has none; a once schedule its one instant if it is
    in the range; ``start_at``/``end_at`` bound them as they bound real fires."""
    for name, value in (("start", start), ("end", end)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name} must have a UTC offset")
    if end <= start:
        raise ValueError("the range is empty: 'to' must be after 'from'")
    found: list[datetime] = []
    current = start.astimezone(UTC) - timedelta(microseconds=1)  # strictly after: at start
    while True:
        fire = next_fire(spec, task_id, current)
        if fire is None or fire >= end:
            return found
        if len(found) == limit:
            raise TooManyOccurrences(limit)
        found.append(fire)
        current = fire


def _day_matches(cron: Cron, day: date) -> bool:
    if day.month not in cron.months:
        return False
    dom_ok = day.day in cron.days
    dow_ok = (day.weekday() + 1) % 7 in cron.weekdays  # cron: 0 = Sunday
    if cron.dom_restricted and cron.dow_restricted:
        return dom_ok or dow_ok
    return dom_ok and dow_ok


def _wall_gap_min(cron: Cron, first: date) -> float:
    """Minutes between the two closest matching wall times in the window (no DST): within
    a day, or from one matching day's last time to the next matching day's first."""
    times = sorted(h * 60 + m for h in cron.hours for m in cron.minutes)
    gaps: list[float] = [b - a for a, b in itertools.pairwise(times)]
    days = [
        d for d in (first + timedelta(days=i) for i in range(_WINDOW_DAYS)) if _day_matches(cron, d)
    ]
    if len(days) >= 2:
        step = min((b - a).days for a, b in itertools.pairwise(days))
        gaps.append(step * 1440 - (times[-1] - times[0]))
    return min(gaps, default=float("inf"))


def shortest_gap_s(spec: ScheduleSpec, year: int | None = None, floor: float = 0.0) -> float | None:
    """Seconds between the two closest fires of ``spec``, less its jitter (a fire may come
    up to ``jitter`` late, so two may be that much closer), or None for a schedule that
    does not repeat (once, manual).

    An interval: ``every``. A cron: the closest two matching wall times over a window of
    ``_WINDOW_DAYS`` from 1 January of ``year`` (default: the current year), then, around
    each DST transition in that window, the real fires one by one (a spring-forward
    collapses skipped times onto the transition; a gap that spans it is an hour short).
    Cheap for any cron: the one-by-one walk covers a few days per transition, and starts
    only one wall gap (plus a day) before it, enough to hold the fire before the
    transition of any pair that DST could bring under the wall gap. With ``floor``, a
    wall gap already under it is the answer (the DST walk could only make it smaller)."""
    jitter = spec.jitter_s
    if spec.kind == "interval":
        assert spec.every_s is not None
        return max(0.0, spec.every_s - jitter)
    if spec.kind != "cron":
        return None
    assert spec.cron is not None
    gap = _cron_gap(spec.cron, spec.timezone, year or datetime.now(UTC).year, floor + jitter)
    return max(0.0, gap - jitter)


@functools.lru_cache(maxsize=1024)
def _cron_gap(expr: str, zone: str, year: int, floor: float) -> float:
    """``shortest_gap_s`` of a cron without jitter (cached: many tasks share a cron, and
    a config is validated again at each reload)."""
    cron = parse_cron(expr)
    tz = ZoneInfo(zone)
    first = date(year, 1, 1)
    wall = _wall_gap_min(cron, first) * 60
    nominal = ScheduleSpec(kind="cron", cron=expr, timezone=zone)
    best = wall
    if wall < floor:
        return wall
    for i in range(_WINDOW_DAYS):
        day = first + timedelta(days=i)
        start = datetime(day.year, day.month, day.day, tzinfo=tz)
        after = start + timedelta(days=1)
        if start.utcoffset() == after.utcoffset():
            continue
        # A transition within this day: walk the real fires around it.
        reach = timedelta(seconds=min(wall, 400 * 86400.0), hours=2)
        current: datetime | None = start.astimezone(UTC) - reach
        stop = after.astimezone(UTC) + timedelta(hours=2)
        previous: datetime | None = None
        while current is not None and current < stop:
            current = next_fire(nominal, "", current)
            if current is not None and previous is not None:
                best = min(best, (current - previous).total_seconds())
            previous = current
    return best
