"""Next-fire-time maths for agentd schedules.

This module is a leaf: pure functions over datetimes, no I/O, no clock reads and no imports
from the rest of agentd, so every rule below can be tested with explicit instants.

Instants and wall times
-----------------------
Every public function takes and returns *aware* datetimes and returns them in UTC. Internally
the arithmetic is done on naive UTC datetimes, because Python compares and subtracts two
aware datetimes that share a ``tzinfo`` by their wall clock and ignores ``fold``, which is
wrong exactly around DST transitions. Cron fields describe *local wall times* in the
schedule's IANA time zone; intervals are plain elapsed time and never look at a time zone.

Cron day matching
-----------------
As in Vixie cron, a field counts as "restricted" unless its text starts with ``*``. When both
day-of-month and day-of-week are restricted a day matches if *either* matches
(``0 0 13 * 5`` = every 13th and every Friday); otherwise both must match. ``*/2`` in the
day-of-month field is therefore unrestricted for this purpose, again like Vixie cron.

DST rules
---------
A wall time can exist once, not at all (spring-forward gap) or twice (fall-back repeat):

* **Gap.** A matching wall time that does not exist fires once, at the first real instant
  after the gap (the transition itself). Europe/Berlin 2024-03-31 ``30 2 * * *`` fires at
  03:00 CEST = 01:00Z. All non-existent wall times of one gap collapse onto that single
  instant, which fires once, also when it coincides with a regular fire (03:00 itself).
  Rationale: a daily job must not silently skip a day, and must not run several times.
  Exception, as in Vixie cron: when the hour field is a wildcard the job means "every
  hour", and the missing wall times are simply skipped (``30 * * * *`` fires at 01:30 CET
  then 03:30 CEST, one real hour apart, not also at 03:00).
* **Repeat.** A matching wall time that occurs twice fires once, at its first occurrence,
  so a daily 02:30 job runs once on the fall-back day (Berlin 2024-10-27: 00:30Z only).
  Exception: when the hour field is a wildcard (``*`` or ``*/n``) the wall time fires at
  both occurrences, because such a job means "every hour", and skipping the repeated hour
  would leave a real hour without a run (``30 * * * *`` fires at 00:30Z and 01:30Z).

These rules hold for any ``after``, including one inside the repeated hour (either pass).

Impossible expressions and the end of the calendar
--------------------------------------------------
An expression whose days never occur (``0 0 31 2 *``) is a ``CronError`` at parse time.
Any other one fires within every 400 years, the period of the Gregorian calendar, so
the search never looks further; the rarest need 11 years and more (``0 0 */31 2 1``, a
February 1st on a Monday: 2027, then 2038). A schedule whose next fire would fall after
9999-12-31, where ``datetime`` ends, has no next fire: ``next_fire`` returns None.

Jitter
------
A schedule's *nominal* times come from the cron expression / interval / ``at``. The *actual*
fire instant adds a deterministic per-task, per-fire offset in ``[0, jitter)`` so that many
tasks sharing a schedule do not stampede, while restarts recompute the same instants.
``next_fire`` returns the earliest actual instant strictly after ``after``; with jitter larger
than the schedule's spacing actual instants can reorder, so several nominal times are
considered and the earliest actual one wins.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "Cron",
    "CronError",
    "CronNeverFires",
    "ScheduleSpec",
    "jitter_offset",
    "next_cron_fire",
    "next_fire",
    "next_fires",
    "next_interval_fire",
    "parse_cron",
    "parse_duration",
    "shortest_gap_s",
]

_MINUTE = timedelta(minutes=1)
_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_UTC = datetime.min.replace(tzinfo=UTC)
# The Gregorian calendar repeats every 400 years, weekdays included: an expression that
# matches any day matches one in every 400-year window. Impossible ones (no such day in
# any month named) are rejected by parse_cron and never searched for.
_MAX_SEARCH_YEARS = 400
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February in a leap year

_MONTH_NAMES = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_WEEKDAY_NAMES = {
    name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_NUMBER = re.compile(r"[0-9]+")
_MONTH_ABBR = tuple(name.capitalize() for name in _MONTH_NAMES)


class CronError(ValueError):
    """A cron expression that cannot be parsed, or that never fires.

    Subclasses ValueError so config validation can treat it like any other bad value.
    """


class CronNeverFires(CronError):
    """A well-formed expression whose days occur in none of its months (``0 0 31 2 *``)."""


class _CalendarEnd(CronError):
    """No fire time before ``datetime`` ends (9999-12-31): the schedule is over."""


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    lo: int
    hi: int  # highest value accepted on input
    star_hi: int  # highest value '*' expands to (day-of-week accepts 7 but '*' stops at 6)
    names: dict[str, int]


_FIELDS = (
    _FieldSpec("minute", 0, 59, 59, {}),
    _FieldSpec("hour", 0, 23, 23, {}),
    _FieldSpec("day-of-month", 1, 31, 31, {}),
    _FieldSpec("month", 1, 12, 12, _MONTH_NAMES),
    _FieldSpec("day-of-week", 0, 7, 6, _WEEKDAY_NAMES),
)


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression.

    Sets rather than text, so matching is a membership test; the sorted tuples are derived
    once here because the fire-time search needs "next value >= x" in every step.
    """

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    dom_restricted: bool
    dow_restricted: bool
    hour_wildcard: bool
    _minute_seq: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _hour_seq: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _month_seq: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_minute_seq", tuple(sorted(self.minutes)))
        object.__setattr__(self, "_hour_seq", tuple(sorted(self.hours)))
        object.__setattr__(self, "_month_seq", tuple(sorted(self.months)))


def _field_error(spec: _FieldSpec, text: str, problem: str) -> CronError:
    return CronError(f"{spec.name} field {text!r}: {problem}")


def _parse_value(spec: _FieldSpec, text: str, token: str) -> int:
    if _NUMBER.fullmatch(token):
        value = int(token)
    elif token.lower() in spec.names:
        value = spec.names[token.lower()]
    else:
        if spec.names:
            first, *_, last = spec.names
            expected = f"a number {spec.lo}-{spec.hi} or a name {first}..{last}"
        else:
            expected = f"a number {spec.lo}-{spec.hi}"
        raise _field_error(spec, text, f"invalid value {token!r} (expected {expected})")
    if not spec.lo <= value <= spec.hi:
        raise _field_error(spec, text, f"value {value} out of range {spec.lo}-{spec.hi}")
    return value


def _parse_field(spec: _FieldSpec, text: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise _field_error(spec, text, "empty list element")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            span = spec.star_hi - spec.lo + 1
            if not _NUMBER.fullmatch(step_text) or not 1 <= int(step_text) <= span:
                raise _field_error(
                    spec, text, f"invalid step {step_text!r} (expected an integer 1-{span})"
                )
            step = int(step_text)
        if base == "*":
            start, stop = spec.lo, spec.star_hi
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _parse_value(spec, text, first)
            stop = _parse_value(spec, text, last)
            if start > stop:
                raise _field_error(spec, text, f"range {base!r} is reversed (start > end)")
        else:
            start = _parse_value(spec, text, base)
            # "a/n" means "from a to the end of the field, every n" (cronie/Vixie extension).
            stop = spec.star_hi if slash else start
        values.update(range(start, stop + 1, step))
    if spec.name == "day-of-week" and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


@functools.lru_cache(maxsize=4096)
def parse_cron(expr: str) -> Cron:
    """Parse a cron expression, failing loudly so mistakes surface at config load.

    Memoized: a ``Cron`` is immutable, and a config of thousands of tasks repeats a
    few expressions (validation and the scheduler each parse every task's)."""
    text = expr.strip()
    if not text:
        raise CronError("empty cron expression")
    if text.startswith("@"):
        expanded = _MACROS.get(text.lower())
        if expanded is None:
            raise CronError(
                f"unknown cron macro {text!r} (expected one of {', '.join(sorted(_MACROS))})"
            )
        text = expanded
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise CronError(
            f"cron expression {expr!r} has {len(parts)} field(s); expected 5 "
            "(minute hour day-of-month month day-of-week)"
        )
    minutes, hours, days, months, weekdays = (
        _parse_field(spec, part) for spec, part in zip(_FIELDS, parts, strict=True)
    )
    # Only a restricted day-of-month with an unrestricted day-of-week can miss every day:
    # a restricted weekday (alone or OR-ed) occurs in every month, and an unrestricted
    # day-of-month ('*', '*/n') includes the 1st, which falls on every weekday some year.
    if (
        not parts[2].startswith("*")
        and parts[4].startswith("*")
        and min(days) > max(_MONTH_DAYS[m - 1] for m in months)
    ):
        names = ", ".join(_MONTH_ABBR[m - 1] for m in sorted(months))
        raise CronNeverFires(
            f"never fires: {expr!r} names day-of-month {parts[2]!r}, a day that no month "
            f"it names ({names}) has"
        )
    return Cron(
        expr=expr,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=weekdays,
        dom_restricted=not parts[2].startswith("*"),
        dow_restricted=not parts[4].startswith("*"),
        hour_wildcard=parts[1].startswith("*"),
    )


def _days_in_month(year: int, month: int) -> int:
    if month == 12:
        return 31
    return (date(year, month + 1, 1) - date(year, month, 1)).days


def _first_day(cron: Cron, year: int, month: int, day: int) -> int | None:
    """First matching day >= ``day`` in the month, or None; at most 31 cheap checks."""
    last = _days_in_month(year, month)
    # Cron weekday numbering: 0 = Sunday; date.weekday(): 0 = Monday.
    weekday = (date(year, month, day).weekday() + 1) % 7 if day <= last else 0
    either = cron.dom_restricted and cron.dow_restricted
    for d in range(day, last + 1):
        dom_ok = d in cron.days
        dow_ok = weekday in cron.weekdays
        if (dom_ok or dow_ok) if either else (dom_ok and dow_ok):
            return d
        weekday = (weekday + 1) % 7
    return None


def _next_at_or_after(seq: tuple[int, ...], value: int) -> int | None:
    i = bisect_left(seq, value)
    return seq[i] if i < len(seq) else None


def _next_wall_match(cron: Cron, start: datetime) -> datetime:
    """Smallest matching naive wall time >= ``start`` (a whole minute).

    Jumps field by field (month, day, hour, minute) instead of stepping minutes, so a call
    costs a handful of operations even for yearly expressions.
    """
    year, month, day, hour, minute = start.year, start.month, start.day, start.hour, start.minute
    end_year = min(year + _MAX_SEARCH_YEARS, 9999)
    while year <= end_year:
        next_month = _next_at_or_after(cron._month_seq, month)
        if next_month is None:
            year, month, day, hour, minute = year + 1, cron._month_seq[0], 1, 0, 0
            continue
        if next_month != month:
            month, day, hour, minute = next_month, 1, 0, 0
        next_day = _first_day(cron, year, month, day)
        if next_day is None:
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            day, hour, minute = 1, 0, 0
            continue
        if next_day != day:
            day, hour, minute = next_day, 0, 0
        next_hour = _next_at_or_after(cron._hour_seq, hour)
        if next_hour is None:
            day, hour, minute = day + 1, 0, 0  # _first_day handles running past month end
            continue
        if next_hour != hour:
            hour, minute = next_hour, 0
        next_minute = _next_at_or_after(cron._minute_seq, minute)
        if next_minute is None:
            hour, minute = hour + 1, 0  # hour 24 finds no next hour and moves to next day
            continue
        return datetime(year, month, day, hour, next_minute)
    if end_year == 9999:
        raise _CalendarEnd(f"cron expression {cron.expr!r} has no fire time before 10000-01-01")
    raise CronError(
        f"cron expression {cron.expr!r} has no fire time within {_MAX_SEARCH_YEARS} years "
        f"after {start.isoformat()}"
    )


def _offset(value: datetime) -> timedelta:
    offset = value.utcoffset()
    if offset is None:  # only for tzinfo objects that decline to answer
        raise ValueError(f"cannot determine UTC offset of {value!r}")
    return offset


def _gap_end(before: datetime, after: datetime, tz: ZoneInfo) -> datetime:
    """Transition instant inside (before, after] (naive UTC), found by bisection.

    zoneinfo does not expose its transition table, but a gap is rare and at most hours wide,
    so ~15 offset look-ups per gap are cheap.
    """
    target = _offset(after.replace(tzinfo=UTC).astimezone(tz))
    lo, hi = before, after
    while hi - lo > _SECOND:
        mid = lo + (hi - lo) // 2
        mid = mid.replace(microsecond=0)
        if _offset(mid.replace(tzinfo=UTC).astimezone(tz)) == target:
            hi = mid
        else:
            lo = mid
    return hi


def _wall_instants(
    wall: datetime, tz: ZoneInfo, skip_gap: bool = False
) -> tuple[datetime | None, datetime | None]:
    """Naive-UTC instants for a wall time: (first, second-if-repeated), gaps collapsed
    (or, with ``skip_gap``, no instant at all for a wall time in a gap)."""
    off0 = _offset(wall.replace(tzinfo=tz, fold=0))
    off1 = _offset(wall.replace(tzinfo=tz, fold=1))
    if off0 == off1:
        return wall - off0, None
    if off0 > off1:  # fall back: fold=0 is the first pass (larger, pre-transition offset)
        return wall - off0, wall - off1
    # Spring forward (PEP 495: in a gap fold=0 uses the pre-transition offset, landing after
    # the transition, and fold=1 lands before it).
    if skip_gap:
        return None, None
    return _gap_end(wall - off1, wall - off0, tz), None


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def next_cron_fire(cron: Cron, tz: ZoneInfo, after: datetime) -> datetime:
    """First fire instant strictly after ``after``, applying the module's DST rules.

    The fire instants are the union of two sequences that are each monotonic in wall time:
    the first occurrence of every matching wall time (gaps collapsed to the transition), and,
    for wildcard-hour expressions only, the second occurrence of repeated wall times. The
    second sequence can only beat the first when ``after`` itself lies in a repeated hour,
    so it is only searched then.
    """
    _require_aware(after, "after")
    try:
        after_utc = _naive_utc(after)
        # fold=0 explicitly: astimezone() sets fold=1 on the second pass of a repeated hour,
        # and the offsets below must be looked up for both passes independently of it.
        wall = after.astimezone(tz).replace(tzinfo=None, fold=0)
        candidate = wall.replace(second=0, microsecond=0)
        while True:
            candidate = _next_wall_match(cron, candidate)
            first, _ = _wall_instants(candidate, tz, skip_gap=cron.hour_wildcard)
            if first is not None and first > after_utc:
                best = first
                break
            # Only loops more than once inside a repeated hour or a skipped gap.
            candidate += _MINUTE

        if cron.hour_wildcard:
            pre = _offset(wall.replace(tzinfo=tz, fold=0))
            post = _offset(wall.replace(tzinfo=tz, fold=1))
            if pre > post:  # `after` is inside a repeated hour, first or second pass
                second = _second_pass_fire(cron, tz, after_utc, wall, post, best)
                if second is not None:
                    best = second
    except OverflowError as exc:
        raise _CalendarEnd(
            f"cron expression {cron.expr!r} has no fire time within the datetime range"
        ) from exc
    return best.replace(tzinfo=UTC)


def _second_pass_fire(
    cron: Cron, tz: ZoneInfo, after_utc: datetime, wall: datetime, post: timedelta, best: datetime
) -> datetime | None:
    """Earliest second-pass occurrence in (after, best), if any.

    Wall times whose second pass lies after ``after`` are those >= after + post-transition
    offset; we stop at the first unique wall time past ``wall`` (the repeat is over) or once
    candidates can no longer beat ``best``.
    """
    candidate = (after_utc + post).replace(second=0, microsecond=0)
    while True:
        try:
            candidate = _next_wall_match(cron, candidate)
        except _CalendarEnd:
            return None
        if candidate - post >= best:
            return None
        _, second = _wall_instants(candidate, tz)
        if second is None:
            if candidate > wall:
                return None
        elif second > after_utc:
            return second
        candidate += _MINUTE


def next_interval_fire(every: timedelta, anchor: datetime, after: datetime) -> datetime:
    """First ``anchor + k*every`` (k >= 0) strictly after ``after``, in UTC.

    Anchoring (rather than "last run + every") keeps fire times stable across restarts and
    lets many tasks with the same interval line up on predictable boundaries.
    """
    if every <= timedelta(0):
        raise ValueError(f"interval must be positive, got {every}")
    _require_aware(anchor, "anchor")
    _require_aware(after, "after")
    anchor_utc = anchor.astimezone(UTC)
    after_utc = after.astimezone(UTC)
    if after_utc < anchor_utc:
        return anchor_utc
    k = (after_utc - anchor_utc) // every + 1
    return anchor_utc + k * every


def jitter_offset(task_id: str, fire_time: datetime, jitter: timedelta) -> timedelta:
    """Deterministic offset in [0, jitter), whole milliseconds.

    Hash-based rather than random so a restarted daemon computes the same actual fire time
    and does not run a job twice or skip it; keyed by the nominal time so consecutive fires
    of one task spread out too.
    """
    if jitter < timedelta(0):
        raise ValueError(f"jitter must not be negative, got {jitter}")
    _require_aware(fire_time, "fire_time")
    slots = -(-jitter // timedelta(milliseconds=1))  # ceil: whole ms values below jitter
    if slots <= 0:
        return timedelta(0)
    key = f"{task_id}@{fire_time.astimezone(UTC).isoformat()}".encode()
    digest = int.from_bytes(hashlib.sha256(key).digest(), "big")
    return timedelta(milliseconds=digest % slots)


@dataclass(frozen=True)
class ScheduleSpec:
    """When a task should run; validated on construction so bad config fails at load time."""

    kind: Literal["cron", "interval", "once", "manual"]
    cron: str | None = None
    timezone: str = "UTC"
    every_s: float | None = None
    at: datetime | None = None
    jitter_s: float = 0.0
    start_at: datetime | None = None
    end_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("cron", "interval", "once", "manual"):
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        if self.kind == "cron":
            if self.cron is None:
                raise ValueError("cron schedule needs a cron expression")
            parse_cron(self.cron)
        if self.kind == "interval" and (
            self.every_s is None
            or not math.isfinite(self.every_s)
            or timedelta(seconds=self.every_s) <= timedelta(0)
        ):
            raise ValueError(f"interval schedule needs every_s > 0, got {self.every_s!r}")
        if self.kind == "once" and self.at is None:
            raise ValueError("once schedule needs 'at'")
        if not math.isfinite(self.jitter_s) or self.jitter_s < 0:
            raise ValueError(f"jitter_s must be a finite number >= 0, got {self.jitter_s!r}")
        for name in ("at", "start_at", "end_at"):
            value = getattr(self, name)
            if value is not None:
                _require_aware(value, name)
        _zone(self.timezone)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)  # ZoneInfo keeps its own cache of instances
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a tzdata directory ("America"), a name too long for the file system.
        raise ValueError(f"unknown time zone {name!r}") from exc


def shortest_gap_s(cron: Cron) -> int:
    """Seconds between the two closest wall times of a day that ``cron`` matches, the
    wrap to the next day included: no two of its fires are closer (but around a DST
    transition, once a year)."""
    times = sorted(h * 60 + m for h in cron.hours for m in cron.minutes)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return 60 * min([*gaps, times[0] + 1440 - times[-1]])


def _nominal_after(spec: ScheduleSpec, after: datetime) -> datetime | None:
    """First nominal time strictly after ``after`` and not before start_at (UTC)."""
    if spec.kind == "cron":
        assert spec.cron is not None
        if spec.start_at is not None:
            # "strictly after start_at - 1us" == "at or after start_at" at datetime resolution
            start = spec.start_at.astimezone(UTC)
            if start > after:
                after = start - _MICROSECOND
        try:
            return next_cron_fire(parse_cron(spec.cron), _zone(spec.timezone), after)
        except _CalendarEnd:
            return None
    if spec.kind == "interval":
        assert spec.every_s is not None
        anchor = spec.start_at if spec.start_at is not None else _EPOCH
        try:
            return next_interval_fire(timedelta(seconds=spec.every_s), anchor, after)
        except OverflowError:  # the next one is after 9999-12-31
            return None
    return None


def next_fire(spec: ScheduleSpec, task_id: str, after: datetime) -> datetime | None:
    """Next actual (jittered) fire instant strictly after ``after`` in UTC, or None if done
    (also when it would fall after 9999-12-31, where ``datetime`` ends).

    Raises nothing for a spec that validated (``agentd.config.ScheduleConfig``) and an
    aware ``after``; its cost grows with the number of nominal times within ``jitter``,
    which validation bounds."""
    _require_aware(after, "after")
    after = after.astimezone(UTC)
    jitter = timedelta(seconds=spec.jitter_s)
    start = spec.start_at.astimezone(UTC) if spec.start_at is not None else None
    end = spec.end_at.astimezone(UTC) if spec.end_at is not None else None

    if spec.kind == "manual":
        return None
    if spec.kind == "once":
        assert spec.at is not None
        at = spec.at.astimezone(UTC)
        if (start is not None and at < start) or (end is not None and at > end):
            return None
        try:
            at_actual = at + jitter_offset(task_id, at, jitter)
        except OverflowError:  # after 9999-12-31
            return None
        return at_actual if at_actual > after else None

    # A nominal time n fires at n + j with 0 <= j < jitter, so only n > after - jitter can
    # fire after `after`. Scan upward keeping the earliest actual instant; later nominals
    # cannot beat it once they reach it themselves.
    best: datetime | None = None
    try:
        low = after - jitter
    except OverflowError:  # before 0001-01-01
        low = _MIN_UTC
    nominal = _nominal_after(spec, low)
    while nominal is not None:
        if end is not None and nominal > end:
            break
        if best is not None and nominal >= best:
            break
        if not jitter:
            return nominal
        try:
            actual = nominal + jitter_offset(task_id, nominal, jitter)
        except OverflowError:  # after 9999-12-31, and so is every later one
            break
        if actual > after and (best is None or actual < best):
            best = actual
        nominal = _nominal_after(spec, nominal)
    return best


def next_fires(spec: ScheduleSpec, task_id: str, after: datetime, n: int) -> list[datetime]:
    """The next ``n`` actual fire instants, for previews and tests; fewer if the schedule ends."""
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    fires: list[datetime] = []
    current = after
    while len(fires) < n:
        fire = next_fire(spec, task_id, current)
        if fire is None:
            break
        fires.append(fire)
        current = fire
    return fires


_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|d|h|m|s)")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_ORDER = ("d", "h", "m", "s", "ms")


def parse_duration(text: str | int | float) -> float:
    """Seconds from a human duration such as "1h30m"; strict so typos do not become 0s.

    Units must appear largest first and at most once ("1h30m", not "30m1h" or "1m1m").
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: expected a number or a string like '5m'")
    try:
        seconds = float(text) if isinstance(text, int | float) else _parse_duration_text(text)
    except OverflowError:  # an int beyond float: 1 followed by 400 zeros
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {text!r}: must be finite")
    if seconds < 0:
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    return seconds


def _parse_duration_text(text: str) -> float:
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    if re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", stripped):
        return float(stripped)
    expected = "expected e.g. '30s', '5m', '2h', '1d', '1h30m', '500ms' or a number of seconds"
    if not stripped:
        raise ValueError(f"invalid duration {text!r}: empty ({expected})")
    total = 0.0
    pos = 0
    last_rank = -1
    while pos < len(stripped):
        match = _DURATION_PART.match(stripped, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}: {expected}")
        number, unit = match.groups()
        rank = _UNIT_ORDER.index(unit)
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {text!r}: units must go from largest to smallest, "
                "each at most once"
            )
        last_rank = rank
        total += float(number) * _UNIT_SECONDS[unit]
        pos = match.end()
    return total
