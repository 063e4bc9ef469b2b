"""Alerts: which audit events need a human, to which channel, and how to deliver them.

Everything that alerts is first an audit event (``quarantine``, ``pause`` by agentd,
``budget_alarm``, ``budget_burn``, ``budget_exhausted``, ``deadman``, ``run_too_long``,
``run_expired``, ``run_timed_out``,
``config_reload_failed``, ``recovered``), and so is a run's completion, which a task
with ``notify`` turns into ``run_succeeded``/``run_failed`` (``completion_alert``).
``agentd.outbox`` tails the event log with a durable cursor, turns events into
alerts with ``alert_for_event`` and queues one delivery per channel that a rule
names. This module holds the pure parts (the mapping, rules, repeats, the dead man's
switch arithmetic, payloads and signatures) and the channels.

Webhook signatures: ``X-Agentd-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw
body with the channel's secret. ``X-Agentd-Delivery`` is stable across retries, so a
receiver can drop the rare duplicate (a crash right after a delivery, before it was
recorded, sends it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from agentd import procs
from agentd.config import ChannelConfig, Config, ExpectConfig, WebhookChannel
from agentd.models import EventKind
from agentd.redact import SecretUnavailable, read_secret

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("agentd.alerts")

SIGNATURE_HEADER = "X-Agentd-Signature"
DELIVERY_HEADER = "X-Agentd-Delivery"


@dataclass(frozen=True)
class Alert:
    kind: str
    key: str
    """Dedup key: the same condition alerts a channel once per cooldown."""
    summary: str
    task_id: str | None = None
    run_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def alert_for_event(event: dict[str, Any]) -> Alert | None:
    """The alert an audit event raises, if any."""
    kind, task, run = event["kind"], event.get("task_id"), event.get("run_id")
    data: dict[str, Any] = event.get("data") or {}
    if kind == EventKind.QUARANTINE:
        error = data.get("error") or "no error text"
        summary = f"{task}: run {run} quarantined after {data.get('attempts')} attempt(s): {error}"
        return Alert("run_quarantined", f"run_quarantined:{task}", summary, task, run, data)
    if kind == EventKind.RUN_EXPIRED:
        summary = f"{task}: run {run} expired, {data.get('error')}"
        return Alert("run_expired", f"run_expired:{task}", summary, task, run, data)
    if kind == EventKind.RUN_TIMED_OUT:
        summary = f"{task}: run {run} timed out, {data.get('error')}"
        return Alert("run_timed_out", f"run_timed_out:{task}", summary, task, run, data)
    if kind == EventKind.PAUSE and data.get("by") == "agentd":
        summary = f"{task}: paused automatically ({data.get('reason')})"
        return Alert("task_paused", f"task_paused:{task}", summary, task, None, data)
    if kind == EventKind.BUDGET_ALARM:
        pct, scope = data.get("threshold_pct"), data.get("scope")
        summary = (
            f"budget {scope}: {pct}% reached ({data.get('spent_usd')} of"
            f" {data.get('limit_usd')} USD, window ends {data.get('window_end')})"
        )
        key = f"budget_alarm:{scope}:{data.get('window_start')}:{pct}"
        return Alert("budget_alarm", key, summary, task, None, data)
    if kind == EventKind.BUDGET_BURN:
        scope = data.get("scope")
        summary = (
            f"budget {scope}: at {data.get('usd_per_hour')} USD/h it runs out at"
            f" {data.get('projected_exhaustion')} ({data.get('spent_usd')} of"
            f" {data.get('limit_usd')} USD spent, window ends {data.get('window_end')})"
        )
        key = f"budget_burn:{scope}:{data.get('window_start')}"
        return Alert("budget_burn", key, summary, task, None, data)
    if kind == EventKind.BUDGET_EXHAUSTED:
        summary = f"{task}: run {run} stopped, {data.get('error')}"
        return Alert("budget_exhausted", f"budget_exhausted:{task}", summary, task, run, data)
    if kind == EventKind.AWAITING_APPROVAL:
        summary = (
            f"{task}: run {run} waits for an operator: {data.get('error')}"
            f" (agentd approve {run} / agentd deny {run})"
        )
        key = f"approval_needed:{run}:{data.get('attempt')}"
        return Alert("approval_needed", key, summary, task, run, data)
    if kind == EventKind.DEADMAN:
        summary = (
            f"{task}: no success since {data.get('last_success') or 'monitoring began'}"
            f" (expected every {data.get('every_s')}s, grace {data.get('grace_s')}s)"
        )
        return Alert("deadman", f"deadman:{task}", summary, task, None, data)
    if kind == EventKind.RUN_TOO_LONG:
        summary = (
            f"{task}: run {run} attempt {data.get('attempt')} still running after"
            f" {data.get('running_s')}s (max_duration {data.get('max_duration_s')}s)"
        )
        key = f"run_too_long:{run}:{data.get('attempt')}"
        return Alert("run_too_long", key, summary, task, run, data)
    if kind == EventKind.CONFIG_RELOAD_FAILED:
        error = str(data.get("error") or "")
        digest = hashlib.sha256(error.encode()).hexdigest()[:12]
        summary = f"config reload failed, the running config stays: {error.splitlines()[-1:]}"
        return Alert(
            "config_reload_failed", f"config_reload_failed:{digest}", summary, None, None, data
        )
    if kind == EventKind.RECOVERED:
        what = data.get("what")
        summary = f"{task}: recovered ({what}), run {run} succeeded"
        key = f"recovered:{what}:{task}:{data.get('since')}"
        return Alert("recovered", key, summary, task, run, data)
    return None


def run_link(run_id: str) -> str:
    """The API resource of a run, as a path (agentd has no configured public URL)."""
    return f"/v1/runs/{run_id}"


def completion_alert(
    event: dict[str, Any], on: Collection[str], run: Mapping[str, Any], cost_usd: float | None
) -> Alert | None:
    """The completion notice a run's ``success``, ``failure``/``timeout`` or
    ``quarantine`` event raises for a task whose ``notify.on`` is ``on``, or None.

    ``run`` is the run's record as it is now (duration, attempt, error); ``cost_usd`` its
    LLM spend. The dedup key names the run (and the attempt of a failure), so every
    completion is its own notice and a retry of the delivery is not a second one."""
    kind, task, run_id = event["kind"], event.get("task_id"), event.get("run_id")
    if not task or not run_id:
        return None
    data: dict[str, Any] = event.get("data") or {}
    if kind == EventKind.SUCCESS and "success" in on:
        alert_kind, final, key = "run_succeeded", True, f"run_succeeded:{run_id}"
    elif kind in (EventKind.FAILURE, EventKind.TIMEOUT) and "failure" in on:
        attempt = data.get("attempt")
        alert_kind, final, key = "run_failed", False, f"run_failed:{run_id}:{attempt}"
    elif kind == EventKind.QUARANTINE and "quarantine" in on:
        alert_kind, final, key = "run_failed", True, f"run_failed:{run_id}:final"
    else:
        return None
    duration = data.get("duration_s", run.get("duration_s"))
    attempt = data.get("attempt", data.get("attempts", run.get("attempt")))
    error = data.get("error") if kind != EventKind.SUCCESS else None
    head = (str(error).strip().splitlines() or [""])[0][:200] if error else None
    link = run_link(run_id)
    summary = {
        "status": run.get("status"),
        "outcome": kind,
        "final": final,
        "attempt": attempt,
        "duration_s": duration,
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "error": head,
        "cost_usd": cost_usd,
        "url": link,
    }
    what = "succeeded" if alert_kind == "run_succeeded" else "failed"
    if kind == EventKind.QUARANTINE:
        what = "failed for good (quarantined)"
    elif kind == EventKind.TIMEOUT:
        what = "timed out"
    parts = [f"{task}: run {run_id} {what}", f"attempt {attempt}"]
    if duration is not None:
        parts.append(f"{float(duration):.1f}s")
    if cost_usd:
        parts.append(f"{cost_usd:.4f} USD")
    text = ", ".join(parts)
    if head:
        text += f": {head}"
    return Alert(alert_kind, key, f"{text} ({link})", task, run_id, summary)


REPEATABLE = ("deadman", "run_quarantined")
"""Alert kinds that describe a lasting condition, which a rule's ``repeat_every`` sends
again while it lasts."""


def repeat_routes(kind: str, task_id: str, config: Config) -> dict[str, float]:
    """Channel name -> repeat interval (seconds) of the rules with ``repeat_every`` that
    match a lasting ``kind`` about ``task_id`` (the shortest when several do)."""
    out: dict[str, float] = {}
    for rule in config.alerts.rules:
        if rule.repeat_every is None or kind not in REPEATABLE:
            continue
        if "*" not in rule.events and kind not in rule.events:
            continue
        if rule.tasks is not None and task_id not in rule.tasks:
            continue
        for channel in rule.channels:
            out[channel] = min(rule.repeat_every, out.get(channel, rule.repeat_every))
    return out


def routes(alert: Alert, config: Config) -> dict[str, float]:
    """Channel name -> cooldown (seconds) for every rule that matches the alert."""
    out: dict[str, float] = {}
    for rule in config.alerts.rules:
        if "*" not in rule.events and alert.kind not in rule.events:
            continue
        if rule.tasks is not None and alert.task_id is not None and alert.task_id not in rule.tasks:
            continue
        cooldown = config.alerts.cooldown if rule.cooldown is None else rule.cooldown
        for channel in rule.channels:
            out[channel] = min(cooldown, out.get(channel, cooldown))
    return out


# ---------------------------------------------------------------- dead man's switch


def deadman_deadline(
    last_success: datetime | None, since: datetime, expect: ExpectConfig
) -> datetime:
    """When a task that must succeed every ``expect.every`` is late: a period plus grace
    after its last success, or after monitoring began if it never succeeded."""
    reference = max(last_success, since) if last_success else since
    return reference + timedelta(seconds=expect.every + expect.grace)


def deadman_late(
    last_success: datetime | None, since: datetime, expect: ExpectConfig, now: datetime
) -> datetime | None:
    """The missed deadline, or None while the task is on time."""
    deadline = deadman_deadline(last_success, since, expect)
    return deadline if now > deadline else None


# ---------------------------------------------------------------- payloads and channels


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """What a receiver does: compare in constant time."""
    return hmac.compare_digest(sign(body, secret), header.strip())


class DeliveryError(Exception):
    pass


def _secret(hook: WebhookChannel) -> str | None:
    try:
        return read_secret(hook.secret_env, hook.secret_file, "webhook secret")
    except SecretUnavailable as exc:
        raise DeliveryError(str(exc)) from None


async def deliver(
    channel: ChannelConfig,
    payload: dict[str, Any],
    delivery_id: str,
    client: httpx.AsyncClient,
    withheld_env: frozenset[str] = frozenset(),
) -> None:
    """One attempt; raises ``DeliveryError`` with a reason fit for the log (no secrets)."""
    import httpx  # imported on first delivery: most daemons never send one

    body = json.dumps(payload, default=str, sort_keys=True).encode()
    if channel.webhook is not None:
        hook = channel.webhook
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery_id,
            "X-Agentd-Event": str(payload.get("kind")),
            **hook.headers,
        }
        secret = _secret(hook)
        if secret:
            headers[SIGNATURE_HEADER] = sign(body, secret)
        try:
            resp = await client.post(hook.url, content=body, headers=headers, timeout=hook.timeout)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook: {type(exc).__name__}") from None
        if not resp.is_success:
            raise DeliveryError(f"webhook answered HTTP {resp.status_code}")
        return
    if channel.command is not None:
        await _run_command(channel.command.argv, body, channel.command.timeout, withheld_env)
        return
    level = getattr(logging, (channel.log.level if channel.log else "warning").upper())
    log.log(level, "ALERT %s %s", payload.get("kind"), payload.get("summary"))


async def _run_command(
    argv: list[str], body: bytes, timeout: float, withheld_env: frozenset[str] = frozenset()
) -> None:
    """The alert on stdin; the daemon's environment without the variables that hold
    its secrets (``withheld_env``), like a task's command."""
    env = {k: v for k, v in os.environ.items() if k not in withheld_env}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise DeliveryError(f"command {argv[0]}: {exc.strerror}") from None
    procs.own(proc.pid)  # asyncio's child watcher waits for it, not the reaper
    try:
        _, err = await asyncio.wait_for(proc.communicate(body), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise DeliveryError(f"command {argv[0]} timed out after {timeout:g}s") from None
    finally:
        if proc.returncode is not None:
            procs.disown(proc.pid)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        raise DeliveryError(f"command {argv[0]} exited {proc.returncode} {tail}")
