"""The web console at ``/ui``: server-rendered pages over ``Control``, as the API is.

Read-mostly: tasks, runs (live), a run's detail (live while it runs), quarantine,
approvals, spend, alerts and their deliveries, nodes. The few actions (release or drop
a quarantined run, approve, skip or deny a parked call) are HTML forms that POST to
``/ui/...`` handlers calling the same ``Control`` methods as the API's handlers.

Invariants:

- Auth is the API's: with a token configured, a page needs the write token or the read
  token, and an action needs the write token. A browser cannot send ``Authorization``
  without script, so ``/ui/login`` takes the token once and sets a cookie holding an
  HMAC of it (never the token: a cookie that leaks is not an API token). The cookie is
  ``HttpOnly``, ``SameSite=Strict``, ``Secure`` over TLS. On ``/v1`` it is worth a read
  token at most (the live updates' ``EventSource`` sends it); it never writes there.
  A bearer header works on ``/ui`` as on the API.
- Every action form carries a CSRF value (an HMAC of the session) and is refused
  without it, or with an ``Origin`` other than the console's own, even with no token
  configured (a page on another site could otherwise post to a loopback daemon).
- Everything shown is escaped (``agentd.console.html.render``); output tails are also
  scrubbed of the daemon's secrets (the store's redactor). Responses carry a CSP that
  allows only the console's own script and stylesheet.
- Pages work without JavaScript; the script adds ticking countdowns and live updates
  (it re-fetches the page's live region, rendered here, when an event arrives).
- One log line per action and per login: ``console: <what> run=<id> ...``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

from aiohttp import web
from aiohttp.typedefs import Handler

from agentd.budget import Scope, window_at
from agentd.clock import Clock, from_iso, to_iso
from agentd.console import assets, charts
from agentd.console.charts import Series
from agentd.console.html import Markup, escape, join, query, render, seg
from agentd.control import Control
from agentd.ledger import window_blocked
from agentd.models import APPROVAL_DECISIONS, FINAL_STATUSES, RUN_STATUSES, EventKind, StateRefused
from agentd.runner import workspace_path
from agentd.state.port import StorageFault

log = logging.getLogger("agentd.console")

PREFIX: Final = "/ui"
COOKIE: Final = "agentd_console"
PUBLIC_PATHS: Final = frozenset(
    {"/ui/login", "/ui/static/console.css", "/ui/static/console.js", "/ui/static/icon.svg"}
)
"""Answered without a grant: the login form and what it needs to look right."""
FRAGMENT_HEADER: Final = "X-Console-Fragment"
LATE_AFTER_S: Final = 60.0
"""A queued run this long past when it was due (its schedule, or its retry's not_before)
makes its task ``late``."""
OUTPUT_TAIL_BYTES: Final = 16 * 1024
CHART_RUNS_MAX: Final = 1000
"""Runs read for the runs-per-hour chart (the newest in its 24 hours)."""
SPEND_DAYS: Final = 30
SPEND_TASK_SERIES: Final = 5
NOTE_MAX: Final = 2000
CALL_ID_MAX: Final = 200
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
ERROR_STATUS: Final[Mapping[str, int]] = {
    "unknown_task": 404,
    "unknown_run": 404,
    "not_quarantined": 409,
    "not_awaiting_approval": 409,
    "wrong_call": 409,
    "bad_decision": 400,
    "bad_request": 400,
}
NAV: Final = (
    ("tasks", "Tasks"),
    ("runs", "Runs"),
    ("approvals", "Approvals"),
    ("quarantine", "Quarantine"),
    ("spend", "Spend"),
    ("alerts", "Alerts"),
    ("nodes", "Nodes"),
)
NOTICES: Final[Mapping[str, str]] = {
    "release": "Released run {run}: it is queued again.",
    "drop": "Dropped run {run}: it stays in the history as dropped.",
    "approve": "Approved the call of run {run}: the run is queued to make it.",
    "skip": "Skipped the call of run {run}: the model is told, and the run goes on.",
    "deny": "Denied the call of run {run}: the run has ended denied.",
}
QUARANTINE_ACTIONS: Final = ("release", "drop")
LIVE_KINDS: Final = " ".join(k.value for k in EventKind if k != EventKind.HEARTBEAT)
_GOOD = frozenset({"succeeded"})
_BAD = frozenset({"quarantined", "denied", "budget_exhausted"})
_ACTIVE = frozenset({"queued", "running", "awaiting_approval"})

Grant = str  # "write" | "read"
GRANT: Final = web.RequestKey("agentd_console_grant", str)
"""The request's grant (``"write"``, ``"read"``, or ``""`` for none), set by ``guard``."""


class _Refused(Exception):
    """A console request refused with an HTML page: ``status`` and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _digest(key: bytes, what: str) -> str:
    return hmac.new(key, what.encode(), hashlib.sha256).hexdigest()


class Console:
    """The ``/ui`` routes and their guard (``HttpServer`` registers both when
    ``http.console`` is on). ``token``/``read_token`` are the API's; ``started`` says
    whether the daemon's startup is done (before it the state may be mid-migration)."""

    def __init__(
        self,
        *,
        control: Control,
        clock: Clock,
        started: Callable[[], bool],
        token: str | None,
        read_token: str | None = None,
        client_timeout: float = 10.0,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """``on_refused(peer)``: a sign-in with a wrong token (``HttpServer`` counts it
        and logs it rate-limited); without one, each is a warning line."""
        self.control = control
        self._on_refused = on_refused or (
            lambda peer: log.warning("console: sign-in refused (wrong token) from=%s", peer)
        )
        self.clock = clock
        self.started = started
        self.client_timeout = client_timeout
        self._open = token is None
        self._token = token.encode("utf-8", "surrogatepass") if token else None
        self._read_token = read_token.encode("utf-8", "surrogatepass") if read_token else None
        self._sessions: dict[Grant, str] = {}
        if token:
            self._sessions["write"] = "w." + _digest(self._token or b"", "agentd console session")
        if read_token:
            self._sessions["read"] = "r." + _digest(
                self._read_token or b"", "agentd console session"
            )
        # With a token, the CSRF key follows from it (every node behind one balancer
        # agrees); without one it is this process's own.
        base = self._token if self._token else secrets.token_bytes(32)
        self._csrf_key = hashlib.sha256(b"agentd console csrf\0" + base).digest()

    # ------------------------------------------------------------ routes and guard

    @staticmethod
    def owns(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def register(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_get("/ui", self._redirect_home)
        r.add_get("/ui/", self._redirect_home)
        r.add_get("/ui/static/console.css", self._css)
        r.add_get("/ui/static/console.js", self._js)
        r.add_get("/ui/static/icon.svg", self._icon)
        r.add_get("/ui/login", self._login_form)
        r.add_post("/ui/login", self._login)
        r.add_post("/ui/logout", self._logout)
        r.add_get("/ui/tasks", self._page(self.tasks))
        r.add_get("/ui/runs", self._page(self.runs))
        r.add_get("/ui/runs/{run_id}", self._page(self.run_detail))
        r.add_get("/ui/quarantine", self._page(self.quarantine))
        r.add_get("/ui/quarantine/{run_id}/{action}", self._page(self.quarantine_confirm))
        r.add_post("/ui/quarantine/{run_id}/{action}", self._page(self.quarantine_act))
        r.add_get("/ui/approvals", self._page(self.approvals))
        r.add_post("/ui/approvals/{run_id}/{decision}", self._page(self.decide))
        r.add_get("/ui/spend", self._page(self.spend))
        r.add_get("/ui/alerts", self._page(self.alerts))
        r.add_get("/ui/nodes", self._page(self.nodes))

    def cookie_grant(self, request: web.Request) -> Grant | None:
        """What the request's console cookie is worth, compared in constant time (each
        session value every time, so the time taken does not say which came close)."""
        offered = request.cookies.get(COOKIE, "").encode()
        found: Grant | None = None
        for grant, value in self._sessions.items():
            if hmac.compare_digest(offered, value.encode()) and found is None:
                found = grant
        return found

    async def guard(
        self, request: web.Request, handler: Handler, granted: Grant | None
    ) -> web.StreamResponse:
        """The auth middleware's part for ``/ui``: ``granted`` is the bearer header's (or
        the cookie's) grant, ``"write"`` when the API has no token. Pages without one
        redirect to the login form; actions need ``write`` and the CSRF value."""
        if self._open:
            granted = "write"
        request[GRANT] = granted or ""
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        if granted is None:
            if request.method in ("GET", "HEAD"):
                target = request.path_qs
                raise web.HTTPSeeOther("/ui/login" + query(next=target))
            return self._error_page(request, 401, "Sign in first: this needs the API token.")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin and urllib.parse.urlsplit(origin).netloc != request.host:
                return self._error_page(request, 403, "Refused: the form came from elsewhere.")
            if request.path != "/ui/logout" and granted != "write":
                return self._error_page(
                    request, 403, "The read token may only look: sign in with the write token."
                )
        return await handler(request)

    def _session_of(self, request: web.Request) -> str:
        cookie = request.cookies.get(COOKIE)
        if cookie:
            return cookie
        grant: str = request.get(GRANT, "")
        return "bearer:" + grant

    def csrf(self, request: web.Request) -> str:
        return _digest(self._csrf_key, self._session_of(request))[:40]

    def _check_csrf(self, request: web.Request, form: Mapping[str, str]) -> None:
        offered = str(form.get("csrf", "")).encode()
        if not hmac.compare_digest(offered, self.csrf(request).encode()):
            raise _Refused(403, "Refused: the form is stale or did not come from this console.")

    def _page(self, render_page: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
        """A page or action: after startup, after the runner's commit (reads on the loop
        never wait for another thread's fsync), its refusals as HTML pages."""

        async def handler(request: web.Request) -> web.StreamResponse:
            if not self.started():
                response = self._error_page(request, 503, "agentd is starting up; retry soon.")
                response.headers["Retry-After"] = "1"
                return response
            await self.control.commit_done()
            try:
                return await render_page(request)
            except _Refused as exc:
                return self._error_page(request, exc.status, exc.message)
            except StateRefused as exc:
                return self._error_page(request, ERROR_STATUS.get(exc.code, 400), str(exc))
            except StorageFault as exc:
                log.warning(
                    "console: state DB error in %s %s: %s", request.method, request.path, exc
                )
                response = self._error_page(request, 503, f"State DB error: {exc}")
                response.headers["Retry-After"] = "1"
                return response

        return handler

    # ------------------------------------------------------------ layout

    def _response(self, body: Markup | str, status: int = 200) -> web.Response:
        return web.Response(
            text=str(body),
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    def _layout(
        self,
        request: web.Request,
        title: str,
        active: str | None,
        body: Markup,
        status: int = 200,
    ) -> web.Response:
        grant = request.get(GRANT) or None
        counts: dict[str, int] = {}
        if grant is not None and self.started():
            try:
                counts = self.control.counts()
            except StorageFault:
                counts = {}
        badges = {
            "approvals": counts.get("awaiting_approval", 0),
            "quarantine": counts.get("in_quarantine", 0),
        }
        items = []
        for key, label in NAV if grant is not None else ():
            n = badges.get(key, 0)
            items.append(
                render(
                    '<li><a href="/ui/{key}"{cur}>{label}{n}</a></li>',
                    key=key,
                    cur=Markup(' aria-current="page"') if key == active else Markup(""),
                    label=label,
                    n=render(' <span class="badge">{n}</span>', n=n) if n else Markup(""),
                )
            )
        if grant is None:
            who = Markup("")
        elif self._open:
            who = Markup('<span class="who">no API token configured: open to this network</span>')
        else:
            who = render(
                '<span class="who">signed in ({g}) <form method="post" action="/ui/logout">'
                '<input type="hidden" name="csrf" value="{csrf}">'
                "<button>Sign out</button></form></span>",
                g="write" if grant == "write" else "read-only",
                csrf=self.csrf(request),
            )
        page = render(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<title>{title} · agentd</title>"
            '<link rel="icon" href="/ui/static/icon.svg" type="image/svg+xml">'
            '<link rel="stylesheet" href="/ui/static/console.css?v={css}">'
            '<script src="/ui/static/console.js?v={js}" defer></script></head><body>'
            '<a class="skip" href="#main">Skip to content</a>'
            '<header><span class="brand">agentd</span>'
            '<nav aria-label="Console"><ul>{items}</ul></nav>{who}</header>'
            '<main id="main" tabindex="-1"><h1>{title}</h1>{body}</main></body></html>',
            title=title,
            css=assets.CSS_ETAG,
            js=assets.JS_ETAG,
            items=join(items),
            who=who,
            body=body,
        )
        return self._response(page, status)

    def _error_page(self, request: web.Request, status: int, message: str) -> web.Response:
        body = render(
            '<p class="notice error" role="alert">{m}</p><p><a href="{back}">Back</a></p>',
            m=message,
            back=_same_site_back(request),
        )
        return self._layout(request, f"{status}: cannot do that", None, body, status)

    @staticmethod
    def _live(stream: str, fragment_url: str, inner: Markup) -> Markup:
        """The page's live region: the script re-fetches ``fragment_url`` (with the
        fragment header: only the region's inside) when ``stream`` brings an event."""
        return render(
            '<p id="live" role="status" aria-live="polite">live updates need JavaScript;'
            " reload to see changes</p>"
            '<div data-live-stream="{s}" data-live-fragment="{f}" data-live-kinds="{k}">'
            "{inner}</div>",
            s=stream,
            f=fragment_url,
            k=LIVE_KINDS,
            inner=inner,
        )

    def _notice(self, request: web.Request) -> Markup:
        done, run = request.query.get("done"), request.query.get("run", "")
        if done is None or done not in NOTICES or len(run) > 64:
            return Markup("")
        return render('<p class="notice" role="status">{m}</p>', m=NOTICES[done].format(run=run))

    # ------------------------------------------------------------ formatting

    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.control.config.daemon.timezone)

    def _ts(self, iso: str | None) -> Markup:
        if not iso:
            return Markup('<span class="muted">—</span>')
        try:
            moment = from_iso(iso)
        except ValueError:
            return escape(iso)
        local = moment.astimezone(self._zone())
        return render(
            '<time datetime="{iso}" title="{iso}">{t}</time>',
            iso=to_iso(moment),
            t=local.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )

    def _countdown(self, iso: str) -> Markup:
        moment = from_iso(iso)
        return render(
            '<span data-countdown="{iso}">{t}</span>',
            iso=to_iso(moment),
            t=_human((moment - self.clock.now()).total_seconds()),
        )

    @staticmethod
    def _badge(text: str, css: str | None = None, title: str | None = None) -> Markup:
        return render(
            '<span class="badge st-{c}"{t}>{x}</span>',
            c=css or text,
            t=render(' title="{t}"', t=title) if title else Markup(""),
            x=text.replace("_", " "),
        )

    def _run_link(self, run_id: str) -> Markup:
        return render('<a class="mono" href="/ui/runs/{u}">{r}</a>', u=seg(run_id), r=run_id)

    # ------------------------------------------------------------ static and auth pages

    async def _redirect_home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/ui/tasks")

    async def _css(self, request: web.Request) -> web.StreamResponse:
        return self._static(assets.CSS, "text/css", assets.CSS_ETAG)

    async def _js(self, request: web.Request) -> web.StreamResponse:
        return self._static(assets.JS, "text/javascript", assets.JS_ETAG)

    async def _icon(self, request: web.Request) -> web.StreamResponse:
        return self._static(assets.ICON, "image/svg+xml", assets.ICON_ETAG)

    @staticmethod
    def _static(text: str, content_type: str, etag: str) -> web.Response:
        return web.Response(
            text=text,
            content_type=content_type,
            charset="utf-8",
            headers={
                "Cache-Control": "public, max-age=86400",
                "ETag": f'"{etag}"',
                "X-Content-Type-Options": "nosniff",
            },
        )

    def _login_body(self, request: web.Request, message: str | None, next_url: str) -> Markup:
        if self._open:
            return render(
                "<p>This agentd has no API token configured: the console is open to whoever"
                ' can reach it. <a href="{n}">Continue</a>.</p>',
                n=next_url,
            )
        return render(
            '{msg}<form class="login" method="post" action="/ui/login">'
            '<div class="field"><label for="token">API token (the write token acts, the'
            " read token only looks)</label>"
            '<input id="token" name="token" type="password" autocomplete="current-password"'
            ' required autofocus size="40"></div>'
            '<input type="hidden" name="next" value="{n}">'
            '<p><button class="primary" type="submit">Sign in</button></p></form>'
            '<p class="muted">The token is checked once; the browser keeps a cookie derived'
            " from it (not the token), sent only to this console.</p>",
            msg=render('<p class="notice error" role="alert">{m}</p>', m=message)
            if message
            else Markup(""),
            n=next_url,
        )

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        next_url = _safe_next(request.query.get("next"))
        return self._layout(request, "Sign in", None, self._login_body(request, None, next_url))

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        next_url = _safe_next(form.get("next"))
        if self._open:
            raise web.HTTPSeeOther(next_url)
        offered = form.get("token", "").strip().encode("utf-8", "surrogatepass")
        assert self._token is not None
        write = hmac.compare_digest(offered, self._token)
        read = bool(self._read_token) and hmac.compare_digest(
            offered, self._read_token or self._token
        )
        grant: Grant | None = "write" if write else "read" if read else None
        peer = request.remote or "-"
        if grant is None:
            self._on_refused(peer)
            body = self._login_body(request, "That is not this agentd's token.", next_url)
            return self._layout(request, "Sign in", None, body, 401)
        log.info("console: signed in grant=%s from=%s", grant, peer)
        response = web.HTTPSeeOther(next_url)
        response.set_cookie(
            COOKIE,
            self._sessions[grant],
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        try:
            self._check_csrf(request, form)
        except _Refused as exc:
            return self._error_page(request, exc.status, exc.message)
        log.info("console: signed out from=%s", request.remote or "-")
        response = web.HTTPSeeOther("/ui/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def _form(self, request: web.Request) -> dict[str, str]:
        """A url-encoded form's text fields, within ``client_timeout``."""
        try:
            async with asyncio.timeout(self.client_timeout):
                data = await request.post()
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None
        return {k: v for k, v in data.items() if isinstance(v, str)}

    # ------------------------------------------------------------ tasks

    async def tasks(self, request: web.Request) -> web.StreamResponse:
        now = self.clock.now()
        tasks = self.control.list_tasks()
        queued = self.control.list_runs(status="queued", limit=1000)
        running = self.control.list_runs(status="running", limit=1000)
        late: dict[str, int] = {}
        for run in queued:
            due = max(
                (t for t in (run["scheduled_for"], run["not_before"], run["created_at"]) if t),
                default=run["created_at"],
            )
            if (now - from_iso(due)).total_seconds() > LATE_AFTER_S:
                late[run["task_id"]] = late.get(run["task_id"], 0) + 1
        busy: dict[str, int] = {}
        for run in running:
            busy[run["task_id"]] = busy.get(run["task_id"], 0) + 1
        rows = []
        for t in tasks:
            tid = t["id"]
            states: list[Markup] = []
            if not t["active"]:
                states.append(self._badge("inactive", title=t["inactive_reason"]))
            if t["paused"]:
                states.append(self._badge("paused", title=t["paused_reason"]))
            if tid in late:
                states.append(
                    self._badge(
                        "late",
                        title=f"{late[tid]} queued run(s) due more than {LATE_AFTER_S:g} s ago",
                    )
                )
            if tid in busy:
                states.append(self._badge(f"running {busy[tid]}", "running"))
            blocked = window_blocked(self.control.store, self.control.config, tid, now)
            if blocked:
                states.append(
                    self._badge(
                        "budget",
                        "bad",
                        title=f"{blocked['scope']}: {blocked['spent_usd']} of "
                        f"{blocked['limit_usd']} USD; until {blocked['window_end']}",
                    )
                )
            if t["paused"] or not t["active"]:
                next_fire = render(
                    '<span class="muted">{w}</span>',
                    w="none while paused" if t["paused"] else "none",
                )
            elif t["next_runs"]:
                nxt = t["next_runs"][0]
                next_fire = render(
                    "{at}<br>{cd}", at=self._ts(nxt["utc"]), cd=self._countdown(nxt["utc"])
                )
            else:
                next_fire = Markup('<span class="muted">manual only</span>')
            outcome = (
                render(
                    "{b}<br>{at}",
                    b=self._badge(t["last_outcome"]),
                    at=self._ts(t["last_run_at"]),
                )
                if t["last_outcome"]
                else Markup('<span class="muted">never ran</span>')
            )
            rows.append(
                render(
                    '<tr><th scope="row"><a href="/ui/runs?task={u}">{id}</a>'
                    '<div class="muted">{desc}</div></th><td>{kind}</td>'
                    '<td>{sched}<div class="muted">{tz}</div></td><td>{nxt}</td>'
                    "<td>{outcome}</td><td>{states}</td></tr>",
                    u=seg(tid),
                    id=tid,
                    desc=t["description"] or "",
                    kind=t["kind"],
                    sched=t["schedule"],
                    tz=t["timezone"],
                    nxt=next_fire,
                    outcome=outcome,
                    states=join(states, " ") or Markup('<span class="muted">ok</span>'),
                )
            )
        body = render(
            '<div class="scroll"><table><caption>{n} task(s); times in {zone}</caption>'
            '<thead><tr><th scope="col">task</th><th scope="col">kind</th>'
            '<th scope="col">schedule</th><th scope="col">next fire</th>'
            '<th scope="col">last outcome</th><th scope="col">state</th></tr></thead>'
            "<tbody>{rows}</tbody></table></div>",
            n=len(tasks),
            zone=self.control.config.daemon.timezone,
            rows=join(rows) or Markup('<tr><td colspan="6">no tasks are configured</td></tr>'),
        )
        return self._layout(request, "Tasks", "tasks", body)

    # ------------------------------------------------------------ runs

    def _local_input(self, value: str | None, name: str) -> tuple[str | None, str | None]:
        """A ``datetime-local`` value (in the console's zone) or an ISO date-time with an
        offset, as the store's UTC text; (None, message) when it is neither."""
        if not value:
            return None, None
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None, f"{name}: not a date and time ({value[:40]!r})"
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self._zone())
        return to_iso(moment), None

    async def runs(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        task = q.get("task") or None
        status = q.get("status") or None
        before = q.get("before") or None
        problems: list[str] = []
        if task is not None and task not in self.control.config.tasks:
            problems.append(f"no task named {task!r}")
            task = None
        if status is not None and status not in RUN_STATUSES:
            problems.append(f"no status {status!r}")
            status = None
        since, err1 = self._local_input(q.get("since"), "since")
        until, err2 = self._local_input(q.get("until"), "until")
        problems += [e for e in (err1, err2) if e]
        limit = 50
        runs = self.control.list_runs(
            task=task, status=status, limit=limit, before=before, since=since, until=until
        )
        params = {"task": task, "status": status, "since": q.get("since"), "until": q.get("until")}
        here = "/ui/runs" + query(**params, before=before)
        inner = join(
            [
                self._runs_charts(task),
                self._runs_table(runs),
                render(
                    '<p><a href="/ui/runs{q}">Older runs</a></p>',
                    q=query(**params, before=runs[-1]["id"]),
                )
                if len(runs) == limit
                else Markup(""),
            ]
        )
        if request.headers.get(FRAGMENT_HEADER):
            return self._response(inner)
        task_opts = join(
            render(
                '<option value="{v}"{s}>{v}</option>',
                v=tid,
                s=Markup(" selected") if tid == task else Markup(""),
            )
            for tid in self.control.config.tasks
        )
        status_opts = join(
            render(
                '<option value="{v}"{s}>{t}</option>',
                v=st,
                t=st.replace("_", " "),
                s=Markup(" selected") if st == status else Markup(""),
            )
            for st in RUN_STATUSES
        )
        zone = self.control.config.daemon.timezone
        filters = render(
            '<form class="filters" method="get" action="/ui/runs" role="search"'
            ' aria-label="Filter runs">'
            '<div><label for="f-task">task</label><select id="f-task" name="task">'
            '<option value="">any</option>{tasks}</select></div>'
            '<div><label for="f-status">status</label><select id="f-status" name="status">'
            '<option value="">any</option>{statuses}</select></div>'
            '<div><label for="f-since">created since ({zone})</label>'
            '<input id="f-since" name="since" type="datetime-local" step="1" value="{since}">'
            "</div>"
            '<div><label for="f-until">created before ({zone})</label>'
            '<input id="f-until" name="until" type="datetime-local" step="1" value="{until}">'
            "</div>"
            '<div><button type="submit">Filter</button> <a href="/ui/runs">clear</a></div>'
            "</form>{problems}",
            tasks=task_opts,
            statuses=status_opts,
            zone=zone,
            since=(q.get("since") or "")[:40],
            until=(q.get("until") or "")[:40],
            problems=join(
                render('<p class="notice error" role="alert">{p}</p>', p=p) for p in problems
            ),
        )
        live = self._live("/v1/events/stream", here, inner)
        return self._layout(request, "Runs", "runs", join([filters, live]))

    def _runs_table(self, runs: Sequence[Mapping[str, Any]]) -> Markup:
        rows = join(
            render(
                "<tr><td>{link}</td><td>{task}</td><td>{trigger}</td><td>{st}</td>"
                "<td>{created}</td><td>{started}</td><td class='num'>{dur}</td>"
                "<td class='num'>{att}</td><td>{err}</td></tr>",
                link=self._run_link(r["id"]),
                task=r["task_id"],
                trigger=r["trigger"],
                st=self._badge(r["status"]),
                created=self._ts(r["created_at"]),
                started=self._ts(r["started_at"]),
                dur=_duration(r["duration_s"]),
                att=r["attempt"],
                err=_clip(r["error"] or r["skip_reason"] or "", 160),
            )
            for r in runs
        )
        return render(
            '<h2 id="runs-h">Runs</h2><div class="scroll"><table aria-labelledby="runs-h">'
            '<thead><tr><th scope="col">run</th><th scope="col">task</th>'
            '<th scope="col">trigger</th><th scope="col">status</th>'
            '<th scope="col">created</th><th scope="col">started</th>'
            '<th scope="col">duration</th><th scope="col">attempt</th>'
            '<th scope="col">error</th></tr></thead><tbody>{rows}</tbody></table></div>',
            rows=rows or Markup('<tr><td colspan="9">no runs match</td></tr>'),
        )

    def _runs_charts(self, task: str | None) -> Markup:
        now = self.clock.now()
        zone = self._zone()
        top = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        start = top - timedelta(hours=24)
        runs = self.control.list_runs(task=task, limit=CHART_RUNS_MAX, since=to_iso(start))
        hours = [start + timedelta(hours=i) for i in range(24)]
        labels = [h.astimezone(zone).strftime("%H") for h in hours]
        buckets = {name: [0.0] * 24 for name in ("success", "failure", "other", "active")}
        late = [0.0] * 24
        for r in runs:
            i = int((from_iso(r["created_at"]) - start).total_seconds() // 3600)
            if not 0 <= i < 24:
                continue
            st = r["status"]
            key = (
                "success"
                if st in _GOOD
                else "failure"
                if st in _BAD
                else "active"
                if st in _ACTIVE
                else "other"
            )
            buckets[key][i] += 1
            if r["trigger"] == "schedule" and r["scheduled_for"] and r["started_at"]:
                lateness = (
                    from_iso(r["started_at"]) - from_iso(r["scheduled_for"])
                ).total_seconds()
                late[i] = max(late[i], lateness)
        scope = f" of task {task}" if task else ""
        capped = (
            render('<p class="muted">The newest {n} runs only.</p>', n=CHART_RUNS_MAX)
            if len(runs) >= CHART_RUNS_MAX
            else Markup("")
        )
        per_hour = charts.stacked_bars(
            "chart-runs",
            f"Runs per hour by outcome{scope}, last 24 hours",
            f"Runs created in each hour ({self.control.config.daemon.timezone}), stacked by "
            "how they ended: succeeded, failed (quarantined, denied, budget), other "
            "(dropped, cancelled, skipped), still active.",
            labels,
            [
                Series("succeeded", "success", buckets["success"]),
                Series("failed", "failure", buckets["failure"]),
                Series("other", "other", buckets["other"]),
                Series("active", "active", buckets["active"]),
            ],
            fmt=lambda v: f"{v:g}",
            label_every=3,
        )
        late_chart = charts.stacked_bars(
            "chart-late",
            f"Start lateness{scope}, last 24 hours",
            "The longest delay in each hour between a scheduled run's fire time and its start.",
            labels,
            [Series("max lateness", "late", late)],
            fmt=_duration_short,
            label_every=3,
        )
        return render('<div class="charts">{a}{c}{b}</div>', a=per_hour, b=late_chart, c=capped)

    async def run_detail(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        run = self.control.get_run(run_id)
        inner = self._run_inner(run)
        here = f"/ui/runs/{seg(run_id)}"
        if run["status"] in FINAL_STATUSES:
            if request.headers.get(FRAGMENT_HEADER):
                return self._response(inner)
            return self._layout(request, f"Run {run_id}", "runs", inner)
        if request.headers.get(FRAGMENT_HEADER):
            return self._response(inner)
        live = self._live(f"/v1/runs/{seg(run_id)}/events/stream", here, inner)
        return self._layout(request, f"Run {run_id}", "runs", live)

    def _run_inner(self, run: Mapping[str, Any]) -> Markup:
        run_id, status = run["id"], run["status"]
        actions: list[Markup] = []
        if status == "quarantined":
            for action in QUARANTINE_ACTIONS:
                actions.append(
                    render(
                        '<a href="/ui/quarantine/{u}/{a}">{t}…</a>',
                        u=seg(run_id),
                        a=action,
                        t=action.capitalize(),
                    )
                )
        if status == "awaiting_approval":
            actions.append(Markup('<a href="/ui/approvals">Decide on its call…</a>'))
        llm = run.get("llm") or {}
        facts = [
            (
                "task",
                render(
                    '<a href="/ui/runs?task={u}">{t}</a>', u=seg(run["task_id"]), t=run["task_id"]
                ),
            ),
            ("status", self._badge(status)),
            ("outcome", escape(run["outcome"] or "—")),
            ("trigger", escape(run["trigger"])),
            ("scheduled for", self._ts(run["scheduled_for"])),
            ("created", self._ts(run["created_at"])),
            ("started", self._ts(run["started_at"])),
            ("finished", self._ts(run["finished_at"])),
            ("duration", escape(_duration(run["duration_s"]))),
            ("attempt", escape(f"{run['attempt']} ({run['failures']} failed)")),
            ("exit code", escape(run["exit_code"] if run["exit_code"] is not None else "—")),
            ("not before", self._ts(run["not_before"])),
            ("error", render('<span class="mono">{e}</span>', e=run["error"] or "—")),
            ("progress", self._progress(run)),
            (
                "LLM cost",
                escape(
                    f"{llm.get('calls', 0)} call(s), {llm.get('input_tokens', 0)} in + "
                    f"{llm.get('output_tokens', 0)} out tokens, "
                    f"{float(llm.get('cost_usd', 0.0)):.6f} USD"
                ),
            ),
        ]
        kv = join(render("<dt>{k}</dt><dd>{v}</dd>", k=k, v=v) for k, v in facts)
        attempts = join(
            render(
                "<tr><td class='num'>{n}</td><td class='mono'>{w}</td><td>{s}</td><td>{f}</td>"
                "<td>{o}</td><td class='num'>{x}</td><td class='num'>{d}</td>"
                "<td class='mono'>{e}</td></tr>",
                n=a["attempt"],
                w=a["worker"] or "—",
                s=self._ts(a["started_at"]),
                f=self._ts(a["finished_at"]),
                o=self._badge(a["outcome"]) if a["outcome"] else Markup("—"),
                x=a["exit_code"] if a["exit_code"] is not None else "—",
                d=_duration(a["duration_s"]),
                e=_clip(a["error"] or "", 300),
            )
            for a in run.get("attempts") or []
        )
        events = self.control.events(run_id, limit=500)
        event_rows = join(
            render(
                "<tr><td class='num'>{id}</td><td>{ts}</td><td>{k}</td>"
                "<td class='mono'>{d}</td></tr>",
                id=e["id"],
                ts=self._ts(e["ts"]),
                k=e["kind"],
                d=_clip(json.dumps(e["data"], sort_keys=True, default=str), 400),
            )
            for e in events
        )
        steps = self.control.transcript(run_id)
        transcript = join(
            render(
                "<li><strong>step {n} · {k}</strong>{c} <span class='muted'>{t}</span>"
                "<pre>{p}</pre></li>",
                n=s["step"],
                k=s["kind"].replace("_", " "),
                c=render(" <code>{c}</code>", c=s["call_id"]) if s["call_id"] else Markup(""),
                t=self._ts(s["recorded_at"]),
                p=_clip(json.dumps(s["payload"], indent=2, sort_keys=True, default=str), 6000),
            )
            for s in steps
        )
        return render(
            "<p class='actions'>{actions}</p>"
            '<dl class="kv">{kv}</dl>'
            '<h2 id="att-h">Attempts</h2><div class="scroll"><table aria-labelledby="att-h">'
            '<thead><tr><th scope="col">#</th><th scope="col">worker</th>'
            '<th scope="col">started</th><th scope="col">finished</th>'
            '<th scope="col">outcome</th><th scope="col">exit</th>'
            '<th scope="col">duration</th><th scope="col">error</th></tr></thead>'
            "<tbody>{attempts}</tbody></table></div>"
            "<h2>Output</h2>{output}"
            "{transcript}"
            '<h2 id="ev-h">Events</h2><div class="scroll"><table aria-labelledby="ev-h">'
            '<thead><tr><th scope="col">id</th><th scope="col">when</th>'
            '<th scope="col">kind</th><th scope="col">data</th></tr></thead>'
            "<tbody>{events}</tbody></table></div>",
            actions=join(actions, " · "),
            kv=kv,
            attempts=attempts or Markup('<tr><td colspan="8">no attempt yet</td></tr>'),
            output=self._output(run),
            transcript=render(
                '<h2>Agent transcript</h2><ol class="transcript">{t}</ol>', t=transcript
            )
            if steps
            else Markup(""),
            events=event_rows or Markup('<tr><td colspan="4">no events</td></tr>'),
        )

    def _progress(self, run: Mapping[str, Any]) -> Markup:
        done, total = run.get("progress_done"), run.get("progress_total")
        message = run.get("progress_message") or ""
        if done is None and not message:
            return Markup('<span class="muted">—</span>')
        if total:
            eta = Markup("")
            if run["status"] == "running" and done and run.get("started_at"):
                elapsed = (self.clock.now() - from_iso(run["started_at"])).total_seconds()
                left = max(0.0, elapsed / done * (total - done))
                eta = render(" · about {t} left", t=_duration_short(left))
            return render(
                '<progress max="{t}" value="{d}" aria-label="progress">{d} of {t}</progress>'
                " {d} of {t}{eta} <span class='muted'>{m}</span>",
                t=total,
                d=done or 0,
                eta=eta,
                m=message,
            )
        return render(
            "{d} <span class='muted'>{m}</span>", d=done if done is not None else "", m=message
        )

    def _output(self, run: Mapping[str, Any]) -> Markup:
        """The tails of stdout.log and stderr.log in the run's workspace (on this node),
        scrubbed of the daemon's secrets."""
        root = Path(self.control.config.daemon.state_dir)
        ws = workspace_path(root, run["task_id"], run["id"])
        parts = []
        for name in ("stdout.log", "stderr.log"):
            path = ws / name
            try:
                if path.resolve().parent != ws.resolve():
                    continue
                with path.open("rb") as fh:
                    size = fh.seek(0, 2)
                    fh.seek(max(0, size - OUTPUT_TAIL_BYTES))
                    data = fh.read(OUTPUT_TAIL_BYTES)
            except OSError:
                continue
            text = self.control.store.redactor.text(data.decode("utf-8", errors="replace"))
            parts.append(
                render(
                    "<h3>{n}{cut}</h3><pre>{t}</pre>",
                    n=name,
                    cut=render(
                        " <span class='muted'>(the last {k} KiB of {s})</span>",
                        k=OUTPUT_TAIL_BYTES // 1024,
                        s=_size(size),
                    )
                    if size > OUTPUT_TAIL_BYTES
                    else Markup(""),
                    t=text or "(empty)",
                )
            )
        if not parts:
            return Markup(
                '<p class="muted">No output on this node (the run wrote none, or it ran on '
                "another node, or retention removed its workspace).</p>"
            )
        return join(parts)

    # ------------------------------------------------------------ quarantine

    async def quarantine(self, request: web.Request) -> web.StreamResponse:
        rows = join(
            render(
                "<tr><td>{link}</td><td>{task}</td><td>{at}</td><td class='num'>{n}</td>"
                "<td class='mono'>{err}</td><td class='actions'>"
                '<a href="/ui/quarantine/{u}/release">Release…<span class="skip"> run {r}'
                '</span></a> <a href="/ui/quarantine/{u}/drop">Drop…<span class="skip"> run'
                " {r}</span></a></td></tr>",
                link=self._run_link(q["run_id"]),
                task=q["task_id"],
                at=self._ts(q["quarantined_at"]),
                n=q["attempts"],
                err=_clip(q["last_error"] or "", 300),
                u=seg(q["run_id"]),
                r=q["run_id"],
            )
            for q in self.control.quarantine_list()
        )
        body = render(
            "{notice}<p>Runs that used up their retries. Release queues one again; drop"
            " ends it (kept in the history as dropped).</p>"
            '<div class="scroll"><table><caption>in quarantine</caption><thead><tr>'
            '<th scope="col">run</th><th scope="col">task</th><th scope="col">since</th>'
            '<th scope="col">attempts</th><th scope="col">last error</th>'
            '<th scope="col">actions</th></tr></thead><tbody>{rows}</tbody></table></div>',
            notice=self._notice(request),
            rows=rows or Markup('<tr><td colspan="6">nothing is in quarantine</td></tr>'),
        )
        return self._layout(request, "Quarantine", "quarantine", body)

    def _quarantine_action(self, request: web.Request) -> tuple[str, str]:
        run_id, action = request.match_info["run_id"], request.match_info["action"]
        if action not in QUARANTINE_ACTIONS:
            raise _Refused(404, f"No quarantine action {action[:40]!r}: release or drop.")
        return run_id, action

    async def quarantine_confirm(self, request: web.Request) -> web.StreamResponse:
        run_id, action = self._quarantine_action(request)
        shown = self.control.quarantine_show(run_id)
        q = shown["quarantine"]
        what = (
            "Queue it again: it runs as soon as a slot is free, with fresh retries."
            if action == "release"
            else "End it for good: it leaves the quarantine and stays in the history as dropped."
        )
        can = request.get(GRANT) == "write"
        body = render(
            '<dl class="kv"><dt>run</dt><dd>{link}</dd><dt>task</dt><dd>{task}</dd>'
            "<dt>quarantined</dt><dd>{at}</dd><dt>attempts</dt><dd>{n}</dd>"
            '<dt>last error</dt><dd class="mono">{err}</dd></dl>'
            "<p>{what}</p>"
            '<form method="post" action="/ui/quarantine/{u}/{a}">'
            '<input type="hidden" name="csrf" value="{csrf}">'
            '<div class="actions"><button type="submit" class="{cls}"{dis}>Yes, {a} run {r}'
            '</button> <a href="/ui/quarantine">No, go back</a></div></form>{ro}',
            link=self._run_link(run_id),
            task=q["task_id"],
            at=self._ts(q["quarantined_at"]),
            n=q["attempts"],
            err=q["last_error"] or "—",
            what=what,
            u=seg(run_id),
            a=action,
            r=run_id,
            csrf=self.csrf(request),
            cls="danger" if action == "drop" else "primary",
            dis=Markup("") if can else Markup(" disabled"),
            ro=Markup("")
            if can
            else Markup('<p class="muted">Signed in with the read token: it cannot act.</p>'),
        )
        return self._layout(request, f"{action.capitalize()} run {run_id}?", "quarantine", body)

    async def quarantine_act(self, request: web.Request) -> web.StreamResponse:
        run_id, action = self._quarantine_action(request)
        self._check_csrf(request, await self._form(request))
        if action == "release":
            self.control.quarantine_release(run_id)
        else:
            self.control.quarantine_drop(run_id)
        log.info("console: quarantine %s run=%s from=%s", action, run_id, request.remote or "-")
        raise web.HTTPSeeOther("/ui/quarantine" + query(done=action, run=run_id))

    # ------------------------------------------------------------ approvals

    async def approvals(self, request: web.Request) -> web.StreamResponse:
        can = request.get(GRANT) == "write"
        dis = Markup("") if can else Markup(" disabled")
        csrf = self.csrf(request)
        items = []
        for a in self.control.approvals(100):
            u = seg(a["run_id"])
            hidden = render(
                '<input type="hidden" name="csrf" value="{c}">'
                '<input type="hidden" name="call_id" value="{k}">',
                c=csrf,
                k=a["call_id"] or "",
            )
            items.append(
                render(
                    '<section class="card" aria-labelledby="ap-{u}">'
                    '<h2 id="ap-{u}">Run {r} · {task}</h2>'
                    '<dl class="kv"><dt>run</dt><dd>{link}</dd><dt>tool</dt><dd><code>{tool}'
                    "</code> (call <code>{call}</code>, step {step})</dd>"
                    "<dt>why</dt><dd>{reason}</dd><dt>asked</dt><dd>{asked}</dd>"
                    "<dt>denied unless decided</dt><dd>{deadline}</dd></dl>"
                    "<h3>Arguments</h3><pre>{args}</pre>"
                    '<div class="actions">'
                    '<form method="post" action="/ui/approvals/{u}/approve">{hidden}'
                    '<button type="submit" class="primary"{dis}>Approve<span class="skip">'
                    " run {r}</span></button></form>"
                    '<form method="post" action="/ui/approvals/{u}/skip">{hidden}'
                    '<div class="field"><label for="skip-{u}">note for the model</label>'
                    '<input id="skip-{u}" name="note" maxlength="{nm}"></div>'
                    '<button type="submit"{dis}>Skip<span class="skip"> run {r}</span>'
                    "</button></form>"
                    '<form method="post" action="/ui/approvals/{u}/deny">{hidden}'
                    '<div class="field"><label for="deny-{u}">reason (kept with the run)</label>'
                    '<input id="deny-{u}" name="note" maxlength="{nm}"></div>'
                    '<button type="submit" class="danger"{dis}>Deny<span class="skip"> run {r}'
                    "</span></button></form></div></section>",
                    u=u,
                    r=a["run_id"],
                    task=a["task_id"],
                    link=self._run_link(a["run_id"]),
                    tool=a["tool"] or "?",
                    call=a["call_id"] or "?",
                    step=a["step"] if a["step"] is not None else "?",
                    reason={
                        "sensitive": "the tool is marked sensitive",
                        "unknown_outcome": "a call whose outcome is unknown (the daemon died"
                        " during it) and the tool is not idempotent",
                    }.get(a["reason"] or "", a["reason"] or "?"),
                    asked=self._ts(a["asked_at"]),
                    deadline=render(
                        "{t} ({c})", t=self._ts(a["deadline"]), c=self._countdown(a["deadline"])
                    )
                    if a["deadline"]
                    else Markup("—"),
                    args=json.dumps(a["arguments"], indent=2, sort_keys=True, default=str),
                    hidden=hidden,
                    dis=dis,
                    nm=NOTE_MAX,
                )
            )
        body = render(
            "{notice}{ro}{items}",
            notice=self._notice(request),
            ro=Markup("")
            if can
            else Markup('<p class="muted">Signed in with the read token: it cannot decide.</p>'),
            items=join(items) or Markup("<p>No run is waiting for a decision.</p>"),
        )
        return self._layout(request, "Approvals", "approvals", body)

    async def decide(self, request: web.Request) -> web.StreamResponse:
        run_id, decision = request.match_info["run_id"], request.match_info["decision"]
        if decision not in APPROVAL_DECISIONS:
            raise _Refused(404, f"No decision {decision[:40]!r}: approve, skip or deny.")
        form = await self._form(request)
        self._check_csrf(request, form)
        call_id = form.get("call_id") or None
        note = form.get("note") or None
        if call_id is not None and len(call_id) > CALL_ID_MAX:
            raise _Refused(400, f"call_id must be at most {CALL_ID_MAX} characters")
        if note is not None and len(note) > NOTE_MAX:
            raise _Refused(400, f"the note must be at most {NOTE_MAX} characters")
        self.control.decide(run_id, decision, call_id, note)
        log.info(
            "console: approval %s run=%s call=%s from=%s",
            decision,
            run_id,
            call_id or "-",
            request.remote or "-",
        )
        raise web.HTTPSeeOther("/ui/approvals" + query(done=decision, run=run_id))

    # ------------------------------------------------------------ spend

    async def spend(self, request: web.Request) -> web.StreamResponse:
        report = self.control.spend()
        g = report["global"]

        def window_cell(w: Mapping[str, Any], label: str) -> Markup:
            return render(
                "{m}<div class='muted'>{c} call(s), {i} in + {o} out tokens</div>",
                m=charts.meter(float(w["spent_usd"]), w["limit_usd"], label),
                c=w["calls"],
                i=w["input_tokens"],
                o=w["output_tokens"],
            )

        rows = join(
            render(
                '<tr><th scope="row">{t}</th><td>{d}</td><td>{m}</td><td class="mono">{rb}</td>'
                "</tr>",
                t=t["task"],
                d=window_cell(t["day"], f"{t['task']} today"),
                m=window_cell(t["month"], f"{t['task']} this month"),
                rb=", ".join(f"{k}: {v}" for k, v in t["run_budget"].items() if v is not None)
                or "none",
            )
            for t in report["tasks"]
        )
        body = render(
            '<div class="cards"><div class="card"><dl><dt>all tasks today ({zone})</dt>'
            "<dd>{gd}</dd><dt>all tasks this month</dt><dd>{gm}</dd></dl></div></div>"
            "{chart}"
            '<h2 id="sp-h">Per task</h2><div class="scroll"><table aria-labelledby="sp-h">'
            '<thead><tr><th scope="col">task</th><th scope="col">today</th>'
            '<th scope="col">this month</th><th scope="col">per-run budget</th></tr></thead>'
            "<tbody>{rows}</tbody></table></div>",
            zone=g["day"]["timezone"],
            gd=window_cell(g["day"], "all tasks today"),
            gm=window_cell(g["month"], "all tasks this month"),
            chart=self._spend_chart([t["task"] for t in report["tasks"]]),
            rows=rows or Markup('<tr><td colspan="4">no task calls a model</td></tr>'),
        )
        return self._layout(request, "Spend", "spend", body)

    def _spend_chart(self, tasks: Sequence[str]) -> Markup:
        """Spend per day over the last ``SPEND_DAYS`` days in the limits' zone, the
        biggest spenders of the period stacked apart, the rest as ``other``."""
        config, store = self.control.config, self.control.store
        zone = config.limits_timezone
        now = self.clock.now()
        days: list[tuple[datetime, datetime]] = []
        start, end = window_at("day", now, zone)
        for _ in range(SPEND_DAYS):
            days.append((start, end))
            start, end = window_at("day", start - timedelta(seconds=1), zone)
        days.reverse()

        def spent(task_id: str | None, s: datetime, e: datetime) -> float:
            key = f"task:{task_id}:day" if task_id else "global:day"
            scope = Scope(key, key, task_id, "day", None, None, s, e)
            return float(store.window_usage(scope)["spent_usd"])

        total = [spent(None, s, e) for s, e in days]
        per_task = {t: [spent(t, s, e) for s, e in days] for t in tasks} if any(total) else {}
        biggest = sorted(per_task, key=lambda t: -sum(per_task[t]))[:SPEND_TASK_SERIES]
        biggest = [t for t in biggest if sum(per_task[t]) > 0]
        series = [Series(t, f"t{i}", per_task[t]) for i, t in enumerate(biggest)]
        rest = [max(0.0, total[i] - sum(per_task[t][i] for t in biggest)) for i in range(len(days))]
        series.append(Series("other" if biggest else "all tasks", "spend", rest))
        labels = [s.astimezone(ZoneInfo(zone)).strftime("%m-%d") for s, _ in days]
        return charts.stacked_bars(
            "chart-spend",
            f"Spend per day, last {SPEND_DAYS} days ({zone})",
            "USD spent on model calls each day (calls in flight at their worst case), the "
            "tasks that spent most shown apart.",
            labels,
            series,
            fmt=lambda v: f"{v:.4g}",
            label_every=5,
        )

    # ------------------------------------------------------------ alerts and nodes

    async def alerts(self, request: web.Request) -> web.StreamResponse:
        alerts = self.control.alerts(100)
        tally: dict[str, int] = {}
        rows = []
        for a in alerts:
            deliveries = a.get("deliveries") or []
            for d in deliveries:
                tally[d["status"]] = tally.get(d["status"], 0) + 1
            rows.append(
                render(
                    "<tr><td>{ts}</td><td>{kind}</td><td>{task}</td><td>{run}</td>"
                    "<td>{summary}</td><td><ul>{dl}</ul></td></tr>",
                    ts=self._ts(a["ts"]),
                    kind=a["kind"],
                    task=a["task_id"] or "—",
                    run=self._run_link(a["run_id"]) if a["run_id"] else Markup("—"),
                    summary=_clip(a["summary"], 400),
                    dl=join(
                        render(
                            "<li>{ch}: {st} after {n} attempt(s){at}{err}</li>",
                            ch=d["channel"],
                            st=self._badge(
                                d["status"],
                                "succeeded"
                                if d["status"] == "delivered"
                                else "bad"
                                if d["status"] == "failed"
                                else "warn",
                            ),
                            n=d["attempts"],
                            at=render(", {t}", t=self._ts(d["delivered_at"]))
                            if d.get("delivered_at")
                            else Markup(""),
                            err=render(
                                ' <span class="mono">{e}</span>', e=_clip(d["last_error"], 200)
                            )
                            if d.get("last_error")
                            else Markup(""),
                        )
                        for d in deliveries
                    )
                    or Markup("<li class='muted'>no channel</li>"),
                )
            )
        outbox = join(
            render("<li>{s}: {n}</li>", s=s, n=n) for s, n in sorted(tally.items())
        ) or Markup("<li>no deliveries</li>")
        body = render(
            '<h2>Outbox</h2><p class="muted">Deliveries of the alerts below, by state.</p>'
            '<ul>{outbox}</ul><h2 id="al-h">Alerts</h2><div class="scroll">'
            '<table aria-labelledby="al-h"><thead><tr><th scope="col">when</th>'
            '<th scope="col">kind</th><th scope="col">task</th><th scope="col">run</th>'
            '<th scope="col">summary</th><th scope="col">deliveries</th></tr></thead>'
            "<tbody>{rows}</tbody></table></div>",
            outbox=outbox,
            rows=join(rows) or Markup('<tr><td colspan="6">no alerts</td></tr>'),
        )
        return self._layout(request, "Alerts and outbox", "alerts", body)

    async def nodes(self, request: web.Request) -> web.StreamResponse:
        rows = join(
            render(
                "<tr><td class='mono'>{id}</td><td>{host}</td><td class='num'>{pid}</td>"
                "<td>{ver}</td><td class='mono'>{gen}{diff}</td><td>{started}</td>"
                "<td>{seen}</td><td>{alive}</td><td class='num'>{held}</td></tr>",
                id=n["id"],
                host=n["host"],
                pid=n["pid"],
                ver=n["version"],
                gen=str(n["config_generation"])[:12],
                diff=render(" {b}", b=self._badge("differs", "warn"))
                if n["config_differs"]
                else Markup(""),
                started=self._ts(n["started_at"]),
                seen=self._ts(n["last_seen"]),
                alive=self._badge("alive", "succeeded")
                if n["alive"]
                else self._badge("stopped" if n.get("stopped_at") else "gone", "dropped"),
                held=n["runs_held"],
            )
            for n in self.control.nodes()
        )
        body = render(
            '<p class="muted">Every daemon that has opened this state (on PostgreSQL, all the'
            " nodes that share it).</p>"
            '<div class="scroll"><table><thead><tr><th scope="col">node</th>'
            '<th scope="col">host</th><th scope="col">pid</th><th scope="col">version</th>'
            '<th scope="col">config</th><th scope="col">started</th>'
            '<th scope="col">last seen</th><th scope="col">state</th>'
            '<th scope="col">runs held</th></tr></thead><tbody>{rows}</tbody></table></div>',
            rows=rows or Markup('<tr><td colspan="9">no nodes</td></tr>'),
        )
        return self._layout(request, "Nodes", "nodes", body)


# ---------------------------------------------------------------- helpers


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value[:2000]
    return "/ui/tasks"


def _same_site_back(request: web.Request) -> str:
    ref = request.headers.get("Referer", "")
    parts = urllib.parse.urlsplit(ref)
    if parts.netloc == request.host and parts.path.startswith("/ui"):
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return "/ui/tasks"


def _human(seconds: float) -> str:
    """A countdown as the script renders it: ``in 4m 05s``, ``2h 03m ago``."""
    neg = seconds < 0
    s = abs(round(seconds))
    d, h, m, sec = s // 86400, s % 86400 // 3600, s % 3600 // 60, s % 60
    text = f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"
    return f"{text} ago" if neg else f"in {text}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.2f} s" if seconds < 60 else _duration_short(seconds)


def _duration_short(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds > 0 else "0"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
