"""What only the PostgreSQL engine has to show (the port's contract is ``tests/contract``):
its schema created once by nodes that start together, the port's errors when the server
goes away under it (and its recovery after), change notices over LISTEN/NOTIFY, the
version counter, and claims that pass over runs another transaction holds."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from agentd.models import EventKind, Outcome, RunStatus, StateRefused
from agentd.state.port import Fire, StorageError, StorageFault, WriteLost
from agentd.state.postgres.engine import PostgresStore
from tests.harness import wait_for
from tests.pgcluster import PgCluster, running_cluster

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TASKS = {"a": ("fp1", "command"), "b": ("fp2", "command")}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[PostgresStore]]:
    """Stores a test opens on its database, closed at its end."""
    opened: list[PostgresStore] = []
    yield opened
    for store in reversed(opened):
        store.close()


def _open(stores: list[PostgresStore], url: str, **kwargs: object) -> PostgresStore:
    store = PostgresStore(url, **kwargs)  # type: ignore[arg-type]
    stores.append(store)
    return store


def test_nodes_opening_a_new_database_together_create_the_schema_once(
    pg_url: str, stores: list[PostgresStore], caplog: pytest.LogCaptureFixture
) -> None:
    """Three nodes start at once on an empty database: one creates the schema under the
    migration lock, the others wait for it and find it (without the lock, two CREATE
    TABLEs race: a unique violation in pg_type, or a duplicate table)."""
    caplog.set_level(logging.INFO, logger="agentd.state.postgres")
    n = 3
    start = threading.Barrier(n)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def node() -> None:
        try:
            start.wait()
            store = PostgresStore(pg_url)
            with lock:
                stores.append(store)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(stores) == n
    created = [r for r in caplog.records if "schema created" in r.getMessage()]
    assert len(created) == 1
    one, two, _ = stores
    one.sync_tasks(TASKS, T0)
    assert [t["id"] for t in two.task_rows()] == ["a", "b"]


def test_a_schema_newer_than_this_agentd_is_refused(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StateRefused) as refused:
        PostgresStore(pg_url)
    assert refused.value.code == "schema_too_new"


def _index_def(url: str, name: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname=%s", (name,)).fetchone()
    return "" if row is None else str(row[0])


def test_a_schema_of_version_1_is_upgraded_once_and_keeps_its_rows(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database made by an earlier agentd (schema 1: the claim's index without
    created_at, id; no agent_steps, which came with 3; no idx_runs_parked, 4; no
    runs.params, 5) is upgraded in place at open,
    under the migration lock; its runs stay; a second open finds nothing to do."""
    caplog.set_level(logging.INFO, "agentd.state.postgres")
    first = PostgresStore(pg_url)
    first.sync_tasks(TASKS, T0)
    run_id = first.fire("a", T0, scheduled_for=T0).run_id
    first.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP INDEX idx_runs_due")
        conn.execute(
            "CREATE INDEX idx_runs_due ON runs (not_before, scheduled_for) WHERE status = 'queued'"
        )
        conn.execute("DROP TABLE agent_steps")
        conn.execute("DROP INDEX idx_runs_parked")
        conn.execute("ALTER TABLE runs DROP COLUMN params")
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    upgraded = PostgresStore(pg_url)
    assert "created_at" in _index_def(pg_url, "idx_runs_due")
    assert "awaiting_approval" in _index_def(pg_url, "idx_runs_parked")
    assert upgraded.record_agent_step(run_id, 1, "model", None, {"content": "x"}, T0) == 1
    assert upgraded.get_run(run_id)["status"] == "queued"
    assert upgraded.get_run(run_id)["params"] is None
    assert [r["id"] for r in upgraded.claim(T0, "w", 30, 5, set(), set())] == [run_id]
    upgraded.close()
    PostgresStore(pg_url).close()
    lines = [r.getMessage() for r in caplog.records if "upgraded" in r.getMessage()]
    assert lines == ["state database schema upgraded from version 1 to 5"]


def test_a_claim_reads_only_its_rows_off_a_long_queue_of_equal_due_times(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """20,000 runs queued for one instant (a backlog, a burst) into a new database:
    each claim of 16 reads its rows off ``idx_runs_due`` and stops, prepared or not
    (psycopg prepares a statement on its fifth execution) and whatever the planner's
    statistics say, never a scan and sort of the whole queue."""
    filler = _open(stores, pg_url)
    filler.sync_tasks(TASKS, at(0))
    for _ in range(20):
        filler.fire_many([Fire("a", None, "manual", "allow", 10**6)] * 1000, at(1))
    # No ANALYZE: the statistics still say the table is about empty (a fresh database
    # filled at once), which made the planner sort the whole queue for every claim.
    # A backend reports its counters when it ends (or when idle for a while): the
    # filler's own reads are counted before the claims begin, never among them.
    filler.close()
    stores.remove(filler)
    store = _open(stores, pg_url)

    def read() -> int:
        """Rows of ``runs`` read so far: by scans, and through any index."""
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0)"
                " FROM pg_stat_user_tables WHERE relname = 'runs'"
            ).fetchone()
        assert row is not None
        return int(row[0])

    before = read()
    for _ in range(8):  # past psycopg's prepare threshold
        assert len(store.claim(at(5), "w", 30, 16, set(), {"a"})) == 16
    store.close()  # its backend reports its counters when it ends
    stores.remove(store)
    rows_read = read() - before
    # 128 claimed (each read, locked, updated): a few hundred rows, not 8 x 20,000.
    assert rows_read < 2_000, rows_read


def test_version_moves_at_another_stores_commit_not_before(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    daemon, cli = _open(stores, pg_url), _open(stores, pg_url)
    daemon.sync_tasks(TASKS, T0)
    v0 = daemon.version()
    unit = cli.unit()
    cli.pause("a", "maintenance", at(1))
    assert daemon.version() == v0  # written, not committed: a reader would see nothing
    unit.commit()
    v1 = daemon.version()
    assert v1 != v0
    assert daemon.paused_tasks() == {"a"}  # what moved it is visible
    aborted = cli.unit()
    cli.resume("a", at(2))
    aborted.abort()
    assert daemon.version() == v1


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PgCluster]:
    """A cluster of this module's own, to restart under open stores without disturbing
    the session's."""
    with running_cluster() as cluster:
        yield cluster


def test_a_server_restart_is_a_storage_fault_then_the_store_works_again(
    own_cluster: PgCluster,
) -> None:
    url = own_cluster.create_database("restart_outside")
    store = PostgresStore(url)
    health: list[BaseException | None] = []
    store.on_write = health.append
    try:
        store.sync_tasks(TASKS, T0)
        run_id = store.fire("a", at(0), scheduled_for=at(0)).run_id
        own_cluster.restart()
        with pytest.raises(StorageFault) as fault:
            store.pause("a", "x", at(1))
        assert isinstance(fault.value.__cause__, psycopg.OperationalError)
        assert store.write_error is not None
        assert isinstance(health[-1], StorageFault)
        # The next use connects again: the store works, and says so.
        assert store.pause("a", "x", at(2)) is True
        assert store.write_error is None and health[-1] is None
        assert store.get_run(run_id)["status"] == RunStatus.QUEUED
        own_cluster.restart()
        with pytest.raises(StorageFault):
            store.get_run(run_id)  # a read too: the port's error, never psycopg's
        assert store.get_run(run_id)["id"] == run_id
    finally:
        store.close()


def test_a_server_restart_inside_a_unit_loses_the_unit_and_says_so(
    own_cluster: PgCluster,
) -> None:
    url = own_cluster.create_database("restart_inside")
    store = PostgresStore(url)
    undone: list[str] = []
    try:
        store.sync_tasks(TASKS, T0)
        unit = store.unit()
        unit.on_rollback(lambda: undone.append("unit"))
        first = store.fire("a", at(0), scheduled_for=at(0)).run_id
        own_cluster.restart()
        with pytest.raises(StorageFault):
            store.fire("b", at(1), scheduled_for=at(1))
        with pytest.raises(WriteLost):  # nothing later in the unit may commit without it
            store.pause("b", "x", at(1))
        with pytest.raises(WriteLost):
            unit.commit()
        assert undone == ["unit"]
        # The unit is over; the store connects again and works.
        second = store.fire("b", at(2), scheduled_for=at(2)).run_id
        assert [r["id"] for r in store.list_runs()] == [second]
        with pytest.raises(StateRefused):
            store.get_run(first)
    finally:
        store.close()


def test_a_lock_held_too_long_is_a_storage_fault(pg_url: str, stores: list[PostgresStore]) -> None:
    """A unit holds the write lock; another node's write waits ``lock_timeout`` and
    fails with a StorageFault (SQLite's "database is locked"), then works once it is free."""
    holder = _open(stores, pg_url)
    waiter = _open(stores, pg_url, lock_timeout_ms=200)
    holder.sync_tasks(TASKS, T0)
    unit = holder.unit()
    holder.pause("a", "held", at(1))
    with pytest.raises(StorageFault) as fault:
        waiter.pause("b", "waits", at(1))
    assert isinstance(fault.value.__cause__, psycopg.errors.LockNotAvailable)
    unit.commit()
    assert waiter.pause("b", "waits", at(2)) is True


def test_a_driver_error_that_is_not_a_fault_is_a_storage_error(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    store = _open(stores, pg_url)
    store.sync_tasks(TASKS, T0)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE runs ADD CONSTRAINT no_b CHECK (task_id <> 'b')")
    with pytest.raises(StorageError) as error:
        store.fire("b", at(0), scheduled_for=at(0))
    assert not isinstance(error.value, StorageFault)
    assert isinstance(error.value.__cause__, psycopg.errors.CheckViolation)
    assert store.fire("a", at(0), scheduled_for=at(0)).created  # the store goes on


def test_another_stores_announce_wakes_watch_and_ones_own_does_not(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    daemon, cli = _open(stores, pg_url), _open(stores, pg_url)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        calls = 0

        def on_change() -> None:
            nonlocal calls
            calls += 1
            woken.set()

        assert daemon.watch(loop, on_change)
        listener = daemon._listen
        assert listener is not None

        async def heard(n: int) -> None:
            while listener.heard < n:
                await asyncio.sleep(0.01)  # polled, with a deadline (wait_for below)

        daemon.announce_change()  # its own: not a change by another
        await asyncio.wait_for(heard(1), 30)
        assert calls == 0
        unit = cli.unit()  # a unit open: the notice is not part of it (sent at once)
        cli.announce_change()
        await asyncio.wait_for(woken.wait(), 30)
        assert listener.heard == 2 and calls == 1
        unit.abort()
        daemon.unwatch()

    asyncio.run(scenario())


def test_watch_listens_again_once_the_server_is_back(own_cluster: PgCluster) -> None:
    """The server stops under a watching store: it tries again off the loop until the
    server is back, then says "look now" (notices may have been missed) and hears the
    next one."""
    url = own_cluster.create_database("relisten")
    daemon, cli = PostgresStore(url), PostgresStore(url)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        assert daemon.watch(loop, woken.set)
        listener = daemon._listen
        assert listener is not None

        async def until(predicate: Callable[[], bool]) -> None:
            while not predicate():
                await asyncio.sleep(0.01)  # polled, with a deadline (wait_for)

        await asyncio.to_thread(own_cluster.stop)
        await asyncio.wait_for(until(lambda: listener.failed >= 1), 30)
        await asyncio.to_thread(own_cluster._pg_ctl_start)
        await asyncio.wait_for(woken.wait(), 30)
        woken.clear()
        cli.announce_change()
        await asyncio.wait_for(woken.wait(), 30)
        daemon.unwatch()

    try:
        asyncio.run(scenario())
    finally:
        daemon.close()
        cli.close()


def test_claim_passes_over_a_run_another_transaction_holds(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """SKIP LOCKED: a queued run whose row another transaction has locked is not waited
    for (the claim would wait out the lock timeout) nor taken; the next one is."""
    store = _open(stores, pg_url, lock_timeout_ms=2000)
    store.sync_tasks(TASKS, T0)
    held = store.fire("a", at(0), scheduled_for=at(0)).run_id
    free = store.fire("b", at(1), scheduled_for=at(1)).run_id
    with psycopg.connect(pg_url) as other:  # a transaction, open until the block ends
        other.execute("SELECT id FROM runs WHERE id=%s FOR UPDATE", (held,))
        claimed = store.claim(at(2), "w1", 30, 5, set(), set())
        assert [r["id"] for r in claimed] == [free]
    assert [r["id"] for r in store.claim(at(3), "w1", 30, 5, set(), set())] == [held]


def test_two_stores_claiming_at_once_never_claim_the_same_run(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    first, second = _open(stores, pg_url), _open(stores, pg_url)
    first.sync_tasks(TASKS, T0)
    n = 60
    fired = {first.fire("a", at(i), scheduled_for=at(i), overlap="allow").run_id for i in range(n)}
    start = threading.Barrier(2)
    taken: dict[str, list[str]] = {"first": [], "second": []}
    errors: list[BaseException] = []

    def claimer(name: str, store: PostgresStore) -> None:
        try:
            start.wait()
            while True:
                rows = store.claim(at(n), name, 30, 3, set(), {"a"})
                if not rows:
                    return
                taken[name] += [r["id"] for r in rows]
                for r in rows:
                    store.finish(
                        r["id"], at(n), outcome=Outcome.SUCCESS, next_status=RunStatus.SUCCEEDED
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=claimer, args=("first", first)),
        threading.Thread(target=claimer, args=("second", second)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    both = taken["first"] + taken["second"]
    assert len(both) == len(set(both)) == n
    assert set(both) == fired
    assert wait_for(lambda: first.counts().get("succeeded") == n, what="all succeeded")
    claims = [e for e in first.events(limit=10_000) if e["kind"] == "claim"]
    assert len(claims) == n


def _done(store: PostgresStore, run: dict[str, object], owner: str, when: float) -> None:
    store.finish(
        str(run["id"]),
        at(when),
        outcome=Outcome.SUCCESS,
        next_status=RunStatus.SUCCEEDED,
        owner=owner,
        attempt=int(str(run["attempt"])),
    )


def test_claims_and_finishes_on_two_nodes_go_side_by_side(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """The runner's verbs (claim, start, heartbeat, finish) hold the write lock in
    shared mode: while one node's unit of finishes and claims is open, another node's
    claims, heartbeats and finishes go through without waiting for its commit (on one
    exclusive lock each waited, here past its 300 ms lock timeout)."""
    a, b = _open(stores, pg_url), _open(stores, pg_url, lock_timeout_ms=300)
    a.sync_tasks(TASKS, T0)
    fired = [a.fire("a", at(i), scheduled_for=at(i), overlap="allow").run_id for i in range(5)]
    [first] = a.claim(at(5), "A", 30, 1, set(), {"a"})
    unit = a.unit(shared=True)
    _done(a, dict(first), "A", 6)
    [second] = a.claim(at(6), "A", 30, 1, set(), {"a"})
    a.mark_started_many([(second["id"], "a", "/ws")], at(6))
    got = b.claim(at(6), "B", 30, 2, set(), {"a"})
    b.mark_started_many([(r["id"], "a", "/ws") for r in got], at(6))
    assert b.heartbeat([r["id"] for r in got], "B", at(7), 30) == set()
    _done(b, dict(got[0]), "B", 8)
    unit.commit()
    taken = [first["id"], second["id"], *(r["id"] for r in got)]
    assert len(set(taken)) == 4 and set(taken) <= set(fired)
    assert b.get_run(first["id"])["status"] == "succeeded"
    assert a.get_run(got[0]["id"])["status"] == "succeeded"


def test_a_verb_that_decides_on_what_it_reads_waits_for_the_shared_holders(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """A verb whose reads decide its writes (here pause) holds the write lock
    exclusively: it waits while a claim's unit is open elsewhere (timing out after its
    300 ms), and a claim waits while it holds the lock; each goes once the other is
    done."""
    a, b = _open(stores, pg_url, lock_timeout_ms=300), _open(stores, pg_url, lock_timeout_ms=300)
    a.sync_tasks(TASKS, T0)
    a.fire("a", at(0), scheduled_for=at(0), overlap="allow")
    a.fire("a", at(1), scheduled_for=at(1), overlap="allow")
    unit = a.unit(shared=True)
    assert len(a.claim(at(2), "A", 30, 1, set(), {"a"})) == 1
    with pytest.raises(StorageFault) as fault:
        b.pause("b", "waits", at(2))
    assert isinstance(fault.value.__cause__, psycopg.errors.LockNotAvailable)
    unit.commit()
    paused = b.unit()
    assert b.pause("b", "holds", at(3)) is True
    with pytest.raises(StorageFault):
        a.claim(at(3), "A", 30, 1, set(), {"a"})
    paused.commit()
    assert len(a.claim(at(4), "A", 30, 1, set(), {"a"})) == 1


def test_a_units_reads_are_under_the_lock_unless_it_is_shared(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """A unit that is not shared (the alert pass: read the cursor, decide, move it)
    holds the write lock exclusively from its start, before its first write: no writer
    commits between its reads and its writes (a shared writer waits out its 300 ms). A
    shared unit (the runner's) takes nothing until its first write."""
    a, b = _open(stores, pg_url), _open(stores, pg_url, lock_timeout_ms=300)
    a.sync_tasks(TASKS, T0)
    unit = a.unit()
    top = a.latest_event_id()
    with pytest.raises(StorageFault):
        b.emit(at(1), EventKind.MISFIRE, "b", count=1, reason="beside")
    assert a.latest_event_id() == top
    unit.commit()
    shared = a.unit(shared=True)
    b.emit(at(2), EventKind.MISFIRE, "b", count=1, reason="beside")
    assert a.latest_event_id() > top
    shared.commit()


def test_a_task_that_may_not_overlap_starts_once_across_claims_side_by_side(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """Two queued runs of a task that may not overlap, two nodes claiming at once: the
    first claim takes one under the task's lock; the second, while that claim is not
    committed yet (its run still looks queued to others), takes none; nor once it is
    committed (the task is running); and the other run once the first has ended."""
    a, b = _open(stores, pg_url), _open(stores, pg_url)
    a.sync_tasks(TASKS, T0)
    ids = {a.fire("b", at(i), scheduled_for=at(i), overlap="allow").run_id for i in range(2)}
    unit = a.unit(shared=True)
    [run] = a.claim(at(5), "A", 30, 1, set(), set())  # the other run's row stays unlocked
    assert b.claim(at(5), "B", 30, 5, set(), set()) == []
    unit.commit()
    assert b.claim(at(6), "B", 30, 5, set(), set()) == []
    _done(a, dict(run), "A", 7)
    [other] = b.claim(at(8), "B", 30, 5, set(), set())
    assert {run["id"], other["id"]} == ids


def test_event_ids_follow_commit_order_when_writers_overlap(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """Two writers side by side: the one that began first but commits last gets the
    higher event ids, so a reader that paged up to the first commit's events then finds
    the second's after them, none skipped (the event feed and the alert outbox page by
    id)."""
    a, b = _open(stores, pg_url), _open(stores, pg_url)
    a.sync_tasks(TASKS, T0)
    a.fire("a", at(0), scheduled_for=at(0), overlap="allow")
    unit = a.unit(shared=True)
    [run] = a.claim(at(1), "A", 30, 1, set(), {"a"})
    b.emit(at(2), EventKind.MISFIRE, "b", count=1, reason="beside")
    seen = b.latest_event_id()
    [misfire] = [e for e in b.events(after_id=0, limit=100) if e["kind"] == "misfire"]
    assert misfire["id"] == seen
    unit.commit()
    later = b.events(after_id=seen, limit=100)
    assert [(e["kind"], e["run_id"]) for e in later] == [("claim", run["id"])]


def test_a_read_only_server_is_a_storage_fault(pg_url: str, stores: list[PostgresStore]) -> None:
    """A server that takes no writes (a standby after a failover, a database set read
    only) is a fault of the storage, as SQLite's read-only file is: readiness goes off."""
    store = _open(stores, pg_url)
    store.sync_tasks(TASKS, T0)
    base, db = pg_url.rsplit("/", 1)

    def reconnect_with(setting: str) -> None:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = {setting}')
            admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
        with pytest.raises(StorageFault):  # the connection cut under it
            store.paused_tasks()

    reconnect_with("on")
    with pytest.raises(StorageFault) as fault:
        store.pause("a", "x", at(1))
    assert isinstance(fault.value.__cause__, psycopg.errors.ReadOnlySqlTransaction)
    assert store.write_error is not None
    reconnect_with("off")
    assert store.pause("a", "x", at(2)) is True
    assert store.write_error is None


def test_opening_speaks_the_port_too(pg_url: str) -> None:
    """The constructor's errors are the port's: no server is a StorageFault; a role that
    may not create the schema, a StorageError (a permission, not a fault)."""
    base, db = pg_url.rsplit("/", 1)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "visitor_{db}" LOGIN')  # roles are the cluster's
        admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    with pytest.raises(StorageError) as denied:
        PostgresStore(pg_url.replace("agentd@", f"visitor_{db}@"))
    assert isinstance(denied.value.__cause__, psycopg.errors.InsufficientPrivilege)
    host = base.rsplit("@", 1)[1].split(":")[0]
    with pytest.raises(StorageFault):
        PostgresStore(f"postgresql://agentd@{host}:1/{db}", connect_timeout_s=2)


def test_text_orders_bytewise_whatever_the_databases_collation(pg_cluster: PgCluster) -> None:
    """On a database whose default collation is a language's (ICU ``en-US``: ``a`` before
    ``B``, punctuation nearly ignored), ids still order as SQLite orders them, bytewise:
    the schema's text is ``COLLATE "C"``, so the primary key's index serves the order."""
    name = "icu_en_us"
    pg_cluster.psql(
        f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        " LOCALE 'C.UTF-8'"
    )
    store = PostgresStore(pg_cluster.url(name))
    try:
        ids = ["B", "a", "a-b", "ab", "_x", "Z9"]
        store.sync_tasks({t: ("fp", "command") for t in ids}, T0)
        assert [t["id"] for t in store.task_rows()] == sorted(ids)
        assert [t["id"] for t in store.task_rows(["ab", "a-b", "B"])] == ["B", "a-b", "ab"]
        fired = [store.fire(t, at(0), scheduled_for=at(0)).run_id for t in ids]
        first = store.list_runs(limit=3)
        assert [r["id"] for r in first] == sorted(fired, reverse=True)[:3]
        rest = store.list_runs(limit=10, before_id=first[-1]["id"])
        assert [r["id"] for r in first + rest] == sorted(fired, reverse=True)
    finally:
        store.close()


def test_a_verb_inside_the_plumbings_tx_commits_with_it(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """What the statement mixins do: a verb (``emit``, ``pause``) called inside their own
    ``tx()`` is part of it, never a commit of its own: when the outer transaction fails,
    nothing of it stays, and nothing was published."""
    seen: list[dict[str, object]] = []
    store = _open(stores, pg_url, event_sink=seen.append)
    other = _open(stores, pg_url)
    store.sync_tasks(TASKS, T0)
    seen.clear()
    with pytest.raises(RuntimeError), store.tx():
        store.pause("a", "inner", at(1))
        store.emit(at(1), EventKind.MISFIRE, "a", count=1, reason="inner")
        assert other.paused_tasks() == set()  # not committed by the inner verbs
        raise RuntimeError("the outer part fails")
    assert store.paused_tasks() == set() and other.paused_tasks() == set()
    assert seen == []
    with store.tx():
        store.pause("a", "inner", at(2))
    assert other.paused_tasks() == {"a"}
    assert [e["kind"] for e in seen] == ["pause"]


def test_a_closed_store_stays_closed(pg_url: str) -> None:
    """Closed is not lost: no verb connects again behind the caller's back."""
    store = PostgresStore(pg_url)
    store.sync_tasks(TASKS, T0)
    store.close()
    with pytest.raises(StorageError):
        store.task_rows()
    store.close()  # twice is harmless


HOT_TABLES = ("runs", "attempts", "events", "tasks")


def _seq_scans(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(HOT_TABLES),),
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def test_the_hot_path_uses_indexes_on_a_large_history(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """With 50,000 finished runs and 150,000 events, no verb a running daemon calls on
    every tick or run (fire, claim, start, heartbeat, finish, the idle checks, the reads
    of one run) scans a large table: each uses an index. Checked through the server's
    own counters (``pg_stat_user_tables.seq_scan``), whatever SQL the engine sends."""
    store = _open(stores, pg_url)
    store.sync_tasks(TASKS, at(0))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO runs(id, task_id, trigger, scheduled_for, idempotency_key, status,"
            " attempt, failures, created_at, finished_at, outcome)"
            " SELECT 'old-' || lpad(i::text, 8, '0'), 'a', 'schedule', '2026-01-01T00:00:00Z',"
            " 'a@old' || i, 'succeeded', 1, 0, '2026-01-01T00:00:00Z', '2026-01-01T00:00:01Z',"
            " 'success' FROM generate_series(1, 50000) AS i"
        )
        conn.execute(
            "INSERT INTO attempts(run_id, attempt, worker, started_at, finished_at, outcome)"
            " SELECT 'old-' || lpad(i::text, 8, '0'), 1, 'w', '2026-01-01T00:00:00Z',"
            " '2026-01-01T00:00:01Z', 'success' FROM generate_series(1, 50000) AS i"
        )
        conn.execute(
            "INSERT INTO events(ts, kind, task_id, run_id, data) SELECT"
            " '2026-01-01T00:00:00Z', 'success', 'a', 'old-' || lpad((i % 50000)::text, 8, '0'),"
            " '{}' FROM generate_series(1, 150000) AS i"
        )
        conn.execute("ANALYZE")
    fired = store.fire("b", at(1), trigger="manual", overlap="allow")  # warm the plans
    before = _seq_scans(pg_url)
    for i in range(3):
        result = store.fire("a", at(10 + i), scheduled_for=at(10 + i), overlap="allow")
        store.version()
        store.first_queued_at()
        [claimed] = store.claim(at(11 + i), "node", 30, 1, set(), set())
        store.mark_started_many([(claimed["id"], claimed["task_id"], "/w")], at(11 + i))
        store.heartbeat([claimed["id"]], "node", at(12 + i), 30)
        store.cancel_requests("node")
        store.get_run(result.run_id)
        store.events(result.run_id)
        store.finish(
            claimed["id"], at(13 + i), outcome=Outcome.SUCCESS,
            next_status=RunStatus.SUCCEEDED, owner="node", attempt=claimed["attempt"],
        )  # fmt: skip
    store.close()
    stores.remove(store)
    after = _seq_scans(pg_url)
    assert fired.created
    scanned = {t: after[t] - before[t] for t in ("runs", "attempts", "events")}
    assert scanned == {"runs": 0, "attempts": 0, "events": 0}, scanned
