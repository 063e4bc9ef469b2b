"""Tests for the pure policies: retry decisions (runner.decide, runner.bounded), catch-up
(catchup_split), overlap, auto-pause and the layered deadlines (agentd.policy)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentd.config import TaskConfig, parse_config
from agentd.models import Outcome, Result, RunStatus
from agentd.policy import (
    Deadlines,
    attempt_timeout_s,
    auto_pause_reason,
    overdue_status,
    overlap_decision,
    retry_fits,
    run_deadline,
    start_deadline,
)
from agentd.runner import MAX_RETRY_AFTER_S, Decision, bounded, decide
from agentd.scheduler import catchup_split

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DRAWS = 500


def task(**overrides: Any) -> TaskConfig:
    body: dict[str, Any] = {
        "id": "t",
        "schedule": {"every": "1m"},
        "command": {"shell": "true"},
    }
    body.update(overrides)
    return TaskConfig.model_validate(body)


def rng(seed: int = 1234) -> random.Random:
    return random.Random(seed)


FAIL = Result(ok=False, error="exit 1", exit_code=1)


# ---------------------------------------------------------------- decide: simple outcomes


def test_success_succeeds() -> None:
    decision = decide(task(), Outcome.SUCCESS, Result(ok=True), 0, rng())
    assert decision.status == RunStatus.SUCCEEDED
    assert decision.delay_s == 0.0


def test_cancelled_is_cancelled_even_with_attempts_left() -> None:
    decision = decide(task(), Outcome.CANCELLED, None, 0, rng())
    assert decision.status == RunStatus.CANCELLED


def test_a_parked_attempt_waits_for_its_approval_timeout_and_costs_nothing() -> None:
    agent = {
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "prompt": "p",
        "approval_timeout": "2h",
        "tools": [{"name": "x", "command": {"argv": ["true"]}}],
    }
    t = TaskConfig.model_validate({"id": "t", "schedule": {"manual": True}, "agent": agent})
    # Even past max_attempts: waiting for an operator is not a failure.
    decision = decide(t, Outcome.PARKED, Result(ok=False), 9, rng())
    assert decision.status == RunStatus.AWAITING_APPROVAL
    assert decision.delay_s == 7200.0


@pytest.mark.parametrize("outcome", [Outcome.INTERRUPTED, Outcome.LOST])
def test_interrupted_and_lost_resume_at_once(outcome: Outcome) -> None:
    # Even past max_attempts: an interrupt is the daemon's doing, not the task's.
    decision = decide(task(retry={"max_attempts": 1}), outcome, None, 5, rng())
    assert decision.status == RunStatus.QUEUED
    assert decision.delay_s == 0.0


# ---------------------------------------------------------------- decide: backoff


@pytest.mark.parametrize("failures_after", [1, 2, 3, 4])
def test_failure_backoff_is_full_jitter_below_the_exponential_ceiling(
    failures_after: int,
) -> None:
    t = task(retry={"max_attempts": 10, "backoff": "10s", "max_backoff": "10m"})
    ceiling = 10.0 * 2 ** (failures_after - 1)
    r = rng(failures_after)
    delays = []
    for _ in range(DRAWS):
        decision = decide(t, Outcome.FAILURE, FAIL, failures_after, r)
        assert decision.status == RunStatus.QUEUED
        delays.append(decision.delay_s)
    assert all(0.0 <= d <= ceiling for d in delays)
    assert len(set(delays)) > DRAWS // 2  # jittered, not constant
    # Spread over the whole range, not squeezed into a corner of it.
    assert min(delays) < 0.1 * ceiling
    assert max(delays) > 0.9 * ceiling


def test_backoff_is_capped_by_max_backoff() -> None:
    t = task(retry={"max_attempts": 20, "backoff": "10s", "max_backoff": "25s"})
    r = rng()
    delays = [decide(t, Outcome.FAILURE, FAIL, 6, r).delay_s for _ in range(DRAWS)]
    # Uncapped, the ceiling would be 10 * 2**5 = 320s.
    assert max(delays) <= 25.0
    assert max(delays) > 20.0


def test_zero_backoff_retries_at_once() -> None:
    t = task(retry={"max_attempts": 5, "backoff": 0})
    decision = decide(t, Outcome.FAILURE, FAIL, 2, rng())
    assert decision.status == RunStatus.QUEUED
    assert decision.delay_s == 0.0


def test_same_seed_same_delays() -> None:
    t = task(retry={"max_attempts": 10})
    a = [decide(t, Outcome.FAILURE, FAIL, 3, rng(7)).delay_s for _ in range(3)]
    b = [decide(t, Outcome.FAILURE, FAIL, 3, rng(7)).delay_s for _ in range(3)]
    assert a == b


# ---------------------------------------------------------------- decide: giving up


def test_failures_up_to_max_attempts_retry_then_quarantine() -> None:
    t = task(retry={"max_attempts": 3, "backoff": "1s"})
    assert decide(t, Outcome.FAILURE, FAIL, 1, rng()).status == RunStatus.QUEUED
    assert decide(t, Outcome.FAILURE, FAIL, 2, rng()).status == RunStatus.QUEUED
    final = decide(t, Outcome.FAILURE, FAIL, 3, rng())
    assert final.status == RunStatus.QUARANTINED
    assert "3" in final.why


def test_max_attempts_one_never_retries() -> None:
    t = task(retry={"max_attempts": 1})
    assert decide(t, Outcome.FAILURE, FAIL, 1, rng()).status == RunStatus.QUARANTINED


def test_timeout_retries_by_default() -> None:
    decision = decide(task(), Outcome.TIMEOUT, None, 1, rng())
    assert decision.status == RunStatus.QUEUED


def test_timeout_with_on_timeout_false_is_quarantined() -> None:
    t = task(retry={"max_attempts": 5, "on_timeout": False})
    decision = decide(t, Outcome.TIMEOUT, None, 1, rng())
    assert decision.status == RunStatus.QUARANTINED
    assert "timeout" in decision.why


def test_executor_says_not_retryable_quarantines_on_first_failure() -> None:
    t = task(retry={"max_attempts": 5})
    # retryable=False wins over an HTTP status the policy would retry.
    result = Result(ok=False, error="401", http_status=503, retryable=False)
    decision = decide(t, Outcome.FAILURE, result, 1, rng())
    assert decision.status == RunStatus.QUARANTINED


def test_executor_says_retryable_overrides_exit_codes() -> None:
    t = task(retry={"max_attempts": 5, "exit_codes": [75]})
    result = Result(ok=False, exit_code=1, retryable=True)
    assert decide(t, Outcome.FAILURE, result, 1, rng()).status == RunStatus.QUEUED


def test_http_status_not_in_http_statuses_is_quarantined() -> None:
    t = task(retry={"max_attempts": 5})
    not_found = decide(t, Outcome.FAILURE, Result(ok=False, http_status=404), 1, rng())
    assert not_found.status == RunStatus.QUARANTINED
    assert "404" in not_found.why
    unavailable = decide(t, Outcome.FAILURE, Result(ok=False, http_status=503), 1, rng())
    assert unavailable.status == RunStatus.QUEUED


def test_custom_http_statuses() -> None:
    t = task(retry={"max_attempts": 5, "http_statuses": [404]})
    assert (
        decide(t, Outcome.FAILURE, Result(ok=False, http_status=404), 1, rng()).status
        == RunStatus.QUEUED
    )
    assert (
        decide(t, Outcome.FAILURE, Result(ok=False, http_status=503), 1, rng()).status
        == RunStatus.QUARANTINED
    )


def test_retry_after_is_a_floor() -> None:
    t = task(retry={"max_attempts": 5, "backoff": "1s", "max_backoff": "5s"})
    result = Result(ok=False, http_status=429, retry_after_s=120)
    r = rng()
    for _ in range(50):
        decision = decide(t, Outcome.FAILURE, result, 1, r)
        assert decision.status == RunStatus.QUEUED
        assert decision.delay_s >= 120


def test_retry_after_is_bounded() -> None:
    t = task(retry={"max_attempts": 5})
    result = Result(ok=False, http_status=503, retry_after_s=30 * 24 * 3600)
    decision = decide(t, Outcome.FAILURE, result, 1, rng())
    assert decision.delay_s == MAX_RETRY_AFTER_S


def test_retry_after_does_not_extend_past_max_attempts() -> None:
    t = task(retry={"max_attempts": 2})
    result = Result(ok=False, http_status=503, retry_after_s=60)
    assert decide(t, Outcome.FAILURE, result, 2, rng()).status == RunStatus.QUARANTINED


def test_exit_codes_restrict_which_failures_retry() -> None:
    t = task(retry={"max_attempts": 5, "exit_codes": [75]})
    other = decide(t, Outcome.FAILURE, Result(ok=False, exit_code=1), 1, rng())
    assert other.status == RunStatus.QUARANTINED
    assert "exit code 1" in other.why
    tempfail = decide(t, Outcome.FAILURE, Result(ok=False, exit_code=75), 1, rng())
    assert tempfail.status == RunStatus.QUEUED


def test_without_exit_codes_any_exit_code_retries() -> None:
    t = task(retry={"max_attempts": 5})
    for code in (1, 2, 75, 137):
        result = Result(ok=False, exit_code=code)
        assert decide(t, Outcome.FAILURE, result, 1, rng()).status == RunStatus.QUEUED


def test_decide_on_a_task_from_yaml() -> None:
    config = parse_config(
        """
tasks:
  fetch:
    schedule: {every: 5m}
    http: {url: "https://example.com/"}
    retry: {max_attempts: 2, backoff: 2s, max_backoff: 3s, http_statuses: [502]}
""",
        "policy.yaml",
        {},
    )
    t = config.tasks["fetch"]
    retry = decide(t, Outcome.FAILURE, Result(ok=False, http_status=502), 1, rng())
    assert retry.status == RunStatus.QUEUED
    assert 0 <= retry.delay_s <= 2.0
    assert (
        decide(t, Outcome.FAILURE, Result(ok=False, http_status=503), 1, rng()).status
        == RunStatus.QUARANTINED
    )
    assert (
        decide(t, Outcome.FAILURE, Result(ok=False, http_status=502), 2, rng()).status
        == RunStatus.QUARANTINED
    )


# ---------------------------------------------------------------- catchup_split


def minutes_ago(*values: float) -> list[datetime]:
    return [NOW - timedelta(minutes=v) for v in values]


def test_catchup_skip_drops_late_times_and_keeps_an_on_time_one() -> None:
    t = task(catchup="skip", misfire_grace="30s")
    times = [*minutes_ago(30, 20, 10), NOW - timedelta(seconds=10)]
    due, missed, reason = catchup_split(t, times, NOW)
    assert due == [NOW - timedelta(seconds=10)]
    assert sorted(missed) == minutes_ago(30, 20, 10)
    assert "skip" in reason


def test_catchup_skip_with_everything_late_runs_nothing() -> None:
    t = task(catchup="skip", misfire_grace="30s")
    times = minutes_ago(3, 2, 1)
    due, missed, _ = catchup_split(t, times, NOW)
    assert due == []
    assert missed == times


def test_catchup_skip_within_grace_runs() -> None:
    t = task(catchup="skip", misfire_grace="5m")
    due, missed, _ = catchup_split(t, minutes_ago(4), NOW)
    assert due == minutes_ago(4)
    assert missed == []


def test_catchup_latest_keeps_only_the_last() -> None:
    t = task(catchup="latest")
    times = minutes_ago(40, 30, 20, 10)
    due, missed, reason = catchup_split(t, times, NOW)
    assert due == minutes_ago(10)
    assert missed == minutes_ago(40, 30, 20)
    assert "latest" in reason


def test_catchup_latest_single_on_time_fire() -> None:
    t = task(catchup="latest")
    due, missed, _ = catchup_split(t, [NOW], NOW)
    assert due == [NOW]
    assert missed == []


def test_catchup_all_keeps_the_last_catchup_max() -> None:
    t = task(catchup="all", catchup_max=3)
    times = minutes_ago(50, 40, 30, 20, 10)
    due, missed, reason = catchup_split(t, times, NOW)
    assert due == minutes_ago(30, 20, 10)
    assert missed == minutes_ago(50, 40)
    assert "all" in reason


def test_catchup_all_under_the_limit_keeps_everything() -> None:
    t = task(catchup="all", catchup_max=10)
    times = minutes_ago(30, 20, 10)
    due, missed, _ = catchup_split(t, times, NOW)
    assert due == times
    assert missed == []


# ---------------------------------------------------------------- overlap and auto-pause
# (agentd.policy: what the state layer asks inside a fire's or a quarantine's transaction)


def _runs(*statuses: str) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "status": s} for i, s in enumerate(statuses)]


@pytest.mark.parametrize(
    ("overlap", "active", "skip", "cancelled"),
    [
        ("allow", ("running", "queued", "queued"), None, 0),
        ("skip", (), None, 0),
        ("skip", ("running",), "overlap", 0),
        ("skip", ("queued",), "overlap", 0),
        ("queue_one", ("running",), None, 0),  # one successor may wait
        ("queue_one", ("running", "queued"), "overlap", 0),
        ("queue_all", ("running", "queued"), None, 0),
        ("queue_all", ("queued", "queued"), "queue_full", 0),
        ("cancel_previous", (), None, 0),
        ("cancel_previous", ("running", "queued"), None, 2),
    ],
)
def test_overlap_decision(
    overlap: str, active: tuple[str, ...], skip: str | None, cancelled: int
) -> None:
    decision = overlap_decision(overlap, _runs(*active), max_queued=2)
    assert decision.skip == skip
    assert len(decision.cancel) == cancelled


def test_auto_pause_reason() -> None:
    assert auto_pause_reason(3, 3, paused=False) == "3 consecutive runs quarantined"
    assert auto_pause_reason(4, 3, paused=False) == "4 consecutive runs quarantined"
    assert auto_pause_reason(2, 3, paused=False) is None
    assert auto_pause_reason(9, 3, paused=True) is None  # already paused: no second pause
    assert auto_pause_reason(9, 0, paused=False) is None  # 0: never


# ---------------------------------------------------------------- layered deadlines


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_deadlines_count_from_the_enqueue() -> None:
    assert run_deadline(NOW, 600.0) == at(600)
    assert start_deadline(NOW, 30.0) == at(30)
    assert run_deadline(NOW, None) is None
    assert start_deadline(NOW, None) is None
    assert not Deadlines()
    assert Deadlines(start_within=30.0)
    assert Deadlines(start_within=30.0, run_timeout=600.0).shortest == 30.0
    assert Deadlines(run_timeout=600.0).shortest == 600.0


@pytest.mark.parametrize(
    ("started", "now_s", "deadlines", "status"),
    [
        # queue wait: only a run that never started, at or after the deadline
        (False, 29.999, Deadlines(start_within=30.0), None),
        (False, 30.0, Deadlines(start_within=30.0), RunStatus.EXPIRED),
        (True, 3600.0, Deadlines(start_within=30.0), None),  # a retry waits on
        # the whole run: started or not; it wins over the queue wait
        (True, 599.0, Deadlines(run_timeout=600.0), None),
        (True, 600.0, Deadlines(run_timeout=600.0), RunStatus.TIMED_OUT),
        (False, 600.0, Deadlines(start_within=30.0, run_timeout=600.0), RunStatus.TIMED_OUT),
        (False, 31.0, Deadlines(start_within=30.0, run_timeout=600.0), RunStatus.EXPIRED),
        (False, 10**6, Deadlines(), None),
    ],
)
def test_overdue_status(
    started: bool, now_s: float, deadlines: Deadlines, status: RunStatus | None
) -> None:
    assert overdue_status(NOW, started, deadlines, at(now_s)) == status


def test_an_attempt_gets_the_shorter_of_its_timeout_and_what_is_left_of_the_run() -> None:
    assert attempt_timeout_s(60.0, None, NOW) == (60.0, False)
    assert attempt_timeout_s(None, None, NOW) == (None, False)
    assert attempt_timeout_s(60.0, at(600), NOW) == (60.0, False)  # plenty left
    assert attempt_timeout_s(60.0, at(45), NOW) == (45.0, True)  # the run's is shorter
    assert attempt_timeout_s(None, at(45), NOW) == (45.0, True)  # no per-attempt limit
    assert attempt_timeout_s(60.0, at(-5), NOW) == (0.0, True)  # passed: nothing left


def test_a_retry_fits_only_if_it_can_start_before_the_deadline() -> None:
    assert retry_fits(at(10), None)
    assert retry_fits(at(10), at(11))
    assert not retry_fits(at(11), at(11))
    assert not retry_fits(at(20), at(11))


def test_bounded_ends_a_run_timed_out_when_the_deadline_stopped_it_or_a_retry_cannot_fit() -> None:
    retry = Decision(RunStatus.QUEUED, 30.0, "retry")
    # no deadline: unchanged
    assert bounded(retry, NOW, None, hit=False) is retry
    # the retry would start before the deadline: unchanged
    assert bounded(retry, NOW, at(60), hit=False) is retry
    # it would start at or after it: the run ends now
    assert bounded(retry, NOW, at(30), hit=False).status == RunStatus.TIMED_OUT
    # the deadline stopped the attempt: whatever the retry policy said (quarantine too)
    quarantine = Decision(RunStatus.QUARANTINED, 0.0, "3 attempts failed")
    assert bounded(quarantine, NOW, at(0), hit=True).status == RunStatus.TIMED_OUT
    # a final decision the deadline did not cause stays
    done = Decision(RunStatus.SUCCEEDED)
    assert bounded(done, NOW, at(-1), hit=False) is done


def test_an_attempt_claimed_after_start_within_is_expired_and_final() -> None:
    decision = decide(task(start_within="30s"), Outcome.EXPIRED, None, 0, rng())
    assert decision.status == RunStatus.EXPIRED
    assert decision.delay_s == 0.0
