"""A real daemon on PostgreSQL (``state: {url: ...}``): it starts, runs tasks, answers
its API and CLI, stops and starts again on the same database; a wrong password or an
unreachable server is a clear refusal that never shows the password."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from harness import Agentd, wait_for
from pgcluster import PgCluster

from agentd import exitcodes
from agentd.clock import from_iso, to_iso

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from fake_llm import ThreadedFakeLLM

pytestmark = pytest.mark.e2e

TASKS = """
tick:
  schedule: {every: 1s}
  command: {argv: ["true"]}
once:
  schedule: {manual: true}
  command: {argv: ["true"]}
"""


def node_on(root: Path, tasks: str, url: str, daemon: str = "", top: str = "") -> Agentd:
    """A daemon of its own (state dir, port, log) on the shared database."""
    root.mkdir()
    return Agentd(root, tasks, daemon, f"state: {{url: '{url}'}}\n{textwrap.dedent(top)}")


@contextlib.contextmanager
def running_nodes(
    root: Path,
    url: str,
    *tasks: str,
    daemon: str = "",
    top: str = "",
    env: dict[str, str] | None = None,
) -> Iterator[list[Agentd]]:
    """One started daemon per ``tasks`` entry on the shared database (``daemon`` and
    ``top`` config sections and ``env`` the same for each); any still running at the
    end (a failed test) is killed."""
    nodes = [node_on(root / f"node{i}", t, url, daemon, top) for i, t in enumerate(tasks)]
    try:
        for node in nodes:
            node.start(env=env)
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.kill9()


def node_of(nodes: list[Agentd], owner: str) -> Agentd:
    """The node whose process holds leases as ``owner`` (``host:pid``)."""
    [node] = [n for n in nodes if n.proc is not None and owner.endswith(f":{n.proc.pid}")]
    return node


def _runs(url: str, task: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                "SELECT id, status FROM runs WHERE task_id=%s ORDER BY id", (task,)
            )
        ]


def _manual(*names: str) -> str:
    """Tasks that run `true` when triggered, one per name."""
    return "".join(
        f'\n{name}:\n  schedule: {{manual: true}}\n  command: {{argv: ["true"]}}\n'
        for name in names
    )


def test_a_daemon_runs_on_postgresql_and_starts_again_on_the_same_database(
    make_daemon: Callable[..., Agentd], pg_url: str
) -> None:
    d = make_daemon(TASKS, top=f"state: {{url: '{pg_url}'}}").start()
    assert "state: PostgreSQL at 127.0.0.1:" in d.log()
    wait_for(
        lambda: sum(s == "succeeded" for _, s in _runs(pg_url, "tick")) >= 2,
        what="two interval runs recorded in PostgreSQL",
    )
    run_id = d.trigger("once")
    wait_for(
        lambda: (run_id, "succeeded") in _runs(pg_url, "once"), what="the manual run to succeed"
    )
    assert not (d.state_dir / "state.sqlite").exists()  # the state is in PostgreSQL
    [node] = json.loads(d.cli("nodes", "--json").stdout)
    assert node["alive"] is True
    assert d.stop() == 0
    before = len(_runs(pg_url, "tick"))
    d.start()
    wait_for(lambda: len(_runs(pg_url, "tick")) > before, what="runs after the restart")
    statuses = [s for _, s in _runs(pg_url, "once")]
    assert statuses == ["succeeded"]  # the finished run is not run again
    assert d.stop() == 0
    # With no daemon answering, the CLI reads the shared state itself.
    nodes = json.loads(d.cli("nodes", "--json").stdout)
    assert len(nodes) == 2 and all(n["stopped_at"] for n in nodes)
    out = d.cli("runs", "--task", "once", "--json").stdout
    assert [r["status"] for r in json.loads(out)] == ["succeeded"]


def test_a_wrong_password_or_a_dead_server_is_a_clear_refusal(
    make_daemon: Callable[..., Agentd], pg_cluster: PgCluster, pg_url: str
) -> None:
    pg_cluster.psql("CREATE ROLE strict LOGIN PASSWORD 'right-one'")
    strict = pg_url.replace("agentd@", "strict@")
    # The cluster trusts every local connection; a dead port stands in for a refusal.
    dead = strict.replace(f":{pg_cluster.port}/", ":9/")
    d = make_daemon(
        TASKS,
        top=f"state: {{url: '{dead}', password_env: AGENTD_DB_PASSWORD}}",
    )
    d.start(wait_ready=False, env={"AGENTD_DB_PASSWORD": "s3cret-value"})
    wait_for(d.proc_exited, what="the daemon to refuse", timeout=60)
    assert d.proc is not None and d.proc.returncode == exitcodes.STATE_UNUSABLE
    log = d.log()
    assert "state: PostgreSQL at 127.0.0.1:9/" in log and "cannot be used" in log
    assert "s3cret-value" not in log and "Traceback" not in log


def _occurrences(url: str) -> list[tuple[str, str, int, str]]:
    """(task, scheduled_for, runs made for it, the node of its first attempt)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT r.task_id, r.scheduled_for, count(DISTINCT r.id),"
            " min(a.worker) FROM runs r LEFT JOIN attempts a ON a.run_id = r.id"
            " WHERE r.trigger IN ('schedule', 'catchup') GROUP BY r.task_id, r.scheduled_for"
        ).fetchall()
    return [(str(t), str(s), int(n), str(w)) for t, s, n, w in rows]


def test_three_nodes_on_one_database_make_one_run_per_occurrence(
    tmp_path: Path, pg_url: str
) -> None:
    """Every node's scheduler fires every occurrence; the state makes one run of each
    (its idempotency key), whichever nodes fire it, and the nodes share the work. A
    ``skip`` task that outlasts its interval never runs twice at once across nodes."""
    tasks = """
    quick:
      schedule: {every: 1s}
      command: {argv: ["true"]}
    slow:
      schedule: {every: 1s}
      overlap: skip
      command: {argv: ["sleep", "1.5"]}
    """
    with running_nodes(tmp_path, pg_url, tasks, tasks, tasks) as nodes:
        wait_for(
            lambda: sum(t == "quick" for t, _, _, _ in _occurrences(pg_url)) >= 8,
            what="eight occurrences of the quick task",
            timeout=60,
        )
        for node in nodes:
            assert node.stop() == 0
    occurrences = _occurrences(pg_url)
    assert occurrences and all(n == 1 for _, _, n, _ in occurrences), occurrences
    workers = {w for t, _, _, w in occurrences if t == "quick" and w != "None"}
    assert len(workers) >= 2, workers  # shared: not one node doing everything
    with psycopg.connect(pg_url) as conn:
        spans = conn.execute(
            "SELECT a.started_at, a.finished_at FROM attempts a JOIN runs r ON r.id=a.run_id"
            " WHERE r.task_id='slow' AND a.finished_at IS NOT NULL ORDER BY a.started_at"
        ).fetchall()
    assert spans
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, spans  # overlap: skip held across the nodes


def test_a_node_killed_mid_run_has_its_run_recovered_by_another_node(
    tmp_path: Path, pg_url: str
) -> None:
    """``kill -9`` of the node running a run: another node, once the dead node is not
    seen for a lease, re-queues the run without spending a retry and runs it; the run
    succeeds once, and its attempts say which node ran what."""
    tasks = """
    work:
      schedule: {manual: true}
      retry: {max_attempts: 1}
      command: {argv: ["sleep", "2"]}
    """
    with running_nodes(tmp_path, pg_url, tasks, tasks, tasks) as nodes:
        run_id = nodes[0].trigger("work")

        def holder() -> str | None:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT lease_owner FROM runs WHERE id=%s AND status='running'", (run_id,)
                ).fetchone()
            return None if row is None else str(row[0])

        wait_for(lambda: holder() is not None, what="the run to be claimed")
        owner = holder()
        assert owner is not None
        victim = node_of(nodes, owner)
        victim.kill9()

        def outcome() -> tuple[str, int, int] | None:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT status, failures, attempt FROM runs WHERE id=%s", (run_id,)
                ).fetchone()
            return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

        wait_for(lambda: (outcome() or ("",))[0] == "succeeded", what="recovery", timeout=60)
        status, failures, attempt = outcome() or ("", -1, -1)
        assert (status, failures, attempt) == ("succeeded", 0, 2)
        with psycopg.connect(pg_url) as conn:
            attempts = conn.execute(
                "SELECT attempt, worker, outcome FROM attempts WHERE run_id=%s ORDER BY attempt",
                (run_id,),
            ).fetchall()
            recover = conn.execute(
                "SELECT data FROM events WHERE run_id=%s AND kind='recover'", (run_id,)
            ).fetchall()
        assert [(a, o) for a, _, o in attempts] == [(1, "lost"), (2, "success")]
        assert attempts[0][1] == owner and attempts[1][1] != owner
        [(data,)] = recover
        assert json.loads(data)["previous_owner"] == owner
        for node in nodes:
            if node is not victim:
                assert node.stop() == 0


def test_a_node_stopped_past_its_lease_records_nothing_for_the_run_it_lost(
    tmp_path: Path, pg_url: str
) -> None:
    """SIGSTOP the node running a run until another node has taken the run over, then
    SIGCONT it: the old holder finds its lease gone, stops its copy, records nothing,
    and says so; the run's outcome is the new holder's."""
    tasks = """
    work:
      schedule: {manual: true}
      command: {argv: ["sleep", "4"]}
    """
    with running_nodes(tmp_path, pg_url, tasks, tasks) as nodes:
        run_id = nodes[0].trigger("work")

        def run() -> tuple[str, str | None, int]:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT status, lease_owner, attempt FROM runs WHERE id=%s", (run_id,)
                ).fetchone()
            assert row is not None
            return str(row[0]), row[1], int(row[2])

        wait_for(lambda: run()[0] == "running", what="the run to be claimed")
        owner = run()[1]
        assert owner is not None
        victim = node_of(nodes, owner)
        victim.signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: run()[2] == 2 and run()[1] not in (None, owner),
                what="another node to take the run over",
                timeout=60,
            )
        finally:
            victim.signal(signal.SIGCONT)
        victim.wait_log("lease lost", "the old holder to say it lost the lease")
        wait_for(lambda: run()[0] == "succeeded", what="the new holder's outcome", timeout=60)
        log = victim.log()
        assert "lease lost" in log and run_id in log
        with psycopg.connect(pg_url) as conn:
            attempts = conn.execute(
                "SELECT attempt, worker, outcome FROM attempts WHERE run_id=%s ORDER BY attempt",
                (run_id,),
            ).fetchall()
            finishes = conn.execute(
                "SELECT count(*) FROM events WHERE run_id=%s AND kind IN"
                " ('success', 'failure', 'cancel', 'interrupt')",
                (run_id,),
            ).fetchone()
        assert [(a, o) for a, _, o in attempts] == [(1, "lost"), (2, "success")]
        assert attempts[1][1] != owner
        assert finishes == (1,)  # the new holder's success, nothing of the old holder's
        for node in nodes:
            assert node.stop() == 0


def test_a_run_is_cancelled_through_any_node_within_a_second(tmp_path: Path, pg_url: str) -> None:
    """``agentd cancel`` sent to a node that does not hold the run: the holder stops it
    within a second (the request is in the shared state, and the holder is told by
    NOTIFY), and the run ends cancelled."""
    tasks = """
    work:
      schedule: {manual: true}
      command: {argv: ["sleep", "60"]}
    """
    with running_nodes(tmp_path, pg_url, tasks, tasks) as nodes:
        run_id = nodes[0].trigger("work")

        def status_and_owner() -> tuple[str, str | None]:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT status, lease_owner FROM runs WHERE id=%s", (run_id,)
                ).fetchone()
            assert row is not None
            return str(row[0]), row[1]

        wait_for(lambda: status_and_owner()[0] == "running", what="the run to start")
        owner = status_and_owner()[1]
        assert owner is not None
        holder = node_of(nodes, owner)
        [other] = [n for n in nodes if n is not holder]
        started = time.monotonic()
        other.cli("cancel", run_id)
        wait_for(lambda: status_and_owner()[0] == "cancelled", what="the cancel", timeout=30)
        assert time.monotonic() - started < 3.0  # "within a second", with margin for load
        # The API's write was announced: the holder heard of it (and did not only poll).
        wait_for(lambda: "change notice: another node" in holder.log(), what="the notice")
        for node in nodes:
            assert node.stop() == 0


def test_postgresql_restarted_under_a_running_daemon_is_survived(
    make_daemon: Callable[..., Agentd], pg_cluster: PgCluster, pg_url: str
) -> None:
    """The server stops under load: the daemon stays alive (``/healthz`` 200), is not
    ready (``/readyz`` 503) while the state cannot be written, and comes back by itself
    when the server does; every occurrence is still one run, and none is left running."""
    d = make_daemon(TASKS, top=f"state: {{url: '{pg_url}'}}").start()

    def status(path: str) -> int | None:
        try:
            return httpx.get(d.url + path, timeout=5).status_code
        except httpx.TransportError:
            return None

    wait_for(lambda: len(_runs(pg_url, "tick")) >= 2, what="runs before the outage")
    pg_cluster.stop()
    try:
        wait_for(lambda: status("/readyz") == 503, what="readiness off while it is down")
        assert status("/healthz") == 200
    finally:
        pg_cluster.start_again()
    wait_for(lambda: status("/readyz") == 200, what="readiness back by itself", timeout=60)
    before = len(_runs(pg_url, "tick"))
    wait_for(lambda: len(_runs(pg_url, "tick")) >= before + 2, what="runs after the outage")
    assert d.stop() == 0
    with psycopg.connect(pg_url) as conn:
        doubled = conn.execute(
            "SELECT scheduled_for FROM runs WHERE task_id='tick' GROUP BY scheduled_for"
            " HAVING count(*) > 1"
        ).fetchall()
        running = conn.execute("SELECT id FROM runs WHERE status='running'").fetchall()
    assert doubled == [] and running == []


def test_a_node_whose_tasks_differ_from_the_others_is_shown(tmp_path: Path, pg_url: str) -> None:
    """A config rolled out to one node of three: ``agentd nodes`` marks that node's
    config as differing (its task definitions' digest is not most live nodes')."""
    same = """
    job:
      schedule: {manual: true}
      command: {argv: ["true"]}
    """
    changed = """
    job:
      schedule: {manual: true}
      command: {argv: ["echo", "new"]}
    """
    with running_nodes(tmp_path, pg_url, same, same, changed) as nodes:
        listed = {n["pid"]: n for n in json.loads(nodes[0].cli("nodes", "--json").stdout)}
        pids = [n.proc.pid for n in nodes if n.proc is not None]
        assert [listed[p]["config_differs"] for p in pids] == [False, False, True]
        assert len({listed[p]["config_generation"] for p in pids}) == 2
        for node in nodes:
            assert node.stop() == 0


def _follow(
    url: str,
    headers: dict[str, str],
    out: list[dict[str, Any]],
    stop: threading.Event,
    ready: threading.Event,
) -> None:
    """Read an event stream into ``out`` until ``stop`` is set (checked per frame or
    keep-alive)."""
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=30)) as r:
        ready.set()
        data: list[str] = []
        for line in r.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                out.append(json.loads("".join(data)))
                data = []


def test_an_event_stream_on_any_node_carries_every_nodes_events_in_order(
    tmp_path: Path, pg_url: str
) -> None:
    """Runs triggered through both nodes and run by either: a stream on node 0 and one
    on node 1 each carry exactly the database's events, in id order, none missing or
    doubled, whichever node committed them."""
    tasks = _manual("job")
    with running_nodes(tmp_path, pg_url, tasks, tasks) as nodes:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        assert row is not None
        since = int(row[0])
        streams: list[list[dict[str, Any]]] = [[], []]
        stop = threading.Event()
        readers = []
        for node, out in zip(nodes, streams, strict=True):
            ready = threading.Event()
            reader = threading.Thread(
                target=_follow,
                args=(
                    node.url + "/v1/events/stream",
                    {"Last-Event-ID": str(since)},
                    out,
                    stop,
                    ready,
                ),
                daemon=True,
            )
            reader.start()
            assert ready.wait(30)
            readers.append(reader)
        runs = [nodes[i % 2].trigger("job") for i in range(6)]
        wait_for(
            lambda: dict(_runs(pg_url, "job")) == dict.fromkeys(runs, "succeeded"),
            what="every run to succeed",
        )
        with psycopg.connect(pg_url) as conn:
            expected = [
                int(r[0])
                for r in conn.execute("SELECT id FROM events WHERE id > %s ORDER BY id", (since,))
            ]
            committed_by = {
                str(r[0])
                for r in conn.execute(
                    "SELECT DISTINCT a.worker FROM attempts a WHERE a.run_id = ANY(%s)", (runs,)
                )
            }
        for out in streams:
            wait_for(
                lambda out=out: len(out) >= len(expected),  # type: ignore[misc]
                what="each stream to carry every event",
            )
        stop.set()
        for out in streams:
            assert [e["id"] for e in out[: len(expected)]] == expected
            assert {e["run_id"] for e in out} >= set(runs)
        # Both nodes enqueued runs (and the test is about more than one committer).
        enqueued = {e["run_id"] for e in streams[0] if e["kind"] == "enqueue"}
        assert enqueued == set(runs) and committed_by
        for node in nodes:
            assert node.stop() == 0


def test_three_nodes_calling_a_model_at_once_never_spend_past_the_cap(
    tmp_path: Path, pg_url: str
) -> None:
    """Twelve agent runs at once on three nodes (four slots each) against one scripted
    provider that answers the first eleven calls together, so every node's next
    reservations race each other: the task's daily cap is never passed (each call's
    worst case is reserved under a lock that every node takes), and the calls really
    overlapped across the nodes. (That the lock is what holds it, with the races
    forced, is ``tests/contract/test_ledger.py``'s three-store test.)"""
    cap = 0.2
    tasks = """
    spend:
      schedule: {manual: true}
      overlap: allow
      agent: {provider: fake, prompt: "{item}", items: [a, b, c, d, e]}
      budget: {task: {usd_per_day: 0.2}}
    """
    with ThreadedFakeLLM() as llm:
        llm.default = lambda req: fake_llm.ok("fine", prompt_tokens=10, completion_tokens=5)
        llm.gate = 11  # the first calls (0.018 reserved each) answered together
        top = f"""
        providers:
          fake:
            base_url: {llm.url}
            api_key_env: AGENTD_E2E_LLM_KEY
            default_model: m1
            max_tokens: 10
            prices: {{m1: {{input: 1000, output: 1000}}}}   # 0.001 USD a token
        """
        with running_nodes(
            tmp_path,
            pg_url,
            tasks,
            tasks,
            tasks,
            daemon="concurrency: 4",
            top=top,
            env={"AGENTD_E2E_LLM_KEY": "sk-test"},
        ) as nodes:
            runs = [
                httpx.post(f"{nodes[i % 3].url}/v1/tasks/spend/trigger", timeout=10).json()[
                    "run_id"
                ]
                for i in range(12)
            ]

            def finished() -> bool:
                return all(s not in ("queued", "running") for _, s in _runs(pg_url, "spend"))

            wait_for(finished, timeout=90, what="every run to end")
            with psycopg.connect(pg_url) as conn:
                spent, calls, reserved = conn.execute(
                    "SELECT COALESCE(SUM(cost_usd), 0), COUNT(*),"
                    " COUNT(*) FILTER (WHERE state = 'reserved') FROM ledger"
                ).fetchone() or (0, 0, 0)
                callers = {
                    str(r[0])
                    for r in conn.execute(
                        "SELECT DISTINCT a.worker FROM ledger l JOIN attempts a"
                        " ON a.run_id = l.run_id"
                    )
                }
            statuses = sorted({s for _, s in _runs(pg_url, "spend")})
            for node in nodes:
                assert node.stop() == 0
    assert len(runs) == 12 and reserved == 0
    assert float(spent) <= cap + 1e-9, f"{calls} calls spent {spent} past the cap {cap}"
    # 0.015 a call, reserved at up to 0.018: 11 to 13 calls fit; the rest were refused.
    assert 11 <= calls <= 13 and len(llm.requests) == calls
    assert "budget_exhausted" in statuses
    assert llm.max_in_flight >= 4 and len(callers) >= 2, (llm.max_in_flight, callers)


def _holders(url: str, nodes: list[Agentd]) -> list[Agentd]:
    """The nodes holding a running run's lease now."""
    with psycopg.connect(url) as conn:
        owners = {
            str(r[0])
            for r in conn.execute("SELECT lease_owner FROM runs WHERE status='running'")
            if r[0]
        }
    return [n for n in nodes if n.proc is not None and f":{n.proc.pid}" in
            {o[o.rfind(":"):] for o in owners}]  # fmt: skip


def test_nodes_killed_at_random_moments_lose_and_double_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    """Three nodes on a 1 s task whose runs take 0.8 s; for 30 s a node (mostly one
    holding a run) is ``kill -9``'d at a random moment and started again (two stay up
    throughout). After:
    every occurrence from the first to the last has exactly one run (no tick lost, none
    doubled), every run ended succeeded with exactly one successful attempt and no retry
    spent, and the runs the dead nodes held were recovered by other processes. The seed
    is printed; ``AGENTD_TEST_SEED`` repeats a sequence."""
    seed = int(os.environ.get("AGENTD_TEST_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"kill seed: {seed}")
    rng = random.Random(seed)
    tasks = """
    beat:
      schedule: {every: 1s}
      overlap: allow
      catchup: all
      retry: {max_attempts: 1}
      command: {argv: ["sleep", "0.8"]}
    """

    def unfinished_before(cut: datetime) -> int:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM runs WHERE task_id='beat'"
                " AND status IN ('queued', 'running') AND scheduled_for < %s",
                (to_iso(cut),),
            ).fetchone()
        return -1 if row is None else int(row[0])

    kills = 0
    with running_nodes(tmp_path, pg_url, tasks, tasks, tasks) as nodes:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 3.0))  # the random moment is what is tested
            # Mostly the node holding a run (so kills land mid-run whatever the
            # seed), else any node.
            holders = _holders(pg_url, nodes)
            victim = rng.choice(holders if holders and rng.random() < 0.7 else nodes)
            victim.kill9()
            kills += 1
            victim.start()
        # The last victims' runs are recovered a lease (5 s) after their death.
        cut = datetime.now(UTC) - timedelta(seconds=2)
        wait_for(lambda: unfinished_before(cut) == 0, timeout=60, what="older runs to end")
        for node in nodes:
            assert node.stop() == 0
    with psycopg.connect(pg_url) as conn:
        runs = conn.execute(
            "SELECT r.id, r.scheduled_for, r.status, r.failures,"
            " count(a.id) FILTER (WHERE a.outcome = 'success')"
            " FROM runs r LEFT JOIN attempts a ON a.run_id = r.id WHERE r.task_id = 'beat'"
            " GROUP BY r.id ORDER BY r.scheduled_for"
        ).fetchall()
        handovers = conn.execute(
            "SELECT a.worker, b.worker FROM attempts a JOIN attempts b"
            " ON b.run_id = a.run_id AND b.attempt = a.attempt + 1 WHERE a.outcome = 'lost'"
        ).fetchall()
        recovered = conn.execute("SELECT count(*) FROM events WHERE kind = 'recover'").fetchone()
    print(f"kills {kills}, runs {len(runs)}, recovered {recovered}, handovers {len(handovers)}")
    assert kills >= 8
    times = [from_iso(str(r[1])) for r in runs]
    steps = sorted({(b - a).total_seconds() for a, b in itertools.pairwise(times)})
    assert steps == [1.0], f"seed {seed}: occurrences lost or doubled: steps {steps}"
    ended = [r for r, at in zip(runs, times, strict=True) if at < cut]
    assert len(ended) >= 25, (seed, len(runs))
    bad = [r for r in ended if (r[2], r[3], r[4]) != ("succeeded", 0, 1)]
    assert not bad, f"seed {seed}: {bad}"
    # Kills landed mid-run, and another process took each lost attempt over.
    assert recovered is not None and recovered[0] > 0 and handovers, seed
    assert all(dead != next_ for dead, next_ in handovers), (seed, handovers)


def _pruned(node: Agentd, kind: str) -> float:
    """``agentd_pruned_total{kind}`` on ``node`` (0 while it does not answer)."""
    try:
        text = httpx.get(node.url + "/metrics", timeout=5).text
    except httpx.TransportError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f'agentd_pruned_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def _workspaces(node: Agentd, task: str) -> set[str]:
    where = node.state_dir / "runs" / task
    return {p.name for p in where.iterdir()} if where.exists() else set()


def test_two_nodes_keep_the_shared_history_and_their_own_workspaces_bounded(
    tmp_path: Path, pg_url: str
) -> None:
    """Two nodes with a task every second, each run leaving a workspace on the node that
    ran it, and a tiny ``history:``: the shared history stays a handful of runs, the
    pruning is done by one node at a time, and each node's own workspace directories
    stay a handful too (the node that pruned a run removes its own directory; the other
    sweeps its own at its next pass). Rows are counted where they were pruned,
    workspaces on the node whose they were."""
    tasks = """
    tick:
      schedule: {every: 1s}
      command: {argv: ["echo", "x"]}
    """
    history = "history: {keep_runs: 2s, keep_events: 1s, prune_every: 1s}"
    nodes = [node_on(tmp_path / f"node{i}", tasks, pg_url) for i in range(2)]
    seen = {"runs": 0, "workspaces": 0}
    try:
        for node in nodes:
            node.top += "\n" + history
            node.write_config(tasks)
            node.start()

        def enough() -> bool:
            seen["runs"] = max(seen["runs"], len(_runs(pg_url, "tick")))
            for node in nodes:
                seen["workspaces"] = max(seen["workspaces"], len(_workspaces(node, "tick")))
            return sum(_pruned(n, "runs") for n in nodes) >= 12 and all(
                _pruned(n, "workspaces") >= 3 for n in nodes
            )

        wait_for(enough, timeout=120, what="runs pruned, and each node's own workspaces")
        # A run a second across the cluster, kept 2 s after it ends, a pass a second on
        # each node: what is left stays a handful, in the database and on each node.
        assert seen["runs"] <= 15 and seen["workspaces"] <= 15, seen
        assert sum(_pruned(n, "events") for n in nodes) >= 12 * 3
        assert any("retention: pruned runs=" in n.log() for n in nodes)
        # Every directory a node still has is of a run the database still has, or of
        # one its next pass sweeps: within a pass or two, none of an old run is left.
        oldest_kept = min(r for r, _ in _runs(pg_url, "tick"))
        for node in nodes:
            wait_for(
                lambda node=node: all(w >= oldest_kept for w in _workspaces(node, "tick")),
                what="each node's directories of pruned runs to be swept",
            )
        for node in nodes:
            assert node.stop() == 0
            assert "Traceback" not in node.log()
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.kill9()


def test_a_node_starting_forgets_nodes_gone_for_a_week(tmp_path: Path, pg_url: str) -> None:
    tasks = _manual("job")
    with running_nodes(tmp_path, pg_url, tasks) as [first]:
        assert first.stop() == 0
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO nodes(id, host, pid, version, config_generation, started_at,"
            " last_seen) VALUES ('gone:1', 'gone', 1, '0.0.1', 'g', %s, %s)",
            (to_iso(datetime.now(UTC) - timedelta(days=9)),) * 2,
        )
    (tmp_path / "again").mkdir()
    with running_nodes(tmp_path / "again", pg_url, tasks) as [node]:
        wait_for(lambda: "forgot 1 node(s) not seen for a week" in node.log(), what="the purge")
        ids = {n["id"] for n in json.loads(node.cli("nodes", "--json").stdout)}
        assert "gone:1" not in ids and len(ids) == 2  # the stopped first node stays
        assert node.stop() == 0


def test_during_a_rollout_a_node_never_claims_a_task_it_does_not_define(
    tmp_path: Path, pg_url: str
) -> None:
    """Node 0 on the old config (job), node 1 on the new one (job and added): every run
    of the added task is run by node 1 and succeeds; node 0 takes none of them (before,
    it could claim one and cancel it as "no longer in the config")."""
    old = """
    job:
      schedule: {manual: true}
      command: {argv: ["true"]}
    """
    new = (
        old
        + """
    added:
      schedule: {manual: true}
      overlap: allow
      command: {argv: ["true"]}
    """
    )
    with running_nodes(tmp_path, pg_url, old, new) as nodes:
        runs = [nodes[1].trigger("added") for _ in range(12)]
        wait_for(
            lambda: all(s != "queued" and s != "running" for _, s in _runs(pg_url, "added")),
            what="the added task's runs to end",
        )
        assert dict(_runs(pg_url, "added")) == dict.fromkeys(runs, "succeeded")
        with psycopg.connect(pg_url) as conn:
            workers = {
                str(r[0])
                for r in conn.execute(
                    "SELECT DISTINCT a.worker FROM attempts a JOIN runs r ON r.id = a.run_id"
                    " WHERE r.task_id = 'added'"
                )
            }
        assert nodes[1].proc is not None
        assert workers == {w for w in workers if w.endswith(f":{nodes[1].proc.pid}")}
        for node in nodes:
            assert node.stop() == 0


def _present(url: str, task: str) -> int | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT present FROM tasks WHERE id=%s", (task,)).fetchone()
    return None if row is None else int(row[0])


def test_a_node_starting_on_an_older_config_leaves_the_newer_nodes_tasks_alone(
    tmp_path: Path, pg_url: str
) -> None:
    """Node 0 runs the new config (job and added), node 1 starts after it on the old one
    (job): node 1's start leaves `added` in place, since a live node defines it, and
    node 0 runs it. Once node 0 reloads the old config too, every live node has it, and
    `added` is removed."""
    old, new = _manual("job"), _manual("job", "added")
    newer = node_on(tmp_path / "node0", new, pg_url)
    older = node_on(tmp_path / "node1", old, pg_url)
    try:
        newer.start()
        older.start()
        older.wait_log("are kept while", "node 1 keeping the tasks its config lacks")
        assert _present(pg_url, "added") == 1
        run = newer.trigger("added")
        wait_for(lambda: dict(_runs(pg_url, "added")).get(run) == "succeeded", what="added ran")
        newer.write_config(old)
        newer.signal(signal.SIGHUP)
        wait_for(lambda: _present(pg_url, "added") == 0, what="added removed once all agree")
        assert newer.stop() == 0
        assert older.stop() == 0
    finally:
        for node in (newer, older):
            if node.proc is not None and node.proc.poll() is None:
                node.kill9()


def test_a_task_kept_for_another_generation_goes_once_that_node_has_stopped(
    tmp_path: Path, pg_url: str
) -> None:
    """Both nodes on {job, gone}; node 0 reloads {job} while node 1 still runs the old
    generation: `gone` stays. Node 1 stops: node 0, now the only generation alive,
    removes it by itself (at its next registry beat)."""
    both = _manual("job", "gone")
    with running_nodes(tmp_path, pg_url, both, both, daemon="lease: 3s") as nodes:
        nodes[0].write_config(_manual("job"), "lease: 3s")
        nodes[0].signal(signal.SIGHUP)
        nodes[0].wait_log("are kept while", "node 0 keeping gone for node 1")
        assert _present(pg_url, "gone") == 1
        assert nodes[1].stop() == 0
        nodes[0].wait_log("every live node runs this config generation", "gone removed")
        assert _present(pg_url, "gone") == 0
        assert nodes[0].stop() == 0


def test_an_idle_node_beats_in_the_registry_every_third_of_a_lease(
    tmp_path: Path, pg_url: str
) -> None:
    """A node with nothing to do still tells the registry it is alive every third of a
    lease: the other nodes take one not seen for longer as dead and recover its runs
    (before, an idle loop slept up to 5 s between beats, a whole lease in these tests,
    and a node starting beside it killed the command of a run it had just claimed)."""
    idle = """
    later:
      schedule: {manual: true}
      command: {argv: ["true"]}
    """
    with running_nodes(tmp_path, pg_url, idle) as [node]:
        seen: list[float] = []
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute("SELECT max(last_seen) FROM nodes").fetchone()
            assert row is not None
            stamp = from_iso(str(row[0])).timestamp()
            if not seen or stamp != seen[-1]:
                seen.append(stamp)
            time.sleep(0.1)  # sampling the registry, not waiting for something
        gaps = [b - a for a, b in itertools.pairwise(seen)]
        assert len(gaps) >= 3 and max(gaps) < 5 / 2, gaps
        assert node.stop() == 0
