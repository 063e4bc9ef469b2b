"""DBOS Transact 3 as a peer on PostgreSQL: ``python -m benchmarks.peers.dbos_peer MODE
--url URL ...``.

Modes: ``prepare`` launches DBOS once on the (empty) system database ``--url`` (which
creates DBOS's schema and registers the queue ``bench``), stops it, and enqueues ``--n``
workflows ``noop`` with ``DBOSClient.enqueue_in_transaction``, 1,000 per transaction,
each delayed until ``--due`` (``delay_seconds``: DBOS holds them ``DELAYED`` and makes
them ``ENQUEUED`` when due); ``work`` launches DBOS with the queue and runs until SIGTERM,
then reports the lateness its workflow function saw. Several ``work`` processes, each its
own ``executor_id``, share the queue, as DBOS is deployed.

The queue is tuned, like huey's tuned variant: ``worker_concurrency`` 16 per process
(agentd's pool in B3) and a 5 ms poll (stock: 1 s). DBOS dequeues by polling, at most
``worker_concurrency`` minus what is running per poll, so with the stock poll a process
could start at most 16 workflows a second. No worker limit at all would start every
queued workflow at once in an unbounded thread pool.

The workflow is a plain (sync) function with no steps; it records ``time.time() - due``
on its first line. Throughput is read by the harness from the system database
(``workflow_status``: first ``started_at_epoch_ms`` to last ``updated_at`` of a
``SUCCESS``), the same point as agentd's first ``claim`` and last ``success`` events.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import Any

import sqlalchemy as sa
from dbos import DBOS, DBOSClient, DBOSConfig

from benchmarks.peers import common

LATE: list[float] = []
_lock = threading.Lock()
BATCH = 1000
QUEUE = "bench"
VERSION = "agentd-bench"
"""One application version for every process: DBOS dequeues only for its own version."""


@DBOS.workflow(name="noop")  # type: ignore[untyped-decorator]
def noop(due: float) -> None:
    late = time.time() - due
    with _lock:
        LATE.append(late)


def config(url: str, executor: str) -> DBOSConfig:
    return {
        "name": "agentd-bench",
        "system_database_url": url,
        "executor_id": executor,
        "application_version": VERSION,
        "log_level": "WARNING",
    }


def launch(url: str, executor: str, concurrency: int, poll: float) -> None:
    """Launch, then register the queue (its row lives in the system database, which
    ``launch`` creates; a process launched on a database that has the row already
    starts dequeuing from it at once)."""
    DBOS(config=config(url, executor))
    DBOS.launch()
    DBOS.register_queue(QUEUE, worker_concurrency=concurrency, polling_interval_sec=poll)


def prepare(a: argparse.Namespace) -> dict[str, Any]:
    launch(a.url, "prepare", a.concurrency, a.poll)
    DBOS.destroy()
    client = DBOSClient(system_database_url=a.url)
    engine = sa.create_engine(a.url.replace("postgresql://", "postgresql+psycopg://", 1))
    t0 = time.perf_counter()
    try:
        for start in range(0, a.n, BATCH):
            size = min(BATCH, a.n - start)
            with engine.begin() as conn:
                delay = max(0.0, a.due - time.time())
                for _ in range(size):
                    client.enqueue_in_transaction(
                        conn,
                        {
                            "workflow_name": "noop",
                            "queue_name": QUEUE,
                            "app_version": VERSION,
                            "delay_seconds": delay,
                        },
                        a.due,
                    )
    finally:
        client.destroy()
        engine.dispose()
    return {"enqueued": a.n, "enqueue_s": time.perf_counter() - t0}


def work(a: argparse.Namespace) -> dict[str, Any]:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    launch(a.url, a.executor, a.concurrency, a.poll)
    common.ready()
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)
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
    p.add_argument("--executor", default="worker")
    a = p.parse_args()
    modes = {"prepare": prepare, "work": work}
    common.emit(modes[a.mode](a))


if __name__ == "__main__":
    main()
