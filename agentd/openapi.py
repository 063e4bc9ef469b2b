"""The OpenAPI 3.0.3 description of agentd's HTTP API, served at ``/v1/openapi.json``.

It is precise on purpose: the API fuzz test generates requests from it and checks every
response (status code and body) against it, so a drift between this file and
``agentd.http`` fails a test. Objects that mirror DB rows allow extra properties, so a
new column is not a breaking change, but every documented field is required.
"""

from __future__ import annotations

import copy
from typing import Any

from agentd.config import ALERT_KINDS
from agentd.models import APPROVAL_DECISIONS, MAX_EVENT_ID, RUN_STATUSES, EventKind
from agentd.runoutput import MAX_OUTPUT_OFFSET, MIN_PAGE, OUTPUT_PAGE, OUTPUT_STREAMS

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _str(nullable: bool = False, **extra: Any) -> Schema:
    return {"type": "string", **({"nullable": True} if nullable else {}), **extra}


def _int(nullable: bool = False, **extra: Any) -> Schema:
    return {"type": "integer", **({"nullable": True} if nullable else {}), **extra}


def _num(nullable: bool = False) -> Schema:
    return {"type": "number", **({"nullable": True} if nullable else {})}


def _obj(props: dict[str, Schema], *, extra: bool = True, required: bool = True) -> Schema:
    out: Schema = {"type": "object", "properties": props, "additionalProperties": extra}
    if required and props:
        out["required"] = sorted(props)
    return out


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


ERRORS: dict[str, Schema] = {
    "400": _error("Bad request (`bad_request`): a parameter or the body is invalid."),
    "401": _error(
        "`unauthorized`: this server has a token and the request has no or a wrong "
        "`Authorization: Bearer` header (`WWW-Authenticate: Bearer`)."
    ),
    "403": _error("`forbidden`: the read token may only read (GET and HEAD)."),
    "408": _error("`request_timeout`: the body did not arrive within `client_timeout`."),
    "404": _error("`unknown_task`, `unknown_run`, `not_quarantined` or `not_found`."),
    "409": _error(
        "`run_finished`: the run already ended; `task_inactive`; `not_awaiting_approval` "
        "or `wrong_call` (a decision on a run not parked, or on another call)."
    ),
    "413": _error("`payload_too_large`: the request body is over 1 MiB."),
    "500": _error("`internal`: a bug; the traceback is in the agentd log, not here."),
    "503": _error(
        "`unavailable`: agentd is starting up (state not open yet) or shutting down; "
        "`db_unavailable`: the state DB failed (disk full, locked too long); "
        "`too_many_connections`: every connection is taken (`max_connections`); for a "
        "stream, `too_many_streams` (`max_streams`). Retry after `Retry-After` seconds."
    ),
}


def _errors(*codes: str) -> dict[str, Schema]:
    return {code: ERRORS[code] for code in ("500", *codes)}


def _path_param(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


TASK_ID = _path_param("task_id", "Task name, as in the config file.")
RUN_ID = _path_param("run_id", "Run id, e.g. `20260301T120000-9f2c4e0b7a1d3c5e8f60`.")


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


AFTER = _query(
    "after",
    _int(minimum=0, maximum=MAX_EVENT_ID, default=0),
    "Only events with an id greater than this.",
)
EVENTS_LIMIT = _query(
    "limit", _int(minimum=1, maximum=5000, default=500), "Page size (oldest first)."
)
EVENTS_TAIL = _query(
    "tail",
    _int(minimum=1, maximum=5000),
    "The newest this many events (still oldest first); `limit` does not apply, and "
    "`after` may not be given with it.",
)
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "Resume after this event id (sent by EventSource on reconnect); "
    "wins over `after`.",
    "schema": _int(minimum=0, maximum=MAX_EVENT_ID),
}

IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1 to 255 printable ASCII characters, no spaces. Within "
    "`limits.trigger_key_window` (default 24h) of the run a key made, the same key on the "
    "same task answers with that run (`created` false, `reason` `duplicate`, header "
    "`Idempotent-Replayed: true`) and makes none; other params under it are 409 "
    "`idempotency_conflict`. After the window the key is free and makes a new run.",
    "schema": _str(minLength=1, maxLength=255, pattern="^[!-~]+$"),
}


def _optional_body(schema: Schema) -> Schema:
    return {"required": False, "content": {"application/json": {"schema": schema}}}


NO_FIELDS = _optional_body(_ref("Empty"))
POST_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]
"""The token when the server has one (``{}``: none needed when it has none)."""
READ_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"readToken": []}, {}]
"""Either token when the server has one."""


def _post(
    summary: str,
    params: list[Schema],
    status: str,
    result: str,
    *errors: str,
    body: Schema = NO_FIELDS,
) -> Schema:
    return {
        "summary": summary,
        "security": POST_SECURITY,
        "parameters": params,
        "requestBody": body,
        "responses": {
            status: _json(_ref(result), "Done."),
            **_errors("400", "401", "403", "404", "408", "413", "503", *errors),
        },
    }


def _with_response(operation: Schema, status: str, response: Schema) -> Schema:
    """``operation`` with one more response (a second success status)."""
    return {**operation, "responses": {status: response, **operation["responses"]}}


def _get(summary: str, params: list[Schema], result: Schema, *errors: str) -> Schema:
    return {
        "summary": summary,
        "security": READ_SECURITY,
        "parameters": params,
        "responses": {"200": _json(result, "OK."), **_errors("401", "503", *errors)},
    }


def _sse(summary: str, params: list[Schema], *errors: str, ends: bool = False) -> Schema:
    responses: dict[str, Schema] = {
        "200": {
            "description": "A `text/event-stream`: per event `id: <event id>`, "
            "`event: <kind>`, `data: <the Event as JSON>`; `: keep-alive` comments while "
            "idle. A client that falls too far behind is disconnected and should reconnect "
            "with `Last-Event-ID`.",
            "content": {"text/event-stream": {"schema": _ref("SseEvent")}},
        },
        **_errors("400", "401", "503", *errors),
    }
    if ends:
        responses["204"] = {
            "description": "The run is final and nothing is newer than the resume point: "
            "stop reconnecting."
        }
    return {
        "summary": summary,
        "security": READ_SECURITY,
        "parameters": params,
        "responses": responses,
    }


SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"error": _str(), "message": _str()}, extra=False),
    "Empty": {"type": "object", "additionalProperties": False},
    "Liveness": {
        "type": "object",
        "required": ["status", "last_tick_age_s", "stale_after_s"],
        "properties": {
            "status": _str(enum=["ok", "unhealthy"]),
            "last_tick_age_s": {"type": "object", "additionalProperties": _num()},
            "stale_after_s": _num(),
            "stale": {"type": "array", "items": _str()},
        },
        "additionalProperties": True,
    },
    "Readiness": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": _str(enum=["ready", "not_ready"]), "reason": _str()},
        "additionalProperties": True,
    },
    "Status": {"type": "object", "additionalProperties": True},
    "OpenApi": {"type": "object", "required": ["openapi", "paths"], "additionalProperties": True},
    "Task": _obj(
        {
            "id": _str(),
            "description": _str(),
            "kind": _str(enum=["command", "http", "python", "agent"]),
            "schedule": _str(),
            "schedule_kind": _str(enum=["cron", "interval", "once", "manual"]),
            "timezone": _str(),
            "next_runs": {
                "type": "array",
                "items": _obj({"local": _str(), "utc": _str()}),
            },
            "active": {"type": "boolean"},
            "inactive_reason": _str(nullable=True),
            "paused": {"type": "boolean"},
            "paused_reason": _str(nullable=True),
            "last_run_at": _str(nullable=True),
            "last_outcome": _str(nullable=True),
            "last_success_at": _str(nullable=True),
            "overlap": _str(),
            "catchup": _str(),
        }
    ),
    "TaskList": _obj({"tasks": {"type": "array", "items": _ref("Task")}}, extra=False),
    "TriggerResult": _obj(
        {
            "run_id": _str(),
            "status": _str(enum=list(RUN_STATUSES)),
            "reason": _str(nullable=True),
            "created": {
                "type": "boolean",
                "description": "A run was made now (false: a duplicate of the key's run).",
            },
            "params": {
                "type": "object",
                "nullable": True,
                "description": "The trigger's params as recorded with the run.",
            },
            "idempotency_key": _str(nullable=True),
            "approved_sensitive": {
                "type": "boolean",
                "description": "The run's sensitive tool calls are approved in advance.",
            },
        },
        extra=False,
    ),
    "TriggerRequest": {
        "type": "object",
        "properties": {
            "params": {
                "type": "object",
                "description": "Merged over the task's `params` (top-level keys) for this "
                "run, recorded with it; checked against the task's `params_schema` if it "
                "has one (400 when they do not match, and no run).",
            },
            "approve_sensitive": {
                "type": "boolean",
                "default": False,
                "description": "Approve the agent's sensitive tool calls in advance (a "
                "task with agent tools only).",
            },
        },
        "additionalProperties": False,
    },
    "Approval": _obj(
        {
            "run_id": _str(),
            "task_id": _str(),
            "call_id": _str(nullable=True),
            "step": _int(nullable=True),
            "tool": _str(nullable=True),
            "arguments": {"type": "object", "nullable": True},
            "reason": _str(nullable=True, enum=["sensitive", "unknown_outcome", None]),
            "asked_at": _str(nullable=True),
            "deadline": _str(nullable=True),
            "trigger": _str(nullable=True),
        },
        extra=False,
    ),
    "ApprovalList": _obj({"approvals": {"type": "array", "items": _ref("Approval")}}, extra=False),
    "DecisionRequest": {
        "type": "object",
        "properties": {
            "call_id": _str(
                minLength=1,
                maxLength=200,
                description="The call decided on: refused (409 wrong_call) if the run "
                "waits on another.",
            ),
            "note": _str(maxLength=2000, description="Why; a skip tells the model this."),
        },
        "additionalProperties": False,
    },
    "DecisionResult": _obj(
        {
            "run_id": _str(),
            "status": _str(enum=["queued", "denied"]),
            "decision": _str(enum=list(APPROVAL_DECISIONS)),
            "call_id": _str(),
        },
        extra=False,
    ),
    "BackfillRequest": {
        "type": "object",
        "properties": {
            "from": _str(
                format="date-time",
                description="The range's start (inclusive), ISO 8601 with a UTC offset.",
            ),
            "to": _str(format="date-time", description="The range's end (exclusive)."),
            "dry_run": {
                "type": "boolean",
                "default": False,
                "description": "List the occurrences; enqueue nothing (200).",
            },
        },
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "BackfillOccurrence": {
        "type": "object",
        "properties": {
            "scheduled_for": _str(),
            "run_id": _str(),
            "created": {
                "type": "boolean",
                "description": "A run was made (false: a duplicate of the run this "
                "instant's fire made, or an unknown task).",
            },
            "status": _str(),
            "reason": _str(
                nullable=True,
                description="Why no queued run: `duplicate`, or the skip's reason "
                "(overlap policy, pause, budget gate).",
            ),
        },
        "required": ["scheduled_for"],
        "additionalProperties": False,
    },
    "BackfillResult": {
        "type": "object",
        "properties": {
            "task": _str(),
            "from": _str(),
            "to": _str(),
            "dry_run": {"type": "boolean"},
            "count": _int(),
            "created": _int(description="Runs made (absent in a dry run)."),
            "occurrences": {"type": "array", "items": _ref("BackfillOccurrence")},
        },
        "required": ["count", "dry_run", "from", "occurrences", "task", "to"],
        "additionalProperties": False,
    },
    "PauseRequest": {
        "type": "object",
        "properties": {"reason": _str(minLength=1, maxLength=500, default="paused via API")},
        "additionalProperties": False,
    },
    "PauseResult": _obj(
        {"task": _str(), "paused": {"type": "boolean"}, "changed": {"type": "boolean"}},
        extra=False,
    ),
    "Run": _obj(
        {
            "id": _str(),
            "task_id": _str(),
            "trigger": _str(nullable=True),
            "scheduled_for": _str(nullable=True),
            "idempotency_key": _str(),
            "status": _str(enum=list(RUN_STATUSES)),
            "attempt": _int(),
            "failures": _int(),
            "not_before": _str(nullable=True),
            "lease_owner": _str(nullable=True),
            "lease_expires_at": _str(nullable=True),
            "cancel_requested": _int(),
            "created_at": _str(),
            "started_at": _str(nullable=True),
            "finished_at": _str(nullable=True),
            "outcome": _str(nullable=True),
            "exit_code": _int(nullable=True),
            "error": _str(nullable=True),
            "duration_s": _num(nullable=True),
            "skip_reason": _str(nullable=True),
            "progress_done": _int(nullable=True),
            "progress_total": _int(nullable=True),
            "progress_message": _str(nullable=True),
            "progress_eta": _str(
                nullable=True,
                description="When a running run that reported progress should end,"
                " estimated when read from its rate and its task's recent successes.",
            ),
            "params": {
                "type": "object",
                "nullable": True,
                "description": "A manual trigger's params (merged over the task's when "
                "it starts); null for other runs.",
            },
        }
    ),
    "Attempt": _obj(
        {
            "id": _int(),
            "run_id": _str(),
            "attempt": _int(),
            "worker": _str(nullable=True),
            "started_at": _str(nullable=True),
            "finished_at": _str(nullable=True),
            "outcome": _str(nullable=True),
            "exit_code": _int(nullable=True),
            "http_status": _int(nullable=True),
            "error": _str(nullable=True),
            "duration_s": _num(nullable=True),
        }
    ),
    "RunDetail": {
        "allOf": [
            _ref("Run"),
            _obj(
                {
                    "attempts": {"type": "array", "items": _ref("Attempt")},
                    "checkpoint": {"nullable": True, "description": "Any JSON value."},
                    "llm": _ref("RunUsage"),
                }
            ),
        ]
    },
    "AgentStep": _obj(
        {
            "run_id": _str(),
            "seq": _int(minimum=1),
            "step": _int(minimum=1),
            "kind": _str(enum=["model", "tool_started", "tool_result"]),
            "call_id": _str(nullable=True),
            "payload": {
                "description": "`model`: the reply (`content`, `tool_calls` [{`id`, "
                "`name`, `arguments`}], `usage`, `model`); `tool_started`: `tool`, "
                "`arguments`; `tool_result`: `tool`, `ok`, `content`, `duration_s`. "
                "Scrubbed of secrets.",
            },
            "recorded_at": _str(),
        }
    ),
    "Transcript": _obj(
        {"run_id": _str(), "steps": {"type": "array", "items": _ref("AgentStep")}},
        extra=False,
    ),
    "RunOutput": _obj(
        {
            "run_id": _str(),
            "stream": _str(enum=list(OUTPUT_STREAMS)),
            "status": _str(enum=list(RUN_STATUSES)),
            "attempt_started_at": _str(nullable=True),
            "progress": {
                **_obj({"done": _int(), "total": _int(), "message": _str()}, extra=False),
                "nullable": True,
            },
            "exists": {"type": "boolean"},
            "offset": _int(minimum=0),
            "next_offset": _int(minimum=0),
            "size": _int(minimum=0),
            "eof": {"type": "boolean"},
            "restarted": {"type": "boolean"},
            "text": _str(),
        },
        extra=False,
    ),
    "RunUsage": _obj(
        {
            "calls": _int(),
            "input_tokens": _int(),
            "output_tokens": _int(),
            "cost_usd": _num(),
        },
        extra=False,
    ),
    "SpendWindow": _obj(
        {
            "scope": _str(description="`<task>:day`, `<task>:month`, `global:day`..."),
            "period": _str(enum=["day", "month"]),
            "start": _str(description="Window start (UTC); the local midnight of `timezone`."),
            "end": _str(),
            "timezone": _str(),
            "calls": _int(),
            "input_tokens": _int(),
            "output_tokens": _int(),
            "spent_usd": _num(),
            "limit_usd": _num(nullable=True),
            "remaining_usd": _num(nullable=True),
        },
        extra=False,
    ),
    "TaskSpend": _obj(
        {
            "task": _str(),
            "day": _ref("SpendWindow"),
            "month": _ref("SpendWindow"),
            "run_budget": _obj(
                {"tokens": _int(nullable=True), "usd": _num(nullable=True)}, extra=False
            ),
        },
        extra=False,
    ),
    "Spend": _obj(
        {
            "tasks": {"type": "array", "items": _ref("TaskSpend")},
            "global": _obj({"day": _ref("SpendWindow"), "month": _ref("SpendWindow")}, extra=False),
        },
        extra=False,
    ),
    "Delivery": _obj(
        {
            "channel": _str(),
            "status": _str(enum=["pending", "delivered", "failed"]),
            "attempts": _int(),
            "last_error": _str(nullable=True),
            "delivered_at": _str(nullable=True),
        },
        extra=False,
    ),
    "Alert": _obj(
        {
            "id": _int(),
            "ts": _str(),
            "kind": _str(enum=list(ALERT_KINDS)),
            "dedup_key": _str(),
            "task_id": _str(nullable=True),
            "run_id": _str(nullable=True),
            "event_id": _int(nullable=True),
            "summary": _str(),
            "data": {"type": "object", "additionalProperties": True},
            "deliveries": {"type": "array", "items": _ref("Delivery")},
        }
    ),
    "AlertList": _obj({"alerts": {"type": "array", "items": _ref("Alert")}}, extra=False),
    "RunList": _obj(
        {
            "runs": {"type": "array", "items": _ref("Run")},
            "next_before": _str(
                nullable=True,
                description="Pass as `before` for the next page; null on the last page.",
            ),
        },
        extra=False,
    ),
    "CancelResult": _obj(
        {"run_id": _str(), "status": _str(enum=["cancelled", "running"])}, extra=False
    ),
    "Event": _obj(
        {
            "id": _int(minimum=1),
            "ts": _str(),
            "kind": _str(enum=[kind.value for kind in EventKind]),
            "task_id": _str(nullable=True),
            "run_id": _str(nullable=True),
            "data": {"type": "object", "additionalProperties": True},
        }
    ),
    "SseEvent": {
        "description": "One server-sent event (what an EventSource client sees); `data` is "
        "the Event as JSON.",
        "type": "object",
        "required": ["id", "event", "data"],
        "properties": {
            "id": _str(pattern="^[0-9]+$"),
            "event": _str(minLength=1),
            "data": _str(description="An `Event` as JSON."),
        },
        "additionalProperties": False,
    },
    "EventList": _obj({"events": {"type": "array", "items": _ref("Event")}}, extra=False),
    "QuarantineEntry": _obj(
        {
            "run_id": _str(),
            "task_id": _str(),
            "quarantined_at": _str(),
            "last_error": _str(nullable=True),
            "attempts": _int(nullable=True),
            "scheduled_for": _str(nullable=True),
            "trigger": _str(nullable=True),
        }
    ),
    "QuarantineRow": _obj(
        {
            "run_id": _str(),
            "task_id": _str(),
            "quarantined_at": _str(),
            "last_error": _str(nullable=True),
            "attempts": _int(nullable=True),
        }
    ),
    "Node": _obj(
        {
            "id": _str(description="The node's lease owner id: host:pid."),
            "host": _str(),
            "pid": _int(),
            "version": _str(),
            "config_generation": _str(description="Digest of the task definitions it runs."),
            "started_at": _str(),
            "last_seen": _str(),
            "stopped_at": _str(nullable=True),
            "alive": {"type": "boolean"},
            "runs_held": _int(),
            "config_differs": {
                "type": "boolean",
                "description": "Alive, with a config generation other than most live nodes'.",
            },
        },
        extra=False,
    ),
    "NodeList": _obj({"nodes": {"type": "array", "items": _ref("Node")}}, extra=False),
    "QuarantineList": _obj(
        {"quarantine": {"type": "array", "items": _ref("QuarantineEntry")}}, extra=False
    ),
    "QuarantineDetail": _obj(
        {"quarantine": _ref("QuarantineRow"), "run": _ref("RunDetail")}, extra=False
    ),
    "ReleaseResult": _obj({"run_id": _str(), "status": _str(enum=["queued"])}, extra=False),
    "DropResult": _obj({"run_id": _str(), "dropped": {"type": "boolean"}}, extra=False),
}


def _probe(summary: str, schema: str, bad: str) -> Schema:
    return {
        "summary": summary,
        "responses": {
            "200": _json(_ref(schema), "OK."),
            "503": _json(_ref(schema), bad),
            **_errors(),
        },
    }


PATHS: dict[str, Schema] = {
    "/healthz": {
        "get": _probe(
            "Liveness: the main loop and scheduler ticked recently. No DB access, no token.",
            "Liveness",
            "A component is stale; `stale` names it.",
        )
    },
    "/readyz": {
        "get": _probe(
            "Readiness: started, not stopping, state DB writable. No token.",
            "Readiness",
            "Not ready; `reason` says why.",
        )
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text exposition format). No token, unless "
            "`daemon.http.metrics_require_token` (then either token).",
            "security": READ_SECURITY,
            "responses": {
                "200": {
                    "description": "Metrics.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                **_errors("401"),
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document (served while starting up, too; either token "
            "when the server has one).",
            "security": READ_SECURITY,
            "responses": {"200": _json(_ref("OpenApi"), "OK."), **_errors("401")},
        }
    },
    "/v1/status": {"get": _get("Daemon status summary.", [], _ref("Status"))},
    "/v1/tasks": {"get": _get("All configured tasks.", [], _ref("TaskList"))},
    "/v1/tasks/{task_id}": {
        "get": _get("One task, with its next 5 fire times.", [TASK_ID], _ref("Task"), "404")
    },
    "/v1/tasks/{task_id}/trigger": {
        "post": _post(
            "Enqueue a manual run now (the task's overlap policy may skip it), with "
            "params and an idempotency key. 409 task_inactive when the task is disabled or "
            "lacks its API key; 409 idempotency_conflict for a key used with other params.",
            [TASK_ID, IDEMPOTENCY_KEY],
            "202",
            "TriggerResult",
            "409",
            body=_optional_body(_ref("TriggerRequest")),
        )
    },
    "/v1/tasks/{task_id}/backfill": {
        "post": _with_response(
            _post(
                "Enqueue each occurrence of the task's schedule in [from, to) as if it had "
                "fired (trigger `backfill`), keyed as that fire is (an instant that ran "
                "already is a `duplicate`), through its overlap policy, pause and budget "
                "gate. 400 for more than 1000 occurrences (none enqueued) or a manual "
                "schedule; 409 task_inactive.",
                [TASK_ID],
                "202",
                "BackfillResult",
                "409",
                body={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("BackfillRequest")}},
                },
            ),
            "200",
            _json(_ref("BackfillResult"), "A dry run: the instants, nothing enqueued."),
        )
    },
    "/v1/tasks/{task_id}/pause": {
        "post": _post(
            "Pause scheduled fires of a task (idempotent: `changed` is false if it was).",
            [TASK_ID],
            "200",
            "PauseResult",
            body=_optional_body(_ref("PauseRequest")),
        )
    },
    "/v1/tasks/{task_id}/resume": {
        "post": _post(
            "Resume a paused task (idempotent: `changed` is false if it was active).",
            [TASK_ID],
            "200",
            "PauseResult",
        )
    },
    "/v1/runs": {
        "get": _get(
            "Runs, newest first, one page at a time.",
            [
                _query("task", _str(), "Only runs of this task."),
                _query("status", _str(enum=list(RUN_STATUSES)), "Only runs with this status."),
                _query(
                    "since",
                    _str(format="date-time"),
                    "Created at or after this moment (ISO 8601 with an offset).",
                ),
                _query(
                    "until",
                    _str(format="date-time"),
                    "Created before this moment (ISO 8601 with an offset).",
                ),
                _query("limit", _int(minimum=1, maximum=1000, default=50), "Page size."),
                _query("before", _str(), "The `next_before` of the previous page."),
            ],
            _ref("RunList"),
            "400",
        )
    },
    "/v1/runs/{run_id}": {
        "get": _get("One run with its attempts and checkpoint.", [RUN_ID], _ref("RunDetail"), "404")
    },
    "/v1/runs/{run_id}/cancel": {
        "post": _post(
            "Cancel a run: a queued one at once, a running one is told to stop.",
            [RUN_ID],
            "202",
            "CancelResult",
            "409",
        )
    },
    "/v1/runs/{run_id}/transcript": {
        "get": _get(
            "An agent run's recorded steps in order (model replies, tool calls started, "
            "their results): empty for a run that recorded none.",
            [RUN_ID],
            _ref("Transcript"),
            "404",
        )
    },
    "/v1/runs/{run_id}/output": {
        "get": _get(
            "A slice of the run's captured stdout or stderr (its workspace's `stdout.log`, "
            "`stderr.log`), from byte `offset`: `text` is the bytes up to `next_offset`, "
            "as UTF-8 (a character cut at the end is left for the next slice while the run "
            "is not final). Ask again from `next_offset` to follow a live run. An `offset` "
            "past the end (a new attempt truncated the file) starts again at 0, "
            "`restarted` true; no file yet is `exists` false. With it, the run's status, "
            "its latest attempt's start and its progress (null until it reports a total).",
            [
                RUN_ID,
                _query(
                    "stream",
                    _str(enum=list(OUTPUT_STREAMS), default="stdout"),
                    "Which output.",
                ),
                _query(
                    "offset",
                    _int(minimum=0, maximum=MAX_OUTPUT_OFFSET, default=0),
                    "The first byte wanted.",
                ),
                _query(
                    "limit",
                    _int(minimum=MIN_PAGE, maximum=OUTPUT_PAGE, default=OUTPUT_PAGE),
                    "At most this many bytes.",
                ),
            ],
            _ref("RunOutput"),
            "400",
            "404",
        )
    },
    "/v1/runs/{run_id}/resume": {
        "post": _post(
            "Queue again a run that ended `budget_exhausted` (after the budget was raised "
            "or its window rolled over): a new attempt that goes on from its checkpoint and, "
            "for an agent, at the step it reached. 409 `not_resumable` for any other status.",
            [RUN_ID],
            "200",
            "ReleaseResult",
            "409",
        )
    },
    "/v1/runs/{run_id}/events": {
        "get": _get(
            "A run's events, oldest first.",
            [RUN_ID, AFTER, EVENTS_LIMIT],
            _ref("EventList"),
            "400",
            "404",
        )
    },
    "/v1/runs/{run_id}/events/stream": {
        "get": _sse(
            "A run's events live, from the start (or the resume point); ends when the run "
            "is final.",
            [RUN_ID, AFTER, LAST_EVENT_ID],
            "404",
            ends=True,
        )
    },
    "/v1/events": {
        "get": _get(
            "All events, oldest first: a page after `after`, or with `tail` the newest ones.",
            [AFTER, EVENTS_LIMIT, EVENTS_TAIL],
            _ref("EventList"),
            "400",
        )
    },
    "/v1/events/stream": {
        "get": _sse(
            "All events live, from now (or the resume point).",
            [AFTER, LAST_EVENT_ID],
        )
    },
    "/v1/spend": {
        "get": _get(
            "LLM spend (USD, tokens, calls) per task for its current day and month, counted "
            "in the task's time zone, and globally, with limits and what remains.",
            [_query("task", _str(), "Only this task.")],
            _ref("Spend"),
            "404",
        )
    },
    "/v1/alerts": {
        "get": _get(
            "Alerts raised, newest first, with their delivery state per channel.",
            [_query("limit", _int(minimum=1, maximum=1000, default=50), "How many.")],
            _ref("AlertList"),
            "400",
        )
    },
    "/v1/nodes": {
        "get": _get(
            "Every daemon that has opened this state, the most recently seen first.",
            [],
            _ref("NodeList"),
        )
    },
    "/v1/approvals": {
        "get": _get(
            "Runs parked for an operator's decision on an agent's tool call (a sensitive "
            "tool, or a call whose outcome is unknown), oldest deadline first.",
            [_query("limit", _int(minimum=1, maximum=1000, default=100), "How many.")],
            _ref("ApprovalList"),
            "400",
        )
    },
    "/v1/approvals/{run_id}/{decision}": {
        "post": _post(
            "Decide on the call a parked run waits on: `approve` runs it, `skip` tells the "
            "model it was skipped (with the note), both queue the run again to resume at "
            "that call; `deny` ends the run `denied`. 409 `not_awaiting_approval` or "
            "`wrong_call`.",
            [
                RUN_ID,
                {
                    "name": "decision",
                    "in": "path",
                    "required": True,
                    "description": "approve, skip or deny.",
                    "schema": _str(enum=list(APPROVAL_DECISIONS)),
                },
            ],
            "200",
            "DecisionResult",
            "409",
            body=_optional_body(_ref("DecisionRequest")),
        )
    },
    "/v1/quarantine": {
        "get": _get("Runs in quarantine, newest first.", [], _ref("QuarantineList"))
    },
    "/v1/quarantine/{run_id}": {
        "get": _get(
            "One quarantined run, with the run itself.", [RUN_ID], _ref("QuarantineDetail"), "404"
        )
    },
    "/v1/quarantine/{run_id}/release": {
        "post": _post(
            "Put a quarantined run back in the queue with a fresh retry budget.",
            [RUN_ID],
            "200",
            "ReleaseResult",
        )
    },
    "/v1/quarantine/{run_id}/drop": {
        "post": _post(
            "Acknowledge and forget a quarantined run: it leaves quarantine with the status "
            "`dropped`, kept as history.",
            [RUN_ID],
            "200",
            "DropResult",
        )
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the whole document (callers may not share nested dicts)."""
    return copy.deepcopy(
        {
            "openapi": "3.0.3",
            "info": {
                "title": "agentd",
                "version": "1",
                "description": "Operate agentd: tasks, runs, events, quarantine. Errors are "
                'always `{"error": <stable code>, "message": ...}`. When the daemon has a '
                "token, every request but `/healthz` and `/readyz` (and `/metrics` unless "
                "`metrics_require_token`) needs `Authorization: Bearer <token>`: the full "
                "token for anything, or the read token for GET and HEAD.",
            },
            "paths": PATHS,
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The full-access token (`token_env`/`token_file`).",
                    },
                    "readToken": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The read token (`read_token_env`/`read_token_file`): "
                        "GET and HEAD only.",
                    },
                },
            },
        }
    )
