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
