"""Hostile config files: each is a ConfigError naming the file and the dotted path, never
a traceback, a hang or a config accepted that then fails at run time.

Every input here raised something other than a ConfigError somewhere (``load_config``,
the scheduler's sync, ``check-config --next``), took seconds and hundreds of MiB to be
accepted, or never finished.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agentd import exitcodes, yamlload
from agentd.config import ConfigError, load_config, parse_config
from agentd.schedule import next_fire, next_fires
from agentd.scheduler import SpecTrigger

ROOT = Path(__file__).resolve().parent.parent
TASK = "    schedule: {manual: true}\n    command: {argv: [echo]}\n"
HUNDRED_YEARS_S = 36525 * 86400  # the documented bound of every duration


def task(body: str = "", schedule: str = "{manual: true}") -> str:
    """A config of one task ``x`` with ``body`` (lines at task level) added."""
    return f"tasks:\n  x:\n    schedule: {schedule}\n    command: {{argv: [echo]}}\n{body}"


def laughs(levels: int, width: int = 10) -> str:
    """Billion laughs in a task's params: ``width ** levels`` strings once expanded."""
    lines = [task("    params:\n")]
    lines.append(f"      l0: &l0 [{', '.join(['lol'] * width)}]\n")
    for i in range(1, levels):
        lines.append(f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]\n")
    return "".join(lines)


def text_bomb(levels: int = 6, chars: int = 1000) -> str:
    """Few nodes (``10 ** levels``), each a long string: a gigabyte of text expanded."""
    lines = [task("    params:\n"), f"      s: &s {'x' * chars}\n"]
    lines.append(f"      l0: &l0 [{', '.join(['*s'] * 10)}]\n")
    for i in range(1, levels):
        lines.append(f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n")
    return "".join(lines)


def merge_bomb(levels: int = 40) -> str:
    """PyYAML's merge (``<<``) copies the merged pairs into the node: doubling per level."""
    lines = [task("    params:\n"), "      m0: &m0 {k: v}\n"]
    for i in range(1, levels):
        lines.append(f"      m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n")
    return "".join(lines)


def nested(depth: int) -> str:
    return task(f"    params: {{deep: {'[' * depth}{']' * depth}}}\n")


# (content, dotted path the problem is reported at (prefix), a fragment of its message)
HOSTILE: dict[str, tuple[str | bytes, str, str]] = {
    # 1. time zones zoneinfo fails on with other errors than "not found"
    "tz-directory": ("daemon: {timezone: America}\n", "daemon.timezone", "unknown IANA time zone"),
    "tz-300-chars": (f"daemon: {{timezone: {'a' * 300}}}\n", "daemon.timezone", "unknown IANA"),
    "tz-task": (
        task(schedule="{cron: '0 3 * * *', timezone: Europe}"),
        "tasks.x.schedule.timezone",
        "unknown IANA time zone",
    ),
    "tz-limits": ("limits: {timezone: Pacific}\n", "limits.timezone", "unknown IANA time zone"),
    # 2. not UTF-8
    "byte-ff": (b"\xff", "line 1, column 1", "not UTF-8"),
    "latin-1": (
        b"daemon: {timezone: UTC}\n# caf\xe9 cr\xe8me\n" + task().encode(),
        "line 2, column 6",
        "not UTF-8",
    ),
    # 3. nesting and aliases that contain themselves
    "nested-500": (nested(500), "tasks.x.params.deep[0][0]", "more than 64 levels"),
    "nested-990": (nested(990), "tasks.x.params.deep[0][0]", "more than 64 levels"),
    "self-alias": ("a: &a [*a]\n", "a[0]", "refers to its own ancestor"),
    "self-alias-deeper": (
        "tasks: &t\n  x:\n" + TASK + "    params: {again: *t}\n",
        "tasks.x.params.again",
        "refers to its own ancestor",
    ),
    "self-merge": ("a: &a {<<: *a}\n", "a.<<", "refers to its own ancestor"),
    # 4. alias bombs
    "laughs-7": (laughs(7), "tasks.x.params.l", "more than 2,000,000 nodes"),
    # 5. duplicate keys
    "duplicate-task": (
        "tasks:\n  x:\n" + TASK + "  y:\n" + TASK + "  x:\n" + TASK,
        "tasks.x",
        "duplicate key 'x' at line 8 (first at line 2)",
    ),
    "duplicate-nested": (
        task(schedule="\n      cron: '0 3 * * *'\n      cron: '0 4 * * *'"),
        "tasks.x.schedule.cron",
        "duplicate key 'cron' at line 5 (first at line 4)",
    ),
    "duplicate-with-merge": (
        "base: &b {timeout: 1h}\n" + task("    <<: *b\n    retry: {}\n    retry: {}\n"),
        "tasks.x.retry",
        "duplicate key 'retry' at line 8 (first at line 7)",
    ),
    # 6. schedules that validate and then raise in the scheduler
    "cron-31-feb": (
        task(schedule="{cron: '0 0 31 2 *'}"),
        "tasks.x.schedule.cron",
        "never fires",
    ),
    "cron-31-apr-jun-sep-nov": (
        task(schedule="{cron: '0 0 31 4,6,9,11 *'}"),
        "tasks.x.schedule.cron",
        "never fires",
    ),
    "at-past-the-calendar": (
        task(schedule="{at: 9999-12-31T23:00:00-05:00}"),
        "tasks.x.schedule.at",
        "UTC",
    ),
    "start-before-the-calendar": (
        task(schedule="{every: 1h, start_at: 0001-01-01T00:00:00+01:00}"),
        "tasks.x.schedule.start_at",
        "UTC",
    ),
    # 7. durations
    "every-1e8-days": (task(schedule="{every: 100000000d}"), "tasks.x.schedule.every", "100 years"),
    "every-1e300": (task(schedule="{every: 1.0e+300}"), "tasks.x.schedule.every", "100 years"),
    "every-huge-int": (task(schedule=f"{{every: 1{'0' * 400}}}"), "tasks.x.schedule.every", "100"),
    "jitter-1e300": (
        task(schedule="{every: 1h, jitter: 1.0e+300}"),
        "tasks.x.schedule.jitter",
        "100 years",
    ),
    "timeout": (task("    timeout: 1.0e+300\n"), "tasks.x.timeout", "100 years"),
    "backoff": (task("    retry: {backoff: 100000000d}\n"), "tasks.x.retry.backoff", "100 years"),
    "expect-every": (task("    expect: {every: 1.0e+300}\n"), "tasks.x.expect.every", "100 years"),
    "lease": ("daemon: {lease: 100000000d}\n", "daemon.lease", "100 years"),
    "shutdown-grace": ("daemon: {shutdown_grace: 1.0e+300}\n", "daemon.shutdown_grace", "100"),
    "alerts-cooldown": ("alerts: {cooldown: 1.0e+300}\n", "alerts.cooldown", "100 years"),
    # Counts and money that overflow a float or SQLite's INTEGER in a run's arithmetic
    "output-bytes-huge": (
        task(f"    output_max_bytes: 1{'0' * 30}\n"),
        "tasks.x.output_max_bytes",
        "less than or equal to",
    ),
    "usd-infinite": ("limits: {usd_per_day: .inf}\n", "limits.usd_per_day", "finite"),
    # Jitter spanning a day of a per-second schedule: each next fire weighed 172,800 times.
    "jitter-spans-too-many-fires": (
        task(schedule="{every: 1s, jitter: 1d}"),
        "tasks.x.schedule.jitter",
        "1,000",
    ),
    "cron-jitter-spans-too-many-fires": (
        task(schedule="{cron: '* * * * *', jitter: 1d}"),
        "tasks.x.schedule.jitter",
        "1,000",
    ),
}

# Only reasonable in a process of its own (before the fix: minutes, gigabytes).
BOMBS: dict[str, tuple[str, str, str]] = {
    "laughs-9": (laughs(9), "tasks.x.params.l", "more than 2,000,000 nodes"),
    "text-bomb": (text_bomb(), "tasks.x.params.l", "MiB of text"),
    "merge-bomb": (merge_bomb(), "tasks.x.params.m", "more than 2,000,000 nodes"),
}


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "hostile.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_names(exc: ConfigError, source: Path, path: str, message: str) -> None:
    text = exc.render()
    assert exc.source == str(source)
    hits = [p for p in exc.problems if p.path.startswith(path) and message in p.message]
    assert hits, f"no problem at {path!r} saying {message!r}:\n{text}"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_load_config_rejects_it_with_the_file_and_the_path(name: str, tmp_path: Path) -> None:
    content, path, message = HOSTILE[name]
    source = write(tmp_path, content)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(source, environ={})
    assert time.monotonic() - started < 2.0  # bombs too: rejected before they expand
    assert_names(info.value, source, path, message)


def test_the_size_limits_are_in_the_message_for_depth_and_size() -> None:
    for text in (laughs(7), nested(100)):
        with pytest.raises(ConfigError) as info:
            parse_config(text, "f.yaml", {})
        message = info.value.render()
        assert "64 levels" in message and "2,000,000 nodes" in message, message


def _run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, with its address space capped: before the fix a
    bomb took all the memory it could get."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {k: v for k, v in os.environ.items() if k != "AGENTD_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
    )


RUN_SUBSET = [
    "tz-directory",
    "byte-ff",
    "nested-990",
    "self-alias",
    "laughs-7",
    "duplicate-task",
    "cron-31-feb",
    "jitter-1e300",
]


@pytest.mark.parametrize("name", [*RUN_SUBSET, *sorted(BOMBS)])
def test_agentd_run_exits_78_quickly_with_the_message(name: str, tmp_path: Path) -> None:
    content, path, message = {**HOSTILE, **BOMBS}[name]
    source = write(tmp_path, content)
    started = time.monotonic()
    result = _run(["run", "--config", str(source)], tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == exitcodes.CONFIG, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{source}: {path}" in result.stderr and message in result.stderr, result.stderr
    assert elapsed < 15, elapsed  # interpreter start and imports on a loaded machine included


@pytest.mark.parametrize("name", ["tz-300-chars", "latin-1", "self-merge", "cron-31-feb"])
@pytest.mark.parametrize("extra", [[], ["--next", "3"], ["--next", "3", "--json"]])
def test_check_config_exits_78_with_the_message(
    name: str, extra: list[str], tmp_path: Path
) -> None:
    content, path, message = HOSTILE[name]
    source = write(tmp_path, content)
    result = _run(["check-config", "--config", str(source), *extra], tmp_path)
    assert result.returncode == exitcodes.CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    if "--json" in extra:
        report = json.loads(result.stdout)
        assert report["ok"] is False and report["source"] == str(source)
        assert any(
            p["path"].startswith(path) and message in p["message"] for p in report["problems"]
        ), report
    else:
        assert f"{source}: {path}" in result.stderr and message in result.stderr


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_bomb_is_rejected_by_the_parser_at_once(name: str) -> None:
    """yamlload alone, in-process: only safe once the fix is in (see the run test)."""
    content, _, message = BOMBS[name]
    started = time.monotonic()
    with pytest.raises(yamlload.Rejected) as info:
        yamlload.load(content)
    assert time.monotonic() - started < 2.0
    assert message in str(info.value)


# ---------------------------------------------------------------- valid, but at the edges


EDGE_SCHEDULES = {
    # Feb 1st on a Monday: up to 11 years apart (2027, then 2038).
    "cron-rare": "{cron: '0 0 */31 2 1'}",
    "cron-leap-day": "{cron: '0 12 29 2 *', timezone: Pacific/Kiritimati}",
    "cron-start-late": "{cron: '* * * * *', start_at: 9999-12-31T23:58:00Z}",
    "cron-window": (
        "{cron: '0 0 1 1 *', start_at: 2030-01-01T00:00:00Z, end_at: 9999-12-31T23:59:59Z}"
    ),
    "every-max": f"{{every: {HUNDRED_YEARS_S}}}",
    "every-max-jitter-max": f"{{every: {HUNDRED_YEARS_S}, jitter: {HUNDRED_YEARS_S}}}",
    "every-start-late": "{every: 1h, start_at: 9999-12-31T23:00:00Z, jitter: 1d}",
    "every-start-early": "{every: 7s, start_at: 0001-01-01T00:00:00Z}",
    "at-late-jitter": "{at: 9999-12-31T23:59:59Z, jitter: 100d}",
    "at-early": "{at: 0001-01-01T00:00:00Z}",
    "cron-daily-long-jitter": "{cron: '0 0 * * *', jitter: 1000d}",
}
AFTERS = [
    datetime.now(UTC),
    datetime(2100, 3, 1, tzinfo=UTC),
    datetime(2399, 12, 31, 23, 59, tzinfo=UTC),
    datetime(5000, 6, 1, tzinfo=UTC),
    datetime(9000, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("name", sorted(EDGE_SCHEDULES))
def test_next_fire_never_raises_for_a_valid_config(name: str) -> None:
    config = parse_config(task(schedule=EDGE_SCHEDULES[name]), "f.yaml", {})
    spec = config.schedule_spec("x")
    trigger = SpecTrigger(spec, "x")
    calls: list[Callable[[datetime], object]] = [
        lambda after: next_fire(spec, "x", after),
        lambda after: next_fires(spec, "x", after, 5),
        lambda after: trigger.get_next_fire_time(None, after),
        lambda after: trigger.get_next_fire_time(after, after),
    ]
    for after in AFTERS:
        for call in calls:
            call(after)  # raises nothing
    fires = next_fires(spec, "x", AFTERS[0], 5)
    assert fires == sorted(fires) and all(f > AFTERS[0] for f in fires)


def test_a_rare_cron_fires_across_an_eleven_year_gap() -> None:
    config = parse_config(task(schedule="{cron: '0 0 */31 2 1'}"), "f.yaml", {})
    fires = next_fires(config.schedule_spec("x"), "x", datetime(2026, 1, 1, tzinfo=UTC), 3)
    assert [f.year for f in fires] == [2027, 2038, 2044]


def test_durations_up_to_the_bound_are_valid_and_past_it_are_not() -> None:
    parse_config(task(f"    timeout: {HUNDRED_YEARS_S}\n"), "f.yaml", {})
    with pytest.raises(ConfigError, match=r"tasks\.x\.timeout: .*at most 100 years"):
        parse_config(task(f"    timeout: {HUNDRED_YEARS_S + 1}\n"), "f.yaml", {})


def large_config(n: int) -> str:
    """``n`` tasks of about 30 nodes each, as a real 10,000-task config is written."""
    out = ["daemon:\n  timezone: Europe/Berlin\ntasks:\n"]
    for i in range(n):
        out.append(
            f"  task-{i:05d}:\n"
            f"    description: generated task number {i}\n"
            f'    schedule: {{cron: "{i % 60} {i % 24} * * *", timezone: America/New_York, '
            "jitter: 30s}\n"
            f'    command: {{argv: [/usr/local/bin/job, --id, "{i}"], env: {{MODE: fast}}}}\n'
            f"    params: {{n: {i}, tags: [a, b, c], nested: {{x: 1.5, y: true}}}}\n"
            "    retry: {max_attempts: 5, backoff: 10s, max_backoff: 10m}\n"
        )
    return "".join(out)


def test_a_large_legitimate_config_still_validates(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(large_config(10_000), encoding="utf-8")
    config = load_config(path, environ={})
    assert len(config.tasks) == 10_000
    assert config.tasks["task-09999"].params["tags"] == ["a", "b", "c"]


def test_substitutions_in_aliased_strings_count_as_copies() -> None:
    """``${BIG}`` is 6 characters in the file and 100,000 in each of its 3,000 copies."""

    def text(copies: int) -> str:
        aliases = ", ".join(["*s"] * copies)
        return task("    params:\n      s: &s '${BIG}'\n") + f"      l: [{aliases}]\n"

    environ = {"BIG": "x" * 100_000}
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config(text(3000), "f.yaml", environ)
    assert time.monotonic() - started < 5
    (problem,) = info.value.problems
    assert problem.path.startswith("tasks.x.params.l[")
    assert "substitutions add more than 256 MiB of text" in problem.message
    config = parse_config(text(3), "f.yaml", environ)  # a few copies of a long value: fine
    assert config.tasks["x"].params["l"] == ["x" * 100_000] * 3
