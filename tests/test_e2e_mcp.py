"""End to end, an agent's MCP server (``agent.mcp``): the real daemon, a real MCP server
over stdio (tests/fixtures/mcp_server.py), the scripted model over HTTP. The server
lives while its run does, also when the run is cancelled in the middle of a call."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import wait_for
from test_e2e_agent import providers, steps
from test_toolloop_mcp import alive

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from fake_llm import FakeLLM, ThreadedFakeLLM, call, tool_calls

pytestmark = pytest.mark.e2e

PY = sys.executable
SERVER = Path(__file__).resolve().parent / "fixtures" / "mcp_server.py"


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with ThreadedFakeLLM() as server:
        yield server


def mcp_task(tmp: Path) -> str:
    env = {"MCP_OUT": str(tmp / "out.txt"), "MCP_PIDS": str(tmp / "pids.txt")}
    return f"""
    mcp-agent:
      schedule: {{manual: true}}
      agent:
        provider: fake
        system: Use the tools.
        prompt: Append a line, then add two numbers.
        max_steps: 5
        mcp:
          - name: files
            command: [{PY}, {SERVER}]
            env: {json.dumps(env)}
            allow: [append_line, add, block]
    """


def server_pid(tmp: Path) -> int:
    text = wait_for(lambda: (tmp / "pids.txt").read_text() if (tmp / "pids.txt").exists() else "")
    return int(text.split()[0])


def test_an_mcp_run_through_the_daemon(make_daemon: Any, llm: FakeLLM, tmp_path: Path) -> None:
    llm.queue(
        tool_calls(call("files__append_line", {"line": "alpha"}, "c1")),
        tool_calls(call("files__add", {"a": 20, "b": 22}, "c2")),
        fake_llm.ok("alpha appended; 42"),
    )
    d = make_daemon(mcp_task(tmp_path), top=providers(llm)).start()
    run_id = d.trigger("mcp-agent")
    d.wait_status(run_id, "succeeded")
    assert llm.requests[1].tool_results == {"c1": "appended alpha"}
    assert llm.requests[2].tool_results == {"c1": "appended alpha", "c2": "42"}
    assert [line.split()[0] for line in (tmp_path / "out.txt").read_text().splitlines()] == [
        "alpha"
    ]
    assert [k for _, k, _ in steps(d, run_id)].count("tool_result") == 2
    pid = server_pid(tmp_path)
    wait_for(lambda: not alive(pid), 10, "the server gone")
    log = d.log()
    assert f"mcp server started run={run_id} server=files pid={pid}" in log
    assert f"mcp server stopped run={run_id} server=files" in log
    assert d.stop() == 0


def test_a_run_cancelled_mid_mcp_call_ends_its_server(
    make_daemon: Any, llm: FakeLLM, tmp_path: Path
) -> None:
    llm.queue(tool_calls(call("files__block", {"seconds": 300}, "c1")))
    d = make_daemon(mcp_task(tmp_path), top=providers(llm)).start()
    run_id = d.trigger("mcp-agent")
    wait_for(lambda: (1, "tool_started", "c1") in steps(d, run_id), what="the call to start")
    pid = server_pid(tmp_path)
    d.cli("cancel", run_id)
    row = d.wait_status(run_id, "cancelled", timeout=10)
    assert row["outcome"] == "cancelled"
    wait_for(lambda: not alive(pid), 10, "the server gone")
    assert d.stop() == 0
