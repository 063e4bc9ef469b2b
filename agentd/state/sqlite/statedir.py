"""The state dir and its files, checked before anything opens them; and ``agentd doctor``.

Invariants:

- Nothing here lets SQLite open the state DB read-write, except ``doctor --repair``
  under the state dir's lock: a read-write open recovers the WAL, and closing the last
  connection checkpoints and deletes it, which would make a loss permanent and hide it.
- Nothing is deleted. A file set aside is renamed (or, for evidence, copied) to
  ``<name>.damaged-<UTC stamp>`` or ``<name>.orphaned-<UTC stamp>``.
- A refusal that the files alone would not reproduce (a damaged WAL, which the next
  opener of the DB would fold away) is written to ``MARKER``; it holds until
  ``agentd doctor --repair`` acknowledges it.
- Every refusal is one line that names the file and what to do, raised as a
  ``Refusal`` whose ``exit_code`` comes from ``agentd.exitcodes``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import pwd
import shutil
import sqlite3
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agentd import exitcodes
from agentd.config import Config
from agentd.walcheck import WalReport, inspect_wal

log = logging.getLogger("agentd.state")

STATE_DB = "state.sqlite"
JOBSTORE = "schedule.sqlite"
MARKER = "state-damaged.json"
LOCK = "agentd.lock"
SQLITE_MAGIC = b"SQLite format 3\x00"


class Refusal(Exception):
    """A reason not to start (or not to open the state) that a person must act on."""

    exit_code: int = exitcodes.STATE_DAMAGED


class StateDamaged(Refusal):
    """A state file is damaged or inconsistent; restarting cannot fix it."""

    exit_code = exitcodes.STATE_DAMAGED


class StateUnusable(Refusal):
    """The state dir cannot be used (not a directory, read-only, no permission)."""

    exit_code = exitcodes.STATE_UNUSABLE


Severity = Literal["ok", "warning", "damaged", "unusable"]
Repair = Literal["jobstore", "wal", "marker", "orphans"]


@dataclass(frozen=True)
class Finding:
    """One thing found about one file. ``repair`` names what ``doctor --repair`` would do
    about it, if anything is safe to do."""

    severity: Severity
    path: Path
    message: str
    repair: Repair | None = None

    def line(self) -> str:
        return f"{self.severity:<8} {self.path}: {self.message}"

    def refusal(self) -> Refusal:
        cls = StateUnusable if self.severity == "unusable" else StateDamaged
        return cls(f"{self.path}: {self.message}")


def paths(root: Path) -> tuple[Path, Path, Path]:
    """The state DB, its WAL, the jobstore."""
    return root / STATE_DB, root / f"{STATE_DB}-wal", root / JOBSTORE


class StateLocked(Exception):
    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"state dir is locked by another agentd (pid {holder}): {path}")
        self.path = path
        self.holder = holder


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/agentd.lock``; the kernel drops it on death,
    so a ``kill -9`` never leaves a stale lock behind."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "agentd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateLocked(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def held_by_other(self) -> str | None:
        """The holder's PID text if another process holds the lock, else None."""
        try:
            self.acquire()
        except StateLocked as exc:
            return exc.holder
        self.release()
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def state_paths(config: Config) -> tuple[Path, Path, Path]:
    """The state dir, the state DB and the jobstore of ``config``."""
    root = config.daemon.state_dir
    return root, root / STATE_DB, root / JOBSTORE


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def aside(path: Path, stamp: str, why: str = "damaged") -> Path:
    return path.with_name(f"{path.name}.{why}-{stamp}")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- the state dir


def _whoami() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def dir_problem(root: Path, exc: OSError) -> str:
    """What is wrong with the state dir, and what to do, from the error using it gave."""
    code = exc.errno
    if code == errno.EROFS:
        return (
            f"state dir {root} is on a read-only file system: agentd must write its state "
            "there. Remount it read-write (a file system that turned read-only by itself "
            "found an error: check the disk first), or set daemon.state_dir to a writable "
            "directory"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"state dir {root}: permission denied for {_whoami()}. Give the directory to "
            "the user agentd runs as (chown, chmod u+rwx), or set daemon.state_dir"
        )
    if code in (errno.EEXIST, errno.ENOTDIR):
        what = "it" if code == errno.EEXIST else "a parent of it"
        return (
            f"state_dir {root} is not a directory ({what} is a file). Move the file away, "
            "or set daemon.state_dir to a directory"
        )
    if code == errno.ENOSPC:
        return f"state dir {root}: no space left on the device. Free space, or move state_dir"
    return f"state dir {root} cannot be used: {exc.strerror or exc}"


def prepare_state_dir(root: Path) -> None:
    """Create the state dir if it is missing and prove that a file can be made in it.
    Raises ``StateUnusable``."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not root.is_dir():  # a symlink to a file, or a file made meanwhile
            raise FileExistsError(errno.EEXIST, "not a directory", str(root))
        mode = root.stat().st_mode & 0o777
        if mode & 0o077:  # made by someone else, or before agentd made it 0700: say so
            log.warning(
                "state dir %s is mode %04o: other users may read the run history and "
                "outputs; agentd leaves it as it is (chmod 700 %s to close it)",
                root,
                mode,
                root,
            )
        probe = root / f".agentd-probe-{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        probe.unlink()
    except OSError as exc:
        raise StateUnusable(dir_problem(root, exc)) from None


def lock_holder(root: Path) -> str | None:
    """The PID text of the process holding ``agentd.lock``, or None when nobody does.
    Writes nothing: the probe locks a read-only descriptor for an instant."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody has ever held it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- files


def header_problem(path: Path) -> str | None:
    """Why ``path`` (which exists and is not empty) is not an SQLite database, or None."""
    with path.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return "it is not an SQLite database (its first bytes are not SQLite's header)"
    (raw,) = struct.unpack(">H", head[16:18])
    page_size = 65536 if raw == 1 else raw
    if page_size < 512 or page_size & (page_size - 1):
        return f"its header is damaged (page size {raw})"
    return None


def page_size(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            head = f.read(18)
    except OSError:
        return None
    if len(head) < 18 or not head.startswith(SQLITE_MAGIC):
        return None
    (raw,) = struct.unpack(">H", head[16:18])
    return 65536 if raw == 1 else raw


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection: it reads the WAL (recovering it in the shared-memory
    index only) and never checkpoints or deletes it on close."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def count_jobs(jobs: Path) -> int:
    """Jobs stored in APScheduler's table; 0 when there is no jobstore. Raises
    sqlite3.Error for a file SQLite cannot read."""
    if not _size(jobs):
        return 0
    with read_only(jobs) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM apscheduler_jobs").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise


def recover_hint(db: Path) -> str:
    return (
        f"Restore {db.name} from a backup, or salvage what is readable: "
        f"`sqlite3 {db} .recover | sqlite3 {db}.recovered` (needs the sqlite3 CLI), then "
        "put the result in its place; `agentd doctor` checks every page"
    )


def jobstore_message(why: str) -> str:
    return (
        f"the jobstore is damaged: {why}. It holds only each job's next fire time: agentd "
        "re-creates the jobs from the config, and only the catch-up of fires missed while "
        "it was stopped is lost. Run `agentd doctor --repair` to move it aside, then start "
        "again"
    )


def check_marker(root: Path) -> Finding | None:
    """A refusal recorded earlier, still standing."""
    marker = root / MARKER
    try:
        data = json.loads(marker.read_text())
        message = str(data["message"])
        at = str(data.get("at", "?"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        message, at = "a refusal to start was recorded (the record is unreadable)", "?"
    return Finding(
        "damaged",
        marker,
        f"{message} [recorded {at}; `agentd doctor --repair` acknowledges it]",
        "marker",
    )


def check_empty_state(root: Path) -> Finding | None:
    """A missing or empty state DB where there was one: beside a jobstore that holds
    jobs, or with a WAL that SQLite would delete (it drops the WAL of an empty DB)."""
    db, wal, jobs = paths(root)
    if _size(db):
        return None
    try:
        n_jobs = count_jobs(jobs)
    except sqlite3.Error:
        n_jobs = 0  # a damaged jobstore is its own finding
    wal_bytes = _size(wal) or 0
    if not n_jobs and not wal_bytes:
        return None  # a fresh install
    state = "is missing" if _size(db) is None else "is empty"
    beside = []
    if n_jobs:
        beside.append(f"the jobstore {jobs} holds {n_jobs} job(s)")
    if wal_bytes:
        beside.append(f"its WAL {wal.name} holds {wal_bytes} bytes")
    return Finding(
        "damaged",
        db,
        f"it {state}, but {' and '.join(beside)}: the state DB, with every run's history, "
        f"is gone. Restore {db.name} from a backup, or start with "
        "`agentd run --accept-empty-state` to begin afresh deliberately",
        "orphans",
    )


def check_db_header(root: Path) -> Finding | None:
    db = paths(root)[0]
    if not _size(db):
        return None
    try:
        problem = header_problem(db)
    except OSError as exc:
        return Finding("unusable", db, f"it cannot be read: {exc.strerror or exc}")
    if problem is None:
        return None
    return Finding(
        "damaged",
        db,
        f"{problem}. Restore it from a backup, or move it aside and start with "
        "`agentd run --accept-empty-state` to begin afresh",
    )


def check_wal(root: Path) -> tuple[Finding | None, WalReport | None]:
    """The state DB's WAL as SQLite's recovery would see it (reads the file only)."""
    db, wal, _ = paths(root)
    try:
        report = inspect_wal(wal, page_size(db))
    except OSError as exc:
        return Finding("unusable", wal, f"it cannot be read: {exc.strerror or exc}"), None
    if report is None or (report.header_ok and report.break_frame is None):
        return None, report
    if report.damaged:
        return (
            Finding(
                "damaged",
                wal,
                f"{report.describe()}. Restore {db.name} and its WAL from a backup, or run "
                f"`agentd doctor --repair` to keep the {report.kept_commits} transaction(s) "
                "before the break and accept the loss",
                "wal",
            ),
            report,
        )
    return Finding("warning", wal, report.describe()), report


def check_jobstore_header(root: Path) -> Finding | None:
    jobs = paths(root)[2]
    if not _size(jobs):
        return None
    try:
        problem = header_problem(jobs)
    except OSError as exc:
        return Finding("unusable", jobs, f"it cannot be read: {exc.strerror or exc}")
    if problem is None:
        return None
    return Finding("damaged", jobs, jobstore_message(problem), "jobstore")


# ---------------------------------------------------------------- at start


def startup_guard(
    root: Path, *, accept_empty_state: bool = False, state_here: bool = True
) -> list[Finding]:
    """Everything that must be known before SQLite opens the state: raises a ``Refusal``
    for the first reason not to go on, else returns the findings to log (warnings, and
    an intact WAL's "ok"). ``state_here`` False: agentd's state is elsewhere (the
    PostgreSQL engine), and only the jobstore in the state dir is checked.

    Its only writes: a refused WAL's evidence copy and ``MARKER``; with
    ``accept_empty_state``, an orphaned WAL renamed aside (SQLite would delete it)."""
    warnings: list[Finding] = []
    marker = check_marker(root)
    if marker is not None:
        raise marker.refusal()
    if not state_here:
        found = check_jobstore_header(root)
        if found is not None:
            raise found.refusal()
        return warnings
    empty = check_empty_state(root)
    if empty is not None:
        if not accept_empty_state:
            raise empty.refusal()
        db, wal, jobs = paths(root)
        note = (
            f"began with empty state (--accept-empty-state) beside {count_jobs(jobs)} "
            f"stored job(s) in {jobs}"
        )
        if _size(wal):
            moved = aside(wal, utc_stamp(), "orphaned")
            wal.rename(moved)
            note += f"; its orphaned WAL is kept as {moved.name}"
        warnings.append(Finding("warning", db, note))
    for check in (check_db_header, check_jobstore_header):
        found = check(root)
        if found is not None:
            raise found.refusal()
    found, report = check_wal(root)
    if found is not None and found.severity != "warning":
        if report is not None and found.severity == "damaged":
            raise refuse_wal(root, report, found)
        raise found.refusal()
    if found is not None:
        warnings.append(found)
    elif report is not None and report.frames:  # left by an unclean stop: say it was read
        warnings.append(Finding("ok", report.path, f"left by an unclean stop: {report.describe()}"))
    return warnings


def refuse_wal(root: Path, report: WalReport, found: Finding) -> Refusal:
    """Keep a copy of a damaged WAL and record the refusal, so that it stands even
    after another opener of the DB (a CLI command, the sqlite3 shell) folds the WAL
    away."""
    stamp = utc_stamp()
    copy = aside(report.path, stamp)
    try:
        shutil.copyfile(report.path, copy)
        kept = f" A copy of the WAL is kept as {copy.name}."
    except OSError as exc:
        kept = f" (Could not keep a copy of the WAL: {exc.strerror or exc}.)"
    message = f"{found.path}: {found.message}.{kept}"
    record = {"file": str(report.path), "at": stamp, "copy": str(copy), "message": message}
    with contextlib.suppress(OSError):
        tmp = root / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, root / MARKER)
    return StateDamaged(message)


def guard_open(root: Path) -> None:
    """For a command about to open the state DB itself (no daemon holds the lock): the
    same refusals the daemon would give, so that it neither folds away a damaged WAL
    nor creates an empty state DB beside a jobstore that holds jobs."""
    startup_guard(root)


_DAMAGED_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_UNUSABLE_CODES = (
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_PERM",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_AUTH",
)


def classify(exc: BaseException, root: Path) -> Refusal | None:
    """The refusal for an error met while opening the state DB or the jobstore (the
    jobstore's come wrapped by SQLAlchemy, with the sqlite3 error as ``orig``), or None
    when it is not about the files."""
    db, _, jobs = paths(root)
    code = getattr(exc, "code", None)
    if code == "schema_too_new":  # a StateRefused of the SQLite engine
        return StateDamaged(str(exc))
    if isinstance(exc.__cause__, sqlite3.Error):  # the engine's port error, of SQLite's
        exc = exc.__cause__
    orig = getattr(exc, "orig", None)
    path, error = (jobs, orig) if isinstance(orig, sqlite3.Error) else (db, exc)
    if not isinstance(error, sqlite3.Error):
        return None
    name = getattr(error, "sqlite_errorname", "") or ""
    text = str(error)
    if name.startswith(_DAMAGED_CODES):
        if path == jobs:
            return StateDamaged(f"{jobs}: {jobstore_message(text)}")
        return StateDamaged(f"{db}: it is damaged ({text}). {recover_hint(db)}")
    if name.startswith(_UNUSABLE_CODES):
        return StateUnusable(
            f"{path}: it cannot be opened or written ({text}). Check that {root} is on a "
            "writable, healthy file system with space left, owned by the user agentd runs as"
        )
    return None


# ---------------------------------------------------------------- agentd doctor


def diagnose(root: Path) -> tuple[list[Finding], str | None]:
    """Every finding about the state dir and its files, and the PID holding the lock.
    Read-only: with a daemon running, its live WAL is not inspected."""
    findings: list[Finding] = []
    if not root.exists():
        return [Finding("ok", root, "does not exist yet; agentd creates it at start")], None
    if not root.is_dir():
        exc = OSError(errno.EEXIST, "not a directory")
        return [Finding("unusable", root, dir_problem(root, exc))], None
    holder = lock_holder(root)
    if holder is not None:
        writable = os.access(root, os.W_OK | os.X_OK)
        if writable:
            findings.append(Finding("ok", root, f"writable; agentd (pid {holder}) holds its lock"))
        else:
            exc = OSError(errno.EACCES, "not writable")
            findings.append(Finding("unusable", root, dir_problem(root, exc)))
    else:
        try:
            prepare_state_dir(root)
            findings.append(Finding("ok", root, "writable; no agentd holds its lock"))
        except StateUnusable as exc:
            findings.append(Finding("unusable", root, str(exc)))
    for check in (check_marker, check_empty_state, check_db_header):
        found = check(root)
        if found is not None:
            findings.append(found)
    db, wal, jobs = paths(root)
    if holder is not None:
        if _size(wal):
            findings.append(Finding("ok", wal, f"in use by the running agentd (pid {holder})"))
    else:
        found, report = check_wal(root)
        if found is not None:
            findings.append(found)
        elif report is not None:
            findings.append(Finding("ok", wal, report.describe()))
    if _size(db) and not any(f.path == db for f in findings):
        findings.append(_check_db(db))
    findings.extend(_check_jobstore(jobs))
    return findings, holder


def _integrity(conn: sqlite3.Connection) -> list[str]:
    rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)").fetchall()]
    return [] if rows == ["ok"] else rows


def _check_db(db: Path) -> Finding:
    stage = "open"
    try:
        with read_only(db) as conn:
            stage = "integrity_check"
            problems = _integrity(conn)
            stage = "schema version"
            if problems:
                return Finding(
                    "damaged",
                    db,
                    f"integrity_check: {problems[0]} ({len(problems)} problem(s) shown). "
                    f"It is not repaired automatically. {recover_hint(db)}",
                )
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
            except sqlite3.OperationalError:
                version = 0
    except sqlite3.Error as exc:
        refusal = classify(exc, db.parent)
        severity: Severity = "unusable" if isinstance(refusal, StateUnusable) else "damaged"
        return Finding(severity, db, f"{stage}: {exc}. {recover_hint(db)}")
    from agentd.state.sqlite.migrations import (
        SCHEMA_VERSION,  # here: the CLI's API path never loads the store
    )

    if version > SCHEMA_VERSION:
        return Finding(
            "damaged",
            db,
            f"schema version {version} is newer than this agentd's ({SCHEMA_VERSION}): "
            "upgrade agentd or use another state_dir",
        )
    note = "" if version == SCHEMA_VERSION else f" (migrated to {SCHEMA_VERSION} at next start)"
    return Finding("ok", db, f"integrity_check ok, schema version {version}{note}")


def _check_jobstore(jobs: Path) -> list[Finding]:
    if not _size(jobs):
        return [Finding("ok", jobs, "not there yet; agentd creates it from the config")]
    found = check_jobstore_header(jobs.parent)
    if found is not None:
        return [found]
    try:
        with read_only(jobs) as conn:
            problems = _integrity(conn)
        count = count_jobs(jobs)
    except sqlite3.Error as exc:
        return [Finding("damaged", jobs, jobstore_message(str(exc)), "jobstore")]
    if problems:
        why = f"integrity_check: {problems[0]}"
        return [Finding("damaged", jobs, jobstore_message(why), "jobstore")]
    findings = [Finding("ok", jobs, f"integrity_check ok, {count} job(s)")]
    report = inspect_wal(jobs.with_name(f"{jobs.name}-wal"), page_size(jobs))
    if report is not None and report.damaged:
        findings.append(
            Finding(
                "warning",
                report.path,
                f"{report.describe()}; harmless: the jobs' fire times are re-derived from "
                "the state DB and the config",
            )
        )
    return findings


def repair(root: Path, findings: list[Finding], say: Callable[[str], None]) -> None:
    """Do what is safe about ``findings``, under the state dir's lock, saying each step.
    Moves files aside, never deletes; a damaged state DB is left for a person."""
    stamp = utc_stamp()
    db, wal, jobs = paths(root)

    def move(path: Path, why: str) -> None:
        for part in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
            if part.exists():
                target = aside(part, stamp, why)
                part.rename(target)
                say(f"moved {part} to {target.name}")

    actions = {f.repair for f in findings if f.repair}
    if "jobstore" in actions:
        move(jobs, "damaged")
        say("the jobs are re-created from the config at next start")
    if "orphans" in actions and not _size(db):
        if jobs.exists():
            move(jobs, "orphaned")
        if wal.exists():
            target = aside(wal, stamp, "orphaned")
            wal.rename(target)
            say(f"moved {wal} to {target.name}")
        say("the next start begins with empty state")
    if "wal" in actions:
        report = inspect_wal(wal, page_size(db))
        if report is not None:
            copy = aside(wal, stamp)
            shutil.copyfile(wal, copy)
            say(f"copied {wal} to {copy.name}")
            # SQLite's own recovery keeps what precedes the break; TRUNCATE folds it in.
            conn = sqlite3.connect(db, isolation_level=None, timeout=10)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.close()
            say(
                f"folded the {report.kept_commits} intact transaction(s) of {wal.name} into "
                f"{db.name}; the {report.lost_commits} after the break are only in the copy"
            )
    if "wal" in actions or "marker" in actions:
        marker = root / MARKER
        if marker.exists():
            target = aside(marker, stamp, "acknowledged")
            marker.rename(target)
            say(f"acknowledged the recorded refusal: {marker.name} is now {target.name}")


def _code(findings: list[Finding]) -> int:
    severities = {f.severity for f in findings}
    if "damaged" in severities:
        return exitcodes.STATE_DAMAGED
    if "unusable" in severities:
        return exitcodes.STATE_UNUSABLE
    return exitcodes.OK


def doctor(root: Path, args: argparse.Namespace) -> int:
    """``agentd doctor [--repair]``: one line per finding; exit 0 (ok), 65 (damaged),
    73 (state dir unusable); with ``--repair``, 75 while a daemon holds the lock."""
    # First, as the caller: once ``_become_owner`` has switched users, this checkout's
    # files may be unreadable, and ``_check_db`` needs the store's schema version.
    import agentd.state.sqlite  # noqa: F401

    _become_owner(root)
    findings, holder = diagnose(root)
    if args.repair:
        if holder is not None:
            _report(findings, args)
            print(
                f"agentd doctor: not repairing: agentd (pid {holder}) holds the state dir's "
                "lock; stop it first"
            )
            return exitcodes.LOCKED
        lock = StateLock(root)
        try:
            lock.acquire()
        except StateLocked as exc:
            print(f"agentd doctor: not repairing: {exc}")
            return exitcodes.LOCKED
        except OSError as exc:
            _report(findings, args)
            print(f"agentd doctor: not repairing: {dir_problem(root, exc)}")
            return exitcodes.STATE_UNUSABLE
        try:
            repair(root, findings, lambda line: print(f"repaired {line}"))
        except (OSError, sqlite3.Error) as exc:
            print(f"agentd doctor: repair stopped: {exc}")
        finally:
            lock.release()
        findings, _ = diagnose(root)
    _report(findings, args)
    return _code(findings)


def _become_owner(root: Path) -> None:
    """Run as root on a state dir that another user owns (systemd's DynamicUser), act as
    that user: a file SQLite creates for a check (``-shm``, ``-wal``) or a repair would
    otherwise belong to root, and the daemon could not open it."""
    if os.geteuid() != 0:
        return
    try:
        st = root.stat()
    except OSError:
        return
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def _report(findings: list[Finding], args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        rows: list[dict[str, Any]] = [{**asdict(f), "path": str(f.path)} for f in findings]
        print(json.dumps({"findings": rows, "exit": _code(findings)}, indent=2))
        return
    for finding in findings:
        print(finding.line())
