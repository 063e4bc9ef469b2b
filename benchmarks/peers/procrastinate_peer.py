"""Procrastinate 3 as a peer on PostgreSQL: ``python -m benchmarks.peers.procrastinate_peer
MODE --url URL ...``.

Modes: ``prepare`` creates procrastinate's schema in the (empty) database ``--url`` and
defers ``--n`` jobs of the task ``noop``, due at ``--due`` (``procrastinate_defer_jobs``
in batches of 1,000), then exits; ``work`` runs one worker (``App.run_worker_async``,
``--concurrency`` sub-workers, LISTEN/NOTIFY on, stock retention: finished jobs are
kept) until SIGTERM, which procrastinate handles as a graceful stop, and then reports
the lateness its job function saw. Several ``work`` processes on one database are
several workers sharing the queue, as procrastinate is deployed.

The job function is a plain (sync) function, run in procrastinate's thread pool; it
records ``time.time() - due`` on its first line. Throughput is read by the harness from
the database (``procrastinate_events``: first ``started`` to last ``succeeded``), the
same point as agentd's first ``claim`` and last ``success`` events.

``--poll`` is the fetch polling interval: procrastinate waits that long after finding
nothing due (a NOTIFY wakes it for a new job, not for a scheduled one falling due).
The harness sets 5 ms, huey-tuned's poll; stock is 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from datetime import UTC, datetime
from typing import Any

import procrastinate

from benchmarks.peers import common

LATE: list[float] = []
_lock = threading.Lock()
BATCH = 1000


def make_app(url: str) -> tuple[procrastinate.App, Any]:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")  # type: ignore[untyped-decorator]
    def noop(due: float) -> None:
        late = time.time() - due
        with _lock:
            LATE.append(late)

    return app, noop


async def prepare(a: argparse.Namespace) -> dict[str, Any]:
    app, noop = make_app(a.url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        when = datetime.fromtimestamp(a.due, UTC)
        deferrer = noop.configure(schedule_at=when)
        t0 = time.perf_counter()
        for start in range(0, a.n, BATCH):
            size = min(BATCH, a.n - start)
            await deferrer.batch_defer_async(*({"due": a.due} for _ in range(size)))
        return {"deferred": a.n, "defer_s": time.perf_counter() - t0}


async def work(a: argparse.Namespace) -> dict[str, Any]:
    app, _ = make_app(a.url)
    async with app.open_async():
        worker = asyncio.ensure_future(
            app.run_worker_async(
                concurrency=a.concurrency,
                wait=True,
                fetch_job_polling_interval=a.poll,
                install_signal_handlers=True,
                shutdown_graceful_timeout=10,
            )
        )
        common.ready()
        await worker
    with _lock:
        late = list(LATE)
    return {"lateness_s": late, "ran": len(late), "cpu_total_s": common.cpu()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["prepare", "work"])
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--due", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--poll", type=float, default=0.005)
    a = p.parse_args()
    modes = {"prepare": prepare, "work": work}
    common.emit(asyncio.run(modes[a.mode](a)))


if __name__ == "__main__":
    main()
