"""The agent's tool-calling loop in one process: a real state DB (steps, ledger), real
tool processes, real HTTP servers (the scripted model, an http tool's target). The
daemon-level crash tests are in tests/test_e2e_agent.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from agentd.clock import SystemClock
from agentd.config import Config, load_config, parse_config
from agentd.context import RunContext
from agentd.executors import ExecEnv, executor_for
from agentd.executors.toolloop import OUTPUT_MAX_BYTES, idempotency_key, tool_spec
from agentd.models import Result
from agentd.providers import Gateway, _prompt_estimate
from agentd.state.sqlite.engine import SqliteStore

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from agent_tools import SCRIPT
from fake_llm import FakeLLM, call, serve, tool_calls

T = TypeVar("T")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PY = sys.executable


class StoreBackend:
    """The runner's backend, on a real SqliteStore (the steps' table, its foreign key)."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def load_checkpoint(self, run_id: str) -> Any | None:
        return self.store.load_checkpoint(run_id)

    def save_checkpoint(self, run_id: str, data: Any) -> None:
        self.store.save_checkpoint(run_id, data, T0)

    def progress(self, run_id: str, done: int, total: int | None, message: str) -> None:
        self.store.progress(run_id, done, total, message, T0)

    def heartbeat(self, run_id: str) -> None:
        pass

    def agent_steps(self, run_id: str) -> list[dict[str, Any]]:
        return [dict(s) for s in self.store.agent_steps(run_id)]

    async def record_agent_step(
        self, run_id: str, step: int, kind: str, call_id: str | None, payload: Any
    ) -> dict[str, Any]:
        seq = self.store.record_agent_step(run_id, step, kind, call_id, payload, T0)
        return {"seq": seq, "step": step, "kind": kind, "call_id": call_id, "payload": payload}


class Side:
    def __init__(self, root: Path, config: Config) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.config = config
        self.store = SqliteStore(root / "state.sqlite")
        self.store.sync_tasks({"t1": ("fp", "agent")}, T0)
        self.run_id = self.store.fire("t1", T0, trigger="manual").run_id
        self.gateway = Gateway(self.store, config, SystemClock())
        self.workspace = root / "ws"

    def ctx(self) -> RunContext:
        task = self.config.tasks["t1"]
        self.workspace.mkdir(exist_ok=True)
        ctx = RunContext(
            run_id=self.run_id,
            task_id="t1",
            attempt=1,
            scheduled_for=None,
            params={},
            workspace=self.workspace,
            backend=StoreBackend(self.store),
            loop=asyncio.get_running_loop(),
            logger=logging.getLogger("agentd.test"),
        )
        ctx._llm = self.gateway.for_run(task, self.run_id)
        return ctx

    async def execute(self) -> Result:
        task = self.config.tasks["t1"]
        try:
            return await asyncio.wait_for(executor_for("agent")(task, self.ctx(), ExecEnv()), 60)
        finally:
            await self.gateway.aclose()

    def steps(self) -> list[tuple[int, str, str | None]]:
        return [(s["step"], s["kind"], s["call_id"]) for s in self.store.agent_steps(self.run_id)]

    def transcript(self) -> list[dict[str, Any]]:
        text = (self.workspace / "transcript.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def config_for(llm: FakeLLM, tools_yaml: str, extra: str = "", task_extra: str = "") -> Config:
    text = textwrap.dedent(
        f"""
        tasks:
          t1:
            schedule: {{manual: true}}
            {task_extra}
            agent:
              base_url: {llm.url}
              model: m1
              system: Use the tools.
              prompt: Do the thing.
        """
    )
    text += textwrap.indent(textwrap.dedent(extra), "      ")
    tools = "".join(textwrap.dedent(part).strip() + "\n" for part in tools_yaml.split("\x00"))
    text += "      tools:\n" + textwrap.indent(tools, "        ")
    return parse_config(text, "test.yaml", {})


def append_tool(out: Path, idempotent: bool = False, name: str = "append") -> str:
    return f"""
    - name: {name}
      description: Append a word to the list
      idempotent: {str(idempotent).lower()}
      parameters:
        type: object
        properties: {{word: {{type: string, maxLength: 20}}}}
        required: [word]
        additionalProperties: false
      command: {{argv: [{PY}, {SCRIPT}, {out}, "{{word}}"]}}
    """


ADD_TOOL = """
- name: add
  parameters:
    type: object
    properties: {a: {type: integer}, b: {type: integer}}
    required: [a, b]
  python: {callable: "agent_tools:add"}
- name: shout
  parameters: {type: object, properties: {text: {type: string}}, required: [text]}
  python: {callable: "agent_tools:shout"}
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_three_step_run_with_a_command_and_a_python_tool(tmp_path: Path) -> None:
    out = tmp_path / "words.txt"

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, append_tool(out) + "\x00" + ADD_TOOL))
            llm.queue(
                tool_calls(call("append", {"word": "a b; rm -rf /"}, "c1")),
                tool_calls(
                    call("add", {"a": 2, "b": 40}, "c2"), call("shout", {"text": "hi"}, "c3")
                ),
                fake_llm.ok("All done."),
            )
            result = await side.execute()
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok, result.error
    assert result.detail["steps"] == 3 and result.detail["tool_calls"] == 3
    assert result.detail["input_tokens"] == 30 and result.detail["resumed_from_step"] == 0
    assert (side.workspace / "result.md").read_text() == "All done."
    # The argument went in as one argv item: no shell ever read it.
    assert [line.split(" ", 3)[:3] for line in lines(out)] == [["a", "b;", "rm"]]
    assert lines(out)[0].startswith("a b; rm -rf / agentd-")
    first, second, third = llm.requests
    assert [t["function"]["name"] for t in first.body["tools"]] == ["append", "add", "shout"]
    assert first.body["tools"][0]["function"]["parameters"]["required"] == ["word"]
    assert [m["role"] for m in first.body["messages"]] == ["system", "user"]
    assert second.tool_results == {"c1": "appended a b; rm -rf /\n"}
    assert second.body["messages"][2]["tool_calls"][0]["id"] == "c1"
    assert third.tool_results["c2"] == json.dumps({"sum": 42, "run": side.run_id})
    assert third.tool_results["c3"] == "HI"
    assert side.steps() == [
        (1, "model", None),
        (1, "tool_started", "c1"),
        (1, "tool_result", "c1"),
        (2, "model", None),
        (2, "tool_started", "c2"),
        (2, "tool_result", "c2"),
        (2, "tool_started", "c3"),
        (2, "tool_result", "c3"),
        (3, "model", None),
    ]
    assert [(r["step"], r["kind"], r["call_id"]) for r in side.transcript()] == side.steps()
    assert len(side.store.conn.execute("SELECT * FROM ledger").fetchall()) == 3


def test_arguments_that_break_the_schema_are_a_tool_error_and_never_run(tmp_path: Path) -> None:
    out = tmp_path / "words.txt"

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, append_tool(out) + "\x00" + ADD_TOOL))
            llm.queue(
                tool_calls(
                    call("append", {"word": "x" * 21}, "c1"),
                    call("append", {"word": "ok", "extra": 1}, "c2"),
                    call("append", "{not json", "c3"),
                    call("add", {"a": "two", "b": 1}, "c4"),
                    call("nope", {}, "c5"),
                    call("append", "[1]", "c6"),
                ),
                fake_llm.ok("gave up"),
            )
            result = await side.execute()
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok and not out.exists()
    got = llm.requests[1].tool_results
    assert got["c1"].startswith("error: invalid arguments (word): ") and "too long" in got["c1"]
    assert "Additional properties are not allowed ('extra'" in got["c2"]
    assert got["c3"].startswith("error: the arguments are not JSON")
    assert got["c4"].startswith("error: invalid arguments (a): 'two' is not of type 'integer'")
    assert got["c5"] == "error: there is no tool named 'nope'"
    assert got["c6"] == "error: the arguments must be a JSON object"
    kinds = [k for _, k, _ in side.steps()]
    assert "tool_started" not in kinds and kinds.count("tool_result") == 6


def test_an_http_tool_calls_only_its_allowed_hosts(tmp_path: Path) -> None:
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"path": request.raw_path, "body": await request.text()})

    async def main() -> tuple[FakeLLM, Side]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        async with serve(app) as base, FakeLLM() as llm:
            port = base.rsplit(":", 1)[1]
            tools = f"""
            - name: fetch
              parameters:
                type: object
                properties: {{host: {{type: string}}, id: {{type: string}}}}
              http:
                method: POST
                url: "http://{{host}}:{port}/items/{{id}}"
                allow_hosts: [127.0.0.1]
            """
            side = Side(tmp_path / "db", config_for(llm, tools))
            llm.queue(
                tool_calls(
                    call("fetch", {"host": "127.0.0.1", "id": "../admin?x=1"}, "c1"),
                    call("fetch", {"host": "localhost", "id": "1"}, "c2"),
                    call("fetch", {"host": "evil.example@127.0.0.1", "id": "1"}, "c3"),
                ),
                fake_llm.ok("fetched"),
            )
            assert (await side.execute()).ok
        return llm, side

    llm, side = run(main)
    [request] = seen  # only the allowed host was called
    assert request.raw_path == "/items/..%2Fadmin%3Fx%3D1"
    assert request.headers["Idempotency-Key"] == idempotency_key(side.run_id, 1, "c1")
    got = llm.requests[1].tool_results
    body = json.loads(json.loads(got["c1"])["body"])
    assert body == {"host": "127.0.0.1", "id": "../admin?x=1"}
    assert got["c2"] == "error: host 'localhost' is not in this tool's allow_hosts"
    assert "is not in this tool's allow_hosts" in got["c3"]


def test_a_resumed_run_repeats_no_recorded_model_call_nor_tool_call(tmp_path: Path) -> None:
    """The steps of a run that died after its first tool's result: the next attempt asks
    the model only for step 2 and runs nothing again."""
    out = tmp_path / "words.txt"

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, append_tool(out)))
            asked = {"content": "", "tool_calls": [{"id": "c1", "name": "append",
                     "arguments": '{"word": "w"}'}], "usage": {"input_tokens": 7}}  # fmt: skip
            side.store.record_agent_step(side.run_id, 1, "model", None, asked, T0)
            side.store.record_agent_step(side.run_id, 1, "tool_started", "c1", {}, T0)
            side.store.record_agent_step(
                side.run_id, 1, "tool_result", "c1", {"content": "appended w\n"}, T0
            )
            llm.queue(fake_llm.ok("finished"))
            result = await side.execute()
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok and result.detail["resumed_from_step"] == 1
    assert result.detail["input_tokens"] == 17
    assert not out.exists()
    [request] = llm.requests
    assert request.tool_results == {"c1": "appended w\n"}
    assert len(side.transcript()) == 4


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_call_started_but_not_finished_runs_again_only_if_idempotent(
    tmp_path: Path, idempotent: bool
) -> None:
    """Any other tool's call with an unknown outcome parks the run for an operator."""
    out = tmp_path / "words.txt"

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, append_tool(out, idempotent)))
            asked = {"content": "", "tool_calls": [{"id": "c1", "name": "append",
                     "arguments": '{"word": "w"}'}]}  # fmt: skip
            side.store.record_agent_step(side.run_id, 1, "model", None, asked, T0)
            side.store.record_agent_step(side.run_id, 1, "tool_started", "c1", {}, T0)
            llm.queue(fake_llm.ok("finished"))
            result = await side.execute()
        return result, llm, side

    result, llm, side = run(main)
    if idempotent:
        assert result.ok and len(llm.requests) == 1
        assert lines(out) == [f"w {idempotency_key(side.run_id, 1, 'c1')}"]
        assert side.steps()[-2:] == [(1, "tool_result", "c1"), (2, "model", None)]
    else:
        assert not result.ok and result.park is not None
        assert (result.park.reason, result.park.call_id, result.park.tool) == (
            "unknown_outcome",
            "c1",
            "append",
        )
        assert result.error is not None and "its outcome is unknown" in result.error
        assert llm.requests == [] and not out.exists()
        assert side.steps()[-1] == (1, "approval_requested", "c1")
        [asked] = [
            s for s in side.store.agent_steps(side.run_id) if s["kind"] == "approval_requested"
        ]
        assert asked["payload"]["arguments"] == {"word": "w"}


@pytest.mark.parametrize("decision", ["approve", "skip"])
def test_a_decision_on_a_parked_call_runs_it_or_tells_the_model_it_was_skipped(
    tmp_path: Path, decision: str
) -> None:
    """After the operator's decision (a ``decision`` step, as ``decide_approval`` writes
    it), the run goes on at the parked call: approved, it runs (with the first
    execution's Idempotency-Key); skipped, the model reads the note and nothing runs."""
    out = tmp_path / "words.txt"

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, append_tool(out)))
            asked = {"content": "", "tool_calls": [{"id": "c1", "name": "append",
                     "arguments": '{"word": "w"}'}]}  # fmt: skip
            side.store.record_agent_step(side.run_id, 1, "model", None, asked, T0)
            side.store.record_agent_step(side.run_id, 1, "tool_started", "c1", {}, T0)
            parked = await side.execute()
            assert parked.park is not None
            note = {"decision": decision, "by": "operator", "note": "done by hand"}
            side.store.record_agent_step(side.run_id, 1, "decision", "c1", note, T0)
            llm.queue(fake_llm.ok("finished"))
            result = await side.execute()
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok, result.error
    [request] = llm.requests
    [result_step] = [s for s in side.store.agent_steps(side.run_id) if s["kind"] == "tool_result"]
    if decision == "approve":
        assert lines(out) == [f"w {idempotency_key(side.run_id, 1, 'c1')}"]
        assert result_step["payload"]["outcome"] == "ok"
    else:
        assert not out.exists()
        assert request.tool_results == {"c1": "error: an operator skipped this call: done by hand"}
        assert result_step["payload"]["outcome"] == "skipped"


def test_max_steps_ends_the_run_and_tool_failures_reach_the_model(tmp_path: Path) -> None:
    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            tools = """
            - {name: boom, python: {callable: "agent_tools:boom"}}
            - name: slow
              timeout: 200ms
              command: {argv: [sleep, "5"]}
            - name: fails
              command: {argv: [sh, -c, "echo bad >&2; exit 3"]}
            """
            side = Side(tmp_path / "db", config_for(llm, tools, "max_steps: 2\n"))
            llm.queue(
                tool_calls(call("boom", {}, "c1"), call("slow", {}, "c2")),
                tool_calls(call("fails", {}, "c3")),
            )
            result = await side.execute()
        return result, llm

    result, llm = run(main)
    assert not result.ok and result.retryable is False
    assert result.error == (
        "the agent made 2 model calls (max_steps) without answering without a tool call"
    )
    assert len(llm.requests) == 2
    got = llm.requests[1].tool_results
    assert got == {
        "c1": "error: ValueError: no such thing",
        "c2": "error: the tool timed out after 0.2s",
    }


def test_a_plain_reply_with_null_content_and_no_calls_is_still_malformed(tmp_path: Path) -> None:
    async def main() -> Result:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL))
            llm.queue(fake_llm.Reply(body={"choices": [{"message": {"content": None}}]}))
            return await side.execute()

    result = run(main)
    assert not result.ok and result.retryable is True
    assert result.error is not None and "content is NoneType, not a string" in result.error


def test_the_shipped_example_runs_its_bundled_tools_offline(tmp_path: Path) -> None:
    """config/agentd.yaml's host-check, its provider pointed at the scripted model: both
    bundled tools run here, with nothing but this host."""
    shipped = load_config(Path(__file__).resolve().parent.parent / "config" / "agentd.yaml", {})
    task = shipped.tasks["host-check"].model_copy(update={"id": "t1", "params": {"host": "h"}})

    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            provider = shipped.providers["openai"].model_copy(
                update={"base_url": llm.url, "api_key_env": None}
            )
            config = shipped.model_copy(
                update={"providers": {"openai": provider}, "tasks": {"t1": task}}
            )
            side = Side(tmp_path / "db", config)
            llm.queue(
                tool_calls(
                    call("disk_usage", {"path": str(tmp_path)}, "c1"),
                    call("load_average", {}, "c2"),
                ),
                fake_llm.ok('{"healthy": true, "summary": "Disk and load are fine."}'),
            )
            return await side.execute(), llm

    result, llm = run(main)
    assert result.ok, result.error
    assert result.detail["output"] == {"healthy": True, "summary": "Disk and load are fine."}
    assert llm.requests[0].body["response_format"]["json_schema"]["name"] == "host_verdict"
    assert llm.requests[0].body["messages"][1]["content"] == (
        "Is h healthy? Look at its root disk and its load."
    )
    got = llm.requests[1].tool_results
    assert set(json.loads(got["c1"])) == {"path", "total_gib", "free_gib", "used_pct"}
    assert len(got["c2"].split()) == 5  # /proc/loadavg: three loads, tasks, last pid


def test_what_a_tool_hands_back_is_capped(tmp_path: Path) -> None:
    """A chatty tool (1 MiB on stdout, more on stderr) neither blocks on its pipes nor
    sends the model more than OUTPUT_MAX_BYTES; a failing one's stderr tail is told."""
    chatty = "import sys; sys.stdout.write('x' * (1 << 20)); sys.stderr.write('e' * 99999 + 'END')"

    async def main() -> FakeLLM:
        async with FakeLLM() as llm:
            tools = f"""
            - name: chatty
              command: {{argv: [{PY}, -c, "{chatty}"]}}
            - name: chatty_fails
              command: {{argv: [{PY}, -c, "{chatty}; sys.exit(2)"]}}
            """
            side = Side(tmp_path / "db", config_for(llm, tools))
            llm.queue(
                tool_calls(call("chatty", {}, "c1"), call("chatty_fails", {}, "c2")),
                fake_llm.ok("ok"),
            )
            assert (await side.execute()).ok
            return llm

    llm = run(main)
    got = llm.requests[1].tool_results
    assert got["c1"] == "x" * OUTPUT_MAX_BYTES + f"\n[cut at {OUTPUT_MAX_BYTES} bytes]"
    assert got["c2"].startswith("error: exit code 2: eeee") and got["c2"].endswith("END")
    assert len(got["c2"]) < 4200


def test_a_budget_refusal_ends_the_run_at_the_step_and_a_later_attempt_goes_on(
    tmp_path: Path,
) -> None:
    """The run budget admits the first call but not the second: the run ends
    budget_exhausted with step 1 and its tool result recorded; with the budget raised,
    the next attempt makes only the refused call."""
    out = tmp_path / "words.txt"
    first = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Do the thing."},
    ]

    async def main() -> tuple[Result, Result, FakeLLM]:
        async with FakeLLM() as llm:
            tools = append_tool(out)
            probe = config_for(llm, tools, "max_tokens: 10\n")
            agent = probe.tasks["t1"].agent
            assert agent is not None and agent.tools is not None
            spec = [tool_spec(t) for t in agent.tools]
            need = _prompt_estimate(first, spec) + 10  # what the first call reserves
            tight = config_for(
                llm, tools, "max_tokens: 10\n", f"budget: {{run: {{tokens: {need + 5}}}}}"
            )
            side = Side(tmp_path / "db", tight)
            llm.queue(tool_calls(call("append", {"word": "w"}, "c1")))
            refused = await side.execute()
            side.config = config_for(
                llm, tools, "max_tokens: 10\n", "budget: {run: {tokens: 100000}}"
            )
            side.gateway = Gateway(side.store, side.config, SystemClock())
            llm.queue(fake_llm.ok("done"))
            resumed = await side.execute()
        return refused, resumed, llm

    refused, resumed, llm = run(main)
    assert refused.budget_exhausted and refused.detail["step"] == 2
    assert str(refused.error).startswith("budget run tokens exhausted: 15 of ")
    assert resumed.ok and resumed.detail["resumed_from_step"] == 1
    assert len(llm.requests) == 2 and len(lines(out)) == 1
    assert llm.requests[1].tool_results == {"c1": "appended w\n"}


def _message(message: dict[str, Any]) -> fake_llm.Reply:
    return fake_llm.Reply(body={"choices": [{"message": message}], "usage": {}})


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"content": None, "tool_calls": "x"}, "tool_calls is str, not a list"),
        ({"content": None, "tool_calls": [{"function": {"name": "add"}}]}, "has no id"),
        (
            {"content": None, "tool_calls": [call("add", {}, "c1"), call("add", {}, "c1")]},
            "tool_calls repeat an id",
        ),
        (
            {
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "add", "arguments": 3}}],
            },
            "tool_calls[0].function.arguments is not a string",
        ),
    ],
)
def test_malformed_tool_calls_are_a_malformed_reply(
    tmp_path: Path, message: dict[str, Any], problem: str
) -> None:
    async def main() -> tuple[Result, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL))
            llm.queue(_message(message))
            return await side.execute(), side

    result, side = run(main)
    assert not result.ok and result.retryable is True
    assert result.error is not None and problem in result.error
    assert result.detail["llm_error"] == "malformed" and side.steps() == []


def test_arguments_sent_as_an_object_are_taken_as_json(tmp_path: Path) -> None:
    """Some servers send ``arguments`` as the object itself, not its JSON text."""

    async def main() -> FakeLLM:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL))
            raw = {
                "id": "c1",
                "type": "function",
                "function": {"name": "add", "arguments": {"a": 1, "b": 2}},
            }
            llm.queue(_message({"content": None, "tool_calls": [raw]}), fake_llm.ok("3"))
            assert (await side.execute()).ok
            return llm

    llm = run(main)
    assert json.loads(llm.requests[1].tool_results["c1"])["sum"] == 3
    assert llm.requests[1].body["messages"][2]["tool_calls"][0]["function"]["arguments"] == (
        '{"a": 1, "b": 2}'
    )


# ---------------------------------------------------------------- response_format

VERDICT = """
response_format:
  name: verdict
  schema:
    type: object
    properties:
      healthy: {type: boolean}
      checks: {type: array, items: {type: string}, minItems: 1}
    required: [healthy, checks]
    additionalProperties: false
"""


def test_a_valid_structured_answer_is_result_json_and_the_request_asked_for_it(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL, VERDICT))
            llm.queue(
                tool_calls(call("add", {"a": 1, "b": 2}, "c1")),
                fake_llm.ok(json.dumps({"healthy": True, "checks": ["1 + 2 = 3"]})),
            )
            return await side.execute(), llm, side

    result, llm, side = run(main)
    assert result.ok, result.error
    assert result.detail["output"] == {"healthy": True, "checks": ["1 + 2 = 3"]}
    assert json.loads((side.workspace / "result.json").read_text()) == result.detail["output"]
    assert json.loads((side.workspace / "result.md").read_text()) == result.detail["output"]
    for request in llm.requests:  # every model call of the loop, not only the last
        assert request.body["response_format"] == {
            "type": "json_schema",
            "json_schema": {
                "name": "verdict",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {
                        "healthy": {"type": "boolean"},
                        "checks": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    },
                    "required": ["healthy", "checks"],
                    "additionalProperties": False,
                },
            },
        }
    assert "rejected_answers" not in result.detail


def test_an_invalid_answer_is_an_invalid_output_error_and_the_retry_asks_again(
    tmp_path: Path,
) -> None:
    """The first attempt's answer breaks the schema: the attempt ends with a retryable
    invalid_output error naming the path, nothing written as the result; the next
    attempt (the same run, its steps replayed) tells the model what was wrong, runs no
    tool again, and ends with the valid answer."""

    async def main() -> tuple[Result, Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL, VERDICT))
            llm.queue(
                tool_calls(call("add", {"a": 1, "b": 2}, "c1")),
                fake_llm.ok(json.dumps({"healthy": "yes", "checks": ["ok"]})),
            )
            first = await side.execute()
            side.gateway = Gateway(side.store, side.config, SystemClock())
            llm.queue(fake_llm.ok(json.dumps({"healthy": True, "checks": ["ok"]})))
            second = await side.execute()
            return first, second, llm, side

    first, second, llm, side = run(main)
    assert not first.ok and first.retryable is True
    assert first.detail["llm_error"] == "invalid_output" and first.detail["path"] == "/healthy"
    assert first.error == (
        "invalid output: the answer does not match response_format verdict at /healthy:"
        " 'yes' is not of type 'boolean'"
    )
    assert second.ok, second.error
    assert second.detail["output"] == {"healthy": True, "checks": ["ok"]}
    assert second.detail["rejected_answers"] == 1 and second.detail["resumed_from_step"] == 2
    assert len(llm.requests) == 3
    asked_again = llm.requests[2].body["messages"]
    assert asked_again[-2]["content"] == json.dumps({"healthy": "yes", "checks": ["ok"]})
    assert asked_again[-1]["role"] == "user"
    assert asked_again[-1]["content"].startswith(
        "Your answer does not match the required JSON schema at /healthy: 'yes' is not of"
    )
    assert llm.requests[2].tool_results == {"c1": json.dumps({"sum": 3, "run": side.run_id})}
    assert side.steps() == [
        (1, "model", None),
        (1, "tool_started", "c1"),
        (1, "tool_result", "c1"),
        (2, "model", None),
        (2, "output_rejected", None),
        (3, "model", None),
    ]
    assert [r["kind"] for r in side.transcript()][-2:] == ["output_rejected", "model"]
    assert json.loads((side.workspace / "result.json").read_text())["healthy"] is True


@pytest.mark.parametrize(
    ("answer", "where", "what"),
    [
        ("The host is fine.", "/", "the answer is not JSON (Expecting value"),
        ('{"healthy": true}', "/", "'checks' is a required property"),
        ('{"healthy": true, "checks": [3]}', "/checks/0", "3 is not of type 'string'"),
        ('{"healthy": true, "checks": []}', "/checks", "[] should be non-empty"),
    ],
)
def test_what_an_invalid_answer_is_told_names_where_it_breaks_the_schema(
    tmp_path: Path, answer: str, where: str, what: str
) -> None:
    async def main() -> tuple[Result, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL, VERDICT))
            llm.queue(fake_llm.ok(answer))
            return await side.execute(), side

    result, side = run(main)
    assert not result.ok and result.retryable is True
    assert result.detail["llm_error"] == "invalid_output" and result.detail["path"] == where
    assert result.error is not None and f"at {where}: {what}" in result.error
    assert not (side.workspace / "result.json").exists()
    assert not (side.workspace / "result.md").exists()


def test_an_answer_rejected_at_max_steps_ends_the_run_saying_so(tmp_path: Path) -> None:
    async def main() -> tuple[Result, Result, FakeLLM]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", config_for(llm, ADD_TOOL, VERDICT + "max_steps: 1\n"))
            llm.queue(fake_llm.ok("not json"))
            first = await side.execute()
            side.gateway = Gateway(side.store, side.config, SystemClock())
            return first, await side.execute(), llm

    first, second, llm = run(main)
    assert first.detail["llm_error"] == "invalid_output"
    assert not second.ok and second.retryable is False and len(llm.requests) == 1
    assert second.error == (
        "the agent made 1 model calls (max_steps) its last answer did not match response_format"
    )


def plain_config(llm: FakeLLM, extra: str = "", prompt: str = "Judge.") -> Config:
    text = textwrap.dedent(
        f"""
        tasks:
          t1:
            schedule: {{manual: true}}
            agent:
              base_url: {llm.url}
              model: m1
              prompt: {prompt}
        """
    )
    return parse_config(text + textwrap.indent(textwrap.dedent(extra), "      "), "t.yaml", {})


def test_a_plain_agent_step_checks_its_answer_too(tmp_path: Path) -> None:
    """Without tools: one call carrying response_format; a valid answer is result.json,
    an invalid one a retryable invalid_output error with nothing written."""

    async def main() -> tuple[Result, Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", plain_config(llm, VERDICT))
            llm.queue(fake_llm.ok('{"healthy": false, "checks": ["disk full"]}'))
            good = await side.execute()
            (side.workspace / "result.json").rename(side.workspace / "first.json")
            (side.workspace / "result.md").unlink()
            side.gateway = Gateway(side.store, side.config, SystemClock())
            llm.queue(fake_llm.ok('{"healthy": false}'))
            bad = await side.execute()
            return good, bad, llm, side

    good, bad, llm, side = run(main)
    assert good.ok and good.detail["output"] == {"healthy": False, "checks": ["disk full"]}
    assert json.loads((side.workspace / "first.json").read_text()) == good.detail["output"]
    assert llm.requests[0].body["response_format"]["json_schema"]["name"] == "verdict"
    assert "tools" not in llm.requests[0].body
    assert not bad.ok and bad.retryable is True and bad.detail["llm_error"] == "invalid_output"
    assert bad.error is not None and "at /: 'checks' is a required property" in bad.error
    assert not (side.workspace / "result.json").exists()
    assert not (side.workspace / "result.md").exists()


def test_items_with_a_response_format_stop_at_the_item_that_breaks_it(tmp_path: Path) -> None:
    """Each item's answer is checked before it is written: the run fails at item 1 with
    its checkpoint still there, and the retry asks for item 1 again, not item 0."""

    async def main() -> tuple[Result, Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            config = plain_config(llm, VERDICT + "items: [a, b]\n", prompt="Judge {item}.")
            side = Side(tmp_path / "db", config)
            llm.queue(
                fake_llm.ok('{"healthy": true, "checks": ["a"]}'),
                fake_llm.ok('{"healthy": 1, "checks": ["b"]}'),
            )
            first = await side.execute()
            side.gateway = Gateway(side.store, side.config, SystemClock())
            llm.queue(fake_llm.ok('{"healthy": true, "checks": ["b"]}'))
            return first, await side.execute(), llm, side

    first, second, llm, side = run(main)
    assert not first.ok and first.detail["llm_error"] == "invalid_output"
    assert first.detail["item"] == 1 and first.retryable is True
    assert second.ok and second.detail["resumed_from"] == 1 and second.detail["processed"] == 1
    assert [r.user_content for r in llm.requests] == ["Judge a.", "Judge b.", "Judge b."]
    records = [json.loads(p.read_text()) for p in sorted((side.workspace / "items").iterdir())]
    assert [r["output"]["checks"] for r in records] == [["a"], ["b"]]


# ---------------------------------------------------------------- the example model


def test_the_shipped_offline_example_runs_on_the_example_model(tmp_path: Path) -> None:
    """config/agentd.yaml's host-check-offline as it ships: no network, no key. The
    example model calls both tools once, then answers JSON that matches the verdict
    schema; both calls go through the ledger at no cost."""
    shipped = load_config(Path(__file__).resolve().parent.parent / "config" / "agentd.yaml", {})
    task = shipped.tasks["host-check-offline"].model_copy(update={"id": "t1"})

    async def main() -> Result:
        side = Side(tmp_path / "db", shipped.model_copy(update={"tasks": {"t1": task}}))
        result = await side.execute()
        ledger = side.store.conn.execute("SELECT provider, model, cost_usd FROM ledger")
        assert [tuple(r) for r in ledger.fetchall()] == [("example", "example", 0.0)] * 2
        assert side.steps() == [
            (1, "model", None),
            (1, "tool_started", "example-1-1"),
            (1, "tool_result", "example-1-1"),
            (1, "tool_started", "example-1-2"),
            (1, "tool_result", "example-1-2"),
            (2, "model", None),
        ]
        started = side.store.agent_steps(side.run_id)[1]["payload"]
        assert started == {"tool": "disk_usage", "arguments": {"path": "/"}}
        return result

    result = run(main)
    assert result.ok, result.error
    verdict = result.detail["output"]
    assert set(verdict) == {"healthy", "summary"} and verdict["healthy"] is True
    assert verdict["summary"].startswith("example model (agentd built-in, not an LLM): 2 tool")
    assert "disk_usage: {" in verdict["summary"] and "load_average: " in verdict["summary"]
