"""The runner on a real state DB: the claims and starts of a tick share one commit."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from pathlib import Path

import pytest

from agentd.clock import SystemClock
from agentd.config import Config, parse_config
from agentd.executors import ExecEnv
from agentd.runner import Runner
from agentd.state.sqlite.engine import SqliteStore

N_RUNS = 40


def make_runner(
    store: SqliteStore, clock: SystemClock, tmp_path: Path, concurrency: int, config: Config
) -> Runner:
    runner = Runner(
        store,
        clock,
        owner="test",
        state_dir=tmp_path,
        concurrency=concurrency,
        lease_s=30,
        exec_env=ExecEnv(kill_grace_s=1, output_max_bytes=1000),
    )
    runner.set_tasks(config.tasks)
    return runner


def test_a_tick_claims_and_starts_forty_runs_with_one_commit(
    tmp_path: Path,
) -> None:
    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  quick:\n    schedule: {manual: true}\n    overlap: allow\n"
        '    command: {argv: ["true"]}\n'
    )
    clock = SystemClock()
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks({"quick": (config.tasks["quick"].fingerprint(), "command")}, clock.now())
    for _ in range(N_RUNS):
        store.fire("quick", clock.now(), trigger="manual", overlap="allow")
    commits: list[str] = []
    store.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)

    async def scenario() -> None:
        runner = make_runner(store, clock, tmp_path, N_RUNS, config)
        assert len(runner.tick()) == N_RUNS
        assert len(commits) == 1  # the claim and all 40 starts
        deadline = time.monotonic() + 60
        while runner.active:
            assert time.monotonic() < deadline, "runs did not finish"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    statuses = {r[0] for r in store.conn.execute("SELECT status FROM runs")}
    assert statuses == {"succeeded"}
    # Outcomes that land in the same loop iteration share a commit; how many do depends
    # on the machine, so only the bound is asserted: never more than one per outcome.
    assert 2 <= len(commits) <= N_RUNS + 1, len(commits)
    store.conn.close()


def test_a_command_that_writes_nothing_leaves_no_workspace(tmp_path: Path) -> None:
    """The command gets its workspace, but one left empty is removed when the run ends;
    one it wrote into keeps the file and gets run.json and events.jsonl beside it."""
    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  silent:\n    schedule: {manual: true}\n"
        '    command: {shell: "test -d $AGENTD_WORKSPACE"}\n'
        "  writer:\n    schedule: {manual: true}\n"
        '    command: {shell: "echo x > $AGENTD_WORKSPACE/out"}\n'
    )
    clock = SystemClock()
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (config.tasks[t].fingerprint(), "command") for t in ("silent", "writer")}, clock.now()
    )
    silent = store.fire("silent", clock.now(), trigger="manual", overlap="allow").run_id
    writer = store.fire("writer", clock.now(), trigger="manual", overlap="allow").run_id

    async def scenario() -> None:
        runner = make_runner(store, clock, tmp_path, 2, config)
        assert len(runner.tick()) == 2
        done = [a.done.wait() for a in runner.active.values()]
        await asyncio.wait_for(asyncio.gather(*done), timeout=60)

    asyncio.run(scenario())
    rows = dict(store.conn.execute("SELECT id, status FROM runs").fetchall())
    assert rows == {silent: "succeeded", writer: "succeeded"}  # the dir existed for both
    assert not (tmp_path / "runs" / "silent" / str(silent)).exists()
    kept = tmp_path / "runs" / "writer" / str(writer)
    assert sorted(p.name for p in kept.iterdir()) == ["events.jsonl", "out", "run.json"]
    store.close()


def test_idle_tick_reads_the_queue_only_after_a_write(tmp_path: Path) -> None:
    """With nothing written since the last look, an idle tick runs one PRAGMA; a run
    queued by another connection (the CLI, API unreachable) is still claimed at once."""
    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        '  quick:\n    schedule: {manual: true}\n    command: {argv: ["true"]}\n'
    )
    clock = SystemClock()
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks({"quick": (config.tasks["quick"].fingerprint(), "command")}, clock.now())
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    cli = SqliteStore(tmp_path / "state.sqlite")  # a second connection, as the CLI has

    async def scenario() -> None:
        runner = make_runner(store, clock, tmp_path, 1, config)
        assert runner.tick() == []
        del statements[:]
        assert runner.tick() == []
        assert statements == ["PRAGMA data_version"]
        run_id = cli.fire("quick", clock.now(), trigger="manual").run_id
        assert runner.tick() == [run_id]
        await asyncio.wait_for(runner.active[run_id].done.wait(), timeout=60)

    asyncio.run(scenario())
    assert [r[0] for r in store.conn.execute("SELECT status FROM runs")] == ["succeeded"]
    cli.close()
    store.close()


def test_one_outcome_that_cannot_be_recorded_costs_only_its_own_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs ending together are recorded in one batch; if that fails, one by one, so the
    run whose row vanished is logged and the other still succeeds, with its run.json."""
    (tmp_path / "ends_at_once.py").write_text(
        "async def write(ctx):\n    (ctx.workspace / 'out').write_text('x')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  kept:\n    schedule: {manual: true}\n"
        '    python: {callable: "ends_at_once:write"}\n'
        "  vanished:\n    schedule: {manual: true}\n"
        '    python: {callable: "ends_at_once:write"}\n'
    )
    clock = SystemClock()
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (config.tasks[t].fingerprint(), "python") for t in ("kept", "vanished")}, clock.now()
    )
    kept = store.fire("kept", clock.now(), trigger="manual").run_id
    vanished = store.fire("vanished", clock.now(), trigger="manual").run_id

    async def scenario() -> None:
        runner = make_runner(store, clock, tmp_path, 2, config)
        assert len(runner.tick()) == 2
        with store.tx() as conn:  # both started; one's records disappear before it ends
            for table, column in (("attempts", "run_id"), ("events", "run_id"), ("runs", "id")):
                conn.execute(f"DELETE FROM {table} WHERE {column}=?", (vanished,))
        done = [a.done.wait() for a in runner.active.values()]
        await asyncio.wait_for(asyncio.gather(*done), timeout=60)

    with caplog.at_level(logging.WARNING, logger="agentd.runner"):
        asyncio.run(scenario())
    assert store.get_run(kept)["status"] == "succeeded"
    assert (tmp_path / "runs" / "kept" / kept / "run.json").exists()
    assert (
        store.conn.execute("SELECT COUNT(*) FROM runs WHERE id=?", (vanished,)).fetchone()[0] == 0
    )
    logged = caplog.text
    assert "recording 2 outcomes together failed" in logged  # they ended as one batch
    assert f"could not record outcome run={vanished} task=vanished" in logged
    store.close()


def test_a_run_left_running_that_the_runner_does_not_hold_is_recovered_after_its_lease(
    tmp_path: Path,
) -> None:
    """A run whose outcome went missing while the daemon runs (its commit failed, say)
    stays ``running`` in the DB: once its lease has expired the runner re-queues it, at
    no cost of an attempt, without a restart; a run it does hold is left alone however
    old its lease."""
    from datetime import UTC, datetime

    from agentd.clock import ManualClock

    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  lost:\n    schedule: {manual: true}\n"
        '    command: {argv: ["true"]}\n'
        "  held:\n    schedule: {manual: true}\n"
        '    command: {shell: "sleep 30"}\n'
    )
    clock = ManualClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks({t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, clock.now())
    lost = store.fire("lost", clock.now(), trigger="manual").run_id
    store.claim(clock.now(), "test", 30, 1, set(), set())  # claimed, then forgotten
    held = store.fire("held", clock.now(), trigger="manual").run_id

    async def scenario() -> None:
        runner = make_runner(store, clock, tmp_path, 4, config)  # type: ignore[arg-type]
        assert runner.tick() == [held]
        clock.advance(20)
        runner.tick()
        assert store.get_run(lost)["status"] == "running"  # its lease has not expired
        clock.advance(40)  # both leases in the DB are past now (no heartbeat was written)
        store.conn.execute("UPDATE runs SET lease_expires_at='2000-01-01T00:00:00Z'")
        runner.tick()
        assert store.get_run(held)["status"] == "running"
        run = store.get_run(lost)
        assert run["status"] in ("queued", "running") and run["failures"] == 0
        [event] = [e for e in store.events(lost) if e["kind"] == "recover"]
        assert event["data"]["previous_owner"] == "test"
        runner.cancel(held, "cancel")
        deadline = time.monotonic() + 30
        while runner.active:
            assert time.monotonic() < deadline, "runs did not finish"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    store.conn.close()


def test_the_lease_sweep_ends_a_lost_runs_process_group_before_it_re_queues_it(
    tmp_path: Path,
) -> None:
    """While the daemon runs, a run left ``running`` past its lease whose recorded
    process group still runs: the sweep ends the group (in a thread, not on the loop)
    and only then re-queues the run, with an ``orphan_killed`` event before ``recover``."""
    import subprocess
    from datetime import UTC, datetime

    from agentd import procs
    from agentd.clock import ManualClock

    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  lost:\n    schedule: {manual: true}\n"
        '    command: {argv: ["true"]}\n'
    )
    clock = ManualClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks({t: (c.fingerprint(), c.kind) for t, c in config.tasks.items()}, clock.now())
    lost = store.fire("lost", clock.now(), trigger="manual").run_id
    store.claim(clock.now(), "gone", 30, 1, set(), set())
    # The lost attempt's command, still running in its own session, recorded with it.
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        group = procs.record_group(orphan.pid)
        assert group is not None
        store.record_group(lost, 1, group)
        store.conn.execute("UPDATE runs SET lease_expires_at='2000-01-01T00:00:00Z'")

        async def scenario() -> None:
            runner = make_runner(store, clock, tmp_path, 4, config)  # type: ignore[arg-type]
            clock.advance(31)  # the sweep runs once a lease period
            runner.tick()
            deadline = time.monotonic() + 30
            while store.get_run(lost)["attempt"] < 2 and runner.active == {}:
                assert time.monotonic() < deadline, "the lost run was not recovered"
                await asyncio.sleep(0.02)
                runner.tick()
            while runner.active:
                assert time.monotonic() < deadline, "the recovered run did not finish"
                await asyncio.sleep(0.02)

        asyncio.run(scenario())
        assert orphan.wait(timeout=10) == -15  # SIGTERM was enough for sleep
        kinds = [e["kind"] for e in store.events(lost)]
        assert kinds.index("orphan_killed") < kinds.index("recover") < kinds.index("start")
        [killed] = [e for e in store.events(lost) if e["kind"] == "orphan_killed"]
        assert killed["data"]["pgid"] == orphan.pid
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        store.conn.close()


def test_a_runner_that_lost_a_lease_stops_its_copy_and_records_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node A runs a long command; its lease expires (A was stopped, or cut off) and
    node B, on the same state, recovers the run and claims it again. A's next heartbeat
    finds out: A kills its copy, says so in its log, and records nothing: the run stays
    B's, at B's attempt, with no outcome of A's in its history."""
    from datetime import UTC, datetime, timedelta

    from agentd.clock import ManualClock, to_iso

    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  long:\n    schedule: {manual: true}\n"
        '    command: {shell: "sleep 60"}\n'
    )
    clock = ManualClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    a_store = SqliteStore(tmp_path / "state.sqlite")
    a_store.sync_tasks({"long": (config.tasks["long"].fingerprint(), "command")}, clock.now())
    run_id = a_store.fire("long", clock.now(), trigger="manual").run_id
    b_store = SqliteStore(tmp_path / "state.sqlite")

    async def scenario() -> None:
        runner = Runner(
            a_store,
            clock,
            owner="node-a",
            state_dir=tmp_path,
            concurrency=1,
            lease_s=30,
            exec_env=ExecEnv(kill_grace_s=1, output_max_bytes=1000),
        )
        runner.set_tasks(config.tasks)
        assert runner.tick() == [run_id]
        active = runner.active[run_id]
        # A is stopped past its lease: by B's clock A's lease expired, and B takes the
        # run over; A, resumed, is a third of a lease on (its heartbeat is due, its own
        # lease sweep is not).
        clock.advance(11)
        later = clock.now() + timedelta(seconds=20)
        assert b_store.recover(later, "node-b", live_owners={"node-a", "node-b"}) == [run_id]
        [claimed] = b_store.claim(later, "node-b", 30, 1, set(), set())
        assert claimed["attempt"] == 2
        before = len(b_store.events(run_id))
        with caplog.at_level(logging.WARNING, logger="agentd.runner"):
            runner.tick()  # heartbeat due (lease/3 passed): the lease is gone
            assert run_id not in runner.active
            deadline = time.monotonic() + 30
            while not (active.job is not None and active.job.done()):
                assert time.monotonic() < deadline, "A's copy was not stopped"
                await asyncio.sleep(0.01)
            # The job's end has run its callbacks: had A handed an outcome over, it would
            # wait in the runner's flush (or its commit) now.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert active.stop_reason == "lease_lost"
            assert runner._finishing == [] and runner._committing is None
            assert runner.unrecorded == []
        assert "lease lost run=" + run_id in caplog.text
        run = b_store.get_run(run_id)
        assert run["status"] == "running" and run["lease_owner"] == "node-b"
        assert run["attempt"] == 2
        assert run["lease_expires_at"] == to_iso(later + timedelta(seconds=30))
        assert len(b_store.events(run_id)) == before
        assert [a["outcome"] for a in b_store.attempts(run_id)] == ["lost", None]

    asyncio.run(scenario())
    a_store.close()
    b_store.close()


def test_a_run_claimed_past_its_deadlines_ends_before_it_begins(tmp_path: Path) -> None:
    """Between two sweeps a run past its deadlines can be claimed: ``_run`` ends it before
    its executor begins: ``expired`` (start_within, first start) or ``timed_out``
    (run_timeout), at no cost of the command's side effects."""
    marker = tmp_path / "ran"
    command = f'    command: {{shell: "touch {marker}"}}\n'
    config = parse_config(
        f"daemon:\n  state_dir: {tmp_path}\ntasks:\n"
        "  late:\n    schedule: {manual: true}\n    start_within: 30s\n" + command
        + "  over:\n    schedule: {manual: true}\n    run_timeout: 50s\n" + command
    )  # fmt: skip
    clock = SystemClock()
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(
        {t: (config.tasks[t].fingerprint(), "command") for t in config.tasks}, clock.now()
    )
    enqueued = clock.now() - timedelta(seconds=100)  # fired long ago, not claimed since
    late = store.fire("late", enqueued, trigger="manual").run_id
    over = store.fire("over", enqueued, trigger="manual").run_id

    async def scenario() -> None:
        runner = make_runner(store, clock, tmp_path, 4, config)
        assert sorted(runner.tick()) == sorted([late, over])  # no sweep on the first tick
        deadline = time.monotonic() + 60
        while runner.active:
            assert time.monotonic() < deadline, "runs did not end"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    expired, timed_out = store.get_run(late), store.get_run(over)
    assert (expired["status"], expired["outcome"], expired["failures"]) == ("expired", "expired", 0)
    assert expired["error"] == "not started within start_within (30s)"
    assert timed_out["status"] == "timed_out"
    assert timed_out["error"] == "run_timeout (50s) passed before this attempt began"
    assert [e["kind"] for e in store.events(over)][-2:] == ["timeout", "run_timed_out"]
    assert not marker.exists()
    store.close()
