"""Budget maths (pure, explicit datetimes), the ledger on a real SQLite file, and the
budget part of the config: windows in a task's zone, worst cases, alarms once per
window, the fire gate, and config errors naming the path."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agentd.budget import (
    THRESHOLDS,
    Need,
    call_scopes,
    cost_usd,
    estimate_prompt_tokens,
    fits,
    reached,
    window_at,
    worst_case,
)
from agentd.clock import ManualClock, to_iso
from agentd.config import Config, ConfigError, PriceConfig, parse_config, redacted
from agentd.control import Control
from agentd.ledger import Refusal, charge_stale, commit, reserve, spent, window_blocked
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 28, 22, 30, tzinfo=UTC)  # 23:30 in Berlin, the eve of spring forward


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "budget-test.yaml", {})


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return {p.path: p.message for p in info.value.problems}


# ---------------------------------------------------------------- windows


def test_day_window_in_a_zone() -> None:
    start, end = window_at("day", datetime(2026, 1, 15, 23, 30, tzinfo=UTC), "Europe/Berlin")
    # 23:30 UTC is already the 16th in Berlin (UTC+1 in winter).
    assert start == datetime(2026, 1, 15, 23, 0, tzinfo=UTC)
    assert end == datetime(2026, 1, 16, 23, 0, tzinfo=UTC)


def test_day_window_on_berlin_dst_days_is_23_and_25_hours() -> None:
    spring = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
    start, end = window_at("day", spring, "Europe/Berlin")
    assert start == datetime(2026, 3, 28, 23, 0, tzinfo=UTC)  # 00:00 CET
    assert end == datetime(2026, 3, 29, 22, 0, tzinfo=UTC)  # 00:00 CEST
    assert end - start == timedelta(hours=23)
    autumn = datetime(2026, 10, 25, 12, 0, tzinfo=UTC)
    start, end = window_at("day", autumn, "Europe/Berlin")
    assert end - start == timedelta(hours=25)
    # The instant just before local midnight belongs to the old day, the one at it to the new.
    before = window_at("day", datetime(2026, 3, 29, 21, 59, 59, tzinfo=UTC), "Europe/Berlin")
    after = window_at("day", datetime(2026, 3, 29, 22, 0, tzinfo=UTC), "Europe/Berlin")
    assert before[1] == after[0] == datetime(2026, 3, 29, 22, 0, tzinfo=UTC)


def test_month_window_and_year_end() -> None:
    start, end = window_at("month", datetime(2026, 12, 31, 23, 30, tzinfo=UTC), "UTC")
    assert (start, end) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    # In Berlin that instant is already January.
    start, end = window_at("month", datetime(2026, 12, 31, 23, 30, tzinfo=UTC), "Europe/Berlin")
    assert start == datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert end == datetime(2027, 1, 31, 23, 0, tzinfo=UTC)
    # March in Berlin holds the spring-forward hour: 31 days minus one hour.
    start, end = window_at("month", datetime(2026, 3, 10, tzinfo=UTC), "Europe/Berlin")
    assert end - start == timedelta(days=31, hours=-1)


# ---------------------------------------------------------------- prices and worst cases


def test_cost_and_worst_case() -> None:
    price = PriceConfig(input=0.15, output=0.60)  # per million
    assert cost_usd(price, 1_000_000, 0) == pytest.approx(0.15)
    assert cost_usd(price, 1000, 500) == pytest.approx(0.00015 + 0.0003)
    assert cost_usd(None, 10**9, 10**9) == 0.0  # a free local model
    need = worst_case(price, 100, 300)
    assert need == Need(100, 300, pytest.approx((100 * 0.15 + 300 * 0.60) / 1e6))
    assert need.tokens == 400


def test_prompt_estimate_is_on_the_high_side() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20  # ~200 real tokens
    estimate = estimate_prompt_tokens([{"role": "user", "content": text}])
    assert 200 < estimate < 400
    assert estimate_prompt_tokens([]) == 3
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert estimate_prompt_tokens(two) == 3 + (4 + 3) + (4 + 1)


def test_thresholds_reached() -> None:
    assert THRESHOLDS == (0.5, 0.8, 1.0)
    assert reached(0.49, 1.0) == []
    assert reached(0.5, 1.0) == [0.5]
    assert reached(0.8, 1.0) == [0.5, 0.8]
    assert reached(0.1 + 0.2, 0.3) == [0.5, 0.8, 1.0]  # float sums count as full


# ---------------------------------------------------------------- config


BUDGETED = """
daemon: {timezone: UTC}
providers:
  openai:
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    default_model: gpt-4o-mini
    prices:
      gpt-4o-mini: {input: 0.15, output: 0.60}
limits: {usd_per_day: 5}
tasks:
  digest:
    schedule: {cron: "0 9 * * *", timezone: Europe/Berlin}
    agent: {provider: openai, prompt: hi}
    budget:
      run: {tokens: 20000, usd: 0.5}
      task: {usd_per_day: 1, usd_per_month: 20}
"""


def test_budgets_and_providers_parse_and_link() -> None:
    config = parse(BUDGETED)
    agent = config.tasks["digest"].agent
    assert agent is not None
    # The named provider is copied into the task: URL, key source, default model.
    assert agent.base_url == "https://api.openai.com/v1"
    assert agent.api_key_env == "OPENAI_API_KEY" and agent.model == "gpt-4o-mini"
    scopes = call_scopes(config, config.tasks["digest"], T0)
    assert [s.key for s in scopes] == [
        "run",
        "task:digest:day",
        "task:digest:month",
        "global:day",
    ]
    day = scopes[1]
    assert day.start == datetime(2026, 3, 27, 23, 0, tzinfo=UTC)  # Berlin midnight: task zone
    assert scopes[3].start == datetime(2026, 3, 28, tzinfo=UTC)  # the global day is UTC here


def test_task_budget_above_the_global_cap_is_a_config_error() -> None:
    found = problems(
        BUDGETED.replace("usd_per_day: 1,", "usd_per_day: 7,").replace("usd: 0.5", "usd: 6")
    )
    assert found["tasks.digest.budget.task.usd_per_day"] == (
        "7 USD exceeds the global cap limits.usd_per_day (5 USD)"
    )
    assert "exceeds the global cap" in found["tasks.digest.budget.run.usd"]


def test_limits_max_run_usd_caps_each_run_at_config_time_and_is_the_default_run_cap() -> None:
    capped = BUDGETED.replace("limits: {usd_per_day: 5}", "limits: {max_run_usd: 0.25}")
    found = problems(capped)
    assert found == {
        "tasks.digest.budget.run.usd": (
            "0.5 USD exceeds the system run cap limits.max_run_usd (0.25 USD)"
        )
    }
    # A task without budget.run.usd gets the cap as its run scope (its tokens stay).
    config = parse(capped.replace("run: {tokens: 20000, usd: 0.5}", "run: {tokens: 20000}"))
    [run] = [s for s in call_scopes(config, config.tasks["digest"], T0) if s.key == "run"]
    assert (run.usd, run.tokens) == (0.25, 20000)
    # One under the cap keeps its own.
    config = parse(capped.replace("usd: 0.5", "usd: 0.1"))
    [run] = [s for s in call_scopes(config, config.tasks["digest"], T0) if s.key == "run"]
    assert run.usd == 0.1
    # The cap alone makes a run scope for a task with no run budget at all.
    bare = capped.replace("      run: {tokens: 20000, usd: 0.5}\n", "")
    assert "run:" not in bare.split("budget:")[1].split("task:")[0]
    config = parse(bare)
    assert call_scopes(config, config.tasks["digest"], T0)[0].usd == 0.25


def test_usd_budget_needs_a_price_and_a_known_provider() -> None:
    found = problems(
        BUDGETED.replace(
            "agent: {provider: openai, prompt: hi}",
            "agent: {provider: openai, model: gpt-5, prompt: hi}",
        )
    )
    assert (
        "no price for model 'gpt-5' in providers.openai.prices" in found["tasks.digest.agent.model"]
    )
    found = problems(BUDGETED.replace("provider: openai,", "provider: nope,"))
    assert found["tasks.digest.agent.provider"] == "unknown provider 'nope' (have: openai)"
    inline = BUDGETED.replace(
        "agent: {provider: openai, prompt: hi}", "agent: {model: m, prompt: hi}"
    )
    assert "named provider" in problems(inline)["tasks.digest.agent.provider"]


def test_provider_fields_are_not_repeated_in_the_task() -> None:
    found = problems(
        BUDGETED.replace(
            "agent: {provider: openai,", "agent: {provider: openai, base_url: http://x,"
        )
    )
    assert "base_url come(s) from providers.openai" in found["tasks.digest.agent"]


def test_redacted_config_hides_webhook_urls_and_keeps_variable_names() -> None:
    config = parse(
        BUDGETED
        + """
alerts:
  channels:
    slack:
      webhook:
        url: https://hooks.slack.com/services/T00/B00/very-secret
        secret_env: HOOK_SECRET
        headers: {Authorization: Bearer also-secret}
  rules:
    - {events: ["*"], channels: [slack]}
"""
    )
    data = redacted(config)
    hook = data["alerts"]["channels"]["slack"]["webhook"]
    assert hook["url"] == "https://hooks.slack.com/***"
    assert hook["secret_env"] == "HOOK_SECRET"
    assert "very-secret" not in str(data) and "also-secret" not in str(data)
    assert data["providers"]["openai"]["api_key_env"] == "OPENAI_API_KEY"


# ---------------------------------------------------------------- the ledger


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "state.sqlite")
    yield s
    s.close()


WINDOWED = """
providers:
  p:
    base_url: http://127.0.0.1:9/v1
    default_model: m
    prices: {m: {input: 1000, output: 1000}}
tasks:
  t:
    schedule: {every: 1h, timezone: Europe/Berlin}
    agent: {provider: p, prompt: hi}
    budget: {task: {usd_per_day: 1.0}}
  other:
    schedule: {every: 1h}
    command: {shell: "true"}
"""


def spend(
    store: SqliteStore, config: Config, now: datetime, usd: float, run: str = "r1"
) -> int | Refusal:
    """Reserve a call of ``usd`` worst case and commit it at that cost."""
    task = config.tasks["t"]
    scopes = call_scopes(config, task, now)
    need = Need(int(usd * 1000), 0, usd)
    entry = reserve(
        store, now, run_id=run, task_id="t", provider="p", model="m", item=None, need=need,
        scopes=scopes,
    )  # fmt: skip
    if isinstance(entry, Refusal):
        return entry
    commit(
        store, now, entry, input_tokens=need.input_tokens, output_tokens=0, cost=usd,
        status="200", duration_s=0.1, usage_missing=False, scopes=scopes,
    )  # fmt: skip
    return entry


def alarms(store: SqliteStore) -> list[tuple[str, int]]:
    return [
        (e["data"]["scope"], e["data"]["threshold_pct"])
        for e in store.events()
        if e["kind"] == "budget_alarm"
    ]


def test_alarms_fire_once_per_threshold_per_window(store: SqliteStore) -> None:
    config = parse(WINDOWED)
    assert not isinstance(spend(store, config, T0, 0.3), Refusal)
    assert alarms(store) == []
    spend(store, config, T0 + timedelta(minutes=1), 0.3)  # 0.6: 50 %
    spend(store, config, T0 + timedelta(minutes=2), 0.1)  # 0.7: nothing new
    spend(store, config, T0 + timedelta(minutes=3), 0.15)  # 0.85: 80 %
    assert alarms(store) == [("t:day", 50), ("t:day", 80)]
    refused = spend(store, config, T0 + timedelta(minutes=4), 0.2)  # would make 1.05
    assert isinstance(refused, Refusal) and refused.scope.key == "task:t:day"
    assert refused.message().startswith("budget t:day exhausted: 0.850000 of 1 USD spent")
    assert alarms(store) == [("t:day", 50), ("t:day", 80), ("t:day", 100)]
    spend(store, config, T0 + timedelta(minutes=5), 0.3)  # refused again: no second alarm
    assert len(alarms(store)) == 3
    usd, _ = spent(store, call_scopes(config, config.tasks["t"], T0)[0])
    assert usd == pytest.approx(0.85)  # refusals reserve nothing


def test_the_next_day_is_a_new_window(store: SqliteStore) -> None:
    config = parse(WINDOWED)
    spend(store, config, T0, 0.9)
    assert isinstance(spend(store, config, T0, 0.2), Refusal)
    # 23:30 UTC on the 28th is already the 29th in Berlin: the short DST day starts anew.
    tomorrow = T0 + timedelta(hours=1)
    assert not isinstance(spend(store, config, tomorrow, 0.6), Refusal)
    assert alarms(store)[-1] == ("t:day", 50)
    [first_50, *_] = [e for e in store.events() if e["kind"] == "budget_alarm"]
    assert first_50["data"]["window_start"] == to_iso(datetime(2026, 3, 27, 23, tzinfo=UTC))


def test_window_gate_blocks_scheduled_fires_until_the_window_ends(store: SqliteStore) -> None:
    config = parse(WINDOWED)
    store.sync_tasks({"t": ("f", "agent"), "other": ("g", "command")}, T0)
    store.fire_gate = lambda task_id, now: window_blocked(store, config, task_id, now)
    spend(store, config, T0, 0.9)
    first = store.fire("t", T0, scheduled_for=T0)
    assert first.status == "queued"  # 0.1 left: room, as far as anyone knows
    spend(store, config, T0, 0.3)  # refused: the window is now full
    blocked = store.fire("t", T0, scheduled_for=T0 + timedelta(minutes=1), overlap="allow")
    assert (blocked.status, blocked.reason) == ("skipped", "budget")
    [skip] = [e for e in store.events() if e["kind"] == "skip"]
    assert skip["data"]["scope"] == "t:day" and skip["data"]["reason"] == "budget"
    # A manual trigger is the operator's call; other tasks are not affected.
    manual = store.fire("t", T0, trigger="manual", overlap="allow", honour_pause=False)
    assert manual.status == "queued"
    assert store.fire("other", T0, scheduled_for=T0).status == "queued"
    # The next Berlin day has room again.
    later = T0 + timedelta(hours=2)
    assert store.fire("t", later, scheduled_for=later, overlap="allow").status == "queued"


def test_a_backfill_goes_through_the_budget_gate_as_scheduled_fires_do(
    store: SqliteStore,
) -> None:
    config = parse(WINDOWED.replace("{every: 1h, timezone: Europe/Berlin}", "{every: 1h}"))
    store.sync_tasks({"t": ("f", "agent"), "other": ("g", "command")}, T0)
    store.fire_gate = lambda task_id, now: window_blocked(store, config, task_id, now)
    spend(store, config, T0, 0.9)
    spend(store, config, T0, 0.3)  # refused: the window is now full
    control = Control(store, config, ManualClock(T0))
    start = datetime(2026, 3, 28, 10, tzinfo=UTC)
    done = control.backfill("t", start, start + timedelta(hours=2))
    assert [(o["status"], o["reason"]) for o in done["occurrences"]] == [("skipped", "budget")] * 2
    assert control.backfill("other", start, start + timedelta(hours=2))["created"] == 2


def test_a_raised_limit_reopens_a_full_window(store: SqliteStore) -> None:
    config = parse(WINDOWED)
    spend(store, config, T0, 0.9)
    spend(store, config, T0, 0.3)  # refused
    assert window_blocked(store, config, "t", T0) is not None
    raised = parse(WINDOWED.replace("usd_per_day: 1.0", "usd_per_day: 2.0"))
    assert window_blocked(store, raised, "t", T0) is None


def test_concurrent_reservations_cannot_both_take_the_last_dollar(store: SqliteStore) -> None:
    config = parse(WINDOWED)
    task = config.tasks["t"]
    scopes = call_scopes(config, task, T0)
    need = Need(1, 0, 0.6)
    kwargs = dict(task_id="t", provider="p", model="m", item=None, need=need, scopes=scopes)
    first = reserve(store, T0, run_id="a", **kwargs)  # type: ignore[arg-type]
    second = reserve(store, T0, run_id="b", **kwargs)  # type: ignore[arg-type]
    assert isinstance(first, int) and isinstance(second, Refusal)


def test_stale_reservations_are_charged_at_worst_case(store: SqliteStore) -> None:
    config = parse(WINDOWED)
    scopes = call_scopes(config, config.tasks["t"], T0)
    entry = reserve(
        store, T0, run_id="r", task_id="t", provider="p", model="m", item=3,
        need=Need(100, 50, 0.15), scopes=scopes,
    )  # fmt: skip
    assert isinstance(entry, int)
    assert charge_stale(store, T0) == 1
    row = store.conn.execute("SELECT * FROM ledger WHERE id=?", (entry,)).fetchone()
    assert (row["state"], row["status"], row["cost_usd"]) == ("committed", "lost", 0.15)
    assert charge_stale(store, T0) == 0


def test_fits_checks_usd_and_tokens() -> None:
    config = parse(
        WINDOWED.replace(
            "budget: {task: {usd_per_day: 1.0}}", "budget: {run: {tokens: 100, usd: 1}}"
        )
    )
    [run] = call_scopes(config, config.tasks["t"], T0)
    assert fits(run, 0.5, 50, Need(30, 20, 0.5))
    assert not fits(run, 0.5, 50, Need(30, 21, 0.1))
    assert not fits(run, 0.5, 0, Need(1, 1, 0.51))


def test_schema_1_llm_calls_are_folded_into_the_ledger(tmp_path: Path) -> None:
    import sqlite3

    import sqlite_utils

    from agentd.state.sqlite.migrations import MIGRATIONS

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '1')")
    conn.execute(
        "INSERT INTO llm_calls(run_id, task_id, ts, provider, model, input_tokens,"
        " output_tokens, duration_s, status, item) VALUES ('r', 't', ?, 'p', 'm', 11, 4, 0.5,"
        " 200, 2)",
        (to_iso(T0),),
    )
    conn.close()
    store = SqliteStore(path)
    try:
        [row] = store.conn.execute("SELECT * FROM ledger").fetchall()
        assert (row["run_id"], row["input_tokens"], row["output_tokens"]) == ("r", 11, 4)
        assert (row["state"], row["status"], row["item"]) == ("committed", "200", 2)
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert "llm_calls" not in tables and {"outbox", "alerts", "budget_alarms"} <= tables
    finally:
        store.close()


GLOBAL = """
limits: {usd_per_day: 1.0, timezone: America/New_York}
providers:
  p:
    base_url: http://127.0.0.1:9/v1
    default_model: m
    prices: {m: {input: 1000, output: 1000}}
tasks:
  t:
    schedule: {every: 1h}
    agent: {provider: p, prompt: hi}
  py:
    schedule: {every: 1h}
    python: {callable: "agentd.examples:checksum_files"}
"""


def test_global_cap_counts_every_task_alarms_and_gates_agent_tasks_only(store: SqliteStore) -> None:
    config = parse(GLOBAL)
    store.sync_tasks({"t": ("f", "agent"), "py": ("g", "python")}, T0)
    store.fire_gate = lambda task_id, now: window_blocked(store, config, task_id, now)
    [day] = call_scopes(config, config.tasks["t"], T0)
    assert day.key == "global:day"
    assert day.start == datetime(2026, 3, 28, 4, tzinfo=UTC)  # New York midnight (EDT)
    assert not isinstance(spend(store, config, T0, 0.85), Refusal)
    assert alarms(store) == [("global:day", 50), ("global:day", 80)]
    assert isinstance(spend(store, config, T0, 0.2), Refusal)
    assert alarms(store)[-1] == ("global:day", 100)
    assert store.fire("t", T0, scheduled_for=T0).reason == "budget"
    # A python task may never call a model: the global window does not skip it.
    assert store.fire("py", T0, scheduled_for=T0).status == "queued"


def test_one_shared_client_per_provider() -> None:
    import asyncio

    from agentd.clock import SystemClock
    from agentd.providers import Gateway

    config = parse(GLOBAL)

    async def main() -> None:
        gateway = Gateway(None, config, SystemClock())  # type: ignore[arg-type]
        provider = config.providers["p"]
        first = gateway.client("p", provider)
        assert gateway.client("p", provider) is first
        assert first.timeout.connect == 10.0 and first.timeout.read == 120.0
        run_a = gateway.for_run(config.tasks["t"], "a")
        run_b = gateway.for_run(config.tasks["t"], "b")
        assert run_a._gw is run_b._gw is gateway
        await gateway.aclose()
        assert first.is_closed

    asyncio.run(main())
