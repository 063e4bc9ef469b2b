"""The SQLite engine under faults, on real SQLite files: a continuous writer, a full
disk, colliding run ids. (The runs of a task that is gone are the contract suite's:
tests/contract/test_tasks.py.)"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from smallfs import SmallFs, small_fs

from agentd.clock import to_iso
from agentd.state.port import Fire, RunIds, StorageFault, WriteLost
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TASKS = {"a": ("fp1", "command"), "b": ("fp2", "command")}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _wal_size(path: Path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------- the WAL stays bounded


def test_the_wal_stays_bounded_under_a_writer_that_never_pauses(tmp_path: Path) -> None:
    """A PASSIVE checkpoint never catches up with a writer that commits back to back, so
    the WAL is never reset and grows with every commit; past its limit the checkpoint
    thread truncates it."""
    limit = 256 * 1024
    store = SqliteStore(tmp_path / "state.sqlite", wal_limit_bytes=limit)
    store.sync_tasks(TASKS, T0)
    payload = "x" * 2000
    sizes: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sizes.append(_wal_size(store.path))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    written = 0
    try:
        deadline = time.monotonic() + 4.0
        i = 0
        while time.monotonic() < deadline:
            # Each commit appends a few pages (a run, its event, a 2 KB checkpoint).
            [result] = store.fire_many([Fire("a", at(i), overlap="allow")], at(i))
            store.save_checkpoint(result.run_id, {"blob": payload}, at(i))
            written += 2
            i += 1
    finally:
        stop.set()
        sampler.join()
    store.close()
    assert written > 200, "the writer did not get going"
    # Bounded: the limit plus what the writer adds while a checkpoint waits for its
    # turn, which on a loaded 2-core machine is several limits' worth (1 MiB seen with a
    # second suite running). Unbounded, the same 4 s grew it to ~44 MB.
    assert max(sizes) < 16 * limit, (max(sizes), limit, written)
    assert sorted(sizes)[len(sizes) // 2] < 4 * limit, "the WAL is not reset as it should"


# ---------------------------------------------------------------- run ids


def test_run_ids_sort_by_time_and_carry_80_random_bits() -> None:
    ids = RunIds()
    first = ids(at(0))
    assert re.fullmatch(r"20260301T120000-[0-9a-f]{20}", first), first
    same_second = [ids(at(0.5)) for _ in range(1000)]
    # One generator: strictly increasing within a second, whatever the random draw.
    assert same_second == sorted(same_second) and len(set(same_second)) == 1000
    assert first < same_second[0]
    later = ids(at(1))
    assert later > same_second[-1]
    # The random parts of two generators' first ids differ (80 bits: a collision here
    # would be a broken generator, not bad luck).
    assert RunIds()(at(0))[-20:] != RunIds()(at(0))[-20:]


def test_a_run_id_that_is_taken_is_drawn_again_and_no_fire_of_the_batch_is_lost(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "state.sqlite")
    store.sync_tasks(TASKS, T0)
    [taken] = store.fire_many([Fire("a", at(0))], at(0))
    fresh = RunIds()
    # The next ids are the one already taken, twice (once within the batch), then fresh.
    queue = [taken.run_id, taken.run_id]

    def colliding(now: datetime) -> str:
        return queue.pop(0) if queue else fresh(now)

    store.new_run_id = colliding
    fires = [Fire("a", at(10), overlap="allow"), Fire("b", at(10)), Fire("a", at(11))]
    results = store.fire_many(fires, at(12))
    assert all(r.created for r in results)
    ids = [r.run_id for r in results]
    assert len(set(ids)) == 3 and taken.run_id not in ids
    assert store.get_run(taken.run_id)["scheduled_for"] == to_iso(at(0))
    for fire, result in zip(fires, results, strict=True):
        assert fire.scheduled_for is not None
        assert store.get_run(result.run_id)["scheduled_for"] == to_iso(fire.scheduled_for)
    store.close()


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[SmallFs]:
    with small_fs(tmp_path / "fs", "4m") as fs:
        yield fs


def _filled_store(fs: SmallFs) -> tuple[SqliteStore, list[BaseException | None]]:
    store = SqliteStore(fs.root / "state.sqlite")
    store.sync_tasks(TASKS, T0)
    heard: list[BaseException | None] = []
    store.on_write = heard.append
    fs.fill()
    return store, heard


def _fill_until_a_write_fails(store: SqliteStore, start: int) -> int:
    """Write runs until the disk refuses one; the seconds used."""
    for i in range(start, start + 100_000):
        try:
            store.fire_many([Fire("a", at(i), overlap="allow")], at(i))
        except StorageFault:
            return i
    raise AssertionError("the disk never filled")


def test_a_failed_write_is_reported_once_and_the_next_commit_clears_it(
    full_disk: SmallFs,
) -> None:
    store, heard = _filled_store(full_disk)
    i = _fill_until_a_write_fails(store, 0)
    assert store.write_error is not None and "full" in store.write_error
    assert len(heard) == 1 and isinstance(heard[0], StorageFault)
    with pytest.raises(StorageFault):
        store.fire_many([Fire("a", at(i + 1), overlap="allow")], at(i + 1))
    assert len(heard) == 1  # the same cause again: no second report, no second log line
    full_disk.free()
    store.fire_many([Fire("a", at(i + 2), overlap="allow")], at(i + 2))
    assert store.write_error is None and heard[-1] is None
    store.close()


def test_a_group_whose_transaction_the_disk_ended_commits_nothing_of_itself(
    full_disk: SmallFs,
) -> None:
    store, _ = _filled_store(full_disk)
    i = _fill_until_a_write_fails(store, 0)
    full_disk.free()
    before = store.counts()
    # A group in which one write fails for a full disk: SQLite may end the whole
    # transaction; then nothing of the group commits, not even the parts after it.
    undone: list[str] = []
    store_unit = store.unit()
    store_unit.on_rollback(lambda: undone.append("claims"))
    [run] = store.fire_many([Fire("a", at(i + 1), overlap="allow")], at(i + 1))
    full_disk.fill()
    failed = None
    for j in range(i + 2, i + 100_000):
        try:
            store.save_checkpoint(run.run_id, {"blob": "x" * 50_000, "j": j}, at(j))
        except StorageFault as exc:
            failed = exc
            break
    assert failed is not None
    # Here SQLite ended the whole transaction (had it undone only the statement, the
    # savepoint would have, and the group would go on): every later write in the group
    # fails, so that none of it can commit without the part that was lost.
    assert not store.conn.in_transaction
    with pytest.raises(WriteLost):
        store.fire_many([Fire("b", at(j), overlap="allow")], at(j))
    full_disk.free()
    with pytest.raises(WriteLost):
        store_unit.commit()
    assert undone == ["claims"]
    assert store.counts() == before
    assert not store._group_open and not store.conn.in_transaction
    store.close()
