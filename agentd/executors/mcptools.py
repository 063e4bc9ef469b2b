"""An agent's MCP servers (``agent.mcp``): stdio servers whose allowed tools the tool
loop (``agentd.executors.toolloop``) offers to the model like any of its own.

The official SDK (``mcp``) does the protocol: its stdio client spawns the server (in a
session of its own, so in a process group of its own), frames the JSON-RPC messages,
hand-shakes, and its ``ClientSession`` lists and calls the tools. It is imported the
first time a run needs it, in a thread (about a second of imports): nothing else of
agentd pays for it.

Invariants:

- A server lives only while its attempt's loop does. It is started before the loop's
  first model call of the attempt and stopped when the loop ends, however it ends (an
  answer, a failure, a stop, a cancel or the run's timeout). Stopping is the SDK's
  shutdown (stdin closed, then SIGTERM and SIGKILL to the group if the server lingers),
  then SIGKILL to what is left of the group (a child the server started); on a cancel
  or timeout the group is killed first. The SDK's shutdown runs in the server's own
  task, so a second cancel of the run cannot cut it short.
- Only the tools in ``allow`` exist for the model: they alone are offered, and a call
  of any other name is answered "there is no tool named ..." by the loop, never sent to
  the server. An allowed tool the server does not list fails the run (non-retryable).
- A server's environment is what a command tool's process gets (the daemon's, without
  the variables that hold its secrets, ``ExecEnv.withheld_env``), plus the server's
  ``env`` and ``AGENTD_RUN_ID``, ``AGENTD_TASK``, ``AGENTD_ATTEMPT``,
  ``AGENTD_WORKSPACE``; its working directory is the run's workspace. (The SDK adds
  HOME, LOGNAME, PATH, SHELL, TERM and USER from the daemon's environment where that
  leaves them out.)
- A server's stderr is read as it comes (a chatty server never blocks on it) and only
  its last bytes are kept: they say why a server did not start.
- Nothing is recorded here: a call is one of the loop's steps like any other (its
  ``Idempotency-Key`` goes to the server as ``_meta["agentd/idempotency-key"]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError

from agentd import procs
from agentd.config import McpServerConfig, ToolConfig, ToolMcpConfig, mcp_tool_name
from agentd.context import RunContext
from agentd.executors import ExecEnv
from agentd.executors.toolloop import _cut, _ToolError
from agentd.models import Result

if TYPE_CHECKING:
    import mcp_types
    from mcp.client.session import ClientSession

STDERR_KEEP = 2048
"""The bytes of a server's stderr kept, and told when it does not start."""
_STOP_WAIT_S = 10.0
"""How long a stop waits for the SDK's shutdown (bounded by the SDK at about 6.5 s)."""
_EOF_WAIT_S = 1.0
"""How long a failed start waits for the rest of the server's stderr."""
_MAX_PAGES = 100
IDEMPOTENCY_META = "agentd/idempotency-key"


class StartFailed(Exception):
    """A server did not start, or does not offer what the config allows: the run fails
    before any model call of this attempt."""

    def __init__(self, error: str, retryable: bool) -> None:
        super().__init__(error)
        self.result = Result(ok=False, retryable=retryable, error=error)


async def _import_sdk() -> None:
    """The SDK's client, imported in a thread the first time (it takes about a second,
    which would stall every run on the loop)."""
    if "mcp.client.stdio" not in sys.modules:
        await asyncio.to_thread(importlib.import_module, "mcp.client.stdio")
        await asyncio.to_thread(importlib.import_module, "mcp.client.session")


def _killpg(pgid: int | None) -> None:
    if pgid is not None:
        with contextlib.suppress(OSError):  # ESRCH: the group is gone
            os.killpg(pgid, signal.SIGKILL)


class _Tail(asyncio.Protocol):
    """The read end of a server's stderr pipe: read to the end, the last bytes kept."""

    def __init__(self, keep: int = STDERR_KEEP) -> None:
        self.keep = keep
        self.data = b""
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data = (self.data + data)[-self.keep :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace").strip()


def environment(cfg: McpServerConfig, ctx: RunContext, env: ExecEnv) -> dict[str, str]:
    """What the server's process gets (see the module's docstring)."""
    base = env.inherited_env if env.inherited_env is not None else os.environb
    dec = os.fsdecode
    child = {dec(k): dec(v) for k, v in base.items() if k not in env.withheld_env}
    child.update(cfg.env)
    child["AGENTD_RUN_ID"] = ctx.run_id
    child["AGENTD_TASK"] = ctx.task_id
    child["AGENTD_ATTEMPT"] = str(ctx.attempt)
    child["AGENTD_WORKSPACE"] = os.fspath(ctx.workspace)
    return child


def tools_of(cfg: McpServerConfig, listed: list[mcp_types.Tool]) -> list[ToolConfig]:
    """The allowed tools as the loop's tools, in ``allow``'s order, with the input schema
    the server lists; StartFailed (non-retryable) for an allowed name it does not list,
    or a schema that cannot be a tool's ``parameters``."""
    by_name = {t.name: t for t in listed}
    missing = [name for name in cfg.allow if name not in by_name]
    if missing:
        have = ", ".join(sorted(by_name)[:30]) or "none"
        raise StartFailed(
            f"the MCP server {cfg.name!r} does not list the allowed tool(s)"
            f" {', '.join(missing)} (it lists: {have})",
            retryable=False,
        )
    tools: list[ToolConfig] = []
    for name in cfg.allow:
        listed_tool = by_name[name]
        try:
            tool = ToolConfig(
                name=mcp_tool_name(cfg.name, name),
                description=listed_tool.description or listed_tool.title or "",
                parameters=listed_tool.input_schema,
                timeout=cfg.timeout,
                idempotent=name in cfg.idempotent,
                sensitive=name in cfg.sensitive,
                mcp=ToolMcpConfig(server=cfg.name, tool=name),
            )
        except ValidationError as exc:
            problem = str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")
            raise StartFailed(
                f"the MCP server {cfg.name!r} lists tool {name!r} with an input schema"
                f" agentd cannot offer: {problem}",
                retryable=False,
            ) from None
        tools.append(tool)
    return tools


def result_text(result: mcp_types.CallToolResult) -> str:
    """What the model reads of a call's result: its text content, a line per block (a
    block of another kind is named, not shown); the structured content as JSON when
    there is no text."""
    parts: list[str] = []
    for block in result.content:
        text = getattr(block, "text", None)
        resource = getattr(block, "resource", None)
        if isinstance(text, str):
            parts.append(text)
        elif isinstance(getattr(resource, "text", None), str):
            parts.append(resource.text)  # type: ignore[union-attr]
        else:
            parts.append(f"[{getattr(block, 'type', 'unknown')} content not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, default=str))
    return "\n".join(parts)


def _reason(exc: BaseException) -> str:
    """The innermost cause of an SDK failure, in a few words (its task groups wrap it)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if getattr(exc, "code", None) == -32000:  # mcp_types.CONNECTION_CLOSED
        return "it exited (or closed its stdout) before answering"
    text = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Server:
    """One server: its SDK client and session live in a task of their own (``_serve``),
    entered and left there; calls are made from the run's task through the session."""

    def __init__(self, cfg: McpServerConfig, ctx: RunContext, env: ExecEnv) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.env = env
        self.argv = [*env.spawn_prefix, *cfg.command]
        self.pgid: int | None = None
        """The server's pid, which is its group's id; None until known (or without /proc)."""
        self.session: ClientSession | None = None
        self.tools: list[ToolConfig] = []
        self._ready: asyncio.Future[list[mcp_types.Tool]] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tail: _Tail | None = None
        self._tail_transport: asyncio.ReadTransport | None = None
        self._writer: Any = None

    async def _serve(self, ready: asyncio.Future[list[mcp_types.Tool]], target: str) -> None:
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(
            command=self.argv[0],
            args=self.argv[1:],
            env=environment(self.cfg, self.ctx, self.env),
            cwd=self.ctx.workspace,
        )
        try:
            async with stdio_client(params, errlog=self._writer) as (read, write):
                self._close_writer()
                self.pgid = procs.child_holding(2, target)
                if self.pgid is not None:  # asyncio's child watcher waits for it
                    procs.own(self.pgid)
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    listed: list[mcp_types.Tool] = []
                    cursor: str | None = None
                    for _ in range(_MAX_PAGES):
                        page = await session.list_tools(params=_page(cursor))
                        listed += page.tools
                        cursor = page.next_cursor
                        if not cursor:
                            break
                    self.session = session
                    ready.set_result(listed)
                    await self._stop.wait()
        finally:
            self.session = None
            self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def start(self) -> None:
        """Spawn, hand-shake, list; ``self.tools`` are then the allowed ones. StartFailed
        if not; whatever happens, ``stop`` ends what was started."""
        cfg, loop = self.cfg, asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        self._writer = open(write_fd, "w", encoding="utf-8", closefd=True)  # noqa: SIM115
        try:
            target = os.readlink(f"/proc/self/fd/{write_fd}")
        except OSError:
            target = "-"
        tail = _Tail()
        self._tail = tail
        reader = open(read_fd, "rb", buffering=0, closefd=True)  # noqa: SIM115
        self._tail_transport, _ = await loop.connect_read_pipe(lambda: tail, reader)
        ready: asyncio.Future[list[mcp_types.Tool]] = loop.create_future()
        self._ready = ready
        self._task = loop.create_task(self._serve(ready, target), name=f"mcp-{cfg.name}")
        try:
            async with asyncio.timeout(cfg.start_timeout):
                pending: set[asyncio.Future[Any]] = {ready, self._task}
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise StartFailed(
                self._failure(f"no answer to the hand-shake within {cfg.start_timeout:g}s"),
                retryable=True,
            ) from None
        if not ready.done():
            exc = self._task.exception() if not self._task.cancelled() else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EOF_WAIT_S):
                    await asyncio.shield(tail.closed)
            # A program that cannot be run will not run at the next attempt either.
            retryable = not isinstance(exc, OSError)
            raise StartFailed(self._failure(_reason(exc) if exc else "cancelled"), retryable)
        self.tools = tools_of(cfg, ready.result())
        self.ctx.log.info(
            "mcp server started run=%s server=%s pid=%s tools=%s",
            self.ctx.run_id,
            cfg.name,
            self.pgid if self.pgid is not None else "?",
            ",".join(t.name for t in self.tools),
        )

    def _failure(self, reason: str) -> str:
        tail = self._tail.text() if self._tail is not None else ""
        where = f"the MCP server {self.cfg.name!r} ({self.argv[0]}) did not start: {reason}"
        self.ctx.log.warning(
            "mcp server did not start run=%s server=%s: %s", self.ctx.run_id, self.cfg.name, reason
        )
        return where + (f"; its stderr ends: {tail}" if tail else "")

    async def call(self, tool: str, arguments: dict[str, Any], key: str) -> tuple[bool, str]:
        """One ``tools/call``: (ok, what the model reads); _ToolError when there is no
        answer (the server is gone, or answered with a protocol error)."""
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED

        session = self.session
        if session is None:
            raise _ToolError(self._gone())
        meta = cast("mcp_types.RequestParamsMeta", {IDEMPOTENCY_META: key})
        try:
            result = await session.call_tool(tool, arguments, meta=meta)
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED or (self._task is not None and self._task.done()):
                await self._lost()
                raise _ToolError(self._gone()) from None
            raise _ToolError(f"the MCP server answered error {exc.code}: {exc.message}") from None
        except Exception as exc:
            if self._task is not None and self._task.done():
                raise _ToolError(self._gone()) from None
            raise _ToolError(f"{type(exc).__name__}: {exc}") from None
        text = _cut(result_text(result).encode("utf-8"))
        if result.is_error:
            return False, f"error: {text}"
        return True, text

    async def _lost(self) -> None:
        """The server went away mid-run: every later call is answered so at once."""
        if self.session is None:
            return
        self.session = None
        if self._tail is not None:  # the rest of its stderr
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EOF_WAIT_S):
                    await asyncio.shield(self._tail.closed)
        self.ctx.log.warning(
            "mcp server exited mid-run run=%s server=%s", self.ctx.run_id, self.cfg.name
        )

    def _gone(self) -> str:
        tail = self._tail.text() if self._tail is not None else ""
        return f"the MCP server {self.cfg.name!r} has exited" + (
            f"; its stderr ends: {tail[-500:]}" if tail else ""
        )

    async def stop(self, kill: bool) -> None:
        """End the server (see the module's docstring); also when cancelled again."""
        started = self._ready is not None and self._ready.done()
        if kill or not started:  # a server that never served has nothing to wind down
            _killpg(self.pgid)
        task = self._task
        try:
            if task is not None:
                if started:
                    self._stop.set()  # the SDK's orderly shutdown
                else:
                    task.cancel()  # still starting: the SDK's shutdown all the same
                try:
                    async with asyncio.timeout(_STOP_WAIT_S):
                        await asyncio.wait({task})
                except TimeoutError:
                    self.ctx.log.warning(
                        "mcp server did not stop within %gs run=%s server=%s",
                        _STOP_WAIT_S,
                        self.ctx.run_id,
                        self.cfg.name,
                    )
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self.ctx.log.info(
                        "mcp server ended with an error run=%s server=%s: %s",
                        self.ctx.run_id,
                        self.cfg.name,
                        _reason(cast(BaseException, task.exception())),
                    )
        finally:
            _killpg(self.pgid)  # what the server left in its group
            if self.pgid is not None and task is not None and task.done():
                procs.disown(self.pgid)  # reaped: the SDK's shutdown waited for its exit
            self._close_writer()
            if self._tail_transport is not None:
                self._tail_transport.close()
            if task is not None:
                self.ctx.log.info(
                    "mcp server stopped run=%s server=%s pid=%s",
                    self.ctx.run_id,
                    self.cfg.name,
                    self.pgid if self.pgid is not None else "?",
                )


def _page(cursor: str | None) -> mcp_types.PaginatedRequestParams | None:
    if cursor is None:
        return None
    import mcp_types

    return mcp_types.PaginatedRequestParams(cursor=cursor)


class Servers:
    """The attempt's MCP servers, as an async context: all started (concurrently) on
    entry, or StartFailed with every one stopped again; all stopped on exit (killed
    first when the exit is a cancel)."""

    def __init__(self, configs: list[McpServerConfig], ctx: RunContext, env: ExecEnv) -> None:
        self._servers = {cfg.name: _Server(cfg, ctx, env) for cfg in configs}
        self.tools: list[ToolConfig] = []

    async def __aenter__(self) -> Servers:
        await _import_sdk()
        servers = list(self._servers.values())
        try:
            outcomes = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
        except BaseException:
            await self._stop(kill=True)
            raise
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await self._stop(kill=False)
            raise failed[0]
        self.tools = [t for s in servers for t in s.tools]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        kill = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        await self._stop(kill)

    async def _stop(self, kill: bool) -> None:
        servers = list(self._servers.values())
        if kill:
            for server in servers:
                _killpg(server.pgid)
        try:
            await asyncio.gather(*(s.stop(kill) for s in servers))
        except BaseException:  # cancelled again: nothing of theirs may survive
            for server in servers:
                _killpg(server.pgid)
            raise

    async def call(self, tool: ToolConfig, arguments: dict[str, Any], key: str) -> tuple[bool, str]:
        assert tool.mcp is not None
        return await self._servers[tool.mcp.server].call(tool.mcp.tool, arguments, key)
