"""The validated, immutable configuration of agentd.

YAML goes in, a frozen pydantic model comes out, or a ``ConfigError`` that lists
*every* problem with the file name and a dotted path (``tasks.nightly.schedule.cron``)
so an operator fixes the file in one pass instead of one error per restart.

Secrets never live in this model: tasks name the environment variable or file that
holds a key (``api_key_env``), and executors read it at the moment of use.
``${VAR}`` interpolation is for plain values (ports, paths, URLs); it happens before
validation so an error still points at the right path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
import urllib.parse
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agentd import examplemodel, yamlload
from agentd.backfill import shortest_gap_s as shortest_fire_gap_s
from agentd.redact import SecretRef
from agentd.schedule import (
    CronError,
    CronNeverFires,
    ScheduleSpec,
    parse_cron,
    parse_duration,
    shortest_gap_s,
)

TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SECRET_KEY_RE = re.compile(r"(key|token|secret|password|passwd|authorization|cookie)", re.I)
_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


MAX_DURATION_S = 36525 * 86400.0
"""Every duration is at most 100 years (of 365.25 days): beyond any real timeout or
interval, and well inside what ``timedelta``, datetimes near today, asyncio timers and
thread waits hold (``1e300`` seconds overflow each of them)."""
MAX_JITTER_FIRES = 1000
"""A schedule's ``jitter`` spans at most this many of its fires: each next fire time is
chosen among the nominal times within one jitter, so its cost grows with their number."""
INT_MAX = 2**53
"""The largest count a config may hold (tokens, bytes, failures): exact as a float and
within SQLite's INTEGER, so budget arithmetic and the ledger never overflow."""
MAX_FILE_BYTES = 64 << 20
"""A config file larger than this is not read (10,000 tasks take 1 to 5 MiB)."""


def _duration(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (str, int, float)):
        seconds = (
            math.inf
            if isinstance(value, int) and value > MAX_DURATION_S  # may not fit a float
            else parse_duration(value)
        )
        if seconds > MAX_DURATION_S:
            raise ValueError(
                f"invalid duration {_clip(value)}: must be at most 100 years "
                f"({MAX_DURATION_S:,.0f} s)"
            )
        return seconds
    return value


def _clip(value: object, width: int = 40) -> str:
    """``repr(value)``, cut short for a message (a 400-digit number, a 300-character name)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
    return text if len(text) <= width else text[: width - 5] + "...'"


Duration = Annotated[float, BeforeValidator(_duration)]
"""Seconds; accepts ``30s``, ``5m``, ``1h30m``, ``500ms`` or a bare number of seconds;
finite, not negative, at most ``MAX_DURATION_S``."""


def _check_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"URL must start with http:// or https:// (got {value!r})")
    return value


def _check_timezone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except Exception:  # not found, a bad key, a tzdata directory, a name too long for a path
        raise ValueError(f"unknown IANA time zone {_clip(name, 70)}") from None
    return name


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


_M = TypeVar("_M", bound=_Model)


def _shared(cls: type[_M]) -> Callable[[], _M]:
    """One default instance for every task that leaves the section out. The models are
    frozen, so sharing is safe; pydantic would otherwise build (or deep-copy) one per
    task, which for 10,000 tasks is megabytes of identical objects."""
    instance = cls()
    return lambda: instance


class HttpServerConfig(_Model):
    """The HTTP listener. ``token_*`` is the full-access token (reads and writes),
    ``read_token_*`` one that may only read (GET/HEAD, the event streams); with a token
    configured every request but the probes (and ``/metrics`` unless
    ``metrics_require_token``) needs one of them. A read token alone is an error: it
    would guard the reads and leave the writes open."""

    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    token_env: str | None = None
    token_file: Path | None = None
    read_token_env: str | None = None
    read_token_file: Path | None = None
    allow_insecure_bind: bool = False
    metrics_require_token: bool = False
    """``/metrics`` needs a token (read or full) like the API; the probes never do."""
    client_timeout: Duration = Field(default=10.0, gt=0, le=3600)
    """A client has this long to send a request's line and headers (from connecting, or
    from the end of its previous response: an idle keep-alive connection is closed then
    too), this long more for a body, and this long for each write to an event stream it
    has stopped reading."""
    max_connections: int = Field(default=256, ge=2, le=65536)
    """Open connections at most. Past it a new connection evicts the oldest one that is
    waiting for a request (idle or half-sent), else it is answered 503 and closed."""
    max_streams: int = Field(default=64, ge=1, le=65535)
    """Open event streams at most (both kinds together); past it a stream request gets
    503 ``too_many_streams`` with ``Retry-After``. Below ``max_connections``, so streams
    never take every connection."""
    probe_port: int | None = Field(default=None, ge=0, le=65535)
    """A second listener on ``host`` that answers only ``/healthz`` and ``/readyz``, from
    its own thread and event loop (``agentd.probes``): point kubelet here, and the probes
    answer in a few ms however busy the daemon is (the main port's probes wait behind
    the daemon's work). The same answers as the main port's; no token, no other path.
    0 picks a free port (logged); unset, there is no second listener."""
    console: bool = True
    """The web console at ``/ui`` (``agentd.console``), behind the same tokens as the API;
    ``false`` leaves ``/ui`` unrouted (404)."""

    @model_validator(mode="after")
    def _tokens_and_limits(self) -> HttpServerConfig:
        has_read = self.read_token_env is not None or self.read_token_file is not None
        if has_read and self.token_env is None and self.token_file is None:
            raise ValueError(
                "read_token_env/read_token_file need token_env or token_file too: a read "
                "token alone would guard the reads and leave every write open"
            )
        if self.metrics_require_token and self.token_env is None and self.token_file is None:
            raise ValueError(
                "metrics_require_token needs token_env or token_file: there is no token to require"
            )
        if self.probe_port is not None and self.probe_port != 0 and self.probe_port == self.port:
            raise ValueError(
                f"probe_port ({self.probe_port}) must differ from port: it is a second listener"
            )
        if self.max_streams >= self.max_connections:
            raise ValueError(
                f"max_streams ({self.max_streams}) must be below max_connections "
                f"({self.max_connections}): streams may not take every connection"
            )
        return self


class HeartbeatConfig(_Model):
    """The daemon's own dead man's switch: a request to ``url`` every ``every`` while
    /healthz would answer ok (``health.Health.liveness``), so an external monitor
    (Healthchecks.io) notices a dead or wedged host. A failed ping is logged (rate
    limited) and never stops the daemon; the URL's path and query (where the check's
    secret lives) are never logged."""

    url: str
    every: Duration = Field(default=60.0, gt=0)
    method: Literal["GET", "POST", "HEAD"] = "GET"
    timeout: Duration = Field(default=10.0, gt=0)

    _url = field_validator("url")(_check_url)


class DaemonConfig(_Model):
    state_dir: Path = Path("./var")
    timezone: str = "UTC"
    concurrency: int = Field(default=4, ge=1, le=256)
    shutdown_grace: Duration = 30.0
    kill_grace: Duration = 5.0
    lease: Duration = Field(default=30.0, gt=0)
    poll_interval: Duration = Field(default=0.25, gt=0, le=5)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "text", "json"] = "auto"
    """``auto``: JSON lines under Kubernetes when stderr is not a terminal, else text
    (see ``agentd.logformat``)."""
    output_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=INT_MAX)
    liveness_stale_after: Duration = Field(default=30.0, gt=0)
    """/healthz turns 503 when the main loop or scheduler has not ticked for this long."""
    python_path: list[Path] = []
    """Directories searched for ``python:`` callables; relative ones are taken from the
    config file's directory."""
    http: HttpServerConfig = Field(default_factory=HttpServerConfig)
    heartbeat: HeartbeatConfig | None = None

    _tz = field_validator("timezone")(_check_timezone)


class StateConfig(_Model):
    """Where agentd keeps its state (runs, attempts, events, checkpoints, budgets, the
    quarantine). Without ``url``: the embedded SQLite engine, one file in
    ``daemon.state_dir``, for one node. With a ``postgresql://`` URL: the PostgreSQL
    engine, which every node pointed at the same database shares. The password comes
    from ``password_env`` or ``password_file``, never from the URL (it would sit in the
    config file, in ``agentd config`` output and in logs)."""

    url: str | None = None
    password_env: str | None = None
    password_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"must be a postgresql:// URL (got scheme {parts.scheme or 'none'!r}); "
                "leave url out for the embedded SQLite state in daemon.state_dir"
            )
        if parts.password is not None:
            raise ValueError(
                "holds a password: put it in the variable password_env names or the file "
                "password_file names, and leave it out of the URL"
            )
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("names no host (postgresql://user@host/db)")
        return value

    @model_validator(mode="after")
    def _password_needs_url(self) -> StateConfig:
        if self.url is None and (self.password_env or self.password_file):
            raise ValueError("password_env/password_file need url: SQLite takes no password")
        if self.password_env and self.password_file:
            raise ValueError("password_env and password_file: name one of them")
        return self

    @property
    def engine(self) -> Literal["sqlite", "postgres"]:
        return "sqlite" if self.url is None else "postgres"


class ScheduleConfig(_Model):
    """Exactly one of ``cron``, ``every``, ``at`` or ``manual: true``."""

    cron: str | None = None
    every: Duration | None = None
    at: datetime | None = None
    manual: bool = False
    timezone: str | None = None
    jitter: Duration = 0.0
    start_at: datetime | None = None
    end_at: datetime | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_cron(value)
            except CronNeverFires as exc:
                raise ValueError(str(exc)) from None
            except CronError as exc:
                raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError("interval must be at least 1s")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return None if value is None else _check_timezone(value)

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, value: float, info: ValidationInfo) -> float:
        """Validated after ``cron`` and ``every`` (field order), so they are in ``info``."""
        if value <= MAX_JITTER_FIRES:  # within the bound for any schedule (every >= 1s)
            return value
        every, cron = info.data.get("every"), info.data.get("cron")
        spacing = every if every is not None else cron and shortest_gap_s(parse_cron(cron))
        if spacing and value > MAX_JITTER_FIRES * spacing:
            raise ValueError(
                f"jitter {value:g}s spans more than {MAX_JITTER_FIRES:,} fires of this "
                f"schedule (they can be {spacing:g}s apart): at most "
                f"{MAX_JITTER_FIRES * spacing:g}s here"
            )
        return value

    @field_validator("at", "start_at", "end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("datetime needs a UTC offset, e.g. 2026-01-01T09:00:00+01:00")
        if value is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(
                    "datetime must lie within 0001-01-01 and 9999-12-31 in UTC"
                ) from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleConfig:
        given = [
            name
            for name, present in (
                ("cron", self.cron is not None),
                ("every", self.every is not None),
                ("at", self.at is not None),
                ("manual", self.manual),
            )
            if present
        ]
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of cron, every, at, manual: true (got {what})")
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        return self

    @property
    def kind(self) -> Literal["cron", "interval", "once", "manual"]:
        if self.cron is not None:
            return "cron"
        if self.every is not None:
            return "interval"
        if self.at is not None:
            return "once"
        return "manual"

    def describe(self) -> str:
        if self.cron is not None:
            return self.cron
        if self.every is not None:
            return f"every {self.every:g}s"
        if self.at is not None:
            return f"at {self.at.isoformat()}"
        return "manual"

    def spec(self, default_tz: str) -> ScheduleSpec:
        return ScheduleSpec(
            kind=self.kind,
            cron=self.cron,
            timezone=self.timezone or default_tz,
            every_s=self.every,
            at=self.at,
            jitter_s=self.jitter,
            start_at=self.start_at,
            end_at=self.end_at,
        )


class RetryConfig(_Model):
    """Retries wait in the queue (``not_before``), never in a sleeping coroutine."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff: Duration = Field(default=10.0, ge=0)
    max_backoff: Duration = Field(default=600.0, ge=0)
    on_timeout: bool = True
    exit_codes: list[int] | None = None
    """Exit codes that retry; ``None`` means any failing exit code."""
    http_statuses: list[int] = [408, 425, 429, 500, 502, 503, 504]


class CommandConfig(_Model):
    argv: list[str] | None = None
    shell: str | None = None
    cwd: Path | None = None
    env: dict[str, str] = {}
    inherit_env: bool = True
    success_exit_codes: list[int] = [0]

    @model_validator(mode="after")
    def _one(self) -> CommandConfig:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("give exactly one of argv (a list) or shell (a string)")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        return self


class HttpCallConfig(_Model):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str
    headers: dict[str, str] = {}
    body: str | None = None
    json_body: Any = Field(default=None, alias="json")
    expect_status: list[int] | None = None
    """Statuses that count as success; ``None`` means any 2xx."""
    timeout: Duration = 30.0

    _url = field_validator("url")(_check_url)


class PythonConfig(_Model):
    callable: str
    provider: str | None = None
    """Default provider of ``ctx.llm``; may be left out when only one is declared."""
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT_MAX)

    @field_validator("callable")
    @classmethod
    def _ref(cls, value: str) -> str:
        if not CALLABLE_RE.match(value):
            raise ValueError(f"expected 'package.module:function', got {value!r}")
        return value


TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What OpenAI-compatible APIs accept as a function's name."""


def template_fields(template: str) -> list[str]:
    """The ``{name}`` placeholders of a tool's template, in order; ValueError for anything
    else ``str.format`` would do with them (``{a.b}``, ``{a[0]}``, ``{a!r}``, ``{a:>9}``,
    ``{}``): a template only ever puts one argument's value in one place."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {_clip(template)}: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conversion:
            raise ValueError(
                f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} in {_clip(template)}: only {{name}} of an"
                " argument is allowed"
            )
        fields.append(name)
    return fields


class ToolCommandConfig(_Model):
    """A tool that runs a program. Every ``argv`` item and ``env`` value is a template
    whose ``{name}`` placeholders become the call's arguments; each item stays one argv
    item and no shell ever reads it, so an argument cannot inject a word or a command."""

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = {}
    cwd: Path | None = None
    """Default: the run's workspace."""

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        for item in value:
            template_fields(item)
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{_clip(name)} is not an environment variable name")
            template_fields(item)
        return value


class ToolHttpConfig(_Model):
    """A tool that makes one HTTP request. ``url`` is a template (each value
    percent-encoded where it goes in); the URL it gives must name a host in
    ``allow_hosts``, checked at every call. POST, PUT and PATCH send the arguments as the
    JSON body."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str
    allow_hosts: list[str] = Field(min_length=1)
    """Host names (case does not matter), exactly as in the URL; no wildcards."""
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _check_url(value)
        template_fields(value)
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", host):
                raise ValueError(f"{_clip(host)} is not a host name (no scheme, port or path)")
        return [h.lower().strip("[]") for h in value]

    @model_validator(mode="after")
    def _fixed_host(self) -> ToolHttpConfig:
        netloc = urllib.parse.urlsplit(self.url).netloc
        if "{" not in netloc:
            host = (urllib.parse.urlsplit(self.url).hostname or "").lower()
            if host not in self.allow_hosts:
                raise ValueError(f"the URL's host {host!r} is not in allow_hosts")
        return self


class ToolPythonConfig(_Model):
    callable: str
    """``package.module:function(ctx, arguments)``, sync (run in a thread) or async; its
    return value (a string, or anything JSON can encode) is what the model reads."""

    @field_validator("callable")
    @classmethod
    def _ref(cls, value: str) -> str:
        if not CALLABLE_RE.match(value):
            raise ValueError(f"expected 'package.module:function', got {value!r}")
        return value


def _object_schema(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` if it is a JSON schema (Draft 2020-12) of an object; ValueError naming
    where in it the problem is otherwise."""
    import jsonschema  # only a config with tools or a response_format pays for its import

    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "top"
        raise ValueError(f"not a JSON schema ({where}): {exc.message}") from None
    if value.get("type") != "object":
        raise ValueError('must describe an object: "type": "object"')
    return value


def params_problem(schema: dict[str, Any], params: dict[str, Any]) -> str | None:
    """Why ``params`` do not match ``schema`` (a task's ``params_schema``): the first
    error's place and message, or None when they match. The message may quote a value
    given, so it is for the one who gave it (an API answer), not for a log line."""
    import jsonschema

    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(params)
    )
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "top"
    return f"{where}: {error.message}"


class ResponseFormatConfig(_Model):
    """Structured final output: the answer must be JSON that matches ``schema``.

    Sent as the OpenAI ``response_format`` (``{"type": "json_schema", "json_schema":
    {name, schema, strict}}``) and checked by agentd (Draft 2020-12) whatever the
    provider did with it: an answer that is not such JSON is an ``invalid_output``
    error, retried per the task's ``retry`` policy. A valid one is written as
    ``result.json`` beside ``result.md`` and is the run's result detail (``output``)."""

    name: str
    """The schema's name, as OpenAI-compatible APIs accept it (like a tool's)."""
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    """A JSON schema of an object (OpenAI asks an object at the top)."""
    strict: bool = True
    """Ask the provider to hold the model to the schema (OpenAI's strict mode, which
    supports a subset of JSON schema: every property required, no additional ones)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME_RE.match(value):
            raise ValueError(f"name {_clip(value)} must be 1-64 of A-Z a-z 0-9 _ -")
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _object_schema(value)

    def wire(self) -> dict[str, Any]:
        """As the request's ``response_format`` carries it."""
        spec: dict[str, Any] = {"name": self.name, "schema": self.json_schema}
        spec["strict"] = self.strict
        if self.description:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}


class ToolMcpConfig(_Model):
    """A tool an MCP server lists (``agent.mcp``). Never written in a config: the tool
    loop builds one per allowed tool when it has started the server, with the server's
    input schema as ``parameters``."""

    server: str
    tool: str
    """The name the server lists it under (the model sees ``<server>__<tool>``)."""


def mcp_tool_name(server: str, tool: str) -> str:
    """What the model calls an MCP server's tool: ``files__read_file``."""
    return f"{server}__{tool}"


class McpServerConfig(_Model):
    """An MCP server over stdio that the tool loop starts at each attempt's start and
    stops at its end (``agentd.executors.mcptools``). Only the tools in ``allow`` are
    offered to the model or callable; each is ``<name>__<tool>`` to the model, with the
    input schema the server lists for it, and is like any other tool to the loop
    (``idempotent``, ``sensitive``, ``timeout``)."""

    name: str
    """The prefix of its tools' names; unique among the agent's servers."""
    command: list[str] = Field(min_length=1)
    """argv; no shell ever reads it."""
    env: dict[str, str] = {}
    """Added to what a command tool's process gets (the daemon's environment without its
    secrets, ``AGENTD_RUN_ID`` ...)."""
    allow: list[str] = Field(min_length=1)
    """The server's tool names the model may call; one the server does not list fails
    the run."""
    idempotent: list[str] = []
    """Of ``allow``: safe to call again after a crash in the middle of a call."""
    sensitive: list[str] = []
    """Of ``allow``: need an operator's approval before each call (as a tool's
    ``sensitive: true``; the agent's ``sensitive_tools`` patterns match them too, by
    their ``<name>__<tool>`` names)."""
    timeout: Duration = Field(default=60.0, gt=0)
    """Per call."""
    start_timeout: Duration = Field(default=10.0, gt=0)
    """To start, hand-shake and list its tools."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", value):
            raise ValueError(f"server name {_clip(value)} must be 1-32 of A-Z a-z 0-9 _ -")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{_clip(name)} is not an environment variable name")
        return value

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: list[str], info: ValidationInfo) -> list[str]:
        server = info.data.get("name") or "x"
        for tool in value:
            if not TOOL_NAME_RE.match(mcp_tool_name(server, tool)):
                raise ValueError(
                    f"{_clip(mcp_tool_name(server, tool))} is not a tool name the model"
                    " accepts (1-64 of A-Z a-z 0-9 _ -, the server's name and __ included)"
                )
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"names must be unique ({', '.join(twice)} twice)")
        return value

    @field_validator("idempotent", "sensitive")
    @classmethod
    def _of_allow(cls, value: list[str], info: ValidationInfo) -> list[str]:
        allowed = info.data.get("allow")
        if allowed is not None:
            unknown = [t for t in value if t not in allowed]
            if unknown:
                raise ValueError(f"{unknown} not in allow (have: {', '.join(allowed)})")
        return value


class ToolConfig(_Model):
    """One tool the model may call. ``parameters`` is the JSON schema of its arguments,
    shown to the model and checked at every call (a call that does not match it is
    answered as a tool error, never run)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout: Duration = Field(default=60.0, gt=0)
    idempotent: bool = False
    """Safe to run again with the same arguments: after a crash in the middle of a call
    it is run again (with the same ``Idempotency-Key``); any other tool's unknown call
    is never repeated."""
    sensitive: bool = False
    """Needs an operator's approval before each call: the run parks
    (``awaiting_approval``) at the call until ``agentd approve`` / ``deny``, or until the
    agent's ``approval_timeout`` denies it; a manual run triggered with
    ``--approve-sensitive`` is approved in advance."""
    command: ToolCommandConfig | None = None
    http: ToolHttpConfig | None = None
    python: ToolPythonConfig | None = None
    mcp: ToolMcpConfig | None = None
    """Built by the tool loop from ``agent.mcp``; refused in ``agent.tools``."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME_RE.match(value):
            raise ValueError(f"tool name {_clip(value)} must be 1-64 of A-Z a-z 0-9 _ -")
        return value

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _object_schema(value)

    @model_validator(mode="after")
    def _one_kind(self) -> ToolConfig:
        kinds = [k for k in ("command", "http", "python", "mcp") if getattr(self, k) is not None]
        if len(kinds) != 1:
            what = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"give exactly one of command, http, python (got {what})")
        return self

    @property
    def kind(self) -> Literal["command", "http", "python", "mcp"]:
        if self.command is not None:
            return "command"
        if self.mcp is not None:
            return "mcp"
        return "http" if self.http is not None else "python"

    def templates(self) -> list[tuple[str, str]]:
        """(where, template) of every template: ``command.argv[0]``, ``http.url``, ..."""
        if self.command is not None:
            out = [(f"command.argv[{i}]", t) for i, t in enumerate(self.command.argv)]
            return out + [(f"command.env.{k}", t) for k, t in self.command.env.items()]
        return [("http.url", self.http.url)] if self.http is not None else []


def _tool_problems(at: str, tools: list[ToolConfig]) -> list[ConfigProblem]:
    """A placeholder must name a property of the tool's ``parameters``: a typo would
    otherwise fail at the first call, in the middle of an unattended run."""
    problems: list[ConfigProblem] = []
    for index, tool in enumerate(tools):
        names = set((tool.parameters.get("properties") or {}).keys())
        for where, template in tool.templates():
            unknown = [f for f in template_fields(template) if f not in names]
            if unknown:
                have = ", ".join(sorted(names)) or "none"
                message = f"placeholder(s) {unknown} name no property of parameters (have: {have})"
                problems.append(ConfigProblem(f"{at}.agent.tools[{index}].{where}", message))
    return problems


class AgentConfig(_Model):
    """One chat-completions step. ``provider`` names an entry of ``providers:``; without
    it, ``base_url`` and ``api_key_env``/``api_key_file`` describe an unnamed provider
    (no prices, so no USD budget). ``parse_config`` copies a named provider's URL and key
    source in here, so a resolved task carries everything its executor needs."""

    provider: str | None = None
    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    """Empty means the provider's ``default_model``."""
    api_key_env: str | None = None
    api_key_file: Path | None = None
    system: str | None = None
    prompt: str
    items: list[Any] | None = None
    items_concurrency: int | None = Field(default=None, ge=1, le=64)
    """With ``items``: how many items' calls are in flight at once within the run
    (default 1, in order). Each call is reserved against the budgets before it leaves,
    so a budget holds at any concurrency; the checkpoint is the set of items done, so
    a restarted run asks again only the items that were in flight (at most this many)."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=INT_MAX)
    """Output cap per call, sent to the provider and reserved against budgets."""
    request_timeout: Duration | None = Field(default=None, gt=0)
    """Read timeout per call; ``None`` means the provider's ``read_timeout``."""
    tools: list[ToolConfig] | None = None
    """Tools the model may call: the run is then a loop of model calls and tool calls
    (``agentd.executors.toolloop``) until the model answers without one."""
    mcp: list[McpServerConfig] | None = None
    """MCP servers over stdio whose allowed tools the model may call, besides ``tools``
    (or instead of them: either makes the run a tool loop)."""
    max_steps: int = Field(default=8, ge=1, le=1000)
    """With ``tools`` or ``mcp``: model calls per run at most; one more would be a
    failure."""
    sensitive_tools: list[str] = []
    """With ``tools`` or ``mcp``: names (or shell-style patterns, ``delete_*``) of tools that need
    an approval as if marked ``sensitive``. ``parse_config`` adds the daemon-wide
    ``limits.sensitive_tools`` to every agent's list."""
    approval_timeout: Duration = Field(default=86400.0, gt=0)
    """How long a run parked for an approval waits; then it ends ``denied``."""
    response_format: ResponseFormatConfig | None = None
    """The answer (each item's, with ``items``) must be JSON matching this schema."""

    @model_validator(mode="after")
    def _key(self) -> AgentConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    @model_validator(mode="after")
    def _items_concurrency(self) -> AgentConfig:
        if self.items_concurrency is not None and self.items is None:
            raise ValueError("items_concurrency needs items (it is how many run at once)")
        return self

    @model_validator(mode="after")
    def _tools(self) -> AgentConfig:
        if self.tools is None and self.mcp is None:
            return self
        if self.items is not None:
            which = "tools" if self.tools is not None else "mcp"
            raise ValueError(f"give {which} or items, not both")
        if self.tools is not None and not self.tools:
            raise ValueError("tools: give at least one tool (or leave tools out)")
        if self.mcp is not None and not self.mcp:
            raise ValueError("mcp: give at least one server (or leave mcp out)")
        built = [t.name for t in self.tools or [] if t.mcp is not None]
        if built:
            raise ValueError(f"tools: {', '.join(built)}: an MCP server's tools come from mcp:")
        servers = [s.name for s in self.mcp or []]
        twice = sorted({n for n in servers if servers.count(n) > 1})
        if twice:
            raise ValueError(f"mcp: server names must be unique ({', '.join(twice)} twice)")
        names = [t.name for t in self.tools or []]
        names += [mcp_tool_name(s.name, t) for s in self.mcp or [] for t in s.allow]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"tools: names must be unique, MCP servers' tools included ({', '.join(twice)}"
                " twice)"
            )
        return self


class PriceConfig(_Model):
    """USD per million tokens."""

    input: float = Field(ge=0, allow_inf_nan=False)
    output: float = Field(ge=0, allow_inf_nan=False)


class ProviderConfig(_Model):
    """An OpenAI-compatible endpoint, declared once and named by tasks."""

    base_url: str
    api_key_env: str | None = None
    api_key_file: Path | None = None
    default_model: str | None = None
    connect_timeout: Duration = Field(default=10.0, gt=0)
    read_timeout: Duration = Field(default=120.0, gt=0)
    max_tokens: int = Field(default=1024, ge=1, le=INT_MAX)
    """Output cap for calls that set none: every call is bounded, so it can be reserved."""
    prices: dict[str, PriceConfig] = {}

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        """http(s), or ``builtin:example``: the example model (``agentd.examplemodel``),
        a deterministic stand-in answered in-process, for offline examples."""
        return value if value == examplemodel.URL else _check_url(value)

    @model_validator(mode="after")
    def _key(self) -> ProviderConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self


class RunBudget(_Model):
    tokens: int | None = Field(default=None, ge=1, le=INT_MAX)
    """Input plus output tokens over all attempts of one run."""
    usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class TaskBudget(_Model):
    usd_per_day: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    usd_per_month: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Calendar day and month in the task's time zone."""


class BudgetConfig(_Model):
    run: RunBudget = Field(default_factory=_shared(RunBudget))
    task: TaskBudget = Field(default_factory=_shared(TaskBudget))


class LimitsConfig(_Model):
    """The system cap over all tasks; no task's own budget may ask for more."""

    usd_per_day: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    usd_per_month: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    timezone: str | None = None
    """Where the global day starts; default ``daemon.timezone``."""
    sensitive_tools: list[str] = []
    """Tool names (or shell-style patterns) that need an operator's approval in every
    agent, as if marked ``sensitive``: a daemon-wide guard (``rm_*``, ``*_deploy``)."""
    trigger_key_window: Duration = Field(default=86400.0, gt=0)
    """How long a manual trigger's ``Idempotency-Key`` holds: within this of the run it
    made, the same key (on the same task) answers with that run and makes none (a
    different body under it is refused, 409); after it, the key is free again and a
    trigger with it makes a new run (the old run keeps its history)."""

    min_interval: Duration | None = Field(default=None, gt=0)
    """A floor under every repeating schedule: a task whose cron or interval can fire
    twice within this (its jitter and DST transitions included) is a config error
    naming its schedule (``agentd.backfill.shortest_gap_s``)."""
    max_tasks: int | None = Field(default=None, ge=1, le=INT_MAX)
    """At most this many tasks in the config (a config error naming the count)."""
    max_run_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """A system cap on one run's spend: a task's ``budget.run.usd`` above it is a config
    error; a task without one gets this as its run cap at call time
    (``budget.call_scopes``)."""

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return None if value is None else _check_timezone(value)


class ExpectConfig(_Model):
    """Dead man's switch: a success at least every ``every``, with ``grace`` to spare."""

    every: Duration = Field(gt=0)
    grace: Duration = Field(default=0.0, ge=0)


class PingConfig(_Model):
    """Outbound pings for an external dead-man monitor. With only ``url`` the
    Healthchecks.io convention applies: ``url/start``, ``url``, ``url/<exit status>``
    (``url/fail`` when there is none). Explicit URLs may use ``{exit_code}``."""

    url: str | None = None
    start_url: str | None = None
    success_url: str | None = None
    fail_url: str | None = None
    start: bool = True
    timeout: Duration = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _urls(self) -> PingConfig:
        for name in ("url", "start_url", "success_url", "fail_url"):
            value = getattr(self, name)
            if value is not None and not re.match(r"^https?://[^/\s]+", value):
                raise ValueError(f"{name} must start with http:// or https:// (got {value!r})")
        if not (self.url or self.success_url or self.fail_url or self.start_url):
            raise ValueError("give url, or one of start_url, success_url, fail_url")
        return self

    def target(self, phase: str, exit_code: int | None) -> str | None:
        base = self.url.rstrip("/") if self.url else None
        if phase == "start":
            if not self.start:
                return None
            return self.start_url or (f"{base}/start" if base else None)
        if phase == "success":
            return self.success_url or base
        code = "fail" if exit_code is None else str(exit_code)
        if self.fail_url:
            return self.fail_url.replace("{exit_code}", code)
        return f"{base}/{code}" if base else None


NOTIFY_ON = ("success", "failure", "quarantine")


class NotifyConfig(_Model):
    """Completion notices of one task, routed by the alert rules like any alert:
    ``success`` raises ``run_succeeded`` when a run succeeds, ``failure`` raises
    ``run_failed`` for each failed (or timed-out) attempt, retried or not, and
    ``quarantine`` raises ``run_failed`` (``final: true``) when the run ends in
    quarantine. Each carries the run's summary (duration, attempt, error head, LLM
    cost) and its API resource (``/v1/runs/{id}``). YAML 1.1 reads a bare ``on`` key as
    ``true``; that is taken as ``on`` too."""

    on: list[Literal["success", "failure", "quarantine"]] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: Any) -> Any:
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if k is True else k): v for k, v in value.items()}
        return value


class AdmissionConfig(_Model):
    """Cost-aware admission of a task's scheduled fires (``agentd.admission``): the
    cost of a run is predicted from the task's own history (``estimate``, the p50 or
    p95 USD of its last ``history`` finished runs, once it has at least ``min_runs``),
    and a fire whose prediction does not fit the remaining USD of a window the task is
    under (its day/month, the global day/month) is ``defer``red to the start of the
    window that frees it, ``skip``ped with the reason, or ``run`` anyway (today's
    behaviour, only explained). A catch-up after downtime runs only as many missed
    fires as fit; with ``defer`` or ``skip`` the others are skipped."""

    on_budget: Literal["defer", "skip", "run"] = "run"
    estimate: Literal["p50", "p95"] = "p95"
    history: int = Field(default=20, ge=1, le=1000)
    """How many of the task's newest finished runs the prediction is made from."""
    min_runs: int = Field(default=3, ge=1, le=1000)
    """Fewer finished runs than this: no prediction (the fire runs, and says why)."""


ALERT_KINDS = (
    "run_succeeded",
    "run_failed",
    "run_quarantined",
    "run_expired",
    "run_timed_out",
    "task_paused",
    "budget_alarm",
    "budget_exhausted",
    "approval_needed",
    "deadman",
    "run_too_long",
    "config_reload_failed",
    "recovered",
    "budget_burn",
)


class WebhookChannel(_Model):
    """JSON POST; with a secret, ``X-Agentd-Signature: sha256=<HMAC-SHA256 of the body>``."""

    url: str
    secret_env: str | None = None
    secret_file: Path | None = None
    headers: dict[str, str] = {}
    timeout: Duration = Field(default=10.0, gt=0)

    _url = field_validator("url")(_check_url)

    @model_validator(mode="after")
    def _secret(self) -> WebhookChannel:
        if self.secret_env and self.secret_file:
            raise ValueError("give secret_env or secret_file, not both")
        return self


class CommandChannel(_Model):
    """Runs ``argv`` with the alert as JSON on stdin; exit status 0 means delivered."""

    argv: list[str] = Field(min_length=1)
    timeout: Duration = Field(default=30.0, gt=0)


class LogChannel(_Model):
    level: Literal["info", "warning", "error"] = "warning"


class ChannelConfig(_Model):
    webhook: WebhookChannel | None = None
    command: CommandChannel | None = None
    log: LogChannel | None = None
    retries: int = Field(default=5, ge=0, le=100)
    """Further attempts after a failed delivery, with exponential backoff."""
    backoff: Duration = Field(default=10.0, ge=0)
    max_backoff: Duration = Field(default=3600.0, ge=0)

    @model_validator(mode="after")
    def _one(self) -> ChannelConfig:
        kinds = [k for k in ("webhook", "command", "log") if getattr(self, k) is not None]
        if len(kinds) != 1:
            what = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"give exactly one of webhook, command, log (got {what})")
        return self

    @property
    def kind(self) -> Literal["webhook", "command", "log"]:
        if self.webhook is not None:
            return "webhook"
        return "command" if self.command is not None else "log"


class AlertRule(_Model):
    events: list[str] = Field(min_length=1)
    """Alert kinds (see ``ALERT_KINDS``) or ``"*"`` for all."""
    channels: list[str] = Field(min_length=1)
    tasks: list[str] | None = None
    """Only alerts about these tasks (alerts about no task always match)."""
    cooldown: Duration | None = Field(default=None, ge=0)
    repeat_every: Duration | None = Field(default=None, gt=0)
    """While the condition lasts, send the alert again this often: a task late by its
    dead man's switch (``deadman``) until its next success, a task whose last run was
    quarantined (``run_quarantined``) until its next success. Other kinds are one-off
    and never repeat."""

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        bad = [e for e in value if e != "*" and e not in ALERT_KINDS]
        if bad:
            raise ValueError(f"unknown event(s) {bad}; known: {', '.join(ALERT_KINDS)}, *")
        return value


class AlertsConfig(_Model):
    cooldown: Duration = Field(default=3600.0, ge=0)
    """The same condition (dedup key) alerts a channel at most once per cooldown."""
    channels: dict[str, ChannelConfig] = {}
    rules: list[AlertRule] = []


LEDGER_FLOOR_S = 32 * 86400.0
"""The shortest ``history.keep_ledger``: a budget month in any zone began less than 32
days ago, and its spend (and its alarms) must still be there to be counted."""


def _keep(value: Any) -> Any:
    """``forever`` (or null) keeps everything; anything else is a duration."""
    if isinstance(value, str) and value.strip().lower() == "forever":
        return None
    return _duration(value)


def _cap(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() == "forever" else value


Keep = Annotated[float | None, BeforeValidator(_keep)]
"""Seconds of history to keep, or None for ``forever``."""


class HistoryConfig(_Model):
    """How much history the state DB keeps; retention prunes the rest (the rules:
    ``agentd.state.retention``; each engine's ``retention`` module does it).

    Only finished runs are pruned, each with its attempts, checkpoint, events and
    workspace; queued and running runs never are, nor a quarantined run while it is in
    quarantine (``keep_quarantine`` bounds that), nor an alert with a delivery pending.
    """

    keep_runs: Keep = Field(default=30 * 86400.0, gt=0)
    """Finished runs, counted from when they finished."""
    max_runs_per_task: Annotated[int | None, BeforeValidator(_cap)] = Field(default=10_000, ge=1)
    """Also at most this many of a task's newest runs: older finished ones go."""
    keep_events: Keep = Field(default=30 * 86400.0, gt=0)
    """Audit events not tied to a run (a run's events go with the run)."""
    keep_quarantine: Keep = Field(default=None, gt=0)
    """Quarantine entries are dropped this long after the quarantine; forever: by hand."""
    keep_ledger: Keep = Field(default=62 * 86400.0, gt=0)
    """LLM spend records and budget alarms: by default this month's and all of the last;
    at least 32d (budget months count them)."""
    keep_alerts: Keep = Field(default=90 * 86400.0, gt=0)
    """Raised alerts and their finished deliveries; at least the longest alert cooldown."""
    prune_every: Duration = Field(default=600.0, ge=1)
    """Between the end of one prune pass and the next; the first is a minute after start
    (or sooner, when this is shorter)."""

    @field_validator("keep_ledger")
    @classmethod
    def _ledger(cls, value: float | None) -> float | None:
        if value is not None and value < LEDGER_FLOOR_S:
            raise ValueError(
                "must be at least 32d (or forever): budget windows count the spend"
                " of the current day and month"
            )
        return value


class TaskConfig(_Model):
    id: str = ""
    description: str = ""
    enabled: bool = True
    schedule: ScheduleConfig
    command: CommandConfig | None = None
    http: HttpCallConfig | None = None
    python: PythonConfig | None = None
    agent: AgentConfig | None = None
    params: dict[str, Any] = {}
    params_schema: dict[str, Any] | None = None
    """A JSON schema (Draft 2020-12, of an object) the run's params must match: a manual
    trigger's params merged over ``params`` are checked against it before a run is
    made (a mismatch is refused, 400), and so are ``params`` alone at config load
    unless the schedule is ``manual`` (a scheduled fire runs with them as they are)."""
    timeout: Duration | None = 3600.0
    """One attempt's limit (start-to-close); a timed-out attempt is retried as ``retry``
    says (``retry.on_timeout``)."""
    run_timeout: Duration | None = Field(default=None, gt=0)
    """The whole run's limit, from its enqueue to its end over every attempt and every
    wait between them (schedule-to-close): past it the run ends ``timed_out`` (final,
    not retried, alerted as ``run_timed_out``); an attempt running then is stopped."""
    start_within: Duration | None = Field(default=None, gt=0)
    """The queue-wait limit, from its enqueue to its first start (schedule-to-start): a
    run not started within it ends ``expired`` without running (alerted as
    ``run_expired``, counted in ``agentd_runs_total{outcome="expired"}``)."""
    retry: RetryConfig = Field(default_factory=_shared(RetryConfig))
    overlap: Literal["skip", "queue_one", "queue_all", "cancel_previous", "allow"] = "skip"
    max_queued: int = Field(default=10, ge=1, le=10_000)
    catchup: Literal["skip", "latest", "all"] = "latest"
    catchup_max: int = Field(default=10, ge=1, le=10_000)
    misfire_grace: Duration = Field(default=30.0, gt=0)
    """How late a fire may start before ``catchup: skip`` counts it as missed."""
    pause_after_failures: int = Field(default=3, ge=0, le=INT_MAX)
    output_max_bytes: int | None = Field(default=None, ge=1024, le=INT_MAX)
    budget: BudgetConfig = Field(default_factory=_shared(BudgetConfig))
    expect: ExpectConfig | None = None
    max_duration: Duration | None = Field(default=None, gt=0)
    """Alert (``run_too_long``) when one attempt runs longer than this; it is not stopped."""
    ping: PingConfig | None = None
    notify: NotifyConfig | None = None
    admission: AdmissionConfig | None = None
    """Cost-aware admission of scheduled fires; None: every fire is admitted, unexplained."""

    @field_validator("id")
    @classmethod
    def _task_id(cls, value: str) -> str:
        if not TASK_ID_RE.match(value):
            raise ValueError(
                f"task name {value!r} must start with a letter or digit and use only "
                "letters, digits, '_', '.', '-' (max 64)"
            )
        return value

    @field_validator("params_schema")
    @classmethod
    def _params_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _object_schema(value)

    @model_validator(mode="after")
    def _params_match(self) -> TaskConfig:
        if self.params_schema is not None and not self.schedule.manual:
            problem = params_problem(self.params_schema, self.params)
            if problem is not None:
                raise ValueError(
                    f"params do not match params_schema ({problem}); a scheduled fire runs"
                    " with them as they are"
                )
        return self

    @model_validator(mode="after")
    def _one_kind(self) -> TaskConfig:
        kinds = [k for k in ("command", "http", "python", "agent") if getattr(self, k) is not None]
        if len(kinds) != 1:
            what = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"give exactly one of command, http, python, agent (got {what})")
        return self

    @property
    def kind(self) -> Literal["command", "http", "python", "agent"]:
        if self.command is not None:
            return "command"
        if self.http is not None:
            return "http"
        if self.python is not None:
            return "python"
        return "agent"

    def fingerprint(self) -> str:
        """A stable hash of everything the task is, to tell a changed task from an unchanged one."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def same_as(self, other: TaskConfig) -> bool:
        """Whether ``other`` has this task's fingerprint, for a fraction of its cost (a
        reload compares every task). Model equality alone would
        say ``params: {n: 1}`` is ``{n: true}``; their fingerprints differ."""
        return (
            self == other
            and _exact(self.params, other.params)
            and _exact(self.params_schema, other.params_schema)
            and _exact(self.http and self.http.json_body, other.http and other.http.json_body)
            and _exact(self.agent and self.agent.items, other.agent and other.agent.items)
        )


def _exact(a: Any, b: Any) -> bool:
    """Equal as JSON: 1, 1.0 and True are three values here, key order is not a difference."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_exact(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_exact, a, b))
    return bool(a == b) and (not isinstance(a, float) or repr(a) == repr(b))


TaskIndex = dict[str, tuple[str, str]]  # task id -> (fingerprint, kind): what the store keeps


def task_index(config: Config, before: tuple[Config, TaskIndex] | None = None) -> TaskIndex:
    """Fingerprint every task; on a reload, an unchanged task keeps the one it had."""
    old_tasks, old_index = (before[0].tasks, before[1]) if before else ({}, {})
    index: TaskIndex = {}
    for tid, task in config.tasks.items():
        old = old_tasks.get(tid)
        if old is not None and tid in old_index and task.same_as(old):
            index[tid] = old_index[tid]
        else:
            index[tid] = (task.fingerprint(), task.kind)
    return index


class WatchConfig(_Model):
    """``config:``: whether the daemon notices an edited config file by itself. A mounted
    Kubernetes ConfigMap is updated by the kubelet (an atomic swap of its ``..data``
    symlink) without any signal to the process, so there it watches by default."""

    watch: bool | None = None
    """Reload, as on SIGHUP, when the file's content (the file the path resolves to) or
    a secret file the config names changes. Unset: on when running under Kubernetes
    (``KUBERNETES_SERVICE_HOST`` set), off elsewhere (systemd sends SIGHUP)."""
    watch_interval: Duration = Field(default=5.0, gt=0, le=3600)
    """How often the files are looked at (a ``stat`` each; read only if it changed)."""

    def watching(self, environ: Mapping[str, str]) -> bool:
        if self.watch is not None:
            return self.watch
        return bool(environ.get("KUBERNETES_SERVICE_HOST"))


class Config(_Model):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    config: WatchConfig = Field(default_factory=WatchConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    providers: dict[str, ProviderConfig] = {}
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    tasks: dict[str, TaskConfig] = {}
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("tasks", mode="before")
    @classmethod
    def _inject_ids(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            for key, body in value.items():
                if isinstance(body, Mapping):
                    body = {**body, "id": key}  # the mapping key is the id, always
                out[key] = body
            return out
        return value

    def schedule_spec(self, task_id: str) -> ScheduleSpec:
        return self.tasks[task_id].schedule.spec(self.daemon.timezone)

    def task_timezone(self, task: TaskConfig) -> str:
        """The zone a task's budget windows are counted in: its schedule's."""
        return task.schedule.timezone or self.daemon.timezone

    @property
    def limits_timezone(self) -> str:
        return self.limits.timezone or self.daemon.timezone

    def llm_target(self, task: TaskConfig) -> tuple[str, ProviderConfig, str, int | None] | None:
        """(provider name, provider, model, max_tokens) a task's LLM calls go to by
        default, or None when it has none (a command task, or python without providers)."""
        if task.agent is not None:
            name = task.agent.provider or provider_label(task.agent.base_url)
            provider = self.providers.get(name) if task.agent.provider else None
            if provider is None:
                provider = ProviderConfig(
                    base_url=task.agent.base_url,
                    api_key_env=task.agent.api_key_env,
                    api_key_file=task.agent.api_key_file,
                )
            model = task.agent.model or provider.default_model or ""
            return name, provider, model, task.agent.max_tokens
        if task.python is not None:
            chosen = task.python.provider or (
                next(iter(self.providers)) if len(self.providers) == 1 else None
            )
            if chosen is None or chosen not in self.providers:
                return None
            provider = self.providers[chosen]
            model = task.python.model or provider.default_model or ""
            return chosen, provider, model, task.python.max_tokens
        return None


def provider_label(base_url: str) -> str:
    """The name an unnamed (inline) provider goes by in metrics and the ledger."""
    match = re.match(r"^https?://([^/:\s]+)", base_url)
    return match.group(1) if match else base_url


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    message: str


class ConfigError(Exception):
    """Every problem found in one config file; ``str()`` is what an operator reads."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s) in config"]
        lines += [f"{self.source}: {p.path or '<top>'}: {p.message}" for p in self.problems]
        return "\n".join(lines)


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _problems_from(exc: ValidationError) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        msg = str(err["msg"])
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        problems.append(ConfigProblem(_loc_to_path(tuple(err["loc"])), msg))
    return problems


# ---------------------------------------------------------------- loading


class SubstitutedTooMuch(ValueError):
    """``${VAR}`` substitutions added more than ``yamlload.MAX_TEXT`` characters: an
    aliased string is substituted once per copy."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"config too large: ${{VAR}} substitutions add more than "
            f"{yamlload.MAX_TEXT >> 20} MiB of text, an alias counted as a copy"
        )
        self.path = path


def interpolate(
    value: Any,
    environ: Mapping[str, str],
    path: str = "",
    problems: list[ConfigProblem] | None = None,
    budget: list[int] | None = None,
) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``.

    ``budget`` is what substitutions may still add, in characters (shared down the
    walk); past it, ``SubstitutedTooMuch``."""
    problems = problems if problems is not None else []
    budget = budget if budget is not None else [yamlload.MAX_TEXT]
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in environ and environ[name] != "":
                text = environ[name]
            elif default is not None:
                text = default
            else:
                problems.append(ConfigProblem(path, f"environment variable {name} is not set"))
                return ""
            budget[0] -= len(text)
            if budget[0] < 0:
                raise SubstitutedTooMuch(path)
            return text

        return _VAR_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {
            k: interpolate(v, environ, f"{path}.{k}" if path else str(k), problems, budget)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate(v, environ, f"{path}[{i}]", problems, budget) for i, v in enumerate(value)
        ]
    return value


def parse_config(
    text: str, source: str = "<memory>", environ: Mapping[str, str] | None = None
) -> Config:
    environ = os.environ if environ is None else environ
    try:
        # libyaml when PyYAML was built with it (its wheels are), and a lean walk of
        # its node tree (agentd.yamlload): same safe tag set, values and error marks.
        raw = yamlload.load(text)
    except yamlload.Rejected as exc:
        raise ConfigError(source, [ConfigProblem(exc.path, exc.message)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [ConfigProblem(where, f"YAML syntax: {problem}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(source, [ConfigProblem("", "top level must be a mapping")])
    problems: list[ConfigProblem] = []
    try:
        data = interpolate(raw, environ, "", problems)
    except SubstitutedTooMuch as exc:
        raise ConfigError(source, [ConfigProblem(exc.path, str(exc))]) from None
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems += _problems_from(exc)
        config = None
    if problems or config is None:
        raise ConfigError(source, problems)
    config, problems = link(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def link(config: Config) -> tuple[Config, list[ConfigProblem]]:
    """Checks across sections (names that must exist, budgets against the global cap,
    prices that USD budgets need) and named providers copied into their agent tasks."""
    problems: list[ConfigProblem] = []
    tasks = dict(config.tasks)
    for task_id, task in config.tasks.items():
        at = f"tasks.{task_id}"
        if task.agent is not None and task.agent.provider is not None:
            agent = task.agent
            named = task.agent.provider
            provider = config.providers.get(named)
            if provider is None:
                have = ", ".join(sorted(config.providers)) or "none declared"
                message = f"unknown provider {named!r} (have: {have})"
                problems.append(ConfigProblem(f"{at}.agent.provider", message))
                continue
            clash = sorted({"base_url", "api_key_env", "api_key_file"} & agent.model_fields_set)
            if clash:
                message = (
                    f"{', '.join(clash)} come(s) from providers.{agent.provider}; drop it here"
                )
                problems.append(ConfigProblem(f"{at}.agent", message))
            agent = agent.model_copy(
                update={
                    "base_url": provider.base_url,
                    "api_key_env": provider.api_key_env,
                    "api_key_file": provider.api_key_file,
                    "model": agent.model or provider.default_model or "",
                }
            )
            tasks[task_id] = task = task.model_copy(update={"agent": agent})
        if (
            task.agent is not None
            and (task.agent.tools or task.agent.mcp)
            and config.limits.sensitive_tools
        ):
            agent = task.agent.model_copy(
                update={
                    "sensitive_tools": [
                        *task.agent.sensitive_tools,
                        *config.limits.sensitive_tools,
                    ]
                }
            )
            tasks[task_id] = task = task.model_copy(update={"agent": agent})
        if task.agent is not None and not task.agent.model:
            message = "required key is missing (or set the provider's default_model)"
            problems.append(ConfigProblem(f"{at}.agent.model", message))
        if (
            task.python is not None
            and task.python.provider is not None
            and task.python.provider not in config.providers
        ):
            have = ", ".join(sorted(config.providers)) or "none declared"
            message = f"unknown provider {task.python.provider!r} (have: {have})"
            problems.append(ConfigProblem(f"{at}.python.provider", message))
        if task.agent is not None and task.agent.tools:
            problems += _tool_problems(at, task.agent.tools)
        problems += _budget_problems(config, task)
        problems += _interval_problems(config, task)
    limit = config.limits.max_tasks
    if limit is not None and len(config.tasks) > limit:
        message = f"{len(config.tasks)} tasks, more than limits.max_tasks ({limit})"
        problems.append(ConfigProblem("tasks", message))
    linked = config.model_copy(update={"tasks": tasks})
    for index, rule in enumerate(config.alerts.rules):
        unknown = [c for c in rule.channels if c not in config.alerts.channels]
        if unknown:
            have = ", ".join(sorted(config.alerts.channels)) or "none declared"
            message = f"unknown channel(s) {unknown} (have: {have})"
            problems.append(ConfigProblem(f"alerts.rules[{index}].channels", message))
        unknown = [t for t in rule.tasks or [] if t not in config.tasks]
        if unknown:
            problems.append(
                ConfigProblem(f"alerts.rules[{index}].tasks", f"unknown task(s) {unknown}")
            )
    problems += _history_problems(config)
    return linked, problems


def _history_problems(config: Config) -> list[ConfigProblem]:
    """Deliveries are the alert cooldown's memory: pruning them sooner would let the
    same condition alert a channel again within its cooldown."""
    keep = config.history.keep_alerts
    cooldowns = [config.alerts.cooldown] + [
        r.cooldown for r in config.alerts.rules if r.cooldown is not None
    ]
    longest = max(cooldowns)
    if keep is not None and keep < longest:
        message = (
            f"must be at least the longest alert cooldown ({longest:g}s) or forever:"
            " deliveries remember what is in cooldown"
        )
        return [ConfigProblem("history.keep_alerts", message)]
    return []


def _interval_problems(config: Config, task: TaskConfig) -> list[ConfigProblem]:
    """``limits.min_interval`` against the task's schedule (cron or every; once and
    manual never repeat)."""
    floor = config.limits.min_interval
    if floor is None or task.schedule.kind not in ("cron", "interval"):
        return []
    spec = config.schedule_spec(task.id)
    gap = shortest_fire_gap_s(spec, floor=floor)
    if gap is None or gap >= floor:
        return []
    field = "cron" if task.schedule.kind == "cron" else "every"
    jitter = f" (jitter {spec.jitter_s:g}s included)" if spec.jitter_s else ""
    message = f"can fire {gap:g}s apart{jitter}, more often than limits.min_interval ({floor:g}s)"
    return [ConfigProblem(f"tasks.{task.id}.schedule.{field}", message)]


def _budget_problems(config: Config, task: TaskConfig) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    at = f"tasks.{task.id}.budget"
    limits = config.limits
    asks = {
        "run.usd": task.budget.run.usd,
        "task.usd_per_day": task.budget.task.usd_per_day,
        "task.usd_per_month": task.budget.task.usd_per_month,
    }
    caps = {"usd_per_day": limits.usd_per_day, "usd_per_month": limits.usd_per_month}
    for name, amount in asks.items():
        if amount is None:
            continue
        for cap_name, cap in caps.items():
            if name == "task.usd_per_month" and cap_name == "usd_per_day":
                continue  # a month may well hold more than one day's cap
            if cap is not None and amount > cap:
                message = f"{amount:g} USD exceeds the global cap limits.{cap_name} ({cap:g} USD)"
                problems.append(ConfigProblem(f"{at}.{name}", message))
    run_cap = limits.max_run_usd
    if run_cap is not None and task.budget.run.usd is not None and task.budget.run.usd > run_cap:
        message = (
            f"{task.budget.run.usd:g} USD exceeds the system run cap"
            f" limits.max_run_usd ({run_cap:g} USD)"
        )
        problems.append(ConfigProblem(f"{at}.run.usd", message))
    wants_usd = any(v is not None for v in asks.values()) or (
        task.agent is not None and any(v is not None for v in [*caps.values(), run_cap])
    )
    if wants_usd and task.agent is not None and task.agent.model:
        pname = task.agent.provider
        provider = config.providers.get(pname) if pname else None
        if provider is None:
            message = "a USD budget needs a named provider (providers:) with prices"
            problems.append(ConfigProblem(f"tasks.{task.id}.agent.provider", message))
        elif task.agent.model not in provider.prices:
            message = (
                f"no price for model {task.agent.model!r} in providers.{pname}.prices; "
                "a USD budget or global cap needs one (0 for a free local model)"
            )
            problems.append(ConfigProblem(f"tasks.{task.id}.agent.model", message))
    return problems


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read: {exc.strerror}")]) from None
    if len(data) > MAX_FILE_BYTES:
        message = f"file larger than {MAX_FILE_BYTES >> 20} MiB: not read"
        raise ConfigError(str(path), [ConfigProblem("", message)])
    config = parse_config(utf8(data, str(path)), str(path), environ)
    if config.daemon.python_path:
        # The directory as the file is named, not its symlink's target: under a mounted
        # ConfigMap the file is ..data/agentd.yaml -> ..2026_12_03_.../agentd.yaml, and
        # the kubelet deletes that timestamped directory at the next update.
        base = Path(os.path.abspath(path)).parent
        resolved = [p if p.is_absolute() else base / p for p in config.daemon.python_path]
        daemon = config.daemon.model_copy(update={"python_path": resolved})
        config = config.model_copy(update={"daemon": daemon})
    return config


def lenient_daemon(path: Path, environ: Mapping[str, str] | None = None) -> DaemonConfig | None:
    """The ``daemon:`` section of a config file that does not validate as a whole, if
    that section validates on its own; None when it does not (or the file cannot be
    read): the caller then takes the defaults. For the CLI, to find the running
    daemon's API (address, token source) while the file on disk is broken.

    Lenient on purpose: bytes that are not UTF-8 are replaced, and when the document
    does not parse, the top-level ``daemon:`` block is parsed alone."""
    environ = os.environ if environ is None else environ
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    text = data[:MAX_FILE_BYTES].decode("utf-8", errors="replace")
    section: Any = None
    for candidate in (text, _daemon_block(text)):
        if candidate is None:
            continue
        try:
            raw = yamlload.load(candidate)
        except yaml.YAMLError:
            continue
        if isinstance(raw, Mapping):
            section = raw.get("daemon")
            break
    if not isinstance(section, Mapping):
        return None
    problems: list[ConfigProblem] = []
    try:
        section = interpolate(section, environ, "daemon", problems)
    except SubstitutedTooMuch:
        return None
    if problems:
        return None
    try:
        return DaemonConfig.model_validate(section)
    except ValidationError:
        return None


def _daemon_block(text: str) -> str | None:
    """The lines of the top-level ``daemon:`` key: from it to the next top-level line."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("daemon:"):
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
                end += 1
            return "".join(lines[i:end])
    return None


def utf8(data: bytes, source: str) -> str:
    """``data`` as text; a ConfigError at the line and column of its first byte that is
    not UTF-8 (a Latin-1 file, a stray binary byte)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8")) + 1
        message = (
            f"not UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
            "(save the file as UTF-8)"
        )
        raise ConfigError(
            source, [ConfigProblem(f"line {line}, column {column}", message)]
        ) from None


def inactive_reason(task: TaskConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """Why a valid task is not scheduled right now, or None when it is active.

    An agent task whose key variable is unset stays registered but idle: the shipped
    example must run offline, and setting the variable plus SIGHUP turns it on.
    """
    environ = os.environ if environ is None else environ
    if not task.enabled:
        return "disabled in config"
    if task.agent and task.agent.api_key_env and not environ.get(task.agent.api_key_env):
        return f"API key variable {task.agent.api_key_env} is not set"
    if task.agent and task.agent.api_key_file and not task.agent.api_key_file.exists():
        return f"API key file {task.agent.api_key_file} does not exist"
    return None


def _secret_fields(cls: type[BaseModel]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A model class's fields that name a secret's variable or file (``token_env``,
    ``api_key_file``, ``secret_env``, ``password_env``...), and the fields that may hold
    models in turn."""
    cached = _SECRET_FIELDS.get(cls)
    if cached is None:
        refs, nested = [], []
        for name, info in cls.model_fields.items():
            stem, _, suffix = name.rpartition("_")
            if suffix in ("env", "file") and SECRET_KEY_RE.search(stem):
                refs.append(name)
            elif any(
                isinstance(t, type) and issubclass(t, BaseModel) for t in _types_in(info.annotation)
            ):
                nested.append(name)
        cached = _SECRET_FIELDS[cls] = (tuple(refs), tuple(nested))
    return cached


_SECRET_FIELDS: dict[type[BaseModel], tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [t for arg in args for t in _types_in(arg)]


def config_generation(index: Mapping[str, tuple[str, str]]) -> str:
    """A short digest of a config's tasks as the state knows them (``task_index``): equal
    on every node that runs the same definitions, so the node registry shows a node
    whose config differs from the others'."""
    digest = hashlib.sha256()
    for task_id in sorted(index):
        fingerprint, kind = index[task_id]
        digest.update(f"{task_id}\0{fingerprint}\0{kind}\n".encode())
    return digest.hexdigest()[:12]


def secret_refs(config: Config) -> tuple[SecretRef, ...]:
    """Every variable and file the config names as holding a secret, each once, with the
    first config path that names it: what is scrubbed from stored and logged texts
    (``redact``) and never passed to a command's environment unless its task names it."""
    found: dict[tuple[str | None, Path | None], SecretRef] = {}

    def walk(model: BaseModel, path: str) -> None:
        refs, nested = _secret_fields(type(model))
        for name in refs:
            value = getattr(model, name)
            if not value:
                continue
            key = (value, None) if name.endswith("_env") else (None, Path(value))
            found.setdefault(key, SecretRef(f"{path}{name}", env=key[0], file=key[1]))
        for name in nested:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{path}{name}.")
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, BaseModel):
                        walk(v, f"{path}{name}.{k}.")
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    if isinstance(v, BaseModel):
                        walk(v, f"{path}{name}.{i}.")

    walk(config, "")
    return tuple(found.values())


def redacted(config: Config) -> dict[str, Any]:
    """The config as plain data with anything secret-looking masked, for showing to people."""

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if (
            isinstance(value, str)
            and value
            and SECRET_KEY_RE.search(key)
            and not key.endswith(("_env", "_file"))
        ):
            return "***"
        return value

    result: dict[str, Any] = walk(config.model_dump(mode="json", by_alias=True))
    # Webhook and ping URLs often carry their credential in the path (Slack, Healthchecks).
    for channel in result.get("alerts", {}).get("channels", {}).values():
        if channel.get("webhook"):
            channel["webhook"]["url"] = _mask_url(channel["webhook"]["url"])
    for task in result.get("tasks", {}).values():
        for key in ("url", "start_url", "success_url", "fail_url"):
            if task.get("ping") and task["ping"].get(key):
                task["ping"][key] = _mask_url(task["ping"][key])
    return result


def _mask_url(url: str) -> str:
    match = re.match(r"^(https?://[^/?#\s]+)", url)
    return (match.group(1) + "/***") if match and match.group(1) != url else url
