"""Damaged, missing or unusable state against a real daemon process: one clear line and a
documented exit code (agentd/exitcodes.py), never a traceback, never a silent loss.

Each test damages real files the way the world does (a deleted DB, flipped bytes in a
WAL frame, garbage over a page, a read-only or full file system, a taken port) and runs
``agentd run`` as a subprocess. Read-only file systems are real mounts (a tmpfs, or an
ext4 loop device that turns itself read-only on an error, as ``errors=remount-ro``
does); where mounting is not permitted the test is skipped and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from harness import Agentd, agentd_cli, wait_for

from agentd import exitcodes

pytestmark = pytest.mark.e2e

TICK = """
t:
  schedule: {every: 1h}
  command: {argv: ["true"]}
"""

# A real SqliteStore writes runs, one transaction each, and the process ends without closing
# its connection (as after kill -9): the WAL keeps every frame. With a second count, a
# checkpoint by another connection lets the SqliteStore start the WAL again from the top, so
# the file ends with frames of the earlier generation (other salts) behind the new ones.
WRITER = textwrap.dedent(
    """
    import os, sqlite3, sys
    from agentd.clock import SystemClock
    from agentd.config import load_config, task_index
    from agentd.state.sqlite.engine import SqliteStore

    cfg = load_config(sys.argv[1])
    first, then = int(sys.argv[2]), int(sys.argv[3])
    db = cfg.daemon.state_dir / "state.sqlite"
    cfg.daemon.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(db)
    now = SystemClock().now()
    store.sync_tasks(task_index(cfg), now)
    for i in range(first + then):
        if then and i == first:
            other = sqlite3.connect(db)
            other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            other.close()
        store.fire("t", now, trigger="manual", key=f"w{i}", overlap="allow")
    os._exit(0)
    """
)


def write_runs(d: Agentd, first: int, then: int = 0) -> None:
    subprocess.run(
        [sys.executable, "-c", WRITER, str(d.config), str(first), str(then)],
        check=True,
        timeout=60,
    )


def launch(d: Agentd, *args: str, prefix: Sequence[str] = ()) -> None:
    log = d.log_path.open("ab")
    d.proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "agentd.cli", "run", "--config", str(d.config), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=d.root,
    )
    log.close()


def start(d: Agentd, *args: str) -> str:
    """Start and wait until ready (the harness's ``start`` would take an earlier start's
    line in the same log for this one's); returns this start's log."""
    mark = len(d.log())
    launch(d, *args)
    wait_for(
        lambda: "agentd started" in d.log()[mark:] or d.proc_exited(), what="the daemon to start"
    )
    assert not d.proc_exited(), d.log()[mark:]
    return d.log()[mark:]


def outcome(d: Agentd, *args: str, prefix: Sequence[str] = ()) -> tuple[int, str]:
    """``agentd run`` until it exits; one that starts instead is stopped with SIGTERM (so
    a test that expects a refusal fails on the exit code, not on a timeout)."""
    mark = len(d.log())
    launch(d, *args, prefix=prefix)
    wait_for(
        lambda: d.proc_exited() or "agentd started" in d.log()[mark:],
        what="the daemon to refuse or start",
    )
    if not d.proc_exited():
        d.stop()
    assert d.proc is not None
    return d.proc.returncode, d.log()[mark:]


def refusal(code: int, out: str, expected: int, *needles: str) -> str:
    """The one line of a refusal, checked: the exit code, no traceback, and each needle."""
    assert code == expected, f"exit {code}, expected {expected}:\n{out}"
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "refusing to start" in line]
    assert len(lines) == 1, out
    assert not [ln for ln in out.splitlines() if " ERROR " in ln and ln not in lines], out
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def started_once(d: Agentd) -> None:
    """A fresh install: starts normally, one run, a clean stop."""
    d.start()
    assert "WARNING agentd state:" not in d.log()
    d.wait_status(d.trigger("t"), "succeeded")
    assert d.stop() == 0


def run_count(state_dir: Path) -> int:
    conn = sqlite3.connect(f"file:{state_dir / 'state.sqlite'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])
    finally:
        conn.close()


def wal_frames(wal: Path) -> tuple[int, list[tuple[int, bool, bool]]]:
    """The page size, and each frame's (offset, is a commit, has the header's salts)."""
    data = wal.read_bytes()
    page_size, salts = struct.unpack(">I", data[8:12])[0], data[16:24]
    size = page_size + 24
    frames = []
    for off in range(32, len(data) - size + 1, size):
        commit = struct.unpack(">I", data[off + 4 : off + 8])[0] != 0
        frames.append((off, commit, data[off + 8 : off + 16] == salts))
    return page_size, frames


def flip(path: Path, offset: int, length: int = 16) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        chunk = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


# ---------------------------------------------------------------- 1. missing state


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_missing_state_beside_stored_jobs_refuses_until_accepted(
    make_daemon: Callable[..., Agentd], how: str
) -> None:
    d = make_daemon(TICK)
    started_once(d)
    db = d.state_dir / "state.sqlite"
    if how == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"")
    code, out = outcome(d)
    refusal(
        code,
        out,
        exitcodes.STATE_DAMAGED,
        str(db),
        str(d.state_dir / "schedule.sqlite"),
        "1 job(s)",
        "from a backup",
        "--accept-empty-state",
    )
    assert (db.exists() and db.stat().st_size) == (0 if how == "emptied" else False)
    code, out = outcome(d)  # it stands: nothing was replaced meanwhile
    assert code == exitcodes.STATE_DAMAGED, out

    out = start(d, "--accept-empty-state")
    warned = [ln for ln in out.splitlines() if "WARNING agentd state:" in ln]
    assert len(warned) == 1, out
    assert "began with empty state (--accept-empty-state) beside 1 stored job(s)" in warned[0]
    assert d.stop() == 0
    assert run_count(d.state_dir) == 0
    code, out = outcome(d)  # from now on this is its state: a plain start
    assert code == 0 and "refusing" not in out, out


# ---------------------------------------------------------------- 2. the WAL


def damaged_wal(d: Agentd, runs: int = 30) -> tuple[Path, bytes, str, int]:
    """Runs written by a real SqliteStore that stopped without closing, then bytes flipped in a
    page in the middle of the WAL; and the refusal that follows, checked. Returns the
    WAL, its damaged bytes, the refusal line and the transactions lost at the break."""
    write_runs(d, runs)
    wal = d.state_dir / "state.sqlite-wal"
    page_size, frames = wal_frames(wal)
    assert all(current for _, _, current in frames)
    commits = [i for i, (_, commit, _) in enumerate(frames) if commit]
    victim = commits[len(commits) // 2] - 1
    lost = sum(1 for c in commits if c >= victim)
    assert lost >= 10
    flip(wal, frames[victim][0] + 24 + page_size // 2)
    damaged = wal.read_bytes()
    code, out = outcome(d)
    line = refusal(
        code,
        out,
        exitcodes.STATE_DAMAGED,
        str(wal),
        f"frame {victim + 1} of {len(frames)} fails its checksum",
        f"{lost} committed transaction(s)",
        "agentd doctor --repair",
        "from a backup",
    )
    assert wal.read_bytes() == damaged  # nothing opened it
    copies = list(d.state_dir.glob("state.sqlite-wal.damaged-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == damaged
    assert (d.state_dir / "state-damaged.json").exists()
    return wal, damaged, line, lost


def test_wal_that_fails_its_checksum_mid_file_refuses_until_doctor_repairs(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    wal, damaged, _, lost = damaged_wal(d)
    code, out = outcome(d)  # again: the refusal stands
    refusal(code, out, exitcodes.STATE_DAMAGED, str(wal), "fails its checksum")

    # A command on the DB itself refuses too, rather than fold the WAL away.
    cli = d.cli("tasks", check=False)
    assert cli.returncode == exitcodes.STATE_DAMAGED, cli.stderr
    assert "Traceback" not in cli.stderr and str(wal) in cli.stderr
    assert wal.read_bytes() == damaged

    doctor = d.cli("doctor", check=False)
    assert doctor.returncode == exitcodes.STATE_DAMAGED, doctor.stdout
    assert any(ln.startswith("damaged") and str(wal) in ln for ln in doctor.stdout.splitlines())
    repaired = d.cli("doctor", "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"{lost} after the break are only in the copy" in repaired.stdout
    assert "repaired acknowledged" in repaired.stdout
    code, out = outcome(d)
    assert code == 0 and "refusing" not in out, out
    assert run_count(d.state_dir) == 30 - lost


def test_wal_refusal_stands_after_something_else_folded_the_wal(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    wal, _, _, _ = damaged_wal(d)
    # The sqlite3 shell, say: SQLite recovers what precedes the break, and closing its
    # last connection checkpoints and deletes the WAL. Only the record remembers.
    conn = sqlite3.connect(d.state_dir / "state.sqlite")
    conn.execute("SELECT count(*) FROM runs").fetchone()
    conn.close()
    assert not wal.exists()
    code, out = outcome(d)
    refusal(code, out, exitcodes.STATE_DAMAGED, str(wal), "fails its checksum", "recorded")
    repaired = d.cli("doctor", "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired acknowledged" in repaired.stdout
    code, out = outcome(d)
    assert code == 0 and "refusing" not in out, out


def test_wal_with_a_torn_tail_starts_and_keeps_every_committed_run(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    write_runs(d, 20)
    wal = d.state_dir / "state.sqlite-wal"
    page_size, _ = wal_frames(wal)
    header = wal.read_bytes()[:32]
    # An unfinished transaction after a power cut: a whole frame with the header's salts
    # and a checksum that does not follow, then half of the next one.
    frame = struct.pack(">II", 2, 0) + header[16:24] + b"\x00" * 8 + os.urandom(page_size)
    with wal.open("ab") as f:
        f.write(frame + frame[: page_size // 2])
    code, out = outcome(d)
    assert code == 0, out
    assert "Traceback" not in out and "refusing" not in out
    assert "torn tail" in out
    assert run_count(d.state_dir) == 20


def test_wal_behind_an_earlier_generation_starts_and_keeps_every_run(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    write_runs(d, 40, 5)
    _, frames = wal_frames(d.state_dir / "state.sqlite-wal")
    assert any(not current for _, _, current in frames)  # stale frames, other salts
    code, out = outcome(d)
    assert code == 0, out
    assert "refusing" not in out and "Traceback" not in out and "WARNING agentd state" not in out
    assert run_count(d.state_dir) == 45


# ---------------------------------------------------------------- 3. damaged files


def test_garbage_over_the_state_db_schema_page_refuses(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    started_once(d)
    db = d.state_dir / "state.sqlite"
    with db.open("r+b") as f:
        f.seek(100)  # the header stays; the schema's b-tree page after it is garbage
        f.write(os.urandom(4000))
    code, out = outcome(d)
    refusal(code, out, exitcodes.STATE_DAMAGED, str(db), "damaged", ".recover", "backup")


def test_state_db_that_is_not_a_database_refuses(make_daemon: Callable[..., Agentd]) -> None:
    d = make_daemon(TICK)
    started_once(d)
    db = d.state_dir / "state.sqlite"
    db.write_text("this is not a database\n" * 300)
    code, out = outcome(d)
    refusal(code, out, exitcodes.STATE_DAMAGED, str(db), "not an SQLite database", "backup")


def test_garbage_jobstore_refuses_and_doctor_repair_moves_it_aside(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    started_once(d)
    jobs = d.state_dir / "schedule.sqlite"
    jobs.write_bytes(os.urandom(20000))
    code, out = outcome(d)
    refusal(
        code,
        out,
        exitcodes.STATE_DAMAGED,
        str(jobs),
        "re-creates the jobs from the config",
        "catch-up",
        "agentd doctor --repair",
    )
    doctor = d.cli("doctor", check=False)
    assert doctor.returncode == exitcodes.STATE_DAMAGED
    assert any(ln.startswith("damaged") and str(jobs) in ln for ln in doctor.stdout.splitlines())
    repaired = d.cli("doctor", "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout
    assert list(d.state_dir.glob("schedule.sqlite.damaged-*")), repaired.stdout
    code, out = outcome(d)
    assert code == 0 and "jobs_added=1" in out, out
    assert run_count(d.state_dir) == 1  # the history was never at risk


def test_state_dir_that_is_a_regular_file_refuses(make_daemon: Callable[..., Agentd]) -> None:
    d = make_daemon(TICK)
    d.state_dir.write_text("not a directory\n")
    code, out = outcome(d)
    refusal(code, out, exitcodes.STATE_UNUSABLE, str(d.state_dir), "not a directory")


def test_state_dir_without_permission_refuses(make_daemon: Callable[..., Agentd]) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop CAP_DAC_OVERRIDE")
    # Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys the mode bits of what it owns.
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    d = make_daemon(TICK)
    d.state_dir.mkdir(mode=0o000)
    probe = subprocess.run([*prefix, "ls", str(d.state_dir)], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE did not take effect here")
    code, out = outcome(d, prefix=prefix)
    d.state_dir.chmod(0o755)
    refusal(code, out, exitcodes.STATE_UNUSABLE, str(d.state_dir), "permission denied", "chown")


def test_http_port_in_use_refuses_with_69(make_daemon: Callable[..., Agentd]) -> None:
    d = make_daemon(TICK)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", d.port))
        taken.listen()
        code, out = outcome(d)
    refusal(code, out, exitcodes.UNAVAILABLE, f"cannot listen on 127.0.0.1:{d.port}", "daemon.http")


# ---------------------------------------------------------------- read-only file systems


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs_state(make_daemon: Callable[..., Agentd]) -> Iterator[Agentd]:
    """A daemon whose state dir is a 4 MiB tmpfs of its own."""
    d = make_daemon(TICK)
    d.state_dir.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d.state_dir))
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield d
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(d.state_dir)], timeout=30)


def test_read_only_state_dir_at_start_refuses(tmpfs_state: Agentd) -> None:
    d = tmpfs_state
    started_once(d)
    done = _mount("-o", "remount,ro", str(d.state_dir))
    assert done.returncode == 0, done.stderr
    code, out = outcome(d)
    refusal(code, out, exitcodes.STATE_UNUSABLE, str(d.state_dir), "read-only file system")


@pytest.fixture
def ext4_state(make_daemon: Callable[..., Agentd], tmp_path: Path) -> Iterator[tuple[Agentd, Path]]:
    """A daemon whose state dir is an ext4 loop device mounted ``errors=remount-ro``; the
    second item is the file that, written to, makes the kernel turn it read-only under
    the running daemon (``/sys/fs/ext4/<dev>/trigger_fs_error``), as a disk error would.
    (A tmpfs cannot be remounted read-only under it: the kernel refuses, EBUSY, while any
    file on it is open for writing, and the daemon holds its DB, WAL and lock open.)"""
    d = make_daemon(
        """
        sleeper:
          schedule: {manual: true}
          command: {argv: ["sleep", "30"]}
        t:
          schedule: {manual: true}
          command: {argv: ["true"]}
        """,
        "shutdown_grace: 1s",
    )
    image = tmp_path / "state.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot make an ext4 file system here: {made.stderr.strip()}")
    d.state_dir.mkdir()
    done = _mount("-o", "loop,errors=remount-ro", str(image), str(d.state_dir))
    if done.returncode:
        pytest.skip(f"cannot mount an ext4 loop device here: {done.stderr.strip()}")
    try:
        device = next(
            line.split()[0]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(d.state_dir)
        )
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"{trigger} is missing: this kernel cannot fail an ext4 on demand")
        yield d, trigger
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(d.state_dir)], timeout=30)


def _remount_fresh(d: Agentd, tmp_path: Path) -> None:
    """After the error: unmount, repair the file system as an operator would, mount."""
    subprocess.run(["umount", str(d.state_dir)], check=True, timeout=30)
    image = tmp_path / "state.img"
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, timeout=60)
    done = _mount("-o", "loop,errors=remount-ro", str(image), str(d.state_dir))
    assert done.returncode == 0, done.stderr


def test_sigterm_with_state_gone_read_only_exits_74_and_the_run_is_recovered(
    ext4_state: tuple[Agentd, Path], tmp_path: Path
) -> None:
    d, trigger = ext4_state
    d.start()
    run_id = d.trigger("sleeper")
    d.wait_status(run_id, "running")
    trigger.write_text("agentd test: the disk failed")
    wait_for(lambda: read_only(d.state_dir), what="the file system to turn read-only")
    assert d.stop() == exitcodes.STATE_WRITE_FAILED, d.log()
    out = d.log()
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if "could not write the last records" in ln]
    assert len(lines) == 1, out
    assert f"1 run(s) still recorded as running ({run_id})" in lines[0]
    assert "recovered at next start" in lines[0]
    assert "agentd stopped exit=74" in out

    _remount_fresh(d, tmp_path)
    start(d)
    d.wait_log("recovered 1 run(s) left running by a previous process", what="recovery")
    assert run_id in d.log()
    assert d.stop() == 0


def test_sigterm_with_state_gone_read_only_while_idle_exits_0(
    ext4_state: tuple[Agentd, Path],
) -> None:
    d, trigger = ext4_state
    d.start()
    d.wait_status(d.trigger("t"), "succeeded")
    trigger.write_text("agentd test: the disk failed")
    wait_for(lambda: read_only(d.state_dir), what="the file system to turn read-only")
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()
    assert "could not write the last records" not in d.log()


def test_sigterm_with_the_state_dir_full_exits_74_and_the_run_is_recovered(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(
        """
        sleeper:
          schedule: {manual: true}
          command: {argv: ["sleep", "30"]}
        """,
        "shutdown_grace: 1s",
    )
    d.state_dir.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d.state_dir))
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        start(d)
        run_id = d.trigger("sleeper")
        d.wait_status(run_id, "running")
        filler = d.state_dir / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:  # until the file system is full
                f.write(b"\0" * 65536)
                f.flush()
        assert d.stop() == exitcodes.STATE_WRITE_FAILED, d.log()
        out = d.log()
        assert "Traceback" not in out, out
        lines = [ln for ln in out.splitlines() if "could not write the last records" in ln]
        assert len(lines) == 1 and run_id in lines[0], out
        filler.unlink()
        start(d)
        d.wait_log("recovered 1 run(s) left running by a previous process", what="recovery")
        assert d.stop() == 0
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(d.state_dir)], timeout=30)


def read_only(path: Path) -> bool:
    """The mount at ``path`` is read-only (``emergency_ro``: turned so by an error)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return bool({"ro", "emergency_ro"} & set(fields[3].split(",")))
    return False


# ---------------------------------------------------------------- 4. agentd doctor


def test_doctor_on_healthy_state_and_beside_a_running_daemon(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    started_once(d)
    doctor = d.cli("doctor")
    lines = doctor.stdout.splitlines()
    assert all(line.startswith("ok") for line in lines), doctor.stdout
    assert any("integrity_check ok, schema version" in line for line in lines)
    assert any("integrity_check ok, 1 job(s)" in line for line in lines)

    start(d)
    pid = d.proc.pid if d.proc else 0
    doctor = d.cli("doctor", "--json")
    report = json.loads(doctor.stdout)
    assert report["exit"] == 0
    assert any(f"agentd (pid {pid}) holds its lock" in f["message"] for f in report["findings"])
    repaired = d.cli("doctor", "--repair", check=False)
    assert repaired.returncode == exitcodes.LOCKED
    assert f"agentd (pid {pid}) holds the state dir's lock" in repaired.stdout
    # Neither disturbed it: still serving, still holding its lock.
    d.wait_status(d.trigger("t"), "succeeded")
    assert d.stop() == 0


def test_doctor_finds_a_damaged_page_and_does_not_repair_the_state_db(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    started_once(d)
    db = d.state_dir / "state.sqlite"
    conn = sqlite3.connect(db)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='events'").fetchone()[0]
    conn.close()
    with db.open("r+b") as f:  # the events table's page (not the schema's): garbage
        f.seek((root - 1) * 4096)
        f.write(os.urandom(4096))
    before = db.read_bytes()
    doctor = d.cli("doctor", check=False)
    assert doctor.returncode == exitcodes.STATE_DAMAGED
    assert any(
        ln.startswith("damaged") and "integrity_check" in ln and ".recover" in ln
        for ln in doctor.stdout.splitlines()
    ), doctor.stdout
    repaired = d.cli("doctor", "--repair", check=False)
    assert repaired.returncode == exitcodes.STATE_DAMAGED
    assert db.read_bytes() == before


def test_doctor_of_a_missing_state_dir_says_it_is_created_at_start(tmp_path: Path) -> None:
    config = tmp_path / "agentd.yaml"
    config.write_text(f"daemon: {{state_dir: {tmp_path / 'nowhere'}}}\ntasks: {{}}\n")
    doctor = agentd_cli("doctor", config=config)
    assert doctor.returncode == 0 and "creates it at start" in doctor.stdout
    assert not (tmp_path / "nowhere").exists()


def test_doctor_repair_of_missing_state_moves_the_orphaned_jobstore_aside(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    started_once(d)
    (d.state_dir / "state.sqlite").unlink()
    doctor = d.cli("doctor", check=False)
    assert doctor.returncode == exitcodes.STATE_DAMAGED
    repaired = d.cli("doctor", "--repair", check=False)
    assert repaired.returncode == 0, repaired.stdout
    assert list(d.state_dir.glob("schedule.sqlite.orphaned-*"))
    code, out = outcome(d)
    assert code == 0 and "refusing" not in out, out


def test_sigkill_leaves_a_wal_that_the_next_start_checks_and_accepts(
    make_daemon: Callable[..., Agentd],
) -> None:
    d = make_daemon(TICK)
    d.start()
    for _ in range(3):
        d.wait_status(d.trigger("t"), "succeeded")
    d.kill9()
    assert (d.state_dir / "state.sqlite-wal").stat().st_size > 32
    code, out = outcome(d)
    assert code == 0 and "refusing" not in out and "WARNING agentd state" not in out, out
    assert "left by an unclean stop:" in out and ", intact" in out, out
    assert run_count(d.state_dir) == 3


def test_doctor_as_root_acts_as_the_state_dirs_owner(tmp_path: Path) -> None:
    """Under systemd's DynamicUser the state belongs to a dynamic user; a doctor run as
    root must not leave a root-owned file there (its lock, taken to repair) that the
    daemon then cannot open. (SQLite gives the files it makes the DB's owner itself.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    base = Path(tempfile.mkdtemp(prefix="agentd-owner-", dir="/tmp"))
    try:
        base.chmod(0o755)  # the owner must reach it (pytest's own tmp dirs are 0700)
        d = Agentd(base, TICK)
        write_runs(d, 3)
        assert not (d.state_dir / "agentd.lock").exists()
        for path in [d.state_dir, *d.state_dir.iterdir()]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        doctor = agentd_cli("doctor", "--repair", config=d.config)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert (d.state_dir / "agentd.lock").exists()
        owners = {p.name: p.stat().st_uid for p in d.state_dir.iterdir()}
        assert set(owners.values()) == {nobody.pw_uid}, owners
    finally:
        shutil.rmtree(base)
