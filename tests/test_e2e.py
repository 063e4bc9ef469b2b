"""End to end: the real daemon process, real signals, real SQLite, real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from harness import Agentd, agentd_cli, blocked, pid_alive, wait_for

from agentd.clock import to_iso
from agentd.config import load_config
from agentd.schedule import next_fire
from agentd.state.sqlite.engine import SqliteStore

pytestmark = pytest.mark.e2e


def test_interval_task_fires_and_succeeds(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        tick:
          schedule: {every: 1s}
          command: {shell: "echo hello-from-tick"}
        """
    ).start()
    run = wait_for(
        lambda: [r for r in d.runs("tick") if r["status"] == "succeeded"],
        what="a succeeded tick run",
    )[0]
    assert run["trigger"] == "schedule"
    assert run["attempt"] == 1
    ws = d.state_dir / "runs" / "tick" / run["id"]
    assert (ws / "stdout.log").read_text().strip() == "hello-from-tick"
    # The workspace follows the DB: run.json appears just after the commit.
    wait_for(
        lambda: (
            (ws / "run.json").exists()
            and json.loads((ws / "run.json").read_text())["status"] == "succeeded"
        ),
        what="run.json saying succeeded",
    )
    kinds = [json.loads(line)["kind"] for line in (ws / "events.jsonl").read_text().splitlines()]
    assert kinds[:4] == ["enqueue", "claim", "start", "success"]
    assert d.stop() == 0


def test_failing_command_retries_then_quarantine_then_release(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    flag = tmp_path / "fixed"
    d = make_daemon(
        f"""
        flaky:
          schedule: {{manual: true}}
          command: {{shell: "test -f {flag} || (echo broken >&2; exit 3)"}}
          retry: {{max_attempts: 3, backoff: 200ms, max_backoff: 1s}}
        """
    ).start()
    run_id = d.trigger("flaky")
    d.wait_status(run_id, "quarantined")
    attempts = d.query("SELECT * FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,))
    assert [a["outcome"] for a in attempts] == ["failure"] * 3
    assert all(a["exit_code"] == 3 for a in attempts)
    assert "broken" in attempts[-1]["error"]
    retries = d.events(run_id, "retry")
    assert len(retries) == 2
    # Retries waited in the queue: each attempt starts no earlier than its not_before.
    for retry, nxt in zip(retries, attempts[1:], strict=True):
        assert nxt["started_at"] >= retry["data"]["not_before"]
    listed = json.loads(d.cli("quarantine", "list", "--json").stdout)
    assert [q["run_id"] for q in listed] == [run_id]
    assert "exit code 3" in listed[0]["last_error"]

    flag.write_text("ok")
    d.cli("quarantine", "release", run_id)
    row = d.wait_status(run_id, "succeeded")
    assert row["attempt"] == 4
    assert json.loads(d.cli("quarantine", "list", "--json").stdout) == []
    assert d.stop() == 0


def test_sigkill_mid_run_recovers_and_finishes_exactly_once(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    starts, go, pidfile = tmp_path / "starts", tmp_path / "go", tmp_path / "pid"
    wait_go = f"while [ ! -f {go} ]; do sleep 0.05; done"
    d = make_daemon(
        f"""
        slow:
          schedule: {{manual: true}}
          command:
            shell: "echo $$$$ > {pidfile}; echo start >> {starts}; {wait_go}"
        """
    ).start()
    run_id = d.trigger("slow")
    wait_for(lambda: starts.exists() and starts.read_text().count("start") == 1, what="first start")
    d.kill9()
    child = int(pidfile.read_text())
    if pid_alive(child):  # without systemd's cgroup, the orphan is ours to clean up
        os.killpg(child, signal.SIGKILL)
    assert d.run_status(run_id) == "running"

    go.write_text("go")
    d.start()
    row = d.wait_status(run_id, "succeeded")
    assert row["failures"] == 0, "a lost attempt must not count as a failure"
    assert len(d.events(run_id, "recover")) == 1
    assert len(d.events(run_id, "success")) == 1
    outcomes = [
        a["outcome"]
        for a in d.query("SELECT outcome FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,))
    ]
    assert outcomes == ["lost", "success"]
    assert d.stop() == 0
    # A further restart does not run the finished run again.
    d.start()
    wait_for(lambda: "agentd started" in d.log().split("agentd stopped")[-1])
    assert d.stop() == 0
    assert len(d.events(run_id, "claim")) == 2
    assert starts.read_text().count("start") == 2


def test_python_task_killed_resumes_at_next_item(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, go = tmp_path / "processed", tmp_path / "go"
    d = make_daemon(
        f"""
        batch:
          schedule: {{manual: true}}
          python: {{callable: "e2e_tasks:batch"}}
          params: {{items: [a, b, c, d, e], out: "{out}", go: "{go}", block_at: 2}}
        """
    ).start()
    run_id = d.trigger("batch")
    wait_for(
        lambda: out.exists() and out.read_text().split() == ["a", "b", "c"],
        what="three items processed",
    )
    wait_for(
        lambda: (
            d.query("SELECT seq FROM checkpoints WHERE run_id=?", (run_id,))
            and d.query("SELECT seq FROM checkpoints WHERE run_id=?", (run_id,))[0]["seq"] == 3
        )
    )
    d.kill9()
    go.write_text("go")
    d.start()
    d.wait_status(run_id, "succeeded")
    assert out.read_text().split() == ["a", "b", "c", "d", "e"]
    assert d.stop() == 0


def test_double_fire_enqueues_one_run(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon and another process both fire the same scheduled instant: one run."""
    d = make_daemon(
        """
        tick:
          schedule: {every: 2s}
          command: {argv: ["true"]}
          overlap: allow
        """
    )
    config = load_config(d.config)
    spec = config.schedule_spec("tick")
    d.start()
    store = SqliteStore(d.state_dir / "state.sqlite")
    try:
        # A fire time the running daemon will hit, a few seconds ahead even on a loaded
        # machine (picked before the start, it could pass while the daemon starts up and
        # the daemon would never fire it), and fire it first.
        target = next_fire(spec, "tick", datetime.now(UTC) + timedelta(seconds=3))
        assert target is not None
        first = store.fire("tick", datetime.now(UTC), scheduled_for=target, overlap="allow")
        assert first.created
        d.wait_status(first.run_id, "succeeded")
        # The daemon's own fire at `target` landed on the same idempotency key.
        wait_for(
            lambda: f"fire deduplicated task=tick scheduled_for={to_iso(target)}" in d.log(),
            what="the daemon's fire of the same instant",
        )
        again = store.fire("tick", datetime.now(UTC), scheduled_for=target, overlap="allow")
        assert not again.created and again.run_id == first.run_id
    finally:
        store.close()
    at_target = [r for r in d.runs("tick") if r["scheduled_for"] == to_iso(target)]
    assert [r["id"] for r in at_target] == [first.run_id]
    assert d.stop() == 0


def test_overlap_skip_records_skipped_fires(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    d = make_daemon(
        f"""
        long:
          schedule: {{every: 1s}}
          command: {{shell: "while [ ! -f {go} ]; do sleep 0.05; done"}}
          overlap: skip
        """
    ).start()
    wait_for(
        lambda: len([r for r in d.runs("long") if r["status"] == "skipped"]) >= 2,
        what="two skipped fires",
    )
    skipped = [r for r in d.runs("long") if r["status"] == "skipped"]
    assert all(r["skip_reason"] == "overlap" for r in skipped)
    assert len(d.events(kind="skip")) >= 2
    running = [r for r in d.runs("long") if r["status"] == "running"]
    assert len(running) == 1
    go.write_text("go")
    d.wait_status(running[0]["id"], "succeeded")
    assert d.stop() == 0


def test_catchup_latest_after_downtime_runs_once_and_counts_the_rest(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        tick:
          schedule: {every: 1s}
          command: {argv: ["true"]}
          catchup: latest
          misfire_grace: 1s
        """
    ).start()
    wait_for(lambda: [r for r in d.runs("tick") if r["status"] == "succeeded"])
    assert d.stop() == 0
    stopped_at = datetime.now(UTC)
    # Downtime: several fire times pass while no daemon runs.
    wait_for(lambda: datetime.now(UTC) > stopped_at + timedelta(seconds=4), what="downtime")
    d.start()
    catchup = wait_for(
        lambda: [r for r in d.runs("tick") if r["trigger"] == "catchup"], what="a catch-up run"
    )
    assert len(catchup) == 1
    misfires = d.events(kind="misfire")
    assert misfires and misfires[0]["data"]["count"] >= 2
    assert misfires[0]["data"]["reason"] == "catchup=latest"
    assert "misfire task=tick dropped=" in d.log()
    assert d.stop() == 0


def test_second_instance_exits_75(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        idle:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """
    ).start()
    second = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "run", "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 75
    assert f"pid {d.proc.pid}" in second.stderr
    assert d.stop() == 0


def test_broken_config_exits_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "agentd.yaml"
    config.write_text(
        f"daemon: {{state_dir: {tmp_path / 'state'}}}\n"
        "tasks:\n"
        "  nightly:\n"
        "    schedule: {cron: '61 * * * *'}\n"
        "    command: {argv: ['true']}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert "tasks.nightly.schedule.cron" in proc.stderr
    assert str(config) in proc.stderr
    assert not (tmp_path / "state").exists(), "a bad config must not touch the state dir"


def test_timeout_kills_the_process_group(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "pid"
    d = make_daemon(
        f"""
        hang:
          schedule: {{manual: true}}
          command: {{shell: "sleep 60 & echo $! > {pidfile}; wait"}}
          timeout: 1s
          retry: {{max_attempts: 1}}
        """
    ).start()
    run_id = d.trigger("hang")
    row = d.wait_status(run_id, "quarantined")
    assert row["outcome"] == "timeout"
    grandchild = int(pidfile.read_text())
    wait_for(lambda: not pid_alive(grandchild), what="grandchild killed with its group")
    assert d.stop() == 0


def test_cli_pause_resume_and_cancel_reach_a_running_daemon(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        sleeper:
          schedule: {manual: true}
          command: {argv: ["sleep", "60"]}
        ticker:
          schedule: {every: 1s}
          command: {argv: ["true"]}
        """
    ).start()
    run_id = d.trigger("sleeper")
    d.wait_status(run_id, "running")
    d.cli("cancel", run_id)
    row = d.wait_status(run_id, "cancelled", timeout=10)
    assert row["outcome"] == "cancelled"

    d.cli("pause", "ticker", "--reason", "maintenance window")
    paused = wait_for(
        lambda: [r for r in d.runs("ticker") if r["skip_reason"] == "paused"],
        what="a fire skipped because paused",
    )
    assert paused
    tasks = json.loads(d.cli("tasks", "--json").stdout)
    assert {t["task"]: t["paused"] for t in tasks}["ticker"] == "maintenance window"
    d.cli("resume", "ticker")
    after = len(d.runs("ticker"))
    wait_for(
        lambda: [r for r in d.runs("ticker")[after:] if r["status"] == "succeeded"],
        what="a run after resume",
    )
    assert d.stop() == 0


def test_sigterm_interrupts_python_at_checkpoint_and_resumes(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, go = tmp_path / "processed", tmp_path / "go"
    d = make_daemon(
        f"""
        batch:
          schedule: {{manual: true}}
          python: {{callable: "e2e_tasks:batch"}}
          params: {{items: [a, b, c, d], out: "{out}", go: "{go}", block_at: 0}}
        """
    ).start()
    run_id = d.trigger("batch")
    wait_for(lambda: blocked(out) and out.read_text().split() == ["a"])
    # The run blocks after item a; the stop request lands at its next checkpoint.
    d.signal(signal.SIGTERM)
    # Release the run only once the drain has begun, so its next checkpoint is the stop.
    wait_for(lambda: "agentd stopping" in d.log(), what="drain to begin")
    go.write_text("go")
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 0
    row = d.query("SELECT * FROM runs WHERE id=?", (run_id,))[0]
    assert row["status"] == "queued"
    assert row["outcome"] == "interrupted"
    assert row["failures"] == 0
    assert out.read_text().split() == ["a", "b"]
    d.start()
    d.wait_status(run_id, "succeeded")
    assert out.read_text().split() == ["a", "b", "c", "d"]
    assert d.stop() == 0


def test_cli_commands_work_while_daemon_is_stopped(tmp_path: Path) -> None:
    d = Agentd(
        tmp_path,
        """
        job:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """,
    )
    run_id = d.trigger("job")
    assert d.run_status(run_id) == "queued"
    listed = json.loads(d.cli("runs", "--json").stdout)
    assert [r["id"] for r in listed] == [run_id]
    d.start()
    d.wait_status(run_id, "succeeded")
    assert d.stop() == 0
    shown = d.cli("runs", "show", run_id).stdout
    assert "success" in shown
    missing = agentd_cli("runs", "show", "nope", config=d.config)
    assert missing.returncode == 1 and "no run" in missing.stderr
