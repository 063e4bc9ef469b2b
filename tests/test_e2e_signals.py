"""Signals to a real daemon process: the drain, the force, and what each run becomes."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Agentd, blocked, pid_alive, wait_for

pytestmark = pytest.mark.e2e


def outcomes(d: Agentd, run_id: str) -> list[str]:
    return [a["outcome"] for a in d.query("SELECT outcome FROM attempts WHERE run_id=?", (run_id,))]


def test_command_gets_sigterm_when_the_grace_ends_then_sigkill(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    marks, pidfile = tmp_path / "marks", tmp_path / "pid"
    # Notes SIGTERM and carries on: only SIGKILL ends it. ($$$$ is the config for $$.)
    script = (
        f"echo $$$$ > {pidfile}; trap 'echo term >> {marks}' TERM; while :; do sleep 0.05; done"
    )
    d = make_daemon(
        f"""
        stubborn:
          schedule: {{manual: true}}
          command: {{argv: ["sh", "-c", "{script}"]}}
        """,
        "shutdown_grace: 3s",
    ).start()
    run_id = d.trigger("stubborn")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="command started")
    pid = int(pidfile.read_text())
    d.signal(signal.SIGTERM)
    wait_for(lambda: "shutting down gracefully" in d.log(), what="drain begins")
    assert not marks.exists()  # during the grace the command is left alone
    assert d.proc is not None and d.proc.wait(timeout=60) == 0
    assert marks.exists() and "term" in marks.read_text()  # SIGTERM when the grace ended
    assert not pid_alive(pid)  # and SIGKILL kill_grace later
    assert outcomes(d, run_id) == ["interrupted"]
    assert d.run_status(run_id) == "queued"  # resumes on the next start, attempt not spent


BLOCKER = """
blocker:
  schedule: {{manual: true}}
  python: {{callable: "e2e_tasks:batch"}}
  params: {{out: "{out}", go: "{go}", items: [a, b], block_at: 0}}
"""


def test_second_sigint_forces_exit_130_and_records_interrupted(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    go, out = tmp_path / "go", tmp_path / "out"
    d = make_daemon(BLOCKER.format(out=out, go=go), "shutdown_grace: 5m").start()
    run_id = d.trigger("blocker")
    wait_for(lambda: blocked(out), what="run blocked")
    d.signal(signal.SIGINT)
    wait_for(lambda: "shutting down gracefully" in d.log(), what="drain begins")
    assert d.proc is not None and d.proc.poll() is None  # would wait up to 5 minutes
    d.signal(signal.SIGINT)
    assert d.proc.wait(timeout=60) == 130
    assert "forcing exit" in d.log()
    assert outcomes(d, run_id) == ["interrupted"]


def test_second_sigterm_is_logged_and_ignored(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    go, out = tmp_path / "go", tmp_path / "out"
    d = make_daemon(BLOCKER.format(out=out, go=go), "shutdown_grace: 5m").start()
    d.trigger("blocker")
    wait_for(lambda: blocked(out), what="run blocked")
    d.signal(signal.SIGTERM)
    d.wait_log("shutting down gracefully", what="drain begins")
    d.signal(signal.SIGTERM)
    d.wait_log("already shutting down, ignored", what="second SIGTERM logged")
    assert d.proc is not None and d.proc.poll() is None  # still draining
    go.write_text("go")
    assert d.proc.wait(timeout=60) == 0


def test_sighup_applies_the_diff_without_touching_runs_in_flight(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    go, out, out2 = tmp_path / "go", tmp_path / "out", tmp_path / "out2"
    keep = BLOCKER.format(out=out, go=go)
    doomed = BLOCKER.format(out=out2, go=go).replace("blocker:", "doomed:")
    hourly = 'schedule: {every: 1h}\n  command: {argv: ["true"]}\n'
    d = make_daemon(keep + doomed + "moved:\n  " + hourly + "gone:\n  " + hourly).start()
    kept_run, doomed_run = d.trigger("blocker"), d.trigger("doomed")
    wait_for(lambda: blocked(out) and blocked(out2), what="both runs blocked")

    # blocker unchanged, doomed removed while its run is in flight, moved rescheduled,
    # gone removed, new added.
    d.write_config(keep + "moved:\n  " + hourly.replace("1h", "2h") + "new:\n  " + hourly)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload ok" in d.log(), what="reload applied")
    line = next(ln for ln in d.log().splitlines() if "reload ok" in ln)
    assert " added=new changed=moved removed=doomed,gone " in line, line
    assert "jobs_rescheduled=moved " in line, line
    assert d.run_status(kept_run) == "running" and d.run_status(doomed_run) == "running"

    go.write_text("go")
    d.wait_status(kept_run, "succeeded")
    d.wait_status(doomed_run, "succeeded")  # its task is gone; the run it started is not
    assert outcomes(d, kept_run) == ["success"] and outcomes(d, doomed_run) == ["success"]
    assert d.stop() == 0
