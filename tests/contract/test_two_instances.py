"""Two instances on one state (the daemon and the CLI): each sees what the other
committed, and their writes at the same moment are serialised, never refused."""

from __future__ import annotations

import threading

from agentd.models import Outcome, RunStatus
from agentd.state.port import Store

from .helpers import N_ROUNDS, at, claim_one, events_of_kind, fire_at


def test_two_stores_on_one_state_interleave(store: Store, second_store: Store) -> None:
    daemon, cli = store, second_store
    run_id = fire_at(daemon, "a", 0)
    cli.pause("b", "maintenance", at(1))
    claim_one(daemon, at(2))
    assert cli.request_cancel(run_id, at(3)) == RunStatus.RUNNING
    assert daemon.cancel_requests("w1") == [run_id]
    manual = cli.fire("b", at(4), trigger="manual", honour_pause=False)
    daemon.finish(run_id, at(5), outcome=Outcome.CANCELLED, next_status=RunStatus.CANCELLED)
    assert cli.get_run(run_id)["status"] == RunStatus.CANCELLED
    assert [r["id"] for r in daemon.claim(at(6), "w1", 30, 5, set(), set())] == [manual.run_id]
    cli.resume("b", at(7))
    assert daemon.paused_tasks() == set()
    assert len(daemon.events()) == len(cli.events())


def test_two_stores_writing_from_two_threads(store: Store, second_store: Store) -> None:
    """The daemon and the CLI write at the same time; the engine serialises them (SQLite:
    BEGIN IMMEDIATE and a busy timeout) without an error to either."""
    daemon, cli = store, second_store
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def daemon_side() -> None:
        try:
            start.wait()
            for i in range(N_ROUNDS):
                fire_at(daemon, "a", i, overlap="allow")
                for row in daemon.claim(at(i), "w1", 30, 5, set(), {"a"}):
                    daemon.finish(
                        row["id"],
                        at(i),
                        outcome=Outcome.SUCCESS,
                        next_status=RunStatus.SUCCEEDED,
                    )
        except BaseException as exc:
            errors.append(exc)

    def cli_side() -> None:
        try:
            start.wait()
            for i in range(N_ROUNDS):
                cli.pause("b", f"p{i}", at(i))
                cli.fire("b", at(i), trigger="manual", overlap="allow", honour_pause=False)
                cli.resume("b", at(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=daemon_side), threading.Thread(target=cli_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    counts = daemon.counts()
    assert (
        counts.get("succeeded", 0) + counts.get("queued", 0) + counts.get("running", 0)
        == 2 * N_ROUNDS
    )
    assert len(daemon.list_runs(task_id="a", status="succeeded", limit=100)) == N_ROUNDS
    assert len(cli.list_runs(task_id="b", limit=100)) == N_ROUNDS
    assert len(events_of_kind(cli, "pause")) == N_ROUNDS
