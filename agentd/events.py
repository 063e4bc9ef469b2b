"""In-process fan-out of committed store events to live readers (SSE streams).

The DB is the record; this bus only carries what happened since a reader connected.
Each subscriber has a bounded queue: a reader that falls behind is dropped (its
queue marked overflowed) rather than growing memory, and reconnects with
``Last-Event-ID`` to catch up from the DB.
"""

from __future__ import annotations

import asyncio
from typing import Any

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
