"""Metrics are checked through the rendered exposition text, as a scraper would see it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agentd.metrics import Metrics

TS = "2026-11-21T12:00:00.000000Z"
TS_UNIX = datetime(2026, 11, 21, 12, tzinfo=UTC).timestamp()
OUTCOMES = ("success", "failure", "timeout", "cancelled", "interrupted", "skipped", "quarantined")

_ids = iter(range(1, 1_000_000))


def ev(kind: str, task: str | None = "a", ts: str = TS, **data: Any) -> dict[str, Any]:
    return {
        "id": next(_ids),
        "ts": ts,
        "kind": kind,
        "task_id": task,
        "run_id": "01JRUN" if task else None,
        "data": data,
    }


def finish(
    kind: str, task: str = "a", duration: float | None = 1.5, ts: str = TS
) -> dict[str, Any]:
    return ev(
        kind,
        task,
        ts=ts,
        attempt=1,
        error=None if kind == "success" else "boom",
        exit_code=0 if kind == "success" else 1,
        http_status=None,
        duration_s=duration,
    )


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


@pytest.fixture
def m() -> Metrics:
    metrics = Metrics("1.2.3")
    metrics.set_tasks(["a", "b"])
    return metrics


def test_task_series_appear_on_first_activity(m: Metrics) -> None:
    # A task that has done nothing since start has no series at all (10,000 idle tasks
    # must not make a 30 MiB scrape) ...
    assert not any(("task", "a") in labels for _, labels in samples(m))
    # ... its first event brings its success and failure counters at 0, so that rate()
    # sees its first outcome; the other series come with their first count.
    m.on_event(ev("fire", task="a"))
    assert value(m, "agentd_runs_total", task="a", outcome="success") == 0
    assert value(m, "agentd_runs_total", task="a", outcome="failure") == 0
    assert {labels for _, labels in samples(m) if ("task", "a") in labels} == {
        frozenset({("task", "a"), ("outcome", "success")}),
        frozenset({("task", "a"), ("outcome", "failure")}),
    }
    m.on_event(ev("skip", task="a", reason="overlap", scheduled_for=TS))
    for reason in ("overlap", "queue_full", "paused", "budget"):  # all reasons, together
        assert value(m, "agentd_skipped_fires_total", task="a", reason=reason) == (
            1 if reason == "overlap" else 0
        )
    assert not any(("task", "b") in labels for _, labels in samples(m))


def test_outcomes_counted_per_event_kind(m: Metrics) -> None:
    for event in (
        finish("success"),
        finish("success"),
        finish("failure"),
        finish("timeout"),
        finish("interrupt"),
        finish("cancel"),
        ev("cancel", reason="operator"),  # queued run cancelled: no duration
        ev("recover", attempt=1, previous_owner="x", by="y"),
        ev("quarantine", error="boom", attempts=3),
        ev("skip", reason="overlap", scheduled_for=TS),
    ):
        m.on_event(event)
    expected = {
        "success": 2,
        "failure": 1,
        "timeout": 1,
        "cancelled": 2,
        "interrupted": 2,
        "skipped": 1,
        "quarantined": 1,
    }
    for outcome, n in expected.items():
        assert value(m, "agentd_runs_total", task="a", outcome=outcome) == n
    assert not any(("task", "b") in labels for _, labels in samples(m))  # b did nothing


def test_skips_misfires_retries(m: Metrics) -> None:
    m.on_event(ev("skip", reason="queue_full", scheduled_for=TS))
    m.on_event(ev("skip", reason="queue_full", scheduled_for=TS))
    m.on_event(ev("skip", reason="paused", scheduled_for=TS))
    m.on_event(ev("skip", reason="something-new", scheduled_for=TS))
    m.on_event(ev("misfire", count=4, reason="skip", first=TS, last=TS))
    m.on_event(ev("misfire", count=2, reason="skip", first=TS, last=TS))
    m.on_event(ev("retry", attempt=1, not_before=TS, failures=1))
    assert value(m, "agentd_skipped_fires_total", task="a", reason="queue_full") == 2
    assert value(m, "agentd_skipped_fires_total", task="a", reason="paused") == 1
    assert value(m, "agentd_skipped_fires_total", task="a", reason="overlap") == 0
    assert not any(
        name == "agentd_skipped_fires_total" and ("reason", "something-new") in labels
        for name, labels in samples(m)
    )
    assert value(m, "agentd_runs_total", task="a", outcome="skipped") == 4
    assert value(m, "agentd_misfires_total", task="a") == 6
    assert value(m, "agentd_retries_total", task="a") == 1


def test_duration_histogram_and_last_times(m: Metrics) -> None:
    m.on_event(finish("success", duration=0.2))
    m.on_event(finish("failure", duration=100.0, ts="2026-11-21T12:00:10.000000Z"))
    m.on_event(finish("interrupt", duration=None, ts="2026-11-21T12:00:20.000000Z"))
    m.on_event(ev("cancel", reason="operator", ts="2026-11-21T13:00:00.000000Z"))
    assert value(m, "agentd_run_duration_seconds_count", task="a") == 2
    assert value(m, "agentd_run_duration_seconds_sum", task="a") == pytest.approx(100.2)
    assert value(m, "agentd_run_duration_seconds_bucket", task="a", le="0.5") == 1
    assert value(m, "agentd_run_duration_seconds_bucket", task="a", le="3600.0") == 2
    # The queued-run cancel never ran, so it does not move last_run.
    assert value(m, "agentd_task_last_run_timestamp_seconds", task="a") == TS_UNIX + 20
    assert value(m, "agentd_task_last_success_timestamp_seconds", task="a") == TS_UNIX


def test_lateness_histogram_clamps_negative(m: Metrics) -> None:
    m.on_event(ev("claim", attempt=1, lateness_s=0.003))
    m.on_event(ev("claim", attempt=1, lateness_s=-2.5))
    m.on_event(ev("claim", attempt=2, lateness_s=42.0))
    assert value(m, "agentd_run_start_lateness_seconds_count", task="a") == 3
    assert value(m, "agentd_run_start_lateness_seconds_sum", task="a") == pytest.approx(42.003)
    assert value(m, "agentd_run_start_lateness_seconds_bucket", task="a", le="0.001") == 1
    assert value(m, "agentd_run_start_lateness_seconds_bucket", task="a", le="0.005") == 2
    assert value(m, "agentd_run_start_lateness_seconds_bucket", task="a", le="600.0") == 3


def test_unknown_tasks_and_kinds_are_ignored(m: Metrics) -> None:
    before = samples(m)
    m.on_event(finish("failure", task="stranger"))
    m.on_event(ev("claim", task="stranger", attempt=1, lateness_s=1.0))
    m.on_event(ev("misfire", task=None, count=3, reason="x", first=TS, last=TS))
    m.on_event(ev("task_added", task="a", fingerprint="f"))
    m.on_event(ev("brand_new_kind", task="a", whatever=1))
    m.set_last_times("stranger", last_run=1.0, last_success=1.0)
    m.set_state(running={"stranger": 2}, queued=0, quarantined=0, paused=["stranger"])
    after = samples(m)
    assert not any(("task", "stranger") in labels for _, labels in after)
    task_keys = {k for k in before if any(lbl == "task" for lbl, _ in k[1])}
    assert {k: after[k] for k in task_keys} == {k: before[k] for k in task_keys}


def test_removed_task_loses_every_series(m: Metrics) -> None:
    m.set_tasks(["a", "gone"])
    m.on_event(finish("success", task="gone"))
    m.on_event(ev("claim", task="gone", attempt=1, lateness_s=1.0))
    m.set_state(running={"gone": 1}, queued=0, quarantined=0, paused=["gone"])
    assert value(m, "agentd_runs_total", task="gone", outcome="success") == 1
    m.set_tasks(["a"])
    m.on_event(finish("failure", task="gone"))  # a late event must not bring it back
    m.set_state(running={"gone": 1}, queued=0, quarantined=0, paused=["gone"])
    assert not any(("task", "gone") in labels for _, labels in samples(m))
    assert not any(("task", "b") in labels for _, labels in samples(m))
    assert value(m, "agentd_tasks_paused") == 0
    m.set_tasks(["a", "gone"])  # re-added: starts again from zero
    assert not any(("task", "gone") in labels for _, labels in samples(m))
    m.on_event(ev("fire", task="gone"))
    assert value(m, "agentd_runs_total", task="gone", outcome="success") == 0
    m.set_state(running={}, queued=0, quarantined=0, paused=["gone"])
    assert value(m, "agentd_task_paused", task="gone") == 1


def test_state_gauges(m: Metrics) -> None:
    m.set_state(running={"a": 2}, queued=5, quarantined=1, paused=["b"])
    assert value(m, "agentd_runs_running", task="a") == 2
    assert not any(n == "agentd_runs_running" and ("task", "b") in k for n, k in samples(m))
    assert value(m, "agentd_queue_depth") == 5
    assert value(m, "agentd_quarantined_runs") == 1
    assert value(m, "agentd_task_paused", task="b") == 1
    assert value(m, "agentd_tasks_paused") == 1
    m.set_state(running={}, queued=0, quarantined=0, paused=[])
    assert value(m, "agentd_runs_running", task="a") == 0
    assert value(m, "agentd_task_paused", task="b") == 0
    assert value(m, "agentd_tasks_paused") == 0


def test_seeded_last_times(m: Metrics) -> None:
    m.set_last_times("a", last_run=1000.0, last_success=900.0)
    m.set_last_times("b", last_run=500.0, last_success=None)
    assert value(m, "agentd_task_last_run_timestamp_seconds", task="a") == 1000
    assert value(m, "agentd_task_last_success_timestamp_seconds", task="a") == 900
    assert value(m, "agentd_task_last_run_timestamp_seconds", task="b") == 500
    assert not any(
        n == "agentd_task_last_success_timestamp_seconds" and ("task", "b") in k
        for n, k in samples(m)
    )


def test_config_reload_and_watchdog(m: Metrics) -> None:
    assert value(m, "agentd_config_last_reload_successful") == 1
    assert value(m, "agentd_config_last_reload_success_timestamp_seconds") > 0
    m.config_reload(True, 1234.0)
    m.config_reload(False, 2000.0)
    assert value(m, "agentd_config_last_reload_successful") == 0
    assert value(m, "agentd_config_last_reload_success_timestamp_seconds") == 1234
    m.config_reload(True, 3000.0)
    assert value(m, "agentd_config_last_reload_successful") == 1
    assert value(m, "agentd_config_last_reload_success_timestamp_seconds") == 3000
    m.watchdog_ping()
    m.watchdog_ping()
    assert value(m, "agentd_watchdog_pings_total") == 2


def test_build_info_and_process_collectors(m: Metrics) -> None:
    found = samples(m)
    build = [labels for name, labels in found if name == "agentd_build_info"]
    assert len(build) == 1 and ("version", "1.2.3") in build[0]
    assert found[("agentd_build_info", build[0])] == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in found)
    assert any(name == "python_info" for name, _ in found)


def test_private_registry_instances_coexist() -> None:
    global_names = set(REGISTRY._names_to_collectors)
    one, two = Metrics("1"), Metrics("2")
    one.set_tasks(["a"])
    two.set_tasks(["a"])
    one.on_event(finish("success"))
    assert value(one, "agentd_runs_total", task="a", outcome="success") == 1
    two.on_event(ev("fire"))
    assert value(two, "agentd_runs_total", task="a", outcome="success") == 0
    assert set(REGISTRY._names_to_collectors) == global_names
    assert not any(name.startswith("agentd_") for name in global_names)


def test_llm_calls_count_tokens_cost_and_requests(m: Metrics) -> None:
    m.on_event(ev("claim", "a", attempt=1))
    call = {"provider": "openai", "model": "m", "cost_usd": 0.25, "item": None}
    m.on_event(ev("llm_call", "a", input_tokens=100, output_tokens=40, status="200", **call))
    m.on_event(ev("llm_call", "a", input_tokens=0, output_tokens=0, status="429", **call))
    m.on_event(ev("llm_call", "gone", input_tokens=5, output_tokens=5, status="200", **call))
    assert value(m, "agentd_llm_tokens_total", task="a", direction="input") == 100
    assert value(m, "agentd_llm_tokens_total", task="a", direction="output") == 40
    assert value(m, "agentd_llm_cost_usd_total", task="a") == 0.5
    # Requests count per provider, even for a task a reload just removed.
    assert value(m, "agentd_llm_requests_total", provider="openai", status="200") == 2
    assert value(m, "agentd_llm_requests_total", provider="openai", status="429") == 1
    m.on_event(finish("budget_exhausted"))
    assert value(m, "agentd_runs_total", task="a", outcome="budget_exhausted") == 1
    m.on_event(ev("skip", "a", reason="budget"))
    assert value(m, "agentd_skipped_fires_total", task="a", reason="budget") == 1


def test_budget_remaining_gauge_follows_configured_scopes(m: Metrics) -> None:
    m.set_budget_remaining({"global:day": 4.5, "a:day": 0.25})
    assert value(m, "agentd_budget_remaining_usd", scope="global:day") == 4.5
    assert value(m, "agentd_budget_remaining_usd", scope="a:day") == 0.25
    m.set_budget_remaining({"global:day": 4.0})
    with pytest.raises(KeyError):
        value(m, "agentd_budget_remaining_usd", scope="a:day")


def test_budget_limit_gauge_beside_remaining(m: Metrics) -> None:
    # The limit makes "share spent" computable (the PrometheusRule's 80 % alert):
    # 1 - remaining / limit.
    m.set_budget_remaining({"global:day": 1.0, "a:month": 3.0}, {"global:day": 5.0, "a:month": 4})
    assert value(m, "agentd_budget_limit_usd", scope="global:day") == 5.0
    assert 1 - value(m, "agentd_budget_remaining_usd", scope="global:day") / 5.0 == 0.8
    assert value(m, "agentd_budget_limit_usd", scope="a:month") == 4.0
    # A scope that is no longer configured loses both series.
    m.set_budget_remaining({"global:day": 1.0}, {"global:day": 5.0})
    with pytest.raises(KeyError):
        value(m, "agentd_budget_limit_usd", scope="a:month")
    assert value(m, "agentd_budget_limit_usd", scope="global:day") == 5.0


def test_next_fire_times_are_asked_for_live_tasks_and_fired_ones(m: Metrics) -> None:
    assert m.stale_next_fires() == set()  # no activity, nothing to read
    m.on_event(ev("claim", "a", attempt=1))  # a's first activity
    assert m.stale_next_fires() == {"a"}
    m.set_next_fires({"a"}, {"a": 5000.0})
    assert m.stale_next_fires() == set()
    assert value(m, "agentd_task_next_fire_timestamp_seconds", task="a") == 5000
    assert value(m, "agentd_task_overdue", task="a") == 0
    m.on_event(ev("success", "a", attempt=1))
    assert m.stale_next_fires() == set()  # a run's end does not move the schedule
    for kind in ("enqueue", "skip", "misfire"):
        m.on_event(ev(kind, "a", reason="overlap", count=1))
        assert m.stale_next_fires() == {"a"}, kind
        m.set_next_fires({"a"}, {"a": 6000.0})
    m.set_next_fires({"a"}, {})  # no fire left (a one-shot that fired)
    assert not any(n == "agentd_task_next_fire_timestamp_seconds" for n, _ in samples(m))
    assert value(m, "agentd_task_overdue", task="a") == 0
    m.set_tasks(["a", "b"])  # a reload may move any live task's schedule
    assert m.stale_next_fires() == {"a"}
    m.set_tasks(["b"])
    assert m.stale_next_fires() == set()
    m.set_next_fires({"a"}, {"a": 1.0})  # asked before the reload removed it
    assert not any(("task", "a") in labels for _, labels in samples(m))


def test_overdue_changes_only_what_changed_and_brings_series(m: Metrics) -> None:
    m.set_overdue({"b", "stranger"})  # b had no series: it gets them, overdue at 1
    assert value(m, "agentd_task_overdue", task="b") == 1
    assert value(m, "agentd_runs_total", task="b", outcome="success") == 0
    assert m.stale_next_fires() == {"b"}  # and its next fire is read
    assert not any(("task", "stranger") in labels for _, labels in samples(m))
    m.set_next_fires({"b"}, {"b": 100.0})
    assert value(m, "agentd_task_overdue", task="b") == 1  # asking does not reset it
    m.set_overdue(set())
    assert value(m, "agentd_task_overdue", task="b") == 0
    m.set_overdue({"b"})
    m.set_tasks(["a"])
    assert not any(("task", "b") in labels for _, labels in samples(m))
    m.set_tasks(["a", "b"])
    m.set_overdue({"b"})  # removed and re-added: counted as newly overdue
    assert value(m, "agentd_task_overdue", task="b") == 1


def test_outbox_gauges_and_delivery_attempts(m: Metrics) -> None:
    assert not any(n == "agentd_outbox_deliveries" for n, _ in samples(m))
    m.set_outbox({("hook", "pending"): 2, ("ping", "failed"): 1})
    assert value(m, "agentd_outbox_deliveries", channel="hook", status="pending") == 2
    assert value(m, "agentd_outbox_deliveries", channel="hook", status="failed") == 0
    assert value(m, "agentd_outbox_deliveries", channel="ping", status="failed") == 1
    assert value(m, "agentd_outbox_deliveries", channel="ping", status="pending") == 0
    m.set_outbox({("hook", "failed"): 1})  # ping's rows were pruned: its series go
    assert value(m, "agentd_outbox_deliveries", channel="hook", status="pending") == 0
    assert value(m, "agentd_outbox_deliveries", channel="hook", status="failed") == 1
    assert not any(
        n == "agentd_outbox_deliveries" and ("channel", "ping") in labels
        for n, labels in samples(m)
    )
    for outcome in ("retry", "retry", "failed", "delivered", "something-new"):
        m.delivery_attempt("hook", outcome)
    assert value(m, "agentd_alert_deliveries_total", channel="hook", outcome="retry") == 2
    assert value(m, "agentd_alert_deliveries_total", channel="hook", outcome="failed") == 1
    assert value(m, "agentd_alert_deliveries_total", channel="hook", outcome="delivered") == 1
    assert not any(("outcome", "something-new") in labels for _, labels in samples(m))
