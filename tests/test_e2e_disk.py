"""A full disk under a real daemon: it degrades visibly and recovers by itself.

The state dir is a small tmpfs (``smallfs``) that the test fills up and frees while the
daemon runs: every write of the state DB and the jobstore fails with "database or disk is
full" for a while, then works again. Nothing may be lost, doubled, or left stuck."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd, blocked, wait_for
from smallfs import SmallFs, small_fs

from agentd.clock import from_iso

pytestmark = pytest.mark.e2e


@pytest.fixture
def state_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """``tmp_path/state`` (where ``Agentd`` keeps its state) on a 16 MiB tmpfs."""
    with small_fs(tmp_path / "state", "16m") as fs:
        yield fs


def _get(d: Agentd, path: str) -> httpx.Response | None:
    try:
        return httpx.get(d.url + path, timeout=5)
    except httpx.TransportError:
        return None


def _readiness(d: Agentd) -> tuple[int, dict[str, Any]] | None:
    resp = _get(d, "/readyz")
    return (resp.status_code, resp.json()) if resp is not None else None


def _seconds(text: str) -> datetime:
    return from_iso(text).replace(microsecond=0)


def test_full_disk_turns_readiness_off_at_once_and_the_schedule_resumes_by_itself(
    make_daemon: Any, state_fs: SmallFs
) -> None:
    d = make_daemon(
        """
        tick:
          schedule: {every: 1s}
          command: {argv: ["true"]}
          overlap: allow
        """
    ).start()
    wait_for(lambda: len(d.runs("tick")) >= 3, what="three fires before the disk fills")
    assert _readiness(d) == (200, {"status": "ready"})

    state_fs.fill()
    filled = time.monotonic()
    # A fire commits every second: its failure turns readiness off at once, long before
    # the idle write probe (every 30 s) would notice.
    status = wait_for(
        lambda: (r := _readiness(d)) is not None and r[0] == 503 and r,
        timeout=15,
        what="/readyz 503 once writes fail",
    )
    assert "full" in status[1]["reason"], status
    assert time.monotonic() - filled < 15
    d.wait_log("database or disk is full", "the failure in the log")
    # Liveness is not readiness: the daemon is doing its job (retrying), restarting it
    # would not make room.
    health = _get(d, "/healthz")
    assert health is not None and health.status_code == 200, health.text if health else None
    wait_for(lambda: time.monotonic() - filled > 3, what="a few failed fires")

    state_fs.free()
    freed = datetime.now().astimezone()
    wait_for(lambda: (r := _readiness(d)) is not None and r[0] == 200, what="ready again")
    wait_for(
        lambda: any(
            r["status"] == "succeeded"
            and from_iso(r["scheduled_for"]) > freed + timedelta(seconds=2)
            for r in d.runs("tick")
        ),
        timeout=30,
        what="fires after the disk has room again",
    )
    assert not d.proc_exited()
    assert d.stop() == 0

    # Every occurrence from the first fire to the last is accounted for exactly once:
    # a run, or a counted misfire (the catch-up policy's choice for the outage).
    runs = d.runs("tick")
    fired = [_seconds(r["scheduled_for"]) for r in runs if r["trigger"] != "manual"]
    assert len(fired) == len(set(fired)), "an occurrence fired twice"
    covered = set(fired)
    for event in d.events(kind="misfire"):
        first, last = _seconds(event["data"]["first"]), _seconds(event["data"]["last"])
        span = int((last - first).total_seconds()) + 1
        assert event["data"]["count"] == span
        covered |= {first + timedelta(seconds=i) for i in range(span)}
    start, end = min(fired), max(fired)
    every = {start + timedelta(seconds=i) for i in range(int((end - start).total_seconds()) + 1)}
    assert every - covered == set(), "occurrences neither run nor counted as missed"
    assert covered - every == set()


def test_an_outcome_that_could_not_be_committed_is_recorded_once_the_disk_has_room(
    make_daemon: Any, state_fs: SmallFs, tmp_path: Path
) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    d = make_daemon(
        f"""
        job:
          schedule: {{manual: true}}
          command:
            shell: "touch {started}; while [ ! -f {go} ]; do sleep 0.02; done"
        """
    ).start()
    run_id = d.trigger("job")
    wait_for(started.exists, what="the command running")
    state_fs.fill()
    go.touch()  # the run ends now, while its outcome cannot be written
    d.wait_log("could not commit", "the failed outcome commit")
    wait_for(lambda: (r := _readiness(d)) is not None and r[0] == 503, what="/readyz 503")
    assert d.run_status(run_id) == "running"

    state_fs.free()
    row = d.wait_status(run_id, "succeeded", timeout=30)
    # Recorded, not re-run: the one attempt that did the work is the one that counts.
    assert row["attempt"] == 1
    attempts = d.query("SELECT outcome FROM attempts WHERE run_id=?", (run_id,))
    assert [a["outcome"] for a in attempts] == ["success"]
    wait_for(lambda: (r := _readiness(d)) is not None and r[0] == 200, what="ready again")
    assert d.stop() == 0


def test_a_checkpoint_the_disk_cannot_take_stops_the_run_at_no_cost_and_it_resumes(
    make_daemon: Any, state_fs: SmallFs, tmp_path: Path
) -> None:
    out, go = tmp_path / "out", tmp_path / "go"
    d = make_daemon(
        f"""
        job:
          schedule: {{manual: true}}
          python: {{callable: e2e_tasks:batch}}
          params: {{items: [a, b, c], block_at: 0, out: "{out}", go: "{go}"}}
          retry: {{max_attempts: 1}}
        """
    ).start()
    run_id = d.trigger("job")
    wait_for(lambda: blocked(out), what="the run blocked past its first checkpoint")
    state_fs.fill()
    go.touch()  # item b is done, its checkpoint cannot be saved: the run stops there
    wait_for(lambda: (r := _readiness(d)) is not None and r[0] == 503, what="/readyz 503")
    wait_for(lambda: out.read_text().split() == ["a", "b"], what="item b done")

    state_fs.free()
    # With max_attempts 1 a counted failure would quarantine it: it resumes instead, from
    # the last checkpoint that was saved (after a), so b is done again, and c.
    row = d.wait_status(run_id, "succeeded", timeout=30)
    assert row["failures"] == 0
    assert row["attempt"] == 2
    attempts = d.query(
        "SELECT outcome, error FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,)
    )
    assert [a["outcome"] for a in attempts] == ["interrupted", "success"]
    assert "checkpoint not saved" in attempts[0]["error"]
    assert out.read_text().split() == ["a", "b", "b", "c"]
    assert d.stop() == 0
