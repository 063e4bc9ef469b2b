"""Cost-aware admission and burn-rate alarms: the pure maths (percentiles of a task's
cost history, the run/defer/skip verdict, the projected exhaustion of a window, with
explicit datetimes and a 23-hour DST day), then the verdict applied to a real SQLite
state through ``ledger.fire_verdict`` (a catch-up batch included), and the config."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentd.budget import (
    BURN_ALARM,
    THRESHOLDS,
    Scope,
    admit,
    burn_alarm,
    cost_history,
    exhaustion_eta,
    percentile,
    window_at,
)
from agentd.clock import to_iso
from agentd.config import Config, ConfigError, parse_config
from agentd.ledger import fire_verdict
from agentd.models import Outcome, RunStatus
from agentd.state.port import Fire, Reservation, Usage
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = window_at("day", T0, "UTC")
MONTH = window_at("month", T0, "UTC")


def day(limit: float) -> Scope:
    return Scope("task:t:day", "t:day", "t", "day", limit, None, *DAY)


def month(limit: float) -> Scope:
    return Scope("task:t:month", "t:month", "t", "month", limit, None, *MONTH)


# ---------------------------------------------------------------- cost history


def test_percentiles_are_nearest_rank_so_always_an_observed_value() -> None:
    twenty = [float(i) for i in range(1, 21)]
    assert percentile(twenty, 0.5) == 10.0
    assert percentile(twenty, 0.95) == 19.0
    assert percentile([3.0, 1.0, 2.0], 0.95) == 3.0  # of three runs: the largest
    assert percentile([0.1, 0.2, 0.3, 0.4, 0.5], 0.5) == 0.3
    assert percentile([7.0], 0.5) == 7.0


def test_cost_history_needs_enough_runs_to_predict() -> None:
    assert cost_history([], 1) is None
    assert cost_history([(0.1, 100), (0.2, 200)], 3) is None
    history = cost_history([(0.1, 100), (0.3, 300), (0.2, 200), (0.9, 900)], 3)
    assert history is not None and history.runs == 4
    assert (history.p50_usd, history.p95_usd) == (0.2, 0.9)
    assert (history.p50_tokens, history.p95_tokens) == (200, 900)
    assert history.usd("p50") == 0.2 and history.usd("p95") == 0.9


# ---------------------------------------------------------------- the verdict


def test_no_prediction_or_a_fit_runs() -> None:
    assert admit("skip", None, [(day(1.0), 0.99)]).decision == "run"
    fits = admit("skip", 0.3, [(day(1.0), 0.5), (month(10.0), 1.0)])
    assert (fits.decision, fits.scope, fits.remaining_usd) == ("run", "t:day", 0.5)
    assert admit("skip", 0.5, [(day(1.0), 0.5)]).decision == "run"  # exactly full: fits
    assert admit("skip", 0.0, [(day(1.0), 1.0)]).decision == "run"  # free runs always fit
    assert admit("skip", 0.3, []).decision == "run"


def test_a_fire_that_does_not_fit_is_skipped_deferred_or_run_per_policy() -> None:
    windows = [(day(1.0), 0.8), (month(10.0), 1.0)]
    skip = admit("skip", 0.3, windows)
    assert (skip.decision, skip.scope, skip.remaining_usd) == ("skip", "t:day", 0.2)
    assert skip.reason == "predicted 0.300000 USD, t:day has 0.200000 left"
    defer = admit("defer", 0.3, windows)
    assert (defer.decision, defer.not_before) == ("defer", DAY[1])
    run = admit("run", 0.3, windows)
    assert (run.decision, run.scope) == ("run", "t:day") and "on_budget=run" in run.reason
    assert run.not_before is None and skip.not_before is None


def test_defer_waits_for_the_latest_window_that_does_not_fit() -> None:
    defer = admit("defer", 0.3, [(day(1.0), 0.8), (month(10.0), 9.9)])
    assert (defer.scope, defer.not_before) == ("t:month", MONTH[1])


def test_defer_skips_what_no_later_window_can_hold_and_catch_ups() -> None:
    too_big = admit("defer", 1.5, [(day(1.0), 0.0)])
    assert too_big.decision == "skip" and "more than the whole limit of t:day" in too_big.reason
    catchup = admit("defer", 0.3, [(day(1.0), 0.8)], catchup=True)
    assert catchup.decision == "skip" and "catch-up" in catchup.reason


def test_fires_ahead_in_the_batch_count_at_the_prediction() -> None:
    windows = [(day(1.0), 0.1)]  # 0.9 left: three runs of 0.3
    assert [admit("skip", 0.3, windows, ahead).decision for ahead in range(4)] == [
        "run",
        "run",
        "run",
        "skip",
    ]
    assert admit("skip", 0.3, windows, 2).remaining_usd == pytest.approx(0.3)
    # What the task's queued and running runs may still spend counts the same way.
    assert admit("skip", 0.3, windows, pending_usd=0.6).decision == "run"
    assert admit("skip", 0.3, windows, pending_usd=0.61).decision == "skip"


# ---------------------------------------------------------------- burn rate


def near(got: datetime | None, want: datetime) -> None:
    assert got is not None and abs((got - want).total_seconds()) < 1, (got, want)


def test_exhaustion_is_projected_at_the_window_average_rate() -> None:
    start, end = DAY
    six = start + timedelta(hours=6)
    # 0.25 of 1 in 6 h: the rest in 18 h more, exactly the window's end: not before it.
    assert exhaustion_eta(0.25, start, end, six, 1.0) is None
    assert exhaustion_eta(0.5, start, end, six, 1.0) == start + timedelta(hours=12)
    assert exhaustion_eta(0.0, start, end, six, 1.0) is None
    assert exhaustion_eta(1.0, start, end, six, 1.0) == six  # full already
    assert exhaustion_eta(0.5, start, end, end, 1.0) is None  # outside the window
    assert exhaustion_eta(0.5, start, end, start, 1.0) is None


def test_burn_alarm_waits_for_enough_of_the_window_and_a_margin() -> None:
    start, end = DAY
    early = start + timedelta(minutes=30)  # 2 % of the day: too early to say
    assert exhaustion_eta(0.1, start, end, early, 1.0) is not None
    assert burn_alarm(0.1, start, end, early, 1.0) is None
    six = start + timedelta(hours=6)
    assert burn_alarm(0.5, start, end, six, 1.0) == start + timedelta(hours=12)
    assert burn_alarm(1.0, start, end, six, 1.0) is None  # full: the 100 % alarm says it
    # Projected at 22:00, 2 h before the end: inside the 2.4 h margin, no alarm.
    assert burn_alarm(6 / 22 + 1e-6, start, end, six, 1.0) is None
    # At 21:00 (3 h before the end): alarm.
    near(burn_alarm(6 / 21, start, end, six, 1.0), start + timedelta(hours=21))


def test_burn_on_the_23_hour_spring_day_counts_real_hours() -> None:
    noon = datetime(2026, 3, 29, 10, 0, tzinfo=UTC)  # 12:00 CEST, 11 real hours in
    start, end = window_at("day", noon, "Europe/Berlin")
    assert (end - start) == timedelta(hours=23)
    # 0.55 in 11 h: the other 0.45 in 9 h, at 19:00 UTC (21:00 CEST), 3 h before the end
    # (a 24-hour day of wall-clock hours would say 12 h in: 9 h 49 min more).
    near(burn_alarm(0.55, start, end, noon, 1.0), datetime(2026, 3, 29, 19, tzinfo=UTC))
    # The margin is a tenth of 23 h (2.3 h): 2 h before the end is inside it (a 24-hour
    # day's margin would be 2.4 h, its end an hour later: 3 h away, an alarm).
    late = start + timedelta(hours=10.5)
    assert burn_alarm(10.5 / 21, start, end, late, 1.0) is None


def test_the_burn_alarm_is_recorded_below_every_threshold() -> None:
    assert all(t > BURN_ALARM for t in THRESHOLDS)


# ---------------------------------------------------------------- on a real state

CONFIG = """
providers:
  p:
    base_url: http://127.0.0.1:9/v1
    default_model: m
    prices: {m: {input: 1000, output: 1000}}
tasks:
  t:
    schedule: {every: 1h}
    agent: {provider: p, prompt: hi}
    budget: {task: {usd_per_day: 1.0}}
    overlap: allow
    catchup: all
    admission: {on_budget: ON, estimate: p95, min_runs: 3}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "admission-test.yaml", {})


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "state.sqlite")
    s.sync_tasks({"t": ("f", "agent")}, T0)
    yield s
    s.close()


def finished_run(store: SqliteStore, when: datetime, usd: float) -> str:
    """A run of ``t`` that made one call of ``usd`` and succeeded."""
    run_id = store.fire("t", when, trigger="manual", honour_pause=False, overlap="allow").run_id
    [claimed] = store.claim(when, "w", 30, 1, set(), {"t"})
    assert claimed["id"] == run_id
    entry = store.reserve_budget(
        when, Reservation(run_id, "t", "p", "m", None, 10, usd), [], lambda s, u, t: True
    )
    assert isinstance(entry, int)
    store.commit_spend(when, entry, Usage(5, 5, usd, "200", 0.1, False))
    store.finish(run_id, when, outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED)
    return run_id


def test_too_little_history_runs_and_says_so(store: SqliteStore) -> None:
    config = parse(CONFIG.replace("ON", "skip"))
    finished_run(store, T0, 0.3)
    verdict = fire_verdict(store, config, Fire("t", T0), T0, 0)
    assert verdict is not None and verdict["decision"] == "run"
    assert verdict["predicted_usd"] is None
    assert verdict["detail"] == "too little history: 1 of 3 finished runs"


def test_a_fire_predicted_not_to_fit_is_deferred_to_the_next_day(store: SqliteStore) -> None:
    config = parse(CONFIG.replace("ON", "defer"))
    for i, usd in enumerate((0.2, 0.25, 0.3)):
        finished_run(store, T0 + timedelta(minutes=i), usd)  # 0.75 of 1.0 spent
    store.fire_admission = lambda f, now, ahead: fire_verdict(store, config, f, now, ahead)
    now = T0 + timedelta(minutes=5)
    result = store.fire("t", now, scheduled_for=now, overlap="allow")
    assert result.status == RunStatus.QUEUED
    run = store.get_run(result.run_id)
    assert run["not_before"] == to_iso(DAY[1])
    [event] = [e for e in store.events(run_id=result.run_id) if e["kind"] == "admission"]
    data = event["data"]
    assert (data["decision"], data["scope"], data["estimate"]) == ("defer", "t:day", "p95")
    assert data["predicted_usd"] == pytest.approx(0.3)
    assert data["remaining_usd"] == pytest.approx(0.25)
    assert data["history_runs"] == 3 and data["not_before"] == to_iso(DAY[1])
    # p50 (0.25) would have fitted the 0.25 left; now the deferred run is counted too.
    p50 = parse(CONFIG.replace("ON", "defer").replace("p95", "p50"))
    assert decision(store, p50, now, 0) == "defer"
    store.request_cancel(result.run_id, now)  # a queued run: cancelled at once
    assert decision(store, p50, now, 0) == "run"


def test_a_catch_up_runs_only_the_occurrences_the_budget_allows(store: SqliteStore) -> None:
    config = parse(CONFIG.replace("ON", "defer"))
    for i in range(3):
        finished_run(store, T0 + timedelta(minutes=i), 0.1)  # 0.3 spent, 0.7 left
    store.fire_admission = lambda f, now, ahead: fire_verdict(store, config, f, now, ahead)
    now = T0 + timedelta(hours=1)
    missed = [Fire("t", T0 - timedelta(hours=h), "catchup", "allow") for h in range(10, 0, -1)]
    results = store.fire_many(missed, now)
    assert [r.status for r in results] == ["queued"] * 7 + ["skipped"] * 3
    assert {r.reason for r in results[7:]} == {"admission"}
    skips = [e for e in store.events() if e["kind"] == "skip"]
    assert len(skips) == 3 and all("catch-up" in e["data"]["detail"] for e in skips)


def test_a_task_without_admission_is_never_weighed(store: SqliteStore) -> None:
    config = parse(
        CONFIG.replace("    admission: {on_budget: ON, estimate: p95, min_runs: 3}\n", "")
    )
    assert fire_verdict(store, config, Fire("t", T0), T0, 0) is None


def test_admission_config() -> None:
    task = parse(CONFIG.replace("{on_budget: ON, estimate: p95, min_runs: 3}", "{}")).tasks["t"]
    assert task.admission is not None
    assert (task.admission.on_budget, task.admission.estimate) == ("run", "p95")
    assert (task.admission.history, task.admission.min_runs) == (20, 3)
    with pytest.raises(ConfigError) as info:
        parse(CONFIG.replace("ON", "later"))
    assert any(p.path.startswith("tasks.t.admission.on_budget") for p in info.value.problems)


def test_a_backfill_that_does_not_fit_is_skipped_not_deferred(store: SqliteStore) -> None:
    config = parse(CONFIG.replace("ON", "defer"))
    for i in range(3):
        finished_run(store, T0 + timedelta(minutes=i), 0.4)  # 1.2 > 1.0: none fits
    now = T0 + timedelta(hours=1)
    backfill = fire_verdict(store, config, Fire("t", T0 - timedelta(days=3), "backfill"), now, 0)
    assert backfill is not None and backfill["decision"] == "skip"
    scheduled = fire_verdict(store, config, Fire("t", now), now, 0)
    assert scheduled is not None and scheduled["decision"] == "defer"


def test_runs_queued_or_running_count_at_what_they_may_still_spend(store: SqliteStore) -> None:
    config = parse(CONFIG.replace("ON", "skip"))
    for i in range(3):
        finished_run(store, T0 + timedelta(minutes=i), 0.1)  # 0.3 spent, 0.7 left
    queued = store.fire("t", T0, scheduled_for=T0, overlap="allow").run_id
    running = store.fire("t", T0, scheduled_for=T0 + timedelta(1), overlap="allow").run_id
    [claimed] = store.claim(T0, "w", 30, 1, set(), {"t"})
    started = running if claimed["id"] == running else queued
    entry = store.reserve_budget(
        T0, Reservation(started, "t", "p", "m", None, 10, 0.04), [], lambda s, u, t: True
    )
    assert isinstance(entry, int)  # one call in flight: 0.06 of its 0.1 to go
    now = T0 + timedelta(minutes=5)
    verdict = fire_verdict(store, config, Fire("t", now), now, 0)
    assert verdict is not None
    assert (verdict["active_runs"], verdict["pending_usd"]) == (2, pytest.approx(0.16))
    # 1.0 - 0.34 spent - 0.16 pending = 0.5: room for five more fires of 0.1, not six.
    assert verdict["remaining_usd"] == pytest.approx(0.5)
    assert decision(store, config, now, 4) == "run"
    assert decision(store, config, now, 5) == "skip"


def decision(store: SqliteStore, config: Config, now: datetime, ahead: int) -> str:
    verdict = fire_verdict(store, config, Fire("t", now), now, ahead)
    assert verdict is not None
    return str(verdict["decision"])
