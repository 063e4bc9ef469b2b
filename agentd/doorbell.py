"""The doorbell: how a CLI that wrote the state DB itself tells the running daemon.

Operator commands go through the daemon's API; when it does not answer (HTTP off
from where the CLI runs, a wrong URL, a token it cannot read) they write the DB
directly, in the daemon's own transactions. Without a word from the CLI the daemon
would notice only at its next idle poll. So after such a write the CLI rings: one
empty datagram to ``<state_dir>/agentd.wake``, and the daemon looks at once. That
makes a direct ``agentd trigger`` as prompt as one through the API, and lets an idle
daemon poll every few seconds instead of every second (an idle daemon's CPU is its
wake-ups).

A ring carries nothing and is trusted for nothing but "look now": the DB stays the
only truth, so a lost ring costs one idle poll and a spurious one a cheap tick.

A unix socket's path is limited to 107 bytes; a longer state dir is reached through
``/proc/self/fd/<dir fd>/agentd.wake``, which Linux resolves like the real path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("agentd")

SOCKET_NAME = "agentd.wake"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the NUL on Linux


@contextlib.contextmanager
def _address(state_dir: Path) -> Iterator[str]:
    """The socket's address, short enough for ``sockaddr_un`` whatever the dir's length."""
    path = str(state_dir / SOCKET_NAME)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"
    finally:
        os.close(dir_fd)


def ring(state_dir: Path) -> bool:
    """Wake the daemon that owns ``state_dir``; False when none listens (not running,
    or its doorbell is off). Never blocks and never raises: the write it announces is
    already durable, and the daemon's idle poll finds it anyway."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, _address(state_dir) as addr:
            sock.setblocking(False)
            sock.sendto(b"\x01", addr)
    except OSError:
        # No socket (no daemon), a dead daemon's socket (ECONNREFUSED), a full queue
        # of unread rings (EAGAIN: the daemon will look anyway), no permission.
        return False
    return True


class Doorbell:
    """The daemon's end: a datagram socket read by the event loop, calling ``on_ring``
    once per readable batch, however many rings it holds."""

    def __init__(self, state_dir: Path, on_ring: Callable[[], None]) -> None:
        self.state_dir = state_dir
        self.path = state_dir / SOCKET_NAME
        self.on_ring = on_ring
        self.rings = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Bind and start listening. The caller holds the state dir's lock, so a socket
        file already there is a dead daemon's and is replaced. A failure leaves the
        daemon working on its idle poll alone, and says so."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with _address(self.state_dir) as addr:
                sock.bind(addr)
        except OSError as exc:
            sock.close()
            log.warning(
                "doorbell off: cannot bind %s: %s; writes by a CLI that cannot reach "
                "the API are seen at the next idle poll",
                self.path,
                exc,
            )
            return False
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._on_readable)
        return True

    def _on_readable(self) -> None:
        assert self._sock is not None
        count = 0
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                self._sock.recv(16)
                count += 1
        if count:
            self.rings += count
            self.on_ring()

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
