"""Operator operations, shared by the JSON API and the CLI's direct (no daemon) mode.

One implementation of "trigger", "pause", "quarantine release"... so the API and the CLI
cannot drift apart. Results are plain JSON-ready dicts; refusals are ``StateRefused`` with
a stable code that the API maps to an HTTP status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from agentd.backfill import MAX_BACKFILL, TooManyOccurrences, occurrences
from agentd.clock import Clock, from_iso, progress_eta, to_iso
from agentd.config import Config, inactive_reason, params_problem
from agentd.ledger import run_usage, spend_report
from agentd.models import FINAL_STATUSES, RUN_STATUSES, Row, RunStatus, StateRefused
from agentd.schedule import next_fires
from agentd.state.port import (
    AgentStepRecord,
    EventRecord,
    Fire,
    QuarantineRecord,
    RunRecord,
    Store,
    TaskRecord,
    atomically,
    encode_params,
    typical_duration_s,
)

log = logging.getLogger("agentd.control")

IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
"""A trigger's idempotency key: 1 to 255 printable ASCII characters, no spaces (as an
HTTP header value carries it; the state retires an expired key with a space in it)."""
MAX_PARAMS_BYTES = 65536
"""A trigger's params, as canonical JSON, at most this long."""


class Control:
    """``on_change`` is called after each write: the daemon wakes its main loop with it
    (a trigger is claimed now, not at the next idle poll), the CLI rings the doorbell of
    a daemon its API could not reach."""

    def __init__(
        self,
        store: Store,
        config: Config,
        clock: Clock,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.on_change = on_change

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()

    # ------------------------------------------------------------ tasks

    def task_view(
        self, task_id: str, state: TaskRecord | None, now: datetime, n_next: int = 1
    ) -> Row:
        task = self.config.tasks[task_id]
        spec = self.config.schedule_spec(task_id)
        inactive = inactive_reason(task)
        tz = ZoneInfo(spec.timezone)
        upcoming = [] if inactive else next_fires(spec, task_id, now, n_next)
        st: Mapping[str, Any] = state or {}
        return {
            "id": task_id,
            "description": task.description,
            "kind": task.kind,
            "schedule": task.schedule.describe(),
            "schedule_kind": spec.kind,
            "timezone": spec.timezone,
            "next_runs": [
                {"local": t.astimezone(tz).isoformat(), "utc": t.isoformat()} for t in upcoming
            ],
            "active": inactive is None,
            "inactive_reason": inactive,
            "paused": bool(st.get("paused")),
            "paused_reason": st.get("paused_reason"),
            "last_run_at": st.get("last_run_at"),
            "last_outcome": st.get("last_outcome"),
            "last_success_at": st.get("last_success_at"),
            "overlap": task.overlap,
            "catchup": task.catchup,
        }

    def list_tasks(self) -> list[Row]:
        now = self.clock.now()
        state = {r["id"]: r for r in self.store.task_rows()}
        return [self.task_view(tid, state.get(tid), now) for tid in self.config.tasks]

    def get_task(self, task_id: str, n_next: int = 5) -> Row:
        self._require_task(task_id)
        return self.task_view(task_id, self.store.task_row(task_id), self.clock.now(), n_next)

    def trigger(
        self,
        task_id: str,
        approve_sensitive: bool = False,
        params: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Row:
        """A manual run, also for a paused task; not for one that cannot run at all.
        ``approve_sensitive``: its agent's sensitive tool calls are approved in advance
        (a ``decision`` step for every call, written with the run, in one commit).

        ``params`` are recorded with the run and merged over the task's ``params`` when
        it starts (top-level keys); with a ``params_schema`` the merge must match it
        (``bad_request`` otherwise, and no run). An empty mapping is no params.

        ``key`` (an ``Idempotency-Key``): within ``limits.trigger_key_window`` of the run
        it made, a trigger of this task with the same key answers with that run
        (``created`` false, ``reason`` ``duplicate``) and makes none; with other params or
        another ``approve_sensitive`` it is refused (``idempotency_conflict``, 409). After
        the window the key is free again and makes a new run."""
        task = self._require_task(task_id)
        inactive = inactive_reason(task)
        if inactive:
            raise StateRefused("task_inactive", f"task {task_id!r} is inactive: {inactive}")
        if approve_sensitive and (task.agent is None or not (task.agent.tools or task.agent.mcp)):
            raise StateRefused(
                "bad_request", f"task {task_id!r} has no agent tools to approve in advance"
            )
        given = self._trigger_params(task, params)
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise StateRefused(
                "bad_request",
                "the idempotency key must be 1 to 255 printable ASCII characters, no spaces",
            )
        now = self.clock.now()
        with atomically(self.store):
            result = self.store.fire(
                task_id,
                now,
                trigger="manual",
                overlap=task.overlap,
                max_queued=task.max_queued,
                honour_pause=False,
                params=given,
                key=f"{task_id}@key:{key}" if key is not None else None,
                key_window_s=self.config.limits.trigger_key_window if key is not None else None,
            )
            approved = bool(approve_sensitive and result.created)
            if approve_sensitive and result.created:
                decision = {"decision": "approve", "by": "operator", "note": "--approve-sensitive"}
                self.store.record_agent_step(result.run_id, 0, "decision", "*", decision, now)
            elif not result.created and result.reason == "duplicate":
                approved = any(
                    s["kind"] == "decision" and s["call_id"] == "*"
                    for s in self.store.agent_steps(result.run_id)
                )
                if approved != approve_sensitive:
                    raise StateRefused(
                        "idempotency_conflict",
                        f"idempotency key already used for run {result.run_id} with"
                        f" approve_sensitive {str(approved).lower()}",
                    )
        if result.reason == "duplicate":
            log.info(
                "trigger replayed task=%s run=%s: same idempotency key", task_id, result.run_id
            )
        self._changed()
        return {
            "run_id": result.run_id,
            "status": result.status,
            "reason": result.reason,
            "created": result.created,
            "approved_sensitive": approved,
            "params": given,
            "idempotency_key": key,
        }

    def backfill(self, task_id: str, start: datetime, end: datetime, dry_run: bool = False) -> Row:
        """Each occurrence of the task's schedule in ``[start, end)`` enqueued as if it
        had fired then (``trigger`` "backfill"), in one ``Store.fire_many``.

        Invariants: an occurrence gets the key a real fire of that instant gets
        (``task@instant``, the scheduler's ``Fire`` without a key), so one that ran, or
        was backfilled before, is a ``duplicate`` answering with its run, never a second
        run; each goes through the task's overlap policy, pause and budget gate as a
        scheduled fire does (a skip is a skipped run, with its reason). Refused
        (``bad_request``): a range that is naive, empty or holds more than
        ``MAX_BACKFILL`` occurrences (none is enqueued then), a task with no repeating
        or once schedule; ``task_inactive`` as for a trigger. ``dry_run``: the instants,
        nothing written."""
        task = self._require_task(task_id)
        inactive = inactive_reason(task)
        if inactive:
            raise StateRefused("task_inactive", f"task {task_id!r} is inactive: {inactive}")
        spec = self.config.schedule_spec(task_id)
        if spec.kind == "manual":
            raise StateRefused("bad_request", f"task {task_id!r} has no schedule to backfill")
        try:
            instants = occurrences(spec, task_id, start, end, MAX_BACKFILL)
        except TooManyOccurrences as exc:
            raise StateRefused(
                "bad_request",
                f"the range holds more than {exc.limit} occurrences of {task_id!r}'s"
                f" schedule (at most {MAX_BACKFILL} per backfill): split it",
            ) from None
        except ValueError as exc:
            raise StateRefused("bad_request", str(exc)) from None
        out: Row = {
            "task": task_id,
            "from": to_iso(start),
            "to": to_iso(end),
            "dry_run": dry_run,
            "count": len(instants),
        }
        if dry_run:
            out["occurrences"] = [{"scheduled_for": to_iso(t)} for t in instants]
            return out
        fires = [
            Fire(task_id, when, "backfill", task.overlap, task.max_queued) for when in instants
        ]
        with atomically(self.store):
            results = self.store.fire_many(fires, self.clock.now()) if fires else []
        out["occurrences"] = [
            {
                "scheduled_for": to_iso(when),
                "run_id": r.run_id,
                "created": r.created,
                "status": r.status,
                "reason": r.reason,
            }
            for when, r in zip(instants, results, strict=True)
        ]
        created = sum(r.created for r in results)
        out["created"] = created
        log.info(
            "backfill task=%s from=%s to=%s occurrences=%d created=%d duplicates=%d",
            task_id,
            out["from"],
            out["to"],
            len(instants),
            created,
            sum(r.reason == "duplicate" for r in results),
        )
        if created:
            self._changed()
        return out

    def _trigger_params(self, task: Any, params: Mapping[str, Any] | None) -> Row | None:
        """A trigger's params as they are recorded (None for none), once they are known
        to fit: JSON, not too long, no secret value in them (the state must never hold
        one), and, merged over the task's, matching its ``params_schema``."""
        given = dict(params) if params else None
        if given is not None:
            try:
                text = encode_params(given) or ""
            except (TypeError, ValueError):
                raise StateRefused("bad_request", "params must be JSON values") from None
            if len(text.encode()) > MAX_PARAMS_BYTES:
                raise StateRefused("bad_request", f"params are over {MAX_PARAMS_BYTES} bytes")
            if self.store.redactor.text(text) != text:
                raise StateRefused(
                    "bad_request",
                    "params hold a secret value: pass secrets through the task's config"
                    " (env, files), never as params",
                )
        if task.params_schema is not None:
            problem = params_problem(task.params_schema, {**task.params, **(given or {})})
            if problem is not None:
                raise StateRefused(
                    "bad_request", f"params do not match the task's params_schema: {problem}"
                )
        return given

    def pause(self, task_id: str, reason: str) -> Row:
        self._require_task(task_id)
        changed = self.store.pause(task_id, reason, self.clock.now())
        self._changed()
        return {"task": task_id, "paused": True, "changed": changed}

    def resume(self, task_id: str) -> Row:
        self._require_task(task_id)
        changed = self.store.resume(task_id, self.clock.now())
        self._changed()
        return {"task": task_id, "paused": False, "changed": changed}

    def _require_task(self, task_id: str) -> Any:
        task = self.config.tasks.get(task_id)
        if task is None:
            raise StateRefused("unknown_task", f"no task named {task_id!r}")
        return task

    # ------------------------------------------------------------ runs

    def list_runs(
        self,
        task: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[RunRecord]:
        if status is not None and status not in RUN_STATUSES:
            raise StateRefused("bad_request", f"status must be one of {', '.join(RUN_STATUSES)}")
        if not 1 <= limit <= 1000:
            raise StateRefused("bad_request", "limit must be between 1 and 1000")
        runs = self.store.list_runs(task, status, limit, before, since, until)
        typical: dict[str, float | None] = {}
        now = self.clock.now()
        for run in runs:
            run["progress_eta"] = self._eta(dict(run), now, typical)  # type: ignore[typeddict-unknown-key]
        return runs

    def _eta(self, run: Row, now: datetime, typical: dict[str, float | None]) -> str | None:
        """``progress_eta`` of a run, computed when read (``clock.progress_eta``): for a
        running run that reported progress, from its rate since ``started_at`` and its
        task's typical duration (one read per task per call, cached in ``typical``);
        None for every other run."""
        if run["status"] != RunStatus.RUNNING or not run["started_at"]:
            return None
        if run["progress_done"] is None and run["progress_total"] is None:
            return None
        task_id = run["task_id"]
        if task_id not in typical:
            typical[task_id] = typical_duration_s(self.store, task_id)
        elapsed = (now - from_iso(run["started_at"])).total_seconds()
        eta = progress_eta(
            now, elapsed, run["progress_done"], run["progress_total"], typical[task_id]
        )
        return to_iso(eta) if eta is not None else None

    def get_run(self, run_id: str) -> Row:
        run = self.store.get_run(run_id)
        return {
            **run,
            "progress_eta": self._eta(dict(run), self.clock.now(), {}),
            "attempts": self.store.attempts(run_id),
            "checkpoint": self.store.load_checkpoint(run_id),
            "llm": run_usage(self.store, run_id),
        }

    def transcript(self, run_id: str) -> list[AgentStepRecord]:
        """An agent run's recorded steps (model replies, tool calls started, their
        results), in order, as the state DB keeps them (scrubbed of secrets); none for a
        run that recorded none. ``unknown_run`` for a run that does not exist."""
        self.store.get_run(run_id)
        return self.store.agent_steps(run_id)

    def resume_run(self, run_id: str) -> Row:
        """Queue again a run its budget stopped (``Store.resume_run``), once the budget
        has been raised or its window has rolled over."""
        row = self.store.resume_run(run_id, self.clock.now())
        self._changed()
        return row

    def cancel(self, run_id: str) -> Row:
        status = self.store.request_cancel(run_id, self.clock.now())
        self._changed()
        return {"run_id": run_id, "status": status}

    def events(
        self, run_id: str | None = None, after: int = 0, limit: int = 500
    ) -> list[EventRecord]:
        if run_id is not None:
            self.store.get_run(run_id)
        if not 1 <= limit <= 5000:
            raise StateRefused("bad_request", "limit must be between 1 and 5000")
        return self.store.events(run_id, after, limit)

    def recent_events(self, limit: int = 50) -> list[EventRecord]:
        """The newest ``limit`` events, oldest first."""
        if not 1 <= limit <= 5000:
            raise StateRefused("bad_request", "limit must be between 1 and 5000")
        return self.store.recent_events(limit)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def latest_event_id(self) -> int:
        return self.store.latest_event_id()

    # ------------------------------------------------------------ approvals

    def approvals(self, limit: int = 100) -> list[Row]:
        """The runs parked for an operator's decision, each with the call it waits on
        (tool, arguments, reason) and its deadline (the approval timeout)."""
        out: list[Row] = []
        for run in self.store.list_runs(status="awaiting_approval", limit=limit):
            asked = [
                s for s in self.store.agent_steps(run["id"]) if s["kind"] == "approval_requested"
            ]
            call = asked[-1] if asked else None
            payload = call["payload"] if call else {}
            out.append(
                {
                    "run_id": run["id"],
                    "task_id": run["task_id"],
                    "call_id": call["call_id"] if call else None,
                    "step": call["step"] if call else None,
                    "tool": payload.get("tool"),
                    "arguments": payload.get("arguments"),
                    "reason": payload.get("reason"),
                    "asked_at": call["recorded_at"] if call else None,
                    "deadline": run["not_before"],
                    "trigger": run["trigger"],
                }
            )
        return out

    def decide(
        self, run_id: str, decision: str, call_id: str | None = None, note: str | None = None
    ) -> Row:
        """``approve``, ``skip`` (with a note for the model) or ``deny`` a parked run's
        call (``Store.decide_approval``)."""
        row = self.store.decide_approval(
            run_id, decision, self.clock.now(), call_id=call_id, note=note
        )
        self._changed()
        return row

    # ------------------------------------------------------------ quarantine

    def quarantine_list(self) -> list[QuarantineRecord]:
        return self.store.quarantine_list()

    def quarantine_show(self, run_id: str) -> Row:
        return {"quarantine": self.store.quarantine_get(run_id), "run": self.get_run(run_id)}

    def quarantine_release(self, run_id: str) -> Row:
        self.store.quarantine_release(run_id, self.clock.now())
        self._changed()
        return {"run_id": run_id, "status": "queued"}

    def quarantine_drop(self, run_id: str) -> Row:
        self.store.quarantine_drop(run_id, self.clock.now())
        self._changed()
        return {"run_id": run_id, "dropped": True}

    # ------------------------------------------------------------ spend and alerts

    def spend(self, task: str | None = None) -> Row:
        """LLM spend per task and window (day and month in the task's zone) and globally."""
        if task is not None:
            self._require_task(task)
        report = spend_report(self.store, self.config, self.clock.now())
        if task is not None:
            report["tasks"] = [t for t in report["tasks"] if t["task"] == task]
        return report

    async def commit_done(self) -> None:
        """Until no commit of the state is in flight: reads on the loop then never wait
        for another thread's fsync (the API calls it before each request)."""
        await self.store.commit_done()

    def run_is_final(self, run_id: str) -> bool:
        return self.store.get_run(run_id)["status"] in FINAL_STATUSES

    def nodes(self, stale_after_s: float | None = None) -> list[Row]:
        """Every daemon that has opened this state: id, host, pid, version, config
        generation, started and last seen, whether it is alive (seen within
        ``stale_after_s``, by default the lease: after that its runs are recovered),
        how many runs it holds, and whether its config differs from the live majority's."""
        now = self.clock.now()
        stale = self.config.daemon.lease if stale_after_s is None else stale_after_s
        live = self.store.live_nodes(now, stale)
        rows: list[Row] = []
        for node in self.store.nodes():
            row: Row = dict(node)
            row["alive"] = node["id"] in live
            row["runs_held"] = len(self.store.running_ids(node["id"]))
            rows.append(row)
        generations = [r["config_generation"] for r in rows if r["alive"]]
        common = max(set(generations), key=generations.count) if generations else None
        for row in rows:
            row["config_differs"] = bool(row["alive"] and row["config_generation"] != common)
        return rows

    def alerts(self, limit: int = 50) -> list[Row]:
        """The newest alerts, newest first, each with its deliveries."""
        if not 1 <= limit <= 1000:
            raise StateRefused("bad_request", "limit must be between 1 and 1000")
        return self.store.recent_alerts(limit)
