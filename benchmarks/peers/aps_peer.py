"""APScheduler 3.11 as a peer: ``python -m benchmarks.peers.aps_peer MODE ...``.

Variants: ``sqlite`` (SQLAlchemy jobstore on SQLite, stock 1 s ``misfire_grace_time``),
``nograce`` (same store, ``misfire_grace_time=None``) and ``memory`` (MemoryJobStore,
stock grace). Job functions are plain functions, as in agentd's benchmarks, so they run
in APScheduler's thread pool. Lateness is measured where the job function starts.

Jobs are added before ``start()``, as one registers many jobs with APScheduler: added
to a running scheduler, every ``add_job`` also runs a full ``_process_jobs`` pass, and
the loop is then busy with those long after the last one returned.

Modes: ``due`` (B1: N date jobs at one instant), ``tick`` (B2: a per-second cron job
beside N idle cron jobs), ``idle`` (B5-B7, B9: N idle cron jobs plus an aiohttp server,
until SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from benchmarks.peers import common

LATE: list[float] = []
_lock = threading.Lock()


def job(due: float) -> None:
    late = time.time() - due
    with _lock:
        LATE.append(late)


def tick() -> None:
    now = time.time()
    with _lock:
        LATE.append(now - int(now))  # due on the whole second; valid while lateness < 1 s


def noop() -> None:
    """An idle job's target; never due during a benchmark."""


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make(variant: str, db: str) -> AsyncIOScheduler:
    store: Any = MemoryJobStore() if variant == "memory" else SQLAlchemyJobStore(f"sqlite:///{db}")
    grace = None if variant == "nograce" else 1
    return AsyncIOScheduler(
        jobstores={"default": store}, job_defaults={"misfire_grace_time": grace}, timezone=UTC
    )


def add_idle(sched: AsyncIOScheduler, n: int) -> None:
    hour, minute = common.idle_cron_fields()
    for i in range(n):
        sched.add_job(noop, "cron", hour=hour, minute=minute, id=f"idle{i:05d}")


async def due_mode(a: argparse.Namespace) -> dict[str, Any]:
    sched = make(a.variant, a.db)
    missed, finished = [0], [0]
    sched.add_listener(lambda e: missed.__setitem__(0, missed[0] + 1), EVENT_JOB_MISSED)
    sched.add_listener(
        lambda e: finished.__setitem__(0, finished[0] + 1), EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
    )
    when = datetime.fromtimestamp(a.due, UTC)
    for i in range(a.n):
        sched.add_job(job, "date", run_date=when, args=[a.due], id=f"t{i:05d}")
    sched.start()
    common.ready()
    while missed[0] + finished[0] < a.n and time.time() < a.due + common.LATE_TIMEOUT_S:
        await asyncio.sleep(0.005)
    elapsed = time.time() - a.due
    cpu = common.cpu()
    sched.shutdown(wait=True)
    return {"lateness_s": LATE, "missed": a.n - len(LATE), "cpu_total_s": cpu, "elapsed_s": elapsed}


async def tick_mode(a: argparse.Namespace) -> dict[str, Any]:
    sched = make(a.variant, a.db)
    missed = [0]
    sched.add_listener(lambda e: missed.__setitem__(0, missed[0] + 1), EVENT_JOB_MISSED)
    add_idle(sched, a.n)
    sched.start()
    common.ready()
    first = common.next_second() + 1
    sched.add_job(tick, "cron", second="*", start_date=datetime.fromtimestamp(first, UTC))
    await asyncio.sleep(first + a.seconds - time.time() - 0.5)
    sched.shutdown(wait=True)
    return {"lateness_s": LATE, "expected": a.seconds, "missed_events": missed[0]}


async def idle_mode(a: argparse.Namespace) -> dict[str, Any]:
    sched = make(a.variant, a.db)
    add_idle(sched, a.n)
    sched.start()
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", a.port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    common.ready()
    await stop.wait()
    sched.shutdown(wait=True)
    await runner.cleanup()
    return {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["due", "tick", "idle"])
    p.add_argument("--variant", choices=["sqlite", "nograce", "memory"], default="sqlite")
    p.add_argument("--db", default="jobs.sqlite")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--due", type=float, default=0.0)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    modes = {"due": due_mode, "tick": tick_mode, "idle": idle_mode}
    common.emit(asyncio.run(modes[a.mode](a)))


if __name__ == "__main__":
    main()
