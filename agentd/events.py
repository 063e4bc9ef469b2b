"""In-process fan-out of committed store events to live readers (SSE streams).

The DB is the record; this bus only carries what happened since a reader connected,
fed in id order by ``OrderedFeed``.
Each subscriber has a bounded queue: a reader that falls behind is dropped (its
queue marked overflowed) rather than growing memory, and reconnects with
``Last-Event-ID`` to catch up from the DB.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("agentd.events")

Event = dict[str, Any]


class Subscription:
    def __init__(self, bus: EventBus, run_id: str | None, maxsize: int) -> None:
        self.bus = bus
        self.run_id = run_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        if self.overflowed or (self.run_id is not None and event.get("run_id") != self.run_id):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True

    def close(self) -> None:
        self.bus.unsubscribe(self)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def publish(self, event: Event) -> None:
        """Called on the loop thread right after a commit; never blocks."""
        for sub in list(self._subs):
            sub.offer(event)

    def subscribe(self, run_id: str | None = None, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, run_id, maxsize)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)


Fetch = Callable[[int, int], list[Event]]
"""``fetch(after_id, limit)``: the committed events with ids above ``after_id``, in id
order, at most ``limit`` (the store's ``events``)."""


class OrderedFeed:
    """Feeds an ``EventBus`` every committed event of the state DB, in id order, whichever
    process committed it: this daemon, a CLI writing the state itself, or another node on
    a shared database.

    The invariant it keeps: the bus carries ids in increasing order, none skipped that
    the DB holds (an SSE reader keeps the highest id it sent and drops lower ones, so an
    event published after a higher one would be lost to it). Both engines hand out event
    ids in commit order (SQLite's one writer; PostgreSQL's write lock), so:

    - a local event whose id follows the last one published (``last + 1``) is published
      at once: nothing can lie between them;
    - any other local event (a gap: another process committed in between, or a rolled
      back id) and every notice from elsewhere (``remote``) makes the feed *dirty*: one
      catch-up, soon on the loop, reads the DB after ``last`` page by page and publishes
      what it finds; local events while dirty are left to it (they are committed, so the
      read sees them).

    With no subscriber, nothing is read: ``last`` only follows the local ids, and a
    subscriber reads its start from the DB itself (``/v1/events`` backfills) before it
    follows the bus. ``poll_s`` (on a shared database, where other nodes send no notice
    of their commits) catches up that often while anyone subscribes. A catch-up that
    fails (the DB unreachable) stays dirty and is tried again ``retry_s`` later.
    """

    def __init__(
        self,
        bus: EventBus,
        fetch: Fetch,
        loop: asyncio.AbstractEventLoop,
        *,
        poll_s: float | None = None,
        retry_s: float = 1.0,
        page: int = 500,
    ) -> None:
        self.bus = bus
        self.fetch = fetch
        self.loop = loop
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.page = page
        self.last: int | None = None
        self._dirty = False
        self._queued: asyncio.Handle | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._failing = False

    def start(self, last: int) -> None:
        """Begin after ``last``, the newest id in the DB now."""
        self.last = last
        if self.poll_s:
            self._poll = self.loop.call_later(self.poll_s, self._tick)

    def stop(self) -> None:
        for handle in (self._queued, self._poll):
            if handle is not None:
                handle.cancel()
        self._queued = self._poll = None
        self.last = None

    def local(self, event: Event) -> None:
        """An event this process committed (on the loop thread, after its commit)."""
        if self.last is None:
            return  # not started: nobody can follow the bus yet
        event_id = int(event["id"])
        if self._dirty or event_id <= self.last:
            return
        if event_id == self.last + 1 or not self.bus.subscribers:
            self.last = event_id
            self.bus.publish(event)
            return
        self.remote()

    def remote(self) -> None:
        """Something may have been committed elsewhere: catch up soon."""
        if self.last is None:
            return
        self._dirty = True
        if self._queued is None:
            self._queued = self.loop.call_soon(self._catch_up)

    def _tick(self) -> None:
        self._poll = self.loop.call_later(self.poll_s or 1.0, self._tick)
        if self.bus.subscribers:
            self.remote()

    def _catch_up(self) -> None:
        self._queued = None
        if self.last is None:
            return
        try:
            while True:
                page = self.fetch(self.last, self.page)
                for event in page:
                    self.last = int(event["id"])
                    self.bus.publish(event)
                if len(page) < self.page:
                    break
        except Exception as exc:  # the DB is away: keep what is published, try again
            if not self._failing:
                log.warning("event feed: reading the event log failed: %s; trying again", exc)
                self._failing = True
            self._queued = self.loop.call_later(self.retry_s, self._catch_up)
            return
        if self._failing:
            log.info("event feed: reading the event log again")
            self._failing = False
        self._dirty = False
