"""``Control.trigger`` with params and a key, on a real state DB and a real config: what
the API and the CLI's direct mode share (the checks before a run is made, the body an
idempotency key must match, the window on a manual clock)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agentd.clock import ManualClock
from agentd.config import parse_config
from agentd.control import Control
from agentd.models import StateRefused
from agentd.redact import Redactor
from agentd.state.sqlite.engine import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = "s3cret-value-0123456789"
CONFIG = """
limits: {trigger_key_window: 1h}
tasks:
  job:
    schedule: {manual: true}
    command: {argv: ["true"]}
    overlap: allow
    params: {n: 1}
    params_schema: {type: object, properties: {n: {type: integer}}}
  agent:
    schedule: {manual: true}
    overlap: allow
    agent:
      base_url: http://127.0.0.1:9/v1
      model: m
      prompt: p
      tools: [{name: push, sensitive: true, command: {argv: ["true"]}}]
"""


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Control, ManualClock]]:
    config = parse_config(CONFIG, environ={})
    store = SqliteStore(tmp_path / "state.sqlite")
    store.redactor = Redactor([SECRET])
    store.sync_tasks({tid: (t.fingerprint(), t.kind) for tid, t in config.tasks.items()}, T0)
    clock = ManualClock(T0)
    try:
        yield Control(store, config, clock), clock
    finally:
        store.close()


def refused(code: str, call: object) -> str:
    assert callable(call)
    with pytest.raises(StateRefused) as info:
        call()
    assert info.value.code == code, info.value
    return str(info.value)


def test_params_are_checked_before_any_run_is_made(control: tuple[Control, ManualClock]) -> None:
    ctl, _ = control
    assert "params_schema" in refused("bad_request", lambda: ctl.trigger("job", params={"n": "x"}))
    assert "secret" in refused("bad_request", lambda: ctl.trigger("job", params={"t": SECRET}))
    assert "JSON" in refused("bad_request", lambda: ctl.trigger("job", params={"n": float("nan")}))
    big = {"blob": "x" * 70_000}
    assert "bytes" in refused("bad_request", lambda: ctl.trigger("job", params=big))
    for key in ("", "with space", "x" * 256, "é"):
        refused("bad_request", lambda key=key: ctl.trigger("job", key=key))  # type: ignore[misc]
    assert ctl.list_runs("job") == []
    made = ctl.trigger("job", params={"n": 2}, key="ok-1")
    assert made["created"] and made["params"] == {"n": 2} and made["idempotency_key"] == "ok-1"
    assert ctl.trigger("job", params={})["params"] is None  # empty is none


def test_approve_sensitive_is_part_of_the_body_a_key_must_match(
    control: tuple[Control, ManualClock],
) -> None:
    ctl, clock = control
    first = ctl.trigger("agent", approve_sensitive=True, key="k")
    assert first["created"] and first["approved_sensitive"]
    again = ctl.trigger("agent", approve_sensitive=True, key="k")
    assert (again["run_id"], again["created"], again["approved_sensitive"]) == (
        first["run_id"],
        False,
        True,
    )
    message = refused("idempotency_conflict", lambda: ctl.trigger("agent", key="k"))
    assert first["run_id"] in message
    # the same key on another task is another key
    other = ctl.trigger("job", key="k")
    assert other["created"] and other["run_id"] != first["run_id"]
    # after the window: a new run, whatever the body
    clock.advance(3600)
    later = ctl.trigger("agent", key="k")
    assert later["created"] and later["run_id"] != first["run_id"]
