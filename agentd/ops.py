"""The operator commands (``agentd status``, ``tasks``, ``runs``, ``pause`` ...).

Each goes through the daemon's API when one answers; otherwise it writes the state DB
directly, in the same transactions the daemon uses (``Control``), so it works just as
well while the daemon is stopped.

While the config file is broken (``broken_config_command``) they go through the API
only: the state DB is not touched without a valid config to bring its tasks up to.

The API token is ``$AGENTD_TOKEN`` when set, else the one the config's ``daemon.http``
names (``token_env``, ``token_file``), else its read token (``read_token_env``,
``read_token_file``: enough for every command that only reads). It is sent with every
request, GETs and the event streams included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from agentd import exitcodes
from agentd.client import ApiClient, ApiError, Unreachable, default_url
from agentd.cliout import View, paint, parse_instant, progress_line
from agentd.clock import SystemClock
from agentd.config import (
    Config,
    ConfigError,
    DaemonConfig,
    lenient_daemon,
    task_index,
)
from agentd.models import FINAL_STATUSES, EventKind, Row, StateRefused
from agentd.redact import SecretUnavailable, read_secret

if TYPE_CHECKING:  # at run time only the direct path (no daemon answering) loads them
    from agentd.control import Control
    from agentd.executors.replay import Report
    from agentd.state.port import Store


def _open_postgres(config: Config) -> Store:
    """The shared state on PostgreSQL: the same for reads and writes (the database is
    the daemons', and a CLI's write is announced to them by NOTIFY)."""
    from agentd.state.port import StorageError
    from agentd.state.postgres.engine import PostgresStore

    assert config.state.url is not None
    try:
        password = read_secret(
            config.state.password_env, config.state.password_file, "state password"
        )
    except SecretUnavailable as exc:
        raise StateRefused("no_state", f"state: {exc}") from None
    try:
        store = PostgresStore(config.state.url, password=password)
    except StorageError as exc:
        raise StateRefused("no_state", f"state: PostgreSQL cannot be used: {exc}") from None
    return store


def open_store(config: Config, *, read_only: bool = False) -> Store:
    """Open the state DB. For a write: if no daemon holds it, bring its task table up to
    the config so commands also work on a daemon that has never started. For a read
    (``read_only``): as it is, creating and writing nothing; a ``StateRefused`` when there
    is no state DB yet or it is not at this agentd's schema."""
    root = config.daemon.state_dir
    if config.state.url is not None:
        return _open_postgres(config)
    from agentd.state.sqlite import statedir  # (sqlite3 and the checks: the direct path's)

    db_path = statedir.paths(root)[0]
    from agentd.state.sqlite.engine import SqliteStore

    if read_only:
        alone = statedir.lock_holder(root) is None
        if alone:
            statedir.guard_open(root)  # what the daemon would refuse, this refuses too
        try:
            return SqliteStore(db_path, read_only=True, immutable=alone)
        except StateRefused as exc:
            if exc.code == "no_state":
                raise StateRefused(
                    "no_state",
                    f"no daemon answers and there is no state DB at {db_path} yet: "
                    "nothing has run with this config",
                ) from None
            raise
    statedir.prepare_state_dir(root)
    alone = statedir.lock_holder(root) is None
    if alone:
        statedir.guard_open(root)  # what the daemon would refuse, this refuses too
    store = SqliteStore(db_path)
    if alone:
        store.sync_tasks(task_index(config), SystemClock().now())
    return store


class CliCommands:
    """The CLI's side of each operator command: it routes the command to the daemon's
    API when one answers, else runs it on the state directly with ``Control`` (the one
    implementation of the operator verbs, which the API runs too)."""

    def __init__(
        self,
        config: Config | None,
        url: str | None,
        daemon: DaemonConfig | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        """``config`` None: the file is broken, and only the API is used, at ``url`` or
        where ``daemon`` (what could be read of its section, else the defaults) says.
        ``timeout_s``: how long a request waits for the daemon's answer."""
        self.config = config
        if daemon is None:
            daemon = config.daemon if config is not None else DaemonConfig()
        token = os.environ.get("AGENTD_TOKEN", "").strip() or None
        http = daemon.http
        for env_name, path, what in (
            (http.token_env, http.token_file, "API token"),
            (http.read_token_env, http.read_token_file, "read token"),
        ):
            if token is not None:
                break
            try:
                token = read_secret(env_name, path, what)
            except SecretUnavailable as exc:
                # Without it the daemon's own 401 (or 403) says what was refused.
                print(f"agentd: warning: {exc}", file=sys.stderr)
        self.api: ApiClient | None = ApiClient(url or default_url(daemon.http), token, timeout_s)
        self.url_given = url is not None
        """``--url`` names the daemon to ask: no other (nor the state DB) answers instead."""
        self._store: Store | None = None
        self._ctl: Control | None = None
        self._reader_store: Store | None = None
        self._reader: Control | None = None

    def close(self) -> None:
        if self.api:
            self.api.close()
        if self._store:
            self._store.close()
        if self._reader_store:
            self._reader_store.close()

    @property
    def ctl(self) -> Control:
        if self._ctl is None:
            assert self.config is not None, "no state DB access without a valid config"
            self._store = open_store(self.config)
            # A write is announced to a running daemon whose API we could not reach: it
            # acts now.
            from agentd.control import Control

            self._ctl = Control(
                self._store, self.config, SystemClock(), on_change=self._store.announce_change
            )
        return self._ctl

    @property
    def reader(self) -> Control:
        """``Control`` over the state DB opened read-only: what reads use."""
        if self._reader is None:
            assert self.config is not None, "no state DB access without a valid config"
            from agentd.control import Control

            self._reader_store = open_store(self.config, read_only=True)
            self._reader = Control(self._reader_store, self.config, SystemClock())
        return self._reader

    def call(
        self,
        api: Callable[[ApiClient], Any],
        direct: Callable[[Control], Any],
        *,
        writes: bool = False,
    ) -> Any:
        """``api`` on the daemon; ``direct`` on the state DB when no daemon answers (with
        a valid config: else ``Unreachable`` goes to the caller): read-only unless the
        command ``writes``, so reading never creates or changes the state DB."""
        if self.api is not None:
            try:
                return api(self.api)
            except Unreachable:
                if self.config is None or self.url_given:
                    raise
                self.api = None  # no daemon: work on the DB from here on
        return direct(self.ctl if writes else self.reader)

    def status(self) -> Row:
        def via_api(c: ApiClient) -> Row:
            status: Row = c.get("/v1/status")
            status["health"] = c.get("/healthz")
            status["readiness"] = c.get("/readyz")
            status["daemon"] = "running"
            return status

        def direct(ctl: Control) -> Row:
            return {
                "daemon": "not running",
                "counts": ctl.counts(),
                "tasks": len(ctl.config.tasks),
            }

        try:
            result: Row = self.call(via_api, direct)
        except StateRefused as exc:
            if exc.code != "no_state" or self.config is None:
                raise
            return {"daemon": "not running", "state_db": str(exc), "tasks": len(self.config.tasks)}
        return result


def state_command(config: Config, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """One operator command; an API or state error is printed and exits 1."""
    try:
        ops = CliCommands(config, args.url)
        try:
            try:
                return _dispatch(ops, args, parser)
            except (ApiError, StateRefused) as exc:
                if exc.code != "unknown_task":
                    raise
                _emit_error(args, exc.code, str(exc) + _unknown_task_hint(ops, args))
                return 1
        finally:
            ops.close()
    except (ApiError, StateRefused) as exc:
        _emit_error(args, exc.code, str(exc))
        return 1
    except Unreachable as exc:  # only with --url: nothing else is asked instead
        _emit_error(args, "no_daemon", str(exc))
        return exitcodes.NOT_RUNNING
    except Exception as exc:
        # The state dir's refusals come from the direct path, which has loaded statedir.
        from agentd.state.sqlite.statedir import Refusal

        if not isinstance(exc, Refusal):
            raise
        print(f"agentd: {exc}", file=sys.stderr)
        return exc.exit_code


def broken_config_command(
    config_path: Path,
    broken: ConfigError,
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
) -> int:
    """One operator command while the config file does not validate: through the API of
    the daemon at ``--url``, or where the file's ``daemon:`` section says when it still
    validates alone, else at the default address; with one warning line naming the
    file's first problem. When no daemon answers: the whole config error, exit 78.

    With ``--url`` the file is not needed: one that is missing or cannot be read is no
    warning (its ``daemon.http`` could only have named a token source), and when no
    daemon answers at that URL the answer is that, exit 3 (``NOT_RUNNING``)."""
    daemon = lenient_daemon(config_path)
    if not (args.url and not _readable(config_path)):
        first = broken.problems[0] if broken.problems else None
        problem = f"{first.path or '<top>'}: {first.message}" if first else "invalid"
        where = args.url or default_url((daemon or DaemonConfig()).http)
        print(
            f"agentd: warning: config file {broken.source} is broken ({problem}); "
            f"asking the daemon at {where}".replace("\n", " "),
            file=sys.stderr,
        )
    try:
        ops = CliCommands(None, args.url, daemon)
        try:
            try:
                return _dispatch(ops, args, parser)
            except ApiError as exc:
                if exc.code != "unknown_task":
                    raise
                _emit_error(args, exc.code, str(exc) + _unknown_task_hint(ops, args))
                return 1
        finally:
            ops.close()
    except (Unreachable, StateRefused) as exc:
        if isinstance(exc, StateRefused) and exc.code != "no_daemon":
            _emit_error(args, exc.code, str(exc))
            return 1
        if args.url:
            _emit_error(args, "no_daemon", str(exc))
            return exitcodes.NOT_RUNNING
        print(broken.render(), file=sys.stderr)
        print(f"agentd: and no daemon answers: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    except ApiError as exc:
        _emit_error(args, exc.code, str(exc))
        return 1


def _readable(path: Path) -> bool:
    """Whether ``path`` opens as a file for reading (not missing, not a directory, not
    withheld by its mode)."""
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


RELOAD_POLL_S = 0.05
"""How often ``agentd reload --wait`` asks the daemon whether its reload has ended."""


def _reload(ops: CliCommands, args: argparse.Namespace) -> int:
    """SIGHUP to the daemon the API names; with ``--wait``, its outcome: a reload begun
    after the status read below (so after the operator's edit) has ended once
    ``reloads_done`` passes that read's ``reloads_started`` (the signal makes sure one
    begins: at once, or after the one in progress)."""
    if ops.api is None:
        print("agentd: no daemon API to reload through", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    try:
        before = ops.api.get("/v1/status")
    except Unreachable as exc:
        print(f"agentd: no daemon answers, nothing to reload: {exc}", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    pid = int(before["pid"])
    if args.pid is not None and args.pid != pid:
        print(
            f"agentd: the daemon answering at the API is pid {pid}, not {args.pid}; "
            "not signalling it",
            file=sys.stderr,
        )
        return exitcodes.REFUSED
    os.kill(pid, signal.SIGHUP)
    if not args.wait:
        print(f"reload requested (SIGHUP to pid {pid})")
        return exitcodes.OK
    started = int(before.get("reloads_started", 0))
    deadline = time.monotonic() + args.timeout
    while True:
        status = ops.api.get("/v1/status")
        if int(status["pid"]) != pid:
            print(f"agentd: the daemon restarted (pid {status['pid']}) during the reload",
                  file=sys.stderr)  # fmt: skip
            return exitcodes.REFUSED
        if int(status.get("reloads_done", 0)) > started:
            break
        if time.monotonic() > deadline:
            print(f"agentd: no reload ended within {args.timeout:g} s", file=sys.stderr)
            return exitcodes.REFUSED
        time.sleep(RELOAD_POLL_S)
    if status["last_reload_ok"]:
        print(f"reload ok: generation {status['config_generation']}, {status['tasks']} task(s)")
        return exitcodes.OK
    print(
        f"agentd: reload failed, keeping the running config: {status['last_reload_error']}",
        file=sys.stderr,
    )
    return exitcodes.CONFIG


def _dispatch(ops: CliCommands, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cmd = args.command
    q = urllib.parse.quote
    if cmd == "reload":
        return _reload(ops, args)
    if cmd == "status":
        status = ops.status()
        _print_detail(args, status)
        return 0 if status.get("daemon") == "running" else 3
    if cmd == "logs":
        return _logs(ops, args)
    if cmd == "tasks" and args.action == "show":
        if not args.task:
            parser.error("tasks show needs a task name")
        if args.watch:
            parser.error("--watch goes with `tasks` and `runs` lists")
        return _print_detail(args, _task_detail(ops, args))
    if cmd == "tasks":
        if args.task:
            parser.error(f"tasks {args.task}: did you mean `tasks show {args.task}`?")

        def tasks_table() -> list[str]:
            tasks = ops.call(lambda c: c.get("/v1/tasks")["tasks"], lambda ctl: ctl.list_tasks())
            view = _view(args)
            # -o json and yaml: the rows as before (next_run in the task's own zone).
            rows = [_task_row(t, None if view.machine else view) for t in tasks]
            return _render(args, rows, TASK_COLUMNS, TASK_WIDE)

        return _watch(args, tasks_table) if args.watch else _print_lines(tasks_table())
    if cmd == "runs" and args.transcript and args.action != "show":
        parser.error("--transcript goes with `runs show RUN`")
    if cmd == "runs" and args.action != "replay":
        given = [f"--{n.replace('_', '-')}" for n in REPLAY_FLAGS if getattr(args, n)]
        if given:
            parser.error(f"{', '.join(given)}: only with `runs replay RUN`")
    if cmd == "runs" and args.action == "replay":
        return _replay(ops, args, parser)
    if cmd == "runs" and args.action == "resume":
        if not args.run_id:
            parser.error("runs resume needs a run id")
        rid = q(args.run_id, safe="")
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/runs/{rid}/resume"),
                lambda ctl: ctl.resume_run(args.run_id),
                writes=True,
            ),
        )
    if cmd == "runs" and args.action in ("show", "watch"):
        if not args.run_id:
            parser.error(f"runs {args.action} needs a run id")
        rid = q(args.run_id, safe="")
        if args.action == "watch":
            return _follow(ops, args, f"/v1/runs/{rid}/events/stream")
        if args.transcript:
            steps = ops.call(
                lambda c: c.get(f"/v1/runs/{rid}/transcript")["steps"],
                lambda ctl: ctl.transcript(args.run_id),
            )
            if _view(args).machine:
                print(_view(args).dump({"run_id": args.run_id, "steps": steps}))
            else:
                print("\n".join(transcript_lines(steps)))
            return 0
        detail = ops.call(lambda c: c.get(f"/v1/runs/{rid}"), lambda ctl: ctl.get_run(args.run_id))
        if args.watch:
            parser.error("--watch goes with the `runs` list (`runs watch RUN` follows one run)")
        detail["events"] = ops.call(
            lambda c: c.get(f"/v1/runs/{rid}/events")["events"],
            lambda ctl: ctl.events(run_id=args.run_id),
        )
        tails = {s: _output_slice(ops, args.run_id, s, tail=True) for s in ("stdout", "stderr")}
        if _view(args).machine:
            detail["output"] = {f"{s}_tail": page["text"] for s, page in tails.items()}
            return _print_detail(args, detail)
        _print_detail(args, detail)
        for stream, page in tails.items():
            every = page["text"].splitlines()
            lines = every[-TAIL_LINES:]
            if lines:
                whole = not page["offset"] and len(lines) == len(every)
                cut = "" if whole else " (its last lines; agentd logs for all)"
                print(f"{stream}{cut}:")
                print("\n".join(f"  | {line}" for line in lines))
        return 0
    if cmd == "runs":
        try:
            since = _when(args.since, args.utc)
            until = _when(args.until, args.utc)
        except ValueError as exc:
            parser.error(str(exc))

        def runs_table() -> list[str]:
            rows = ops.call(
                lambda c: c.get(
                    "/v1/runs",
                    task=args.task,
                    status=args.status,
                    limit=args.limit,
                    since=since,
                    until=until,
                )["runs"],
                lambda ctl: ctl.list_runs(
                    args.task, args.status, args.limit, since=since, until=until
                ),
            )
            if not _view(args).machine:
                for row in rows:
                    total = row.get("progress_total")
                    row["progress"] = f"{row.get('progress_done')}/{total}" if total else None
                    row["eta"] = row.get("progress_eta")  # when a running run should end
            return _render(args, rows, RUN_COLUMNS, RUN_WIDE)

        return _watch(args, runs_table) if args.watch else _print_lines(runs_table())
    if cmd == "spend":
        report = ops.call(
            lambda c: c.get("/v1/spend", task=args.task),
            lambda ctl: ctl.spend(args.task),
        )
        if _view(args).machine:
            print(_view(args).dump(report))
            return 0
        windows = [w for t in report["tasks"] for w in (t["day"], t["month"])]
        if not args.task:
            windows += [report["global"]["day"], report["global"]["month"]]
        return _print(args, [_spend_row(w) for w in windows], list(_SPEND_COLUMNS))
    if cmd == "nodes":
        rows = ops.call(lambda c: c.get("/v1/nodes")["nodes"], lambda ctl: ctl.nodes())
        for row in rows:
            row["state"] = (
                "stopped" if row["stopped_at"] else "alive" if row["alive"] else "not seen"
            ) + (" (config differs)" if row["config_differs"] else "")
        return _print(
            args,
            rows,
            ["id", "state", "version", "config_generation", "runs_held", "last_seen"],
        )
    if cmd == "alerts":
        rows = ops.call(
            lambda c: c.get("/v1/alerts", limit=args.limit)["alerts"],
            lambda ctl: ctl.alerts(args.limit),
        )
        for row in rows:
            row["delivered"] = " ".join(
                f"{d['channel']}:{d['status']}" for d in row.get("deliveries", [])
            )
        return _print(args, rows, ["id", "ts", "kind", "task_id", "delivered", "summary"])
    if cmd == "events":
        if args.follow:
            return _follow(ops, args, "/v1/events/stream")
        wanted = _event_filter(args)
        tail = args.limit if wanted is None else EVENT_FILTER_WINDOW
        rows = ops.call(
            lambda c: c.get("/v1/events", tail=tail)["events"],
            lambda ctl: ctl.recent_events(tail),
        )
        if wanted is not None:
            rows = [e for e in rows if wanted(e)][-args.limit :]
        view = _view(args)
        if args.output == "yaml":
            print(view.dump(rows))
            return 0
        for event in rows:
            print(json.dumps(event, default=str) if args.json else _event_line(event, view))
        return 0
    if cmd == "approvals":
        rows = ops.call(
            lambda c: c.get("/v1/approvals", limit=args.limit)["approvals"],
            lambda ctl: ctl.approvals(args.limit),
        )
        if not _view(args).machine:
            for row in rows:
                row["arguments"] = json.dumps(row["arguments"], sort_keys=True)
        return _print(
            args,
            rows,
            ["run_id", "task_id", "call_id", "tool", "reason", "arguments", "deadline"],
        )
    if cmd in ("approve", "deny"):
        decision = "deny" if cmd == "deny" else "skip" if args.skip else "approve"
        rid = q(args.run_id, safe="")
        body = {k: v for k, v in (("call_id", args.call), ("note", args.note)) if v is not None}
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/approvals/{rid}/{decision}", body),
                lambda ctl: ctl.decide(args.run_id, decision, args.call, args.note),
                writes=True,
            ),
        )
    if cmd == "backfill":
        bounds: list[datetime] = []
        for flag, text in (("--from", args.start), ("--to", args.end)):
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                moment = None
            if moment is None or moment.utcoffset() is None:
                parser.error(f"{flag} must be an ISO 8601 date-time with a UTC offset")
            bounds.append(moment)
        tid = q(args.task, safe="")
        body = {"from": args.start, "to": args.end, "dry_run": args.dry_run}
        report = ops.call(
            lambda c: c.post(f"/v1/tasks/{tid}/backfill", body),
            lambda ctl: ctl.backfill(args.task, bounds[0], bounds[1], dry_run=args.dry_run),
            writes=not args.dry_run,
        )
        if args.json:
            print(json.dumps(report, indent=2, default=str))
            return 0
        verb = "would enqueue" if args.dry_run else f"{report.get('created', 0)} enqueued of"
        print(f"backfill {report['task']}: {verb} {report['count']} occurrence(s)")
        columns = ["scheduled_for"] if args.dry_run else ["scheduled_for", "run_id", "status"]
        rows = [{**o, "status": o.get("reason") or o.get("status")} for o in report["occurrences"]]
        return _print(args, rows, columns) if rows else 0
    if cmd in ("trigger", "pause", "resume"):
        tid = q(args.task, safe="")
        body = {"reason": args.reason} if cmd == "pause" else {}
        headers: dict[str, str] | None = None
        trigger_params: Row | None = None
        if cmd == "trigger":
            try:
                trigger_params = parse_params(args.param)
            except ValueError as exc:
                parser.error(str(exc))
            body = {"approve_sensitive": True} if args.approve_sensitive else {}
            if trigger_params:
                body["params"] = trigger_params
            headers = {"Idempotency-Key": args.key} if args.key is not None else None
        direct: dict[str, Callable[[Control], Row]] = {
            "trigger": lambda ctl: ctl.trigger(
                args.task, args.approve_sensitive, trigger_params, args.key
            ),
            "pause": lambda ctl: ctl.pause(args.task, args.reason),
            "resume": lambda ctl: ctl.resume(args.task),
        }
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/tasks/{tid}/{cmd}", body, headers),
                direct[cmd],
                writes=True,
            ),
        )
    if cmd == "cancel":
        rid = q(args.run_id, safe="")
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/runs/{rid}/cancel"),
                lambda ctl: ctl.cancel(args.run_id),
                writes=True,
            ),
        )
    if cmd == "quarantine":
        if args.action == "list":
            rows = ops.call(
                lambda c: c.get("/v1/quarantine")["quarantine"], lambda ctl: ctl.quarantine_list()
            )
            return _print(
                args, rows, ["run_id", "task_id", "quarantined_at", "attempts", "last_error"]
            )
        if not args.run_id:
            parser.error(f"quarantine {args.action} needs a run id")
        rid = q(args.run_id, safe="")
        if args.action == "show":
            return _print_detail(
                args,
                ops.call(
                    lambda c: c.get(f"/v1/quarantine/{rid}"),
                    lambda ctl: ctl.quarantine_show(args.run_id),
                ),
            )
        from agentd.control import Control

        local = {"release": Control.quarantine_release, "drop": Control.quarantine_drop}
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/quarantine/{rid}/{args.action}"),
                lambda ctl: local[args.action](ctl, args.run_id),
                writes=True,
            ),
        )
    parser.error(f"unknown command {cmd}")
    return exitcodes.USAGE


REPLAY_FLAGS = ("model", "prompt_file", "system_file", "cassette", "out")

TASK_ALERTS = 5
"""How many of a task's newest alerts ``tasks show`` lists."""
ALERTS_SCANNED = 1000
"""Among how many of the newest alerts (the most ``GET /v1/alerts`` returns) they are."""


def _task_detail(ops: CliCommands, args: argparse.Namespace) -> Row:
    """``tasks show TASK``: the task as the daemon has it (next fires, paused, last
    outcome: ``GET /v1/tasks/TASK``), its definition from the config file (secrets
    masked by key and by value, as ``check-config --show`` does; absent when the file
    cannot be used here), its last ``--last`` runs, its spend windows and its newest
    alerts."""
    tid = urllib.parse.quote(args.task, safe="")
    task: Row = ops.call(lambda c: c.get(f"/v1/tasks/{tid}"), lambda ctl: ctl.get_task(args.task))
    detail: Row = dict(task)
    view = _view(args)
    if not view.machine:  # each fire in the operator's zone, and in the task's
        detail["next_runs"] = [
            f"{view.instant_zoned(f['utc'])}  ({_short_local(f['local'])} in the task's zone)"
            if not view.utc and f["local"][-6:] != _local_offset(f["utc"])
            else view.instant_zoned(f["utc"])
            for f in task.get("next_runs", [])
        ]
    if ops.config is not None and args.task in ops.config.tasks:
        from agentd.config import redacted, secret_refs
        from agentd.redact import read_secrets

        scrub = read_secrets(secret_refs(ops.config))
        definition = redacted(ops.config)["tasks"][args.task]
        detail["definition"] = _pruned(json.loads(scrub.text(json.dumps(definition))))
    else:
        detail["definition"] = "(not shown: the config file cannot be read here)"
    limit = max(1, min(args.last, 1000))
    runs = ops.call(
        lambda c: c.get("/v1/runs", task=args.task, limit=limit)["runs"],
        lambda ctl: ctl.list_runs(args.task, None, limit),
    )
    detail["last_runs"] = [
        {k: r.get(k) for k in ("id", "status", "trigger", "created_at", "duration_s", "error")}
        for r in runs
    ]
    spend: Row = ops.call(
        lambda c: c.get("/v1/spend", task=args.task), lambda ctl: ctl.spend(args.task)
    )
    detail["spend"] = [
        _spend_row(w) for t in spend.get("tasks", []) for w in (t["day"], t["month"])
    ]
    alerts = ops.call(
        lambda c: c.get("/v1/alerts", limit=ALERTS_SCANNED)["alerts"],
        lambda ctl: ctl.alerts(ALERTS_SCANNED),
    )
    detail["alerts"] = [
        {
            "id": a.get("id"),
            "ts": a.get("ts"),
            "kind": a.get("kind"),
            "summary": a.get("summary"),
            "delivered": " ".join(f"{d['channel']}:{d['status']}" for d in a.get("deliveries", [])),
        }
        for a in alerts
        if a.get("task_id") == args.task
    ][:TASK_ALERTS]
    return detail


def _pruned(value: Any) -> Any:
    """``value`` without the keys that hold nothing (None, empty): a definition as it
    was written, not every default the model has."""
    if isinstance(value, dict):
        kept = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def _local_offset(utc_iso: str) -> str:
    """The operator's zone's UTC offset at an instant, as ``+HH:MM``."""
    moment = datetime.fromisoformat(utc_iso.replace("Z", "+00:00")).astimezone()
    return moment.isoformat()[-6:]


TAIL_BYTES = 4096
TAIL_LINES = 20
"""``runs show``: the last lines (at most this many, of the last ``TAIL_BYTES``) of a
run's stdout and stderr."""


def _output_slice(
    ops: CliCommands, run_id: str, stream: str, offset: int = 0, tail: bool = False
) -> Row:
    """A slice of a run's ``stream`` (``GET /v1/runs/RUN/output``, else its workspace,
    read-only), from ``offset``; with ``tail``, the last ``TAIL_BYTES`` of it (two
    asks when the output is longer than one slice)."""
    from agentd.runoutput import OUTPUT_PAGE, read_output

    rid = urllib.parse.quote(run_id, safe="")

    def direct(ctl: Control, at: int) -> Row:
        run = ctl.get_run(run_id)
        path = ctl.config.daemon.state_dir / "runs" / run["task_id"] / run_id / f"{stream}.log"
        final = run["status"] in FINAL_STATUSES
        return {"status": run["status"], **read_output(path, at, OUTPUT_PAGE, final)}

    def ask(at: int) -> Row:
        page: Row = ops.call(
            lambda c: c.get(f"/v1/runs/{rid}/output", stream=stream, offset=at),
            lambda ctl: direct(ctl, at),
        )
        return page

    page = ask(offset)
    if tail and int(page["size"]) > TAIL_BYTES:
        page = ask(int(page["size"]) - TAIL_BYTES)
        text = str(page["text"])
        if "\n" in text:  # from the first whole line
            page["text"] = text[text.index("\n") + 1 :]
    return page


def _logs(ops: CliCommands, args: argparse.Namespace) -> int:
    """``logs RUN [-f] [--stderr]``: the run's captured output, in slices of
    ``GET /v1/runs/RUN/output`` (or read from its workspace when no daemon answers),
    written to stdout as it is. With ``-f``: polled every ``--interval`` until the run
    is final and its output read to the end; a new attempt's output (the file written
    anew) is announced on stderr and printed from its start. Exit 0; 1 for no such run."""
    stream = "stderr" if args.stderr else "stdout"
    offset = 0
    polls = 0
    status_line = ""
    # The progress line (a bar, the ETA) goes to stderr, redrawn in place, only when it
    # is a terminal: the output on stdout stays the run's, byte for byte.
    draw = args.follow and sys.stderr.isatty()
    while True:
        page = _output_slice(ops, args.run_id, stream, offset)
        if page["restarted"] and polls:
            print(f"agentd: run {args.run_id}: its {stream} began again", file=sys.stderr)
        if page["text"]:
            if status_line:  # clear it: the output goes where it was
                sys.stderr.write("\r\x1b[K")
                status_line = ""
            sys.stdout.write(page["text"])
            sys.stdout.flush()
        if draw and page.get("progress"):
            line = _progress_status(page)
            if line != status_line:
                sys.stderr.write("\r\x1b[K" + line)
                sys.stderr.flush()
                status_line = line
        offset = int(page["next_offset"])
        polls += 1
        more = offset < int(page["size"])
        if more:
            continue  # the rest of what is there now, at once
        if not args.follow or page["status"] in FINAL_STATUSES:
            if status_line:
                sys.stderr.write("\r\x1b[K")
            if not page["exists"] and not args.follow:
                print(f"agentd: run {args.run_id} has no {stream} recorded", file=sys.stderr)
            return 0
        try:
            time.sleep(max(0.05, float(args.interval)))
        except KeyboardInterrupt:
            return 130


def _progress_status(page: Row) -> str:
    """``logs -f``'s status line: the run's progress as a bar with its ETA (the pace
    since its attempt began) and its message."""
    progress = page["progress"]
    began = parse_instant(str(page.get("attempt_started_at")))
    elapsed = (datetime.now(UTC) - began).total_seconds() if began else None
    bar = progress_line(int(progress["done"]), int(progress["total"]), elapsed)
    message = str(progress.get("message") or "")
    return f"{bar}  {message}"[:200].rstrip()


def _unknown_task_hint(ops: CliCommands, args: argparse.Namespace) -> str:
    """`` did you mean `hello`?`` for a task name close to ``args.task`` (the config's
    tasks, else the daemon's), or nothing."""
    given = getattr(args, "task", None)
    if isinstance(given, list):
        given = given[0] if given else None
    if not given:
        return ""
    try:
        if ops.config is not None:
            names = list(ops.config.tasks)
        else:
            assert ops.api is not None  # no config: only the API
            names = [t["id"] for t in ops.api.get("/v1/tasks")["tasks"]]
    except Exception:
        return ""
    import difflib  # only on this error path: 0.003 s

    close = difflib.get_close_matches(str(given), names, n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def parse_params(pairs: list[str]) -> Row | None:
    """``agentd trigger --param K=V ...`` as a params object (None for none): ``V`` is
    read as JSON when it is JSON (``n=3`` is 3, ``ok=true`` is true, ``s='"3"'`` is the
    string "3"), else taken as the string it is (``name=nightly``). A key given twice
    keeps its last value. ValueError for a pair without ``=`` or with an empty key."""
    out: Row = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out or None


def _replay(ops: CliCommands, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``runs replay RUN``: the run and its steps from the daemon (or the state DB, read
    only), its task from the config file; the replay itself in this process
    (``agentd.executors.replay``). Exit 0 done, 1 stopped, 2 refused (usage)."""
    if not args.run_id:
        parser.error("runs replay needs a run id")
    if args.cassette and (args.model or args.prompt_file or args.system_file):
        parser.error(
            "--cassette serves the recorded replies: --model, --prompt-file and --system-file"
            " would change nothing"
        )
    if ops.config is None:
        print("agentd: runs replay needs the config file to be valid", file=sys.stderr)
        return exitcodes.CONFIG
    import asyncio
    import tempfile

    from agentd.executors import replay

    rid = urllib.parse.quote(args.run_id, safe="")
    try:
        run = ops.call(lambda c: c.get(f"/v1/runs/{rid}"), lambda ctl: ctl.get_run(args.run_id))
    except (ApiError, StateRefused) as exc:
        if exc.code != "unknown_run":
            raise
        _emit_error(args, exc.code, str(exc))
        return exitcodes.USAGE
    steps = ops.call(
        lambda c: c.get(f"/v1/runs/{rid}/transcript")["steps"],
        lambda ctl: ctl.transcript(args.run_id),
    )
    texts: dict[str, str | None] = {"prompt": None, "system": None}
    for name, path in (("prompt", args.prompt_file), ("system", args.system_file)):
        if path is not None:
            try:
                texts[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                _emit_error(args, "usage", f"--{name}-file {path} cannot be read: {reason}")
                return exitcodes.USAGE
    options = replay.Options(
        model=args.model, prompt=texts["prompt"], system=texts["system"], cassette=args.cassette
    )
    out = args.out
    try:
        replay.check(ops.config.tasks.get(run["task_id"]), run, steps)
        if out is None:
            out = Path(tempfile.mkdtemp(prefix="agentd-replay-"))
        report = asyncio.run(
            replay.replay(
                ops.config, ops.config.tasks.get(run["task_id"]), run, steps, options, out
            )
        )
    except replay.ReplayRefused as exc:
        _emit_error(args, "usage", str(exc))
        return exitcodes.USAGE
    except KeyboardInterrupt:
        print(f"agentd: replay interrupted; its transcript so far: {out}", file=sys.stderr)
        return exitcodes.FORCED
    if args.json:
        print(json.dumps(report.as_json(), indent=2, default=str))
    else:
        print("\n".join(replay_lines(report)))
    if report.stopped is not None:
        if not args.json:
            print(f"agentd: replay stopped: {report.stopped}", file=sys.stderr)
        return exitcodes.REFUSED
    return exitcodes.OK


def replay_lines(report: Report) -> list[str]:
    """A replay's report as an operator reads it: what was replayed and how, where the
    new transcript is, a table of old and new (steps, tool calls, tokens, cost), then the
    tool-call sequence and the final answer, each ``same`` or as a unified diff."""
    via = (
        "model replies served from the recording (--cassette)"
        if report.mode == "cassette"
        else f"model {report.model} at provider {report.provider}"
    )
    old, new = report.old, report.new
    lines = [
        f"replay of run {report.run_id} (task {report.task_id}): {via}",
        f"new transcript: {report.transcript}",
    ]
    if report.stopped is not None:
        lines.append(f"STOPPED: {report.stopped}")
    elif report.result is not None and not report.result.ok:
        lines.append(f"the replayed loop failed: {report.result.error}")
    rows = [
        ("steps", old["steps"], new["steps"]),
        ("tool calls", len(old["tool_calls"]), len(new["tool_calls"])),
        ("input tokens", old["input_tokens"], new["input_tokens"]),
        ("output tokens", old["output_tokens"], new["output_tokens"]),
        ("cost usd", f"{old['cost_usd']:.6f}", f"{new['cost_usd']:.6f}"),
    ]
    lines.append(f"{'':<14}  {'OLD':>10}  {'NEW':>10}")
    for name, a, b in rows:
        mark = "" if a == b else "  (differs)"
        lines.append(f"{name:<14}  {a!s:>10}  {b!s:>10}{mark}")
    for what, key in (("tool calls", "tool_calls"), ("answer", "answer")):
        diff = report.diff.get(key) or []
        if not diff:
            lines.append(f"{what}: same")
            shown = (
                [f"{c['tool']} {c['arguments']}" for c in new["tool_calls"]]
                if key == "tool_calls"
                else (new["answer"] or "").splitlines()
            )
            lines += [f"  {line}" for line in shown]
        else:
            lines.append(f"{what}: differ")
            lines += [f"  {line}" for line in diff]
    lines.append("result: same as the recording" if report.same else "result: different")
    return lines


def _follow(ops: CliCommands, args: argparse.Namespace, path: str) -> int:
    """Print one line per event until the stream ends (a watched run finished) or Ctrl-C;
    reconnects with Last-Event-ID so a daemon restart loses nothing."""
    if ops.api is None:
        raise StateRefused("no_daemon", "following events needs a running daemon")
    wanted = _event_filter(args)
    last_id: int | None = None
    retries = 0
    began: dict[str | None, datetime] = {}
    """When each run's current attempt started (its latest ``start`` event): a progress
    event's ETA is the pace since then."""
    while True:
        try:
            for event in ops.api.stream(path, last_id):
                last_id = int(event["id"])
                retries = 0
                if wanted is not None and not wanted(event):
                    continue
                if args.output in ("json", "yaml"):  # one JSON document a line
                    print(json.dumps(event, default=str), flush=True)
                    continue
                line = _event_line(event, _view(args))
                moment = parse_instant(str(event.get("ts")))
                if event.get("kind") == EventKind.START and moment is not None:
                    began[event.get("run_id")] = moment
                data = event.get("data") or {}
                if event.get("kind") == EventKind.PROGRESS and data.get("total"):
                    start = began.get(event.get("run_id"))
                    elapsed = (moment - start).total_seconds() if start and moment else None
                    bar = progress_line(int(data.get("done") or 0), int(data["total"]), elapsed)
                    line += f"  {bar}"
                print(line, flush=True)
            return 0
        except Unreachable:
            if last_id is None or retries >= 30:
                raise StateRefused("no_daemon", f"no agentd answers at {ops.api.url}") from None
            retries += 1
            print(f"(daemon unreachable, reconnecting {retries}/30)", file=sys.stderr)
            time.sleep(1)
        except KeyboardInterrupt:
            return 130


def _event_line(event: Row, view: View | None = None) -> str:
    """One event as a line: its instant (the operator's zone, or UTC with ``--utc``),
    ``#id``, kind, task, run, and its data as ``key=value`` (a progress event as
    ``done/total message``)."""
    view = view or View()
    data = event.get("data") or {}
    extras = " ".join(
        f"{k}={view.cell(v, cut=False)}" for k, v in sorted(data.items()) if v is not None
    )
    if event.get("kind") == EventKind.PROGRESS and data.get("total"):
        extras = f"{data.get('done')}/{data.get('total')} {data.get('message') or ''}".strip()
    ts = view.cell(event.get("ts"))
    kind = f"{event.get('kind')!s:<12}"
    if view.colour:
        kind = paint(kind, _KIND_COLOURS.get(str(event.get("kind"))), True)
    return (
        f"{ts}  #{event.get('id')} {kind} "
        f"{event.get('task_id') or '-'} {event.get('run_id') or '-'}  {extras}"
    ).rstrip()


_KIND_COLOURS = {
    "success": "green",
    "failure": "red",
    "timeout": "red",
    "quarantine": "red",
    "budget_exhausted": "yellow",
    "awaiting_approval": "magenta",
    "start": "cyan",
}
"""The colour of an event line's kind, on a terminal."""


TASK_COLUMNS = ["task", "kind", "schedule", "timezone", "next_run", "last_outcome", "paused"]
TASK_WIDE = ["last_run_at", "last_success_at", "overlap", "catchup", "description"]
"""``agentd tasks``'s columns, and what ``-o wide`` adds."""
RUN_COLUMNS = [
    "id",
    "task_id",
    "status",
    "attempt",
    "trigger",
    "scheduled_for",
    "duration_s",
    "eta",
    "error",
]
RUN_WIDE = ["created_at", "started_at", "finished_at", "exit_code", "lease_owner", "progress"]
"""``agentd runs``'s columns, and what ``-o wide`` adds."""
EVENT_FILTER_WINDOW = 5000
"""``events --task/--kind`` picks its events among this many of the newest (the most
one ``GET /v1/events?tail=`` returns)."""
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_AGE_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _when(text: str | None, utc: bool) -> str | None:
    """``--since``/``--until`` as the API's ISO 8601 UTC text: an age (``90m``, ``2h``,
    ``1d``: that long ago), or a date or date-time, in the operator's zone (UTC with
    ``--utc``) unless it carries an offset. ``ValueError`` says what is accepted."""
    if text is None:
        return None
    now = datetime.now(UTC)
    age = _AGE.match(text.strip())
    if age:
        moment = now - timedelta(seconds=float(age[1]) * _AGE_S[age[2]])
    else:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{text!r} is no time: give an ISO 8601 date or time (2026-03-01, "
                "2026-03-01T12:00, 2026-03-01T12:00+01:00) or an age (90m, 2h, 1d)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC) if utc else moment.astimezone()
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _event_filter(args: argparse.Namespace) -> Callable[[Row], bool] | None:
    """``events --task/--kind``: which events to keep (None: all)."""
    if args.command != "events":
        return None
    tasks = set(args.task or ())
    kinds = set(args.kind or ())
    if not tasks and not kinds:
        return None
    return lambda e: (
        (not tasks or e.get("task_id") in tasks) and (not kinds or e.get("kind") in kinds)
    )


def _print_lines(lines: list[str]) -> int:
    print("\n".join(lines))
    return 0


CLEAR_SCREEN = "\x1b[H\x1b[2J"
"""Cursor home, then erase the screen: ``--watch``'s redraw on a terminal."""


def _watch(args: argparse.Namespace, draw: Callable[[], list[str]]) -> int:
    """``--watch``: ``draw`` again every ``--interval`` seconds until Ctrl-C. On a
    terminal the screen is redrawn in place, under a header line naming the command and
    the time; elsewhere (a pipe, a file) the lines are printed again only when they
    changed, after a blank line, so a log of it holds each change once. A daemon that
    stops answering is said once per change of state and watched on."""
    interval = max(0.1, float(args.interval))
    tty = sys.stdout.isatty()
    shown: list[str] | None = None
    try:
        while True:
            try:
                lines = draw()
            except (ApiError, Unreachable, StateRefused) as exc:
                lines = [f"agentd: {exc}"]
            if tty:
                stamp = _view(args).instant_zoned(
                    datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
                )
                head = f"Every {interval:g}s: agentd {args.command}    {stamp}"
                sys.stdout.write(CLEAR_SCREEN + head + "\n\n" + "\n".join(lines) + "\n")
                sys.stdout.flush()
            elif lines != shown:
                if shown is not None:
                    print()
                print("\n".join(lines), flush=True)
            shown = lines
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _task_row(t: Row, view: View | None = None) -> Row:
    """A task as ``agentd tasks`` lists it. ``next_run`` with ``view``: in the operator's
    zone (``--utc``: UTC); without (``-o json``): in the task's own zone, as it was."""
    if t["paused"]:
        paused = t["paused_reason"] or "yes"
    elif not t["active"]:
        paused = f"inactive: {t['inactive_reason']}"
    else:
        paused = "no"
    return {
        "task": t["id"],
        "kind": t["kind"],
        "schedule": t["schedule"],
        "timezone": t["timezone"],
        # A paused task fires no run until it is resumed, whatever its schedule says.
        "next_run": "paused"
        if t["paused"]
        else _next_run(t["next_runs"][0], view)
        if t["next_runs"]
        else "-",
        "last_outcome": t["last_outcome"] or "-",
        "paused": paused,
        "last_run_at": t.get("last_run_at"),
        "last_success_at": t.get("last_success_at"),
        "overlap": t.get("overlap"),
        "catchup": t.get("catchup"),
        "description": t.get("description"),
    }


def _next_run(fire: Row, view: View | None) -> str:
    if view is None:
        return _short_local(fire["local"])
    return view.instant_zoned(fire["utc"].replace("+00:00", "Z"))


_SPEND_COLUMNS = {
    "scope": "scope",
    "window": "start",
    "tz": "timezone",
    "calls": "calls",
    "tokens_in": "input_tokens",
    "tokens_out": "output_tokens",
    "spent_usd": "spent_usd",
    "limit_usd": "limit_usd",
    "left_usd": "remaining_usd",
}


def _spend_row(window: Row) -> Row:
    row = {name: window.get(key) for name, key in _SPEND_COLUMNS.items()}
    local = datetime.fromisoformat(str(window["start"]).replace("Z", "+00:00"))
    row["window"] = local.astimezone(ZoneInfo(window["timezone"])).strftime(
        "%Y-%m-%d" if window["period"] == "day" else "%Y-%m"
    )
    return row


def _short_local(iso: str) -> str:
    dt = datetime.fromisoformat(iso)
    return dt.strftime("%Y-%m-%d %H:%M:%S ") + (dt.tzname() or "")


HEAD_CHARS = 100
"""How much of a reply's answer or a tool's result ``transcript_lines`` shows."""


def _head(text: Any) -> str:
    """The first line of ``text``, at most ``HEAD_CHARS`` characters, saying when there
    is more."""
    lines = str(text or "").strip().splitlines() or [""]
    first = lines[0]
    more = len(lines) > 1 or len(first) > HEAD_CHARS
    return first[:HEAD_CHARS] + (f" [... {len(str(text))} chars]" if more else "")


def _arguments(value: Any) -> str:
    """A call's arguments as compact JSON (the model's text as it is when not JSON)."""
    if isinstance(value, str):
        text = value
        try:
            value = json.loads(text)
        except ValueError:
            return text
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def transcript_lines(steps: list[Row]) -> list[str]:
    """An agent run's recorded steps, one line each: seq, step, kind, call id, tool, and
    what it holds: a reply's calls (tool and arguments) or its answer's head, with its
    tokens and cost; a started call's arguments; a result's ``ok``/``error``, duration
    and head. ``(no recorded steps)`` for none. Never a repr."""
    if not steps:
        return ["(no recorded steps)"]
    rows: list[list[str]] = []
    for record in steps:
        payload = record.get("payload") or {}
        kind = str(record.get("kind"))
        tool, detail = "-", ""
        if kind == "model":
            usage = payload.get("usage") or {}
            calls = payload.get("tool_calls") or []
            if calls:
                asked = "; ".join(
                    f"{c.get('name')} {_arguments(c.get('arguments'))}" for c in calls
                )
                detail = f"{len(calls)} call(s): {asked}"
            else:
                detail = f"answer: {_head(payload.get('content'))}"
            detail += (
                f"  (tokens {usage.get('input_tokens', 0)} in, {usage.get('output_tokens', 0)}"
                f" out, ${float(usage.get('cost_usd', 0.0)):.6f})"
            )
        elif kind == "tool_started":
            tool, detail = str(payload.get("tool")), _arguments(payload.get("arguments"))
        elif kind == "tool_result":
            tool = str(payload.get("tool"))
            outcome = "ok" if payload.get("ok") else "error"
            detail = (
                f"{outcome} in {payload.get('duration_s', 0)} s: {_head(payload.get('content'))}"
            )
        else:
            detail = _arguments(payload)
        call_id = str(record.get("call_id") or "-")
        rows.append([str(record.get("seq")), str(record.get("step")), kind, call_id, tool, detail])
    header = ["SEQ", "STEP", "KIND", "CALL", "TOOL", "DETAIL"]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(5)]
    out = []
    for row in [header, *rows]:
        out.append(
            "  ".join(v.ljust(w) for v, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
        )
    return [line.rstrip() for line in out]


def _view(args: argparse.Namespace) -> View:
    """The command's output switches (``-o``, ``--utc``; colour from stdout), made once."""
    view = getattr(args, "_view", None)
    if view is None:
        view = View(getattr(args, "output", None) or "table", bool(getattr(args, "utc", False)))
        args._view = view
    return view


def _print(
    args: argparse.Namespace,
    rows: list[Row],
    columns: list[str],
    wide: Sequence[str] = (),
) -> int:
    """Records as a table of ``columns`` (with ``-o wide`` also the ``wide`` ones, and no
    cell cut short), or as JSON or YAML: the records themselves."""
    print("\n".join(_render(args, rows, columns, wide)))
    return 0


def _render(
    args: argparse.Namespace, rows: list[Row], columns: list[str], wide: Sequence[str] = ()
) -> list[str]:
    view = _view(args)
    if view.machine:
        return [view.dump(rows)]
    return view.table_lines(rows, [*columns, *wide] if view.wide else columns)


def _print_detail(args: argparse.Namespace, detail: dict[str, Any]) -> int:
    """One record as text (``detail_lines``), or as JSON or YAML with ``-o``."""
    view = _view(args)
    if view.machine:
        print(view.dump(detail))
        return 0
    for line in detail_lines(detail, view=view):
        print(line)
    return 0


def detail_lines(detail: dict[str, Any], indent: str = "", view: View | None = None) -> list[str]:
    """A record as an operator reads it: ``key: value`` lines, a nested mapping as its
    own lines indented under its key, a list of mappings as ``- key: value`` blocks, an
    event list as one line per event (``_event_line``). A missing value is ``-``, a
    flag ``yes`` or ``no``, an instant ``YYYY-MM-DD HH:MM:SS`` in the operator's zone
    (UTC with ``--utc``). Never a repr."""
    view = view or View()
    lines: list[str] = []
    for key, value in detail.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines += detail_lines(value, indent + "  ", view)
        elif isinstance(value, list) and value:
            lines.append(f"{indent}{key}:")
            for item in value:
                if key == "events" and isinstance(item, dict) and "kind" in item:
                    lines.append(f"{indent}  {_event_line(item, view)}")
                elif isinstance(item, dict) and item:
                    block = detail_lines(item, indent + "    ", view)
                    lines.append(f"{indent}  - {block[0].lstrip()}")
                    lines += block[1:]
                else:
                    lines.append(f"{indent}  - {view.cell(item, cut=False)}")
        else:
            text = view.cell(value, cut=False)
            if key in ("status", "last_outcome"):
                text = view.painted(text)
            lines.append(f"{indent}{key}: {text}")
    return lines


def _emit_error(args: argparse.Namespace, code: str, message: str) -> None:
    if getattr(args, "output", None) in ("json", "yaml"):
        print(_view(args).dump({"error": code, "message": message}))
    else:
        print(f"agentd: {message}", file=sys.stderr)
