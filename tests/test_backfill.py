"""A schedule's occurrences in a range (what a backfill enqueues) and its shortest gap
(what ``limits.min_interval`` checks), pure, on explicit datetimes, DST included; and
the config errors of ``limits.min_interval`` and ``limits.max_tasks``."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from agentd.backfill import TooManyOccurrences, occurrences, shortest_gap_s
from agentd.config import ConfigError, parse_config
from agentd.schedule import ScheduleSpec, next_fires

BERLIN = "Europe/Berlin"


def cron(expr: str, tz: str = "UTC", jitter_s: float = 0.0) -> ScheduleSpec:
    return ScheduleSpec(kind="cron", cron=expr, timezone=tz, jitter_s=jitter_s)


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


# ---------------------------------------------------------------- occurrences


def test_occurrences_are_start_inclusive_end_exclusive() -> None:
    spec = cron("0 * * * *")
    found = occurrences(spec, "t", at(2026, 5, 1, 10), at(2026, 5, 1, 13))
    assert found == [at(2026, 5, 1, 10), at(2026, 5, 1, 11), at(2026, 5, 1, 12)]


def test_occurrences_over_berlin_spring_forward_and_fall_back() -> None:
    """02:30 does not exist on 29 March (it fires at the transition, 03:00 CEST), and
    exists twice on 25 October (it fires once, on the first pass), as real fires do."""
    spec = cron("30 2 * * *", BERLIN)
    spring = occurrences(spec, "t", at(2026, 3, 28), at(2026, 3, 31))
    assert spring == [at(2026, 3, 28, 1, 30), at(2026, 3, 29, 1, 0), at(2026, 3, 30, 0, 30)]
    autumn = occurrences(spec, "t", at(2026, 10, 24), at(2026, 10, 27))
    assert autumn == [at(2026, 10, 24, 0, 30), at(2026, 10, 25, 0, 30), at(2026, 10, 26, 1, 30)]
    # A wildcard-hour cron fires in both passes of the repeated hour: 4 fires an hour
    # apart in wall time are 5 in real time.
    hourly = occurrences(cron("0 * * * *", BERLIN), "t", at(2026, 10, 24, 23), at(2026, 10, 25, 3))
    assert hourly == [at(2026, 10, 24, 23), *(at(2026, 10, 25, h) for h in range(3))]


def test_occurrences_are_the_jittered_instants_the_scheduler_fires() -> None:
    spec = ScheduleSpec(kind="interval", every_s=600, jitter_s=120)
    start = at(2026, 5, 1)
    found = occurrences(spec, "nightly", start, start + timedelta(hours=2))
    assert found == next_fires(spec, "nightly", start - timedelta(microseconds=1), len(found))
    assert len(found) == 12 and any(t.second or t.microsecond for t in found)  # jittered


def test_occurrences_respect_start_at_end_at_once_and_manual() -> None:
    bounded = ScheduleSpec(
        kind="interval", every_s=3600, start_at=at(2026, 5, 1, 2), end_at=at(2026, 5, 1, 4)
    )
    assert occurrences(bounded, "t", at(2026, 5, 1), at(2026, 5, 2)) == [
        at(2026, 5, 1, 2),
        at(2026, 5, 1, 3),
        at(2026, 5, 1, 4),
    ]
    once = ScheduleSpec(kind="once", at=at(2026, 5, 1, 9))
    assert occurrences(once, "t", at(2026, 5, 1), at(2026, 5, 2)) == [at(2026, 5, 1, 9)]
    assert occurrences(once, "t", at(2026, 5, 2), at(2026, 5, 3)) == []
    assert occurrences(ScheduleSpec(kind="manual"), "t", at(2026, 5, 1), at(2026, 5, 2)) == []


def test_a_range_over_the_limit_is_refused_and_bad_ranges_too() -> None:
    spec = cron("* * * * *")
    assert len(occurrences(spec, "t", at(2026, 5, 1), at(2026, 5, 1, 1), limit=60)) == 60
    with pytest.raises(TooManyOccurrences, match="at most 59"):
        occurrences(spec, "t", at(2026, 5, 1), at(2026, 5, 1, 1), limit=59)
    with pytest.raises(ValueError, match="empty"):
        occurrences(spec, "t", at(2026, 5, 1), at(2026, 5, 1))
    with pytest.raises(ValueError, match="UTC offset"):
        occurrences(spec, "t", datetime(2026, 5, 1), at(2026, 5, 2))


# ---------------------------------------------------------------- shortest gap


@pytest.mark.parametrize(
    ("spec", "gap"),
    [
        (cron("*/5 * * * *", BERLIN), 300),
        (cron("0 9,17 * * *"), 8 * 3600),
        # 02:30 collapses onto 03:00 CEST on spring forward: a day 30 minutes short.
        (cron("30 2 * * *", BERLIN), 23.5 * 3600),
        # 02:30 (collapsed onto 03:00) and 03:30 are 30 minutes apart that day.
        (cron("30 2,3 * * *", BERLIN), 1800),
        # Weekly at 02:00 on Sunday, when Berlin springs forward: a week less an hour.
        (cron("0 2 * * 0", BERLIN), 7 * 86400 - 3600),
        # 23:00 Monday to 00:00 Tuesday is not a gap: Tuesday does not match.
        (cron("0 0,23 * * 1"), 23 * 3600),
        (cron("0 0 1 * *"), 28 * 86400),
        (ScheduleSpec(kind="interval", every_s=90), 90),
        (cron("0 * * * *", jitter_s=600), 3000),  # a fire may come up to 10 minutes late
    ],
)
def test_shortest_gap(spec: ScheduleSpec, gap: float) -> None:
    assert shortest_gap_s(spec, 2026) == gap


def test_once_and_manual_have_no_gap() -> None:
    assert shortest_gap_s(ScheduleSpec(kind="once", at=at(2026, 1, 1))) is None
    assert shortest_gap_s(ScheduleSpec(kind="manual")) is None


# ---------------------------------------------------------------- config


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "limits.yaml", {})
    return {p.path: p.message for p in info.value.problems}


def test_a_schedule_firing_more_often_than_min_interval_is_a_config_error() -> None:
    text = """
    limits: {min_interval: 1h}
    tasks:
      often: {schedule: {cron: "*/30 * * * *"}, command: {shell: "true"}}
      dst: {schedule: {cron: "30 2,3 * * *", timezone: Europe/Berlin}, command: {shell: "true"}}
      quick: {schedule: {every: 10m}, command: {shell: "true"}}
      late: {schedule: {every: 1h, jitter: 1m}, command: {shell: "true"}}
      fine: {schedule: {cron: "0 * * * *"}, command: {shell: "true"}}
      winter: {schedule: {cron: "30 2,4 * * *", timezone: Europe/Berlin}, command: {shell: "true"}}
      once: {schedule: {at: "2026-01-01T00:00:00Z"}, command: {shell: "true"}}
    """
    found = problems(text)
    assert found == {
        "tasks.often.schedule.cron": "can fire 1800s apart, more often than"
        " limits.min_interval (3600s)",
        "tasks.dst.schedule.cron": "can fire 1800s apart, more often than"
        " limits.min_interval (3600s)",
        "tasks.quick.schedule.every": "can fire 600s apart, more often than"
        " limits.min_interval (3600s)",
        "tasks.late.schedule.every": "can fire 3540s apart (jitter 60s included), more"
        " often than limits.min_interval (3600s)",
    }
    # Without the floor, the same config loads.
    parse_config(textwrap.dedent(text).replace("limits: {min_interval: 1h}", ""), "x.yaml", {})


def test_more_tasks_than_max_tasks_is_a_config_error_naming_the_count() -> None:
    tasks = "".join(
        f"  t{i}: {{schedule: {{manual: true}}, command: {{shell: 'true'}}}}\n" for i in range(3)
    )
    assert problems("limits: {max_tasks: 2}\ntasks:\n" + tasks) == {
        "tasks": "3 tasks, more than limits.max_tasks (2)"
    }
    assert len(parse_config("limits: {max_tasks: 3}\ntasks:\n" + tasks, "x.yaml", {}).tasks) == 3
