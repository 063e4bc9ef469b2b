"""``OrderedFeed``: the bus carries every committed event in id order, whoever committed
it, read from an event log that other writers append to (here a list standing in for
the state DB's ``events`` table, as the store's ``events(after, limit)`` pages it)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from agentd.events import Event, EventBus, OrderedFeed


class Log:
    """An append-only event log with the store's paging; ``down`` makes reads fail."""

    def __init__(self) -> None:
        self.rows: list[Event] = []
        self.reads = 0
        self.down = False

    def append(self, *ids: int) -> list[Event]:
        new = [{"id": i, "kind": "k", "run_id": None} for i in ids]
        self.rows.extend(new)
        return new

    def fetch(self, after: int, limit: int) -> list[Event]:
        self.reads += 1
        if self.down:
            raise OSError("connection refused")
        return [e for e in self.rows if e["id"] > after][:limit]


def on_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Each test on its own event loop, bounded."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(30):
                await test(*args, **kwargs)

        asyncio.run(bounded())

    return run


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _feed(log: Log, **kwargs: Any) -> tuple[OrderedFeed, list[int]]:
    bus = EventBus()
    seen: list[int] = []
    sub = bus.subscribe(maxsize=10_000)
    feed = OrderedFeed(bus, log.fetch, asyncio.get_running_loop(), page=3, **kwargs)
    orig = sub.offer

    def offer(event: Event) -> None:
        seen.append(int(event["id"]))
        orig(event)

    sub.offer = offer  # type: ignore[method-assign]
    return feed, seen


@on_a_loop
async def test_local_events_that_follow_on_are_published_without_a_read() -> None:
    log = Log()
    feed, seen = _feed(log)
    feed.start(0)
    for event in log.append(1, 2, 3):
        feed.local(event)
    assert seen == [1, 2, 3] and log.reads == 0


@on_a_loop
async def test_a_gap_is_filled_from_the_log_in_id_order_without_doubles() -> None:
    """Another writer committed 2..4 between this process's 1 and 5, 6."""
    log = Log()
    feed, seen = _feed(log)
    feed.start(0)
    feed.local(log.append(1)[0])
    log.append(2, 3, 4)
    for event in log.append(5, 6):
        feed.local(event)  # 5 is a gap: both are left to the catch-up
    assert seen == [1]
    await _settle()
    assert seen == [1, 2, 3, 4, 5, 6]
    feed.local(log.append(7)[0])  # follows on again: no read
    reads = log.reads
    assert seen[-1] == 7 and log.reads == reads


@on_a_loop
async def test_a_notice_from_elsewhere_reads_every_page() -> None:
    log = Log()
    feed, seen = _feed(log)
    feed.start(10)
    log.append(*range(11, 19))  # three pages of 3
    feed.remote()
    feed.remote()  # coalesced
    await _settle()
    assert seen == list(range(11, 19)) and log.reads == 3


@on_a_loop
async def test_a_rolled_back_id_is_a_gap_that_costs_one_read() -> None:
    log = Log()
    feed, seen = _feed(log)
    feed.start(0)
    feed.local(log.append(1)[0])
    feed.local(log.append(3)[0])  # id 2 was handed out and rolled back
    await _settle()
    assert seen == [1, 3] and log.reads == 1


@on_a_loop
async def test_with_nobody_following_nothing_is_read() -> None:
    log = Log()
    bus = EventBus()
    feed = OrderedFeed(bus, log.fetch, asyncio.get_running_loop(), page=3)
    feed.start(0)
    log.append(1, 2)
    feed.local(log.append(3)[0])
    await _settle()
    assert log.reads == 0 and feed.last == 3
    # A stream that subscribes now reads its start from the DB; the feed goes on after 3.
    got: list[int] = []
    sub = bus.subscribe()
    log.append(4)
    feed.local(log.append(5)[0])
    await _settle()
    while not sub.queue.empty():
        got.append(int(sub.queue.get_nowait()["id"]))
    assert got == [4, 5]


@on_a_loop
async def test_a_failed_read_is_tried_again_and_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "agentd.events")
    log = Log()
    feed, seen = _feed(log, retry_s=0.01)
    feed.start(0)
    log.down = True
    log.append(1, 2)
    feed.remote()
    await _settle()
    assert seen == [] and "reading the event log failed" in caplog.text
    feed.local(log.append(3)[0])  # dirty: left to the catch-up
    log.down = False
    async with asyncio.timeout(10):
        while seen != [1, 2, 3]:
            await asyncio.sleep(0.01)
    assert "reading the event log again" in caplog.text


@on_a_loop
async def test_polling_finds_other_nodes_events_only_while_someone_follows() -> None:
    log = Log()
    bus = EventBus()
    feed = OrderedFeed(bus, log.fetch, asyncio.get_running_loop(), poll_s=0.01, page=3)
    feed.start(0)
    await asyncio.sleep(0.05)  # five ticks with nobody following: no read
    assert log.reads == 0
    sub = bus.subscribe()
    log.append(1, 2)
    async with asyncio.timeout(10):
        while sub.queue.qsize() < 2:
            await asyncio.sleep(0.01)
    assert [sub.queue.get_nowait()["id"] for _ in range(2)] == [1, 2]
    feed.stop()
