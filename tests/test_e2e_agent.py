"""End to end, the agent's tool-calling loop: the real daemon against a scripted
chat-completions server (local HTTP, this process), with real tool processes; kill -9
in the middle of a tool call and at a step boundary. What is counted: the requests the
model server got (a recorded model call is never made again) and the lines a tool
appended (a non-idempotent call is never run again)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from harness import Agentd, wait_for

from agentd.config import parse_config
from agentd.executors.toolloop import tool_spec
from agentd.providers import _prompt_estimate

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from agent_tools import SCRIPT
from fake_llm import FakeLLM, ThreadedFakeLLM, call, tool_calls

pytestmark = pytest.mark.e2e

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with ThreadedFakeLLM() as server:
        yield server


def providers(llm: FakeLLM) -> str:
    return f"""
    providers:
      fake:
        base_url: {llm.url}
        default_model: m1
        max_tokens: 50
        prices: {{m1: {{input: 0, output: 0}}}}
    """


def agent_task(out: Path, idempotent: bool = False, hold: Path | None = None) -> str:
    env = f"env: {{TOOL_HOLD: '{hold}'}}" if hold else "env: {}"
    return f"""
    tooled:
      schedule: {{manual: true}}
      agent:
        provider: fake
        system: Use the tools.
        prompt: Append a word, then add two numbers.
        max_steps: 5
        tools:
          - name: append
            description: Append a word to the list
            idempotent: {str(idempotent).lower()}
            parameters:
              type: object
              properties: {{word: {{type: string}}}}
              required: [word]
            command:
              argv: [{PY}, {SCRIPT}, {out}, "{{word}}"]
              {env}
          - name: add
            parameters:
              type: object
              properties: {{a: {{type: integer}}, b: {{type: integer}}}}
              required: [a, b]
            python: {{callable: "agent_tools:add"}}
      retry: {{max_attempts: 3, backoff: 100ms}}
    """


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def steps(d: Agentd, run_id: str) -> list[tuple[int, str, str | None]]:
    rows = d.query(
        "SELECT step, kind, call_id FROM agent_steps WHERE run_id=? ORDER BY seq", (run_id,)
    )
    return [(r["step"], r["kind"], r["call_id"]) for r in rows]


def first_calls(llm: FakeLLM) -> int:
    """Requests that carried the opening prompt alone: the run's first model call."""
    return sum(1 for r in llm.requests if len(r.body["messages"]) == 2)


def test_a_three_step_run_with_two_tools_through_the_daemon(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    out = tmp_path / "words.txt"
    llm.queue(
        tool_calls(call("append", {"word": "alpha"}, "c1")),
        tool_calls(call("add", {"a": 20, "b": 22}, "c2")),
        fake_llm.ok("alpha appended; 20 + 22 = 42"),
    )
    d = make_daemon(agent_task(out), top=providers(llm)).start()
    run_id = d.trigger("tooled")
    run = d.wait_status(run_id, "succeeded")
    assert len(llm.requests) == 3
    assert llm.requests[1].tool_results == {"c1": "appended alpha\n"}
    assert json.loads(llm.requests[2].tool_results["c2"])["sum"] == 42
    assert [line.split()[0] for line in lines(out)] == ["alpha"]
    assert steps(d, run_id) == [
        (1, "model", None),
        (1, "tool_started", "c1"),
        (1, "tool_result", "c1"),
        (2, "model", None),
        (2, "tool_started", "c2"),
        (2, "tool_result", "c2"),
        (3, "model", None),
    ]
    ws = d.state_dir / "runs" / "tooled" / run_id
    assert (ws / "result.md").read_text() == "alpha appended; 20 + 22 = 42"
    transcript = [json.loads(x) for x in (ws / "transcript.jsonl").read_text().splitlines()]
    assert [(t["step"], t["kind"], t["call_id"]) for t in transcript] == steps(d, run_id)
    assert run["outcome"] == "success"
    assert "agent step recorded run=" in d.log()
    assert d.stop() == 0


@pytest.mark.parametrize("idempotent", [False, True], ids=["not-idempotent", "idempotent"])
def test_kill_9_in_the_middle_of_a_tool_call(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path, idempotent: bool
) -> None:
    out, hold = tmp_path / "words.txt", tmp_path / "hold"
    llm.queue(tool_calls(call("append", {"word": "once"}, "c1")), fake_llm.ok("done"))
    d = make_daemon(agent_task(out, idempotent, hold), top=providers(llm)).start()
    run_id = d.trigger("tooled")
    try:
        wait_for(lambda: len(lines(out)) == 1, what="the tool to be running")
        d.kill9()
    finally:
        hold.touch()  # lets the killed daemon's orphaned tool end
    assert steps(d, run_id) == [(1, "model", None), (1, "tool_started", "c1")]
    d.start()
    if idempotent:
        d.wait_status(run_id, "succeeded")
        first, again = lines(out)
        assert first == again and first.startswith("once agentd-")  # the same key
        assert len(llm.requests) == 2 and llm.requests[1].tool_results == {"c1": "appended once\n"}
        assert "agent tool call runs again (idempotent)" in d.log()
    else:
        # Never run again unasked: the run parks for an operator, who may approve it.
        run = d.wait_status(run_id, "awaiting_approval")
        assert "tool call c1 (append, step 1)" in run["error"]
        assert "its outcome is unknown and the tool is not idempotent" in run["error"]
        assert len(lines(out)) == 1 and len(llm.requests) == 1
        assert steps(d, run_id) == [
            (1, "model", None),
            (1, "tool_started", "c1"),
            (1, "approval_requested", "c1"),
        ]
        [parked] = json.loads(d.cli("approvals", "--json").stdout)
        assert (parked["run_id"], parked["call_id"], parked["reason"]) == (
            run_id,
            "c1",
            "unknown_outcome",
        )
        assert parked["arguments"] == {"word": "once"}
        d.cli("approve", run_id, "--call", "c1")
        d.wait_status(run_id, "succeeded")
        first, again = lines(out)
        assert first == again  # run again on the operator's word, with the same key
        assert "agent tool call runs again (approved by an operator)" in d.log()
    assert first_calls(llm) == 1  # the recorded first model call was not made again
    assert d.stop() == 0


@pytest.mark.parametrize("step", [1, 2, 3])
def test_kill_9_at_a_step_boundary_resumes_at_the_step(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path, step: int
) -> None:
    """Killed while model call ``step`` of a 3-step run with two tools is in flight
    (everything before it recorded): the restarted run asks for that step again and for
    nothing before it, and runs no recorded tool call again."""
    out = tmp_path / "words.txt"
    replies = [
        tool_calls(call("append", {"word": "w"}, "c1")),
        tool_calls(call("add", {"a": 1, "b": 2}, "c2")),
        fake_llm.ok("finished"),
    ]
    llm.queue(*replies[: step - 1], fake_llm.Reply(hang=True))
    d = make_daemon(agent_task(out), top=providers(llm)).start()
    run_id = d.trigger("tooled")
    wait_for(lambda: len(llm.requests) == step, what=f"model call {step}")
    d.kill9()
    recorded = [
        (1, "model", None),
        (1, "tool_started", "c1"),
        (1, "tool_result", "c1"),
        (2, "model", None),
        (2, "tool_started", "c2"),
        (2, "tool_result", "c2"),
    ]
    assert steps(d, run_id) == recorded[: 3 * (step - 1)]
    llm.queue(*replies[step - 1 :])
    d.start()
    d.wait_status(run_id, "succeeded")
    assert len(llm.requests) == 4  # three, and the one cut off asked again
    assert llm.requests[step].body["messages"] == llm.requests[step - 1].body["messages"]
    assert first_calls(llm) == (2 if step == 1 else 1)  # recorded calls are not made again
    assert len(lines(out)) == 1  # the non-idempotent tool ran once
    assert steps(d, run_id) == [*recorded, (3, "model", None)]
    assert d.stop() == 0


def test_sigterm_mid_tool_call_lets_the_call_finish_and_resumes_at_the_next_step(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    """A drain lets the running tool call end (within shutdown_grace), records its result
    and stops at the step boundary; the next start asks the model for step 2 only."""
    out, hold = tmp_path / "words.txt", tmp_path / "hold"
    llm.queue(tool_calls(call("append", {"word": "w"}, "c1")), fake_llm.ok("done"))
    d = make_daemon(agent_task(out, hold=hold), top=providers(llm)).start()
    run_id = d.trigger("tooled")
    try:
        wait_for(lambda: len(lines(out)) == 1, what="the tool to be running")
        d.signal(signal.SIGTERM)
        d.wait_log("agentd stopping", "the drain to begin")
    finally:
        hold.touch()
    assert d.proc is not None and d.proc.wait(timeout=60) == 0
    assert d.run_status(run_id) == "queued"  # interrupted at the boundary: it resumes
    assert steps(d, run_id) == [
        (1, "model", None),
        (1, "tool_started", "c1"),
        (1, "tool_result", "c1"),
    ]
    assert len(llm.requests) == 1
    d.start()
    d.wait_status(run_id, "succeeded")
    assert len(lines(out)) == 1 and len(llm.requests) == 2 and first_calls(llm) == 1
    assert d.stop() == 0


def test_a_secret_in_a_tool_result_reaches_neither_the_db_nor_the_transcript(
    make_daemon: Any, llm: FakeLLM
) -> None:
    key = "sk-e2e-TOOL-SECRET-9876"
    llm.queue(tool_calls(call("leak", {}, "c1")), fake_llm.ok("done"))
    d = make_daemon(
        """
        leaky:
          schedule: {manual: true}
          agent:
            provider: fake
            prompt: Look.
            tools:
              - name: leak
                command:
                  argv: [sh, -c, 'echo "key=$K"']
                  env: {K: "${AGENTD_E2E_KEY}"}
        """,
        top=providers(llm).replace(
            "default_model: m1\n", "default_model: m1\n        api_key_env: AGENTD_E2E_KEY\n"
        ),
    ).start(env={"AGENTD_E2E_KEY": key})
    run_id = d.trigger("leaky")
    d.wait_status(run_id, "succeeded")
    assert llm.requests[1].tool_results == {"c1": f"key={key}\n"}  # the model did see it
    [result] = d.query("SELECT payload FROM agent_steps WHERE kind='tool_result'")
    assert key not in result["payload"] and "key=[redacted]" in result["payload"]
    transcript = (d.state_dir / "runs" / "leaky" / run_id / "transcript.jsonl").read_text()
    assert key not in transcript and "key=[redacted]" in transcript
    assert d.stop() == 0


def test_an_answer_that_never_matches_the_schema_is_quarantined_after_its_retries(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    """Every answer breaks response_format: each attempt ends invalid_output (retryable),
    is recorded as a rejected answer, and the next attempt asks the model again, told
    why; when max_attempts are spent the run is quarantined with the error."""
    out = tmp_path / "words.txt"
    llm.queue(tool_calls(call("append", {"word": "w"}, "c1")))
    llm.default = lambda req: fake_llm.ok('{"verdict": "fine"}')
    tasks = agent_task(out).replace(
        "      retry:",
        """        response_format:
          name: verdict
          schema:
            type: object
            properties: {healthy: {type: boolean}}
            required: [healthy]
      retry:""",
    )
    d = make_daemon(tasks, top=providers(llm)).start()
    run_id = d.trigger("tooled")
    run = d.wait_status(run_id, "quarantined")
    assert run["error"] == (
        "invalid output: the answer does not match response_format verdict at /:"
        " 'healthy' is a required property"
    )
    attempts = d.query(
        "SELECT outcome, error FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,)
    )
    assert [a["outcome"] for a in attempts] == ["failure"] * 3
    assert all(str(a["error"]).startswith("invalid output: ") for a in attempts)
    assert len(llm.requests) == 4  # the tool call, then one answer per attempt
    assert all(r.body["response_format"]["json_schema"]["name"] == "verdict" for r in llm.requests)
    assert (
        llm.requests[3]
        .body["messages"][-1]["content"]
        .startswith(
            "Your answer does not match the required JSON schema at /: 'healthy' is a required"
        )
    )
    assert [k for _, k, _ in steps(d, run_id)].count("output_rejected") == 3
    assert len(lines(out)) == 1  # the tool ran once, in the first attempt
    ws = d.state_dir / "runs" / "tooled" / run_id
    assert not (ws / "result.json").exists()
    assert "agent answer rejected run=" in d.log()
    assert d.stop() == 0


def test_the_shipped_config_runs_its_offline_agent_example(make_daemon: Any) -> None:
    """config/agentd.yaml as it ships (state dir and port moved to the test's): its
    host-check-offline runs on the built-in example model, with no key and no network,
    and ends with a result.json that matches its schema; the keyed host-check stays
    inactive without OPENAI_API_KEY and does not keep the daemon from starting."""
    d = make_daemon("unused: {schedule: {manual: true}, command: {argv: ['true']}}")
    shipped = (ROOT / "config" / "agentd.yaml").read_text()
    assert shipped.count("${STATE_DIRECTORY:-./var}") == 1 and shipped.count("port: 8787") == 1
    d.config.write_text(
        shipped.replace("${STATE_DIRECTORY:-./var}", str(d.state_dir)).replace(
            "port: 8787", f"port: {d.port}"
        )
    )
    env = {"OPENAI_API_KEY": "", "HOSTNAME": "testhost"}
    d.start(env=env)
    tasks = {t["task"]: t for t in json.loads(d.cli("tasks", "--json").stdout)}
    assert tasks["host-check"]["paused"] == "inactive: API key variable OPENAI_API_KEY is not set"
    assert tasks["host-check-offline"]["paused"] == "no"
    run_id = d.trigger("host-check-offline")
    d.wait_status(run_id, "succeeded", timeout=60)
    ws = d.state_dir / "runs" / "host-check-offline" / run_id
    verdict = json.loads((ws / "result.json").read_text())
    assert set(verdict) == {"healthy", "summary"} and verdict["healthy"] is True
    assert "disk_usage: " in verdict["summary"] and "load_average: " in verdict["summary"]
    assert json.loads((ws / "result.md").read_text()) == verdict
    assert [k for _, k, _ in steps(d, run_id)] == [
        "model",
        "tool_started",
        "tool_result",
        "tool_started",
        "tool_result",
        "model",
    ]
    ledger = d.query("SELECT provider, model, cost_usd FROM ledger WHERE run_id=?", (run_id,))
    assert [(r["provider"], r["model"], r["cost_usd"]) for r in ledger] == [
        ("example", "example", 0.0)
    ] * 2
    assert "provider example is the built-in example model (not an LLM)" in d.log()
    assert d.stop() == 0


def test_an_agent_killed_mid_tool_call_is_resumed_at_its_step_by_another_node(
    tmp_path: Path, pg_url: str
) -> None:
    """kill -9 of the node running an agent's idempotent tool call: another node
    recovers the run, resumes it at the step from the shared steps, runs the call again
    with the same Idempotency-Key and never repeats the recorded model call."""
    out, hold = tmp_path / "words.txt", tmp_path / "hold"
    tasks = f"""
    tooled:
      schedule: {{manual: true}}
      agent:
        provider: fake
        prompt: Append a word.
        tools:
          - name: append
            idempotent: true
            parameters: {{type: object, properties: {{word: {{type: string}}}}}}
            command:
              argv: [{sys.executable}, {SCRIPT}, {out}, "{{word}}"]
              env: {{TOOL_HOLD: "{hold}"}}
    """

    def words() -> list[str]:
        return out.read_text().splitlines() if out.exists() else []

    with ThreadedFakeLLM() as llm:
        top = f"providers: {{fake: {{base_url: '{llm.url}', default_model: m1}}}}"
        top = f"state: {{url: '{pg_url}'}}\n{top}"
        llm.queue(
            tool_calls(call("append", {"word": "w"}, "c1")),
            fake_llm.ok("done"),
        )
        with _nodes(tmp_path, tasks, top, 2) as nodes:
            run_id = nodes[0].trigger("tooled")
            try:
                wait_for(lambda: len(words()) == 1, what="the tool to be running")
                with psycopg.connect(pg_url) as conn:
                    [(owner,)] = conn.execute(
                        "SELECT lease_owner FROM runs WHERE id=%s", (run_id,)
                    ).fetchall()
                [victim] = [n for n in nodes if n.proc and str(owner).endswith(f":{n.proc.pid}")]
                victim.kill9()
            finally:
                hold.touch()
            [other] = [n for n in nodes if n is not victim]
            other.wait_log("agent tool call runs again (idempotent)", "the resumed call", 60)
            wait_for(
                lambda: _status(pg_url, run_id) == "succeeded", what="the run to end", timeout=60
            )
            first, again = words()
            assert first == again  # the same idempotency key on both nodes
            assert len(llm.requests) == 2
            assert sum(1 for r in llm.requests if len(r.body["messages"]) == 1) == 1
            with psycopg.connect(pg_url) as conn:
                kinds = [
                    k
                    for (k,) in conn.execute(
                        "SELECT kind FROM agent_steps WHERE run_id=%s ORDER BY seq", (run_id,)
                    )
                ]
            assert kinds == ["model", "tool_started", "tool_result", "model"]
            assert other.stop() == 0


def _status(url: str, run_id: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT status FROM runs WHERE id=%s", (run_id,)).fetchone()
    return None if row is None else str(row[0])


@contextlib.contextmanager
def _nodes(root: Path, tasks: str, top: str, n: int) -> Iterator[list[Agentd]]:
    """``n`` started daemons, each with its own state dir and port, on one database."""
    nodes = []
    for i in range(n):
        (root / f"node{i}").mkdir()
        nodes.append(Agentd(root / f"node{i}", tasks, top=top))
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.kill9()


def sensitive_task(out: Path, extra: str = "", sensitive: str = "sensitive: true") -> str:
    return f"""
    guarded:
      schedule: {{manual: true}}
      agent:
        provider: fake
        prompt: Push the word.
        approval_timeout: 1h
        {extra}
        tools:
          - name: push
            {sensitive}
            parameters:
              type: object
              properties: {{word: {{type: string}}}}
              required: [word]
            command: {{argv: [{PY}, {SCRIPT}, {out}, "{{word}}"]}}
    """


def alert_channel(sink: Path) -> str:
    script = f"import sys; open({str(sink)!r}, 'a').write(sys.stdin.read() + chr(10))"
    return f"""
    alerts:
      channels:
        pager: {{command: {{argv: [{PY!r}, -c, {script!r}]}}}}
      rules:
        - {{events: [approval_needed], channels: [pager], cooldown: 0s}}
    """


def test_a_sensitive_call_parks_alerts_and_runs_once_approved(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    out, sink = tmp_path / "words.txt", tmp_path / "alerts.jsonl"
    llm.queue(tool_calls(call("push", {"word": "prod"}, "c1")), fake_llm.ok("pushed"))
    d = make_daemon(sensitive_task(out), top=providers(llm) + alert_channel(sink)).start()
    run_id = d.trigger("guarded")
    run = d.wait_status(run_id, "awaiting_approval")
    assert not out.exists() and len(llm.requests) == 1
    assert "the tool is sensitive" in run["error"] and '{"word": "prod"}' in run["error"]
    assert "agent run parked for an approval run=" in d.log()
    wait_for(lambda: sink.exists() and "approval_needed" in sink.read_text(), what="the alert")
    alert = json.loads(sink.read_text().splitlines()[0])
    assert alert["kind"] == "approval_needed" and alert["run_id"] == run_id
    assert f"agentd approve {run_id}" in alert["summary"]
    table = d.cli("approvals").stdout
    assert run_id in table and "push" in table and "sensitive" in table
    d.cli("approve", run_id)
    d.wait_status(run_id, "succeeded")
    assert [line.split()[0] for line in lines(out)] == ["prod"]
    assert llm.requests[1].tool_results == {"c1": "appended prod\n"}
    [decided] = d.events(run_id, "approval")
    assert decided["data"]["decision"] == "approve" and decided["data"]["tool"] == "push"
    [audit] = d.events(run_id, "tool_call")
    assert audit["data"]["tool"] == "push" and audit["data"]["outcome"] == "ok"
    assert len(audit["data"]["arguments_sha256"]) == 64
    assert d.stop() == 0


def test_deny_skip_and_approval_timeout(make_daemon: Any, llm: FakeLLM, tmp_path: Path) -> None:
    """Over the API: deny ends a run denied; skip tells the model (with the note) and the
    run goes on; a run nobody decides on is denied at its approval_timeout."""
    out = tmp_path / "words.txt"
    d = make_daemon(sensitive_task(out), top=providers(llm)).start()
    api = d.url + "/v1/approvals"

    llm.queue(tool_calls(call("push", {"word": "a"}, "c1")))
    denied = d.trigger("guarded")
    d.wait_status(denied, "awaiting_approval")
    wrong = httpx.post(f"{api}/{denied}/approve", json={"call_id": "c9"})
    assert wrong.status_code == 409 and wrong.json()["error"] == "wrong_call"
    assert httpx.post(f"{api}/{denied}/maybe").status_code == 404
    assert httpx.post(f"{api}/{denied}/deny", json={"note": "not now"}).json()["status"] == "denied"
    assert d.wait_status(denied, "denied")["error"] == "denied by operator: not now"
    again = httpx.post(f"{api}/{denied}/approve")
    assert again.status_code == 409 and again.json()["error"] == "not_awaiting_approval"

    llm.queue(tool_calls(call("push", {"word": "b"}, "c1")), fake_llm.ok("skipped it"))
    skipped = d.trigger("guarded")
    d.wait_status(skipped, "awaiting_approval")
    answer = httpx.post(f"{api}/{skipped}/skip", json={"note": "done by hand"})
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    d.wait_status(skipped, "succeeded")
    assert llm.requests[-1].tool_results == {
        "c1": "error: an operator skipped this call: done by hand"
    }
    assert not out.exists()
    [audit] = d.events(skipped, "tool_call")
    assert audit["data"]["outcome"] == "skipped"
    assert d.stop() == 0

    d.write_config(sensitive_task(out).replace("approval_timeout: 1h", "approval_timeout: 1s"))
    d.start()
    llm.queue(tool_calls(call("push", {"word": "c"}, "c1")))
    timed_out = d.trigger("guarded")
    run = d.wait_status(timed_out, "denied", timeout=60)  # within a lease (5 s) of 1 s
    assert run["error"] == "approval timed out (approval_timeout)"
    assert "approval timed out run=" in d.log()
    assert not out.exists()
    assert d.stop() == 0


def test_a_run_triggered_with_approve_sensitive_does_not_park(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    """--approve-sensitive approves in advance; limits.sensitive_tools marks by pattern."""
    out = tmp_path / "words.txt"
    top = providers(llm) + "\nlimits:\n  sensitive_tools: [pu*]\n"
    d = make_daemon(sensitive_task(out, sensitive=""), top=top).start()
    llm.queue(tool_calls(call("push", {"word": "x"}, "c1")), fake_llm.ok("ok"))
    run_id = json.loads(d.cli("trigger", "guarded", "--approve-sensitive", "--json").stdout)[
        "run_id"
    ]
    d.wait_status(run_id, "succeeded")
    assert [line.split()[0] for line in lines(out)] == ["x"]
    llm.queue(tool_calls(call("push", {"word": "y"}, "c1")))
    parked = d.trigger("guarded")  # the pattern makes it sensitive
    d.wait_status(parked, "awaiting_approval")
    assert json.loads(d.cli("cancel", parked, "--json").stdout)["status"] == "cancelled"
    assert d.run_status(parked) == "cancelled"
    assert [line.split()[0] for line in lines(out)] == ["x"]
    assert d.stop() == 0


def test_a_run_its_budget_stopped_resumes_at_the_step_once_the_budget_is_raised(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    """The run budget admits the first model call, not the second: the run ends
    budget_exhausted at step 2; with the budget raised (SIGHUP), `agentd runs resume`
    queues it again and it makes only the refused call."""
    out = tmp_path / "words.txt"

    def task(tokens: int) -> str:
        return f"""
        frugal:
          schedule: {{manual: true}}
          agent:
            provider: fake
            system: Use the tools.
            prompt: Do the thing.
            max_tokens: 10
            tools:
              - name: append
                parameters:
                  type: object
                  properties: {{word: {{type: string}}}}
                  required: [word]
                command: {{argv: [{PY}, {SCRIPT}, {out}, "{{word}}"]}}
          budget: {{run: {{tokens: {tokens}}}}}
        """

    text = (
        textwrap.dedent(providers(llm))
        + "tasks:\n"
        + textwrap.indent(textwrap.dedent(task(1)), "  ")
    )
    parsed = parse_config(text, "t", {})
    agent = parsed.tasks["frugal"].agent
    assert agent is not None and agent.tools is not None
    first = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Do the thing."},
    ]
    need = _prompt_estimate(first, [tool_spec(t) for t in agent.tools]) + 10
    llm.queue(tool_calls(call("append", {"word": "w"}, "c1")))
    d = make_daemon(task(need + 5), top=providers(llm)).start()
    run_id = d.trigger("frugal")
    run = d.wait_status(run_id, "budget_exhausted")
    assert "budget run tokens exhausted" in run["error"]
    refused = d.cli("runs", "resume", "no-such-run", check=False)
    assert refused.returncode != 0 and "no run" in refused.stderr
    d.write_config(task(100000))
    d.signal(signal.SIGHUP)
    d.wait_log("reload ok generation=2", "the reload")
    llm.queue(fake_llm.ok("done"))
    assert json.loads(d.cli("runs", "resume", run_id, "--json").stdout)["status"] == "queued"
    d.wait_status(run_id, "succeeded")
    assert len(llm.requests) == 2 and first_calls(llm) == 1
    assert llm.requests[1].tool_results == {"c1": "appended w\n"}
    assert len(lines(out)) == 1
    assert [e["kind"] for e in d.events(run_id) if e["kind"] == "run_resumed"] == ["run_resumed"]
    again = d.cli("runs", "resume", run_id, check=False)
    assert again.returncode != 0 and "only a budget_exhausted run resumes" in again.stderr
    assert d.stop() == 0


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_9_mid_tool_call_ends_the_orphaned_call_before_the_run_resumes(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    """A tool's process group is recorded with the attempt: the daemon killed, the call
    still running, the restarted daemon ends it before it resumes the run, so the call
    (idempotent, so run again) never runs beside its own re-execution."""
    out, hold = tmp_path / "words.txt", tmp_path / "hold"
    llm.queue(tool_calls(call("append", {"word": "once"}, "c1")), fake_llm.ok("done"))
    d = make_daemon(agent_task(out, True, hold), top=providers(llm)).start()
    run_id = d.trigger("tooled")
    try:
        wait_for(lambda: len(lines(out)) == 1, what="the tool to be running")
        [group] = wait_for(
            lambda: d.query(
                "SELECT pgid FROM attempts WHERE run_id=? AND pgid IS NOT NULL", (run_id,)
            ),
            what="the tool's group to be recorded",
        )
        d.kill9()
        assert running(group["pgid"])  # the call outlives the daemon
        d.start()
        wait_for(lambda: d.events(run_id, "orphan_killed"), what="the orphaned call to be ended")
        wait_for(lambda: not running(group["pgid"]), what="the orphaned call to be gone")
    finally:
        hold.touch()
    d.wait_status(run_id, "succeeded")
    first, again = lines(out)
    assert first == again  # run again, once, after the first was ended
    assert d.stop() == 0


def test_kill_9_with_items_in_flight_asks_again_only_the_items_not_done(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    """``items_concurrency: 3``: killed while three item calls hang (three items done),
    the restarted run asks only for the items its checkpoint does not count done (the
    three cut off and the rest), never one that was answered."""
    items = [f"i{n}" for n in range(8)]
    hanging = {"i3", "i4", "i5"}
    llm.default = lambda req: (
        fake_llm.Reply(hang=True) if req.user_content in hanging else fake_llm.ok(req.user_content)
    )
    task = f"""
    fanout:
      schedule: {{manual: true}}
      agent:
        provider: fake
        prompt: "{{item}}"
        items: {json.dumps(items)}
        items_concurrency: 3
    """
    d = make_daemon(task, top=providers(llm)).start()
    run_id = d.trigger("fanout")
    wait_for(lambda: len(llm.requests) == 6 and llm.in_flight == 3, what="three calls hanging")

    def saved() -> Any:
        rows = d.query("SELECT data FROM checkpoints WHERE run_id=?", (run_id,))
        return json.loads(rows[0]["data"]) if rows else None

    wait_for(lambda: saved() == {"next_item": 3}, what="items 0-2 checkpointed")
    d.kill9()
    first = [r.user_content for r in llm.requests]
    assert sorted(first) == [f"i{n}" for n in range(6)]
    hanging.clear()
    d.start()
    d.wait_status(run_id, "succeeded", timeout=60)
    again = [r.user_content for r in llm.requests[6:]]
    assert sorted(again) == [f"i{n}" for n in range(3, 8)]
    assert saved() == {"next_item": 8}
    assert d.stop() == 0
