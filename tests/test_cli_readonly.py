"""Read-only CLI commands never create or write the state DB (issue 24): with no daemon
running they read the DB as it is, opened read-only, and say so when there is none yet.
Writes (trigger, pause, ...) still work on the DB directly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness import Agentd

READS = [
    ("status",),
    ("tasks",),
    ("runs",),
    ("events", "--limit", "5"),
    ("quarantine",),
    ("spend",),
    ("alerts",),
]


def _digest(state_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state_dir.iterdir())
        if p.is_file() and p.name.startswith("state.sqlite")
    }


def test_reads_without_a_daemon_create_no_state(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Agentd = make_daemon("hello: {schedule: {manual: true}, command: {shell: 'true'}}")
    for args in READS:
        out = d.cli(*args, check=False)
        assert out.returncode in (0, 1, 3), (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert not d.state_dir.exists(), sorted(p.name for p in d.state_dir.rglob("*"))
    status = d.cli("status", "--json", check=False)
    assert status.returncode == 3
    assert json.loads(status.stdout)["daemon"] == "not running"
    runs = d.cli("runs", check=False)
    assert runs.returncode == 1 and "no state DB" in runs.stderr


def test_reads_without_a_daemon_leave_the_state_db_unchanged(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Agentd = make_daemon("hello: {schedule: {manual: true}, command: {shell: 'echo hi'}}")
    d.start()
    run_id = d.trigger("hello")
    d.wait_status(run_id, "succeeded")
    assert d.stop() == 0
    # A task added to the config since: a write path would record task_added.
    d.write_config(
        "hello: {schedule: {manual: true}, command: {shell: 'echo hi'}}\n"
        "later: {schedule: {every: 1h}, command: {shell: 'true'}}"
    )
    events = len(d.events())  # (the harness's own read-only look may add -wal/-shm)
    before = _digest(d.state_dir)
    for args in [*READS, ("runs", "show", run_id)]:
        out = d.cli(*args, check=False)
        assert out.returncode in (0, 3), (args, out.stdout, out.stderr)
    assert _digest(d.state_dir) == before
    assert len(d.events()) == events
    tasks = json.loads(d.cli("tasks", "--json").stdout)
    assert {t["task"] if "task" in t else t.get("id") for t in tasks} >= {"hello", "later"}
    shown = json.loads(d.cli("runs", "show", run_id, "--json").stdout)
    assert shown["status"] == "succeeded"
    # A write still works without a daemon, on the DB itself.
    trig = json.loads(d.cli("trigger", "hello", "--json").stdout)
    assert d.run_status(trig["run_id"]) == "queued"
    assert _digest(d.state_dir) != before
