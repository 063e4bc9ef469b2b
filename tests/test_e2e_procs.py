"""No process outlives its run: a daemon's crash, agentd as PID 1 or subreaper, and
signals in the first moments of start-up (issue 23, "Processes")."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Agentd, pid_alive, wait_for

pytestmark = pytest.mark.e2e


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def zombies_of(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and fields[0] == "Z" and int(fields[1]) == parent:
                found.append(int(name))
    return found


def group_alive(pgid: int) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def recorded(d: Agentd, run_id: str) -> bool:
    """The attempt's process group is in the DB (or this agentd records none)."""
    try:
        sql = "SELECT pgid FROM attempts WHERE run_id=? AND pgid IS NOT NULL"
        return bool(d.query(sql, (run_id,)))
    except sqlite3.OperationalError:  # no such column: nothing to wait for
        return True


def test_kill9_then_restart_ends_the_old_group_before_the_new_attempt(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    """The old attempt's group (a shell and its child, both ignoring SIGTERM) is dead
    before the recovered run starts again: the group holds a flock for its whole life,
    which the new attempt finds free, and the run's events say what was found."""
    log, pidfile, lock = tmp_path / "log", tmp_path / "pid", tmp_path / "lock"
    script = tmp_path / "task.sh"
    script.write_text(
        "trap '' TERM\n"  # inherited by the sleep: only SIGKILL ends this group
        f"exec 9>>{lock}\n"
        f"flock -n 9 || echo overlap >> {log}\n"
        f"echo start $$ >> {log}\n"  # logged before the pid file says "started"
        f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}\n"
        "sleep 30\n"
        f"echo end $$ >> {log}\n"
    )
    tasks = f"""
        once:
          schedule: {{manual: true}}
          overlap: skip
          command: {{argv: ["sh", "{script}"]}}
        """
    d = make_daemon(tasks, "kill_grace: 1s\nshutdown_grace: 1s").start()
    run_id = d.trigger("once")
    wait_for(lambda: pidfile.exists(), what="first start")
    first = int(pidfile.read_text())
    wait_for(lambda: recorded(d, run_id), what="the group recorded")
    d.kill9()
    assert group_alive(first), "the old group runs on after kill -9 (its orphan)"
    pidfile.unlink()
    d.start()
    wait_for(lambda: pidfile.exists(), what="second start")
    second = int(pidfile.read_text())
    lines = log.read_text().splitlines()
    assert lines == [f"start {first}", f"start {second}"], lines  # no overlap, no end
    assert not group_alive(first)
    killed = d.events(run_id, "orphan_killed")
    assert len(killed) == 1, d.events(run_id)
    data = killed[0]["data"]
    assert data["pgid"] == first and data["leader_alive"] is True and data["found"] == 2
    assert data["term_sufficed"] is False and data["signal"] == "SIGKILL"
    claims = [e["id"] for e in d.events(run_id, "claim")]
    recovers = [e["id"] for e in d.events(run_id, "recover")]
    assert len(claims) == 2 and killed[0]["id"] < recovers[0] < claims[1]
    assert d.stop() == 0


def test_kill9_with_the_group_already_gone_records_no_orphan(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    d = make_daemon(
        f"""
        once:
          schedule: {{manual: true}}
          command: {{shell: "echo $$$$ > {pidfile}; sleep 30"}}
        """
    ).start()
    run_id = d.trigger("once")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="start")
    wait_for(lambda: recorded(d, run_id), what="the group recorded")
    pgid = int(pidfile.read_text())
    d.kill9()
    os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not group_alive(pgid), what="group gone")
    d.start()
    wait_for(lambda: len(d.events(run_id, "claim")) == 2, what="claimed again")
    assert d.events(run_id, "orphan_killed") == []
    assert d.events(run_id, "recover")[0]["data"]["pgid"] == pgid
    assert d.stop() == 0


def test_command_leader_gets_sigterm_when_the_daemon_dies(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    """The death signal (setpriv --pdeathsig): the leader goes with the daemon, even
    if agentd never starts again."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv on this host: commands start without a death signal")
    pidfile = tmp_path / "pid"
    d = make_daemon(
        f"""
        once:
          schedule: {{manual: true}}
          command: {{argv: ["sh", "-c", "echo $$$$ > {pidfile}; exec sleep 30"]}}
        """
    ).start(env={"AGENTD_PDEATHSIG": "1"})
    d.trigger("once")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="start")
    leader = int(pidfile.read_text())
    d.kill9()
    wait_for(lambda: not pid_alive(leader) or (_stat(leader) or ["Z"])[0] == "Z", 10, "death")
    assert "setpriv --pdeathsig" in d.log()


def test_subreaper_reaps_a_double_forked_grandchild(
    make_daemon: Callable[..., Agentd], tmp_path: Path
) -> None:
    """Outside a namespace: the daemon is a subreaper, so a command's double-forked
    sleeper becomes its child, and once it exits no zombie of it stays."""
    pidfile = tmp_path / "grandchild"
    d = make_daemon(
        f"""
        forker:
          schedule: {{manual: true}}
          command: {{shell: "(sleep 1 >/dev/null 2>&1 & echo $! > {pidfile}) ; exit 0"}}
        """
    ).start()
    assert d.proc is not None
    run_id = d.trigger("forker")
    d.wait_status(run_id, "succeeded")
    grandchild = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()))
    fields = _stat(grandchild)
    assert fields is None or fields[0] == "Z" or int(fields[1]) == d.proc.pid, fields
    wait_for(lambda: not pid_alive(grandchild), 15, "grandchild reaped")
    assert zombies_of(d.proc.pid) == []
    assert "reaped orphan" in d.log()
    assert d.stop() == 0


# ------------------------------------------------------------------ PID 1


def _unshare_prefix() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in (
        [unshare, "--pid", "--fork", "--mount-proc"],
        [unshare, "-r", "--pid", "--fork", "--mount-proc"],
    ):
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return None


def test_as_pid1_zombies_are_reaped_sigterm_drains_sighup_reloads(
    tmp_path: Path,
) -> None:
    prefix = _unshare_prefix()
    if prefix is None:
        print("SKIP reason: cannot make a PID namespace here (unshare refused)")
        pytest.skip("unshare --pid not allowed here")
    pidfile = tmp_path / "grandchild"
    d = Agentd(
        tmp_path,
        f"""
        forker:
          schedule: {{manual: true}}
          command: {{shell: "(sleep 0.3 >/dev/null 2>&1 & echo $! > {pidfile}) ; exit 0"}}
        """,
    )
    log = d.log_path.open("ab")
    d.proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "agentd.cli", "run", "--config", str(d.config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    log.close()
    try:
        d.wait_log("agentd started", "daemon start in its PID namespace")
        assert "pid=1 " in d.log()
        for _ in range(3):
            pidfile.unlink(missing_ok=True)
            d.wait_status(d.trigger("forker"), "succeeded")
            wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
        wait_for(lambda: d.log().count("reaped orphan") >= 3, 20, "orphans reaped")
        # Seen from outside the namespace, agentd (PID 1 inside) has no zombie child.
        assert zombies_of(_ns_init(d)) == [], d.log()[-3000:]
        # SIGHUP reloads (the namespace's init has handlers, so it gets signals).
        _signal_ns_init(d, signal.SIGHUP)
        d.wait_log("reload ok generation=2", "reload as PID 1")
        _signal_ns_init(d, signal.SIGTERM)
        assert d.proc.wait(timeout=60) == 0, d.log()[-3000:]
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)


def _ns_init(d: Agentd) -> int:
    """agentd's pid outside its namespace: ``unshare --fork``'s one child."""
    assert d.proc is not None
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _signal_ns_init(d: Agentd, sig: signal.Signals) -> None:
    """Signal agentd, PID 1 of its namespace, by its pid outside (so that it is not
    unshare that is signalled)."""
    os.kill(_ns_init(d), sig)


# ------------------------------------------------------------------ start-up signals


def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_startup_exits_0_and_releases_everything(
    make_daemon: Callable[..., Agentd], sig: signal.Signals
) -> None:
    """At each moment of start-up, from the first one the process can catch a signal
    (before that, only the interpreter runs: ~20 ms), a stop is a clean stop."""
    d = make_daemon(
        """
        t:
          schedule: {every: 1h}
          command: {argv: ["true"]}
        """
    )
    for offset in (0.0, 0.05, 0.15, 0.3, 0.5, 0.8):
        d.start(wait_ready=False)
        assert d.proc is not None
        # Offsets from the moment agentd's handlers are in (the interpreter's start
        # before it takes ~20 ms idle, and much longer on a loaded machine): the later
        # ones land in config load, state open, the scheduler's sync.
        wait_for(lambda: _catches_sigterm(d.proc.pid) or d.proc_exited(), what="handlers")
        time.sleep(offset)
        d.signal(sig)
        code = d.proc.wait(timeout=60)
        assert code == 0, f"offset {offset}: exit {code}\n{d.log()[-3000:]}"
    # Nothing was left taken: a start now works (lock, port, DB).
    d.log_path.unlink()
    d.start()
    assert d.stop() == 0


def test_sighup_during_startup_does_not_kill_it(make_daemon: Callable[..., Agentd]) -> None:
    d = make_daemon(
        """
        t:
          schedule: {every: 1h}
          command: {argv: ["true"]}
        """
    )
    for offset in (0.0, 0.05, 0.2, 0.5):
        d.start(wait_ready=False)
        assert d.proc is not None
        wait_for(lambda: _catches_sigterm(d.proc.pid) or d.proc_exited(), what="handlers")
        time.sleep(offset)
        d.signal(signal.SIGHUP)
        d.wait_log("agentd started", "start after an early SIGHUP")
        assert not d.proc_exited(), d.log()[-3000:]
        assert d.stop() == 0
        d.log_path.unlink()
