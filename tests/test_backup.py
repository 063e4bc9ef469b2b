"""``agentd backup`` during a stream of runs and ``agentd restore`` with the daemon
stopped, on a real daemon and real SQLite files; a damaged backup and a running daemon
are refusals that change nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from harness import Agentd, wait_for

pytestmark = pytest.mark.e2e

BUSY = """
tick:
  schedule: {every: 1s}
  overlap: allow
  command: {argv: ["true"]}
job:
  schedule: {manual: true}
  overlap: allow
  command: {argv: ["true"]}
"""


def _open(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)


def _succeeded(path: Path) -> set[str]:
    conn = _open(path)
    try:
        rows = conn.execute("SELECT id FROM runs WHERE status='succeeded'").fetchall()
        return {str(r[0]) for r in rows}
    finally:
        conn.close()


def test_a_backup_taken_during_a_stream_of_runs_opens_and_restores(
    make_daemon: Any, tmp_path: Path
) -> None:
    d: Agentd = make_daemon(BUSY).start()
    for _ in range(10):
        d.trigger("job")  # writes in flight while the copy is taken
    dest = tmp_path / "backup-1"
    out = d.cli("backup", str(dest), "--json", check=False)
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["daemon_running"] is True
    assert set(manifest["files"]) == {"state.sqlite", "schedule.sqlite"}
    assert json.loads((dest / "MANIFEST.json").read_text()) == manifest
    conn = _open(dest / "state.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    conn.close()
    in_backup = _succeeded(dest / "state.sqlite")
    # A restore needs the daemon stopped: refused (75) while it runs, nothing touched.
    refused = d.cli("restore", str(dest), check=False)
    assert refused.returncode == 75 and "stop it before restoring" in refused.stderr
    wait_for(lambda: len(d.runs("tick")) > len(in_backup) + 2, what="more runs after it")
    assert d.stop() == 0
    after = _succeeded(d.state_dir / "state.sqlite")
    assert after > in_backup
    done = d.cli("restore", str(dest), check=False)
    assert done.returncode == 0, done.stderr
    assert "restored" in done.stdout
    kept = sorted(p.name for p in d.state_dir.iterdir() if "before-restore" in p.name)
    assert any(name.startswith("state.sqlite.before-restore-") for name in kept), kept
    assert _succeeded(d.state_dir / "state.sqlite") == in_backup
    d.start()  # the restored state is the daemon's state
    wait_for(lambda: len(d.runs("tick")) > 0, what="runs on the restored state")
    assert in_backup <= {r["id"] for r in d.runs() if r["status"] == "succeeded"}
    assert d.stop() == 0


def test_a_damaged_or_incomplete_backup_is_refused_and_nothing_changes(
    make_daemon: Any, tmp_path: Path
) -> None:
    d: Agentd = make_daemon(BUSY).start()
    dest = tmp_path / "backup"
    assert d.cli("backup", str(dest), check=False).returncode == 0
    assert d.cli("backup", str(dest), check=False).returncode == 1  # not over a backup
    assert d.stop() == 0
    before = (d.state_dir / "state.sqlite").read_bytes()
    data = bytearray((dest / "state.sqlite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / "state.sqlite").write_bytes(bytes(data))
    damaged = d.cli("restore", str(dest), check=False)
    assert damaged.returncode == 65 and "checksum" in damaged.stderr
    (dest / "MANIFEST.json").unlink()
    incomplete = d.cli("restore", str(dest), check=False)
    assert incomplete.returncode == 65 and "no complete backup" in incomplete.stderr
    assert (d.state_dir / "state.sqlite").read_bytes() == before
    assert not [p for p in d.state_dir.iterdir() if "before-restore" in p.name]


def test_on_postgresql_backup_is_the_databases_job(
    make_daemon: Any, tmp_path: Path, pg_url: str
) -> None:
    d: Agentd = make_daemon(BUSY, top=f"state: {{url: '{pg_url}'}}")
    out = d.cli("backup", str(tmp_path / "b"), check=False)
    assert out.returncode == 1 and "pg_dump" in out.stderr
    assert not (tmp_path / "b").exists()
