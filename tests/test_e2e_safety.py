"""End to end, unattended safety: the real daemon against a scripted chat-completions
server and a real webhook receiver, both local HTTP servers in this process."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Agentd, wait_for

from agentd.alerts import SIGNATURE_HEADER, verify
from agentd.clock import from_iso

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from fake_llm import FakeLLM, ThreadedFakeLLM

pytestmark = pytest.mark.e2e

KEY = "sk-e2e-SECRET-4242"
HOOK_SECRET = "whsec-e2e-SECRET-77"
ENV = {"AGENTD_E2E_LLM_KEY": KEY, "AGENTD_E2E_HOOK_SECRET": HOOK_SECRET}


class Hooks:
    """A webhook receiver on its own thread. ``hang_next`` holds the next request open
    until ``release()`` (then answers 503), so a test can act while a delivery is in
    flight; ``delivered`` are the requests answered 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.hang_next = False
        self._release = threading.Event()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                entry = {"path": self.path, "headers": dict(self.headers), "body": body}
                hang, hooks.hang_next = hooks.hang_next, False
                hooks.received.append(entry)
                if hang:
                    hooks._release.wait(60)
                entry["status"] = 503 if hang else 200
                try:
                    self.send_response(entry["status"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the daemon is gone

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def delivered(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for entry in list(self.received):
            if entry.get("status") != 200:
                continue
            alert = json.loads(entry["body"])
            if kind is None or alert["kind"] == kind:
                out.append({**alert, "_headers": entry["headers"], "_body": entry["body"]})
        return out


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with ThreadedFakeLLM() as server:
        yield server


def providers(llm: FakeLLM) -> str:
    return f"""
    providers:
      fake:
        base_url: {llm.url}
        api_key_env: AGENTD_E2E_LLM_KEY
        default_model: m1
        max_tokens: 10
        prices: {{m1: {{input: 1000, output: 1000}}}}   # 0.001 USD a token
    """


def alerts_to(hooks: Hooks, events: str = '["*"]') -> str:
    return f"""
    alerts:
      channels:
        hook:
          webhook: {{url: "{hooks.url}/hook", secret_env: AGENTD_E2E_HOOK_SECRET, timeout: 5s}}
          retries: 10
          backoff: 200ms
          max_backoff: 1s
      rules:
        - {{events: {events}, channels: [hook]}}
    """


def assert_no_secrets(d: Agentd) -> None:
    """API keys and webhook secrets reach no DB row, event, log line or workspace file."""
    texts = [d.log()]
    for path in d.state_dir.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode(errors="replace"))
    for text in texts:
        assert KEY not in text and HOOK_SECRET not in text


def test_run_over_budget_stops_before_the_breaking_call_with_its_checkpoint(
    make_daemon: Any, llm: FakeLLM
) -> None:
    llm.default = lambda req: fake_llm.ok("fine", prompt_tokens=10, completion_tokens=5)
    d = make_daemon(
        """
        batch:
          schedule: {manual: true}
          agent: {provider: fake, prompt: "{item}", items: [a, b, c, d, e, f]}
          budget: {run: {usd: 0.05}}
          retry: {max_attempts: 3, backoff: 100ms}
        """,
        top=providers(llm),
    ).start(env=ENV)
    run_id = d.trigger("batch")
    run = d.wait_status(run_id, "budget_exhausted")
    # 0.015 a call, reserved at up to 0.018: the fourth would break 0.05 and is not made.
    assert len(llm.requests) == 3
    assert run["outcome"] == "budget_exhausted" and "budget run exhausted" in run["error"]
    [attempt] = d.query("SELECT * FROM attempts WHERE run_id=?", (run_id,))
    assert attempt["outcome"] == "budget_exhausted"  # not retried
    assert d.query("SELECT * FROM quarantine") == []  # not quarantined
    [checkpoint] = d.query("SELECT data FROM checkpoints WHERE run_id=?", (run_id,))
    assert json.loads(checkpoint["data"]) == {"next_item": 3}
    ws = d.state_dir / "runs" / "batch" / run_id / "items"
    assert sorted(p.name for p in ws.iterdir()) == ["00000.json", "00001.json", "00002.json"]
    spent = d.query("SELECT SUM(cost_usd) AS usd, COUNT(*) AS n FROM ledger")[0]
    assert spent["n"] == 3 and spent["usd"] == pytest.approx(0.045)
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in llm.requests)
    detail = json.loads(d.cli("runs", "show", run_id, "--json").stdout)
    assert detail["llm"]["calls"] == 3 and detail["llm"]["cost_usd"] == pytest.approx(0.045)
    assert d.stop() == 0
    assert_no_secrets(d)


def test_task_window_budget_skips_the_next_run_and_alarms_once_per_threshold(
    make_daemon: Any, llm: FakeLLM, hooks: Hooks
) -> None:
    llm.default = lambda req: fake_llm.ok("fine", prompt_tokens=10, completion_tokens=5)
    d = make_daemon(
        """
        digest:
          schedule: {every: 1s}
          agent: {provider: fake, prompt: hi}
          budget: {task: {usd_per_day: 0.05}}
        """,
        top=providers(llm) + alerts_to(hooks, "[budget_alarm, budget_exhausted]"),
    ).start(env=ENV)

    def skipped() -> list[dict[str, Any]]:
        return [r for r in d.runs("digest") if r["skip_reason"] == "budget"]

    wait_for(lambda: len(skipped()) >= 3, timeout=60, what="three fires skipped for budget")
    runs = d.query("SELECT * FROM runs WHERE task_id='digest' ORDER BY scheduled_for")
    statuses = [r["status"] for r in runs if r["status"] != "skipped"]
    # 0.015 a run: three fit (0.045); the fourth's worst case (0.018) does not.
    assert statuses == ["succeeded"] * 3 + ["budget_exhausted"]
    assert len(llm.requests) == 3
    alarms = [e["data"]["threshold_pct"] for e in d.events(kind="budget_alarm")]
    assert alarms == [50, 80, 100]
    wait_for(lambda: len(hooks.delivered()) >= 4, what="alarm deliveries")
    delivered = hooks.delivered()
    assert sorted(a["data"].get("threshold_pct", 0) for a in hooks.delivered("budget_alarm")) == [
        50,
        80,
        100,
    ]
    assert len(hooks.delivered("budget_exhausted")) == 1
    for alert in delivered:
        assert verify(alert["_body"], HOOK_SECRET, alert["_headers"][SIGNATURE_HEADER])
    # More fires keep being skipped, and no alarm repeats.
    wait_for(lambda: len(skipped()) >= 5, timeout=60, what="more skipped fires")
    assert [e["data"]["threshold_pct"] for e in d.events(kind="budget_alarm")] == [50, 80, 100]
    # Spend per task and window, from the CLI and the API.
    spend = json.loads(d.cli("spend", "--task", "digest", "--json").stdout)
    [task] = spend["tasks"]
    assert task["day"]["spent_usd"] == pytest.approx(0.045)
    assert task["day"]["limit_usd"] == 0.05 and task["day"]["timezone"] == "UTC"
    api = httpx.get(f"{d.url}/v1/spend").json()
    assert api["tasks"][0]["day"]["calls"] == 3
    metrics = httpx.get(f"{d.url}/metrics").text
    assert 'agentd_llm_tokens_total{direction="output",task="digest"} 15.0' in metrics
    assert 'agentd_llm_requests_total{provider="fake",status="200"} 3.0' in metrics
    assert 'agentd_skipped_fires_total{reason="budget",task="digest"}' in metrics
    wait_for(
        lambda: (
            'agentd_budget_remaining_usd{scope="digest:day"} 0.005'
            in httpx.get(f"{d.url}/metrics").text
        ),
        what="remaining-budget gauge",
    )
    # Beside it the window's limit (0.045 of 0.05 spent: 90 %, past the 80 % alert).
    assert 'agentd_budget_limit_usd{scope="digest:day"} 0.05' in httpx.get(f"{d.url}/metrics").text
    assert d.stop() == 0
    assert_no_secrets(d)


def test_429_waits_for_retry_after_then_succeeds(make_daemon: Any, llm: FakeLLM) -> None:
    llm.queue(fake_llm.error(429, "Rate limit reached", {"Retry-After": "2"}))
    d = make_daemon(
        """
        ask:
          schedule: {manual: true}
          agent: {provider: fake, prompt: hi}
          retry: {max_attempts: 3, backoff: 50ms, max_backoff: 100ms}
        """,
        top=providers(llm),
    ).start(env=ENV)
    run_id = d.trigger("ask")
    d.wait_status(run_id, "succeeded")
    first, second = d.query("SELECT * FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,))
    assert first["http_status"] == 429 and first["error"] == "HTTP 429: Rate limit reached"
    waited = from_iso(second["started_at"]) - from_iso(first["finished_at"])
    assert waited.total_seconds() >= 2.0
    assert len(llm.requests) == 2
    assert llm.requests[1].at - llm.requests[0].at >= 2.0  # not the 100 ms backoff
    assert d.stop() == 0


def test_401_quarantines_at_once_and_alerts_with_the_provider_message(
    make_daemon: Any, llm: FakeLLM, hooks: Hooks
) -> None:
    llm.queue(fake_llm.error(401, f"Incorrect API key provided: {KEY}."))
    d = make_daemon(
        """
        ask:
          schedule: {manual: true}
          agent: {provider: fake, prompt: hi}
          retry: {max_attempts: 5, backoff: 50ms}
        """,
        top=providers(llm) + alerts_to(hooks, "[run_quarantined]"),
    ).start(env=ENV)
    run_id = d.trigger("ask")
    d.wait_status(run_id, "quarantined")
    assert len(llm.requests) == 1
    assert len(d.query("SELECT * FROM attempts WHERE run_id=?", (run_id,))) == 1
    [entry] = d.query("SELECT * FROM quarantine")
    assert entry["last_error"] == "HTTP 401: Incorrect API key provided: ***."
    [alert] = wait_for(lambda: hooks.delivered("run_quarantined"), what="quarantine alert")
    assert "HTTP 401: Incorrect API key provided: ***." in alert["summary"]
    assert d.stop() == 0
    assert_no_secrets(d)


def test_alert_raised_before_kill9_is_delivered_after_restart_once(
    make_daemon: Any, hooks: Hooks
) -> None:
    hooks.hang_next = True  # the first delivery is in flight when the daemon dies
    d = make_daemon(
        """
        bad:
          schedule: {manual: true}
          command: {shell: "exit 3"}
          retry: {max_attempts: 1}
        worse:
          schedule: {manual: true}
          command: {shell: "exit 4"}
          retry: {max_attempts: 1}
        """,
        top=alerts_to(hooks, "[run_quarantined]"),
    ).start(env=ENV)
    d.wait_status(d.trigger("bad"), "quarantined")
    wait_for(lambda: hooks.received, what="the first delivery attempt")
    d.kill9()
    hooks.release()  # that attempt now fails: the daemon that sent it is gone
    assert hooks.delivered() == []
    d.start(env=ENV)
    [first] = wait_for(lambda: hooks.delivered("run_quarantined"), what="delivery after restart")
    assert first["task"] == "bad" and "exit" in first["summary"]
    assert verify(first["_body"], HOOK_SECRET, first["_headers"][SIGNATURE_HEADER])
    # Something else happens later; the first alert is still delivered exactly once.
    d.wait_status(d.trigger("worse"), "quarantined")
    wait_for(lambda: len(hooks.delivered()) >= 2, what="the second alert")
    assert [a["task"] for a in hooks.delivered()] == ["bad", "worse"]
    assert len(d.query("SELECT * FROM alerts")) == 2  # the restart raised nothing twice
    # The hook has the body before the daemon records the 2xx: wait for the record.
    wait_for(
        lambda: (
            [r["status"] for r in d.query("SELECT status FROM outbox ORDER BY id")]
            == ["delivered", "delivered"]
        ),
        what="both outbox rows delivered",
    )
    assert d.stop() == 0


def test_dead_man_alert_then_recovery_notice_then_reload_failure(
    make_daemon: Any, hooks: Hooks
) -> None:
    tasks = """
        heartbeat:
          schedule: {manual: true}
          command: {shell: "true"}
          expect: {every: 1s, grace: 1s}
        """
    d = make_daemon(tasks, top=alerts_to(hooks)).start(env=ENV)
    [late] = wait_for(lambda: hooks.delivered("deadman"), what="the dead-man alert")
    assert late["task"] == "heartbeat" and "no success since monitoring began" in late["summary"]
    d.wait_status(d.trigger("heartbeat"), "succeeded")
    [back] = wait_for(lambda: hooks.delivered("recovered"), what="the recovery notice")
    assert back["task"] == "heartbeat" and back["data"]["what"] == "deadman"
    kinds = [a["kind"] for a in hooks.delivered()]
    assert kinds[:2] == ["deadman", "recovered"]
    # A broken config on SIGHUP keeps the old one running, and says so to a human.
    d.config.write_text(d.config.read_text().replace("every: 1s, grace", "every: soon, grace"))
    d.signal(signal.SIGHUP)
    [failed] = wait_for(lambda: hooks.delivered("config_reload_failed"), what="reload alert")
    assert "config reload failed" in failed["summary"]
    assert d.stop() == 0
