"""Time as a parameter: loops ask a clock instead of the system, so tests can step them."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time, for schedules and records."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards, for durations and deadlines."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that only moves when told to; for stepping loops in tests."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds


def to_iso(dt: datetime) -> str:
    """Fixed-width UTC text, so that string order in SQLite is time order. (isoformat
    pads years before 1000 to four digits, which strftime's %Y does not, and is faster:
    this runs several times per run.)"""
    return dt.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Backoff:
    """Exponential backoff between retries of something that failed, on a monotonic
    clock (``now_mono`` from ``Clock.monotonic``): ``first_s``, doubling to ``max_s``."""

    def __init__(self, first_s: float = 0.5, max_s: float = 10.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s
        self.until: float | None = None
        """When the wait after the last failure ends; None after a success."""

    def failed(self, now_mono: float) -> None:
        self.until = now_mono + self.delay_s
        self.delay_s = min(self.delay_s * 2, self.max_s)

    def ok(self) -> None:
        self.delay_s, self.until = self.first_s, None

    def waiting(self, now_mono: float) -> bool:
        return self.until is not None and now_mono < self.until

    def remaining_s(self, now_mono: float) -> float | None:
        """Seconds until a retry is due (0 when it is), or None when nothing failed."""
        return None if self.until is None else max(0.0, self.until - now_mono)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), never < 0."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def median(values: list[float]) -> float | None:
    """The middle of ``values`` (the mean of the two middle ones for an even count), or
    None for none."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def progress_eta(
    now: datetime,
    elapsed_s: float,
    done: int | None,
    total: int | None,
    typical_s: float | None,
) -> datetime | None:
    """When a run that has done ``done`` of ``total`` in ``elapsed_s`` seconds should end.

    Two estimates of the time left, blended by the fraction done: the run's own rate
    (``(total - done) * elapsed / done``: needs a total and some work done) and the
    task's history (``typical_s``, the median duration of its recent successes, minus the
    time spent: never below zero). Early on the history weighs most, near the end the
    run's own rate. With only one estimate that one; with neither None. A run at or past
    its total ends ``now``. Invariants: never before ``now``; pure (no clock, no DB).
    """
    elapsed_s = max(0.0, elapsed_s)
    by_rate: float | None = None
    fraction = 0.0
    if total is not None and total > 0 and done is not None and done >= 0:
        if done >= total:
            return now
        fraction = done / total
        if done > 0 and elapsed_s > 0:
            by_rate = (total - done) * elapsed_s / done
    by_history = max(0.0, typical_s - elapsed_s) if typical_s is not None else None
    if by_rate is None and by_history is None:
        return None
    if by_rate is None:
        left = by_history
    elif by_history is None:
        left = by_rate
    else:
        left = fraction * by_rate + (1 - fraction) * by_history
    assert left is not None
    return now + timedelta(seconds=left)
