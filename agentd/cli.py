"""``agentd`` on the command line.

Commands go through the daemon's API when one answers; otherwise they write the state
DB directly, in the same transactions the daemon uses, so they work just as well while
it is stopped (and a daemon whose API they could not reach sees them within a second).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from agentd.client import ApiClient, ApiError, Unreachable, default_url
from agentd.clock import SystemClock, from_iso
from agentd.config import Config, ConfigError, inactive_reason, load_config, redacted
from agentd.control import Control
from agentd.daemon import EXIT_CONFIG, EXIT_USAGE, StateLock, _task_index, run_daemon, state_paths
from agentd.http import BindRefused, load_token
from agentd.schedule import next_fires
from agentd.store import Row, Store, StoreError

DEFAULT_CONFIGS = (Path("/etc/agentd/agentd.yaml"), Path("config/agentd.yaml"))


def default_config() -> Path:
    env = os.environ.get("AGENTD_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFIGS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFIGS[0]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $AGENTD_CONFIG, /etc/agentd/agentd.yaml, ./config/agentd.yaml)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--url", help="the daemon's API (default: from the config's daemon.http)")

    parser = argparse.ArgumentParser(prog="agentd", description="Run background agent work.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p = sub.add_parser("check-config", parents=[common], help="validate the config")
    p.add_argument("--next", type=int, default=0, metavar="N", help="show each task's next N fires")
    p.add_argument("--show", action="store_true", help="print the config, secrets redacted")
    sub.add_parser("tasks", parents=[common], help="list tasks")
    p = sub.add_parser("runs", parents=[common], help="list runs, or `runs show ID`")
    p.add_argument("action", nargs="?", choices=["list", "show", "watch"], default="list")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--task")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20)
    p = sub.add_parser("trigger", parents=[common], help="enqueue a run now")
    p.add_argument("task")
    p = sub.add_parser("pause", parents=[common], help="pause a task's schedule")
    p.add_argument("task")
    p.add_argument("--reason", default="paused by operator")
    p = sub.add_parser("resume", parents=[common], help="resume a paused task")
    p.add_argument("task")
    p = sub.add_parser("cancel", parents=[common], help="cancel a queued or running run")
    p.add_argument("run_id")
    p = sub.add_parser("quarantine", parents=[common], help="runs that failed for good")
    p.add_argument("action", nargs="?", choices=["list", "show", "release", "drop"], default="list")
    p.add_argument("run_id", nargs="?")
    sub.add_parser("status", parents=[common], help="daemon health, tasks, running runs")
    p = sub.add_parser("spend", parents=[common], help="LLM spend per task and window")
    p.add_argument("--task")
    p = sub.add_parser("alerts", parents=[common], help="alerts raised and their deliveries")
    p.add_argument("--limit", type=int, default=20)
    p = sub.add_parser("events", parents=[common], help="the audit log; --follow to stream it")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Under systemd (JOURNAL_STREAM set) the journal stamps every line itself; a second
    # timestamp would only push the message off the right edge of `systemctl status`.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=stamp + "%(levelname)s %(name)s %(message)s",
    )
    logging.Formatter.converter = time.gmtime
    # The format above uses none of the caller's frame, thread or process: skipping
    # their lookup (the logging docs' "Optimization" knobs) cuts a third of the cost of
    # a line, and the daemon writes one per audit event, several per run.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    parser = build_parser()
    args = parser.parse_args(argv)
    config_path: Path = args.config or default_config()
    if args.command == "run":
        code = run_daemon(config_path)
        # The daemon has closed its state, released its lock and logged its last line.
        # Skipping interpreter teardown (module and object cleanup of a large import
        # graph: 0.2 s with no task, 0.8 s with 1,000) keeps SIGTERM-to-exit short,
        # which is what systemd and kubelet time.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        return check_config(config, args)
    try:
        return _state_command(config, args, parser)
    except StoreError as exc:
        _emit_error(args, exc.code, str(exc))
        return 1


def check_config(config: Config, args: argparse.Namespace) -> int:
    now = SystemClock().now()
    report: dict[str, Any] = {"ok": True, "source": config.source, "tasks": {}}
    for task_id, task in config.tasks.items():
        spec = config.schedule_spec(task_id)
        entry: dict[str, Any] = {
            "kind": task.kind,
            "schedule": spec.kind,
            "timezone": spec.timezone,
            "inactive": inactive_reason(task),
        }
        if args.next:
            tz = ZoneInfo(spec.timezone)
            entry["next"] = [
                {"local": t.astimezone(tz).isoformat(), "utc": t.isoformat()}
                for t in next_fires(spec, task_id, now, args.next)
            ]
        report["tasks"][task_id] = entry
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{config.source}: OK, {len(config.tasks)} task(s)")
    for task_id, entry in report["tasks"].items():
        note = f"  (inactive: {entry['inactive']})" if entry["inactive"] else ""
        print(f"  {task_id}: {entry['kind']}, {entry['schedule']} in {entry['timezone']}{note}")
        for t in entry.get("next", []):
            print(f"      {t['local']}   ({t['utc']})")
    if args.show:
        print(yaml.safe_dump(redacted(config), sort_keys=False))
    return 0


def open_store(config: Config) -> Store:
    """Open the state DB; if no daemon holds it, bring its task table up to the config
    so commands also work on a daemon that has never started."""
    root, db_path, _ = state_paths(config)
    root.mkdir(parents=True, exist_ok=True)
    store = Store(db_path)
    if StateLock(root).held_by_other() is None:
        store.sync_tasks(_task_index(config), SystemClock().now())
    return store


class Ops:
    """Each operator command once: through the daemon's API when one answers, else on
    the state DB directly (the same ``Control`` code the API runs)."""

    def __init__(self, config: Config, url: str | None) -> None:
        self.config = config
        try:
            token = load_token(config.daemon.http)
        except BindRefused as exc:
            # Reads still work without it; a POST will get the daemon's own 401.
            print(f"agentd: warning: {exc}", file=sys.stderr)
            token = None
        self.api: ApiClient | None = ApiClient(url or default_url(config), token)
        self._store: Store | None = None
        self._ctl: Control | None = None

    def close(self) -> None:
        if self.api:
            self.api.close()
        if self._store:
            self._store.close()

    @property
    def ctl(self) -> Control:
        if self._ctl is None:
            self._store = open_store(self.config)
            self._ctl = Control(self._store, self.config, SystemClock())
        return self._ctl

    def call(self, api: Callable[[ApiClient], Any], direct: Callable[[Control], Any]) -> Any:
        if self.api is not None:
            try:
                return api(self.api)
            except Unreachable:
                self.api = None  # no daemon: work on the DB from here on
        return direct(self.ctl)

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
                "counts": ctl.store.counts(),
                "tasks": len(self.config.tasks),
            }

        result: Row = self.call(via_api, direct)
        return result


def _state_command(
    config: Config, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    ops = Ops(config, args.url)
    try:
        return _dispatch(ops, args, parser)
    except ApiError as exc:
        _emit_error(args, exc.code, str(exc))
        return 1
    finally:
        ops.close()


def _dispatch(ops: Ops, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cmd = args.command
    q = urllib.parse.quote
    if cmd == "status":
        status = ops.status()
        _print_detail(args, status)
        return 0 if status.get("daemon") == "running" else 3
    if cmd == "tasks":
        tasks = ops.call(lambda c: c.get("/v1/tasks")["tasks"], lambda ctl: ctl.list_tasks())
        rows = [_task_row(t) for t in tasks]
        return _print(args, rows, list(rows[0]) if rows else ["task"])
    if cmd == "runs" and args.action in ("show", "watch"):
        if not args.run_id:
            parser.error(f"runs {args.action} needs a run id")
        rid = q(args.run_id, safe="")
        if args.action == "watch":
            return _follow(ops, args, f"/v1/runs/{rid}/events/stream")
        detail = ops.call(lambda c: c.get(f"/v1/runs/{rid}"), lambda ctl: ctl.get_run(args.run_id))
        detail["events"] = ops.call(
            lambda c: c.get(f"/v1/runs/{rid}/events")["events"],
            lambda ctl: ctl.events(run_id=args.run_id),
        )
        return _print_detail(args, detail)
    if cmd == "runs":
        rows = ops.call(
            lambda c: c.get("/v1/runs", task=args.task, status=args.status, limit=args.limit)[
                "runs"
            ],
            lambda ctl: ctl.list_runs(args.task, args.status, args.limit),
        )
        return _print(
            args,
            rows,
            [
                "id",
                "task_id",
                "status",
                "attempt",
                "trigger",
                "scheduled_for",
                "duration_s",
                "error",
            ],
        )
    if cmd == "spend":
        report = ops.call(
            lambda c: c.get("/v1/spend", task=args.task),
            lambda ctl: ctl.spend(args.task),
        )
        if args.json:
            print(json.dumps(report, indent=2, default=str))
            return 0
        windows = [w for t in report["tasks"] for w in (t["day"], t["month"])]
        if not args.task:
            windows += [report["global"]["day"], report["global"]["month"]]
        return _print(args, [_spend_row(w) for w in windows], list(_SPEND_COLUMNS))
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
        rows = ops.call(
            lambda c: c.get("/v1/events", limit=args.limit)["events"],
            lambda ctl: ctl.store.recent_events(args.limit),
        )
        for event in rows:
            print(json.dumps(event, default=str) if args.json else _event_line(event))
        return 0
    if cmd in ("trigger", "pause", "resume"):
        tid = q(args.task, safe="")
        body = {"reason": args.reason} if cmd == "pause" else {}
        direct: dict[str, Callable[[Control], Row]] = {
            "trigger": lambda ctl: ctl.trigger(args.task),
            "pause": lambda ctl: ctl.pause(args.task, args.reason),
            "resume": lambda ctl: ctl.resume(args.task),
        }
        return _print_detail(
            args, ops.call(lambda c: c.post(f"/v1/tasks/{tid}/{cmd}", body), direct[cmd])
        )
    if cmd == "cancel":
        rid = q(args.run_id, safe="")
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/runs/{rid}/cancel"), lambda ctl: ctl.cancel(args.run_id)
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
        local = {"release": Control.quarantine_release, "drop": Control.quarantine_drop}
        return _print_detail(
            args,
            ops.call(
                lambda c: c.post(f"/v1/quarantine/{rid}/{args.action}"),
                lambda ctl: local[args.action](ctl, args.run_id),
            ),
        )
    parser.error(f"unknown command {cmd}")
    return EXIT_USAGE


def _follow(ops: Ops, args: argparse.Namespace, path: str) -> int:
    """Print one line per event until the stream ends (a watched run finished) or Ctrl-C;
    reconnects with Last-Event-ID so a daemon restart loses nothing."""
    if ops.api is None:
        raise StoreError("no_daemon", "following events needs a running daemon")
    last_id: int | None = None
    retries = 0
    while True:
        try:
            for event in ops.api.stream(path, last_id):
                last_id = int(event["id"])
                retries = 0
                print(
                    json.dumps(event, default=str) if args.json else _event_line(event), flush=True
                )
            return 0
        except Unreachable:
            if last_id is None or retries >= 30:
                raise StoreError("no_daemon", f"no agentd answers at {ops.api.url}") from None
            retries += 1
            print(f"(daemon unreachable, reconnecting {retries}/30)", file=sys.stderr)
            time.sleep(1)
        except KeyboardInterrupt:
            return 130


def _event_line(event: Row) -> str:
    data = event.get("data") or {}
    extras = " ".join(f"{k}={v}" for k, v in sorted(data.items()) if v is not None)
    if event.get("kind") == "progress" and data.get("total"):
        extras = f"{data.get('done')}/{data.get('total')} {data.get('message') or ''}".strip()
    ts = _cell(event.get("ts"))
    return (
        f"{ts}  #{event.get('id')} {event.get('kind'):<12} "
        f"{event.get('task_id') or '-'} {event.get('run_id') or '-'}  {extras}"
    ).rstrip()


def _task_row(t: Row) -> Row:
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
        "next_run": _short_local(t["next_runs"][0]["local"]) if t["next_runs"] else "-",
        "last_outcome": t["last_outcome"] or "-",
        "paused": paused,
    }


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


def _print(args: argparse.Namespace, rows: list[Row], columns: list[str]) -> int:
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("(none)")
        return 0
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if isinstance(value, str) and text.endswith("Z") and "T" in text:
        try:
            return from_iso(text).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            pass
    return text if len(text) <= 60 else text[:57] + "..."


def _print_detail(args: argparse.Namespace, detail: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(detail, indent=2, default=str))
        return 0
    for key, value in detail.items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print("  " + json.dumps(item, default=str))
        elif isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def _emit_error(args: argparse.Namespace, code: str, message: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": code, "message": message}))
    else:
        print(f"agentd: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
