"""The pure parts of completion notices, repeats and progress ETAs: no DB, no daemon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from agentd.alerts import completion_alert, repeat_routes
from agentd.clock import median, progress_eta
from agentd.config import AlertRule, Config, HeartbeatConfig, NotifyConfig
from agentd.oversight import hb_url
from agentd.yamlload import load

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# ---------------------------------------------------------------- the ETA


def test_eta_from_the_runs_own_rate_alone() -> None:
    # 2 of 4 in 10 s: 10 s more.
    assert progress_eta(NOW, 10.0, 2, 4, None) == at(10)


def test_eta_from_history_alone_before_any_work_is_done() -> None:
    assert progress_eta(NOW, 5.0, 0, 4, 60.0) == at(55)
    assert progress_eta(NOW, 5.0, None, None, 60.0) == at(55)
    assert progress_eta(NOW, 90.0, 0, None, 60.0) == NOW  # past typical: never before now


def test_eta_blends_history_and_rate_by_the_fraction_done() -> None:
    # 1 of 4 in 10 s: the rate says 30 s more, history (100 s typical) says 90 s more;
    # a quarter done weighs the rate a quarter: 0.25 * 30 + 0.75 * 90 = 75.
    assert progress_eta(NOW, 10.0, 1, 4, 100.0) == at(75)
    # 3 of 4 in 30 s: 0.75 * 10 + 0.25 * 70 = 25.
    assert progress_eta(NOW, 30.0, 3, 4, 100.0) == at(25)


def test_eta_is_now_when_done_and_none_without_anything_to_go_on() -> None:
    assert progress_eta(NOW, 10.0, 4, 4, None) == NOW
    assert progress_eta(NOW, 10.0, 7, 4, 100.0) == NOW
    assert progress_eta(NOW, 10.0, 0, 4, None) is None
    assert progress_eta(NOW, 10.0, 3, None, None) is None
    assert progress_eta(NOW, 0.0, 1, 4, None) is None  # no time passed: no rate
    assert progress_eta(NOW, 10.0, 1, 0, None) is None


def test_median_of_odd_even_and_no_durations() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([]) is None


# ---------------------------------------------------------------- completion notices

RUN = {
    "status": "succeeded",
    "attempt": 2,
    "duration_s": 12.5,
    "started_at": "s",
    "finished_at": "f",
}


def event(kind: str, **data: object) -> dict[str, object]:
    return {"kind": kind, "task_id": "t", "run_id": "r1", "data": data}


def test_success_notice_has_the_summary_and_the_link() -> None:
    alert = completion_alert(event("success", attempt=2, duration_s=12.5), ["success"], RUN, 0.0123)
    assert alert is not None and alert.kind == "run_succeeded" and alert.key == "run_succeeded:r1"
    assert alert.data["url"] == "/v1/runs/r1" and alert.data["cost_usd"] == 0.0123
    assert alert.data["attempt"] == 2 and alert.data["duration_s"] == 12.5
    assert alert.data["error"] is None and alert.data["final"] is True
    assert alert.summary == "t: run r1 succeeded, attempt 2, 12.5s, 0.0123 USD (/v1/runs/r1)"


def test_failure_and_quarantine_notices_carry_the_error_head_and_are_keyed_apart() -> None:
    error = "Traceback: boom\nline two\nline three"
    attempt = completion_alert(event("failure", attempt=1, error=error), ["failure"], RUN, None)
    timeout = completion_alert(event("timeout", attempt=2, error="slow"), ["failure"], RUN, None)
    final = completion_alert(
        event("quarantine", attempts=2, error=error), ["quarantine"], RUN, None
    )
    assert attempt is not None and timeout is not None and final is not None
    assert {attempt.kind, timeout.kind, final.kind} == {"run_failed"}
    assert len({attempt.key, timeout.key, final.key}) == 3
    assert attempt.data["error"] == "Traceback: boom" and attempt.data["final"] is False
    assert final.data["final"] is True and final.data["attempt"] == 2
    assert "timed out" in timeout.summary and "quarantined" in final.summary
    assert final.summary.endswith(": Traceback: boom (/v1/runs/r1)")


def test_a_completion_not_asked_for_raises_nothing() -> None:
    assert completion_alert(event("success"), ["failure", "quarantine"], RUN, None) is None
    assert completion_alert(event("failure", attempt=1), ["success"], RUN, None) is None
    assert completion_alert(event("quarantine"), ["failure"], RUN, None) is None
    assert completion_alert(event("cancel"), ["success", "failure"], RUN, None) is None


def test_notify_on_survives_yaml_reading_on_as_true() -> None:
    doc = load("notify: {on: [success, quarantine]}\n")
    assert True in doc["notify"]  # YAML 1.1: the bare key is a boolean
    assert NotifyConfig.model_validate(doc["notify"]).on == ["success", "quarantine"]
    with pytest.raises(ValidationError):
        NotifyConfig.model_validate({"on": ["sometimes"]})
    with pytest.raises(ValidationError):
        NotifyConfig.model_validate({"on": []})


# ---------------------------------------------------------------- repeats and the heartbeat


def test_repeat_routes_only_lasting_kinds_of_rules_that_repeat() -> None:
    config = Config.model_validate(
        {
            "alerts": {
                "channels": {"a": {"log": {}}, "b": {"log": {}}, "c": {"log": {}}},
                "rules": [
                    {"events": ["deadman"], "channels": ["a"], "repeat_every": "10m"},
                    {"events": ["*"], "channels": ["a", "b"], "repeat_every": "1h"},
                    {"events": ["run_quarantined"], "channels": ["c"]},
                    {
                        "events": ["deadman"],
                        "channels": ["c"],
                        "tasks": ["other"],
                        "repeat_every": 5,
                    },
                ],
            }
        }
    )
    assert repeat_routes("deadman", "t", config) == {"a": 600.0, "b": 3600.0}
    assert repeat_routes("run_quarantined", "t", config) == {"a": 3600.0, "b": 3600.0}
    assert repeat_routes("deadman", "other", config)["c"] == 5.0
    assert repeat_routes("budget_alarm", "t", config) == {}
    with pytest.raises(ValidationError):
        AlertRule.model_validate({"events": ["deadman"], "channels": ["a"], "repeat_every": 0})


def test_heartbeat_url_is_logged_without_its_path_or_query() -> None:
    assert hb_url("https://hc-ping.com/0f8c2a9e-5b1d?rid=1") == "https://hc-ping.com/…"
    assert hb_url("http://127.0.0.1:8000/ping/secret") == "http://127.0.0.1:8000/…"
    assert HeartbeatConfig.model_validate({"url": "https://hc-ping.com/x"}).every == 60.0
    with pytest.raises(ValidationError):
        HeartbeatConfig.model_validate({"url": "hc-ping.com/x"})
