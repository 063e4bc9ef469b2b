"""Reusable daemon threads for users' sync callables.

Not ``asyncio.to_thread``: the default executor's threads are joined at interpreter
exit, so one stuck callable would hang shutdown forever. Not a thread per run either:
starting a thread (and waiting for it to start) was a seventh of the CPU of a burst of
trivial runs. Workers here are daemon threads that wait for work and leave after
``idle_s`` without any; a worker stuck in a callable is simply not counted as idle,
and the next submit starts another.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

IDLE_S = 60.0


class DaemonThreads:
    def __init__(self, name: str = "agentd-python", idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting on the queue, or about to
        self._started = 0

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in a worker; ``fn`` reports its own result and must not raise."""
        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self._started += 1
                number = self._started
            else:
                self._idle -= 1  # this worker is taken by the item put below
        self._work.put(fn)
        if spawn:
            threading.Thread(target=self._worker, name=f"{self.name}-{number}", daemon=True).start()

    def _worker(self) -> None:
        while True:
            try:
                fn = self._work.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0 and self._work.empty():
                        self._idle -= 1
                        return
                continue  # an item is on its way to us: take it
            fn()
            with self._lock:
                self._idle += 1
