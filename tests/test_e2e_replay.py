"""End to end, an agent run's transcript and its offline replay (issue 27): the real
daemon records a run of an agent with two tools (a command that appends a line to a
file, a Python function) against the scripted chat-completions server; then the CLI
shows the transcript (daemon running and stopped) and replays the run, with the
recorded replies (``--cassette``) or against the scripted server answering anew.

What is counted: the lines the command tool appended (a replay executes no tool), the
requests the scripted server got (a cassette asks for nothing; a replay sends what the
flags say), and the state DB's rows (a replay records nothing: no step, no ledger
entry, no run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Agentd

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from agent_tools import SCRIPT
from fake_llm import FakeLLM, ThreadedFakeLLM, call, tool_calls

pytestmark = pytest.mark.e2e

PY = sys.executable
KEY = "sk-replay-test-key-4f1c9a"
"""The provider's API key, in the daemon's and the CLI's environment only."""
PROMPT = "Append a word, then add two numbers."
SYSTEM = "Use the tools."
ANSWER = "alpha appended; 20 + 22 = 42"


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with ThreadedFakeLLM() as server:
        yield server


def config(llm: FakeLLM, out: Path, params: str = "{}") -> tuple[str, str]:
    """(tasks, top): the agent task ``tooled`` with its two tools and ``params``, the
    provider ``fake`` (priced, so costs are not all zero), and a task without tools."""
    top = f"""
    providers:
      fake:
        base_url: {llm.url}
        api_key_env: REPLAY_KEY
        default_model: m1
        max_tokens: 50
        prices: {{m1: {{input: 1, output: 2}}, m2: {{input: 10, output: 20}}}}
    """
    tasks = f"""
    tooled:
      schedule: {{manual: true}}
      params: {params}
      agent:
        provider: fake
        system: {SYSTEM}
        prompt: {PROMPT}
        max_steps: 5
        tools:
          - name: append
            description: Append a word to the list
            parameters:
              type: object
              properties: {{word: {{type: string}}}}
              required: [word]
            command:
              argv: [{PY}, {SCRIPT}, {out}, "{{word}}"]
          - name: add
            parameters:
              type: object
              properties: {{a: {{type: integer}}, b: {{type: integer}}}}
              required: [a, b]
            python: {{callable: "agent_tools:add"}}
    plain:
      schedule: {{manual: true}}
      command: {{argv: ["true"]}}
    """
    return tasks, top


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def cli(d: Agentd, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the provider's key in its environment, as an operator's shell has it."""
    cmd = [sys.executable, "-m", "agentd.cli", args[0], "--config", str(d.config), *args[1:]]
    env = {**os.environ, "REPLAY_KEY": KEY, "TMPDIR": str(d.root)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def rows(d: Agentd) -> dict[str, int]:
    """How many rows the state DB holds of what a replay must not write."""
    tables = ("runs", "attempts", "agent_steps", "ledger")
    return {t: d.query(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in tables}


def record(make_daemon: Any, llm: FakeLLM, tmp_path: Path) -> tuple[Agentd, str, Path]:
    """A recorded three-step run: append alpha, add 20 + 22, answer."""
    out = tmp_path / "words.txt"
    tasks, top = config(llm, out)
    llm.queue(
        tool_calls(call("append", {"word": "alpha"}, "c1")),
        tool_calls(call("add", {"a": 20, "b": 22}, "c2")),
        fake_llm.ok(ANSWER, prompt_tokens=100, completion_tokens=7),
    )
    d = make_daemon(tasks, top=top).start(env={"REPLAY_KEY": KEY})
    run_id = d.trigger("tooled")
    d.wait_status(run_id, "succeeded")
    assert len(llm.requests) == 3 and len(lines(out)) == 1
    return d, run_id, out


def transcript(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recorded_steps(d: Agentd, run_id: str) -> list[tuple[int, str, str | None]]:
    found = d.query(
        "SELECT step, kind, call_id FROM agent_steps WHERE run_id=? ORDER BY seq", (run_id,)
    )
    return [(r["step"], r["kind"], r["call_id"]) for r in found]


def test_runs_show_transcript_with_the_daemon_running_and_stopped(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    d, run_id, _ = record(make_daemon, llm, tmp_path)
    shown = []
    for _daemon in ("running", "stopped"):
        text = cli(d, "runs", "show", run_id, "--transcript")
        assert text.returncode == 0, text.stderr
        as_json = cli(d, "runs", "show", run_id, "--transcript", "--json")
        assert as_json.returncode == 0, as_json.stderr
        shown.append((text.stdout, json.loads(as_json.stdout)))
        assert d.stop() == 0
    assert shown[0] == shown[1]  # the API's answer and the read-only state DB's
    text, body = shown[0]
    assert body["run_id"] == run_id
    steps = body["steps"]
    assert [(s["step"], s["kind"], s["call_id"]) for s in steps] == recorded_steps(d, run_id)
    assert steps[2]["payload"]["content"] == "appended alpha\n"
    out = text.splitlines()
    assert out[0].split() == ["SEQ", "STEP", "KIND", "CALL", "TOOL", "DETAIL"]
    assert len(out) == 1 + 7
    assert out[1].split()[:4] == ["1", "1", "model", "-"]
    assert '1 call(s): append {"word":"alpha"}' in out[1]
    assert "(tokens 10 in, 5 out, $0.000020)" in out[1]
    assert out[2].split()[:5] == ["2", "1", "tool_started", "c1", "append"]
    assert out[2].endswith('{"word":"alpha"}')
    assert out[3].split()[:5] == ["3", "1", "tool_result", "c1", "append"]
    assert "ok in " in out[3] and out[3].endswith("s: appended alpha")
    assert f"answer: {ANSWER}" in out[7] and "(tokens 100 in, 7 out," in out[7]


def test_a_run_without_steps_shows_an_empty_transcript(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    tasks, top = config(llm, tmp_path / "words.txt")
    d = make_daemon(tasks, top=top).start()
    run_id = d.trigger("plain")
    d.wait_status(run_id, "succeeded")
    shown = cli(d, "runs", "show", run_id, "--transcript", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"run_id": run_id, "steps": []}
    assert cli(d, "runs", "show", run_id, "--transcript").stdout == "(no recorded steps)\n"
    gone = cli(d, "runs", "show", "nope", "--transcript")
    assert gone.returncode == 1 and "no run 'nope'" in gone.stderr
    assert d.stop() == 0


def test_replay_with_a_cassette_reproduces_the_run_and_runs_no_tool(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    d, run_id, words = record(make_daemon, llm, tmp_path)
    before = rows(d)
    out = tmp_path / "replayed"
    done = cli(d, "runs", "replay", run_id, "--cassette", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["same"] is True and report["stopped"] is None
    assert report["mode"] == "cassette" and report["outcome"] == {"ok": True, "error": None}
    assert report["diff"] == {"answer": [], "tool_calls": []}
    assert report["old"] == report["new"]
    assert report["new"]["answer"] == ANSWER and report["new"]["steps"] == 3
    assert report["new"]["tool_calls"] == [
        {"tool": "append", "arguments": '{"word":"alpha"}'},
        {"tool": "add", "arguments": '{"a":20,"b":22}'},
    ]
    assert report["new"]["input_tokens"] == 120 and report["new"]["output_tokens"] == 17
    assert report["transcript"] == str(out / "transcript.jsonl")
    assert (out / "result.md").read_text() == ANSWER

    # The same records as the daemon's, the model's replies and the tools' results equal.
    old = transcript(d.state_dir / "runs" / "tooled" / run_id / "transcript.jsonl")
    new = transcript(out / "transcript.jsonl")
    assert [(r["step"], r["kind"], r["call_id"]) for r in new] == recorded_steps(d, run_id)
    for a, b in zip(old, new, strict=True):
        if a["kind"] == "tool_result":
            a["payload"].pop("duration_s"), b["payload"].pop("duration_s")
        assert a["payload"] == b["payload"]
    # No tool ran again, no model was asked, nothing was recorded in the state DB.
    assert len(lines(words)) == 1
    assert len(llm.requests) == 3
    assert rows(d) == before

    # The same, as text, with the daemon stopped (the steps from the state DB, read only).
    assert d.stop() == 0
    text = cli(d, "runs", "replay", run_id, "--cassette")
    assert text.returncode == 0, text.stderr
    assert "model replies served from the recording (--cassette)" in text.stdout
    assert "tool calls: same" in text.stdout and "answer: same" in text.stdout
    assert text.stdout.rstrip().endswith("result: same as the recording")
    assert "replay done" in text.stderr and "same=yes" in text.stderr
    named = [ln for ln in text.stdout.splitlines() if ln.startswith("new transcript: ")]
    temp = Path(named[0].removeprefix("new transcript: "))
    assert temp.parent.parent == d.root and temp.parent.name.startswith("agentd-replay-")
    assert [r["kind"] for r in transcript(temp)] == [r["kind"] for r in new]
    assert len(lines(words)) == 1 and rows(d) == before


def test_replay_against_the_provider_answering_differently_shows_the_diff(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    d, run_id, words = record(make_daemon, llm, tmp_path)
    before = rows(d)
    llm.queue(
        tool_calls(call("append", {"word": "alpha"}, "r1")),
        tool_calls(call("add", {"b": 22, "a": 20}, "r2")),  # same arguments, other order
        fake_llm.ok("twenty and twenty-two make 42", prompt_tokens=90, completion_tokens=9),
    )
    done = cli(d, "runs", "replay", run_id)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "model m1 at provider fake" in text
    assert "tool calls: same" in text
    assert "answer: differ" in text
    assert f"  -{ANSWER}" in text and "  +twenty and twenty-two make 42" in text
    table = {ln[:14].strip(): ln[14:].split() for ln in text.splitlines()[2:8]}
    assert table == {
        "": ["OLD", "NEW"],
        "steps": ["3", "3"],
        "tool calls": ["2", "2"],
        "input tokens": ["120", "110", "(differs)"],
        "output tokens": ["17", "19", "(differs)"],
        "cost usd": ["0.000154", "0.000148", "(differs)"],
    }
    assert text.rstrip().endswith("result: different")

    # The model was asked three times, with the recorded results as the tools' answers.
    replayed = llm.requests[3:]
    assert len(replayed) == 3
    assert replayed[1].tool_results == {"r1": "appended alpha\n"}
    assert json.loads(replayed[2].tool_results["r2"]) == {"sum": 42, "run": run_id}
    assert [m["content"] for m in replayed[0].body["messages"]] == [SYSTEM, PROMPT]
    assert replayed[0].body["model"] == "m1" and replayed[0].body["tools"]
    assert replayed[0].headers["Authorization"] == f"Bearer {KEY}"
    # No tool ran, nothing was recorded: the replay's calls are in no ledger.
    assert len(lines(words)) == 1
    assert rows(d) == before

    as_json = cli(d, "runs", "replay", run_id, "--json")  # the scripted server echoes now
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and report["same"] is False
    assert report["new"]["steps"] == 1 and report["new"]["tool_calls"] == []
    assert report["new"]["answer"] == f"echo: {PROMPT}"
    assert report["diff"]["tool_calls"][2:] == [
        "@@ -1,2 +0,0 @@",
        '-append {"word":"alpha"}',
        '-add {"a":20,"b":22}',
    ]
    assert KEY not in as_json.stdout and KEY not in Path(report["transcript"]).read_text()
    assert d.stop() == 0


def test_a_call_the_recording_does_not_have_stops_the_replay(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    d, run_id, words = record(make_daemon, llm, tmp_path)
    before = rows(d)
    llm.queue(tool_calls(call("append", {"word": "beta"}, "r1")))
    stopped = cli(d, "runs", "replay", run_id)
    assert stopped.returncode == 1, stopped.stderr
    said = (
        'step 1: the model asked for append {"word":"beta"}, which the recording does not'
        " have (no tool is run in a replay)"
    )
    assert f"agentd: replay stopped: {said}" in stopped.stderr
    assert f"STOPPED: {said}" in stopped.stdout
    assert len(llm.requests) == 4  # no call after the stop
    assert len(lines(words)) == 1 and rows(d) == before

    # As JSON; and a provider's error stops it too.
    llm.queue(fake_llm.error(500, "the model is down"))
    failed = cli(d, "runs", "replay", run_id, "--json")
    assert failed.returncode == 1
    report = json.loads(failed.stdout)
    assert report["stopped"] == "step 1: the provider failed: HTTP 500: the model is down"
    assert report["outcome"] is None and report["same"] is False
    assert d.stop() == 0


def test_prompt_system_and_model_overrides_change_what_is_sent(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    d, run_id, _ = record(make_daemon, llm, tmp_path)
    assert d.stop() == 0
    prompt, system = tmp_path / "prompt.txt", tmp_path / "system.txt"
    prompt.write_text("Add {x} and two, no appending.")
    system.write_text("Be brief.")
    llm.queue(
        tool_calls(call("add", {"a": 20, "b": 22}, "r1")),
        fake_llm.ok("42", prompt_tokens=1000, completion_tokens=1000),
    )
    d.write_config(config(llm, tmp_path / "words.txt", params="{x: 40}")[0])
    done = cli(
        d, "runs", "replay", run_id, "--prompt-file", str(prompt), "--system-file", str(system),
        "--model", "m2", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = llm.requests[3].body
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 40 and two, no appending."},
    ]
    assert first["model"] == "m2"
    report = json.loads(done.stdout)
    assert report["model"] == "m2"
    assert report["new"]["tool_calls"] == [{"tool": "add", "arguments": '{"a":20,"b":22}'}]
    assert report["new"]["cost_usd"] == pytest.approx((1010 * 10 + 1005 * 20) / 1e6)
    assert report["old"]["cost_usd"] == pytest.approx((120 * 1 + 17 * 2) / 1e6)


def test_replay_usage_errors(make_daemon: Any, llm: FakeLLM, tmp_path: Path) -> None:
    d, run_id, _ = record(make_daemon, llm, tmp_path)
    plain = d.trigger("plain")
    d.wait_status(plain, "succeeded")
    assert d.stop() == 0
    cases = [
        (("nope",), "no run 'nope'"),
        ((plain,), "task 'plain' is not an agent with tools: nothing to replay"),
        ((run_id, "--cassette", "--model", "m2"), "--cassette serves the recorded replies"),
        ((run_id, "--prompt-file", str(tmp_path / "missing")), "cannot be read"),
        ((), "runs replay needs a run id"),
    ]
    for args, message in cases:
        refused = cli(d, "runs", "replay", *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert message in refused.stderr, (args, refused.stderr)
    wrong = cli(d, "runs", "show", run_id, "--cassette")
    assert wrong.returncode == 2 and "--cassette: only with `runs replay RUN`" in wrong.stderr
    helped = cli(d, "runs", "--help")
    assert "A replay is not a run: nothing is written to the state DB" in " ".join(
        helped.stdout.split()
    )
    assert len(llm.requests) == 3
