"""The agent's tool-calling loop, with durable steps: an ``agent`` task with ``tools``.

The loop is the OpenAI-compatible one: each model call offers the tools (``tools``);
a reply that asks for calls (``tool_calls``) has them run, in order, and their results
go back as ``tool`` messages; a reply without a call is the answer (``result.md``). It
ends there, or at ``max_steps`` model calls (a failure), or when the run's timeout,
a cancel, a stop or a budget ends it. Every model call is ``ctx.llm``'s: reserved
against the budgets before, in the ledger after.

Durability (the point of this module). Before the run goes on, each of these is
recorded in the state DB (``ctx.record_agent_step``, returning once durable) and then
appended to ``transcript.jsonl`` in the workspace:

- ``model``: a reply (content, tool calls, usage), right after it arrived;
- ``tool_started``: a call about to run (tool, arguments), before it runs;
- ``tool_result``: what it gave (or the error the model is told).

A run that starts again (after a crash, a stop, a retry) rebuilds its conversation from
those records and goes on from the last one: a recorded reply is never asked for (nor
paid for) again, and a call with a recorded result is never run again. A call recorded
as started with no result has an unknown outcome (the daemon died while it ran): a tool
declared ``idempotent`` runs again, with the same ``Idempotency-Key`` as the first time
(derived from run, step and call id); any other tool's call is never repeated unasked.
What cannot be avoided: a reply that arrived but was not yet recorded when the daemon
died is asked for again (the ledger shows both calls).

Approvals. That call, and a call of a sensitive tool (``sensitive: true``, or named by
the agent's ``sensitive_tools``), is not run before an operator decides: the run records
the call as ``approval_requested`` and ends its attempt parked (``Result.park``: the run
becomes ``awaiting_approval``). A ``decision`` record (``Store.decide_approval``) settles
it: ``approve`` runs the call, ``skip`` answers the model that an operator skipped it
(with the note), ``deny`` never reaches the loop (the run ends ``denied``). A decision
for call ``*`` (a manual run triggered with ``--approve-sensitive``) approves every
sensitive call of the run in advance, never an unknown outcome.

Arguments are checked against the tool's JSON schema before anything runs; a call with
invalid arguments, or of a tool that does not exist, is answered to the model as a tool
error (recorded as a result), never run.

Where the loop meets the world is one method each: ``_Loop._ask`` (a model call),
``_Loop._execute`` (a tool call), and the context's ``record_agent_step`` (through
``_Loop.record``). ``agentd.executors.replay`` runs this same loop with the first two
answered from a recording (or an unmetered provider) and the records kept in memory.

With ``response_format`` the answer must be JSON matching its schema (``output``): a
valid one is written as ``result.json`` too and is the result's ``output``. An invalid
one is recorded as an ``output_rejected`` step (where and what), and the attempt ends
with a retryable ``invalid_output`` error. The next attempt rebuilds the conversation
with the rejected answer and a user message that says what was wrong, and asks the
model again (a new model call, counted in ``max_steps``); when the retries run out the
run is quarantined.

An agent's MCP servers (``agent.mcp``, ``agentd.executors.mcptools``) are started
before the attempt's first model call and stopped when the loop ends; their allowed
tools join the agent's own, as tools of kind ``mcp``, and are called like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import inspect
import json
import os
import signal
import string
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd import procs, tls
from agentd.config import AgentConfig, TaskConfig, ToolConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv, output
from agentd.executors.python import _in_thread, _ResolveError, resolve
from agentd.models import TOOL_RESULT, CheckpointNotSaved, Park, Result, StopRequested
from agentd.providers import BudgetExhausted, LLMError, Reply, ToolCall

if TYPE_CHECKING:
    from agentd.executors.mcptools import Servers

MODEL = "model"
STARTED = "tool_started"
RESULT = TOOL_RESULT
REQUESTED = "approval_requested"
"""A call the run parked at (tool, arguments, reason): what the operator decides on."""
DECISION = "decision"
"""The operator's decision on a parked call (``Store.decide_approval``), or, with call
id ``*`` recorded when a manual run is triggered with ``--approve-sensitive``, the
approval in advance of every sensitive call of the run."""
EVERY_CALL = "*"
REJECTED = "output_rejected"

OUTPUT_MAX_BYTES = 64 * 1024
"""What one tool call may hand back to the model; more is cut (and said so)."""


@dataclass
class _State:
    """The conversation as the recorded steps leave it."""

    messages: list[dict[str, Any]]
    steps: int = 0
    """Model replies recorded."""
    last: dict[str, Any] | None = None
    """The last recorded reply's payload; None also once that reply, an answer, was
    rejected (``output_rejected``): the model is to be asked again."""
    rejected: int = 0
    """Answers rejected as not matching ``response_format``."""
    started: set[str] = field(default_factory=set)
    results: set[str] = field(default_factory=set)
    requested: set[str] = field(default_factory=set)
    """Calls the run parked at, for an operator's decision."""
    decisions: dict[str, str] = field(default_factory=dict)
    """Call id (or ``EVERY_CALL``) -> the operator's decision: approve or skip."""
    notes: dict[str, str] = field(default_factory=dict)
    tool_calls: int = 0
    usage: dict[str, Any] = field(
        default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    )

    def apply(self, kind: str, call_id: str | None, payload: Any) -> None:
        """One recorded step, in order."""
        if kind == MODEL:
            self.steps += 1
            self.last = payload
            self.messages.append(_assistant(payload))
            usage = payload.get("usage") or {}
            for name in ("input_tokens", "output_tokens"):
                self.usage[name] += int(usage.get(name, 0))
            cost = float(usage.get("cost_usd", 0.0))
            self.usage["cost_usd"] = round(self.usage["cost_usd"] + cost, 9)
        elif kind == STARTED:
            self.started.add(str(call_id))
        elif kind == REQUESTED:
            self.requested.add(str(call_id))
        elif kind == DECISION:
            self.decisions[str(call_id)] = str(payload.get("decision"))
            self.notes[str(call_id)] = str(payload.get("note") or "")
        elif kind == RESULT:
            self.results.add(str(call_id))
            self.tool_calls += 1
            self.messages.append(
                {"role": "tool", "tool_call_id": call_id, "content": payload["content"]}
            )
        elif kind == REJECTED:
            self.rejected += 1
            self.last = None
            self.messages.append({"role": "user", "content": rejection(payload)})


def rejection(payload: dict[str, Any]) -> str:
    """What the model is told of its rejected answer (an ``output_rejected`` payload)."""
    return (
        f"Your answer does not match the required JSON schema at {payload.get('path')}:"
        f" {payload.get('error')}. Answer again with only JSON that matches the schema."
    )


def idempotency_key(run_id: str, step: int, call_id: str) -> str:
    """The same for every execution of one call, different for any other call."""
    digest = hashlib.sha256(f"{run_id}\0{step}\0{call_id}".encode()).hexdigest()
    return f"agentd-{digest[:40]}"


def tool_spec(tool: ToolConfig) -> dict[str, Any]:
    """A tool as the provider's ``tools`` list holds it."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def _assistant(payload: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": payload.get("content") or None}
    calls = payload.get("tool_calls") or []
    if calls:
        message["tool_calls"] = [
            ToolCall(c["id"], c["name"], c["arguments"]).message() for c in calls
        ]
    else:
        message["content"] = payload.get("content") or ""
    return message


def replay(first: list[dict[str, Any]], records: list[dict[str, Any]]) -> _State:
    """The conversation and where the run stands, from its recorded steps. Pure."""
    state = _State(messages=list(first))
    for record in records:
        state.apply(record["kind"], record["call_id"], record["payload"])
    return state


class _Transcript:
    """``transcript.jsonl``: the recorded steps, one JSON object a line. Written anew from
    the state DB when the run (re)starts (write, rename), appended to after each step,
    and fsynced once, when the attempt's loop ends (``sync``). The DB is the truth, each
    step durable there before the run goes on; this is the operator's copy, so it costs
    the event loop no fsync per step (after a crash it is written anew from the DB at
    the run's next start)."""

    def __init__(self, path: Path, records: list[dict[str, Any]]) -> None:
        self.path = path
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(self._line(record))
        tmp.replace(path)
        self._fh: Any = path.open("a", encoding="utf-8")

    @staticmethod
    def _line(record: dict[str, Any]) -> str:
        keep = ("seq", "step", "kind", "call_id", "payload", "recorded_at")
        return json.dumps({k: record.get(k) for k in keep}, default=str) + "\n"

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(self._line(record))
        self._fh.flush()  # a line is whole in the file (not yet on the disk) once here

    def close(self) -> None:
        """fsync, then close; in a thread (the loop's caller awaits it)."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()


class _Loop:
    def __init__(self, task: TaskConfig, ctx: RunContext, env: ExecEnv) -> None:
        cfg = task.agent
        assert cfg is not None and (cfg.tools or cfg.mcp)
        self.cfg: AgentConfig = cfg
        self.ctx = ctx
        self.env = env
        self.tools = {t.name: t for t in cfg.tools or []}
        self.spec = [tool_spec(t) for t in cfg.tools or []]
        self.response_format = cfg.response_format.wire() if cfg.response_format else None
        self.transcript: _Transcript | None = None
        self.mcp: Servers | None = None

    def add_mcp(self, servers: Servers) -> None:
        """The started MCP servers' allowed tools, offered after the agent's own."""
        self.mcp = servers
        for tool in servers.tools:
            self.tools[tool.name] = tool
            self.spec.append(tool_spec(tool))

    async def record(self, step: int, kind: str, call_id: str | None, payload: Any) -> None:
        """Durable in the state DB first, then in the transcript (as the DB keeps it:
        scrubbed of secrets)."""
        kept = await self.ctx.record_agent_step(step, kind, call_id, payload)
        self.ctx.log.info(
            "agent step recorded run=%s step=%d kind=%s call=%s",
            self.ctx.run_id,
            step,
            kind,
            call_id or "-",
        )
        if self.transcript is not None:
            try:
                self.transcript.append(kept)
            except OSError as exc:  # the DB has it: the run goes on
                self.ctx.log.warning("transcript.jsonl not appended: %s", exc.strerror)

    async def run(self, prompt: str) -> Result:
        try:
            return await self._run(prompt)
        finally:
            if self.transcript is not None:
                try:  # off the loop: other runs go on meanwhile
                    await asyncio.shield(asyncio.to_thread(self.transcript.close))
                except OSError as exc:
                    self.ctx.log.warning("transcript.jsonl not synced: %s", exc.strerror)

    async def _run(self, prompt: str) -> Result:
        cfg, ctx = self.cfg, self.ctx
        first = [{"role": "system", "content": cfg.system}] if cfg.system else []
        first.append({"role": "user", "content": prompt})
        records = ctx.agent_steps()
        try:
            self.transcript = _Transcript(ctx.workspace / "transcript.jsonl", records)
        except OSError as exc:
            ctx.log.warning("transcript.jsonl not written: %s", exc.strerror)
        state = replay(first, records)
        resumed_from = state.steps
        if resumed_from:
            ctx.log.info(
                "agent run resumes run=%s after step %d (%d tool results recorded)",
                ctx.run_id,
                state.steps,
                len(state.results),
            )
        while True:
            last = state.last
            if last is not None:
                calls = last.get("tool_calls") or []
                if not calls:
                    return await self._answer(last, state, resumed_from)
                for call in calls:
                    if call["id"] in state.results:
                        continue
                    refused = await self._call(call, state)
                    if refused is not None:
                        return refused
            if state.steps >= cfg.max_steps:
                why = (
                    "its last answer did not match response_format"
                    if state.last is None and state.rejected
                    else "without answering without a tool call"
                )
                return Result(
                    ok=False,
                    retryable=False,
                    error=f"the agent made {state.steps} model calls (max_steps) {why}",
                    detail=self._detail(state, resumed_from),
                )
            if ctx.stop_requested:
                raise StopRequested("stop requested between agent steps")
            step = state.steps + 1
            try:
                reply = await self._ask(state.messages)
            except (LLMError, BudgetExhausted) as exc:
                return exc.result({"step": step, **self._detail(state, resumed_from)})
            payload = {
                "content": reply.content,
                "tool_calls": [
                    {"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls
                ],
                "usage": reply.usage(),
                "model": reply.model,
            }
            await self.record(step, MODEL, None, payload)
            state.apply(MODEL, None, payload)
            ctx.progress(step, cfg.max_steps, f"step {step}: {len(reply.tool_calls)} tool call(s)")

    async def _ask(self, messages: list[dict[str, Any]]) -> Reply:
        """The next model call, on the conversation so far: ``ctx.llm``'s, metered (a
        replay answers it otherwise: ``agentd.executors.replay``)."""
        cfg = self.cfg
        return await self.ctx.llm.achat(
            messages=list(messages),
            tools=self.spec,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            read_timeout=cfg.request_timeout,
            response_format=self.response_format,
        )

    async def _answer(self, last: dict[str, Any], state: _State, resumed_from: int) -> Result:
        """The run's end on an answer: ``result.md``, and with ``response_format``
        ``result.json``; or, for an answer that does not match it, the rejection recorded
        (before the attempt ends, so the next one asks again) and an ``invalid_output``
        error."""
        text = str(last.get("content") or "")
        detail = self._detail(state, resumed_from)
        fmt = self.cfg.response_format
        value: Any = None
        if fmt is not None:
            value, where, what = output.problem(fmt, text)
            if where is not None:
                step, ctx = state.steps, self.ctx
                # Not what is wrong: the message may quote the answer, and a log line is
                # not scrubbed of secrets (the recorded step and the error are).
                ctx.log.warning(
                    "agent answer rejected run=%s step=%d format=%s path=%s",
                    ctx.run_id,
                    step,
                    fmt.name,
                    where,
                )
                rejected = {"format": fmt.name, "path": where, "error": what}
                await self.record(step, REJECTED, None, rejected)
                state.apply(REJECTED, None, rejected)
                error = output.invalid(fmt, where, str(what))
                return error.result({"step": step, "path": where, **detail})
        path = self.ctx.workspace / "result.md"
        tmp = path.with_name("result.md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        if fmt is not None:
            output.write(self.ctx.workspace, value)
            detail["output"] = value
        return Result(ok=True, detail=detail)

    @staticmethod
    def _detail(state: _State, resumed_from: int) -> dict[str, Any]:
        detail = {
            **state.usage,
            "steps": state.steps,
            "tool_calls": state.tool_calls,
            "resumed_from_step": resumed_from,
        }
        if state.rejected:
            detail["rejected_answers"] = state.rejected
        return detail

    async def _call(self, call: dict[str, Any], state: _State) -> Result | None:
        """Run one call (or refuse to) and record its result; a Result ends the run (here:
        parked for an operator's decision)."""
        ctx = self.ctx
        call_id, name, step = str(call["id"]), str(call["name"]), state.steps
        tool = self.tools.get(name)
        text = str(call.get("arguments") or "")
        digest = hashlib.sha256(text.encode()).hexdigest()
        arguments, problem = _arguments(tool, name, text)
        outcome = "refused"
        if problem is None and tool is not None and arguments is not None:
            wait = self._approval_needed(tool, call_id, state)
            if wait is not None:
                return await self._park(wait, call_id, name, step, arguments, digest, state)
            if state.decisions.get(call_id) == "skip":
                note = state.notes.get(call_id)
                ok, duration, outcome = False, 0.0, "skipped"
                content = "error: an operator skipped this call" + (f": {note}" if note else "")
            else:
                if call_id in state.started:
                    why = "idempotent" if tool.idempotent else "approved by an operator"
                    ctx.log.info(
                        "agent tool call runs again (%s) run=%s step=%d call=%s tool=%s",
                        why,
                        ctx.run_id,
                        step,
                        call_id,
                        name,
                    )
                else:
                    started = {"tool": name, "arguments": arguments}
                    await self.record(step, STARTED, call_id, started)
                    state.apply(STARTED, call_id, started)
                key = idempotency_key(ctx.run_id, step, call_id)
                began = time.monotonic()
                ok, content = await self._execute(tool, arguments, key)
                duration = round(time.monotonic() - began, 3)
                outcome = "ok" if ok else "error"
        else:
            ok, content, duration = False, f"error: {problem}", 0.0
        payload = {
            "tool": name,
            "ok": ok,
            "content": content,
            "duration_s": duration,
            "outcome": outcome,
            "arguments_sha256": digest,
        }
        await self.record(step, RESULT, call_id, payload)
        state.apply(RESULT, call_id, payload)
        return None

    def sensitive(self, tool: ToolConfig) -> bool:
        """Marked ``sensitive``, or named by the agent's ``sensitive_tools`` (which hold
        ``limits.sensitive_tools`` too)."""
        return tool.sensitive or any(
            fnmatch.fnmatchcase(tool.name, pattern) for pattern in self.cfg.sensitive_tools
        )

    def _approval_needed(self, tool: ToolConfig, call_id: str, state: _State) -> str | None:
        """Why this call may not run before an operator decides, or None. A decision on
        the call (approve, skip) settles it; an unknown outcome of a non-idempotent call
        needs one; a sensitive call not yet started needs one, unless the run was
        approved in advance (``EVERY_CALL``)."""
        if state.decisions.get(call_id) in ("approve", "skip"):
            return None
        if call_id in state.started:
            return None if tool.idempotent else "unknown_outcome"
        if self.sensitive(tool) and state.decisions.get(EVERY_CALL) != "approve":
            return "sensitive"
        return None

    async def _park(
        self,
        reason: str,
        call_id: str,
        name: str,
        step: int,
        arguments: dict[str, Any],
        digest: str,
        state: _State,
    ) -> Result:
        """Record what the operator is asked (once per call), and end the attempt parked."""
        ctx = self.ctx
        if call_id not in state.requested:
            asked = {"tool": name, "arguments": arguments, "reason": reason, "step": step}
            await self.record(step, REQUESTED, call_id, asked)
            state.apply(REQUESTED, call_id, asked)
        ctx.log.warning(
            "agent run parked for an approval run=%s step=%d call=%s tool=%s reason=%s",
            ctx.run_id,
            step,
            call_id,
            name,
            reason,
        )
        shown = json.dumps(arguments, sort_keys=True, default=str)
        if len(shown) > 300:
            shown = shown[:300] + "..."
        what = (
            "the tool is sensitive"
            if reason == "sensitive"
            else "it was running when the run stopped, its outcome is unknown and the tool"
            " is not idempotent"
        )
        return Result(
            ok=False,
            error=f"awaiting approval of tool call {call_id} ({name}, step {step}): {what};"
            f" arguments {shown}",
            park=Park(reason, call_id, name, step, digest),
            detail={"awaiting": call_id, "tool": name, "step": step, "reason": reason},
        )

    async def _execute(
        self, tool: ToolConfig, arguments: dict[str, Any], key: str
    ) -> tuple[bool, str]:
        """The one place a tool runs (by its kind); (ok, what the model is told). A
        replay serves the recorded result instead (``agentd.executors.replay``)."""
        try:
            async with asyncio.timeout(tool.timeout):
                if tool.command is not None:
                    return await _command(tool, arguments, self.ctx, self.env, key)
                if tool.http is not None:
                    return await _http(tool, arguments, key)
                if tool.mcp is not None:
                    assert self.mcp is not None
                    return await self.mcp.call(tool, arguments, key)
                return await _python(tool, arguments, self.ctx, self.env)
        except TimeoutError:
            return False, f"error: the tool timed out after {tool.timeout:g}s"
        except _ToolError as exc:
            return False, f"error: {exc}"


class _ToolError(Exception):
    """A failed call, told to the model as the tool's answer."""


def _arguments(
    tool: ToolConfig | None, name: str, text: str
) -> tuple[dict[str, Any] | None, str | None]:
    """The call's arguments, or why it cannot run (for the model)."""
    if tool is None:
        return None, f"there is no tool named {name!r}"
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        return None, f"the arguments are not JSON: {exc}"
    if not isinstance(value, dict):
        return None, "the arguments must be a JSON object"
    import jsonschema

    errors = sorted(
        jsonschema.Draft202012Validator(tool.parameters).iter_errors(value),
        key=lambda e: list(e.path),
    )
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "arguments"
        return None, f"invalid arguments ({where}): {errors[0].message}"
    return value, None


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def render(template: str, arguments: dict[str, Any], quote: bool = False) -> str:
    """A template with each ``{name}`` replaced by that argument (JSON for a non-string;
    percent-encoded, ``/`` too, with ``quote``). Only names (``config.template_fields``)."""
    out: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        if name not in arguments:
            raise _ToolError(f"argument {name!r} is required by this tool")
        text = _value(arguments[name])
        out.append(urllib.parse.quote(text, safe="") if quote else text)
    return "".join(out)


def _cut(data: bytes) -> str:
    text = data[:OUTPUT_MAX_BYTES].decode("utf-8", errors="replace")
    return text + (f"\n[cut at {OUTPUT_MAX_BYTES} bytes]" if len(data) > OUTPUT_MAX_BYTES else "")


async def _read_head(stream: asyncio.StreamReader, cap: int = OUTPUT_MAX_BYTES) -> bytes:
    """The first ``cap + 1`` bytes of ``stream`` (so ``_cut`` can tell it was cut); the
    rest is read and dropped, so that a chatty tool never blocks on a full pipe."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) <= cap:
            kept += chunk[: cap + 1 - len(kept)]
    return bytes(kept)


async def _read_tail(stream: asyncio.StreamReader, keep: int = 4096) -> bytes:
    """The last ``keep`` bytes of ``stream`` (stderr: the end says what went wrong)."""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-keep:]
    return tail


async def _command(
    tool: ToolConfig, arguments: dict[str, Any], ctx: RunContext, env: ExecEnv, key: str
) -> tuple[bool, str]:
    cfg = tool.command
    assert cfg is not None
    argv = [render(item, arguments) for item in cfg.argv]
    base = env.inherited_env if env.inherited_env is not None else os.environb
    child = {k: v for k, v in base.items() if k not in env.withheld_env}
    child.update((os.fsencode(k), os.fsencode(render(v, arguments))) for k, v in cfg.env.items())
    child[b"AGENTD_IDEMPOTENCY_KEY"] = key.encode()
    child[b"AGENTD_RUN_ID"] = os.fsencode(ctx.run_id)
    child[b"AGENTD_TASK"] = os.fsencode(ctx.task_id)
    child[b"AGENTD_WORKSPACE"] = os.fsencode(ctx.workspace)
    try:
        proc = await asyncio.create_subprocess_exec(
            *env.spawn_prefix,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cfg.cwd or ctx.workspace,
            env=child,
            start_new_session=True,
        )
    except OSError as exc:
        raise _ToolError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
    procs.own(proc.pid)  # asyncio's child watcher waits for it, not the daemon's reaper
    if env.on_spawn is not None:
        # Recorded with the attempt like a command task's group (one call runs at a
        # time): after a kill -9 of the daemon, recovery ends a call still running
        # before the run is resumed, so it never runs beside its own re-execution.
        group = procs.record_group(proc.pid)
        if group is not None:
            env.on_spawn(ctx, group)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err, _ = await asyncio.gather(
            _read_head(proc.stdout), _read_tail(proc.stderr), proc.wait()
        )
    except BaseException:  # a timeout, a cancel: the whole group goes
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    finally:
        if proc.returncode is not None:
            procs.disown(proc.pid)
    if proc.returncode != 0:
        tail = err.decode("utf-8", errors="replace").strip()
        return False, f"error: exit code {proc.returncode}" + (f": {tail}" if tail else "")
    return True, _cut(out)


async def _http(tool: ToolConfig, arguments: dict[str, Any], key: str) -> tuple[bool, str]:
    import httpx

    cfg = tool.http
    assert cfg is not None
    url = render(cfg.url, arguments, quote=True)
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or host not in cfg.allow_hosts:
        raise _ToolError(f"host {host!r} is not in this tool's allow_hosts")
    headers = {**cfg.headers, "Idempotency-Key": key}
    body = arguments if cfg.method in ("POST", "PUT", "PATCH") else None
    await tls.prepare()
    async with httpx.AsyncClient(
        timeout=tool.timeout, verify=tls.context(), follow_redirects=False
    ) as client:
        try:
            async with client.stream(cfg.method, url, headers=headers, json=body) as resp:
                kept = bytearray()
                async for chunk in resp.aiter_bytes():
                    kept += chunk[: OUTPUT_MAX_BYTES + 1 - len(kept)]
                    if len(kept) > OUTPUT_MAX_BYTES:
                        break
        except httpx.HTTPError as exc:
            raise _ToolError(f"{type(exc).__name__}: {exc}") from None
    text = _cut(bytes(kept))
    if not resp.is_success:
        return False, f"error: HTTP {resp.status_code}: {text}"
    return True, text


async def _python(
    tool: ToolConfig, arguments: dict[str, Any], ctx: RunContext, env: ExecEnv
) -> tuple[bool, str]:
    cfg = tool.python
    assert cfg is not None
    try:
        func = resolve(cfg.callable)
    except _ResolveError as exc:
        raise _ToolError(str(exc)) from None
    try:
        if inspect.iscoroutinefunction(func):
            value = await func(ctx, arguments)
        else:
            value = await _in_thread(lambda c: func(c, arguments), ctx, env.threads)
            if inspect.isawaitable(value):
                value = await value
    except asyncio.CancelledError:
        ctx.request_cancel()
        raise
    except (StopRequested, CheckpointNotSaved):
        raise
    except (BudgetExhausted, LLMError) as exc:
        # From the tool's own ctx.llm: the call's result, recorded like any other (a
        # refused budget then refuses the loop's next model call too, and the run ends
        # budget_exhausted with every step recorded).
        raise _ToolError(str(exc)) from None
    except Exception as exc:
        raise _ToolError(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(value, str):
        try:
            value = json.dumps(value, default=str)
        except (TypeError, ValueError):
            value = repr(value)
    return True, _cut(value.encode("utf-8"))


async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv, prompt: str) -> Result:
    """Run (or resume) ``task``'s loop; ``prompt`` is its rendered user message. With
    ``agent.mcp``, the servers run while the loop does."""
    loop = _Loop(task, ctx, env)
    if not loop.cfg.mcp:
        return await loop.run(prompt)
    from agentd.executors import mcptools

    try:
        async with mcptools.Servers(loop.cfg.mcp, ctx, env) as servers:
            loop.add_mcp(servers)
            return await loop.run(prompt)
    except mcptools.StartFailed as exc:
        return exc.result
