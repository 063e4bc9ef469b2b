"""What SQLite's WAL recovery would drop from a WAL file, found before SQLite opens it.

The format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte header
(magic, format version, page size, checkpoint sequence, salt-1, salt-2, checksum), then
frames of a 24-byte header (page number, the database size in pages for a commit frame
else 0, the two salts, a cumulative checksum) and one page. Every checksum continues the
one before it (the header's for the first frame), over the frame header's first 8 bytes
and the page. Recovery keeps frames up to the last commit frame before the first frame
that fails (a salt that is not the header's, a page number 0, a checksum that does not
follow), and drops the rest *silently*, by design: after a power cut the end of the
file may hold half a transaction.

So a break is not damage by itself. A break is damage when it is followed by whole,
committed transactions: frames with the header's salts whose checksums chain from the
frame before them (each frame's stored checksum is the seed of the next, so the frames
after a break are checked against each other), ending in a commit frame. Frames with
other salts are left over from an earlier use of the file (a checkpoint lets SQLite
start the WAL again from the top, with new salts) and mean nothing.

Which lost commits are *certain*: transactions are written one after another, each
synced before the next begins, so a power cut can tear only the last one, in any order
of its pages (the disk may persist its commit frame and not a page before it). Every
transaction lost at the break but followed by any authentic frame of a later one was
therefore complete and acknowledged; the last one, with nothing after it, may be a torn
tail. ``WalReport.lost_certain`` counts the former.

The checksum is a Fibonacci-like recurrence over 32-bit word pairs, linear modulo 2**32:
over one frame, ``s_out = T**m @ s_in + d`` where ``d`` is a fixed weighting of the
frame's words. ``_frame_sums`` gets ``d`` for thousands of frames at once with a few
big-integer operations per word position (each frame's sum in its own 160-bit field),
rather than a Python loop over every word of every frame.
"""

from __future__ import annotations

import mmap
import struct
import sys
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

WAL_MAGIC = 0x377F0682  # | 1: checksum words are big-endian
WAL_VERSION = 3007000
HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
_M32 = 0xFFFFFFFF
_MASK_EVERY = 16
CHUNK_BYTES = 4 << 20
"""Frames checksummed per batch (and held in memory at once)."""


@dataclass(frozen=True)
class WalReport:
    """One WAL file as recovery would see it. Frame numbers count from 1."""

    path: Path
    size: int
    page_size: int
    frames: int
    """Whole frames in the file (any salts)."""
    header_ok: bool
    kept_frames: int
    """Frames recovery keeps: up to the last commit frame before the break."""
    kept_commits: int
    break_frame: int | None
    """The first frame recovery rejects, if any frame with the header's salts follows
    the kept ones; None when the current WAL ends cleanly."""
    break_reason: str | None
    lost_commits: int
    """Committed transactions recovery would drop: commit frames at or after the break
    (the broken frame's own header counted, authentic ones after it)."""
    lost_certain: int
    """Of those, the ones certainly acknowledged to their writer (see the module doc)."""
    torn_bytes: int
    """Bytes after the last whole frame."""

    @property
    def damaged(self) -> bool:
        return self.lost_certain > 0

    def describe(self) -> str:
        """One line: what recovery would keep and drop."""
        if not self.page_size:
            return f"its header is not a WAL header: SQLite ignores its {self.size} bytes"
        if not self.header_ok:
            where = "its header fails its checksum"
        elif self.break_frame is not None:
            where = f"frame {self.break_frame} of {self.frames} {self.break_reason}"
        else:
            return f"{self.kept_commits} transaction(s) in {self.kept_frames} frame(s), intact"
        if self.lost_commits:
            return (
                f"{where}, and {self.lost_commits} committed transaction(s) from there on "
                f"would be dropped (SQLite stops at the first bad frame); the "
                f"{self.kept_commits} before it are intact"
            )
        return (
            f"{where}: a torn tail (an unfinished last transaction, as after a power cut, "
            f"which SQLite drops); the {self.kept_commits} transaction(s) before it are intact"
        )


def _mul(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return (
        (a[0] * b[0] + a[1] * b[2]) & _M32,
        (a[0] * b[1] + a[1] * b[3]) & _M32,
        (a[2] * b[0] + a[3] * b[2]) & _M32,
        (a[2] * b[1] + a[3] * b[3]) & _M32,
    )


@lru_cache(maxsize=4)
def _frame_matrix(page_size: int) -> tuple[int, int, int, int]:
    """``T**m`` for one frame's ``m`` word pairs. One step over words ``(x0, x1)`` is
    ``s1 += x0 + s2; s2 += x1 + s1``, i.e. ``s <- T @ s + (x0, x0 + x1)`` with
    ``T = [[1, 1], [1, 2]]``, so a frame maps ``s_in`` to ``T**m @ s_in + d``."""
    power, step = (1, 0, 0, 1), (1, 1, 1, 2)
    for _ in range((2 + page_size // 4) // 2):
        power = _mul(power, step)
    return power


def checksum(data: bytes, big_endian: bool, s1: int = 0, s2: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), continuing from
    ``(s1, s2)``: the plain loop, for the 24-byte header."""
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & _M32
        s2 = (s2 + words[i + 1] + s1) & _M32
    return s1, s2


def _frame_sums(chunk: bytes, count: int, page_size: int, big_endian: bool) -> list[int]:
    """``d`` of each of ``count`` whole frames in ``chunk`` (``[d1, d2]`` of frame 0, then
    of frame 1 ...): each frame's checksum from a zero seed.

    The recurrence runs once for all frames: word pair ``p`` of every frame goes into
    its own 64-bit field of one integer (``x0`` low, ``x1`` high), and ``S1``, ``S2``
    hold every frame's sums likewise. Masked to 32 bits every ``_MASK_EVERY`` pairs, no
    field reaches 2**64 (each pair multiplies the bound by less than 2.62)."""
    units = array("Q")  # 8 bytes each: a word pair, both words little-endian in memory
    if big_endian == (sys.byteorder == "big") and sys.byteorder == "little":
        units.frombytes(chunk)
    else:
        words = array("I")
        words.frombytes(chunk)
        if big_endian != (sys.byteorder == "big"):
            words.byteswap()  # now each word's value is right
        if sys.byteorder == "big":
            words.byteswap()  # and now its bytes are little-endian in memory
        units.frombytes(words.tobytes())
    stride = (page_size + FRAME_HEADER_SIZE) // 8
    mask = int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * count, "little")
    s1 = s2 = 0
    for pair in range((2 + page_size // 4) // 2):
        # pair 0: the frame header's first 8 bytes; then the page, 24 bytes in
        both = int.from_bytes(units[pair + 2 if pair else 0 :: stride], "little")
        s1 += s2 + (both & mask)
        s2 += s1 + ((both >> 32) & mask)
        if pair % _MASK_EVERY == _MASK_EVERY - 1:
            s1 &= mask
            s2 &= mask
    one = (s1 & mask).to_bytes(8 * count, "little")
    two = (s2 & mask).to_bytes(8 * count, "little")
    sums = []
    for f in range(0, 8 * count, 8):
        sums.append(int.from_bytes(one[f : f + 4], "little"))
        sums.append(int.from_bytes(two[f : f + 4], "little"))
    return sums


def inspect_wal(path: Path, fallback_page_size: int | None = None) -> WalReport | None:
    """The WAL at ``path`` as recovery would see it; None when there is none (or it
    holds less than a header). Reads the file only. ``fallback_page_size`` (the
    database's) lets frames be checked when the header itself is damaged."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            if size < HEADER_SIZE:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _inspect(path, mm, size, fallback_page_size)
    except FileNotFoundError:
        return None


def _inspect(path: Path, mm: mmap.mmap, size: int, fallback: int | None) -> WalReport:
    magic, version, page_size, _seq, salt1, salt2, ck1, ck2 = struct.unpack_from(">8I", mm, 0)
    big_endian = bool(magic & 1)
    sane = (magic & ~1) == WAL_MAGIC and version == WAL_VERSION and _valid_page_size(page_size)
    header_ok = sane and checksum(mm[:24], big_endian) == (ck1, ck2)
    if not sane:
        if fallback is None or not _valid_page_size(fallback):
            return WalReport(path, size, 0, 0, False, 0, 0, None, "unreadable", 0, 0, 0)
        page_size, big_endian = fallback, sys.byteorder == "big"
    frame_size = page_size + FRAME_HEADER_SIZE
    frames = (size - HEADER_SIZE) // frame_size
    torn = size - HEADER_SIZE - frames * frame_size
    heads = [struct.unpack_from(">6I", mm, HEADER_SIZE + n * frame_size) for n in range(frames)]
    current = [h[2] == salt1 and h[3] == salt2 for h in heads]
    ta, tb, tc, td = _frame_matrix(page_size)

    # d for the frames with the header's salts only: the others fail on salt alone.
    sums: dict[int, tuple[int, int]] = {}
    n = 0
    while n < frames:
        if not current[n]:
            n += 1
            continue
        end = n
        while end < frames and current[end] and end - n < CHUNK_BYTES // frame_size:
            end += 1
        start = HEADER_SIZE + n * frame_size
        chunk = mm[start : start + (end - n) * frame_size]
        flat = _frame_sums(chunk, end - n, page_size, big_endian)
        for k in range(end - n):
            sums[n + k] = (flat[2 * k], flat[2 * k + 1])
        n = end

    def follows(seed: tuple[int, int], n: int) -> bool:
        """Frame n's stored checksum continues ``seed``, and it has the current salts."""
        if n not in sums or heads[n][0] == 0:
            return False
        d1, d2 = sums[n]
        s1 = (ta * seed[0] + tb * seed[1] + d1) & _M32
        s2 = (tc * seed[0] + td * seed[1] + d2) & _M32
        return (s1, s2) == (heads[n][4], heads[n][5])

    kept = kept_commits = 0
    brk: int | None = None
    reason: str | None = None
    seed = (ck1, ck2)
    n = 0
    if header_ok:
        while n < frames and follows(seed, n):
            seed = (heads[n][4], heads[n][5])
            if heads[n][1]:
                kept, kept_commits = n + 1, kept_commits + 1
            n += 1
        if n < frames:
            brk = n
            reason = (
                "has another WAL generation's salts"
                if not current[n]
                else ("has page number 0" if heads[n][0] == 0 else "fails its checksum")
            )
    else:
        brk, reason = 0, "follows a damaged WAL header"

    lost_at: list[int] = []
    authentic_after = -1
    if brk is not None:
        if current[brk] and heads[brk][1]:
            lost_at.append(brk)  # its own header says it ends a transaction
        if not header_ok and follows((ck1, ck2), 0):
            authentic_after = 0  # the header's stored checksum is the seed of frame 1
        for n in range(brk + 1, frames):
            if follows((heads[n - 1][4], heads[n - 1][5]), n):
                authentic_after = n
                if heads[n][1]:
                    lost_at.append(n)
    certain = len(lost_at) - (1 if lost_at and authentic_after <= lost_at[-1] else 0)
    if brk is not None and not lost_at and not any(current[brk:]):
        brk = reason = None  # the current WAL simply ends; what follows is older
    return WalReport(
        path,
        size,
        page_size,
        frames,
        header_ok,
        kept,
        kept_commits,
        None if brk is None else brk + 1,
        reason,
        len(lost_at),
        certain,
        torn,
    )


def _valid_page_size(n: int) -> bool:
    return 512 <= n <= 65536 and n & (n - 1) == 0
