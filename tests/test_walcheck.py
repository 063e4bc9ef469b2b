"""The WAL inspector against WAL files that real SQLite wrote, and against SQLite's own
recovery: whatever it reports kept is what SQLite reads back."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentd.walcheck import FRAME_HEADER_SIZE, HEADER_SIZE, _frame_sums, checksum, inspect_wal

# Writes ``first`` transactions (one row each) and, with ``then``, has another connection
# checkpoint and writes ``then`` more, so that the WAL starts again from the top with new
# salts; ends without closing (as after kill -9), so the WAL keeps its frames.
WRITER = textwrap.dedent(
    """
    import os, sqlite3, sys
    db, first, then, blob = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("CREATE TABLE t(i INTEGER, pad BLOB)")
    for i in range(first + then):
        if then and i == first:
            o = sqlite3.connect(db)
            o.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            o.close()
        c.execute("INSERT INTO t VALUES (?, randomblob(?))", (i, blob))
    os._exit(0)
    """
)


def write(tmp: Path, first: int, then: int = 0, blob: int = 10) -> Path:
    db = tmp / "db.sqlite"
    subprocess.run([sys.executable, "-c", WRITER, str(db), str(first), str(then), str(blob)])
    return db.with_name("db.sqlite-wal")


def frames(wal: Path) -> list[tuple[int, bool, bool]]:
    """(offset, commit, header's salts) of each frame."""
    data = wal.read_bytes()
    size = struct.unpack(">I", data[8:12])[0] + FRAME_HEADER_SIZE
    return [
        (off, data[off + 4 : off + 8] != b"\0\0\0\0", data[off + 8 : off + 16] == data[16:24])
        for off in range(HEADER_SIZE, len(data) - size + 1, size)
    ]


def rows_sqlite_keeps(wal: Path) -> int:
    """Rows SQLite reads from a copy of the DB and this WAL (the originals untouched)."""
    copy = wal.parent / "copy"
    copy.mkdir(exist_ok=True)
    shutil.copyfile(wal.with_name("db.sqlite"), copy / "db.sqlite")
    shutil.copyfile(wal, copy / "db.sqlite-wal")
    conn = sqlite3.connect(copy / "db.sqlite")
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    except sqlite3.OperationalError:
        return -1  # not even the table survived
    finally:
        conn.close()
        shutil.rmtree(copy)


def flip(path: Path, offset: int, length: int = 16) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        chunk = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
@pytest.mark.parametrize("big_endian", [False, True])
def test_batched_frame_sums_equal_the_plain_loop(page_size: int, big_endian: bool) -> None:
    rng = random.Random(page_size * 2 + big_endian)
    count = 7
    stride = page_size + FRAME_HEADER_SIZE
    chunk = rng.randbytes(count * stride)
    sums = _frame_sums(chunk, count, page_size, big_endian)
    for f in range(count):
        frame = chunk[f * stride : (f + 1) * stride]
        expected = checksum(frame[:8] + frame[FRAME_HEADER_SIZE:], big_endian)
        assert (sums[2 * f], sums[2 * f + 1]) == expected


def test_intact_wal_reports_every_transaction(tmp_path: Path) -> None:
    wal = write(tmp_path, 25)
    report = inspect_wal(wal)
    assert report is not None and not report.damaged
    assert report.break_frame is None and report.header_ok
    assert report.kept_commits == 26  # CREATE TABLE, then 25 inserts
    assert report.kept_frames == report.frames == len(frames(wal))
    assert rows_sqlite_keeps(wal) == 25


def test_frames_of_an_earlier_generation_are_not_damage(tmp_path: Path) -> None:
    wal = write(tmp_path, 60, 5, blob=3000)
    stale = [f for f in frames(wal) if not f[2]]
    assert stale  # the file ends with the first generation's frames, other salts
    report = inspect_wal(wal)
    assert report is not None and not report.damaged and report.break_frame is None
    assert report.kept_commits == 5 and rows_sqlite_keeps(wal) == 65


def test_flipped_bytes_mid_wal_are_damage_and_sqlite_indeed_drops_the_rest(
    tmp_path: Path,
) -> None:
    wal = write(tmp_path, 40, blob=2000)
    listed = frames(wal)
    commits = [i for i, f in enumerate(listed) if f[1]]
    victim = commits[20] - 1
    page_size = struct.unpack(">I", wal.read_bytes()[8:12])[0]
    flip(wal, listed[victim][0] + FRAME_HEADER_SIZE + page_size // 3)
    report = inspect_wal(wal)
    assert report is not None and report.damaged
    assert report.break_frame == victim + 1 and report.break_reason == "fails its checksum"
    lost = sum(1 for c in commits if c >= victim)
    assert report.lost_commits == lost and report.lost_certain == lost - 1
    assert report.kept_commits == len(commits) - lost
    assert rows_sqlite_keeps(wal) == 40 - lost  # exactly what the report said survives
    assert f"frame {victim + 1} of {len(listed)} fails its checksum" in report.describe()


def test_a_flipped_frame_header_is_damage_too(tmp_path: Path) -> None:
    wal = write(tmp_path, 20, blob=2000)
    listed = frames(wal)
    victim = len(listed) // 2
    flip(wal, listed[victim][0] + 16, 8)  # its stored checksum
    report = inspect_wal(wal)
    assert report is not None and report.damaged and report.break_frame == victim + 1


def test_a_damaged_wal_header_is_damage_when_whole_transactions_follow(tmp_path: Path) -> None:
    wal = write(tmp_path, 10)
    flip(wal, 12, 4)  # the checkpoint sequence: the header's checksum fails
    report = inspect_wal(wal)
    assert report is not None and not report.header_ok and report.damaged
    assert report.kept_commits == 0 and report.lost_commits == 11
    assert rows_sqlite_keeps(wal) == -1  # SQLite ignores the whole WAL


def test_torn_tail_is_not_damage(tmp_path: Path) -> None:
    wal = write(tmp_path, 10)
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    # an unfinished transaction: whole frames with current salts and wrong checksums,
    # no commit frame, then half a frame
    torn = struct.pack(">II", 3, 0) + data[16:24] + os.urandom(8 + page_size)
    with wal.open("ab") as f:
        f.write(torn * 2 + torn[:100])
    report = inspect_wal(wal)
    assert report is not None and not report.damaged
    assert report.break_frame == len(frames(wal)) - 1 and report.lost_commits == 0
    assert report.torn_bytes == 100
    assert "torn tail" in report.describe()
    assert rows_sqlite_keeps(wal) == 10


def test_a_torn_last_transaction_with_its_commit_frame_written_is_not_certain_loss(
    tmp_path: Path,
) -> None:
    """After a power cut the disk may have kept the last transaction's commit frame and
    not a page before it: that transaction was never acknowledged, so it is no damage."""
    wal = write(tmp_path, 10, blob=3000)  # each insert: several frames
    listed = frames(wal)
    assert not listed[-2][1]  # the page before the last commit frame
    flip(wal, listed[-2][0] + FRAME_HEADER_SIZE + 10)
    report = inspect_wal(wal)
    assert report is not None
    assert report.lost_commits == 1 and report.lost_certain == 0 and not report.damaged
    assert rows_sqlite_keeps(wal) == 9


def test_big_endian_checksums_are_read_as_sqlite_reads_them(tmp_path: Path) -> None:
    """A WAL as a big-endian host writes it (magic 0x377f0683): rewritten here with every
    checksum recomputed, and SQLite itself accepts it."""
    wal = write(tmp_path, 8)
    data = bytearray(wal.read_bytes())
    page_size = struct.unpack(">I", data[8:12])[0]
    data[0:4] = struct.pack(">I", 0x377F0683)
    s = checksum(bytes(data[:24]), True)
    data[24:32] = struct.pack(">II", *s)
    for off, _, _ in frames(wal):
        frame = bytes(data[off : off + FRAME_HEADER_SIZE + page_size])
        s = checksum(frame[:8] + frame[FRAME_HEADER_SIZE:], True, *s)
        data[off + 16 : off + 24] = struct.pack(">II", *s)
    wal.write_bytes(bytes(data))
    assert rows_sqlite_keeps(wal) == 8
    report = inspect_wal(wal)
    assert report is not None and report.header_ok and report.kept_commits == 9


def test_no_wal_or_an_empty_one_is_nothing_to_report(tmp_path: Path) -> None:
    assert inspect_wal(tmp_path / "missing-wal") is None
    (tmp_path / "empty-wal").write_bytes(b"")
    assert inspect_wal(tmp_path / "empty-wal") is None
