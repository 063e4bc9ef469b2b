"""The daemon-thread pool that runs sync Python callables."""

from __future__ import annotations

import gc
import sys
import threading

import pytest
from harness import wait_for

from agentd.daemon import LOOP_FIRST_SWITCH_S, _loop_first
from agentd.threads import DaemonThreads

DEADLINE = 10.0


def run_and_wait(pool: DaemonThreads) -> threading.Thread:
    done = threading.Event()
    seen: list[threading.Thread] = []

    def work() -> None:
        seen.append(threading.current_thread())
        done.set()

    pool.submit(work)
    assert done.wait(DEADLINE)
    return seen[0]


def test_a_worker_is_reused_and_is_a_daemon_thread() -> None:
    pool = DaemonThreads("t-reuse")
    first = run_and_wait(pool)
    # The worker counts itself idle just after the function returns: wait for that.
    wait_for(lambda: pool._idle == 1, what="worker back to idle")
    second = run_and_wait(pool)
    assert first is second
    assert first.daemon and first.name == "t-reuse-1"


def test_a_stuck_callable_does_not_hold_up_the_next() -> None:
    pool = DaemonThreads("t-stuck")
    release = threading.Event()
    stuck_started = threading.Event()

    def stuck() -> None:
        stuck_started.set()
        release.wait(DEADLINE)

    pool.submit(stuck)
    assert stuck_started.wait(DEADLINE)
    other = run_and_wait(pool)  # runs although the only worker is busy
    assert other.name == "t-stuck-2"
    release.set()


def test_idle_workers_leave() -> None:
    pool = DaemonThreads("t-idle", idle_s=0.05)
    worker = run_and_wait(pool)
    wait_for(lambda: not worker.is_alive(), what="idle worker gone")
    assert pool._idle == 0
    again = run_and_wait(pool)  # and a new one comes when there is work
    assert again is not worker


def test_many_concurrent_submits_all_run() -> None:
    pool = DaemonThreads("t-many")
    n, done = 200, threading.Semaphore(0)
    for _ in range(n):
        pool.submit(done.release)
    for _ in range(n):
        assert done.acquire(timeout=DEADLINE)
    wait_for(lambda: pool._idle == pool._started, what="every worker idle again")
    assert pool._started <= n


def test_loop_first_shortens_the_switch_interval_and_pauses_gc_only_meanwhile() -> None:
    """The daemon's reload and startup threads: the loop gets the GIL back sooner
    while they run, and the interpreter is as it was afterwards, error or not."""
    before = sys.getswitchinterval()
    assert gc.isenabled()
    with _loop_first():
        assert sys.getswitchinterval() == pytest.approx(min(before, LOOP_FIRST_SWITCH_S))
        assert not gc.isenabled()  # no full collection holding the GIL meanwhile
    assert sys.getswitchinterval() == before and gc.isenabled()
    with pytest.raises(ValueError), _loop_first():
        raise ValueError("a config that does not parse")
    assert sys.getswitchinterval() == before and gc.isenabled()
