"""A run's captured output, read in slices: what ``GET /v1/runs/{run_id}/output`` answers
and ``agentd logs RUN`` prints (from the API, or from the workspace when no daemon runs).

A leaf: it imports nothing of agentd. The command executor writes ``stdout.log`` and
``stderr.log`` in the run's workspace (``<state_dir>/runs/<task>/<run>``), created on
the first byte, flushed as it arrives, capped (``agentd.executors.command``), and
truncated when a new attempt starts.

Invariants of a slice (``read_output``):

- ``text`` is the file's bytes ``[offset, next_offset)`` decoded as UTF-8; while the run
  is not final, a character cut at the end of the slice is left for the next one (so a
  follower never prints a replacement character where the file has none).
- ``next_offset >= offset``, and asking again from ``next_offset`` never repeats a byte;
  ``eof`` says the slice reached the end of the file as it was read.
- When ``offset`` is past the file's end, the file was written anew (a retry's attempt
  truncates it): the slice starts again at 0 and ``restarted`` is true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

OUTPUT_STREAMS: Final = ("stdout", "stderr")
OUTPUT_PAGE: Final = 256 * 1024
"""The most bytes one slice holds (the API's ``limit`` at most)."""
MIN_PAGE: Final = 4
"""The fewest bytes one slice may be asked for: the longest UTF-8 character."""
MAX_OUTPUT_OFFSET: Final = 2**53
"""The largest ``offset`` accepted (JSON's exact integers)."""


def _complete_utf8(data: bytes) -> int:
    """How many leading bytes of ``data`` end on a whole UTF-8 character (a multi-byte
    character cut at the end is excluded; bytes that are no UTF-8 at all are kept)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): how long is its character?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            if byte >= 0x80 and byte >> 3 == 0x1F:  # not a lead byte of any length
                return len(data)
            return len(data) - back if need > back else len(data)
    return len(data)


def read_output(path: Path, offset: int, limit: int, final: bool) -> dict[str, Any]:
    """The slice of ``path`` from ``offset``, at most ``limit`` bytes but never fewer
    than ``MIN_PAGE`` (so a slice that starts on a character always moves on by one;
    see the module's invariants). A missing file is an empty slice with ``exists``
    false: the run printed nothing on that stream yet (or its workspace was pruned)."""
    limit = max(limit, MIN_PAGE)
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            restarted = offset > size
            if restarted:
                offset = 0
            fh.seek(offset)
            data = fh.read(limit)
    except FileNotFoundError:
        return {
            "exists": False,
            "offset": 0,
            "next_offset": 0,
            "size": 0,
            "eof": True,
            "restarted": offset > 0,
            "text": "",
        }
    keep = len(data) if final else _complete_utf8(data)
    end = offset + keep
    return {
        "exists": True,
        "offset": offset,
        "next_offset": end,
        "size": size,
        "eof": offset + len(data) >= size,
        "restarted": restarted,
        "text": data[:keep].decode("utf-8", errors="replace"),
    }
