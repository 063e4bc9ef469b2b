"""End to end, cost-aware admission and burn-rate alarms: the real daemon against the
scripted chat-completions server (0.015 USD a run) and a real webhook receiver.

Budget windows are days in the task's zone; each test picks a fixed-offset zone where
the local time is a known hour, so the day does not end mid-test and the share of it
that has passed is known."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import wait_for
from test_e2e_safety import ENV, HOOK_SECRET, Hooks, alerts_to, assert_no_secrets, providers

from agentd.alerts import SIGNATURE_HEADER, verify
from agentd.budget import window_at
from agentd.clock import to_iso

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from fake_llm import FakeLLM, ThreadedFakeLLM

pytestmark = pytest.mark.e2e


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with ThreadedFakeLLM() as server:
        server.default = lambda req: fake_llm.ok("fine", prompt_tokens=10, completion_tokens=5)
        yield server


def zone_at(hour: int) -> str:
    """A fixed-offset zone where it is ``hour``:xx now (``Etc/GMT-5`` is UTC+5)."""
    offset = (hour - datetime.now(UTC).hour) % 24
    if offset > 14:
        offset -= 24
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


def test_a_fire_predicted_not_to_fit_the_day_is_skipped_or_deferred_with_its_reason(
    make_daemon: Any, llm: FakeLLM
) -> None:
    zone = zone_at(12)
    tasks = "\n".join(
        f"""
        {name}:
          schedule: {{every: 1s, timezone: {zone}}}
          agent: {{provider: fake, prompt: hi}}
          budget: {{task: {{usd_per_day: 0.05}}}}
          admission: {{on_budget: {policy}, estimate: p95, min_runs: 2}}
        """
        for name, policy in (("skipper", "skip"), ("deferrer", "defer"))
    )
    d = make_daemon(tasks, top=providers(llm)).start(env=ENV)

    def admissions(task: str, decision: str) -> list[dict[str, Any]]:
        return [
            e
            for e in d.events(kind="admission")
            if e["task_id"] == task and e["data"]["decision"] == decision
        ]

    wait_for(lambda: len(admissions("skipper", "skip")) >= 2, timeout=60, what="skips")
    wait_for(lambda: admissions("deferrer", "defer"), timeout=60, what="a deferral")
    _, day_end = window_at("day", datetime.now(UTC), zone)
    for task in ("skipper", "deferrer"):
        runs = d.query("SELECT * FROM runs WHERE task_id=? ORDER BY created_at", (task,))
        ran = [r["status"] for r in runs if r["status"] not in ("skipped", "queued")]
        # 0.015 a run: three fit the day's 0.05; the fourth is predicted not to (0.005
        # left), so it is never started to be stopped budget_exhausted.
        assert ran == ["succeeded"] * 3, (task, ran)
    assert len(llm.requests) == 6
    [first_skip, *_] = admissions("skipper", "skip")
    data = first_skip["data"]
    assert data["predicted_usd"] == pytest.approx(0.015)
    assert data["remaining_usd"] == pytest.approx(0.005)
    assert (data["scope"], data["on_budget"], data["history_runs"]) == ("skipper:day", "skip", 3)
    [skipped] = d.query("SELECT * FROM runs WHERE id=?", (first_skip["run_id"],))
    assert (skipped["status"], skipped["skip_reason"]) == ("skipped", "admission")
    # The deferred run waits, queued, for the next day of its zone; later fires are
    # skipped for overlap meanwhile, not deferred again.
    [deferral] = admissions("deferrer", "defer")
    assert deferral["data"]["not_before"] == to_iso(day_end)
    [waiting] = d.query("SELECT * FROM runs WHERE task_id='deferrer' AND status='queued'")
    assert waiting["id"] == deferral["run_id"] and waiting["not_before"] == to_iso(day_end)
    wait_for(
        lambda: any(r["skip_reason"] == "overlap" for r in d.runs("deferrer")),
        what="a fire skipped behind the deferred run",
    )
    assert len(admissions("deferrer", "defer")) == 1
    # The first runs had too little history and said so; the third fitted.
    early = [e["data"] for e in d.events(kind="admission") if e["task_id"] == "skipper"][:3]
    assert [e["predicted_usd"] is None for e in early] == [True, True, False]
    assert early[0]["detail"] == "too little history: 0 of 2 finished runs"
    # Visible in the run's events (API) and in the log, one line per verdict.
    api = httpx.get(f"{d.url}/v1/runs/{deferral['run_id']}/events").json()["events"]
    assert [e["kind"] for e in api][:2] == ["admission", "enqueue"]
    metrics = httpx.get(f"{d.url}/metrics").text
    assert 'agentd_skipped_fires_total{reason="admission",task="skipper"}' in metrics
    assert "admission task=skipper decision=skip" in d.log()
    assert "admission task=deferrer decision=defer" in d.log()
    assert d.stop() == 0
    assert_no_secrets(d)


def test_a_catch_up_after_downtime_runs_only_what_the_day_has_left(
    make_daemon: Any, llm: FakeLLM
) -> None:
    zone = zone_at(12)

    def tasks(limit: float) -> str:
        return f"""
        catcher:
          schedule: {{every: 1s, timezone: {zone}}}
          agent: {{provider: fake, prompt: hi}}
          budget: {{task: {{usd_per_day: {limit}}}}}
          overlap: queue_all
          catchup: all
          misfire_grace: 1s
          admission: {{on_budget: skip, min_runs: 2}}
        """

    d = make_daemon(tasks(1.0), top=providers(llm)).start(env=ENV)

    def succeeded() -> list[dict[str, Any]]:
        return [r for r in d.runs("catcher") if r["status"] == "succeeded"]

    wait_for(lambda: len(succeeded()) >= 3, timeout=60, what="a cost history")
    d.cli("pause", "catcher")
    wait_for(
        lambda: not [r for r in d.runs("catcher") if r["status"] in ("queued", "running")],
        what="no run left in flight",
    )
    assert d.stop() == 0
    ran = len(succeeded())
    # Room for two and a half more runs of 0.015 today.
    d.write_config(tasks(round(ran * 0.015 + 0.0375, 6)))
    d.cli("resume", "catcher")  # on the state: no daemon runs
    seen = max(e["id"] for e in d.events())
    stopped_at = datetime.now(UTC)
    wait_for(lambda: datetime.now(UTC) > stopped_at + timedelta(seconds=4), what="downtime")
    d.start(env=ENV)

    def verdicts() -> list[dict[str, Any]]:
        return [e for e in d.events(kind="admission") if e["id"] > seen]

    wait_for(lambda: len(verdicts()) >= 5, timeout=60, what="the catch-up's verdicts")
    wait_for(lambda: len(succeeded()) == ran + 2, timeout=60, what="the two that fit")
    batch = [e["data"] for e in verdicts()]
    assert [v["decision"] for v in batch[:5]] == ["run", "run", "skip", "skip", "skip"]
    assert [v["ahead"] for v in batch[:4]] == [0, 1, 2, 2]
    skipped = [d.query("SELECT * FROM runs WHERE id=?", (e["run_id"],))[0] for e in verdicts()]
    assert {r["status"] for r in skipped[2:]} == {"skipped"}
    assert {r["skip_reason"] for r in skipped[2:]} == {"admission"}
    assert skipped[0]["trigger"] == skipped[2]["trigger"] == "catchup"
    assert batch[2]["remaining_usd"] == pytest.approx(0.0075)
    # Later fires do not fit either; nothing was started to be stopped over budget.
    assert not [r for r in d.runs("catcher") if r["status"] == "budget_exhausted"]
    assert len(succeeded()) == ran + 2
    assert d.stop() == 0


def test_a_window_burning_too_fast_alerts_once_before_it_runs_out(
    make_daemon: Any, llm: FakeLLM, hooks: Hooks
) -> None:
    zone = zone_at(6)  # 6 to 7 hours of the local day have passed
    d = make_daemon(
        f"""
        burner:
          schedule: {{manual: true, timezone: {zone}}}
          agent: {{provider: fake, prompt: hi}}
          budget: {{task: {{usd_per_day: 0.03}}}}
        """,
        top=providers(llm) + alerts_to(hooks, "[budget_burn]"),
    ).start(env=ENV)
    run_id = d.trigger("burner")
    d.wait_status(run_id, "succeeded")
    # Half the day's 0.03 in 6-7 hours: at that rate it runs out 6-7 hours from now,
    # long before midnight.
    wait_for(lambda: hooks.delivered("budget_burn"), timeout=30, what="the burn alert")
    [alert] = hooks.delivered("budget_burn")
    assert verify(alert["_body"], HOOK_SECRET, alert["_headers"][SIGNATURE_HEADER])
    data = alert["data"]
    assert (data["scope"], data["limit_usd"]) == ("burner:day", 0.03)
    assert data["spent_usd"] == pytest.approx(0.015)
    start, end = window_at("day", datetime.now(UTC), zone)
    eta = datetime.fromisoformat(data["projected_exhaustion"].replace("Z", "+00:00"))
    elapsed = eta - start
    assert timedelta(hours=12) <= elapsed <= timedelta(hours=14, minutes=5), data
    assert eta < end - timedelta(hours=2.4)
    assert "runs out at" in alert["summary"]

    def eta_gauge() -> float | None:
        for line in httpx.get(f"{d.url}/metrics").text.splitlines():
            if line.startswith('agentd_budget_exhaustion_eta_seconds{scope="burner:day"}'):
                return float(line.split()[-1])
        return None

    first = wait_for(eta_gauge, what="the exhaustion ETA gauge")
    assert 5 * 3600 < first < 8 * 3600
    # Another gauge pass (the projection moved on) raises no second alarm.
    wait_for(lambda: (eta_gauge() or first) != first, timeout=30, what="a later gauge pass")
    assert len(d.events(kind="budget_burn")) == 1
    assert len(hooks.delivered("budget_burn")) == 1
    assert json.loads(d.cli("events", "--kind", "budget_burn", "--json").stdout)
    assert "budget burn scope=burner:day" in d.log()
    assert d.stop() == 0
    assert_no_secrets(d)
