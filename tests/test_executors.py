"""Executors against real parts: real subprocesses and real HTTP servers on 127.0.0.1.

Only the runner's store is stood in for, by ``MemoryBackend``. Each test drives its
own event loop with ``asyncio.run``; nothing sleeps to wait, it awaits or polls with a
generous deadline (a loaded 2-core CI box is slow, never wrong).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from aiohttp import web

import agentd
from agentd.clock import SystemClock, parse_retry_after
from agentd.config import Config, TaskConfig, parse_config
from agentd.context import RunContext
from agentd.executors import ExecEnv, executor_for
from agentd.executors.command import inherited_env, use_pidfd_child_watcher
from agentd.models import Result, StopRequested
from agentd.providers import Gateway
from agentd.state.sqlite.engine import SqliteStore

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fake_llm
from fake_llm import FakeLLM, serve

T = TypeVar("T")
AGENTD_SRC = str(Path(agentd.__file__).parent) + os.sep
DEADLINE = 30.0
PY = sys.executable


class MemoryBackend:
    """The runner's store, in memory: checkpoints by run id, LLM calls, heartbeats."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, Any] = {}
        self.progress_log: list[tuple[int, int | None, str]] = []
        self.heartbeats = 0
        self.on_save: Callable[[Any], None] | None = None
        self.progressed = asyncio.Event()  # binds to a loop only when awaited

    def load_checkpoint(self, run_id: str) -> Any | None:
        return self.checkpoints.get(run_id)

    def save_checkpoint(self, run_id: str, data: Any) -> None:
        self.checkpoints[run_id] = json.loads(json.dumps(data))
        if self.on_save is not None:
            self.on_save(data)

    def progress(self, run_id: str, done: int, total: int | None, message: str) -> None:
        self.progress_log.append((done, total, message))
        self.progressed.set()

    def heartbeat(self, run_id: str) -> None:
        self.heartbeats += 1


def make_ctx(
    workspace: Path,
    backend: MemoryBackend,
    params: dict[str, Any] | None = None,
    scheduled_for: datetime | None = None,
) -> RunContext:
    workspace.mkdir(parents=True, exist_ok=True)
    return RunContext(
        run_id="run-1",
        task_id="t1",
        attempt=2,
        scheduled_for=scheduled_for,
        params=params if params is not None else {},
        workspace=workspace,
        backend=backend,
        loop=asyncio.get_running_loop(),
        logger=logging.getLogger("agentd.test"),
    )


def make_task(kind: str, spec: dict[str, Any], params: dict[str, Any] | None = None) -> TaskConfig:
    return TaskConfig.model_validate(
        {"id": "t1", "schedule": {"manual": True}, kind: spec, "params": params or {}}
    )


async def execute(
    task: TaskConfig, ctx: RunContext, env: ExecEnv | None = None, timeout: float = DEADLINE
) -> Result:
    result = await asyncio.wait_for(executor_for(task.kind)(task, ctx, env or ExecEnv()), timeout)
    assert not stray_tasks(), "executor left tasks behind"
    return result


def stray_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running agentd code (the in-loop test servers have their own)."""
    here = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not here and AGENTD_SRC in repr(t)]


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def run_one(task: TaskConfig, workspace: Path, env: ExecEnv | None = None) -> Result:
    """Execute one task on a fresh loop; the context must be made on that loop."""

    async def main() -> Result:
        return await execute(task, make_ctx(workspace, MemoryBackend()), env)

    return run(main)


async def poll(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def is_dead(pid: int) -> bool:
    """Reaped, or an orphaned zombie: pid 1 in a container may never reap orphans."""
    if reaped(pid):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def all_text(workspace: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in workspace.rglob("*") if p.is_file())


# ---------------------------------------------------------------- command


def test_command_success_streams_output(tmp_path: Path) -> None:
    code = "import os, sys; print('hello'); print(os.getpid(), file=sys.stderr)"
    task = make_task("command", {"argv": [PY, "-c", code]})
    result = run_one(task, tmp_path)
    assert result.ok and result.exit_code == 0 and result.error is None
    assert (tmp_path / "stdout.log").read_text() == "hello\n"
    pid = (tmp_path / "stderr.log").read_text()
    assert reaped(int(pid))  # no zombie left behind
    assert result.detail == {"stdout_bytes": 6, "stderr_bytes": len(pid)}


def test_silent_command_leaves_no_output_files(tmp_path: Path) -> None:
    task = make_task("command", {"argv": ["true"]})
    result = run_one(task, tmp_path)
    assert result.ok and result.exit_code == 0
    assert tmp_path.is_dir()  # AGENTD_WORKSPACE exists for the command to use
    assert not (tmp_path / "stdout.log").exists()
    assert not (tmp_path / "stderr.log").exists()


def test_pidfd_child_watcher_reaps_commands_with_their_exit_code(tmp_path: Path) -> None:
    """What the daemon installs on Python 3.11: children reaped through a pidfd on the
    loop, with no waiter thread per command."""
    policy = asyncio.get_event_loop_policy()
    if not use_pidfd_child_watcher():
        pytest.skip("Python 3.12+ uses pidfds by itself, or the kernel has no pidfd_open")
    try:
        code = "import os, sys; print(os.getpid()); sys.exit(3)"
        task = make_task("command", {"argv": [PY, "-c", code]})
        before = {t.name for t in threading.enumerate()}
        result = run_one(task, tmp_path)
        assert type(policy.get_child_watcher()).__name__ == "PidfdChildWatcher"
        assert not result.ok and result.exit_code == 3
        assert reaped(int((tmp_path / "stdout.log").read_text()))
        new_threads = {t.name for t in threading.enumerate()} - before
        assert not [name for name in new_threads if name.startswith("waitpid")]
    finally:
        policy.set_child_watcher(None)  # the default (threaded) one is made on next use


def test_command_failure_reports_exit_code_and_last_stderr_line(tmp_path: Path) -> None:
    script = "echo early >&2; echo 'the real problem' >&2; echo >&2; exit 3"
    failing = make_task("command", {"shell": script})
    tolerated = make_task("command", {"shell": script, "success_exit_codes": [0, 3]})
    long_line = make_task("command", {"shell": "printf 'x%.0s' $(seq 500) >&2; exit 1"})
    silent = make_task("command", {"shell": "exit 4"})

    async def main() -> list[Result]:
        return [
            await execute(t, make_ctx(tmp_path / str(i), MemoryBackend()))
            for i, t in enumerate([failing, tolerated, long_line, silent])
        ]

    failed, ok, long, quiet = run(main)
    assert not failed.ok and failed.exit_code == 3 and failed.retryable is None
    assert failed.error == "exit code 3: the real problem"
    assert ok.ok and ok.exit_code == 3
    assert long.error == "exit code 1: " + "x" * 200
    assert quiet.error == "exit code 4"


def test_command_killed_by_signal(tmp_path: Path) -> None:
    task = make_task("command", {"shell": "kill -KILL $$"})
    result = run_one(task, tmp_path)
    assert not result.ok and result.exit_code == -9
    assert result.error == "killed by signal SIGKILL"


def test_command_output_cap_keeps_draining(tmp_path: Path) -> None:
    # 2 MB per stream is far past the 64 KiB a pipe holds: a reader that stopped at the
    # cap would leave the child blocked in write() and this would time out.
    code = (
        "import sys\n"
        "for _ in range(200): sys.stdout.write('o' * 10000); sys.stderr.write('e' * 10000)\n"
        "sys.stderr.write('\\nlast words\\n')\n"
    )
    task = make_task("command", {"argv": [PY, "-c", code]})
    env = ExecEnv(output_max_bytes=4096)

    async def main() -> Result:
        return await execute(task, make_ctx(tmp_path, MemoryBackend()), env)

    result = run(main)
    assert result.ok, result.error
    marker = b"\n[agentd: output truncated at 4096 bytes]\n"
    assert (tmp_path / "stdout.log").read_bytes() == b"o" * 4096 + marker
    assert (tmp_path / "stderr.log").read_bytes() == b"e" * 4096 + marker
    assert result.detail["stdout_bytes"] == 2_000_000
    assert result.detail["stderr_bytes"] == 2_000_000 + len("\nlast words\n")


def test_command_error_tail_comes_from_past_the_cap(tmp_path: Path) -> None:
    code = "import sys; sys.stderr.write('e' * 100000 + '\\nfinal complaint\\n'); sys.exit(2)"
    task = make_task("command", {"argv": [PY, "-c", code]})
    result = run_one(task, tmp_path, ExecEnv(output_max_bytes=1024))
    assert result.error == "exit code 2: final complaint"
    assert (tmp_path / "stderr.log").stat().st_size < 1200


def test_command_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.setenv(name, "from-systemd")
    monkeypatch.setenv("AGENTD_TEST_PARENT", "yes")
    dump = [PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    inherit = make_task("command", {"argv": dump, "env": {"FOO": "bar", "WATCHDOG_PID": "1"}})
    minimal = make_task("command", {"argv": dump, "env": {"FOO": "baz"}, "inherit_env": False})

    async def main() -> tuple[dict[str, str], dict[str, str]]:
        ws1, ws2 = tmp_path / "a", tmp_path / "b"
        assert (await execute(inherit, make_ctx(ws1, MemoryBackend(), scheduled_for=when))).ok
        assert (await execute(minimal, make_ctx(ws2, MemoryBackend()))).ok
        return (
            json.loads((ws1 / "stdout.log").read_text()),
            json.loads((ws2 / "stdout.log").read_text()),
        )

    full, small = run(main)
    assert full["AGENTD_RUN_ID"] == "run-1" and full["AGENTD_TASK"] == "t1"
    assert full["AGENTD_ATTEMPT"] == "2"
    assert full["AGENTD_WORKSPACE"] == str(tmp_path / "a")
    assert full["AGENTD_SCHEDULED_FOR"] == "2026-01-02T03:04:05+00:00"
    assert full["FOO"] == "bar" and full["AGENTD_TEST_PARENT"] == "yes"
    assert small["FOO"] == "baz" and small["AGENTD_SCHEDULED_FOR"] == ""
    assert "AGENTD_TEST_PARENT" not in small and "PATH" in small
    for env in (full, small):
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & env.keys()


def test_command_environment_from_the_daemons_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon takes its environment once (``ExecEnv.inherited_env``): commands get
    that, without systemd's variables, and not what was set in the process since."""
    monkeypatch.setenv("AGENTD_TEST_PARENT", "before")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    snapshot = ExecEnv(inherited_env=inherited_env())
    monkeypatch.setenv("AGENTD_TEST_PARENT", "after")
    monkeypatch.setenv("AGENTD_TEST_LATER", "yes")
    dump = [PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    task = make_task("command", {"argv": dump, "env": {"FOO": "bar"}})
    minimal = make_task("command", {"argv": dump, "inherit_env": False})

    async def main() -> tuple[dict[str, str], dict[str, str]]:
        ws1, ws2 = tmp_path / "a", tmp_path / "b"
        assert (await execute(task, make_ctx(ws1, MemoryBackend()), snapshot)).ok
        assert (await execute(minimal, make_ctx(ws2, MemoryBackend()), snapshot)).ok
        return (
            json.loads((ws1 / "stdout.log").read_text()),
            json.loads((ws2 / "stdout.log").read_text()),
        )

    full, small = run(main)
    assert full["AGENTD_TEST_PARENT"] == "before" and "AGENTD_TEST_LATER" not in full
    assert full["FOO"] == "bar" and full["AGENTD_WORKSPACE"] == str(tmp_path / "a")
    assert "NOTIFY_SOCKET" not in full
    assert full["PATH"] == small["PATH"] == os.environ["PATH"]
    assert "AGENTD_TEST_PARENT" not in small and small["AGENTD_TASK"] == "t1"


def test_command_cwd_and_shell(tmp_path: Path) -> None:
    where = tmp_path / "sub dir"
    where.mkdir()
    task = make_task(
        "command", {"shell": "pwd; echo one two three | wc -w | tr -d ' '", "cwd": str(where)}
    )
    result = run_one(task, tmp_path / "ws")
    assert result.ok
    cwd, words = (tmp_path / "ws" / "stdout.log").read_text().splitlines()
    assert os.path.realpath(cwd) == os.path.realpath(where) and words == "3"


def test_command_spawn_failures_are_not_retryable(tmp_path: Path) -> None:
    not_exec = tmp_path / "script.sh"
    not_exec.write_text("#!/bin/sh\necho hi\n")
    not_exec.chmod(0o644)
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "missing": ({"argv": ["/nonexistent/agentd-no-such-tool"]}, "No such file"),
        "perm": ({"argv": [str(not_exec)]}, "Permission denied"),
        "cwd": ({"argv": ["true"], "cwd": str(tmp_path / "nope")}, str(tmp_path / "nope")),
    }

    async def main() -> dict[str, Result]:
        return {
            name: await execute(
                make_task("command", spec), make_ctx(tmp_path / name, MemoryBackend())
            )
            for name, (spec, _) in cases.items()
        }

    for name, result in run(main).items():
        assert not result.ok and result.retryable is False, name
        assert result.error and result.error.startswith("cannot start"), result.error
        assert cases[name][1] in result.error, result.error


def test_command_cancel_kills_whole_group_after_grace(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sleep 30 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    task = make_task("command", {"shell": script})
    env = ExecEnv(kill_grace_s=0.3)

    async def main() -> float:
        job = asyncio.ensure_future(
            executor_for("command")(task, make_ctx(tmp_path, MemoryBackend()), env)
        )
        await poll(pids.exists, "the command to write its pids")
        shell_pid, grandchild = (int(p) for p in pids.read_text().split())
        started = time.monotonic()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        elapsed = time.monotonic() - started
        assert reaped(shell_pid)  # our own child: never left a zombie
        await poll(lambda: is_dead(grandchild), "the grandchild to die", 10)
        assert not stray_tasks()
        return elapsed

    elapsed = run(main)
    assert 0.3 <= elapsed < 20  # it ignored SIGTERM, so it took SIGKILL after the grace


def test_command_cancel_while_spawning_still_kills_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sleep 30 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    task = make_task("command", {"shell": script})

    async def main() -> float:
        ctx = make_ctx(tmp_path / "ws", MemoryBackend())
        job = asyncio.ensure_future(executor_for("command")(task, ctx, ExecEnv(kill_grace_s=0.3)))
        await asyncio.sleep(0)  # let it start spawning, not finish
        started = time.monotonic()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        elapsed = time.monotonic() - started
        assert not stray_tasks()
        if pids.exists():  # the shell may not have got that far
            for pid in (int(p) for p in pids.read_text().split()):
                await poll(partial(is_dead, pid), f"pid {pid} to die", 10)
        return elapsed

    assert run(main) < 20  # not the 30 s of a grandchild holding the pipes


def test_command_leftover_holding_stdout_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "bg.pid"
    task = make_task("command", {"shell": f"sleep 60 & echo $! > {pid_file}; echo done"})
    env = ExecEnv(kill_grace_s=0.3)

    async def main() -> Result:
        result = await execute(task, make_ctx(tmp_path / "ws", MemoryBackend()), env)
        await poll(lambda: is_dead(int(pid_file.read_text())), "the leftover to die", 10)
        return result

    started = time.monotonic()
    result = run(main)
    assert result.ok and result.detail.get("stragglers_killed") is True
    assert time.monotonic() - started < 30
    assert (tmp_path / "ws" / "stdout.log").read_text() == "done\n"


# ---------------------------------------------------------------- http


SEEN = web.AppKey("seen", list)


def http_app(release: asyncio.Event) -> web.Application:
    seen: list[dict[str, Any]] = []

    async def status(request: web.Request) -> web.Response:
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"status {code}", headers=headers)

    async def echo(request: web.Request) -> web.Response:
        seen.append(
            {
                "method": request.method,
                "body": await request.text(),
                "content_type": request.content_type,
                "authorization": request.headers.get("Authorization"),
            }
        )
        return web.json_response({"received": len(seen)}, status=201)

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"b" * 200_000)

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app[SEEN] = seen
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    return app


def run_http(
    tmp_path: Path, specs: dict[str, dict[str, Any]], env: ExecEnv | None = None
) -> tuple[dict[str, Result], list[dict[str, Any]]]:
    async def main() -> tuple[dict[str, Result], list[dict[str, Any]]]:
        release = asyncio.Event()
        app = http_app(release)
        async with serve(app) as base:
            results = {}
            for name, spec in specs.items():
                spec = {**spec, "url": base + spec["url"]}
                ctx = make_ctx(tmp_path / name, MemoryBackend())
                results[name] = await execute(make_task("http", spec), ctx, env)
            release.set()
        return results, app[SEEN]

    return run(main)


def test_http_success_and_expect_status(tmp_path: Path) -> None:
    results, seen = run_http(
        tmp_path,
        {
            "ok": {"url": "/status/200"},
            "post": {
                "url": "/echo",
                "method": "POST",
                "json": {"a": 1},
                "headers": {"Authorization": "Bearer http-secret-1"},
            },
            "raw": {"url": "/echo", "method": "PUT", "body": "plain text", "expect_status": [201]},
            "wanted_404": {"url": "/status/404", "expect_status": [404]},
            "unwanted_204": {"url": "/status/204", "expect_status": [200]},
        },
    )
    ok = results["ok"]
    assert ok.ok and ok.http_status == 200 and set(ok.detail) >= {"status", "elapsed_s"}
    assert (tmp_path / "ok" / "response.body").read_text() == "status 200"
    assert results["post"].ok and results["raw"].ok and results["wanted_404"].ok
    assert seen[0] == {
        "method": "POST",
        "body": '{"a":1}',
        "content_type": "application/json",
        "authorization": "Bearer http-secret-1",
    }
    assert seen[1]["body"] == "plain text" and seen[1]["method"] == "PUT"
    bad = results["unwanted_204"]
    assert not bad.ok and bad.error == "HTTP 204" and bad.http_status == 204
    assert (tmp_path / "post" / "response.body").read_text() == '{"received": 1}'
    for name, result in results.items():
        assert "http-secret-1" not in repr(result), name
    assert "http-secret-1" not in all_text(tmp_path)


def test_http_retry_after_and_server_errors(tmp_path: Path) -> None:
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    results, _ = run_http(
        tmp_path,
        {
            "secs": {"url": "/status/429?retry_after=7"},
            "date": {"url": "/status/503?retry_after=" + quote(future)},
            "past": {"url": "/status/429?retry_after=" + quote(past)},
            "plain500": {"url": "/status/500"},
        },
    )
    secs = results["secs"]
    assert not secs.ok and secs.http_status == 429 and secs.retry_after_s == 7.0
    assert secs.error == "HTTP 429" and secs.retryable is None  # the task's retry policy decides
    date = results["date"]
    assert date.retry_after_s is not None and 60 < date.retry_after_s <= 121
    assert results["past"].retry_after_s == 0.0
    failed = results["plain500"]
    assert failed.http_status == 500 and failed.error == "HTTP 500" and failed.retry_after_s is None


def test_http_body_is_capped(tmp_path: Path) -> None:
    results, _ = run_http(tmp_path, {"big": {"url": "/big"}}, ExecEnv(output_max_bytes=2048))
    assert results["big"].ok and results["big"].detail["truncated"] is True
    assert (tmp_path / "big" / "response.body").read_bytes() == b"b" * 2048


def test_http_transport_errors_are_retryable(tmp_path: Path) -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        refused = make_task("http", {"url": f"http://127.0.0.1:{port}/"})
        result = run_one(refused, tmp_path / "a")
    assert not result.ok and result.retryable is True and result.http_status is None
    assert result.error and "ConnectError" in result.error

    results, _ = run_http(tmp_path, {"slow": {"url": "/slow", "timeout": 0.3}})
    slow = results["slow"]
    assert not slow.ok and slow.retryable is True and slow.error and "timed out" in slow.error


def test_parse_retry_after() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("-5", now) == 0.0
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk, now) is None


# ---------------------------------------------------------------- python


def py_task(ref: str) -> TaskConfig:
    return make_task("python", {"callable": ref})


def test_python_sync_and_async_callables(tmp_path: Path) -> None:
    when = datetime(2026, 5, 6, 7, 8, tzinfo=UTC)

    async def main() -> tuple[Result, Result, Result, int]:
        sync = await execute(
            py_task("sample_tasks:sync_ok"), make_ctx(tmp_path / "s", MemoryBackend(), None, when)
        )
        coro = await execute(
            py_task("sample_tasks:async_ok"), make_ctx(tmp_path / "a", MemoryBackend())
        )
        none = await execute(
            py_task("sample_tasks:returns_none"), make_ctx(tmp_path / "n", MemoryBackend())
        )
        return sync, coro, none, threading.get_ident()

    sync, coro, none, loop_thread = run(main)
    assert sync.ok and coro.ok and none.ok
    saved = json.loads((tmp_path / "s" / "result.json").read_text())
    assert saved["task"] == "t1" and saved["when"] == str(when)  # default=str
    assert saved["thread"] != loop_thread  # a sync callable never blocks the loop
    assert json.loads((tmp_path / "a" / "result.json").read_text())["thread"] == loop_thread
    assert not (tmp_path / "n" / "result.json").exists()


def test_python_resolve_errors_are_not_retryable(tmp_path: Path) -> None:
    async def main() -> list[Result]:
        refs = ["agentd_no_such_module_xyz:f", "sample_tasks:no_such_function"]
        return [await execute(py_task(r), make_ctx(tmp_path, MemoryBackend())) for r in refs]

    missing_module, missing_attr = run(main)
    assert missing_module.retryable is False and not missing_module.ok
    assert missing_module.error and "cannot import module 'agentd_no_such_module_xyz'" in (
        missing_module.error
    )
    assert missing_attr.error == "module 'sample_tasks' has no attribute 'no_such_function'"
    assert missing_attr.retryable is False


def test_python_exception_writes_traceback(tmp_path: Path) -> None:
    task = make_task("python", {"callable": "sample_tasks:boom"}, {"n": 42})

    async def main() -> tuple[Result, Result, Result]:
        boom = await execute(task, make_ctx(tmp_path / "b", MemoryBackend(), {"n": 42}))
        ctx = make_ctx(tmp_path / "e", MemoryBackend())
        exits = await execute(py_task("sample_tasks:exits"), ctx)
        ctx = make_ctx(tmp_path / "s", MemoryBackend())
        stops = await execute(py_task("sample_tasks:stops"), ctx)
        return boom, exits, stops

    boom, exits, stops = run(main)
    assert not boom.ok and boom.error == "ValueError: bad input 42" and boom.retryable is None
    tb = (tmp_path / "b" / "traceback.txt").read_text()
    assert "Traceback" in tb and "in boom" in tb and "ValueError: bad input 42" in tb
    assert not exits.ok and exits.error == "SystemExit: 3"
    assert not stops.ok and stops.error == "RuntimeError: StopIteration raised: StopIteration()"
    assert "in stops" in (tmp_path / "s" / "traceback.txt").read_text()


@pytest.mark.parametrize("ref", ["sample_tasks:process_items", "sample_tasks:process_items_async"])
def test_python_checkpoint_stop_and_resume(tmp_path: Path, ref: str) -> None:
    items = ["a", "b", "c", "d", "e"]
    seen: list[str] = []
    backend = MemoryBackend()  # the store outlives the daemon's event loops

    async def first() -> None:
        ctx = make_ctx(tmp_path, backend, {"items": items, "seen": seen})
        # The daemon starts draining while item 1 is being saved.
        backend.on_save = lambda data: ctx.request_stop() if data["next"] == 2 else None
        with pytest.raises(StopRequested):
            await execute(py_task(ref), ctx)
        backend.on_save = None

    async def second() -> Result:
        ctx = make_ctx(tmp_path, backend, {"items": items, "seen": seen})
        return await execute(py_task(ref), ctx)

    run(first)
    assert seen == ["a", "b"] and backend.checkpoints["run-1"] == {"next": 2}
    result = run(second)
    assert result.ok and seen == items  # each item exactly once
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == {"processed": 3, "resumed_from": 2}


def test_python_cancel_sets_ctx_cancelled(tmp_path: Path) -> None:
    saw_cancel = threading.Event()

    async def main() -> RunContext:
        backend = MemoryBackend()
        ctx = make_ctx(tmp_path, backend, {"saw_cancel": saw_cancel})
        job = asyncio.ensure_future(
            executor_for("python")(py_task("sample_tasks:wait_for_cancel"), ctx, ExecEnv())
        )
        await asyncio.wait_for(backend.progressed.wait(), DEADLINE)
        assert not ctx.cancelled
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        return ctx

    ctx = run(main)
    assert ctx.cancelled and ctx.stop_requested
    assert saw_cancel.wait(DEADLINE), "the worker thread never saw ctx.cancelled"


# ---------------------------------------------------------------- agent

SECRET = "sk-test-SECRET-123"


class LLMSide:
    """What the daemon puts behind ``ctx.llm``: a real state DB (the ledger) and gateway."""

    def __init__(self, root: Path, config: Config | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.store = SqliteStore(root / "state.sqlite")
        self.config = config or Config()
        self.gateway = Gateway(self.store, self.config, SystemClock())

    def ctx(
        self, workspace: Path, task: TaskConfig, backend: MemoryBackend | None = None
    ) -> RunContext:
        ctx = make_ctx(workspace, backend or MemoryBackend(), dict(task.params))
        ctx._llm = self.gateway.for_run(task, ctx.run_id)
        return ctx

    def ledger(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.conn.execute("SELECT * FROM ledger ORDER BY id")]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.store.events() if e["kind"] == kind]


def agent_task(llm: FakeLLM, params: dict[str, Any] | None = None, **spec: Any) -> TaskConfig:
    return make_task("agent", {"base_url": llm.url, "model": "m1", **spec}, params)


def priced(llm: FakeLLM, task_yaml: str, limits: str = "") -> Config:
    """A config with a priced provider ``fake`` at the fake server and one task ``t1``."""
    text = (
        textwrap.dedent(
            f"""
        providers:
          fake:
            base_url: {llm.url}
            default_model: m1
            max_tokens: 10
            prices: {{m1: {{input: 1000, output: 1000}}}}   # 0.001 USD a token
        """
        )
        + textwrap.dedent(limits)
        + "tasks:\n  t1:\n"
        + textwrap.indent(textwrap.dedent(task_yaml), "    ")
    )
    return parse_config(text, "test.yaml", {})


def assert_secret_absent(workspace: Path, *things: object) -> None:
    assert SECRET not in all_text(workspace)
    for thing in things:
        assert SECRET not in repr(thing)


def test_agent_single_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTD_TEST_KEY", SECRET)

    async def main() -> tuple[Result, FakeLLM, LLMSide]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.queue(fake_llm.ok("Cats are great.", 11, 4))
            task = agent_task(
                llm,
                {"topic": "cats"},
                api_key_env="AGENTD_TEST_KEY",
                system="Be brief.",
                prompt="Summarise {topic}.",
                temperature=0.2,
                max_tokens=50,
            )
            result = await execute(task, side.ctx(tmp_path, task))
        await side.gateway.aclose()
        return result, llm, side

    result, llm, side = run(main)
    assert result.ok and result.detail == {"input_tokens": 11, "output_tokens": 4, "cost_usd": 0}
    assert (tmp_path / "result.md").read_text() == "Cats are great."
    [req] = llm.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == f"Bearer {SECRET}"
    assert req.body == {
        "model": "m1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Summarise cats."},
        ],
        "temperature": 0.2,
        "max_tokens": 50,
    }
    [call] = side.ledger()
    assert call["duration_s"] >= 0
    assert {k: call[k] for k in ("provider", "model", "input_tokens", "output_tokens")} == {
        "provider": "127.0.0.1",
        "model": "m1",
        "input_tokens": 11,
        "output_tokens": 4,
    }
    assert (call["state"], call["status"], call["run_id"], call["task_id"]) == (
        "committed",
        "200",
        "run-1",
        "t1",
    )
    [event] = side.events("llm_call")
    assert event["data"]["input_tokens"] == 11 and event["run_id"] == "run-1"
    side.store.close()
    assert_secret_absent(tmp_path, result, side.ledger, event)


def test_agent_key_from_file_and_no_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"  {SECRET}\n")

    async def main() -> tuple[list[Result], FakeLLM]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            with_file = agent_task(llm, prompt="hi", api_key_file=str(key_file))
            keyless = agent_task(llm, prompt="hi")
            results = [
                await execute(with_file, side.ctx(tmp_path / "f", with_file)),
                await execute(keyless, side.ctx(tmp_path / "n", keyless)),
            ]
        await side.gateway.aclose()
        return results, llm

    results, llm = run(main)
    assert all(r.ok for r in results)
    assert llm.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert "Authorization" not in llm.requests[1].headers
    # Every call is bounded, so it can be reserved: the provider default cap is sent.
    assert llm.requests[1].body["max_tokens"] == 1024
    assert set(llm.requests[1].body) == {"model", "messages", "max_tokens"}
    assert_secret_absent(tmp_path / "f", *results)


def test_agent_unset_key_variable_fails_without_calling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTD_TEST_UNSET_KEY", raising=False)

    async def main() -> tuple[Result, FakeLLM, LLMSide]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            task = agent_task(llm, prompt="hi", api_key_env="AGENTD_TEST_UNSET_KEY")
            return await execute(task, side.ctx(tmp_path, task)), llm, side

    result, llm, side = run(main)
    assert not result.ok and result.retryable is False and llm.requests == []
    assert result.error and "AGENTD_TEST_UNSET_KEY" in result.error
    assert side.ledger() == []  # nothing reserved for a call that was never made


def test_agent_items_resume_from_checkpoint(tmp_path: Path) -> None:
    items = ["apple", "banana", {"name": "cherry"}, "date"]
    backend = MemoryBackend()
    side = LLMSide(tmp_path / "db")

    async def attempt(stop_after: int | None) -> tuple[Result | None, FakeLLM]:
        async with FakeLLM() as llm:
            task = agent_task(
                llm, {"style": "short"}, prompt="Describe {item} ({style}).", items=items
            )
            ctx = side.ctx(tmp_path, task, backend)
            try:
                if stop_after is not None:  # the daemon begins draining during item 1
                    backend.on_save = lambda data: (
                        ctx.request_stop() if data["next_item"] == stop_after + 1 else None
                    )
                    with pytest.raises(StopRequested):
                        await execute(task, ctx)
                    return None, llm
                backend.on_save = None
                return await execute(task, ctx), llm
            finally:
                await side.gateway.aclose()

    _, first = run(lambda: attempt(stop_after=1))
    assert [r.user_content for r in first.requests] == [
        "Describe apple (short).",
        "Describe banana (short).",
    ]
    assert backend.checkpoints["run-1"] == {"next_item": 2}
    result, second = run(lambda: attempt(stop_after=None))
    assert result is not None and result.ok
    assert [r.user_content for r in second.requests] == [
        "Describe {'name': 'cherry'} (short).",
        "Describe date (short).",
    ]
    assert result.detail == {
        "items": 4,
        "resumed_from": 2,
        "processed": 2,
        "input_tokens": 20,
        "output_tokens": 10,
        "cost_usd": 0,
    }
    assert [c["item"] for c in side.ledger()] == [0, 1, 2, 3]
    saved = json.loads((tmp_path / "items" / "00002.json").read_text())
    assert saved == {
        "item": {"name": "cherry"},
        "content": "echo: Describe {'name': 'cherry'} (short).",
        "usage": {"input_tokens": 10, "output_tokens": 5, "cost_usd": 0},
    }
    assert sorted(p.name for p in (tmp_path / "items").iterdir()) == [
        f"{i:05d}.json" for i in range(4)
    ]
    # Progress follows the durable checkpoint; item 1 stopped the first attempt there.
    assert [p[:2] for p in backend.progress_log] == [(1, 4), (3, 4), (4, 4)]


def test_items_checkpoint_is_the_set_of_done_items(tmp_path: Path) -> None:
    """``{"next_item": k, "done": [...]}``: all below k, and those listed above it; the
    sequential form (``{"next_item": k}``) and damaged ones read as they must."""
    from agentd.executors.agent import _checkpoint

    assert _checkpoint(set()) == {"next_item": 0}
    assert _checkpoint({0, 1, 2}) == {"next_item": 3}
    assert _checkpoint({0, 1, 3, 5}) == {"next_item": 2, "done": [3, 5]}
    assert _checkpoint({4}) == {"next_item": 0, "done": [4]}

    def read(saved: Any, n: int = 6) -> set[int]:
        from agentd.executors.agent import _done_items

        backend = MemoryBackend()
        backend.checkpoints["run-1"] = saved

        async def main() -> set[int]:
            return _done_items(make_ctx(tmp_path, backend), n)

        return run(main)

    assert read({"next_item": 2, "done": [3, 5]}) == {0, 1, 3, 5}
    assert read({"next_item": 3}) == {0, 1, 2}
    assert read({"next_item": 99}) == set(range(6))
    assert read({"next_item": "x", "done": [1, "y", 9, -1]}) == {1}
    assert read(["not", "a", "dict"]) == set() and read(None) == set()


def test_items_concurrency_keeps_that_many_calls_in_flight(tmp_path: Path) -> None:
    backend = MemoryBackend()
    items = [f"i{n}" for n in range(7)]

    async def main() -> tuple[Result, FakeLLM]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.gate = 3  # the first three are held until all three are in flight
            task = agent_task(llm, prompt="{item}", items=items, items_concurrency=3)
            result = await execute(task, side.ctx(tmp_path, task, backend))
            await side.gateway.aclose()
            return result, llm

    result, llm = run(main)
    assert result.ok, result.error
    assert llm.max_in_flight == 3
    assert sorted(r.user_content for r in llm.requests) == sorted(items)
    assert backend.checkpoints["run-1"] == {"next_item": 7}
    assert result.detail["processed"] == 7 and result.detail["input_tokens"] == 70
    for n, item in enumerate(items):
        saved = json.loads((tmp_path / "items" / f"{n:05d}.json").read_text())
        assert saved["item"] == item and saved["content"] == f"echo: {item}"
    assert [p[:2] for p in backend.progress_log][-1] == (7, 7)


def test_items_concurrency_stop_then_resume_asks_only_what_is_not_done(tmp_path: Path) -> None:
    """A stop at a checkpoint cancels the calls in flight; the resumed run asks exactly
    the items its checkpoint does not count done, and every item ends with its answer."""
    backend = MemoryBackend()
    items = [f"i{n}" for n in range(8)]
    side = LLMSide(tmp_path / "db")

    async def attempt(stop: bool) -> tuple[Result | None, FakeLLM]:
        async with FakeLLM() as llm:
            llm.default = lambda req: fake_llm.Reply(
                body=fake_llm.ok(f"echo: {req.user_content}").body,
                delay=0.01 * int(req.user_content[1:]),
            )
            task = agent_task(llm, prompt="{item}", items=items, items_concurrency=3)
            ctx = side.ctx(tmp_path, task, backend)
            try:
                if stop:
                    backend.on_save = lambda data: (
                        ctx.request_stop()
                        if data["next_item"] + len(data.get("done", [])) >= 3
                        else None
                    )
                    with pytest.raises(StopRequested):
                        await execute(task, ctx)
                    return None, llm
                backend.on_save = None
                return await execute(task, ctx), llm
            finally:
                await side.gateway.aclose()

    _, first = run(lambda: attempt(stop=True))
    saved = backend.checkpoints["run-1"]
    done = set(range(saved["next_item"])) | set(saved.get("done", []))
    assert 3 <= len(done) <= 5  # workers finishing in the stop's loop turn save too
    result, second = run(lambda: attempt(stop=False))
    assert result is not None and result.ok, result
    assert sorted(r.user_content for r in second.requests) == [
        f"i{n}" for n in range(8) if n not in done
    ]
    assert result.detail["resumed_from"] == len(done)
    assert result.detail["processed"] == 8 - len(done)
    # At most the calls in flight at the stop were asked twice.
    asked_first = {r.user_content for r in first.requests}
    assert len(asked_first) - len(done) <= 3
    assert backend.checkpoints["run-1"] == {"next_item": 8}
    assert sorted(p.name for p in (tmp_path / "items").iterdir()) == [
        f"{n:05d}.json" for n in range(8)
    ]


def test_items_concurrency_waits_out_the_others_reservations_then_stops_at_the_budget(
    tmp_path: Path,
) -> None:
    """In-flight calls hold worst-case reservations: a call refused only because of them
    waits for one to settle and asks again (cheap answers: every item fits); refused
    with nothing in flight, the budget is out and the run ends there."""

    async def main(reported_prompt: int, usd: float) -> tuple[Result, FakeLLM, LLMSide]:
        async with FakeLLM() as llm:
            llm.default = lambda req: fake_llm.ok(
                "fine",
                prompt_tokens=reported_prompt,
                completion_tokens=10 if reported_prompt > 1 else 4,
            )
            config = priced(
                llm,
                f"""
                schedule: {{manual: true}}
                agent: {{provider: fake, prompt: "{{item}}", items: [a, b, c, d, e, f],
                         items_concurrency: 4}}
                budget: {{run: {{usd: {usd}}}}}
                """,
            )
            side = LLMSide(tmp_path / f"db{usd}", config)
            task = config.tasks["t1"]
            result = await execute(task, side.ctx(tmp_path / f"w{usd}", task))
            await side.gateway.aclose()
        return result, llm, side

    # Reserved 0.018 a call (8 prompt tokens estimated + 10 out), charged 0.005.
    result, llm, side = run(lambda: main(1, 0.05))
    assert result.ok, result.error
    spent = sum(c["cost_usd"] for c in side.ledger() if c["state"] == "committed")
    assert len(llm.requests) == 6 and spent == pytest.approx(0.03) and spent <= 0.05
    assert llm.max_in_flight <= 2  # never more in flight than the budget's room
    # Charged what was reserved: one call fits, the second never does.
    result, llm, side = run(lambda: main(8, 0.02))
    assert not result.ok and result.budget_exhausted
    assert len(llm.requests) == 1
    spent = sum(c["cost_usd"] for c in side.ledger() if c["state"] == "committed")
    assert spent == pytest.approx(0.018) and spent <= 0.02


def test_agent_item_failure_keeps_progress(tmp_path: Path) -> None:
    backend = MemoryBackend()

    async def main() -> Result:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.queue(fake_llm.ok("one"), fake_llm.error(503, "overloaded"))
            task = agent_task(llm, prompt="{item}", items=["x", "y", "z"])
            return await execute(task, side.ctx(tmp_path, task, backend))

    result = run(main)
    assert not result.ok and result.retryable is True and result.http_status == 503
    assert result.detail["item"] == 1 and result.detail["resumed_from"] == 0
    assert result.detail["llm_error"] == "server_error"
    assert backend.checkpoints["run-1"] == {"next_item": 1}


def test_agent_http_errors_are_classified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTD_TEST_KEY", SECRET)
    replies = {
        "rate": fake_llm.error(429, "Rate limit reached", {"Retry-After": "12"}),
        "server": fake_llm.Reply(status=500, body="upstream exploded"),
        # Some providers echo the key back; it must not reach the result.
        "auth": fake_llm.error(401, f"Incorrect API key provided: {SECRET}."),
        "forbidden": fake_llm.error(403, "Project does not have access"),
        "notfound": fake_llm.Reply(status=404, body="x" * 1000),
        "context": fake_llm.error(
            400, "This model's maximum context length is 8192 tokens, you requested 9000"
        ),
        "policy": fake_llm.error(400, "Your request was rejected by our content policy"),
    }

    async def main() -> tuple[dict[str, Result], LLMSide]:
        side = LLMSide(tmp_path / "db")
        results = {}
        async with FakeLLM() as llm:
            for name, reply in replies.items():
                llm.queue(reply)
                task = agent_task(llm, prompt="hi", api_key_env="AGENTD_TEST_KEY")
                results[name] = await execute(task, side.ctx(tmp_path / name, task))
        await side.gateway.aclose()
        return results, side

    results, side = run(main)
    rate = results["rate"]
    assert not rate.ok and rate.retryable is True and rate.http_status == 429
    assert rate.retry_after_s == 12.0 and rate.error == "HTTP 429: Rate limit reached"
    server = results["server"]
    assert server.retryable is True and server.http_status == 500
    assert server.error == "HTTP 500: upstream exploded"
    auth = results["auth"]
    assert auth.retryable is False and auth.http_status == 401
    assert auth.error == "HTTP 401: Incorrect API key provided: ***."
    assert auth.detail["llm_error"] == "auth"
    assert results["forbidden"].retryable is False
    assert results["forbidden"].error == "HTTP 403: Project does not have access"
    notfound = results["notfound"]
    assert notfound.retryable is False and notfound.error == "HTTP 404: " + "x" * 300
    assert notfound.detail["llm_error"] == "model_not_found"
    context = results["context"]
    assert context.retryable is False and context.detail["llm_error"] == "context_length"
    assert context.error and "maximum context length is 8192" in context.error
    policy = results["policy"]
    assert policy.retryable is False and policy.detail["llm_error"] == "content_policy"
    calls = side.ledger()
    assert [c["status"] for c in calls] == ["429", "500", "401", "403", "404", "400", "400"]
    # Refused requests are not billed by providers: charged nothing.
    assert all(c["cost_usd"] == 0 and c["input_tokens"] == 0 for c in calls)
    side.store.close()
    assert_secret_absent(tmp_path, *results.values(), calls)


def test_error_classification_table() -> None:
    from agentd.providers import classify

    assert classify(429, "") == (True, "rate_limited")
    assert classify(502, "") == (True, "server_error")
    assert classify(408, "")[0] is True
    assert classify(401, "") == (False, "auth")
    assert classify(404, "The model `gpt-9` does not exist") == (False, "model_not_found")
    assert classify(400, "context_length_exceeded") == (False, "context_length")
    assert classify(400, "flagged by the content filter") == (False, "content_policy")
    assert classify(400, "invalid temperature") == (False, "bad_request")
    assert classify(402, "insufficient credits") == (False, "payment_required")


def test_agent_timeout_is_retryable_and_charged_at_worst_case(tmp_path: Path) -> None:
    async def main() -> tuple[Result, LLMSide]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.queue(fake_llm.Reply(hang=True))
            task = agent_task(llm, prompt="hi", request_timeout=0.3, max_tokens=7)
            result = await execute(task, side.ctx(tmp_path, task))
        await side.gateway.aclose()
        return result, side

    result, side = run(main)
    assert not result.ok and result.retryable is True
    assert result.error == "request timed out after 0.3s"
    [call] = side.ledger()
    # The provider may have done (and billed) the work: unknown usage is the worst case.
    assert call["status"] == "timeout" and call["usage_missing"] == 1
    assert call["output_tokens"] == 7 and call["input_tokens"] > 0


def test_slow_answer_within_the_read_timeout_succeeds(tmp_path: Path) -> None:
    async def main() -> Result:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.queue(fake_llm.Reply(delay=0.3, body=fake_llm.ok("late but fine").body))
            task = agent_task(llm, prompt="hi", request_timeout=5)
            result = await execute(task, side.ctx(tmp_path, task))
        await side.gateway.aclose()
        return result

    assert run(main).ok
    assert (tmp_path / "result.md").read_text() == "late but fine"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("not json {", "body is not JSON"),
        ({"choices": []}, "no choices"),
        ({"choices": [{"message": {"content": None}}]}, "content is NoneType, not a string"),
        (["a", "list"], "top level is not an object"),
        ({"error": {"message": "quota exceeded"}}, "no choices (error: quota exceeded)"),
    ],
)
def test_agent_malformed_response_is_an_error(tmp_path: Path, body: Any, problem: str) -> None:
    async def main() -> tuple[Result, LLMSide]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.queue(fake_llm.Reply(body=body))
            task = agent_task(llm, prompt="hi")
            result = await execute(task, side.ctx(tmp_path, task))
        await side.gateway.aclose()
        return result, side

    result, side = run(main)
    assert not result.ok and result.http_status == 200 and result.retryable is True
    assert result.error and result.error.startswith("malformed response: ")
    assert problem in result.error
    assert not (tmp_path / "result.md").exists()
    assert side.ledger()[0]["status"] == "malformed"


def test_agent_missing_usage_is_charged_at_worst_case(tmp_path: Path) -> None:
    reply = fake_llm.ok("fine")
    del reply.body["usage"]

    async def main() -> tuple[Result, LLMSide]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            llm.queue(reply)
            task = agent_task(llm, prompt="hi", max_tokens=9)
            result = await execute(task, side.ctx(tmp_path, task))
        await side.gateway.aclose()
        return result, side

    result, side = run(main)
    assert result.ok and result.detail["usage_missing"] is True
    assert result.detail["output_tokens"] == 9
    [call] = side.ledger()
    assert call["usage_missing"] == 1 and call["output_tokens"] == 9


def test_agent_missing_placeholder_is_an_error(tmp_path: Path) -> None:
    async def main() -> tuple[Result, Result, FakeLLM]:
        side = LLMSide(tmp_path / "db")
        async with FakeLLM() as llm:
            plain = agent_task(llm, {"topic": "x"}, prompt="Write about {subject}.")
            # Every item's prompt is rendered before the first call: nothing is spent.
            items = agent_task(llm, prompt="Tell {item[name]}", items=[{"name": "a"}, {"nom": "b"}])
            return (
                await execute(plain, side.ctx(tmp_path / "p", plain)),
                await execute(items, side.ctx(tmp_path / "i", items)),
                llm,
            )

    plain, items, llm = run(main)
    assert not plain.ok and plain.retryable is False
    assert plain.error == "prompt placeholder {subject} has no value (have: topic)"
    assert not items.ok and items.retryable is False
    assert items.error and "{name}" in items.error and "item 1" in items.error
    assert llm.requests == []


def test_run_budget_stops_before_the_call_that_would_break_it(tmp_path: Path) -> None:
    """Each call reserves its worst case; the one that cannot fit is never made, the
    checkpoint stays at the item it stopped before, and the result says budget."""
    backend = MemoryBackend()

    async def main() -> tuple[Result, FakeLLM, LLMSide]:
        async with FakeLLM() as llm:
            llm.default = lambda req: fake_llm.ok("fine", prompt_tokens=10, completion_tokens=5)
            config = priced(
                llm,
                """
                schedule: {manual: true}
                agent: {provider: fake, prompt: "{item}", items: [a, b, c, d, e, f]}
                budget: {run: {usd: 0.05}}
                """,
            )
            side = LLMSide(tmp_path / "db", config)
            task = config.tasks["t1"]
            result = await execute(task, side.ctx(tmp_path, task, backend))
            await side.gateway.aclose()
        return result, llm, side

    result, llm, side = run(main)
    assert not result.ok and result.budget_exhausted and result.retryable is False
    assert result.error and result.error.startswith("budget run exhausted")
    calls = side.ledger()
    spent = sum(c["cost_usd"] for c in calls)
    assert len(llm.requests) == len(calls) == 3 and spent == pytest.approx(0.045)
    assert all(r.body["max_tokens"] == 10 for r in llm.requests)
    assert backend.checkpoints["run-1"] == {"next_item": 3}
    assert result.detail["item"] == 3 and result.detail["budget_scope"] == "run"
    [refused] = side.events("budget_refused")
    data = refused["data"]
    assert data["spent_usd"] == pytest.approx(spent) and data["limit_usd"] == 0.05
    assert data["spent_usd"] <= 0.05 < data["spent_usd"] + data["need_usd"]
    assert spent <= 0.05


def test_limits_max_run_usd_stops_a_run_without_its_own_run_budget(tmp_path: Path) -> None:
    """``limits.max_run_usd`` is the run cap of a task that sets none, at call time: the
    call that would break it is never sent."""

    async def main() -> tuple[Result, FakeLLM, LLMSide]:
        async with FakeLLM() as llm:
            llm.default = lambda req: fake_llm.ok("fine", prompt_tokens=10, completion_tokens=5)
            config = priced(
                llm,
                """
                schedule: {manual: true}
                agent: {provider: fake, prompt: "{item}", items: [a, b, c, d, e, f]}
                """,
                "limits: {max_run_usd: 0.05}\n",
            )
            side = LLMSide(tmp_path / "db", config)
            task = config.tasks["t1"]
            result = await execute(task, side.ctx(tmp_path, task, MemoryBackend()))
            await side.gateway.aclose()
        return result, llm, side

    result, llm, side = run(main)
    assert not result.ok and result.budget_exhausted and result.retryable is False
    assert result.detail["budget_scope"] == "run"
    assert len(llm.requests) == len(side.ledger()) == 3
    [refused] = side.events("budget_refused")
    assert refused["data"]["limit_usd"] == 0.05


def test_run_token_budget(tmp_path: Path) -> None:
    async def main() -> tuple[Result, FakeLLM]:
        async with FakeLLM() as llm:
            config = priced(
                llm,
                """
                schedule: {manual: true}
                agent: {provider: fake, prompt: "{item}", items: [a, b, c]}
                budget: {run: {tokens: 40}}
                """,
            )
            side = LLMSide(tmp_path / "db", config)
            task = config.tasks["t1"]
            result = await execute(task, side.ctx(tmp_path, task))
            await side.gateway.aclose()
        return result, llm

    result, llm = run(main)
    # 15 tokens a call, reserved as ~9 + 10: the third call cannot fit in 40.
    assert result.budget_exhausted and len(llm.requests) == 2
    assert result.error and "tokens exhausted" in result.error


def test_ctx_llm_in_python_callables_is_metered(tmp_path: Path) -> None:
    async def main() -> tuple[Result, Result, FakeLLM, LLMSide]:
        async with FakeLLM() as llm:
            llm.queue(fake_llm.ok("hi sync", 7, 3), fake_llm.ok("hi async", 8, 2))
            config = priced(
                llm,
                """
                schedule: {manual: true}
                python: {callable: "sample_tasks:asks_llm"}
                budget: {run: {usd: 1}}
                """,
            )
            side = LLMSide(tmp_path / "db", config)
            sync_task = config.tasks["t1"]
            async_task = sync_task.model_copy(
                update={"python": sync_task.python.model_copy(  # type: ignore[union-attr]
                    update={"callable": "sample_tasks:asks_llm_async"})}
            )  # fmt: skip
            sync = await execute(sync_task, side.ctx(tmp_path / "s", sync_task))
            coro = await execute(async_task, side.ctx(tmp_path / "a", async_task))
            await side.gateway.aclose()
        return sync, coro, llm, side

    sync, coro, llm, side = run(main)
    assert sync.ok and coro.ok
    assert json.loads((tmp_path / "s" / "result.json").read_text()) == {
        "content": "hi sync",
        "usage": {"input_tokens": 7, "output_tokens": 3, "cost_usd": 0.01},
    }
    assert llm.requests[0].body["max_tokens"] == 20  # the call's own cap
    assert llm.requests[1].body["max_tokens"] == 10  # the provider's default cap
    calls = side.ledger()
    assert [(c["task_id"], c["provider"], c["cost_usd"]) for c in calls] == [
        ("t1", "fake", pytest.approx(0.01)),
        ("t1", "fake", pytest.approx(0.01)),
    ]


def test_ctx_llm_errors_keep_their_meaning_in_python_tasks(tmp_path: Path) -> None:
    task_yaml = """
        schedule: {manual: true}
        python: {callable: "sample_tasks:asks_llm"}
        budget: {run: {usd: %s}}
        """

    async def main() -> tuple[Result, Result, int]:
        async with FakeLLM() as llm:
            llm.queue(fake_llm.error(401, "bad key"))
            results = []
            # 0.001 USD cannot hold ~12 prompt tokens plus 20 output tokens.
            for n, usd in enumerate(("1", "0.001")):
                config = priced(llm, task_yaml % usd)
                side = LLMSide(tmp_path / "db", config)
                task = config.tasks["t1"]
                results.append(await execute(task, side.ctx(tmp_path / str(n), task)))
                await side.gateway.aclose()
        return results[0], results[1], len(llm.requests)

    first, second, requests = run(main)
    assert first.retryable is False and first.error == "HTTP 401: bad key"
    assert second.budget_exhausted and second.retryable is False
    assert requests == 1
    assert "Traceback" in (tmp_path / "1" / "traceback.txt").read_text()


def test_every_kind_has_an_executor() -> None:
    for kind in ("command", "http", "python", "agent"):
        executor: Callable[..., Awaitable[Result]] = executor_for(kind)
        assert callable(executor)
