"""Fuzz the live HTTP API from its own ``/v1/openapi.json`` with schemathesis.

The server runs for real (aiohttp on a loopback port, a SqliteStore on a SQLite file seeded
with runs in every state) in a background thread with its own event loop. For every
documented operation, Hypothesis generates valid and invalid requests, and each
response must: not be a 5xx, have a documented status code and content type, and have
a body that matches the documented schema. Requests with real ids (which random
generation never hits) are added explicitly, so the detail objects are checked too.

It runs twice: on a server without a token, and on one with both tokens (issue 23),
fuzzed with the full token (fewer examples: the handlers are the same) after a check
that every operation but the probes is 401 without a token and 403 for a POST with the
read token, and answers a GET with the read token.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client import CollectorRegistry, Counter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentd.alerts import Alert
from agentd.budget import Need, call_scopes
from agentd.clock import ManualClock
from agentd.config import parse_config
from agentd.control import Control
from agentd.events import EventBus
from agentd.health import Health
from agentd.http import HttpServer
from agentd.ledger import commit, reserve
from agentd.models import Outcome, RunStatus
from agentd.outbox import Outbox
from agentd.state.port import atomically
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 10}
STREAM_EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 4}
GUARDED_EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 4}
GUARDED_STREAM_EXAMPLES = {GenerationMode.POSITIVE: 3, GenerationMode.NEGATIVE: 2}
TOKEN = "fuzz-full-token"
READ_TOKEN = "fuzz-read-token"
PROBES = frozenset({"/healthz", "/readyz"})
LONG = 8000
"""Near aiohttp's ``max_line_size`` and ``max_field_size`` (8190): see ``call``."""
STREAM_TIMEOUT_S = 0.6
"""Streams that do not end are read this long (schemathesis cuts them short), so the
server's keep-alive interval below is shorter."""
EVENT_FIELDS = {"id", "ts", "kind", "task_id", "run_id", "data"}

CONFIG = """
providers:
  p: {base_url: "http://127.0.0.1:9/v1", default_model: m, prices: {m: {input: 1, output: 2}}}
limits: {usd_per_day: 10}
alerts:
  channels: {journal: {log: {}}}
  rules: [{events: ["*"], channels: [journal]}]
tasks:
  delta:
    schedule: {manual: true}
    agent: {provider: p, prompt: hi}
    budget: {task: {usd_per_day: 1}}
  alpha:
    description: hourly
    schedule: {every: 1h}
    command: {argv: ["true"]}
  beta:
    schedule: {manual: true}
    command: {argv: ["true"]}
    overlap: allow
  gamma:
    description: disabled one
    enabled: false
    schedule: {cron: "0 3 * * *", timezone: Europe/Berlin}
    http: {url: "http://127.0.0.1:9/"}
"""


@dataclass
class Seeded:
    run_ids: dict[str, str] = field(default_factory=dict)


def seed(store: SqliteStore, control: Control, clock: ManualClock) -> Seeded:
    """Runs in every status, with attempts, a checkpoint, progress and quarantine rows."""
    out = Seeded()

    def fire(task_id: str = "beta") -> str:
        clock.advance(1)
        return str(control.trigger(task_id)["run_id"])

    def claim(run_id: str) -> None:
        rows = store.claim(clock.now(), "w1", 30, 1, set(), {"beta"})
        assert [r["id"] for r in rows] == [run_id]

    def finish(run_id: str, status: RunStatus, outcome: Outcome, **kw: Any) -> None:
        clock.advance(1)
        store.finish(run_id, clock.now(), outcome=outcome, next_status=status, **kw)

    done = out.run_ids["succeeded"] = fire()
    claim(done)
    store.save_checkpoint(done, {"next": 3, "items": ["a", "b"]}, clock.now())
    store.progress(done, 2, 3, "two of three", clock.now())
    # An agent's steps, for /v1/runs/{run_id}/transcript (the other runs have none).
    reply = {"content": "", "usage": {"input_tokens": 9, "output_tokens": 2, "cost_usd": 0.0}}
    reply["tool_calls"] = [{"id": "c1", "name": "add", "arguments": '{"a": 1}'}]
    for step, kind, call_id, payload in (
        (1, "model", None, reply),
        (1, "tool_started", "c1", {"tool": "add", "arguments": {"a": 1}}),
        (1, "tool_result", "c1", {"tool": "add", "ok": True, "content": "1", "duration_s": 0.1}),
    ):
        store.record_agent_step(done, step, kind, call_id, payload, clock.now())
    finish(done, RunStatus.SUCCEEDED, Outcome.SUCCESS, exit_code=0, duration_s=1.5)

    for name in ("quarantined", "dropped"):
        run_id = out.run_ids[name] = fire()
        claim(run_id)
        finish(run_id, RunStatus.QUARANTINED, Outcome.FAILURE, error="exit 1", exit_code=1)
    store.quarantine_drop(out.run_ids["dropped"], clock.now())

    out.run_ids["cancelled"] = fire()
    control.cancel(out.run_ids["cancelled"])
    running = out.run_ids["running"] = fire()
    claim(running)
    out.run_ids["queued"] = fire()
    out.run_ids["queued_alpha"] = fire("alpha")
    clock.advance(1)
    skipped = store.fire("alpha", clock.now(), trigger="manual", overlap="skip")
    out.run_ids["skipped"] = skipped.run_id  # alpha already has an active run
    control.pause("alpha", "seeded pause")
    statuses = {name: store.get_run(run_id)["status"] for name, run_id in out.run_ids.items()}
    assert statuses == {
        "succeeded": "succeeded",
        "quarantined": "quarantined",
        "dropped": "dropped",
        "cancelled": "cancelled",
        "running": "running",
        "queued": "queued",
        "queued_alpha": "queued",
        "skipped": "skipped",
    }
    # Spend in the ledger, and an alert with a delivery, for /v1/spend and /v1/alerts.
    scopes = call_scopes(control.config, control.config.tasks["delta"], clock.now())
    entry = reserve(
        store, clock.now(), run_id=done, task_id="delta", provider="p", model="m", item=None,
        need=Need(100, 50, 0.0002), scopes=scopes,
    )  # fmt: skip
    assert isinstance(entry, int)
    commit(
        store, clock.now(), entry, input_tokens=90, output_tokens=40, cost=0.00017,
        status="200", duration_s=0.5, usage_missing=False, scopes=scopes,
    )  # fmt: skip
    box = Outbox(store, control.config, clock)
    box.process(clock.now())
    with atomically(store):
        box.raise_alert(Alert("deadman", "deadman:alpha", "alpha is late", "alpha"), clock.now())
    return out


class ServerThread(threading.Thread):
    def __init__(self, tmp_path: Path, guarded: bool = False) -> None:
        super().__init__(name="api-fuzz-server", daemon=True)
        self.tmp_path = tmp_path
        self.guarded = guarded
        self.ready = threading.Event()
        self.port = 0
        self.seeded = Seeded()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        # The state dir here: /v1/runs/{run_id}/output reads a run's workspace in it.
        config = parse_config(
            f"daemon: {{state_dir: {json.dumps(str(self.tmp_path))}}}\n{CONFIG}", environ={}
        )
        clock = ManualClock(T0 + timedelta(days=30))
        bus = EventBus()
        store = SqliteStore(self.tmp_path / "state.sqlite", event_sink=bus.publish)
        try:
            tasks: dict[str, tuple[str, str]] = {
                tid: (t.fingerprint(), t.kind) for tid, t in config.tasks.items()
            }
            store.sync_tasks(tasks, clock.now())
            control = Control(store, config, clock)
            self.seeded = seed(store, control, clock)
            # Captured output for the succeeded run (a cut UTF-8 character at the end).
            done = self.seeded.run_ids["succeeded"]
            workspace = self.tmp_path / "runs" / "beta" / done
            workspace.mkdir(parents=True)
            (workspace / "stdout.log").write_bytes("out ✓ line\n".encode() * 50 + b"\xe2\x9c")
            (workspace / "stderr.log").write_text("err line\n")
            registry = CollectorRegistry()
            Counter("agentd_fuzz_total", "A metric.", registry=registry).inc()
            health = Health(started=True)
            health.tick("main_loop", clock.monotonic())
            server = HttpServer(
                control=control,
                health=health,
                registry=registry,
                bus=bus,
                status=lambda: {"pid": 1, "generation": 1},
                clock=clock,
                token=TOKEN if self.guarded else None,
                read_token=READ_TOKEN if self.guarded else None,
                sse_heartbeat_s=0.2,
            )
            self.port = await server.start("127.0.0.1", 0)
            self.ready.set()
            await self._stopping.wait()
            await server.stop()
        finally:
            store.conn.close()

    def shutdown(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(timeout=30)


@pytest.fixture(params=["open", "guarded"])
def live_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    thread = ServerThread(tmp_path, guarded=request.param == "guarded")
    thread.start()
    assert thread.ready.wait(timeout=60), "server did not start"
    if thread.error is not None:
        raise thread.error
    try:
        yield thread
    finally:
        thread.shutdown()


def check_event_payloads(content: bytes) -> None:
    """The documented SSE frame is checked by schemathesis; its ``data`` is an Event."""
    for block in content.decode().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if not fields:
            continue
        event = json.loads(fields["data"])
        assert set(event) >= EVENT_FIELDS, event
        assert event["id"] == int(fields["id"]) and event["kind"] == fields["event"], event
        assert isinstance(event["data"], dict), event


def check_the_matrix(
    base_url: str, session: requests.Session, operations: list[Any], seeded: Seeded
) -> None:
    """Every documented operation but the probes (and /metrics, open by default) is 401
    without a token or with a wrong one; the read token reads and is 403 on a POST."""
    run_id = seeded.run_ids["quarantined"]
    checked = 0
    for op in operations:
        if op.path in PROBES or op.path == "/metrics":
            continue
        path = op.path.replace("{task_id}", "alpha").replace("{run_id}", run_id)
        method = op.method.upper()

        def status(headers: dict[str, str], m: str = method, p: str = path) -> int:
            with session.request(
                m, base_url + p, headers=headers, stream=True, timeout=20
            ) as response:
                return response.status_code

        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": READ_TOKEN}):
            assert status(headers) == 401, (method, path, headers)
        reading = status({"Authorization": f"Bearer {READ_TOKEN}"})
        if method == "POST":
            assert reading == 403, (method, path)
        else:
            assert reading not in (401, 403) and reading < 500, (method, path, reading)
        checked += 1
    assert checked == 26  # the 29 fuzzed operations but the probes and /metrics
    for path in ("/v1/openapi.json", "/v1/nope"):
        assert session.get(base_url + path, timeout=20).status_code == 401, path
    for path in (*PROBES, "/metrics"):
        assert session.get(base_url + path, timeout=20).status_code == 200, path


def test_api_conforms_to_its_openapi_document(live_server: ServerThread) -> None:
    base_url = f"http://127.0.0.1:{live_server.port}"
    auth = {"Authorization": f"Bearer {TOKEN}"} if live_server.guarded else {}
    schema = schemathesis.openapi.from_url(f"{base_url}/v1/openapi.json", headers=auth)
    schema.validate()  # a valid OpenAPI 3.0 document to begin with
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len(operations) == 29  # all 30 but the document itself, which from_url skips

    session = requests.Session()
    session.trust_env = False
    failures: list[str] = []
    if live_server.guarded:
        check_the_matrix(base_url, session, operations, live_server.seeded)

    def call(case: schemathesis.Case[Any]) -> None:
        stream = case.operation.path.endswith("/stream")
        timeout = STREAM_TIMEOUT_S if stream else 20.0
        response = case.call(base_url=base_url, session=session, headers=auth, timeout=timeout)
        sent = response.request
        if response.status_code == 400 and (
            len(sent.url or "") > LONG or any(len(v) > LONG for v in sent.headers.values())
        ):
            # aiohttp refuses a request line or header over 8190 bytes before any handler
            # runs (a JSON 400 now, but not one each operation documents).
            assert response.json()["error"] == "bad_request"
            return
        transport = {"base_url": base_url, "session": session, "timeout": timeout}
        case.validate_response(response, checks=CHECKS, transport_kwargs=transport)
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            check_event_payloads(response.content)

    # What ``call`` lets through: aiohttp's own refusal of an over-long request line.
    refused = session.get(
        f"{base_url}/v1/events", params={"after": "1" * 9000}, headers=auth, timeout=20
    )
    assert refused.status_code == 400 and len(refused.request.url or "") > LONG
    assert refused.headers["content-type"].startswith("application/json")

    # Known ids first (GETs, then POSTs, which change state), so the detail objects of
    # real tasks, runs and quarantine entries are validated, not only the 404s.
    ids = live_server.seeded.run_ids
    known: list[tuple[str, str, dict[str, str]]] = []
    for op in operations:
        names = [p.name for p in op.path_parameters]
        if names == ["task_id"]:
            known += [(op.method.upper(), op.path, {"task_id": t}) for t in ("alpha", "gamma")]
        elif names == ["run_id"]:
            known += [(op.method.upper(), op.path, {"run_id": r}) for r in ids.values()]
    known.sort(key=lambda item: item[0] != "GET")
    by_key = {(op.method.upper(), op.path): op for op in operations}
    for method, path, params in known:
        try:
            call(by_key[(method, path)].Case(path_parameters=params))
        except Exception as exc:
            failures.append(f"{method} {path} {params}: {exc}")

    for op in operations:
        if live_server.guarded:
            stream = op.path.endswith("/stream")
            budget = GUARDED_STREAM_EXAMPLES if stream else GUARDED_EXAMPLES
        else:
            budget = STREAM_EXAMPLES if op.path.endswith("/stream") else EXAMPLES
        for mode, examples in budget.items():

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=False,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case: schemathesis.Case[Any]) -> None:
                call(case)

            try:
                fuzz()
            except Unsatisfiable:
                continue  # nothing to make invalid (an operation without parameters)
            except Exception as exc:
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {exc}")

    assert not failures, "\n\n".join(failures)
