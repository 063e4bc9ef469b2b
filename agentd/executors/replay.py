"""``agentd runs replay``: a recorded agent run's tool-calling loop run again offline,
and how the new transcript differs from the old one.

The loop is ``toolloop._Loop``'s own; ``_ReplayLoop`` overrides the two places where a
run meets the world:

- ``_execute`` (a tool call): nothing is executed. The call is answered with the
  recorded result of the first recorded call of the same tool with the same arguments
  not answered yet (a call made twice gets its two results in order). A call the
  recording does not have, or one it has as started with no result (its outcome was
  unknown), stops the replay (``ReplayStopped``), naming the call.
- ``_ask`` (a model call): to the task's provider over HTTP (``providers.DirectLLM``:
  the provider's key from its variable or file, as the daemon reads it; in no ledger,
  against no budget), or with a cassette the next recorded reply, in order (none left:
  the replay stops). A provider's error stops the replay too.

Nothing is written to the state DB. The loop records through the run context as
always, but the replay's backend (``_Memory``) keeps the records in memory and the loop
writes them, scrubbed of the config's secrets, to ``transcript.jsonl`` in the replay's
own directory (with ``result.md`` when the model answers). A replay is not a run: no
run id of its own, no attempt, no event, no ledger entry.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.clock import SystemClock, to_iso
from agentd.config import Config, TaskConfig, ToolConfig, secret_refs
from agentd.context import RunContext
from agentd.executors import ExecEnv
from agentd.executors.agent import _Failed, render
from agentd.executors.toolloop import MODEL, REQUESTED, RESULT, STARTED, _Loop, _State
from agentd.models import Result
from agentd.providers import DirectLLM, LLMError, Reply, ToolCall
from agentd.redact import Redactor, read_secrets

log = logging.getLogger("agentd.replay")
_loop_log = logging.getLogger("agentd.replay.loop")
"""The loop's own lines ("agent step recorded ...") would say a replay records what it
does not: only its warnings show."""
_loop_log.setLevel(logging.WARNING)


class ReplayStopped(Exception):
    """The replay cannot go on: a tool call the recording does not have, no recorded
    reply left (cassette), a provider's error. The message says which."""


class ReplayRefused(Exception):
    """The replay cannot begin (a usage error): the run, its task or a flag does not
    allow it. The message says why."""


@dataclass
class _RecordedCall:
    call_id: str
    step: int
    tool: str
    arguments: Any
    result: dict[str, Any] | None = None
    used: bool = False


class Recording:
    """A run's recorded steps, as a replay serves them: the model replies in order, and
    each executed tool call (a ``tool_started`` record) with its result. A call refused
    without running (invalid arguments, no such tool) has a result and no start: the
    loop answers it again itself, so it is not served."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.replies: list[dict[str, Any]] = []
        self.calls: list[_RecordedCall] = []
        started: dict[str, _RecordedCall] = {}
        for record in records:
            kind, payload = record["kind"], record["payload"] or {}
            call_id = str(record.get("call_id"))
            if kind == MODEL:
                self.replies.append(payload)
            elif kind == STARTED:
                call = _RecordedCall(
                    call_id, int(record["step"]), str(payload.get("tool")), payload.get("arguments")
                )
                self.calls.append(call)
                started[call_id] = call
            elif kind == REQUESTED and call_id not in started:
                # Parked before it ran: an operator's skip answers it with a result and
                # no start, which is served like an executed call's.
                call = _RecordedCall(
                    call_id, int(record["step"]), str(payload.get("tool")), payload.get("arguments")
                )
                self.calls.append(call)
                started[call_id] = call
            elif kind == RESULT and call_id in started and started[call_id].result is None:
                started[call_id].result = payload

    def reply(self, step: int) -> Reply:
        """The recorded reply to model call ``step`` (1-based)."""
        if step > len(self.replies):
            raise ReplayStopped(
                f"step {step}: the recording has {len(self.replies)} model replies, and the"
                " cassette no more"
            )
        payload = self.replies[step - 1]
        usage = payload.get("usage") or {}
        return Reply(
            content=str(payload.get("content") or ""),
            model=str(payload.get("model") or ""),
            input_tokens=int(usage.get("input_tokens", 0)),
            output_tokens=int(usage.get("output_tokens", 0)),
            cost_usd=float(usage.get("cost_usd", 0.0)),
            usage_missing=bool(usage.get("usage_missing", False)),
            tool_calls=tuple(
                ToolCall(str(c["id"]), str(c["name"]), str(c.get("arguments") or ""))
                for c in payload.get("tool_calls") or []
            ),
        )

    def serve(self, tool: str, arguments: dict[str, Any], step: int) -> tuple[bool, str]:
        """The recorded result of this call: the first unanswered recorded call of
        ``tool`` with equal ``arguments``. ``ReplayStopped`` when there is none."""
        for call in self.calls:
            if call.used or call.tool != tool or call.arguments != arguments:
                continue
            call.used = True
            if call.result is None:
                raise ReplayStopped(
                    f"step {step}: the model asked for {describe_call(tool, arguments)}, which"
                    f" the recording has as started (call {call.call_id}, step {call.step})"
                    " with no result: its outcome was unknown, so there is nothing to serve"
                )
            return bool(call.result.get("ok")), str(call.result.get("content", ""))
        raise ReplayStopped(
            f"step {step}: the model asked for {describe_call(tool, arguments)}, which the"
            " recording does not have (no tool is run in a replay)"
        )


def describe_call(tool: str, arguments: Any) -> str:
    """``tool {"canonical":"json"}``: how a call is named in the output and the diff."""
    return f"{tool} {canonical(arguments)}"


def canonical(arguments: Any) -> str:
    """Arguments as compact JSON with sorted keys (the model's text as it is when it is
    not JSON), so that two calls compare equal whatever the spacing."""
    if isinstance(arguments, str):
        text = arguments
        try:
            arguments = json.loads(text) if text.strip() else {}
        except ValueError:
            return text
    return json.dumps(arguments, separators=(",", ":"), sort_keys=True, default=str)


class _Memory:
    """The replay's ``ContextBackend``: no steps to resume from, each record kept in
    memory (scrubbed of secrets, as the state DB keeps them), nothing written anywhere
    but by the loop itself (its ``transcript.jsonl``)."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.records: list[dict[str, Any]] = []
        self.clock = SystemClock()

    def load_checkpoint(self, run_id: str) -> Any | None:
        return None

    def save_checkpoint(self, run_id: str, data: Any) -> None:
        return None

    def progress(self, run_id: str, done: int, total: int | None, message: str) -> None:
        return None

    def heartbeat(self, run_id: str) -> None:
        return None

    def agent_steps(self, run_id: str) -> list[dict[str, Any]]:
        return []

    async def record_agent_step(
        self, run_id: str, step: int, kind: str, call_id: str | None, payload: Any
    ) -> dict[str, Any]:
        record = {
            "seq": len(self.records) + 1,
            "step": step,
            "kind": kind,
            "call_id": call_id,
            "payload": self.redactor.value(payload),
            "recorded_at": to_iso(self.clock.now()),
        }
        self.records.append(record)
        return dict(record)


class _ReplayLoop(_Loop):
    """The tool loop with its model calls and tool calls answered as the module says."""

    def __init__(
        self, task: TaskConfig, ctx: RunContext, recording: Recording, llm: DirectLLM | None
    ) -> None:
        super().__init__(task, ctx, ExecEnv())
        self.recording = recording
        self.llm = llm
        self.asked = 0
        """Model calls made (or served) so far: the step being worked on."""

    async def _ask(self, messages: list[dict[str, Any]]) -> Reply:
        self.asked += 1
        if self.llm is None:
            return self.recording.reply(self.asked)
        cfg = self.cfg
        try:
            return await self.llm.achat(
                messages=list(messages),
                tools=self.spec,
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                read_timeout=cfg.request_timeout,
                response_format=self.response_format,
            )
        except LLMError as exc:
            raise ReplayStopped(f"step {self.asked}: the provider failed: {exc.message}") from None

    async def _execute(
        self, tool: ToolConfig, arguments: dict[str, Any], key: str
    ) -> tuple[bool, str]:
        return self.recording.serve(tool.name, arguments, self.asked)

    def _approval_needed(self, tool: ToolConfig, call_id: str, state: _State) -> str | None:
        """Never: no tool is run in a replay (a sensitive call is answered from the
        recording like any other, or stops the replay)."""
        return None


@dataclass(frozen=True)
class Options:
    """What a replay changes: the model, the prompt template (placeholders filled from
    the task's params, as the config's), the system message; ``cassette``: the model's
    replies served from the recording (no provider is asked)."""

    model: str | None = None
    prompt: str | None = None
    system: str | None = None
    cassette: bool = False


@dataclass
class Report:
    """A replay's outcome: ``stopped`` (why it could not go on) or the loop's
    ``result``; the old and new summaries and their differences; where the new
    transcript is."""

    run_id: str
    task_id: str
    mode: str
    provider: str | None
    model: str | None
    transcript: Path
    old: dict[str, Any]
    new: dict[str, Any]
    result: Result | None = None
    stopped: str | None = None
    diff: dict[str, list[str]] = field(default_factory=dict)

    @property
    def same(self) -> bool:
        return self.stopped is None and self.old == self.new

    def as_json(self) -> dict[str, Any]:
        result = self.transcript.with_name("result.md")
        outcome = None
        if self.result is not None:
            outcome = {"ok": self.result.ok, "error": self.result.error}
        return {
            "run_id": self.run_id,
            "task": self.task_id,
            "mode": self.mode,
            "provider": self.provider,
            "model": self.model,
            "transcript": str(self.transcript),
            "result_md": str(result) if result.exists() else None,
            "stopped": self.stopped,
            "outcome": outcome,
            "same": self.same,
            "old": self.old,
            "new": self.new,
            "diff": self.diff,
        }


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a replay compares of a transcript: the final answer (the last reply's
    content when it asked for no call, else None), the tool calls asked for in order
    (tool and arguments), model steps, tokens and cost (the replies' own usage)."""
    replies = [r["payload"] or {} for r in records if r["kind"] == MODEL]
    last = replies[-1] if replies else None
    answer = None
    if last is not None and not last.get("tool_calls"):
        answer = str(last.get("content") or "")
    calls = [
        {"tool": str(c.get("name")), "arguments": canonical(c.get("arguments") or "")}
        for reply in replies
        for c in reply.get("tool_calls") or []
    ]
    tokens_in = tokens_out = 0
    cost = 0.0
    for reply in replies:
        usage = reply.get("usage") or {}
        tokens_in += int(usage.get("input_tokens", 0))
        tokens_out += int(usage.get("output_tokens", 0))
        cost += float(usage.get("cost_usd", 0.0))
    return {
        "answer": answer,
        "tool_calls": calls,
        "steps": len(replies),
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cost_usd": round(cost, 9),
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    """Unified diffs (old, new) of the final answers and of the tool-call sequences
    (one ``tool arguments`` line a call); empty lists where they are the same."""

    def lines(value: Any) -> list[str]:
        return [] if value is None else str(value).splitlines()

    def diff(a: list[str], b: list[str], what: str) -> list[str]:
        return list(difflib.unified_diff(a, b, f"old {what}", f"new {what}", lineterm=""))

    old_calls = [f"{c['tool']} {c['arguments']}" for c in old["tool_calls"]]
    new_calls = [f"{c['tool']} {c['arguments']}" for c in new["tool_calls"]]
    return {
        "answer": diff(lines(old["answer"]), lines(new["answer"]), "answer"),
        "tool_calls": diff(old_calls, new_calls, "tool calls"),
    }


def check(task: TaskConfig | None, run: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """``ReplayRefused`` unless ``run`` can be replayed with ``task`` (its task as the
    config has it now): an agent with tools, and recorded steps."""
    if task is None:
        raise ReplayRefused(f"run {run['id']}'s task {run['task_id']!r} is not in the config")
    if task.agent is None or not task.agent.tools:
        raise ReplayRefused(f"task {task.id!r} is not an agent with tools: nothing to replay")
    if not any(r["kind"] == MODEL for r in records):
        raise ReplayRefused(f"run {run['id']} has no recorded model reply: nothing to replay")


async def replay(
    config: Config,
    task: TaskConfig | None,
    run: dict[str, Any],
    records: list[dict[str, Any]],
    options: Options,
    out: Path,
) -> Report:
    """Run ``task``'s loop again against ``records`` (``run``'s recorded steps), with
    ``options``, in the directory ``out`` (its ``transcript.jsonl``, ``result.md``).
    ``ReplayRefused`` before anything is asked; a stop is the report's ``stopped``."""
    check(task, run, records)
    assert task is not None and task.agent is not None
    agent = task.agent
    changes: dict[str, Any] = {}
    if options.model is not None:
        changes["model"] = options.model
    if options.system is not None:
        changes["system"] = options.system
    if options.prompt is not None:
        changes["prompt"] = options.prompt
    if changes:
        agent = agent.model_copy(update=changes)
        task = task.model_copy(update={"agent": agent})
    # The run's own trigger params too, merged over the task's as the runner does.
    params = {**task.params, **(run.get("params") or {})}
    try:
        prompt = render(agent.prompt, params)
    except _Failed as failed:
        raise ReplayRefused(str(failed.result.error)) from None
    llm = None if options.cassette else DirectLLM(config, task)
    mode = "cassette" if llm is None else "provider"
    provider, model = (None, None) if llm is None else (llm.name, llm.model)
    redactor = read_secrets(secret_refs(config))
    memory = _Memory(redactor)
    ctx = RunContext(
        run_id=run["id"],
        task_id=task.id,
        attempt=1,
        scheduled_for=None,
        params=params,
        workspace=out,
        backend=memory,
        loop=asyncio.get_running_loop(),
        logger=_loop_log,
    )
    recording = Recording(records)
    log.info(
        "replay begins run=%s task=%s mode=%s provider=%s model=%s out=%s",
        run["id"],
        task.id,
        mode,
        provider or "-",
        model or "-",
        out,
    )
    result: Result | None = None
    stopped: str | None = None
    try:
        result = await _ReplayLoop(task, ctx, recording, llm).run(prompt)
    except ReplayStopped as exc:
        stopped = redactor.text(str(exc))  # it may quote the model's arguments
    finally:
        if llm is not None:
            await llm.aclose()
    old, new = summary(records), summary(memory.records)
    report = Report(
        run_id=run["id"],
        task_id=task.id,
        mode=mode,
        provider=provider,
        model=model,
        transcript=out / "transcript.jsonl",
        old=old,
        new=new,
        result=result,
        stopped=stopped,
        diff=differences(old, new),
    )
    if stopped is not None:
        log.warning("replay stopped run=%s: %s", run["id"], stopped)
    else:
        log.info("replay done run=%s same=%s", run["id"], "yes" if report.same else "no")
    return report
