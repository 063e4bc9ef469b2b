"""Tests for agentd.schedule: cron parsing, DST rules, intervals, jitter, specs, durations."""

from __future__ import annotations

import hashlib
import itertools
import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agentd.schedule import (
    Cron,
    CronError,
    ScheduleSpec,
    jitter_offset,
    next_cron_fire,
    next_fire,
    next_fires,
    next_interval_fire,
    parse_cron,
    parse_duration,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
MINUTE = timedelta(minutes=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def fire(expr: str, after: datetime, tz: ZoneInfo | None = None) -> datetime:
    return next_cron_fire(parse_cron(expr), tz or ZoneInfo("UTC"), after)


def fires_between(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """All fires in (start, end) by iterating next_cron_fire."""
    cron = parse_cron(expr)
    out: list[datetime] = []
    current = start
    while True:
        current = next_cron_fire(cron, tz, current)
        if current >= end:
            return out
        out.append(current)


def local_day(tz: ZoneInfo, day: date) -> tuple[datetime, datetime]:
    """UTC bounds of a local calendar day, whatever its length."""
    start = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).astimezone(UTC)
    return start, end


# --------------------------------------------------------------------------- parsing


def test_parse_simple_fields() -> None:
    cron = parse_cron("5 4 * * *")
    assert cron.expr == "5 4 * * *"
    assert cron.minutes == {5}
    assert cron.hours == {4}
    assert cron.days == frozenset(range(1, 32))
    assert cron.months == frozenset(range(1, 13))
    assert cron.weekdays == frozenset(range(7))
    assert not cron.dom_restricted
    assert not cron.dow_restricted
    assert not cron.hour_wildcard


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", set(range(60))),
        ("7", {7}),
        ("10-13", {10, 11, 12, 13}),
        ("*/15", {0, 15, 30, 45}),
        ("10-30/10", {10, 20, 30}),
        ("5/20", {5, 25, 45}),
        ("1,5,10-20/2", {1, 5, 10, 12, 14, 16, 18, 20}),
        ("0,0,0", {0}),
        ("59", {59}),
        ("*/60", {0}),
        ("07", {7}),
    ],
)
def test_parse_minute_field_forms(field: str, expected: set[int]) -> None:
    assert parse_cron(f"{field} * * * *").minutes == expected


def test_parse_keeps_original_text() -> None:
    assert parse_cron("  0   1 * * *  ").expr == "  0   1 * * *  "


def test_parse_month_and_weekday_names_case_insensitive() -> None:
    cron = parse_cron("0 0 * JAN-mar,Dec mon,WED,Fri")
    assert cron.months == {1, 2, 3, 12}
    assert cron.weekdays == {1, 3, 5}
    assert parse_cron("0 0 * * sun-sat").weekdays == frozenset(range(7))
    assert parse_cron("0 0 * * mon-fri/2").weekdays == {1, 3, 5}


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN", "0,7"])
def test_weekday_zero_and_seven_are_sunday(dow: str) -> None:
    cron = parse_cron(f"0 0 * * {dow}")
    assert cron.weekdays == {0}
    result = next_cron_fire(cron, ZoneInfo("UTC"), utc(2024, 5, 1))
    assert result == utc(2024, 5, 5)
    assert result.weekday() == 6  # Python: Sunday


def test_weekday_range_up_to_seven() -> None:
    assert parse_cron("0 0 * * 5-7").weekdays == {5, 6, 0}
    assert parse_cron("0 0 * * */2").weekdays == {0, 2, 4, 6}


def test_restriction_and_wildcard_flags() -> None:
    cron = parse_cron("0 * 1 * mon")
    assert cron.dom_restricted
    assert cron.dow_restricted
    assert cron.hour_wildcard
    assert parse_cron("0 */2 * * *").hour_wildcard
    assert not parse_cron("0 0-23 * * *").hour_wildcard
    # Like Vixie cron, a field starting with '*' counts as unrestricted even with a step.
    assert not parse_cron("0 0 */2 * *").dom_restricted


@pytest.mark.parametrize(
    ("macro", "equivalent"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macros(macro: str, equivalent: str) -> None:
    cron = parse_cron(macro)
    expected = parse_cron(equivalent)
    assert cron.expr == macro
    assert (cron.minutes, cron.hours, cron.days, cron.months, cron.weekdays) == (
        expected.minutes,
        expected.hours,
        expected.days,
        expected.months,
        expected.weekdays,
    )
    assert cron.dom_restricted == expected.dom_restricted
    assert cron.dow_restricted == expected.dow_restricted
    assert cron.hour_wildcard == expected.hour_wildcard


def test_hourly_macro_is_hour_wildcard() -> None:
    assert parse_cron("@hourly").hour_wildcard


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty cron expression"),
        ("   ", "empty cron expression"),
        ("* * * *", "has 4 field(s); expected 5"),
        ("* * * * * *", "has 6 field(s); expected 5"),
        ("61 * * * *", "minute field '61': value 61 out of range 0-59"),
        ("* 24 * * *", "hour field '24': value 24 out of range 0-23"),
        ("* * 0 * *", "day-of-month field '0': value 0 out of range 1-31"),
        ("* * 32 * *", "day-of-month field '32': value 32 out of range 1-31"),
        ("* * * 13 *", "month field '13': value 13 out of range 1-12"),
        ("* * * 0 *", "month field '0': value 0 out of range 1-12"),
        ("* * * * 8", "day-of-week field '8': value 8 out of range 0-7"),
        ("1,99 * * * *", "minute field '1,99': value 99 out of range 0-59"),
        ("*/0 * * * *", "minute field '*/0': invalid step '0' (expected an integer 1-60)"),
        ("*/61 * * * *", "minute field '*/61': invalid step '61'"),
        ("*/x * * * *", "minute field '*/x': invalid step 'x'"),
        ("*/ * * * *", "minute field '*/': invalid step ''"),
        ("1/2/3 * * * *", "minute field '1/2/3': invalid step '2/3'"),
        ("* */25 * * *", "hour field '*/25': invalid step '25' (expected an integer 1-24)"),
        ("5-1 * * * *", "minute field '5-1': range '5-1' is reversed"),
        ("* * * * fri-mon", "day-of-week field 'fri-mon': range 'fri-mon' is reversed"),
        ("1,,2 * * * *", "minute field '1,,2': empty list element"),
        ("1, * * * *", "minute field '1,': empty list element"),
        ("abc * * * *", "minute field 'abc': invalid value 'abc' (expected a number 0-59)"),
        ("-1 * * * *", "minute field '-1': invalid value ''"),
        ("*-5 * * * *", "minute field '*-5': invalid value '*'"),
        ("1-2-3 * * * *", "minute field '1-2-3': invalid value '2-3'"),
        ("? * * * *", "minute field '?': invalid value '?'"),
        ("\u0661 * * * *", "invalid value"),  # Arabic-Indic digit one
        (
            "* * * foo *",
            "month field 'foo': invalid value 'foo' (expected a number 1-12 or a name jan..dec)",
        ),
        ("* * * mon *", "month field 'mon': invalid value 'mon'"),
        ("* * * * funday", "day-of-week field 'funday': invalid value 'funday'"),
        ("* * * * jan", "expected a number 0-7 or a name sun..sat"),
        ("* * mon * *", "day-of-month field 'mon': invalid value 'mon'"),
        ("@reboot", "unknown cron macro '@reboot'"),
        ("@daily 5", "unknown cron macro"),
    ],
)
def test_parse_errors(expr: str, message: str) -> None:
    with pytest.raises(CronError) as info:
        parse_cron(expr)
    assert message in str(info.value)


def test_cron_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_cron("60 * * * *")


def test_cron_is_hashable_and_comparable() -> None:
    assert parse_cron("0 0 * * *") == parse_cron("0 0 * * *")
    assert len({parse_cron("0 0 * * *"), parse_cron("0 0 * * *")}) == 1
    assert isinstance(parse_cron("@daily"), Cron)


# --------------------------------------------------------------------------- basic next fire


def test_next_fire_is_strictly_after() -> None:
    assert fire("0 9 * * *", utc(2024, 5, 1, 8, 59, 59)) == utc(2024, 5, 1, 9)
    assert fire("0 9 * * *", utc(2024, 5, 1, 9)) == utc(2024, 5, 2, 9)
    assert fire("0 9 * * *", utc(2024, 5, 1, 9, 0, 0, 1)) == utc(2024, 5, 2, 9)
    assert fire("* * * * *", utc(2024, 5, 1, 9, 0, 30)) == utc(2024, 5, 1, 9, 1)


def test_next_cron_fire_requires_aware_after() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        fire("* * * * *", datetime(2024, 1, 1))


def test_next_fire_returns_utc_for_any_input_zone() -> None:
    tokyo = datetime(2024, 5, 1, 18, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 09:00Z
    result = fire("30 9 * * *", tokyo)
    assert result == utc(2024, 5, 1, 9, 30)
    assert result.tzinfo is UTC


def test_next_fire_in_local_zone() -> None:
    assert fire("0 9 * * *", utc(2024, 1, 15), NEW_YORK) == utc(2024, 1, 15, 14)
    assert fire("0 9 * * *", utc(2024, 7, 15), NEW_YORK) == utc(2024, 7, 15, 13)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("0 0 * * *", utc(2024, 1, 31, 12), utc(2024, 2, 1)),
        ("0 0 1 1 *", utc(2024, 6, 1), utc(2025, 1, 1)),
        ("59 23 31 12 *", utc(2024, 12, 31, 23, 59), utc(2025, 12, 31, 23, 59)),
        ("0 0 31 * *", utc(2024, 4, 1), utc(2024, 5, 31)),
        ("0 0 31 * *", utc(2024, 1, 31), utc(2024, 3, 31)),
        ("0 12 29 2 *", utc(2023, 5, 1), utc(2024, 2, 29, 12)),
        ("0 12 29 2 *", utc(2024, 3, 1), utc(2028, 2, 29, 12)),
        ("0 12 29 2 *", utc(2097, 3, 1), utc(2104, 2, 29, 12)),  # 2100 is not a leap year
        ("0 0 * 2 *", utc(2024, 2, 28, 1), utc(2024, 2, 29)),
        ("0 0 * 2 *", utc(2023, 2, 28, 1), utc(2024, 2, 1)),
        ("*/10 22-23 * * *", utc(2024, 12, 31, 23, 55), utc(2025, 1, 1, 22)),
        ("15 10 * 3 mon", utc(2024, 1, 1), utc(2024, 3, 4, 10, 15)),
    ],
)
def test_next_fire_across_month_and_year_ends(
    expr: str, after: datetime, expected: datetime
) -> None:
    assert fire(expr, after) == expected


@pytest.mark.parametrize(
    "expr",
    # day-of-week '*/2' counts as unrestricted (Vixie): both fields must match, and the
    # 31st of February is never a Sunday, Tuesday, Thursday or Saturday.
    ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 feb *", "0 0 31 2 */2"],
)
def test_impossible_expression_raises(expr: str) -> None:
    with pytest.raises(CronError, match="never fires"):
        parse_cron(expr)


@pytest.mark.parametrize(
    ("expr", "year"),
    # Feb 29th; Feb 31st OR a Monday (a Monday, then); a Feb 1st that is a Monday.
    [("0 0 29 2 *", 2028), ("0 0 31 2 1", 2026), ("0 0 */31 2 1", 2027)],
)
def test_expressions_on_rare_days_fire(expr: str, year: int) -> None:
    first = fire(expr, utc(2026, 1, 1))
    assert first.month == 2 and first.year == year


def test_the_end_of_the_calendar_is_no_next_fire() -> None:
    spec = ScheduleSpec(kind="cron", cron="0 0 1 1 *")
    assert next_fire(spec, "t", utc(9999, 1, 1)) is None
    spec = ScheduleSpec(kind="interval", every_s=3600.0)
    assert next_fire(spec, "t", utc(9999, 12, 31, 23, 30)) is None
    spec = ScheduleSpec(kind="once", at=utc(9999, 12, 31, 23, 59, 59), jitter_s=86400.0)
    assert next_fire(spec, "t", utc(2026, 1, 1)) is None  # its jittered instant is past it


def test_dom_and_dow_both_restricted_means_either() -> None:
    # 2024-09-01 is a Sunday: the 13th OR any Friday.
    fires = fires_between("0 0 13 * 5", ZoneInfo("UTC"), utc(2024, 9, 1), utc(2024, 9, 30))
    assert [f.day for f in fires] == [6, 13, 20, 27]
    # 1st of the month OR Monday: Sat June 1st, then Mon June 3rd.
    assert fire("0 0 1 * 1", utc(2024, 5, 28)) == utc(2024, 6, 1)
    assert fire("0 0 1 * 1", utc(2024, 6, 1)) == utc(2024, 6, 3)


def test_only_one_day_field_restricted_means_both() -> None:
    assert fire("0 0 * * 1", utc(2024, 5, 28)) == utc(2024, 6, 3)  # Mondays only
    assert fire("0 0 1 * *", utc(2024, 5, 28)) == utc(2024, 6, 1)  # 1st only
    # '*/2' counts as unrestricted (Vixie): odd days that are also Mondays.
    start = utc(2024, 1, 1) - timedelta(microseconds=1)
    fires = fires_between("0 0 */2 * 1", ZoneInfo("UTC"), start, utc(2024, 3, 1))
    assert fires
    assert all(f.weekday() == 0 and f.day % 2 == 1 for f in fires)
    assert fires[0] == utc(2024, 1, 1)


def test_many_calls_are_fast_enough() -> None:
    # Guards against minute-by-minute scanning: 10,000 rare-ish fires must be quick.
    cron = parse_cron("0 9 1 */3 1-5")
    after = utc(2024, 1, 1)
    for _ in range(2000):
        after = next_cron_fire(cron, BERLIN, after)
    assert after.year > 2024


# --------------------------------------------------------------------------- DST


def test_berlin_gap_fixed_hour_fires_at_end_of_gap() -> None:
    # 2024-03-31 02:00 CET -> 03:00 CEST (01:00Z)
    assert fire("30 2 * * *", utc(2024, 3, 30, 12), BERLIN) == utc(2024, 3, 31, 1)
    assert fire("30 2 * * *", utc(2024, 3, 31, 1), BERLIN) == utc(2024, 4, 1, 0, 30)
    assert fire("30 2 * * *", utc(2024, 3, 31, 0, 59, 59, 999999), BERLIN) == utc(2024, 3, 31, 1)


def test_berlin_gap_several_wall_times_collapse_to_one_fire() -> None:
    start, end = local_day(BERLIN, date(2024, 3, 31))
    assert fires_between("0,15,30,45 2 * * *", BERLIN, start, end) == [utc(2024, 3, 31, 1)]
    # 02:00 (missing) and 03:00 are the same instant: one fire, not two.
    assert fires_between("0 2,3 * * *", BERLIN, start, end) == [utc(2024, 3, 31, 1)]
    assert fires_between("* 2 * * *", BERLIN, start, end) == [utc(2024, 3, 31, 1)]


def test_berlin_after_inside_gap() -> None:
    # A non-existent wall time as `after` is read as Python does (fold=0: 02:10 CET = 01:10Z).
    after = datetime(2024, 3, 31, 2, 10, tzinfo=BERLIN)
    assert after.astimezone(UTC) == utc(2024, 3, 31, 1, 10)
    assert fire("30 2 * * *", after, BERLIN) == utc(2024, 4, 1, 0, 30)
    assert fire("*/15 * * * *", after, BERLIN) == utc(2024, 3, 31, 1, 15)
    # Just before the gap: the next fire is the collapsed one at the gap's end.
    before_gap = utc(2024, 3, 31, 0, 50)
    assert fire("*/15 * * * *", before_gap, BERLIN) == utc(2024, 3, 31, 1)
    assert fire("20 2 * * *", utc(2024, 3, 31, 1), BERLIN) == utc(2024, 4, 1, 0, 20)


def test_berlin_repeat_fixed_hour_fires_once() -> None:
    # 2024-10-27 03:00 CEST -> 02:00 CET; 02:xx occurs at 00:xxZ and 01:xxZ
    start, end = local_day(BERLIN, date(2024, 10, 27))
    assert fires_between("30 2 * * *", BERLIN, start, end) == [utc(2024, 10, 27, 0, 30)]
    assert fire("30 2 * * *", utc(2024, 10, 27, 0, 30), BERLIN) == utc(2024, 10, 28, 1, 30)
    assert len(fires_between("* 2 * * *", BERLIN, start, end)) == 60


def test_berlin_repeat_hourly_wildcard_fires_twice() -> None:
    start, end = local_day(BERLIN, date(2024, 10, 27))
    fires = fires_between("30 * * * *", BERLIN, start, end)
    assert len(fires) == 25
    assert utc(2024, 10, 27, 0, 30) in fires
    assert utc(2024, 10, 27, 1, 30) in fires
    stepped = fires_between("30 */2 * * *", BERLIN, start, end)
    # 00:30 CEST, 02:30 CEST, 02:30 CET, 04:30 CET
    assert stepped[:4] == [
        utc(2024, 10, 26, 22, 30),
        utc(2024, 10, 27, 0, 30),
        utc(2024, 10, 27, 1, 30),
        utc(2024, 10, 27, 3, 30),
    ]


def test_berlin_after_inside_repeated_hour_second_pass() -> None:
    second_pass = utc(2024, 10, 27, 1, 10)  # 02:10 CET, fold=1
    local = datetime(2024, 10, 27, 2, 10, fold=1, tzinfo=BERLIN)
    assert local.astimezone(UTC) == second_pass
    for after in (second_pass, local):
        assert fire("30 2 * * *", after, BERLIN) == utc(2024, 10, 28, 1, 30)
        assert fire("30 * * * *", after, BERLIN) == utc(2024, 10, 27, 1, 30)
        assert fire("0 * * * *", after, BERLIN) == utc(2024, 10, 27, 2)
        assert fire("5 3 * * *", after, BERLIN) == utc(2024, 10, 27, 2, 5)
    assert fire("*/15 * * * *", utc(2024, 10, 27, 1), BERLIN) == utc(2024, 10, 27, 1, 15)
    assert fire("*/15 * * * *", utc(2024, 10, 27, 1, 45), BERLIN) == utc(2024, 10, 27, 2)


def test_berlin_after_inside_repeated_hour_first_pass() -> None:
    first_pass = utc(2024, 10, 27, 0, 30)  # 02:30 CEST, fold=0
    assert fire("0 * * * *", first_pass, BERLIN) == utc(2024, 10, 27, 1)  # 02:00 CET
    assert fire("45 * * * *", first_pass, BERLIN) == utc(2024, 10, 27, 0, 45)
    assert fire("15 2 * * *", first_pass, BERLIN) == utc(2024, 10, 28, 1, 15)
    assert fire("45 2 * * *", first_pass, BERLIN) == utc(2024, 10, 27, 0, 45)


def test_new_york_gap_and_repeat() -> None:
    # 2024-03-10 02:00 EST -> 03:00 EDT (07:00Z)
    assert fire("30 2 * * *", utc(2024, 3, 9, 12), NEW_YORK) == utc(2024, 3, 10, 7)
    start, end = local_day(NEW_YORK, date(2024, 3, 10))
    assert fires_between("0 2,3 * * *", NEW_YORK, start, end) == [utc(2024, 3, 10, 7)]
    # 2024-11-03 02:00 EDT -> 01:00 EST; 01:xx at 05:xxZ and 06:xxZ
    start, end = local_day(NEW_YORK, date(2024, 11, 3))
    assert fires_between("30 1 * * *", NEW_YORK, start, end) == [utc(2024, 11, 3, 5, 30)]
    hourly = fires_between("30 * * * *", NEW_YORK, start, end)
    assert len(hourly) == 25
    assert {utc(2024, 11, 3, 5, 30), utc(2024, 11, 3, 6, 30)} <= set(hourly)
    # `after` on the second pass of 01:xx EST
    assert fire("30 1 * * *", utc(2024, 11, 3, 6, 10), NEW_YORK) == utc(2024, 11, 4, 6, 30)
    assert fire("30 * * * *", utc(2024, 11, 3, 6, 10), NEW_YORK) == utc(2024, 11, 3, 6, 30)


@pytest.mark.parametrize(
    ("tz", "day", "expr", "count"),
    [
        (BERLIN, date(2024, 3, 31), "*/15 * * * *", 23 * 4),
        (BERLIN, date(2024, 10, 27), "*/15 * * * *", 25 * 4),
        (BERLIN, date(2024, 3, 31), "* * * * *", 23 * 60),
        (BERLIN, date(2024, 10, 27), "* * * * *", 25 * 60),
        (BERLIN, date(2024, 10, 27), "0 * * * *", 25),
        (BERLIN, date(2024, 6, 1), "*/15 * * * *", 24 * 4),
        (NEW_YORK, date(2024, 3, 10), "*/15 * * * *", 23 * 4),
        (NEW_YORK, date(2024, 11, 3), "*/15 * * * *", 25 * 4),
        (NEW_YORK, date(2024, 11, 3), "* * * * *", 25 * 60),
        (LORD_HOWE, date(2024, 4, 7), "*/15 * * * *", 98),  # 24.5 h day
        (LORD_HOWE, date(2024, 10, 6), "*/15 * * * *", 94),  # 23.5 h day
    ],
)
def test_whole_dst_day_counts(tz: ZoneInfo, day: date, expr: str, count: int) -> None:
    start, end = local_day(tz, day)
    fires = fires_between(expr, tz, start - timedelta(microseconds=1), end)
    assert len(fires) == count
    assert all(a < b for a, b in itertools.pairwise(fires))
    assert all(start <= f < end for f in fires)


def test_lord_howe_half_hour_dst() -> None:
    # 2024-04-07: 02:00 +11 -> 01:30 +10:30, so 01:30-01:59 repeats; a fixed time fires once.
    start, end = local_day(LORD_HOWE, date(2024, 4, 7))
    assert fires_between("45 1 * * *", LORD_HOWE, start, end) == [utc(2024, 4, 6, 14, 45)]
    hourly = fires_between("45 * * * *", LORD_HOWE, start, end)
    assert utc(2024, 4, 6, 14, 45) in hourly
    assert utc(2024, 4, 6, 15, 15) in hourly  # 01:45 +10:30, second pass
    # 2024-10-06: 02:00 +10:30 -> 02:30 +11, so 02:15 does not exist: fires at 02:30 +11.
    start, end = local_day(LORD_HOWE, date(2024, 10, 6))
    assert fires_between("15 2 * * *", LORD_HOWE, start, end) == [utc(2024, 10, 5, 15, 30)]


# --------------------------------------------------------------------------- brute force


def _matches(cron: Cron, wall: datetime) -> bool:
    weekday = (wall.weekday() + 1) % 7
    dom = wall.day in cron.days
    dow = weekday in cron.weekdays
    day_ok = (dom or dow) if cron.dom_restricted and cron.dow_restricted else (dom and dow)
    return (
        wall.minute in cron.minutes
        and wall.hour in cron.hours
        and wall.month in cron.months
        and day_ok
    )


def _brute_fires_at(cron: Cron, tz: ZoneInfo, instant: datetime) -> bool:
    """Does the schedule fire at this whole UTC minute? Stated directly from the DST rules."""
    local = instant.astimezone(tz)
    wall = local.replace(tzinfo=None, fold=0)
    if _matches(cron, wall) and (local.fold == 0 or cron.hour_wildcard):
        return True
    before = (instant - timedelta(seconds=1)).astimezone(tz)
    offset, previous = local.utcoffset(), before.utcoffset()
    assert offset is not None and previous is not None
    if offset > previous and not cron.hour_wildcard:
        # A gap ends exactly here: did any missing wall time match? (Wildcard-hour jobs
        # skip missing wall times instead.)
        missing = instant.replace(tzinfo=None) + previous
        while missing < wall:
            if _matches(cron, missing):
                return True
            missing += MINUTE
    return False


def test_matches_brute_force_in_berlin() -> None:
    rng = random.Random(20240331)
    exprs = [
        "*/15 * * * *",
        "30 * * * *",
        "30 2 * * *",
        "0,45 1-3 * * *",
        "*/20 */2 * * *",
        "10 2 * * 0",
        "0 0 13 * 5",
    ]
    crons = [parse_cron(e) for e in exprs]
    year_start = utc(2024, 1, 1)
    afters = [
        year_start + timedelta(seconds=rng.randrange(366 * 86400), microseconds=rng.randrange(2))
        for _ in range(200)
    ]
    # Random instants rarely land near a transition, so add dense ones around both.
    for transition in (utc(2024, 3, 31, 1), utc(2024, 10, 27, 1)):
        afters += [transition + timedelta(minutes=m) for m in range(-130, 130, 7)]
    window = timedelta(hours=4)
    for after in afters:
        expected: list[datetime | None] = [None] * len(crons)
        instant = after.replace(second=0, microsecond=0) + MINUTE
        while instant <= after + window and None in expected:
            for i, cron in enumerate(crons):
                if expected[i] is None and _brute_fires_at(cron, BERLIN, instant):
                    expected[i] = instant
            instant += MINUTE
        for cron, want in zip(crons, expected, strict=True):
            got = next_cron_fire(cron, BERLIN, after)
            assert got > after
            if want is None:
                assert got > after + window, (cron.expr, after)
            else:
                assert got == want, (cron.expr, after)


# --------------------------------------------------------------------------- intervals


def test_interval_anchored() -> None:
    every = timedelta(minutes=5)
    epoch = utc(1970, 1, 1)
    assert next_interval_fire(every, epoch, utc(2024, 1, 1, 10, 2, 30)) == utc(2024, 1, 1, 10, 5)
    assert next_interval_fire(every, epoch, utc(2024, 1, 1, 10, 5)) == utc(2024, 1, 1, 10, 10)
    anchor = utc(2024, 1, 1, 10, 2)
    assert next_interval_fire(every, anchor, utc(2024, 1, 1, 10, 3)) == utc(2024, 1, 1, 10, 7)
    assert next_interval_fire(every, anchor, utc(2024, 1, 1, 10, 2)) == utc(2024, 1, 1, 10, 7)


def test_interval_before_anchor_returns_anchor() -> None:
    anchor = utc(2024, 1, 1, 12)
    result = next_interval_fire(timedelta(hours=1), anchor, utc(2023, 6, 1))
    assert result == anchor
    assert result.tzinfo is UTC


def test_interval_is_elapsed_time_not_wall_time() -> None:
    # Anchor in Berlin winter time; a day later across the DST change is 24 real hours.
    anchor = datetime(2024, 3, 30, 12, tzinfo=BERLIN)  # 11:00Z
    result = next_interval_fire(timedelta(days=1), anchor, utc(2024, 3, 30, 12))
    assert result == utc(2024, 3, 31, 11)
    assert result.tzinfo is UTC


def test_interval_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        next_interval_fire(timedelta(0), utc(2024, 1, 1), utc(2024, 1, 2))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_interval_fire(timedelta(1), datetime(2024, 1, 1), utc(2024, 1, 2))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_interval_fire(timedelta(1), utc(2024, 1, 1), datetime(2024, 1, 2))


# --------------------------------------------------------------------------- jitter


def test_jitter_zero_is_zero() -> None:
    assert jitter_offset("task", utc(2024, 1, 1), timedelta(0)) == timedelta(0)
    assert jitter_offset("task", utc(2024, 1, 1), timedelta(microseconds=500)) == timedelta(0)


def test_jitter_deterministic_and_documented_mapping() -> None:
    when = utc(2024, 1, 1, 9)
    jitter = timedelta(minutes=10)
    first = jitter_offset("backup", when, jitter)
    assert first == jitter_offset("backup", when, jitter)
    # The same instant expressed in another zone hashes identically.
    assert first == jitter_offset("backup", when.astimezone(BERLIN), jitter)
    digest = hashlib.sha256(b"backup@2024-01-01T09:00:00+00:00").digest()
    assert first == timedelta(milliseconds=int.from_bytes(digest, "big") % 600_000)


def test_jitter_differs_between_tasks_and_fires() -> None:
    when = utc(2024, 1, 1, 9)
    jitter = timedelta(hours=1)
    by_task = {jitter_offset(f"task-{i}", when, jitter) for i in range(20)}
    assert len(by_task) >= 19
    by_time = {jitter_offset("task", when + timedelta(hours=i), jitter) for i in range(20)}
    assert len(by_time) >= 19


@pytest.mark.parametrize("jitter_ms", [1, 2, 7, 1000, 3_600_000])
def test_jitter_bounds(jitter_ms: int) -> None:
    jitter = timedelta(milliseconds=jitter_ms)
    for i in range(300):
        offset = jitter_offset(f"t{i}", utc(2024, 1, 1) + timedelta(minutes=i), jitter)
        assert timedelta(0) <= offset < jitter
        assert offset.microseconds % 1000 == 0


def test_jitter_fractional_millisecond_bound() -> None:
    jitter = timedelta(microseconds=1500)
    offsets = {jitter_offset(f"t{i}", utc(2024, 1, 1), jitter) for i in range(100)}
    assert offsets == {timedelta(0), timedelta(milliseconds=1)}


def test_jitter_validation() -> None:
    with pytest.raises(ValueError, match="negative"):
        jitter_offset("t", utc(2024, 1, 1), timedelta(seconds=-1))
    with pytest.raises(ValueError, match="timezone-aware"):
        jitter_offset("t", datetime(2024, 1, 1), timedelta(seconds=1))


# --------------------------------------------------------------------------- next_fire


def test_manual_never_fires() -> None:
    assert next_fire(ScheduleSpec(kind="manual"), "t", utc(2024, 1, 1)) is None
    assert next_fires(ScheduleSpec(kind="manual"), "t", utc(2024, 1, 1), 5) == []


def test_once_future_and_past() -> None:
    spec = ScheduleSpec(kind="once", at=utc(2024, 6, 1, 12))
    assert next_fire(spec, "t", utc(2024, 1, 1)) == utc(2024, 6, 1, 12)
    assert next_fire(spec, "t", utc(2024, 6, 1, 12)) is None
    assert next_fire(spec, "t", utc(2024, 7, 1)) is None
    assert next_fires(spec, "t", utc(2024, 1, 1), 3) == [utc(2024, 6, 1, 12)]


def test_once_with_jitter_counts_jittered_time() -> None:
    at = utc(2024, 6, 1, 12)
    spec = ScheduleSpec(kind="once", at=at, jitter_s=600)
    actual = at + jitter_offset("t", at, timedelta(seconds=600))
    assert actual > at  # holds for this task id; keeps the next assertion meaningful
    assert next_fire(spec, "t", utc(2024, 1, 1)) == actual
    assert next_fire(spec, "t", at) == actual  # nominal passed, jittered not yet
    assert next_fire(spec, "t", actual) is None


def test_once_outside_start_end() -> None:
    at = utc(2024, 6, 1)
    after = utc(2024, 1, 1)
    assert next_fire(ScheduleSpec(kind="once", at=at, start_at=at + MINUTE), "t", after) is None
    assert next_fire(ScheduleSpec(kind="once", at=at, end_at=at - MINUTE), "t", after) is None
    assert next_fire(ScheduleSpec(kind="once", at=at, start_at=at, end_at=at), "t", after) == at


def test_interval_spec_anchored_on_epoch() -> None:
    spec = ScheduleSpec(kind="interval", every_s=300)
    assert next_fires(spec, "t", utc(2024, 1, 1, 10, 1), 3) == [
        utc(2024, 1, 1, 10, 5),
        utc(2024, 1, 1, 10, 10),
        utc(2024, 1, 1, 10, 15),
    ]


def test_interval_spec_anchored_on_start_at() -> None:
    spec = ScheduleSpec(kind="interval", every_s=300, start_at=utc(2024, 1, 1, 10, 2))
    assert next_fire(spec, "t", utc(2024, 1, 1, 9)) == utc(2024, 1, 1, 10, 2)
    assert next_fire(spec, "t", utc(2024, 1, 1, 10, 3)) == utc(2024, 1, 1, 10, 7)


def test_cron_spec_uses_timezone() -> None:
    spec = ScheduleSpec(kind="cron", cron="30 2 * * *", timezone="Europe/Berlin")
    assert next_fire(spec, "t", utc(2024, 3, 30, 12)) == utc(2024, 3, 31, 1)
    assert next_fire(spec, "t", utc(2024, 3, 31, 1)) == utc(2024, 4, 1, 0, 30)


def test_cron_spec_start_at_is_inclusive() -> None:
    spec = ScheduleSpec(kind="cron", cron="0 * * * *", start_at=utc(2024, 1, 1, 12, 30))
    assert next_fire(spec, "t", utc(2024, 1, 1, 10)) == utc(2024, 1, 1, 13)
    spec = ScheduleSpec(kind="cron", cron="0 * * * *", start_at=utc(2024, 1, 1, 13))
    assert next_fire(spec, "t", utc(2024, 1, 1, 10)) == utc(2024, 1, 1, 13)
    assert next_fire(spec, "t", utc(2024, 1, 1, 14, 30)) == utc(2024, 1, 1, 15)


def test_end_at_is_inclusive_then_none() -> None:
    spec = ScheduleSpec(kind="cron", cron="0 * * * *", end_at=utc(2024, 1, 1, 12))
    assert next_fire(spec, "t", utc(2024, 1, 1, 11, 30)) == utc(2024, 1, 1, 12)
    assert next_fire(spec, "t", utc(2024, 1, 1, 12)) is None
    assert next_fires(spec, "t", utc(2024, 1, 1, 9, 30), 10) == [
        utc(2024, 1, 1, 10),
        utc(2024, 1, 1, 11),
        utc(2024, 1, 1, 12),
    ]
    interval = ScheduleSpec(kind="interval", every_s=3600, end_at=utc(2024, 1, 1, 12, 30))
    assert next_fire(interval, "t", utc(2024, 1, 1, 12)) is None


def test_start_and_end_in_other_zone_compare_as_instants() -> None:
    # 13:30 Berlin winter time is 12:30Z; a same-tzinfo wall comparison would get this wrong.
    start = datetime(2024, 1, 1, 13, 30, tzinfo=BERLIN)
    spec = ScheduleSpec(kind="cron", cron="0 * * * *", timezone="Europe/Berlin", start_at=start)
    assert next_fire(spec, "t", datetime(2024, 1, 1, 11, tzinfo=BERLIN)) == utc(2024, 1, 1, 13)


def _task_with_jitter_at_least(
    nominal: datetime, jitter: timedelta, minimum: timedelta
) -> tuple[str, timedelta]:
    for i in range(100):
        offset = jitter_offset(f"task-{i}", nominal, jitter)
        if offset >= minimum:
            return f"task-{i}", offset
    raise AssertionError("no task id with a large enough jitter")


def test_jitter_nominal_before_after_still_fires() -> None:
    jitter = timedelta(minutes=10)
    nominal = utc(2024, 1, 1, 10)
    task, offset = _task_with_jitter_at_least(nominal, jitter, timedelta(seconds=5))
    spec = ScheduleSpec(kind="cron", cron="0 * * * *", jitter_s=600)
    after = nominal + offset - timedelta(seconds=1)  # nominal passed, jittered time not yet
    assert next_fire(spec, task, after) == nominal + offset
    following = next_fire(spec, task, nominal + offset)
    nxt = utc(2024, 1, 1, 11)
    assert following == nxt + jitter_offset(task, nxt, jitter)


def test_next_fires_jittered_are_increasing_and_exact() -> None:
    spec = ScheduleSpec(kind="interval", every_s=3600, jitter_s=1800)
    fires = next_fires(spec, "svc", utc(2024, 1, 1), 24)
    # Nominal 00:00 equals `after` but its jittered time is later, so it is the first fire.
    nominals = [utc(2024, 1, 1) + timedelta(hours=h) for h in range(24)]
    jitter = timedelta(seconds=1800)
    assert jitter_offset("svc", nominals[0], jitter) > timedelta(0)
    assert fires == [n + jitter_offset("svc", n, jitter) for n in nominals]


def test_jitter_larger_than_interval_keeps_every_fire_in_order() -> None:
    # Actual times can reorder; next_fire must still return each of them exactly once.
    spec = ScheduleSpec(kind="interval", every_s=60, jitter_s=600)
    after = utc(2024, 1, 1, 12)
    fires = next_fires(spec, "t", after, 50)
    assert fires == sorted(fires)
    assert len(set(fires)) == len(fires)
    jitter = timedelta(seconds=600)
    expected = sorted(
        actual
        for k in range(-20, 80)
        if (actual := (n := after + k * MINUTE) + jitter_offset("t", n, jitter)) > after
    )[:50]
    assert fires == expected


def test_next_fires_counts() -> None:
    spec = ScheduleSpec(kind="cron", cron="*/15 * * * *")
    assert len(next_fires(spec, "t", utc(2024, 1, 1), 10)) == 10
    assert next_fires(spec, "t", utc(2024, 1, 1), 0) == []
    with pytest.raises(ValueError, match="negative"):
        next_fires(spec, "t", utc(2024, 1, 1), -1)


def test_next_fire_requires_aware_after() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_fire(ScheduleSpec(kind="interval", every_s=60), "t", datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kind": "cron"}, ValueError, "needs a cron expression"),
        ({"kind": "cron", "cron": "61 * * * *"}, CronError, "out of range"),
        ({"kind": "cron", "cron": "@daily", "timezone": "Mars/Olympus"}, ValueError, "time zone"),
        ({"kind": "interval"}, ValueError, "every_s > 0"),
        ({"kind": "interval", "every_s": 0}, ValueError, "every_s > 0"),
        ({"kind": "interval", "every_s": -5}, ValueError, "every_s > 0"),
        ({"kind": "once"}, ValueError, "needs 'at'"),
        ({"kind": "once", "at": datetime(2024, 1, 1)}, ValueError, "at must be a timezone-aware"),
        ({"kind": "manual", "jitter_s": -1}, ValueError, "jitter_s"),
        ({"kind": "manual", "start_at": datetime(2024, 1, 1)}, ValueError, "start_at"),
        ({"kind": "bogus"}, ValueError, "unknown schedule kind"),
    ],
)
def test_schedule_spec_validation(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ScheduleSpec(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("500ms", 0.5),
        ("1d2h3m4s5ms", 93784.005),
        ("1.5h", 5400.0),
        (" 10s ", 10.0),
        ("90", 90.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("abc", "expected e.g."),
        ("5x", "expected e.g."),
        ("5 minutes", "expected e.g."),
        ("1e3", "expected e.g."),
        ("m", "expected e.g."),
        ("-5", "negative"),
        ("-1m", "negative"),
        (-1, "negative"),
        (-0.5, "negative"),
        ("30m1h", "largest to smallest"),
        ("1m1m", "largest to smallest"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (True, "expected a number"),
    ],
)
def test_parse_duration_errors(text: str | int | float, message: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)
    assert message in str(info.value)


def test_berlin_gap_wildcard_hour_skips_missing_wall_times() -> None:
    # Hourly at :30 across spring forward: 01:30 CET (00:30Z), then 03:30 CEST (01:30Z),
    # one real hour apart; the non-existent 02:30 is skipped, not moved to 03:00.
    assert fire("30 * * * *", utc(2024, 3, 31, 0, 0), BERLIN) == utc(2024, 3, 31, 0, 30)
    assert fire("30 * * * *", utc(2024, 3, 31, 0, 30), BERLIN) == utc(2024, 3, 31, 1, 30)
    # A fixed-hour job in the same gap still fires once, at the gap's end.
    assert fire("30 2 * * *", utc(2024, 3, 31, 0, 30), BERLIN) == utc(2024, 3, 31, 1, 0)
