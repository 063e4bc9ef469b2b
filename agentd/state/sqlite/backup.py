"""``agentd backup DEST`` and ``agentd restore SRC``: a consistent copy of the embedded
state, taken while the daemon runs, and putting one back while it does not.

Invariants:

- **A copy is a snapshot, never a file copy.** A WAL database copied byte by byte while
  a writer commits is torn (the main file and the WAL disagree); each database (the
  state DB and the APScheduler jobstore) is copied with SQLite's online backup API in
  one step, inside one read transaction, so the copy is the database as of one commit.
  The daemon goes on writing meanwhile (WAL: readers do not block the writer).
- **A backup proves itself.** ``DEST/MANIFEST.json`` names each file with its size and
  SHA-256, the schema version and agentd's version; every copy passed ``PRAGMA
  integrity_check`` before the manifest was written (the manifest is the last file
  written: a backup without one is incomplete).
- **A restore checks first, then keeps what it replaces.** It refuses while a daemon
  holds the state dir's lock (exit 75), refuses a backup whose checksums or integrity
  check fail or whose schema is newer than this agentd's (exit 65, nothing touched),
  then moves the current files (with their ``-wal``/``-shm``) aside as
  ``<name>.before-restore-<UTC stamp>`` and puts each copy in place through a temporary
  file, fsynced, renamed. The next start migrates an older schema as usual.
- **A restored state DB is a new instance.** It gets a new instance id (the prefix of
  alert delivery ids, ``X-Agentd-Delivery``): its alert ids go on from where the backup
  was taken, and receivers that saw the original's later deliveries must not take the
  restored one's new alerts for repeats. A delivery pending in the backup goes out
  again under the new id (a receiver may see it twice, never miss it).
- **PostgreSQL's state is the database's to back up** (``pg_dump``, base backups and
  WAL archiving); with ``state: {url: ...}`` both commands say so and do nothing. (After
  restoring one there, deleting ``meta``'s ``instance_id`` row makes it a new instance
  the same way: the README says so.)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd import __version__, exitcodes
from agentd.config import Config
from agentd.models import INSTANCE_KEY
from agentd.state.sqlite.migrations import SCHEMA_VERSION
from agentd.state.sqlite.statedir import (
    JOBSTORE,
    STATE_DB,
    StateLock,
    StateLocked,
    aside,
    utc_stamp,
)

MANIFEST = "MANIFEST.json"
FILES = (STATE_DB, JOBSTORE)
"""What a backup holds: the state DB and the jobstore, each when it exists."""


class BackupRefused(Exception):
    """A backup or restore that cannot be done; ``exit_code`` says how the CLI exits."""

    def __init__(self, message: str, exit_code: int = exitcodes.REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _integrity(path: Path) -> str:
    """``PRAGMA integrity_check``'s first line ("ok" when sound), read-only."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"not a database: {exc}"


def _schema_version(path: Path) -> int:
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _snapshot(src: Path, dest: Path, live: bool) -> None:
    """One read transaction's view of ``src`` into ``dest`` (written, then fsynced).
    With a daemon running (``live``) the source is opened read-only, beside its WAL;
    with none, normally, so a WAL left by a crash is read, and folded in at close."""
    uri = f"{src.absolute().as_uri()}?mode=ro" if live else str(src)
    source = sqlite3.connect(uri, uri=live)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)  # pages=-1: the whole database in one step
        finally:
            target.close()
    finally:
        source.close()
    with dest.open("rb+") as f:
        os.fsync(f.fileno())


def backup(config: Config, dest: Path, now: datetime | None = None) -> dict[str, Any]:
    """Write a backup of ``config``'s state into ``dest`` (a new or empty directory);
    returns the manifest. Raises ``BackupRefused``."""
    if config.state.url is not None:
        raise BackupRefused(
            "the state is in PostgreSQL: back it up there (pg_dump, or base backups with "
            "WAL archiving); nothing to copy here"
        )
    root = config.daemon.state_dir
    present = [name for name in FILES if (root / name).exists()]
    if STATE_DB not in present:
        raise BackupRefused(f"there is no state DB at {root / STATE_DB} to back up")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupRefused(f"{dest} exists and is not an empty directory")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    live = StateLock(root).held_by_other() is not None
    files: dict[str, Any] = {}
    for name in present:
        part = dest / f".{name}.partial"
        _snapshot(root / name, part, live)
        verdict = _integrity(part)
        if verdict != "ok":
            raise BackupRefused(f"the copy of {name} fails its integrity check: {verdict}")
        part.rename(dest / name)
        files[name] = {"bytes": (dest / name).stat().st_size, "sha256": _sha256(dest / name)}
    manifest = {
        "agentd_version": __version__,
        "schema_version": _schema_version(dest / STATE_DB),
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "source": str(root),
        "daemon_running": live,
        "files": files,
    }
    tmp = dest / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    tmp.rename(dest / MANIFEST)
    _fsync_dir(dest)
    return manifest


def verify(src: Path) -> dict[str, Any]:
    """The manifest of the backup in ``src``, once every file in it matches and passes
    its integrity check. Raises ``BackupRefused`` (exit 65) saying what does not."""
    damaged = exitcodes.STATE_DAMAGED
    try:
        manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
        files: dict[str, Any] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"{src} holds no complete backup ({MANIFEST}: {exc})"
        raise BackupRefused(why, damaged) from None
    if STATE_DB not in files:
        raise BackupRefused(f"the backup in {src} holds no {STATE_DB}", damaged)
    for name, want in files.items():
        if name not in FILES:
            raise BackupRefused(f"the backup names an unknown file {name!r}", damaged)
        path = src / name
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            raise BackupRefused(f"{path} is missing or not the size the manifest says", damaged)
        if _sha256(path) != want["sha256"]:
            raise BackupRefused(f"{path} does not match its checksum: damaged", damaged)
        verdict = _integrity(path)
        if verdict != "ok":
            raise BackupRefused(f"{path} fails its integrity check: {verdict}", damaged)
    version = int(manifest.get("schema_version") or 0)
    if version > SCHEMA_VERSION:
        raise BackupRefused(
            f"the backup's schema is version {version}, newer than this agentd's "
            f"({SCHEMA_VERSION}): restore it with the agentd that made it",
            damaged,
        )
    return manifest


def restore(config: Config, src: Path, now: datetime | None = None) -> list[str]:
    """Put the backup in ``src`` in place of ``config``'s state; returns one line per
    file. Raises ``BackupRefused``; on a refusal nothing was changed."""
    if config.state.url is not None:
        raise BackupRefused(
            "the state is in PostgreSQL: restore it there (pg_restore, or your base "
            "backups); nothing to restore here"
        )
    manifest = verify(src)
    root = config.daemon.state_dir
    root.mkdir(parents=True, exist_ok=True)
    lock = StateLock(root)
    try:
        lock.acquire()
    except StateLocked as exc:
        raise BackupRefused(f"{exc}: stop it before restoring", exitcodes.LOCKED) from None
    try:
        stamp = utc_stamp(now)
        done: list[str] = []
        for name in FILES:
            target = root / name
            for suffix in ("", "-wal", "-shm"):
                current = target.with_name(name + suffix)
                if current.exists():
                    kept = aside(current, stamp, "before-restore")
                    current.rename(kept)
                    done.append(f"kept {current} as {kept.name}")
            if name not in manifest["files"]:
                continue
            tmp = root / f".{name}.restoring"
            shutil.copyfile(src / name, tmp)
            if name == STATE_DB:
                done.append(f"gave it a new instance id {_new_instance(tmp)}")
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            tmp.rename(target)
            done.append(f"restored {target} from {src / name}")
        _fsync_dir(root)
        return done
    finally:
        lock.release()


def _new_instance(path: Path) -> str:
    """Give the state DB at ``path`` a new instance id (``models.INSTANCE_KEY``); returns
    it. A restored database begins its alert ids again where the backup left off, while
    the receivers have seen the ids the original went on to send: under the old instance
    id its new alerts' delivery ids would repeat those, and be dropped as duplicates."""
    made = secrets.token_hex(16)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (INSTANCE_KEY, made)
            )
    finally:
        conn.close()  # the last connection: its WAL is checkpointed and removed
    return made


def backup_command(config: Config, args: argparse.Namespace) -> int:
    try:
        manifest = backup(config, Path(args.dest))
    except BackupRefused as exc:
        print(f"agentd: backup refused: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, sqlite3.Error) as exc:
        print(f"agentd: backup failed: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            (Path(args.dest) / MANIFEST).unlink()  # never a manifest over a partial copy
        return exitcodes.REFUSED
    if args.json:
        print(json.dumps(manifest, indent=2))
        return exitcodes.OK
    for name, info in manifest["files"].items():
        print(f"{Path(args.dest) / name}: {info['bytes']} bytes, sha256 {info['sha256']}")
    print(f"backup complete: {Path(args.dest) / MANIFEST}")
    return exitcodes.OK


def restore_command(config: Config, args: argparse.Namespace) -> int:
    try:
        lines = restore(config, Path(args.src))
    except BackupRefused as exc:
        print(f"agentd: restore refused: {exc}", file=sys.stderr)
        return exc.exit_code
    for line in lines:
        print(line)
    print("restore complete: start agentd to use it")
    return exitcodes.OK
