"""Backfill through a real daemon (its HTTP API, its CLI, its state DB): each occurrence
is keyed as the real fire of that instant, so one that already ran is a duplicate;
through the overlap policy and the pause; a dry run writes nothing; a range too long
is refused whole."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from harness import Agentd, wait_for

from agentd.clock import from_iso, to_iso

pytestmark = pytest.mark.e2e

HOUR = datetime(2026, 5, 1, 9, tzinfo=UTC)  # in the past: only a backfill fires it


def post_backfill(d: Agentd, task: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{d.url}/v1/tasks/{task}/backfill", json=body, timeout=30)


def span(start: datetime, end: datetime, **extra: Any) -> dict[str, Any]:
    return {"from": start.isoformat(), "to": end.isoformat(), **extra}


def test_backfill_keys_each_occurrence_as_its_real_fire(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        tick:
          schedule: {every: 2s}
          overlap: allow
          command: {shell: "true"}
        single:
          schedule: {every: 1h}
          command: {shell: "sleep 30"}
        held:
          schedule: {every: 1h}
          overlap: allow
          command: {shell: "true"}
        by-hand:
          schedule: {manual: true}
          command: {shell: "true"}
        """
    ).start()
    real = min(
        wait_for(
            lambda: [r for r in d.runs("tick") if r["trigger"] == "schedule"],
            what="a scheduled fire of tick",
        ),
        key=lambda r: r["scheduled_for"],
    )  # the first: no instant before it fired
    fired = from_iso(real["scheduled_for"])
    start, end = fired - timedelta(seconds=6), fired + timedelta(milliseconds=1)
    expected = [to_iso(fired - timedelta(seconds=s)) for s in (6, 4, 2, 0)]

    # A dry run lists the instants and writes nothing.
    before = {r["id"] for r in d.runs("tick")}
    dry = post_backfill(d, "tick", span(start, end, dry_run=True))
    assert dry.status_code == 200, dry.text
    assert dry.json()["count"] == 4
    assert [o["scheduled_for"] for o in dry.json()["occurrences"]] == expected
    assert not [r for r in d.runs("tick") if r["trigger"] == "backfill"]

    resp = post_backfill(d, "tick", span(start, end))
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert (body["count"], body["created"]) == (4, 3)
    *made, again = body["occurrences"]
    assert [o["scheduled_for"] for o in body["occurrences"]] == expected
    # The instant that fired for real is a duplicate answering with its run.
    assert again == {
        "scheduled_for": expected[-1],
        "run_id": real["id"],
        "created": False,
        "status": again["status"],
        "reason": "duplicate",
    }
    assert all(o["created"] and o["status"] == "queued" and o["reason"] is None for o in made)
    for o in made:
        run = d.wait_status(o["run_id"], "succeeded")
        assert run["trigger"] == "backfill" and run["scheduled_for"] == o["scheduled_for"]
        assert run["idempotency_key"] == f"tick@{o['scheduled_for']}"
    assert real["idempotency_key"] == f"tick@{expected[-1]}"
    assert not before & {o["run_id"] for o in made}

    # The same backfill again: every occurrence a duplicate, no run made.
    count = len(d.runs("tick"))
    replay = post_backfill(d, "tick", span(start, end)).json()
    assert replay["created"] == 0
    assert [o["reason"] for o in replay["occurrences"]] == ["duplicate"] * 4
    assert [o["run_id"] for o in replay["occurrences"]] == [
        *(o["run_id"] for o in made),
        real["id"],
    ]
    fresh = [r for r in d.runs("tick") if r["trigger"] == "backfill"]
    assert len(fresh) == 3 and len(d.runs("tick")) >= count  # the schedule goes on

    # The CLI: a dry run as JSON, then a real one as text.
    earlier = (fired - timedelta(seconds=10), fired - timedelta(seconds=6))
    out = d.cli(
        "backfill", "tick", "--from", earlier[0].isoformat(), "--to", earlier[1].isoformat(),
        "--dry-run", "--json",
    )  # fmt: skip
    assert [o["scheduled_for"] for o in json.loads(out.stdout)["occurrences"]] == [
        to_iso(fired - timedelta(seconds=s)) for s in (10, 8)
    ]
    out = d.cli(
        "backfill", "tick", "--from", earlier[0].isoformat(), "--to", earlier[1].isoformat()
    )
    assert "backfill tick: 2 enqueued of 2 occurrence(s)" in out.stdout
    assert len([r for r in d.runs("tick") if r["trigger"] == "backfill"]) == 5
    assert "backfill task=tick" in d.log() and "created=2 duplicates=0" in d.log()

    # Through the overlap policy: the first runs (30s), the two after it are skipped.
    single = post_backfill(d, "single", span(HOUR, HOUR + timedelta(hours=3))).json()
    assert [(o["status"], o["reason"]) for o in single["occurrences"]] == [
        ("queued", None),
        ("skipped", "overlap"),
        ("skipped", "overlap"),
    ]
    # And the pause: a paused task's occurrences are skipped runs, as its fires are.
    d.cli("pause", "held")
    held = post_backfill(d, "held", span(HOUR, HOUR + timedelta(hours=2))).json()
    assert [(o["status"], o["reason"]) for o in held["occurrences"]] == [("skipped", "paused")] * 2

    # Refused whole: a range holding more than 1000 occurrences, bad bodies, no schedule.
    long = post_backfill(d, "tick", span(HOUR, HOUR + timedelta(hours=1)))
    assert long.status_code == 400, long.text
    assert "more than 1000 occurrences" in long.json()["message"]
    assert not [r for r in d.runs("tick") if r["scheduled_for"] < to_iso(HOUR + timedelta(hours=1))]
    assert post_backfill(d, "tick", {"from": HOUR.isoformat()}).status_code == 400
    naive = post_backfill(d, "tick", {"from": "2026-05-01T09:00:00", "to": "2026-05-01T10:00:00"})
    assert naive.status_code == 400 and "UTC offset" in naive.json()["message"]
    assert post_backfill(d, "tick", span(HOUR, HOUR)).status_code == 400
    manual = post_backfill(d, "by-hand", span(HOUR, HOUR + timedelta(hours=1)))
    assert manual.status_code == 400 and "no schedule" in manual.json()["message"]
    assert post_backfill(d, "nope", span(HOUR, HOUR + timedelta(hours=1))).status_code == 404
    assert d.stop() == 0

    # With the daemon stopped the CLI backfills on the state DB, with the same keys.
    window = ("--from", HOUR.isoformat(), "--to", (HOUR + timedelta(hours=3)).isoformat())
    out = json.loads(d.cli("backfill", "held", *window, "--json").stdout)
    assert [o["reason"] for o in out["occurrences"]] == ["duplicate", "duplicate", "paused"]
    assert out["occurrences"][0]["run_id"] == held["occurrences"][0]["run_id"]
    bad = d.cli("backfill", "held", "--from", "yesterday", "--to", "today", check=False)
    assert bad.returncode == 2 and "--from must be an ISO 8601 date-time" in bad.stderr
