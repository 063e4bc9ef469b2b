"""Tests for agentd.config: validation, error paths, interpolation, redaction, the CLI check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentd import exitcodes
from agentd.config import (
    Config,
    ConfigError,
    ConfigProblem,
    TaskConfig,
    inactive_reason,
    interpolate,
    load_config,
    parse_config,
    redacted,
    task_index,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "agentd.yaml"
SOURCE = "agentd-test.yaml"

FULL = """
daemon:
  timezone: Europe/Berlin
  concurrency: 2
  shutdown_grace: 1m
  http:
    port: 9000
tasks:
  cron-cmd:
    schedule:
      cron: "*/5 * * * *"
      timezone: America/New_York
      jitter: 10s
    command:
      argv: [echo, hello]
  every-http:
    schedule:
      every: 1h30m
    http:
      method: POST
      url: https://example.com/hook
      headers:
        Authorization: Bearer abc
      json: {a: 1}
  once-python:
    schedule:
      at: 2026-01-01T09:00:00+01:00
    python:
      callable: agentd.examples:checksum_files
  manual-agent:
    schedule:
      manual: true
    agent:
      model: gpt-4o-mini
      prompt: Say hello to {name}.
      api_key_env: OPENAI_API_KEY
"""


def parse(text: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), SOURCE, environ or {})


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    assert info.value.source == SOURCE
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def problem_at(problems: list[ConfigProblem], path: str) -> ConfigProblem:
    found = [p for p in problems if p.path == path]
    assert found, f"no problem at {path!r}; got {[(p.path, p.message) for p in problems]}"
    return found[0]


def one_task(body: str, name: str = "x") -> str:
    """A config with one task whose body is ``body`` (YAML, indented by the caller)."""
    return f"tasks:\n  {name}:\n" + textwrap.indent(textwrap.dedent(body), "    ")


# ---------------------------------------------------------------- valid configs


def test_every_schedule_kind_and_every_task_kind_parse() -> None:
    config = parse(FULL)

    tasks = config.tasks
    assert {tid: t.kind for tid, t in tasks.items()} == {
        "cron-cmd": "command",
        "every-http": "http",
        "once-python": "python",
        "manual-agent": "agent",
    }
    assert {tid: t.schedule.kind for tid, t in tasks.items()} == {
        "cron-cmd": "cron",
        "every-http": "interval",
        "once-python": "once",
        "manual-agent": "manual",
    }
    # The mapping key becomes the task id.
    assert all(t.id == tid for tid, t in tasks.items())
    assert tasks["cron-cmd"].command is not None
    assert tasks["cron-cmd"].command.argv == ["echo", "hello"]
    assert tasks["cron-cmd"].schedule.jitter == 10.0
    assert tasks["every-http"].schedule.every == 5400.0
    assert tasks["every-http"].http is not None
    assert tasks["every-http"].http.json_body == {"a": 1}
    at = tasks["once-python"].schedule.at
    assert at == datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    assert tasks["manual-agent"].agent is not None
    assert tasks["manual-agent"].agent.api_key_env == "OPENAI_API_KEY"
    assert config.daemon.shutdown_grace == 60.0
    assert config.daemon.http.port == 9000
    assert config.source == SOURCE
    # A schedule's own timezone wins; otherwise the daemon's is the default.
    assert config.schedule_spec("cron-cmd").timezone == "America/New_York"
    assert config.schedule_spec("every-http").timezone == "Europe/Berlin"


def test_config_model_is_frozen() -> None:
    config = parse(FULL)
    with pytest.raises(ValidationError):
        config.daemon.concurrency = 8  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.tasks["cron-cmd"].timeout = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.tasks["cron-cmd"].schedule.cron = "* * * * *"  # type: ignore[misc]
    assert config.daemon.concurrency == 2
    assert config.tasks["cron-cmd"].schedule.cron == "*/5 * * * *"


def test_fingerprint_is_stable_and_changes_with_the_task() -> None:
    a = parse(FULL).tasks["cron-cmd"]
    b = parse(FULL).tasks["cron-cmd"]
    changed = parse(FULL.replace("*/5 * * * *", "*/10 * * * *")).tasks["cron-cmd"]
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != changed.fingerprint()


def _task(body: dict[str, object]) -> TaskConfig:
    return TaskConfig.model_validate({"id": "t", "schedule": {"manual": True}, **body})


PY = {"python": {"callable": "m:f"}}
HTTP: dict[str, dict[str, object]] = {"http": {"url": "http://127.0.0.1:1/x", "method": "POST"}}
AGENT: dict[str, dict[str, object]] = {
    "agent": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "prompt": "p"}
}
SAME_AS_CASES: list[dict[str, object]] = [
    {**PY, "params": {"n": 1}},
    {**PY, "params": {"n": True}},
    {**PY, "params": {"n": 1.0}},
    {**PY, "params": {"n": -0.0}},
    {**PY, "params": {"n": 0.0}},
    {**PY, "params": {"n": [1, {"a": 1}]}},
    {**PY, "params": {"n": [1, {"a": True}]}},
    {**PY, "params": {"a": 1, "b": 2}},
    {**PY, "params": {"b": 2, "a": 1}},
    {**PY, "params": {"n": None}},
    {**PY, "params": {}},
    {**PY, "timeout": "1m"},
    {**PY, "timeout": 60},
    {"http": {**HTTP["http"], "json": {"k": 1}}},
    {"http": {**HTTP["http"], "json": {"k": True}}},
    {"http": {**HTTP["http"], "json": [1]}},
    HTTP,
    {"agent": {**AGENT["agent"], "items": [1, 2]}},
    {"agent": {**AGENT["agent"], "items": [1, 2.0]}},
    AGENT,
]


def test_same_as_agrees_with_the_fingerprint() -> None:
    """Reload keeps an unchanged task's fingerprint when ``same_as`` says so: it must
    never say so for two tasks whose fingerprints differ (1, 1.0, true; -0.0, 0.0)."""
    tasks = [_task(body) for body in SAME_AS_CASES]
    again = [_task(body) for body in SAME_AS_CASES]
    for a, a2 in zip(tasks, again, strict=True):
        assert a.same_as(a2)
    pairs = 0
    for a in tasks:
        for b in tasks:
            assert a.same_as(b) == (a.fingerprint() == b.fingerprint()), (a, b)
            pairs += a is not b and a.same_as(b)
    assert pairs == 4  # key order of params, and 1m vs 60 s: same task, both ways


def test_reload_index_keeps_unchanged_fingerprints_and_recomputes_the_rest() -> None:
    before = parse(FULL)
    index = task_index(before)
    after = parse(FULL.replace("*/5 * * * *", "*/10 * * * *"))
    again = task_index(after, (before, index))
    assert again == task_index(after)  # what a cold start would compute
    changed = {t for t in index if index[t] != again[t]}
    assert changed == {"cron-cmd"}
    assert all(again[t] is index[t] for t in index.keys() - changed)  # reused, not redone


# ---------------------------------------------------------------- one error each


def test_bad_cron_names_the_dotted_path_and_the_field() -> None:
    problems = problems_of(
        one_task(
            """
            schedule:
              cron: "0 25 * * *"
            command:
              shell: "true"
            """,
            name="nightly",
        )
    )
    problem = problem_at(problems, "tasks.nightly.schedule.cron")
    assert "cron" in problem.message
    assert "hour" in problem.message
    assert "0 25 * * *" in problem.message


def test_unknown_key_is_reported_with_its_path() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {every: 5m}
            command: {shell: "true"}
            retries: 3
            """
        )
    )
    assert "unknown key" in problem_at(problems, "tasks.x.retries").message


def test_unknown_top_level_and_daemon_keys() -> None:
    problems = problems_of("daemon:\n  concurency: 3\nextra: 1\n")
    assert "unknown key" in problem_at(problems, "daemon.concurency").message
    assert "unknown key" in problem_at(problems, "extra").message


def test_agent_without_prompt() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {manual: true}
            agent: {model: gpt-4o-mini}
            """
        )
    )
    assert "missing" in problem_at(problems, "tasks.x.agent.prompt").message


def test_two_kinds_in_one_task() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {manual: true}
            command: {shell: "true"}
            python: {callable: "agentd.examples:checksum_files"}
            """
        )
    )
    message = problem_at(problems, "tasks.x").message
    assert "exactly one of command, http, python, agent" in message
    assert "command, python" in message


def test_task_without_a_kind() -> None:
    problems = problems_of(one_task("schedule: {manual: true}\n"))
    message = problem_at(problems, "tasks.x").message
    assert "exactly one of command, http, python, agent" in message
    assert "none" in message


def test_schedule_with_both_cron_and_every() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {cron: "* * * * *", every: 5m}
            command: {shell: "true"}
            """
        )
    )
    message = problem_at(problems, "tasks.x.schedule").message
    assert "exactly one of cron, every, at" in message
    assert "cron, every" in message


def test_schedule_with_no_kind() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {timezone: UTC}
            command: {shell: "true"}
            """
        )
    )
    assert "exactly one of cron" in problem_at(problems, "tasks.x.schedule").message


def test_bad_timezone_in_schedule_and_daemon() -> None:
    problems = problems_of(
        "daemon:\n  timezone: Mars/Olympus\n"
        + one_task(
            """
            schedule: {cron: "0 9 * * *", timezone: Europe/Atlantis}
            command: {shell: "true"}
            """
        )
    )
    assert "Europe/Atlantis" in problem_at(problems, "tasks.x.schedule.timezone").message
    assert "Mars/Olympus" in problem_at(problems, "daemon.timezone").message
    assert "time zone" in problem_at(problems, "daemon.timezone").message


@pytest.mark.parametrize("value", ["2026-01-01T09:00:00", '"2026-01-01T09:00:00"'])
def test_naive_at_datetime_is_rejected(value: str) -> None:
    problems = problems_of(
        one_task(
            f"""
            schedule: {{at: {value}}}
            command: {{shell: "true"}}
            """
        )
    )
    assert "UTC offset" in problem_at(problems, "tasks.x.schedule.at").message


def test_bad_duration() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {every: 5m}
            command: {shell: "true"}
            timeout: 5 minutes
            """
        )
    )
    message = problem_at(problems, "tasks.x.timeout").message
    assert "invalid duration" in message
    assert "5 minutes" in message


def test_interval_below_one_second() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {every: 500ms}
            command: {shell: "true"}
            """
        )
    )
    assert "at least 1s" in problem_at(problems, "tasks.x.schedule.every").message


def test_bad_task_name() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {every: 5m}
            command: {shell: "true"}
            """,
            name='"bad name!"',
        )
    )
    assert len(problems) == 1
    assert problems[0].path.startswith("tasks")
    assert "bad name!" in problems[0].message
    assert "task name" in problems[0].message


def test_bad_task_name_is_reported_together_with_other_tasks_errors() -> None:
    """All problems in one pass: a bad name must not hide behind another task's error."""
    problems = problems_of(
        """
        tasks:
          "bad name!":
            schedule: {every: 5m}
            command: {shell: "true"}
          other:
            schedule: {cron: "61 * * * *"}
            command: {shell: "true"}
        """
    )
    problem_at(problems, "tasks.other.schedule.cron")
    assert any("bad name!" in p.message for p in problems), [(p.path, p.message) for p in problems]


def test_callable_without_colon() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {manual: true}
            python: {callable: agentd.examples.checksum_files}
            """
        )
    )
    message = problem_at(problems, "tasks.x.python.callable").message
    assert "package.module:function" in message


def test_yaml_syntax_error_gives_line_and_column() -> None:
    problems = problems_of("tasks:\n  x:\n    schedule: {every: 5m\n    command: 1\n")
    assert len(problems) == 1
    assert problems[0].path.startswith("line ")
    assert "column" in problems[0].path
    assert "YAML syntax" in problems[0].message


def test_a_bad_tagged_yaml_value_is_a_config_error_with_its_place() -> None:
    """PyYAML itself fails on ``!!timestamp nope`` with an AttributeError (a traceback
    at start instead of exit 78)."""
    problems = problems_of("tasks:\n  x:\n    schedule: {at: !!timestamp nope}\n")
    assert len(problems) == 1
    assert problems[0].path == "line 3, column 20"
    assert "timestamp" in problems[0].message and "nope" in problems[0].message


def test_top_level_must_be_a_mapping() -> None:
    problems = problems_of("- a\n- b\n")
    assert "mapping" in problems[0].message


def test_empty_file_is_an_empty_config() -> None:
    config = parse("")
    assert config.tasks == {}
    assert config.daemon.timezone == "UTC"


# ---------------------------------------------------------------- many errors at once


BROKEN = """
daemon:
  timezone: Nowhere/Town
  kill_grace: 5 minutes
tasks:
  nightly:
    schedule:
      cron: "99 * * * *"
    command: {shell: "true"}
    colour: blue
  digest:
    schedule: {at: 2026-01-01T09:00:00}
    agent: {model: m}
  fetch:
    schedule: {every: 5m}
    python: {callable: "no_colon_here"}
"""


def test_all_errors_of_a_file_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse(BROKEN)
    error = info.value
    expected = [
        "daemon.timezone",
        "daemon.kill_grace",
        "tasks.nightly.schedule.cron",
        "tasks.nightly.colour",
        "tasks.digest.schedule.at",
        "tasks.digest.agent.prompt",
        "tasks.fetch.python.callable",
    ]
    assert len(error.problems) >= 3
    paths = [p.path for p in error.problems]
    for path in expected:
        assert path in paths, paths

    lines = error.render().splitlines()
    assert len(lines) == len(error.problems) + 1
    assert all(line.startswith(f"{SOURCE}: ") for line in lines)
    assert f"{len(error.problems)} problem(s)" in lines[0]
    assert any("tasks.nightly.schedule.cron" in line for line in lines[1:])
    # str() of the exception is what an operator reads: the same text.
    assert str(error) == error.render()


# ---------------------------------------------------------------- interpolation


def test_interpolation_with_and_without_default_and_escape() -> None:
    config = parse(
        """
        daemon:
          state_dir: ${STATE:-/var/lib/agentd}
          http:
            host: ${HOST}
            port: ${PORT}
        tasks:
          x:
            schedule: {every: 5m}
            command:
              shell: "echo $${HOME} ${GREETING:-hi}-${WHO}"
        """,
        {"HOST": "0.0.0.0", "PORT": "8787", "WHO": "ops", "GREETING": ""},
    )
    assert config.daemon.state_dir == Path("/var/lib/agentd")
    assert config.daemon.http.host == "0.0.0.0"
    assert config.daemon.http.port == 8787
    assert isinstance(config.daemon.http.port, int)
    command = config.tasks["x"].command
    assert command is not None
    # $$ is a literal $, and an empty variable counts as unset (default used).
    assert command.shell == "echo ${HOME} hi-ops"


def test_interpolation_prefers_the_environment_over_the_default() -> None:
    config = parse("daemon:\n  state_dir: ${STATE:-/default}\n", {"STATE": "/from/env"})
    assert config.daemon.state_dir == Path("/from/env")


def test_unset_variable_without_default_is_an_error_at_the_value_path() -> None:
    problems = problems_of(
        """
        tasks:
          x:
            schedule: {every: 5m}
            command:
              argv: [curl, "${TARGET_URL}"]
        """
    )
    problem = problem_at(problems, "tasks.x.command.argv[1]")
    assert "TARGET_URL" in problem.message
    assert "not set" in problem.message


def test_interpolate_function_directly() -> None:
    problems: list[ConfigProblem] = []
    out = interpolate(
        {"a": ["${X}", "$$5", "${Y:-d}"], "b": 3, "c": "${MISSING}"},
        {"X": "1"},
        "",
        problems,
    )
    assert out == {"a": ["1", "$5", "d"], "b": 3, "c": ""}
    assert problems == [ConfigProblem("c", "environment variable MISSING is not set")]


# ---------------------------------------------------------------- load_config


def test_load_config_on_a_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, environ={})
    assert info.value.source == str(missing)
    assert str(missing) in info.value.render()
    assert "cannot read" in info.value.problems[0].message


def test_load_config_reads_a_file_and_resolves_python_path(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text("daemon:\n  python_path: [lib, /abs]\n", encoding="utf-8")
    config = load_config(path, environ={})
    assert config.source == str(path)
    assert config.daemon.python_path == [tmp_path / "lib", Path("/abs")]


def test_python_path_is_relative_to_the_config_as_named_not_to_its_symlinks_target(
    tmp_path: Path,
) -> None:
    """A mounted ConfigMap, as the kubelet lays it out: agentd.yaml -> ..data/agentd.yaml,
    ..data -> ..2026_12_03_10_00_00.1 (replaced at each update, the old one deleted)."""
    stamped = tmp_path / "..2026_12_03_10_00_00.1"
    stamped.mkdir()
    (stamped / "agentd.yaml").write_text("daemon:\n  python_path: [lib]\n", encoding="utf-8")
    (tmp_path / "..data").symlink_to(stamped.name)
    (tmp_path / "agentd.yaml").symlink_to("..data/agentd.yaml")
    config = load_config(tmp_path / "agentd.yaml", environ={})
    assert config.daemon.python_path == [tmp_path / "lib"]


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert all(line.startswith(f"{path}: ") for line in info.value.render().splitlines())


# ---------------------------------------------------------------- inactive_reason


def _agent_task(extra: str = "") -> TaskConfig:
    config = parse(
        one_task(
            """
            schedule: {cron: "0 9 * * *"}
            agent:
              model: gpt-4o-mini
              prompt: hello
              api_key_env: MY_LLM_KEY
            """
            + extra
        )
    )
    return config.tasks["x"]


def test_inactive_reason_agent_key_variable() -> None:
    task = _agent_task()
    reason = inactive_reason(task, {})
    assert reason is not None
    assert "MY_LLM_KEY" in reason
    assert inactive_reason(task, {"MY_LLM_KEY": ""}) is not None
    assert inactive_reason(task, {"MY_LLM_KEY": "sk-test"}) is None


def test_inactive_reason_disabled_task() -> None:
    task = _agent_task("enabled: false\n")
    reason = inactive_reason(task, {"MY_LLM_KEY": "sk-test"})
    assert reason is not None
    assert "disabled" in reason


def test_inactive_reason_missing_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    task = TaskConfig.model_validate(
        {
            "id": "x",
            "schedule": {"manual": True},
            "agent": {"model": "m", "prompt": "p", "api_key_file": str(key_file)},
        }
    )
    reason = inactive_reason(task, {})
    assert reason is not None
    assert str(key_file) in reason
    key_file.write_text("sk-test")
    assert inactive_reason(task, {}) is None


def test_command_task_is_active() -> None:
    config = parse(FULL)
    assert inactive_reason(config.tasks["cron-cmd"], {}) is None


# ---------------------------------------------------------------- redacted


def test_redacted_masks_secret_values_and_keeps_variable_names() -> None:
    config = parse(
        """
        daemon:
          http:
            token_env: AGENTD_TOKEN
        tasks:
          hook:
            schedule: {every: 5m}
            http:
              url: https://example.com/
              headers:
                Authorization: Bearer very-secret
                X-Request-Source: agentd
          cmd:
            schedule: {every: 5m}
            command:
              shell: "true"
              env:
                API_KEY: sk-123
                GITHUB_TOKEN: ghp_abc
                DB_PASSWORD: hunter2
                PLAIN: visible
          ai:
            schedule: {manual: true}
            agent:
              model: gpt-4o-mini
              prompt: hello
              api_key_env: OPENAI_API_KEY
              max_tokens: 300
        """
    )
    data = redacted(config)
    headers = data["tasks"]["hook"]["http"]["headers"]
    assert headers["Authorization"] == "***"
    assert headers["X-Request-Source"] == "agentd"
    env = data["tasks"]["cmd"]["command"]["env"]
    assert env == {
        "API_KEY": "***",
        "GITHUB_TOKEN": "***",
        "DB_PASSWORD": "***",
        "PLAIN": "visible",
    }
    agent = data["tasks"]["ai"]["agent"]
    assert agent["api_key_env"] == "OPENAI_API_KEY"
    assert agent["max_tokens"] == 300
    assert agent["prompt"] == "hello"
    assert data["daemon"]["http"]["token_env"] == "AGENTD_TOKEN"
    # Nothing secret leaks anywhere in the rendered data.
    text = json.dumps(data)
    for secret in ("very-secret", "sk-123", "ghp_abc", "hunter2"):
        assert secret not in text
    # The config itself is untouched.
    hook_http = config.tasks["hook"].http
    assert hook_http is not None
    assert hook_http.headers["Authorization"] == "Bearer very-secret"


# ---------------------------------------------------------------- the shipped example


def test_shipped_config_validates() -> None:
    config = load_config(SHIPPED, environ={})
    kinds = [t.kind for t in config.tasks.values()]
    assert "command" in kinds
    assert "python" in kinds
    assert "agent" in kinds
    agents = [t for t in config.tasks.values() if t.kind == "agent"]
    for task in agents:
        assert task.agent is not None
        if task.agent.provider == "example":  # the built-in example model: no key
            assert task.agent.base_url == "builtin:example" and task.agent.api_key_env is None
            assert "EXAMPLE MODEL" in str(task.description)
            continue
        key_var = task.agent.api_key_env
        assert key_var == "OPENAI_API_KEY"
        reason = inactive_reason(task, {})
        assert reason is not None
        assert "OPENAI_API_KEY" in reason
        assert inactive_reason(task, {"OPENAI_API_KEY": "sk-test"}) is None
    # The offline agent example is its keyed twin on the example model, not a default.
    offline, keyed = config.tasks["host-check-offline"].agent, config.tasks["host-check"].agent
    assert offline is not None and keyed is not None
    assert offline.tools is not None and offline.tools == keyed.tools
    assert offline.response_format is not None and offline.response_format == keyed.response_format
    assert (offline.prompt, offline.system) == (keyed.prompt, keyed.system)
    assert [t.id for t in agents if t.agent and t.agent.provider == "example"] == [
        "host-check-offline"
    ]
    # The agent task goes through a declared, priced provider under the global cap.
    digest = config.tasks["daily-digest"]
    assert digest.agent is not None and digest.agent.provider == "openai"
    assert digest.agent.model in config.providers["openai"].prices
    assert config.limits.usd_per_day is not None
    assert digest.budget.task.usd_per_day is not None
    assert digest.budget.task.usd_per_day <= config.limits.usd_per_day
    assert set(config.alerts.channels) >= {"journal"}
    # Everything else runs offline.
    for task in config.tasks.values():
        if task.kind != "agent":
            assert inactive_reason(task, {}) is None


# ---------------------------------------------------------------- agentd check-config


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTD_CONFIG", "OPENAI_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_cli_broken_file_exits_78(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN, encoding="utf-8")
    result = _cli("check-config", "--config", str(broken), cwd=tmp_path)
    assert result.returncode == exitcodes.CONFIG == 78
    assert "tasks.nightly.schedule.cron" in result.stderr
    assert f"{broken}: tasks.nightly.schedule.cron" in result.stderr
    assert result.stdout == ""


def test_check_config_cli_next_json(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text(
        textwrap.dedent(
            """
            tasks:
              berlin:
                schedule: {cron: "0 9 * * *", timezone: Europe/Berlin}
                command: {shell: "true"}
              often:
                schedule: {every: 10m}
                command: {shell: "true"}
              by-hand:
                schedule: {manual: true}
                command: {shell: "true"}
              ai:
                schedule: {cron: "30 8 * * 1-5"}
                agent: {model: m, prompt: p, api_key_env: OPENAI_API_KEY}
            """
        ),
        encoding="utf-8",
    )
    result = _cli("check-config", "--config", str(path), "--next", "3", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    tasks = report["tasks"]
    assert set(tasks) == {"berlin", "often", "by-hand", "ai"}
    assert tasks["berlin"]["timezone"] == "Europe/Berlin"
    assert tasks["often"]["timezone"] == "UTC"
    assert [tasks[t]["kind"] for t in ("berlin", "ai")] == ["command", "agent"]
    assert tasks["berlin"]["inactive"] is None
    assert "OPENAI_API_KEY" in tasks["ai"]["inactive"]  # unset in the child's environment
    for task_id in ("berlin", "often", "ai"):
        fires = tasks[task_id]["next"]
        assert len(fires) == 3, fires
        instants = []
        for fire in fires:
            local = datetime.fromisoformat(fire["local"])
            utc = datetime.fromisoformat(fire["utc"])
            assert local.tzinfo is not None
            assert utc.utcoffset() == timedelta(0)
            assert local == utc  # the same instant, two renderings
            instants.append(utc)
        assert instants == sorted(instants)
        assert len(set(instants)) == 3
    berlin_local = [datetime.fromisoformat(f["local"]) for f in tasks["berlin"]["next"]]
    assert all(t.hour == 9 and t.minute == 0 for t in berlin_local)
    assert all(t.utcoffset() in (timedelta(hours=1), timedelta(hours=2)) for t in berlin_local)
    often = [datetime.fromisoformat(f["utc"]) for f in tasks["often"]["next"]]
    assert often[1] - often[0] == timedelta(minutes=10)
    assert tasks["by-hand"]["next"] == []


def test_config_watch_is_on_under_kubernetes_unless_set() -> None:
    from agentd.config import WatchConfig

    assert WatchConfig().watching({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert not WatchConfig().watching({})
    assert not WatchConfig(watch=False).watching({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert WatchConfig(watch=True).watching({})
    with pytest.raises(ConfigError) as info:
        parse_config("config: {watch_interval: 0s}\n", "x.yaml", {})
    assert "config.watch_interval" in info.value.render()


# ---------------------------------------------------------------- agent tools

TOOLS_TASK = """
schedule: {manual: true}
agent:
  base_url: http://127.0.0.1:1/v1
  model: m
  prompt: p
  tools:
%s
"""


def tools_task(tools_yaml: str) -> str:
    return one_task(TOOLS_TASK % textwrap.indent(textwrap.dedent(tools_yaml), "    "))


def test_agent_tools_of_each_kind_parse_with_their_defaults() -> None:
    config = parse(
        tools_task(
            """
            - name: grep
              description: Search the notes
              parameters: {type: object, properties: {word: {type: string}}, required: [word]}
              command: {argv: [grep, -r, "{word}", notes], env: {WORD: "{word}"}}
              idempotent: true
            - name: weather
              parameters: {type: object, properties: {city: {type: string}}}
              http: {url: "https://api.example.com/w/{city}", allow_hosts: [API.example.com]}
              timeout: 5s
            - name: add
              python: {callable: "tools_mod:add"}
            """
        )
    )
    agent = config.tasks["x"].agent
    assert agent is not None and agent.tools is not None and agent.max_steps == 8
    grep, weather, add = agent.tools
    assert (grep.kind, grep.idempotent, grep.timeout) == ("command", True, 60.0)
    assert (weather.kind, weather.timeout, weather.idempotent) == ("http", 5.0, False)
    assert weather.http is not None and weather.http.allow_hosts == ["api.example.com"]
    assert (add.kind, add.parameters) == ("python", {"type": "object", "properties": {}})


def test_agent_tool_problems_name_their_path() -> None:
    problems = problems_of(
        tools_task(
            """
            - name: "bad name"
              command: {argv: [echo]}
            - name: t1
              parameters: {type: object, properties: {q: {type: stringy}}}
              command: {argv: ["{q.real}"]}
            - name: t2
              http: {url: "https://evil.example/x", allow_hosts: [good.example]}
            - name: t3
              sensitive: true
              python: {callable: "m:f"}
            - name: t4
              command: {argv: []}
            - name: t5
            - name: t6
              parameters: {type: array}
              python: {callable: "no-colon"}
            """
        )
    )
    at = "tasks.x.agent.tools"
    assert "must be 1-64" in problem_at(problems, f"{at}[0].name").message
    assert (
        "not a JSON schema (properties/q/type)"
        in problem_at(problems, f"{at}[1].parameters").message
    )
    assert "only {name} of an argument" in problem_at(problems, f"{at}[1].command.argv").message
    assert "'evil.example' is not in allow_hosts" in problem_at(problems, f"{at}[2].http").message
    assert not [p for p in problems if p.path.startswith(f"{at}[3]")]  # sensitive: valid
    assert problem_at(problems, f"{at}[4].command.argv")
    assert "exactly one of command, http, python" in problem_at(problems, f"{at}[5]").message
    assert "must describe an object" in problem_at(problems, f"{at}[6].parameters").message
    assert "package.module:function" in problem_at(problems, f"{at}[6].python.callable").message


def test_limits_sensitive_tools_are_added_to_every_agents_own_list() -> None:
    text = textwrap.dedent(
        """
        limits:
          sensitive_tools: ["rm_*", deploy]
        tasks:
          a:
            schedule: {manual: true}
            agent:
              base_url: http://127.0.0.1:9/v1
              model: m
              prompt: p
              sensitive_tools: [push]
              approval_timeout: 2h
              tools:
                - {name: push, command: {argv: [echo]}}
                - {name: rm_tree, command: {argv: [echo]}}
        """
    )
    agent = parse_config(text, "t.yaml", {}).tasks["a"].agent
    assert agent is not None
    assert agent.sensitive_tools == ["push", "rm_*", "deploy"]
    assert agent.approval_timeout == 7200.0
    problems = problems_of(text.replace("approval_timeout: 2h", "approval_timeout: 0s"))
    assert problem_at(problems, "tasks.a.agent.approval_timeout")


def test_agent_tool_placeholders_must_name_parameters() -> None:
    problems = problems_of(
        tools_task(
            """
            - name: t
              parameters: {type: object, properties: {word: {type: string}}}
              command: {argv: [echo, "{word}", "{wrod}"], env: {W: "{nope}"}}
            - name: u
              http: {url: "https://{host}/x", allow_hosts: [a.example]}
            """
        )
    )
    at = "tasks.x.agent.tools"
    assert "['wrod'] name no property" in problem_at(problems, f"{at}[0].command.argv[2]").message
    assert "['nope']" in problem_at(problems, f"{at}[0].command.env.W").message
    assert "(have: none)" in problem_at(problems, f"{at}[1].http.url").message


def test_items_concurrency_needs_items_and_a_sane_width() -> None:
    def agent(extra: str) -> str:
        return f"""
            schedule: {{manual: true}}
            agent: {{base_url: "http://127.0.0.1:1/v1", model: m, prompt: p, {extra}}}
            """

    alone = problems_of(one_task(agent("items_concurrency: 4")))
    assert "items_concurrency needs items" in problem_at(alone, "tasks.x.agent").message
    wide = problems_of(one_task(agent("items: [1, 2], items_concurrency: 65")))
    assert problem_at(wide, "tasks.x.agent.items_concurrency")
    task = parse(one_task(agent("items: [1, 2], items_concurrency: 2"))).tasks["x"]
    assert task.agent is not None and task.agent.items_concurrency == 2


def test_agent_tools_unique_and_not_with_items() -> None:
    twice = problems_of(
        tools_task(
            """
            - {name: a, python: {callable: "m:f"}}
            - {name: a, python: {callable: "m:g"}}
            """
        )
    )
    assert "a twice" in problem_at(twice, "tasks.x.agent").message
    both = problems_of(
        one_task(
            """
            schedule: {manual: true}
            agent:
              base_url: http://127.0.0.1:1/v1
              model: m
              prompt: p
              items: [1]
              tools: [{name: a, python: {callable: "m:f"}}]
            """
        )
    )
    assert "give tools or items, not both" in problem_at(both, "tasks.x.agent").message
    steps = problems_of(
        tools_task('- {name: a, python: {callable: "m:f"}}').replace(
            "  tools:", "  max_steps: 0\n    tools:"
        )
    )
    assert "greater than or equal to 1" in problem_at(steps, "tasks.x.agent.max_steps").message


# ---------------------------------------------------------------- response_format


def test_a_response_format_parses_and_goes_on_the_wire_as_openai_asks() -> None:
    config = parse(
        one_task(
            """
            schedule: {manual: true}
            agent:
              base_url: http://127.0.0.1:1/v1
              model: m
              prompt: p
              response_format:
                name: verdict
                description: the verdict
                schema: {type: object, properties: {ok: {type: boolean}}, required: [ok]}
            """
        )
    )
    agent = config.tasks["x"].agent
    assert agent is not None and agent.response_format is not None
    assert agent.response_format.strict is True
    assert agent.response_format.wire() == {
        "type": "json_schema",
        "json_schema": {
            "name": "verdict",
            "schema": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
            },
            "strict": True,
            "description": "the verdict",
        },
    }
    assert redacted(config)["tasks"]["x"]["agent"]["response_format"]["schema"]["required"] == [
        "ok"
    ]


def test_response_format_problems_name_their_path() -> None:
    def problems(body: str) -> list[ConfigProblem]:
        return problems_of(
            one_task(
                "schedule: {manual: true}\n"
                "agent: {base_url: 'http://127.0.0.1:1/v1', model: m, prompt: p,"
                f" response_format: {body}}}\n"
            )
        )

    at = "tasks.x.agent.response_format"
    bad = problems("{name: v, schema: {type: object, properties: {q: {type: stringy}}}}")
    assert "not a JSON schema (properties/q/type)" in problem_at(bad, f"{at}.schema").message
    array = problems("{name: v, schema: {type: array}}")
    assert "must describe an object" in problem_at(array, f"{at}.schema").message
    name = problems("{name: 'a verdict', schema: {type: object}}")
    assert "must be 1-64" in problem_at(name, f"{at}.name").message
    assert problem_at(problems("{name: v}"), f"{at}.schema")
    extra = problems("{name: v, schema: {type: object}, strict: true, format: json}")
    assert problem_at(extra, f"{at}.format")


def test_only_the_example_model_is_a_base_url_that_is_not_http() -> None:
    def provider(url: str) -> str:
        return f"providers: {{p: {{base_url: '{url}', default_model: m}}}}\n" + one_task(
            "schedule: {manual: true}\nagent: {provider: p, prompt: hi}\n"
        )

    config = parse(provider("builtin:example"))
    assert config.providers["p"].base_url == "builtin:example"
    for url in ("builtin:other", "builtin:example/v1", "file:///etc/passwd"):
        bad = problems_of(provider(url))
        assert (
            "URL must start with http:// or https://"
            in problem_at(bad, "providers.p.base_url").message
        )


MCP_TASK = """
schedule: {manual: true}
agent:
  base_url: http://127.0.0.1:1/v1
  model: m
  prompt: p
%s
"""


def mcp_task(body_yaml: str) -> str:
    return one_task(MCP_TASK % textwrap.indent(textwrap.dedent(body_yaml), "  "))


def test_agent_mcp_servers_parse_with_their_defaults() -> None:
    config = parse(
        mcp_task(
            """
            mcp:
              - name: files
                command: [python3, -m, some_server]
                env: {ROOT: "${SRV}/files"}
                allow: [read_file, list_dir]
                idempotent: [read_file]
              - name: web-2
                command: [web-server]
                allow: [fetch]
                timeout: 5s
                start_timeout: 1m
            """
        ),
        {"SRV": "/srv"},
    )
    agent = config.tasks["x"].agent
    assert agent is not None and agent.tools is None and agent.mcp is not None
    files, web = agent.mcp
    assert (files.command, files.env) == (["python3", "-m", "some_server"], {"ROOT": "/srv/files"})
    assert (files.allow, files.idempotent, files.sensitive) == (
        ["read_file", "list_dir"],
        ["read_file"],
        [],
    )
    assert (files.timeout, files.start_timeout) == (60.0, 10.0)
    assert (web.name, web.timeout, web.start_timeout) == ("web-2", 5.0, 60.0)


def test_agent_mcp_problems_name_their_path() -> None:
    problems = problems_of(
        mcp_task(
            f"""
            mcp:
              - name: "bad name"
                command: [s]
                allow: [a]
              - name: s1
                command: []
                allow: []
              - name: s2
                command: [s]
              - name: s3
                command: [s]
                allow: [ok, "has.dot", ok, {"x" * 60}]
              - name: s4
                command: [s]
                allow: [a, b]
                idempotent: [a, c]
                sensitive: [b, z]
                env: {{"1X": y}}
                shell: "s --x"
                timeout: 0s
            """
        )
    )
    at = "tasks.x.agent.mcp"
    assert "must be 1-32" in problem_at(problems, f"{at}[0].name").message
    assert problem_at(problems, f"{at}[1].command")
    assert problem_at(problems, f"{at}[1].allow")
    assert "required" in problem_at(problems, f"{at}[2].allow").message
    message = problem_at(problems, f"{at}[3].allow").message
    assert "'s3__has.dot' is not a tool name the model accepts" in message
    assert "['c'] not in allow (have: a, b)" in problem_at(problems, f"{at}[4].idempotent").message
    assert "['z'] not in allow (have: a, b)" in problem_at(problems, f"{at}[4].sensitive").message
    assert "not an environment variable name" in problem_at(problems, f"{at}[4].env").message
    assert problem_at(problems, f"{at}[4].shell")
    assert "greater than 0" in problem_at(problems, f"{at}[4].timeout").message
    long_name = problems_of(
        mcp_task(f"mcp: [{{name: s, command: [s], allow: [ok, ok, {'x' * 62}]}}]")
    )
    assert "is not a tool name" in problem_at(long_name, f"{at}[0].allow").message
    twice = problems_of(mcp_task("mcp: [{name: s, command: [s], allow: [ok, ok]}]"))
    assert "ok twice" in problem_at(twice, f"{at}[0].allow").message


def test_agent_mcp_servers_and_tools_share_one_namespace() -> None:
    server = "{name: files, command: [s], allow: [read]}"
    clash = problems_of(
        mcp_task(f'tools: [{{name: files__read, python: {{callable: "m:f"}}}}]\nmcp: [{server}]')
    )
    assert "files__read twice" in problem_at(clash, "tasks.x.agent").message
    twice = problems_of(mcp_task(f"mcp: [{server}, {server}]"))
    assert "server names must be unique (files twice)" in problem_at(twice, "tasks.x.agent").message
    empty = problems_of(mcp_task("mcp: []"))
    assert "give at least one server" in problem_at(empty, "tasks.x.agent").message
    items = problems_of(mcp_task(f"items: [1]\nmcp: [{server}]"))
    assert "give mcp or items, not both" in problem_at(items, "tasks.x.agent").message
    built = problems_of(
        mcp_task(f"tools: [{{name: t, mcp: {{server: files, tool: read}}}}]\nmcp: [{server}]")
    )
    assert "an MCP server's tools come from mcp:" in problem_at(built, "tasks.x.agent").message
    both = parse(mcp_task(f'tools: [{{name: read, python: {{callable: "m:f"}}}}]\nmcp: [{server}]'))
    agent = both.tasks["x"].agent
    assert agent is not None and agent.tools is not None and agent.mcp is not None


# ---------------------------------------------------------------- trigger params, deadlines

SCHEMA = "{type: object, properties: {n: {type: integer}, who: {type: string}}, required: [n]}"


def test_params_schema_run_timeout_start_within_and_the_key_window_parse() -> None:
    config = parse(
        "limits: {trigger_key_window: 2h}\n"
        + one_task(
            f"""
            schedule: {{every: 1h}}
            command: {{argv: ["true"]}}
            params: {{n: 3}}
            params_schema: {SCHEMA}
            timeout: 1m
            run_timeout: 10m
            start_within: 30s
            """
        )
    )
    task = config.tasks["x"]
    assert task.params_schema is not None and task.params_schema["required"] == ["n"]
    assert (task.timeout, task.run_timeout, task.start_within) == (60.0, 600.0, 30.0)
    assert config.limits.trigger_key_window == 7200.0
    defaults = parse(one_task('schedule: {every: 1h}\ncommand: {argv: ["true"]}\n'))
    assert defaults.limits.trigger_key_window == 86400.0
    assert defaults.tasks["x"].run_timeout is None and defaults.tasks["x"].start_within is None


def test_a_scheduled_task_s_params_must_match_its_params_schema() -> None:
    problems = problems_of(
        one_task(
            f"""
            schedule: {{every: 1h}}
            command: {{argv: ["true"]}}
            params: {{n: three}}
            params_schema: {SCHEMA}
            """
        )
    )
    message = problem_at(problems, "tasks.x").message
    assert "params do not match params_schema (n: 'three' is not of type 'integer')" in message


def test_a_manual_task_s_params_may_leave_the_required_ones_to_its_triggers() -> None:
    config = parse(
        one_task(
            f"""
            schedule: {{manual: true}}
            command: {{argv: ["true"]}}
            params_schema: {SCHEMA}
            """
        )
    )
    assert config.tasks["x"].params == {}


def test_a_bad_params_schema_and_bad_deadlines_name_their_path() -> None:
    problems = problems_of(
        one_task(
            """
            schedule: {every: 1h}
            command: {argv: ["true"]}
            params_schema: {type: object, properties: {n: {type: integr}}}
            run_timeout: 0s
            start_within: -1s
            """
        )
    )
    assert (
        "not a JSON schema (properties/n/type)"
        in problem_at(problems, "tasks.x.params_schema").message
    )
    assert problem_at(problems, "tasks.x.run_timeout")
    assert problem_at(problems, "tasks.x.start_within")
    array = problems_of(
        one_task('schedule: {every: 1h}\ncommand: {argv: ["true"]}\nparams_schema: {type: array}\n')
    )
    assert "must describe an object" in problem_at(array, "tasks.x.params_schema").message
