"""Triggers with params and an idempotency key, and the layered deadlines (start_within,
run_timeout), through a real daemon: its HTTP API, its CLI, its state DB, its alerts and
its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

ALERTS = """
alerts:
  channels:
    ops: {log: {level: warning}}
  rules:
    - {events: [run_expired, run_timed_out], channels: [ops], cooldown: 0s}
"""


def post_trigger(
    d: Agentd, task: str, body: dict[str, Any] | None = None, key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return httpx.post(f"{d.url}/v1/tasks/{task}/trigger", json=body or {}, headers=headers)


def metric(d: Agentd, name: str, **labels: str) -> float | None:
    text = httpx.get(d.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_a_trigger_s_params_are_checked_merged_recorded_and_its_key_replays(  # type: ignore[no-untyped-def]
    make_daemon, tmp_path: Path
) -> None:
    out = tmp_path / "params.json"
    d = make_daemon(
        f"""
        report:
          schedule: {{manual: true}}
          python: {{callable: "e2e_tasks:record_params"}}
          overlap: allow
          params: {{out: "{out}", greeting: hi, n: 0}}
          params_schema:
            type: object
            properties: {{n: {{type: integer, minimum: 1}}, who: {{type: string}}}}
            required: [n]
        """
    ).start()
    # Not matching the schema: 400, and no run.
    resp = post_trigger(d, "report", {"params": {"n": "three"}})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_request"
    assert "params_schema" in resp.json()["message"] and "'three'" in resp.json()["message"]
    no_params = post_trigger(d, "report")  # the task's own n: 0 is below the minimum
    assert no_params.status_code == 400, no_params.text
    assert d.runs("report") == []

    first = post_trigger(d, "report", {"params": {"n": 3, "who": "ops"}}, key="nightly-1")
    assert first.status_code == 202, first.text
    made = first.json()
    assert made["created"] is True and made["params"] == {"n": 3, "who": "ops"}
    assert made["idempotency_key"] == "nightly-1"
    assert "Idempotent-Replayed" not in first.headers
    run_id = made["run_id"]
    d.wait_status(run_id, "succeeded")
    # ctx.params: the trigger's merged over the task's
    assert json.loads(out.read_text()) == {"greeting": "hi", "n": 3, "out": str(out), "who": "ops"}

    # The same key and body: the same run, no new one (in any order of the keys).
    again = post_trigger(d, "report", {"params": {"who": "ops", "n": 3}}, key="nightly-1")
    assert again.status_code == 202, again.text
    assert again.json()["run_id"] == run_id and again.json()["created"] is False
    assert again.json()["reason"] == "duplicate"
    assert again.headers["Idempotent-Replayed"] == "true"
    # The same key, another body: 409.
    clash = post_trigger(d, "report", {"params": {"n": 4}}, key="nightly-1")
    assert clash.status_code == 409, clash.text
    assert clash.json()["error"] == "idempotency_conflict" and run_id in clash.json()["message"]
    bad_key = post_trigger(d, "report", {"params": {"n": 4}}, key="has space")
    assert bad_key.status_code == 400, bad_key.text
    assert [r["id"] for r in d.runs("report")] == [run_id]

    # Shown by the API and by `runs show`.
    shown = httpx.get(f"{d.url}/v1/runs/{run_id}").json()
    assert shown["params"] == {"n": 3, "who": "ops"}
    cli = json.loads(d.cli("runs", "show", run_id, "--json").stdout)
    assert cli["params"] == {"n": 3, "who": "ops"}
    assert "who" in d.cli("runs", "show", run_id).stdout

    # The CLI: --param K=V (JSON values when they are JSON) and --key.
    out1 = json.loads(
        d.cli(
            "trigger", "report", "--param", "n=5", "--param", "who=cli", "--key", "k2", "--json"
        ).stdout
    )
    assert out1["created"] is True and out1["params"] == {"n": 5, "who": "cli"}
    out2 = json.loads(
        d.cli(
            "trigger", "report", "--param", "n=5", "--param", "who=cli", "--key", "k2", "--json"
        ).stdout
    )
    assert (out2["run_id"], out2["created"]) == (out1["run_id"], False)
    refused = d.cli("trigger", "report", "--param", "n=6", "--key", "k2", check=False)
    assert refused.returncode != 0 and "idempotency" in (refused.stdout + refused.stderr)
    usage = d.cli("trigger", "report", "--param", "novalue", check=False)
    assert usage.returncode == 2 and "KEY=VALUE" in usage.stderr
    d.wait_status(out1["run_id"], "succeeded")
    assert json.loads(out.read_text())["who"] == "cli"
    assert d.stop() == 0


def test_a_key_s_window_ends_and_then_makes_a_new_run(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        job:
          schedule: {manual: true}
          command: {argv: ["true"]}
          overlap: allow
        """,
        top="limits: {trigger_key_window: 1s}",
    ).start()
    first = post_trigger(d, "job", key="k").json()
    assert first["created"] is True
    # Polled: a replay until the window is over, then a new run under the same key.
    second = wait_for(
        lambda: (r := post_trigger(d, "job", key="k").json())["created"] and r,
        timeout=30,
        what="the key's window to end",
    )
    assert second["run_id"] != first["run_id"]
    rows = {r["id"]: r for r in d.runs("job")}
    assert rows[second["run_id"]]["idempotency_key"] == "job@key:k"
    assert rows[first["run_id"]]["idempotency_key"] == f"job@key:k retired:{first['run_id']}"
    assert d.stop() == 0


def test_a_run_not_started_within_start_within_expires_alerted_and_counted(  # type: ignore[no-untyped-def]
    make_daemon, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    d = make_daemon(
        f"""
        hog:
          schedule: {{manual: true}}
          command: {{shell: "while [ ! -f {go} ]; do sleep 0.05; done"}}
        urgent:
          schedule: {{manual: true}}
          command: {{argv: ["true"]}}
          start_within: 1s
        """,
        daemon_extra="concurrency: 1\nlease: 2s",
        top=ALERTS,
    ).start()
    hog = d.trigger("hog")
    d.wait_status(hog, "running")
    urgent = d.trigger("urgent")  # no free slot: it waits in the queue
    row = d.wait_status(urgent, "expired", timeout=30)
    assert row["started_at"] is None and "start_within (1s)" in row["error"]
    [event] = d.events(urgent, "run_expired")
    assert event["data"]["start_within_s"] == 1.0
    d.wait_log(f"run expired run={urgent} task=urgent", "the expiry's log line")
    d.wait_log("ALERT run_expired urgent: run", "the run_expired alert")
    wait_for(
        lambda: metric(d, "agentd_runs_total", task="urgent", outcome="expired") == 1.0,
        what="agentd_runs_total{outcome=expired}",
    )
    go.touch()
    d.wait_status(hog, "succeeded")
    assert d.run_status(urgent) == "expired"  # final: the free slot does not run it
    assert d.stop() == 0


def test_run_timeout_stops_a_running_attempt_and_ends_a_retry_that_cannot_fit(  # type: ignore[no-untyped-def]
    make_daemon, tmp_path: Path
) -> None:
    d = make_daemon(
        """
        slow:
          schedule: {manual: true}
          command: {argv: [sleep, "60"]}
          timeout: 1m
          run_timeout: 1s
          retry: {max_attempts: 5, backoff: 100ms}
        flaky:
          schedule: {manual: true}
          command: {argv: ["false"]}
          run_timeout: 1s
          retry: {max_attempts: 5, backoff: 24h, max_backoff: 24h}
        """,
        top=ALERTS,
    ).start()
    slow = d.trigger("slow")
    row = d.wait_status(slow, "timed_out", timeout=30)
    assert row["outcome"] == "timeout" and row["attempt"] == 1  # not retried
    assert "run_timeout (1s) passed" in row["error"]
    [event] = d.events(slow, "run_timed_out")
    assert event["data"]["status_before"] == "running"
    d.wait_log("ALERT run_timed_out slow: run", "the run_timed_out alert")
    assert d.query("SELECT * FROM quarantine") == []

    # A failure whose retry would start after the deadline (a backoff drawn below 24h
    # against 1s left: below it once in 86,400) ends the run at once, not queued.
    flaky = d.trigger("flaky")
    end = d.wait_status(flaky, "timed_out", timeout=30)
    assert "no retry could start before run_timeout (1s)" in end["error"]
    assert [e["kind"] for e in d.events(flaky, "retry")] == []
    wait_for(
        lambda: metric(d, "agentd_runs_total", task="slow", outcome="timed_out") == 1.0,
        what="agentd_runs_total{outcome=timed_out}",
    )
    assert d.stop() == 0
