"""The tool loop with MCP servers (``agent.mcp``): a real MCP server over stdio
(tests/fixtures/mcp_server.py, written with the official SDK), real processes, the
scripted model over real HTTP, a real state DB."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_toolloop import PY, T0, Side, lines, run

from agentd.config import Config, parse_config
from agentd.executors import ExecEnv, executor_for
from agentd.executors.toolloop import idempotency_key
from agentd.models import Result

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from fake_llm import FakeLLM, call, tool_calls
from harness import wait_for

SERVER = Path(__file__).resolve().parent / "fixtures" / "mcp_server.py"
SECRET = "AGENTD_TEST_SECRET"


def server_yaml(
    tmp: Path,
    allow: list[str],
    extra_env: dict[str, str] | None = None,
    more: str = "",
    command: str | None = None,
    name: str = "files",
) -> str:
    env = {"MCP_OUT": str(tmp / "out.txt"), "MCP_PIDS": str(tmp / "pids.txt")}
    env.update(extra_env or {})
    text = f"""
    - name: {name}
      command: {command or json.dumps([PY, str(SERVER)])}
      env: {json.dumps(env)}
      allow: {json.dumps(allow)}
    """
    return textwrap.dedent(text) + textwrap.indent(textwrap.dedent(more), "  ")


def mcp_config(
    llm: FakeLLM, servers: str, tools: str = "", environ: dict[str, str] | None = None
) -> Config:
    text = textwrap.dedent(
        f"""
        tasks:
          t1:
            schedule: {{manual: true}}
            agent:
              base_url: {llm.url}
              model: m1
              system: Use the tools.
              prompt: Do the thing.
        """
    )
    if tools:
        text += "      tools:\n" + textwrap.indent(
            textwrap.dedent(tools).strip() + "\n", "        "
        )
    text += "      mcp:\n" + textwrap.indent(servers.strip() + "\n", "        ")
    return parse_config(text, "test.yaml", environ or {})


async def execute(side: Side, env: ExecEnv | None = None) -> Result:
    task = side.config.tasks["t1"]
    try:
        return await asyncio.wait_for(executor_for("agent")(task, side.ctx(), env or ExecEnv()), 60)
    finally:
        await side.gateway.aclose()


def alive(pid: int) -> bool:
    """Running, or stopped: anything but gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def pids(tmp: Path) -> list[int]:
    return [int(p) for p in lines(tmp / "pids.txt")]


def all_gone(found: list[int]) -> None:
    """Every process in ``found`` ends soon (the servers are stopped before the run's
    executor returns; the kernel may take a moment to reap a killed one)."""
    wait_for(lambda: not any(alive(p) for p in found), 10, f"processes {found} gone")


def test_a_run_calls_mcp_tools_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two MCP tools called in one step, one more in the next, then the answer; the
    server's schemas are what the model sees; its environment is a command tool's
    (no daemon secret) plus its own ``env`` (``${VAR}`` from the config's environment)."""
    monkeypatch.setenv(SECRET, "hunter2")
    env = ExecEnv(withheld_env=frozenset({SECRET.encode()}))
    servers = server_yaml(
        tmp_path,
        ["add", "append_line", "whoami", "spawn_child"],
        {"ROOT": "${ROOT_DIR}"},
        more="idempotent: [add, whoami]\n",
    )

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            config = mcp_config(llm, servers, environ={"ROOT_DIR": "/srv"})
            side = Side(tmp_path / "db", config)
            llm.queue(
                tool_calls(
                    call("files__add", {"a": 2, "b": 40}, "c1"),
                    call("files__append_line", {"line": "hello"}, "c2"),
                ),
                tool_calls(call("files__whoami", {}, "c3"), call("files__spawn_child", {}, "c4")),
                fake_llm.ok("All done."),
            )
            result = await execute(side, env)
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok, result.error
    assert result.detail["steps"] == 3 and result.detail["tool_calls"] == 4
    assert (side.workspace / "result.md").read_text() == "All done."
    first, second, third = llm.requests
    offered = {t["function"]["name"]: t["function"] for t in first.body["tools"]}
    assert list(offered) == [
        "files__add",
        "files__append_line",
        "files__whoami",
        "files__spawn_child",
    ]
    assert offered["files__add"]["description"] == "Add two integers."
    assert offered["files__add"]["parameters"]["required"] == ["a", "b"]
    assert offered["files__add"]["parameters"]["properties"]["a"]["type"] == "integer"
    assert second.tool_results == {"c1": "42", "c2": "appended hello"}
    assert lines(tmp_path / "out.txt") == [f"hello {idempotency_key(side.run_id, 1, 'c2')}"]
    seen = json.loads(third.tool_results["c3"])
    assert seen["AGENTD_RUN_ID"] == side.run_id and seen["AGENTD_TASK"] == "t1"
    assert seen["ROOT"] == "/srv" and seen[SECRET] is None
    assert seen["cwd"] == str(side.workspace) == seen["AGENTD_WORKSPACE"]
    assert os.environ[SECRET] == "hunter2"  # it was there to withhold
    assert [k for _, k, _ in side.steps()].count("tool_result") == 4
    [server] = pids(tmp_path)
    assert seen["pid"] == server
    # The server and what it left in its process group are gone once the run is.
    all_gone([server, int(third.tool_results["c4"])])


def test_a_tool_not_allowed_is_neither_offered_nor_callable(tmp_path: Path) -> None:
    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", mcp_config(llm, server_yaml(tmp_path, ["add"])))
            llm.queue(
                tool_calls(
                    call("files__secret_op", {}, "c1"),
                    call("secret_op", {}, "c2"),
                    call("files__add", {"a": 1, "b": "x"}, "c3"),
                    call("files__add", {"a": 1, "b": 2}, "c4"),
                ),
                fake_llm.ok("ok"),
            )
            return await execute(side), llm

    result, llm = run(main)
    assert result.ok, result.error
    assert [t["function"]["name"] for t in llm.requests[0].body["tools"]] == ["files__add"]
    got = llm.requests[1].tool_results
    assert got["c1"] == "error: there is no tool named 'files__secret_op'"
    assert got["c2"] == "error: there is no tool named 'secret_op'"
    assert got["c3"].startswith("error: invalid arguments (b): 'x' is not of type 'integer'")
    assert got["c4"] == "3"
    assert not (tmp_path / "out.txt").exists()  # secret_op never ran


def test_mcp_tools_of_two_servers_with_the_agents_own_and_their_failures(
    tmp_path: Path,
) -> None:
    """An MCP tool that times out (its server's ``timeout``), one whose result is an
    error, a python tool of the agent's own, two servers, in one run; the server whose
    call timed out answers the next one."""
    tools = """
    - name: shout
      parameters: {type: object, properties: {text: {type: string}}, required: [text]}
      python: {callable: "agent_tools:shout"}
    """
    servers = server_yaml(tmp_path, ["slow", "add"], more="timeout: 500ms\n", name="quick")
    servers += server_yaml(tmp_path, ["fail"])

    async def main() -> FakeLLM:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", mcp_config(llm, servers, tools))
            llm.queue(
                tool_calls(
                    call("quick__slow", {"seconds": 30}, "c1"),
                    call("files__fail", {"why": "bad input"}, "c2"),
                    call("shout", {"text": "hi"}, "c3"),
                    call("quick__add", {"a": 1, "b": 2}, "c4"),
                ),
                fake_llm.ok("ok"),
            )
            assert (await execute(side)).ok
            return llm

    llm = run(main)
    assert [t["function"]["name"] for t in llm.requests[0].body["tools"]] == [
        "shout",
        "quick__slow",
        "quick__add",
        "files__fail",
    ]
    got = llm.requests[1].tool_results
    assert got == {
        "c1": "error: the tool timed out after 0.5s",
        "c2": "error: Error executing tool fail",
        "c3": "HI",
        "c4": "3",
    }
    found = pids(tmp_path)
    assert len(found) == 2
    all_gone(found)


def test_a_server_that_dies_mid_run_answers_every_call_with_an_error(tmp_path: Path) -> None:
    """The model is told (the server's stderr included); the run goes on."""

    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            servers = server_yaml(tmp_path, ["exit_now", "add"])
            side = Side(tmp_path / "db", mcp_config(llm, servers))
            llm.queue(
                tool_calls(call("files__exit_now", {}, "c1")),
                tool_calls(call("files__add", {"a": 1, "b": 2}, "c2")),
                fake_llm.ok("the server is gone"),
            )
            return await execute(side), llm

    result, llm = run(main)
    assert result.ok, result.error
    gone = "error: the MCP server 'files' has exited; its stderr ends: exiting: asked to"
    assert llm.requests[1].tool_results["c1"] == gone
    assert llm.requests[2].tool_results["c2"] == gone
    all_gone(pids(tmp_path))


def test_a_resumed_run_calls_no_mcp_tool_with_a_recorded_result(tmp_path: Path) -> None:
    """The steps of a run that died after an MCP call's result, and in the middle of an
    idempotent one: the next attempt runs only the idempotent call again (same key)."""
    servers = server_yaml(tmp_path, ["append_line"], more="idempotent: [append_line]\n")

    async def main() -> tuple[Result, FakeLLM, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", mcp_config(llm, servers))
            asked = {"content": "", "tool_calls": [
                {"id": "c1", "name": "files__append_line", "arguments": '{"line": "one"}'},
                {"id": "c2", "name": "files__append_line", "arguments": '{"line": "two"}'},
            ]}  # fmt: skip
            record = side.store.record_agent_step
            record(side.run_id, 1, "model", None, asked, T0)
            record(side.run_id, 1, "tool_started", "c1", {}, T0)
            record(side.run_id, 1, "tool_result", "c1", {"content": "appended one"}, T0)
            record(side.run_id, 1, "tool_started", "c2", {}, T0)
            llm.queue(fake_llm.ok("finished"))
            result = await execute(side)
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok and result.detail["resumed_from_step"] == 1
    [request] = llm.requests
    assert request.tool_results == {"c1": "appended one", "c2": "appended two"}
    assert lines(tmp_path / "out.txt") == [f"two {idempotency_key(side.run_id, 1, 'c2')}"]


def test_an_unknown_outcome_of_a_non_idempotent_mcp_call_is_not_repeated(tmp_path: Path) -> None:
    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", mcp_config(llm, server_yaml(tmp_path, ["append_line"])))
            asked = {"content": "", "tool_calls": [
                {"id": "c1", "name": "files__append_line", "arguments": '{"line": "one"}'},
            ]}  # fmt: skip
            side.store.record_agent_step(side.run_id, 1, "model", None, asked, T0)
            side.store.record_agent_step(side.run_id, 1, "tool_started", "c1", {}, T0)
            return await execute(side), llm

    result, llm = run(main)
    assert not result.ok and result.park is not None  # parked for an operator
    assert (result.park.reason, result.park.tool) == ("unknown_outcome", "files__append_line")
    assert result.error is not None and "not idempotent" in result.error
    assert llm.requests == [] and not (tmp_path / "out.txt").exists()
    all_gone(pids(tmp_path))


@pytest.mark.parametrize("how", ["server", "pattern"])
def test_a_sensitive_mcp_tool_parks_the_run_before_it_runs(tmp_path: Path, how: str) -> None:
    """Marked in the server's ``sensitive``, or matched by the agent's sensitive_tools."""
    more = "sensitive: [append_line]" if how == "server" else ""

    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            config = mcp_config(llm, server_yaml(tmp_path, ["append_line"], more=more))
            if how == "pattern":
                text = config.tasks["t1"].agent
                assert text is not None
                agent = text.model_copy(update={"sensitive_tools": ["files__*"]})
                task = config.tasks["t1"].model_copy(update={"agent": agent})
                config = config.model_copy(update={"tasks": {"t1": task}})
            side = Side(tmp_path / "db", config)
            llm.queue(tool_calls(call("files__append_line", {"line": "one"}, "c1")))
            return await execute(side), llm

    result, llm = run(main)
    assert result.park is not None and result.park.reason == "sensitive"
    assert len(llm.requests) == 1 and not (tmp_path / "out.txt").exists()
    all_gone(pids(tmp_path))


def test_an_allowed_tool_the_server_does_not_list_fails_the_run(tmp_path: Path) -> None:
    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            servers = server_yaml(tmp_path, ["add", "read_file", "nope"])
            return await execute(Side(tmp_path / "db", mcp_config(llm, servers))), llm

    result, llm = run(main)
    assert not result.ok and result.retryable is False
    assert result.error is not None
    assert result.error.startswith(
        "the MCP server 'files' does not list the allowed tool(s) read_file, nope (it lists: add,"
    )
    assert llm.requests == []
    all_gone(pids(tmp_path))


@pytest.mark.parametrize("how", ["dies", "hangs", "no_program"])
def test_a_server_that_does_not_start_fails_the_run(tmp_path: Path, how: str) -> None:
    """Dies at start: its stderr's end is in the error, and a retry may do better.
    Never answers: killed at ``start_timeout``. No such program: not retryable."""
    extra = {
        "dies": {"MCP_DIE": "cannot open /srv/db: permission denied"},
        "hangs": {"MCP_HANG": "1"},
    }
    command = json.dumps([str(tmp_path / "missing")]) if how == "no_program" else None
    more = "start_timeout: 1s\n" if how == "hangs" else ""
    servers = server_yaml(tmp_path, ["add"], extra.get(how), more, command)

    async def main() -> tuple[Result, FakeLLM, float]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", mcp_config(llm, servers))
            began = time.monotonic()
            return await execute(side), llm, time.monotonic() - began

    result, llm, took = run(main)
    assert not result.ok and result.error is not None and llm.requests == []
    assert result.error.startswith("the MCP server 'files' (")
    if how == "dies":
        assert result.retryable is True
        assert result.error.endswith(
            "did not start: it exited (or closed its stdout) before answering; its stderr"
            " ends: cannot open /srv/db: permission denied"
        )
    elif how == "hangs":
        assert result.retryable is True
        assert result.error.endswith("did not start: no answer to the hand-shake within 1s")
        assert took < 20
    else:
        assert result.retryable is False
        assert result.error.endswith("did not start: No such file or directory")
    all_gone(pids(tmp_path))


def test_a_cancelled_run_kills_its_servers_at_once(tmp_path: Path) -> None:
    """Cancelled (a cancel, the run's timeout, a stop) in the middle of an MCP call that
    keeps its server from exiting when its stdin closes: the group is killed first, so
    the run ends at once, not after the SDK's grace (2 s, then SIGTERM)."""
    blocking = tmp_path / "blocking"
    servers = server_yaml(tmp_path, ["block"], {"MCP_BLOCKING": str(blocking)})

    async def main() -> tuple[float, Side]:
        async with FakeLLM() as llm:
            side = Side(tmp_path / "db", mcp_config(llm, servers))
            llm.queue(tool_calls(call("files__block", {"seconds": 120}, "c1")))
            task = asyncio.get_running_loop().create_task(
                executor_for("agent")(side.config.tasks["t1"], side.ctx(), ExecEnv())
            )
            deadline = time.monotonic() + 30
            while ("tool_started" not in [k for _, k, _ in side.steps()]) and not task.done():
                assert time.monotonic() < deadline, "the call never started"
                await asyncio.sleep(0.02)
            while not blocking.exists():  # the call is on the server's worker thread
                assert time.monotonic() < deadline, "the call never reached the server"
                await asyncio.sleep(0.02)
            began = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            took = time.monotonic() - began
            await side.gateway.aclose()
        return took, side

    took, side = run(main)
    [server] = pids(tmp_path)
    assert not alive(server)
    assert took < 1.5, f"the run took {took:.2f}s to end"
    assert side.steps()[-1][1] == "tool_started"  # the outcome is unknown: not made up


PROBE = """
import runpy, sys
sys.argv = ["agentd", *sys.argv[1:]]
try:
    runpy.run_module("agentd.cli", run_name="__main__")
except SystemExit:
    pass
print("MODULES " + " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def test_the_cli_does_not_import_the_mcp_sdk(tmp_path: Path) -> None:
    """Only a run with an MCP server pays for the SDK's import (about a second): not the
    CLI, not even on a config that declares one."""
    config = tmp_path / "agentd.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            daemon: {{state_dir: {tmp_path / "state"}}}
            tasks:
              t1:
                schedule: {{manual: true}}
                agent:
                  base_url: http://127.0.0.1:1/v1
                  model: m1
                  prompt: p
                  mcp:
            """
        )
        + textwrap.indent(server_yaml(tmp_path, ["add"]).strip() + "\n", " " * 8)
    )
    for args in (("check-config",), ("tasks",)):
        out = subprocess.run(
            [PY, "-c", PROBE, *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        modules = set(out.stderr.rsplit("MODULES ", 1)[1].split())
        assert "agentd.config" in modules, out.stderr
        assert [m for m in modules if m == "mcp" or m.startswith("mcp.")] == [], args
        if args == ("check-config",):
            assert out.returncode == 0, out.stderr
