"""The doorbell on real unix datagram sockets: a ring reaches an open bell, whatever
the state dir's length; no bell, a dead daemon's socket and a failed bind are all
quiet, and leave the CLI's write and the daemon's start alone."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from agentd.doorbell import SOCKET_NAME, Doorbell, ring


async def _rung(state_dir: Path, rings: int) -> int:
    """Open a bell, ring it ``rings`` times, and return how many it counted once
    ``on_ring`` has been called."""
    heard = asyncio.Event()
    bell = Doorbell(state_dir, heard.set)
    assert bell.open(asyncio.get_running_loop())
    try:
        assert (state_dir / SOCKET_NAME).exists()
        for _ in range(rings):
            assert ring(state_dir)
        await asyncio.wait_for(heard.wait(), timeout=30)
        while bell.rings < rings:  # more rings may arrive after the first batch
            heard.clear()
            await asyncio.wait_for(heard.wait(), timeout=30)
        return bell.rings
    finally:
        bell.close()


def test_a_ring_wakes_the_open_bell_and_close_removes_its_socket(tmp_path: Path) -> None:
    assert asyncio.run(_rung(tmp_path, 3)) == 3
    assert not (tmp_path / SOCKET_NAME).exists()
    assert not ring(tmp_path)  # nobody listens any more


def test_a_state_dir_too_long_for_sockaddr_un_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / SOCKET_NAME)) > 108
    with pytest.raises(OSError):  # the plain path really is too long
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(str(deep / SOCKET_NAME))
    assert asyncio.run(_rung(deep, 1)) == 1
    assert not (deep / SOCKET_NAME).exists()


def test_a_dead_daemons_socket_refuses_the_ring_and_is_replaced_on_open(
    tmp_path: Path,
) -> None:
    """``kill -9`` leaves the socket file behind: a ring then fails quietly, and the
    next daemon (holding the state lock) binds over it."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / SOCKET_NAME))
    stale.close()
    assert (tmp_path / SOCKET_NAME).exists()
    assert not ring(tmp_path)
    assert asyncio.run(_rung(tmp_path, 1)) == 1


def test_no_state_dir_means_no_ring_and_a_bell_that_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing"
    assert not ring(missing)

    async def open_it() -> bool:
        return Doorbell(missing, lambda: None).open(asyncio.get_running_loop())

    with caplog.at_level(logging.WARNING, logger="agentd"):
        assert not asyncio.run(open_it())
    assert "doorbell off: cannot bind" in caplog.text
    assert str(missing / SOCKET_NAME) in caplog.text
