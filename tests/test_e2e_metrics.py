"""Issue 28's metrics on a real daemon's ``/metrics``: the outbox (pending and failed
deliveries, delivery attempts) and per task the next fire time and overdue.

(Tokens and USD per task, ``agentd_llm_tokens_total`` and ``agentd_llm_cost_usd_total``,
are checked against the scripted provider in ``tests/test_e2e_safety.py``.)"""

from __future__ import annotations

import time

import httpx
import pytest
from harness import Agentd, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def metric(d: Agentd, name: str, **labels: str) -> float | None:
    resp = httpx.get(d.url + "/metrics", timeout=10)
    assert resp.status_code == 200
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def test_next_fire_overdue_and_outbox_gauges(make_daemon) -> None:  # type: ignore[no-untyped-def]
    closed = free_port()  # nothing listens: every delivery attempt fails
    d = make_daemon(
        """
        hourly:
          schedule: {cron: "0 * * * *"}
          command: {argv: ["true"]}
        idle:
          schedule: {cron: "0 * * * *"}
          command: {argv: ["true"]}
        watched:
          schedule: {manual: true}
          command: {argv: ["true"]}
          expect: {every: 1s}
        """,
        top=f"""
        alerts:
          channels:
            hook:
              webhook: {{url: "http://127.0.0.1:{closed}/hook", timeout: 2s}}
              retries: 1
              backoff: 100ms
          rules:
            - {{events: [deadman], channels: [hook]}}
        """,
    ).start()

    # A scheduled task's next fire appears with its first activity: the next top of the
    # hour, as the scheduler holds it. One that did nothing has no series.
    d.wait_status(d.trigger("hourly"), "succeeded")
    nxt = wait_for(
        lambda: metric(d, "agentd_task_next_fire_timestamp_seconds", task="hourly"),
        what="next fire time of hourly",
    )
    assert nxt % 3600 == 0 and 0 < nxt - time.time() <= 3600 + 5, nxt
    assert metric(d, "agentd_task_overdue", task="hourly") == 0
    assert metric(d, "agentd_task_next_fire_timestamp_seconds", task="idle") is None
    assert metric(d, "agentd_task_overdue", task="idle") is None

    # No success within `expect` (1 s from the start of monitoring): the dead man's
    # switch says late, and the task is overdue, though it never ran. It is manual, so
    # it has no next fire.
    wait_for(lambda: metric(d, "agentd_task_overdue", task="watched") == 1, what="overdue")
    assert metric(d, "agentd_task_next_fire_timestamp_seconds", task="watched") is None

    # The deadman alert's delivery to `hook` fails, is retried once, then fails for good.
    wait_for(
        lambda: metric(d, "agentd_outbox_deliveries", channel="hook", status="failed") == 1,
        what="failed delivery counted",
    )
    assert metric(d, "agentd_outbox_deliveries", channel="hook", status="pending") == 0
    assert metric(d, "agentd_alert_deliveries_total", channel="hook", outcome="retry") == 1
    assert metric(d, "agentd_alert_deliveries_total", channel="hook", outcome="failed") == 1
    assert metric(d, "agentd_alert_deliveries_total", channel="hook", outcome="delivered") is None

    # Paused is an operator's decision: not overdue.
    d.cli("pause", "watched")
    wait_for(lambda: metric(d, "agentd_task_overdue", task="watched") == 0, what="not overdue")
    assert metric(d, "agentd_task_paused", task="watched") == 1
    assert d.stop() == 0
