"""HTTP latency under load, and event-loop stalls seen from outside.

agentd serves HTTP on the same event loop as its scheduler and runner, so the latency of
a trivial request while work is going on is the longest time the loop was busy with
something else. A background thread sends requests on one keep-alive connection, with a
short sleep in between, and records every latency.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import defaultdict


class Poller:
    def __init__(self, port: int, paths: dict[str, float]) -> None:
        """``paths`` maps a path to the pause (seconds) before it is requested again."""
        self.port = port
        self.paths = paths
        self.latency: dict[str, list[float]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        due = dict.fromkeys(self.paths, 0.0)
        while not self._stop.is_set():
            path = min(due, key=lambda p: due[p])
            wait = due[path] - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                t0 = time.perf_counter()
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.latency[path].append(time.perf_counter() - t0)
            except OSError:  # not listening yet, or gone: try again shortly
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.005)
                continue
            due[path] = time.monotonic() + self.paths[path]
        if conn is not None:
            conn.close()
