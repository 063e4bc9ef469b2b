"""The worker pool: claims queued runs under a lease, runs them, records the outcome.

``tick()`` is one synchronous step (claim what fits, pass on cancel requests, extend
leases); the daemon's main loop calls it, tests can call it directly. Retries are
decided here but *wait in the queue* as a ``not_before`` time, so a restart loses none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from agentd import procs
from agentd.clock import Backoff, Clock, from_iso, progress_eta, to_iso
from agentd.config import TaskConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv, executor_for
from agentd.models import (
    CheckpointNotSaved,
    Outcome,
    Result,
    RunStatus,
    StateRefused,
    StopRequested,
)
from agentd.policy import (
    Deadlines,
    attempt_timeout_s,
    node_stale_after_s,
    retry_fits,
    run_deadline,
    start_deadline,
)
from agentd.providers import Gateway
from agentd.state.port import (
    ClaimedRun,
    Finish,
    RunEnded,
    StorageError,
    StorageFault,
    Store,
    WriteLost,
    decode_params,
    typical_duration_s,
    wait_commit,
)

log = logging.getLogger("agentd.runner")
T = TypeVar("T")

MAX_RETRY_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class Decision:
    status: RunStatus
    delay_s: float = 0.0
    why: str = ""


def decide(
    task: TaskConfig,
    outcome: Outcome,
    result: Result | None,
    failures_after: int,
    rng: random.Random,
) -> Decision:
    """Where a run goes after an attempt. Pure, so the policy is testable without a daemon.

    Backoff is "full jitter" (a uniform draw below the exponential ceiling): many tasks
    failing together against one dependency then spread out instead of retrying in step.
    A ``Retry-After`` from the other side is a floor, not a suggestion.
    """
    if outcome == Outcome.SUCCESS:
        return Decision(RunStatus.SUCCEEDED)
    if outcome == Outcome.CANCELLED:
        return Decision(RunStatus.CANCELLED)
    if outcome == Outcome.BUDGET_EXHAUSTED:
        # Final: a retry would meet the same limit, and nothing is broken to quarantine.
        return Decision(RunStatus.BUDGET_EXHAUSTED, 0.0, "budget exhausted")
    if outcome == Outcome.PARKED:
        # Not a failure: it waits for an operator until the agent's approval_timeout,
        # which ``not_before`` holds while the run is parked (``expire_approvals``).
        wait = task.agent.approval_timeout if task.agent is not None else 0.0
        return Decision(RunStatus.AWAITING_APPROVAL, wait, "awaiting approval")
    if outcome in (Outcome.INTERRUPTED, Outcome.LOST):
        return Decision(RunStatus.QUEUED, 0.0, "resume")
    if outcome == Outcome.EXPIRED:
        # Final: claimed after its start_within (``policy.overdue_status``), never begun.
        return Decision(RunStatus.EXPIRED, 0.0, "start_within passed")
    policy = task.retry
    retryable = True
    why = "retry"
    if outcome == Outcome.TIMEOUT:
        retryable = policy.on_timeout
        why = "timeout" if retryable else "timeouts do not retry"
    elif result is not None:
        if result.retryable is not None:
            retryable = result.retryable
            why = "executor says retryable" if retryable else "executor says not retryable"
        elif result.http_status is not None:
            retryable = result.http_status in policy.http_statuses
            why = f"HTTP {result.http_status}" + ("" if retryable else " is not retried")
        elif result.exit_code is not None and policy.exit_codes is not None:
            retryable = result.exit_code in policy.exit_codes
            why = f"exit code {result.exit_code}" + ("" if retryable else " is not retried")
    if not retryable:
        return Decision(RunStatus.QUARANTINED, 0.0, why)
    if failures_after >= policy.max_attempts:
        return Decision(RunStatus.QUARANTINED, 0.0, f"{failures_after} attempts failed")
    ceiling = min(policy.max_backoff, policy.backoff * (2 ** (failures_after - 1)))
    delay = rng.uniform(0, ceiling) if ceiling > 0 else 0.0
    if result is not None and result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, MAX_RETRY_AFTER_S))
    return Decision(RunStatus.QUEUED, delay, why)


def bounded(decision: Decision, at: datetime, deadline: datetime | None, hit: bool) -> Decision:
    """``decision`` under the run's whole-run deadline (``run_timeout``): an attempt the
    deadline stopped (``hit``), or a run that would be queued again (a retry, a resume)
    to start only at or after the deadline, ends ``timed_out`` now instead. Pure."""
    if deadline is None:
        return decision
    requeued = decision.status == RunStatus.QUEUED
    if hit or (requeued and not retry_fits(at + timedelta(seconds=decision.delay_s), deadline)):
        return Decision(RunStatus.TIMED_OUT, 0.0, "run_timeout passed")
    return decision


def workspace_path(root: Path, task_id: str, run_id: str) -> Path:
    return root / "runs" / task_id / run_id


@dataclass
class _Write:
    """A run-side write for the runner's next group, and who waits for it."""

    write: Callable[[], Any]
    future: asyncio.Future[Any]
    value: Any = None
    error: BaseException | None = None

    def run(self) -> None:
        """In the group, on the loop: its value, or its own failure (kept for the
        waiter; the group goes on, unless a storage fault lost it)."""
        try:
            self.value = self.write()
        except StorageFault:
            raise
        except Exception as exc:
            self.error = exc


def _settle(writes: list[_Write], error: BaseException | None) -> None:
    """The group is durable (``error`` None) or undone: tell each waiter, once."""
    for w in writes:
        if w.future.done():
            continue  # its waiter gave up (cancelled), or the group was settled already
        failure = error or w.error
        if failure is not None:
            w.future.set_exception(failure)
        else:
            w.future.set_result(w.value)


@dataclass
class ActiveRun:
    row: ClaimedRun
    task: TaskConfig
    ctx: RunContext
    job: asyncio.Task[None] | None = None
    started_mono: float = 0.0
    stop_reason: str | None = None  # "cancel" | "shutdown" | "void" | "lease_lost"
    """Why the runner stopped it; "void": its claim was never committed (see ``_void``);
    "lease_lost": another process or node holds its lease now (see ``_lease_lost``)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    """Its attempt's end has been handed to ``_record``."""
    deadline: datetime | None = None
    """When the whole run must have ended (``run_timeout`` from its enqueue), or None."""
    deadline_hit: bool = False
    """The attempt was stopped by ``deadline`` (not by its own ``timeout``)."""


@dataclass
class _Ended:
    """A run whose attempt ended, waiting for the next flush to be recorded."""

    active: ActiveRun
    outcome: Outcome
    result: Result | None
    error: str | None
    duration_s: float
    decision: Decision
    at: datetime
    owner: str
    """Whose lease the outcome is recorded under (the fence: see ``Finish.owner``)."""

    @property
    def not_before(self) -> datetime:
        """When a re-queued run may be claimed again (``at`` for a run that ended)."""
        return self.at + timedelta(seconds=self.decision.delay_s)

    def record(self) -> Finish:
        row, result = self.active.row, self.result
        return Finish(
            run_id=row["id"],
            task_id=row["task_id"],
            attempt=row["attempt"],
            failures=row["failures"],
            outcome=self.outcome,
            next_status=self.decision.status,
            at=self.at,
            not_before=self.not_before,
            error=self.error,
            exit_code=result.exit_code if result else None,
            http_status=result.http_status if result else None,
            duration_s=self.duration_s,
            pause_after_failures=self.active.task.pause_after_failures,
            cancel_reason="task_removed"
            if self.decision.status == RunStatus.CANCELLED and self.outcome != Outcome.CANCELLED
            else None,
            owner=self.owner,
        )


def _progress_written(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        exc = fut.exception()
        if not isinstance(exc, StorageError):
            log.error("progress not recorded: %s", exc)


class _Backend:
    """The store seen from inside a run (ContextBackend)."""

    def __init__(self, runner: Runner, task_id: str) -> None:
        self._runner = runner
        self._task_id = task_id
        self._typical: float | None = None
        self._typical_read = False

    def _typical_s(self) -> float | None:
        """The median duration of the task's recent successes, read once per run (on
        its first progress report); None when there are none or the read fails."""
        if not self._typical_read:
            self._typical_read = True
            try:
                self._typical = typical_duration_s(self._runner.store, self._task_id)
            except StorageError:
                self._typical = None
        return self._typical

    def load_checkpoint(self, run_id: str) -> Any | None:
        return self._runner.store.load_checkpoint(run_id)

    def save_checkpoint(self, run_id: str, data: Any) -> None:
        try:
            self._runner.store.save_checkpoint(run_id, data, self._runner.clock.now())
        except Exception as exc:
            if isinstance(exc, StorageFault):
                raise CheckpointNotSaved(f"checkpoint not saved: {exc}") from None
            raise

    def agent_steps(self, run_id: str) -> list[dict[str, Any]]:
        return [dict(step) for step in self._runner.store.agent_steps(run_id)]

    async def record_agent_step(
        self, run_id: str, step: int, kind: str, call_id: str | None, payload: Any
    ) -> dict[str, Any]:
        """As a checkpoint: a step the state could not take stops the run (interrupted, at
        no cost of an attempt), which resumes after the last step recorded. Fenced by the
        lease: a copy whose run another owner holds now records nothing more. Written in
        the runner's next group (``Runner.submit``); returns once that is durable."""
        r = self._runner
        active = r.active.get(run_id)
        now = r.clock.now()
        attempt = active.row["attempt"] if active else None

        def write() -> int:
            return r.store.record_agent_step(
                run_id, step, kind, call_id, payload, now, owner=r.owner, attempt=attempt
            )

        try:
            seq = await asyncio.shield(r.submit(write))
        except Exception as exc:
            if isinstance(exc, StorageError):
                raise CheckpointNotSaved(f"agent step not recorded: {exc}") from None
            if isinstance(exc, StateRefused) and exc.code == "lease_lost":
                log.warning("agent step not recorded run=%s: the lease is lost", run_id)
                raise CheckpointNotSaved(f"agent step not recorded: {exc}") from None
            raise
        return {
            "seq": seq,
            "step": step,
            "kind": kind,
            "call_id": call_id,
            "payload": r.store.redactor.value(payload),
            "recorded_at": to_iso(now),
        }

    def progress(self, run_id: str, done: int, total: int | None, message: str) -> None:
        """Progress is for people to look at: written with the runner's next group,
        waited for by nobody, and a failed write of it does not stop the run. Its event
        carries an ``eta`` (``clock.progress_eta``) from this attempt's rate and the
        task's recent successes, when either gives one."""
        r = self._runner
        now = r.clock.now()
        active = r.active.get(run_id)
        eta_text: str | None = None
        if active is not None:
            elapsed = r.clock.monotonic() - active.started_mono
            eta = progress_eta(now, elapsed, done, total, self._typical_s())
            eta_text = to_iso(eta) if eta is not None else None
        fut = r.submit(lambda: r.store.progress(run_id, done, total, message, now, eta_text))
        fut.add_done_callback(_progress_written)

    def heartbeat(self, run_id: str) -> None:
        r = self._runner
        try:
            lost = r.store.heartbeat([run_id], r.owner, r.clock.now(), r.lease_s)
        except Exception as exc:
            if not isinstance(exc, StorageFault):
                raise
            return
        if lost:
            r._lease_lost(lost)


class Runner:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        owner: str,
        state_dir: Path,
        concurrency: int,
        lease_s: float,
        exec_env: ExecEnv,
        on_change: Callable[[], None] | None = None,
        rng: random.Random | None = None,
        llm: Gateway | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.owner = owner
        self.state_dir = state_dir
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.exec_env = replace(exec_env, on_spawn=self._spawned)
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.llm = llm
        self.tasks: Mapping[str, TaskConfig] = {}
        self._only_tasks: list[str] | None = None
        self.active: dict[str, ActiveRun] = {}
        self.claiming = True
        self._last_heartbeat = clock.monotonic()
        self._last_recover = clock.monotonic()
        self._finishing: list[_Ended] = []
        self.unrecorded: list[_Ended] = []
        """Runs that ended but whose outcome could not be committed (the state DB failed
        a write); retried after ``_retry``'s backoff, until recorded or the daemon
        stops (then recovery at the next start re-queues them)."""
        self._retry = Backoff(first_s=0.5, max_s=5.0)
        self._committing: asyncio.Future[None] | None = None
        """The flush whose COMMIT is on the store's writer thread, if any."""
        self._allow_overlap: set[str] = set()
        self.next_due_at: datetime | None = None
        self._queue_version: tuple[int, int] | None = None
        self._first_queued: datetime | None = None
        """When the earliest queued run falls due, if later than the last tick."""
        self._ending: set[str] = set()
        """Lost runs whose process groups are being ended (off the loop) before they
        are re-queued (``recover_expired``)."""
        self._side_jobs: set[asyncio.Task[None]] = set()
        self._deadlines: dict[str, Deadlines] = {}
        """The tasks with a ``start_within`` or a ``run_timeout`` (``expire_overdue``)."""
        self._writes: list[_Write] = []
        """Run-side writes (agent steps, ledger entries, progress) for the next group."""
        self._flush_soon = False

    def set_tasks(self, tasks: Mapping[str, TaskConfig]) -> None:
        """New config: runs in flight keep the task definition they started with."""
        self.tasks = tasks
        self._allow_overlap = {t.id for t in tasks.values() if t.overlap == "allow"}
        deadlines = {t.id: Deadlines(t.start_within, t.run_timeout) for t in tasks.values()}
        self._deadlines = {tid: d for tid, d in deadlines.items() if d}
        # On a shared state, claim only runs of the tasks this node's config defines:
        # during a rollout another node may have fired a task this one does not know.
        self._only_tasks = sorted(tasks) if self.store.shared else None

    # ------------------------------------------------------------ the step

    def tick(self) -> list[str]:
        """One step; returns the run ids started. Never blocks on a run.

        While the state DB fails writes (``Store.write_error``) it neither claims nor
        heartbeats: a claim would fail, and the runs it started would have to be stopped
        again. The daemon's write probe finds out when writes work again.
        """
        now_mono = self.clock.monotonic()
        if self.unrecorded and self._committing is None and not self._retry.waiting(now_mono):
            # Outcomes that could not be committed: once more, with the next flush.
            self._schedule_flush()
            self._finishing[:0], self.unrecorded = self.unrecorded, []
        if self.store.write_error is not None:
            return []
        if self.active:
            for run_id in self.store.cancel_requests(self.owner):
                self.cancel(run_id, "cancel")
            if now_mono - self._last_heartbeat >= self.lease_s / 3:
                lost = self.store.heartbeat(
                    list(self.active), self.owner, self.clock.now(), self.lease_s
                )
                self._last_heartbeat = self.clock.monotonic()
                if lost:
                    self._lease_lost(lost)
        if now_mono - self._last_recover >= self.lease_s:
            self._last_recover = now_mono
            self.recover_expired()
            self.expire_approvals()
            self.expire_overdue()
        if not self.claiming:
            return []
        free = self.concurrency - len(self.active)
        if free <= 0:
            return []
        now = self.clock.now()
        version = self.store.version()
        if version == self._queue_version:
            first = self._first_queued  # no write anywhere since it was read
        else:
            first = self._first_queued = self.store.first_queued_at()
            self._queue_version = version
        self.next_due_at = first if first is not None and first > now else None
        if first is None or first > now:
            return []  # the common idle tick: no transaction, often no read
        self._queue_version = None  # the claim below changes the queue
        busy = {a.task.id for a in self.active.values()}
        allow = self._allow_overlap
        # The claim and every start of this tick share one commit: with 256 free slots
        # that is one fsync, not 257. Synchronous from begin to commit, so no other
        # writer's transaction can slip into the group.
        unit = self.store.unit(shared=True)  # claims and starts only (see Store.unit)
        try:
            rows = self.store.claim(
                now, self.owner, self.lease_s, free, busy, allow, only_tasks=self._only_tasks
            )
            runs = [run for run in map(self._prepare, rows) if run is not None]
            # One statement for all their "start" events, then the runs begin.
            self.store.mark_started_many(
                [(a.row["id"], a.task.id, str(a.ctx.workspace_path)) for a in runs],
                self.clock.now(),
            )
            loop = asyncio.get_running_loop()
            for active in runs:
                active.job = loop.create_task(self._run(active), name=f"run:{active.row['id']}")
                active.job.add_done_callback(partial(self._job_done, active))
            # They start only after this group commits (their first step comes later on
            # the loop); should it not commit, they are stopped before they run.
            unit.on_rollback(lambda: self._void(runs))
            started = [row["id"] for row in rows]
        finally:
            unit.commit()
        if rows:
            self._last_heartbeat = self.clock.monotonic()
        return started

    def expire_approvals(self) -> list[str]:
        """End ``denied`` the parked runs whose approval timeout has passed. Every lease
        period, so a deadline is kept to within one lease."""
        denied = self.store.expire_approvals(self.clock.now())
        for run_id in denied:
            log.warning("approval timed out run=%s: denied (approval_timeout)", run_id)
        return denied

    def expire_overdue(self) -> list[RunEnded]:
        """End the runs waiting (queued, parked) past their task's deadlines: ``expired``
        (``start_within``), ``timed_out`` (``run_timeout``). Every lease period, so a
        deadline is kept to within one lease; a run claimed in between is caught by
        ``_run`` before it begins."""
        if not self._deadlines:
            return []
        ended = self.store.expire_runs(self.clock.now(), self._deadlines)
        for run in ended:
            log.warning(
                "run %s run=%s task=%s: its %s passed before it %s",
                run.status,
                run.run_id,
                run.task_id,
                "start_within" if run.status == RunStatus.EXPIRED else "run_timeout",
                "started" if run.status == RunStatus.EXPIRED else "ended",
            )
        if ended and self.on_change:
            self.on_change()
        return ended

    def recover_expired(self) -> list[str]:
        """Re-queue runs left ``running`` whose lease has expired and that this runner no
        longer holds (an outcome lost to a crash of ours is recovered at start; this is
        for one that goes missing while the daemon runs). Every lease period."""
        held = self._held() | self._ending
        now = self.clock.now()
        live = self.live_owners()
        groups = self.store.lost_groups(now, live, held)
        if groups:
            # Their recorded process groups are ended first, in a thread (up to twice
            # kill_grace), then they are re-queued (``_end_then_recover``).
            self._ending |= set(groups)
            held |= set(groups)
            job = asyncio.get_running_loop().create_task(self._end_then_recover(groups))
            self._side_jobs.add(job)
            job.add_done_callback(self._side_jobs.discard)
        recovered = self.store.recover(now, self.owner, live_owners=live, keep=held)
        if recovered:
            log.warning(
                "recovered %d run(s) whose lease expired while running: %s",
                len(recovered),
                " ".join(recovered),
            )
        return recovered

    def live_owners(self) -> set[str]:
        """Whose leases are alive: this runner's, and on a shared state every node the
        registry has seen lately (``policy.node_stale_after_s``; a node not seen for that
        long is dead, and its runs are recovered)."""
        if not self.store.shared:
            return {self.owner}
        stale_s = node_stale_after_s(self.lease_s)
        return self.store.live_nodes(self.clock.now(), stale_s) | {self.owner}

    def _held(self) -> set[str]:
        """Runs this runner holds in memory (running, or ended and not yet recorded)."""
        return set(self.active) | {e.active.row["id"] for e in (*self.unrecorded, *self._finishing)}

    async def _end_then_recover(self, groups: dict[str, procs.GroupRecord]) -> None:
        try:
            ended = await asyncio.to_thread(procs.end_groups, groups, self.exec_env.kill_grace_s)
            recovered = self.store.recover(
                self.clock.now(),
                self.owner,
                live_owners=self.live_owners(),
                keep=self._held(),
                only=set(groups),
                ended=ended,
            )
        except Exception as exc:  # retried at the next sweep
            log.warning("recovering runs %s failed, retried: %s", " ".join(groups), exc)
            return
        finally:
            self._ending -= set(groups)
        if recovered:
            log.warning(
                "recovered %d run(s) whose lease expired while running, after ending "
                "their process groups: %s",
                len(recovered),
                " ".join(recovered),
            )
            if self.on_change:
                self.on_change()

    def _spawned(self, ctx: RunContext, group: procs.GroupRecord) -> None:
        """A command of ``ctx``'s attempt just spawned ``group``: record it now (after
        the commit in flight, if any: waiting for it would hold the loop for its
        fsync)."""
        if self.store.committing:
            job = asyncio.get_running_loop().create_task(self._record_group_later(ctx, group))
            self._side_jobs.add(job)
            job.add_done_callback(self._side_jobs.discard)
            return
        self._record_group(ctx, group)

    async def _record_group_later(self, ctx: RunContext, group: procs.GroupRecord) -> None:
        await self.store.commit_done()
        self._record_group(ctx, group)

    def _record_group(self, ctx: RunContext, group: procs.GroupRecord) -> None:
        try:
            self.store.record_group(ctx.run_id, ctx.attempt, group)
        except Exception as exc:
            if not isinstance(exc, StorageFault):
                raise
            log.warning(
                "process group %d of run %s not recorded (%s): a crash now would leave it "
                "to its death signal",
                group.pgid,
                ctx.run_id,
                exc,
            )

    def _void(self, runs: list[ActiveRun]) -> None:
        """The group that claimed ``runs`` did not commit: in the DB they are still
        queued (or do not exist, if their fire was rolled back too). Stop them before or
        as they begin, record nothing; they are claimed again when writes work."""
        voided = []
        for active in runs:
            if self.active.get(active.row["id"]) is not active:
                continue
            del self.active[active.row["id"]]
            active.stop_reason = "void"
            active.ctx.request_cancel()
            if active.job is not None:
                active.job.cancel()
            active.done.set()
            voided.append(active.row["id"])
        if voided:
            log.warning(
                "claim of %d run(s) not committed; stopped them, they stay queued: %s",
                len(voided),
                " ".join(voided),
            )

    def _lease_lost(self, run_ids: set[str]) -> None:
        """Runs whose lease this runner no longer holds (it expired, say while this
        process was stopped, and another process or node recovered the run): stop this
        copy and record nothing for it; the new holder's outcome is the run's."""
        for run_id in sorted(run_ids):
            active = self.active.get(run_id)
            if active is None or active.ended:
                continue
            del self.active[run_id]
            active.stop_reason = "lease_lost"
            active.ctx.request_cancel()
            if active.job is not None:
                active.job.cancel()
            active.done.set()
            log.warning(
                "lease lost run=%s task=%s owner=%s: another process or node holds it now; "
                "stopped this copy, recording nothing for it",
                run_id,
                active.task.id,
                self.owner,
            )
        if self.on_change:
            self.on_change()

    def cancel(self, run_id: str, reason: str) -> bool:
        active = self.active.get(run_id)
        if active is None or active.stop_reason is not None or active.job is None:
            return False
        active.stop_reason = reason
        active.ctx.request_cancel()
        active.job.cancel()
        return True

    # ------------------------------------------------------------ one run

    def _prepare(self, row: ClaimedRun) -> ActiveRun | None:
        """The claimed run's context, counted as active; None if its task is gone."""
        task = self.tasks.get(row["task_id"])
        if task is None:
            # The run was queued for a task a reload removed between fire and claim.
            self.store.finish(
                row["id"],
                self.clock.now(),
                outcome=Outcome.CANCELLED,
                next_status=RunStatus.CANCELLED,
                error="task is no longer in the config",
            )
            return None
        workspace = workspace_path(self.state_dir, task.id, row["id"])
        loop = asyncio.get_running_loop()
        ctx = RunContext(
            run_id=row["id"],
            task_id=task.id,
            attempt=row["attempt"],
            scheduled_for=from_iso(row["scheduled_for"]) if row["scheduled_for"] else None,
            params={**task.params, **(decode_params(row["params"]) or {})},
            workspace=workspace,
            backend=_Backend(self, task.id),
            loop=loop,
            logger=logging.LoggerAdapter(
                logging.getLogger(f"agentd.task.{task.id}"), {"run_id": row["id"]}
            ),
            llm=self.llm.for_run(task, row["id"], loop) if self.llm else None,
        )
        active = ActiveRun(row=row, task=task, ctx=ctx, started_mono=self.clock.monotonic())
        active.deadline = run_deadline(from_iso(row["created_at"]), task.run_timeout)
        self.active[row["id"]] = active
        return active

    async def _run(self, active: ActiveRun) -> None:
        task, ctx, row = active.task, active.ctx, active.row
        execute = executor_for(task.kind)
        result: Result | None = None
        error: str | None = None
        unexpected_cancel = False
        now = self.clock.now()
        limit_s, by_deadline = attempt_timeout_s(task.timeout, active.deadline, now)
        late = start_deadline(from_iso(row["created_at"]), task.start_within)
        if row["attempt"] == 1 and late is not None and now >= late:
            # Claimed after its queue-wait deadline, between two sweeps: it never runs.
            error = f"not started within start_within ({task.start_within:g}s)"
            self._record(active, Outcome.EXPIRED, None, error)
            return
        if by_deadline and limit_s is not None and limit_s <= 0:
            active.deadline_hit = True
            error = f"run_timeout ({task.run_timeout:g}s) passed before this attempt began"
            self._record(active, Outcome.TIMEOUT, None, error)
            return
        try:
            async with asyncio.timeout(limit_s):
                result = await execute(task, ctx, self.exec_env)
            outcome = Outcome.SUCCESS if result.ok else Outcome.FAILURE
            if result.budget_exhausted:
                outcome = Outcome.BUDGET_EXHAUSTED
            elif result.park is not None:
                outcome = Outcome.PARKED
            error = result.error
        except TimeoutError:
            ctx.request_cancel()
            if by_deadline:
                active.deadline_hit = True
                outcome = Outcome.TIMEOUT
                error = f"run_timeout ({task.run_timeout:g}s) passed: stopped after {limit_s:g}s"
            else:
                outcome, error = Outcome.TIMEOUT, f"timed out after {task.timeout:g}s"
        except StopRequested:
            outcome, error = Outcome.INTERRUPTED, "stopped at checkpoint for shutdown"
        except CheckpointNotSaved as exc:
            outcome, error = Outcome.INTERRUPTED, f"{exc}; resumes from the last saved one"
        except asyncio.CancelledError:
            if active.stop_reason == "cancel":
                outcome, error = Outcome.CANCELLED, "cancelled"
            else:
                outcome, error = Outcome.INTERRUPTED, "interrupted by shutdown"
            unexpected_cancel = active.stop_reason is None
        except Exception as exc:  # an executor bug must not kill the pool
            log.exception("executor crashed run=%s task=%s", row["id"], task.id)
            outcome, error = Outcome.FAILURE, f"executor error: {type(exc).__name__}: {exc}"
        self._record(active, outcome, result, error)
        if unexpected_cancel:
            raise asyncio.CancelledError

    def _job_done(self, active: ActiveRun, job: asyncio.Task[None]) -> None:
        """A run's task that was cancelled before its first step never ran ``_run`` (a
        cancel or a shutdown in the same loop turn as its claim): record it here."""
        if not active.ended and job.cancelled():
            if active.stop_reason == "cancel":
                self._record(active, Outcome.CANCELLED, None, "cancelled")
            else:
                self._record(active, Outcome.INTERRUPTED, None, "interrupted before it began")

    def _record(
        self, active: ActiveRun, outcome: Outcome, result: Result | None, error: str | None
    ) -> None:
        active.ended = True
        if active.stop_reason in ("void", "lease_lost"):
            return
        task, row = active.task, active.row
        now = self.clock.now()
        duration = round(self.clock.monotonic() - active.started_mono, 6)
        failures_after = row["failures"] + (
            1 if outcome in (Outcome.FAILURE, Outcome.TIMEOUT) else 0
        )
        decision = decide(task, outcome, result, failures_after, self.rng)
        was = decision.status
        decision = bounded(decision, now, active.deadline, active.deadline_hit)
        if decision.status != was and not active.deadline_hit:
            error = (
                f"{error or outcome}; no retry could start before run_timeout"
                f" ({task.run_timeout:g}s)"
            )
        if decision.status == RunStatus.QUEUED and self.tasks.get(task.id) is None:
            # Its task left the config while it ran: nothing would claim it again.
            decision = Decision(RunStatus.CANCELLED, 0.0, "task removed from the config")
        # (While a commit is in flight, _after_commit flushes what gathered.)
        self._schedule_flush()
        self._finishing.append(
            _Ended(active, outcome, result, error, duration, decision, now, self.owner)
        )

    # ------------------------------------------------------------ run-side writes

    def submit(self, write: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``write`` (store verbs, on the loop) in the next group: with the outcomes
        and claims of that cycle, under one COMMIT on the store's writer thread. The
        future gives ``write``'s value once that commit is durable, or the error that
        undid it (``write``'s own, or the commit's). Writes submitted while a commit is
        in flight gather for the next one: the busier the runs, the fewer fsyncs per
        write, and the loop never waits for one.

        A ``write`` should be one verb (its failure undoes only its own savepoint), or
        verbs that fail only together (a storage fault loses the whole group)."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writes.append(_Write(write, fut))
        self._schedule_flush()
        return fut

    def _schedule_flush(self) -> None:
        if self._committing is None and not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_finishes)

    def _flush_finishes(self) -> None:
        """Record every run that ended since the last flush, and claim the freed slots,
        in one group; its COMMIT runs on the store's writer thread. Waiters (drain) go
        on only once it is durable: ``done`` is set after the commit.

        Runs that end while that commit is in flight gather in ``_finishing`` and are
        flushed together when it is done: the busier the pool, the bigger each group
        and the fewer fsyncs per run. Should the group not commit, its outcomes wait in
        ``unrecorded`` to be tried again (see ``tick``).
        """
        self._flush_soon = False
        if (not self._finishing and not self._writes) or self._committing is not None:
            return
        pending, self._finishing = self._finishing, []
        writes, self._writes = self._writes, []
        for ended in pending:
            self.active.pop(ended.active.row["id"], None)
        try:
            # Run-side writes, finishes, then claims and starts (see Store.unit); a
            # quarantine among the finishes takes the write lock exclusively for itself
            # on PostgreSQL.
            unit = self.store.unit(shared=True)
        except StorageError as exc:
            _settle(writes, exc)
            if pending:
                self._keep_unrecorded(pending)
            return
        if pending:
            unit.on_rollback(lambda: self._keep_unrecorded(pending))
        unit.on_rollback(lambda: _settle(writes, WriteLost("the group was rolled back")))
        try:
            for write in writes:
                write.run()
            if pending:
                self._finish(pending)
            if unit.owner and pending:
                # The freed slots are claimed in the same commit: one fsync per cycle
                # of "some runs end, as many start", not two. A failed claim is the
                # main loop's to retry; it must not cost these outcomes.
                try:
                    self.tick()
                except StorageError as exc:
                    log.warning("claim after finishing runs failed, retried next tick: %s", exc)
        except Exception:
            if unit.owner:
                unit.abort()  # the outcomes wait in ``unrecorded``
                return
            raise
        commit = unit.commit_off_loop()
        if commit is None:
            # Inside someone else's group (or nothing to commit): their commit makes
            # these durable.
            _settle(writes, None)
            if pending:
                self._finished(pending)
        else:
            self._committing = asyncio.ensure_future(self._after_commit(commit, pending, writes))

    def _keep_unrecorded(self, pending: list[_Ended]) -> None:
        """Outcomes whose group did not commit: kept for another try after a backoff
        (while draining, the last try is ``record_unrecorded_now``: nobody waits)."""
        self.unrecorded.extend(pending)
        if not self.claiming:
            for ended in pending:
                ended.active.done.set()
        again = self._retry.until is not None  # the last try failed too: said already
        self._retry.failed(self.clock.monotonic())
        log.log(
            logging.DEBUG if again else logging.ERROR,
            "could not commit %d run outcome(s), kept to retry in %.1fs: %s",
            len(pending),
            self._retry.remaining_s(self.clock.monotonic()) or 0.0,
            self.store.write_error or "the group was rolled back",
        )
        if self.on_change:
            self.on_change()

    async def _after_commit(
        self,
        commit: concurrent.futures.Future[BaseException | None],
        pending: list[_Ended],
        writes: list[_Write],
    ) -> None:
        error: BaseException | None = None
        try:
            error = await wait_commit(commit)
            # The group's events (or, had it failed, its rollback hooks: the outcomes go
            # to ``unrecorded``, the writes get the error), unless a reader settled it.
            self.store.complete_commit()
        finally:
            self._committing = None
            _settle(writes, error)
            if error is None:
                self._retry.ok()
                if pending:
                    self._finished(pending)
        self._flush_finishes()

    def _finished(self, pending: list[_Ended]) -> None:
        """The outcomes are durable: the workspace records, then whoever waits."""
        for ended in pending:
            self._write_workspace(ended)
        for ended in pending:
            self.active.pop(ended.active.row["id"], None)
            ended.active.done.set()
        if self.on_change:
            self.on_change()

    def _finish(self, pending: list[_Ended]) -> None:
        """Record the outcomes, all in one ``finish_many``; if that fails for a reason of
        the data (a run gone), one by one, so one bad record costs only its own run, and
        a run whose record fails that way keeps its lease, which expires, and recovery
        re-queues it. A storage fault raises: then none of them is recorded."""
        try:
            self.store.finish_many([ended.record() for ended in pending])
        except Exception as exc:
            if isinstance(exc, StorageFault):
                raise
            log.warning("recording %d outcomes together failed, one by one: %s", len(pending), exc)
            for ended in pending:
                try:
                    self.store.finish_many([ended.record()])
                except Exception as one:
                    if isinstance(one, StorageFault):
                        raise
                    if isinstance(one, StateRefused) and one.code == "lease_lost":
                        log.warning(
                            "outcome not recorded run=%s task=%s owner=%s: lease lost, "
                            "another process or node holds the run now",
                            ended.active.row["id"],
                            ended.active.task.id,
                            ended.owner,
                        )
                        continue
                    log.exception(
                        "could not record outcome run=%s task=%s",
                        ended.active.row["id"],
                        ended.active.task.id,
                    )

    def _write_workspace(self, ended: _Ended) -> None:
        """events.jsonl, then run.json, beside what the run left, if it left anything.
        Written after the outcome is committed: the DB is the truth, the workspace follows
        it, so a run can be ``succeeded`` in the DB a moment before its run.json says so."""
        active, decision = ended.active, ended.decision
        run_id = active.row["id"]
        try:
            if _drop_if_empty(active.ctx.workspace_path):
                return  # the run wrote nothing: its record is in the DB alone
            # events.jsonl first: a reader that sees this attempt's run.json finds its
            # events beside it (run.json is the last file written).
            write_events_jsonl(active.ctx.workspace_path, self.store.events(run_id, 0, 5000))
            write_run_json(
                active.ctx.workspace_path,
                {
                    **self.store.get_run(run_id),
                    "decision": decision.why,
                    "not_before": to_iso(ended.not_before)
                    if decision.status == RunStatus.QUEUED
                    else None,
                },
            )
        except OSError as exc:  # read-only or full: the DB has the record; one line says so
            log.error(
                "could not write the workspace record run=%s task=%s: %s",
                run_id,
                active.task.id,
                exc,
            )
        except Exception:
            log.exception(
                "could not write the workspace record run=%s task=%s", run_id, active.task.id
            )

    # ------------------------------------------------------------ shutdown

    def record_unrecorded_now(self) -> int:
        """At shutdown, one last try to record the outcomes that could not be committed
        (see ``unrecorded``); returns how many are still not recorded. Those runs stay
        ``running`` in the DB and are recovered at the next start."""
        pending, self.unrecorded = [*self.unrecorded, *self._finishing], []
        self._finishing = []
        if not pending:
            return 0
        try:
            self.store.finish_many([ended.record() for ended in pending])
        except Exception as exc:
            self.unrecorded = pending
            log.error(
                "%d run outcome(s) could not be recorded before stopping (%s); those runs "
                "are recovered at the next start: %s",
                len(pending),
                exc,
                " ".join(e.active.row["id"] for e in pending),
            )
            return len(pending)
        self._finished(pending)
        return 0

    async def drain(self, grace_s: float, force: asyncio.Event | None = None) -> int:
        """Stop claiming; let runs finish within ``grace_s``; then stop the rest.

        Python and agent runs are asked to stop at their next checkpoint straight away;
        commands run on until the grace ends, then get their group killed. Returns how
        many runs had to be stopped.
        """
        self.claiming = False
        if not self.active:
            return 0
        for active in self.active.values():
            active.ctx.request_stop()
        waits = [asyncio.ensure_future(a.done.wait()) for a in self.active.values()]
        extra: list[asyncio.Future[Any]] = []
        if force is not None:
            extra.append(asyncio.ensure_future(force.wait()))
        gathered = asyncio.ensure_future(asyncio.gather(*waits))
        await asyncio.wait([gathered, *extra], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        for fut in extra:
            fut.cancel()
        stopped = 0
        for run_id in list(self.active):
            if self.cancel(run_id, "shutdown"):
                stopped += 1
        if not gathered.done():
            await asyncio.wait([gathered], timeout=self.exec_env.kill_grace_s + 5)
        if not gathered.done():
            gathered.cancel()
        return stopped


def _drop_if_empty(workspace: Path) -> bool:
    """True when the run left no workspace: none was made, or the one a command got
    stayed empty and is removed (``rmdir`` refuses a non-empty directory, so this never
    races a file being written). For a trivial command the two files and renames the
    run would otherwise leave were a fifth of its cost on the loop."""
    try:
        os.rmdir(workspace)
    except FileNotFoundError:
        return True
    except OSError:  # not empty (or not ours to remove): it gets run.json beside it
        return False
    return True


def write_run_json(workspace: Path, data: Mapping[str, Any]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    tmp = workspace / "run.json.tmp"
    tmp.write_text(json.dumps(dict(data), indent=2, default=str, sort_keys=True))
    tmp.replace(workspace / "run.json")


def write_events_jsonl(workspace: Path, events: Sequence[Mapping[str, Any]]) -> None:
    """The run's audit trail so far, beside its output; rewritten whole at the end of
    each attempt (atomic replace), the DB's events table staying the truth."""
    tmp = workspace / "events.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in events))
    tmp.replace(workspace / "events.jsonl")
