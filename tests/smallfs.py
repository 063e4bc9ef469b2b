"""A small real filesystem for fault tests: a size-limited tmpfs that can be filled up.

The tests that use it need ``mount`` (root, or a user namespace that allows it); where
mounting is not permitted they are skipped, and the reason printed (``-rs``)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"


def _mount(target: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``target``; why not, or None."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run mount: {exc}"
    if proc.returncode != 0:
        return f"mount -t tmpfs not permitted here: {proc.stderr.strip()}"
    return None


@contextlib.contextmanager
def small_fs(target: Path, size: str = "16m") -> Iterator[SmallFs]:
    """A tmpfs of ``size`` on ``target`` for the duration; always unmounted after."""
    reason = _mount(target, size)
    if reason:
        pytest.skip(reason)
    try:
        yield SmallFs(target)
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


class SmallFs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def fill(self) -> int:
        """Write a filler file until the filesystem is full (ENOSPC); its size."""
        path = self.root / FILLER
        chunk = b"\0" * 65536
        written = 0
        with path.open("ab", buffering=0) as fh:
            while True:
                try:
                    written += fh.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            # The last partial pages: byte by byte until nothing more fits.
            for size in (4096, 512, 1):
                while True:
                    try:
                        written += fh.write(b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / FILLER)

    def available(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
