"""huey with SqliteHuey as a peer: ``python -m benchmarks.peers.huey_peer MODE ...``.

Variants: ``stock`` is ``SqliteHuey(filename)`` and a consumer with huey's defaults (one
worker thread, 0.1 s first poll backing off to 10 s, scheduler every 1 s). Note that
stock SqliteHuey sets ``synchronous=OFF``: nothing is durable against power loss.
``tuned`` turns ``fsync=True`` on (``synchronous=FULL``, agentd's durability), and
gives the consumer 4 worker threads and a 5 ms poll with no back-off.

The consumer runs in this process (thread workers), so task functions can record
lateness in memory. Modes: ``due`` (B1: N tasks with one ``eta``), ``throughput``
(B3: N tasks enqueued, then consumed), ``idle`` (B6, B7, B9: an idle consumer until
SIGTERM, which huey treats as "stop now").
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime
from typing import Any

from huey import SqliteHuey, signals
from huey.consumer import Consumer

from benchmarks.peers import common

_lock = threading.Lock()
STARTS: list[float] = []
DONE: list[float] = []


def build(variant: str, db: str) -> tuple[SqliteHuey, dict[str, Any]]:
    if variant == "tuned":
        huey = SqliteHuey(filename=db, fsync=True)
        opts: dict[str, Any] = {
            "workers": 4,
            "initial_delay": 0.005,
            "backoff": 1.0,
            "max_delay": 0.005,
        }
    else:
        huey = SqliteHuey(filename=db)
        opts = {}

    @huey.signal(signals.SIGNAL_COMPLETE, signals.SIGNAL_ERROR)  # type: ignore[untyped-decorator]
    def finished(signal: str, task: Any, exc: BaseException | None = None) -> None:
        with _lock:
            DONE.append(time.time())

    return huey, {"worker_type": "thread", "periodic": False, **opts}


def consume_until(consumer: Consumer, n: int, deadline: float) -> None:
    """Run the consumer in this (main) thread until ``n`` tasks finished or the deadline."""

    def watch() -> None:
        while len(DONE) < n and time.time() < deadline:
            time.sleep(0.005)
        consumer.stop(graceful=False)

    threading.Thread(target=watch, daemon=True).start()
    consumer.run()


def due_mode(a: argparse.Namespace) -> dict[str, Any]:
    huey, opts = build(a.variant, a.db)

    @huey.task()  # type: ignore[untyped-decorator]
    def job(due: float) -> None:
        with _lock:
            STARTS.append(time.time() - due)

    eta = datetime.fromtimestamp(a.due, UTC)
    for _ in range(a.n):
        job.schedule(args=(a.due,), eta=eta)
    common.ready()
    consume_until(huey.create_consumer(**opts), a.n, a.due + common.LATE_TIMEOUT_S)
    return {
        "lateness_s": STARTS,
        "missed": a.n - len(STARTS),
        "cpu_total_s": common.cpu(),
        "elapsed_s": (max(DONE) if DONE else time.time()) - a.due,
    }


def throughput_mode(a: argparse.Namespace) -> dict[str, Any]:
    huey, opts = build(a.variant, a.db)

    @huey.task()  # type: ignore[untyped-decorator]
    def noop() -> None:
        with _lock:
            STARTS.append(time.time())

    t0 = time.perf_counter()
    for _ in range(a.n):
        noop()
    enqueue_s = time.perf_counter() - t0
    common.ready()
    cpu0 = common.cpu()
    consume_until(huey.create_consumer(**opts), a.n, time.time() + 600)
    span = max(DONE) - min(STARTS) if DONE and STARTS else float("nan")
    return {
        "runs_per_s": len(DONE) / span,
        "enqueue_per_s": a.n / enqueue_s,
        "done": len(DONE),
        "cpu_s": common.cpu() - cpu0,
    }


def idle_mode(a: argparse.Namespace) -> dict[str, Any]:
    huey, opts = build(a.variant, a.db)
    consumer = huey.create_consumer(**opts)
    consumer.start()  # starts workers and installs huey's own signal handlers
    common.ready()
    while True:  # the body of Consumer.run(), which would call start() again
        try:
            consumer.loop()
        except Exception:  # ConsumerStopped, after SIGTERM
            break
    return {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["due", "throughput", "idle"])
    p.add_argument("--variant", choices=["stock", "tuned"], default="stock")
    p.add_argument("--db", default="huey.sqlite")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--due", type=float, default=0.0)
    a = p.parse_args()
    modes = {"due": due_mode, "throughput": throughput_mode, "idle": idle_mode}
    common.emit(modes[a.mode](a))


if __name__ == "__main__":
    main()
