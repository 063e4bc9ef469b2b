"""``agentd`` on the command line: its arguments, ``run`` and ``check-config``.

The operator commands live in ``ops``. Neither it nor the daemon is imported until a
command needs it: ``run`` forks the config's parse first (see ``configload``).
"""

from __future__ import annotations

import sys

if sys.argv[1:2] == ["run"]:
    # Before the imports below (0.15 s): a SIGTERM meanwhile is a clean stop, not -15.
    from agentd.procs import EARLY

    EARLY.install()

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd import __version__, exitcodes, journal
from agentd.config import ConfigError, load_config

if TYPE_CHECKING:
    from agentd.config import Config

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
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.add_argument(
        "--accept-empty-state",
        action="store_true",
        help="start even though state.sqlite is missing or empty beside a jobstore that "
        "holds jobs: begin afresh, deliberately",
    )
    p = sub.add_parser("check-config", parents=[common], help="validate the config")
    p.add_argument("--next", type=int, default=0, metavar="N", help="show each task's next N fires")
    p.add_argument("--show", action="store_true", help="print the config, secrets redacted")
    p.add_argument(
        "--quiet", "-q", action="store_true", help="one line when valid (problems in full)"
    )
    sub.add_parser("tasks", parents=[common], help="list tasks")
    p = sub.add_parser(
        "runs",
        parents=[common],
        help="list runs; `runs show ID [--transcript]`; `runs replay ID`",
        description="List runs (`runs`), show one (`runs show RUN`, with --transcript its "
        "recorded agent steps), follow one (`runs watch RUN`), or replay an agent run "
        "offline (`runs replay RUN`): its task's tool-calling loop (as the config has it "
        "now, with --model, --prompt-file, --system-file) runs again in this process, "
        "every tool call answered from the recording (no tool is executed; a call the "
        "recording does not have stops the replay), every model call sent to the task's "
        "provider with its key (or, with --cassette, served from the recorded replies), "
        "and the new transcript is compared with the old: final answer, tool calls, "
        "steps, tokens, cost. A replay is not a run: nothing is written to the state DB, "
        "and its model calls are in no budget ledger and count against no budget. The "
        "new transcript goes to --out (default: a new temporary directory), named in the "
        "output.",
        epilog="Exit status of `runs replay`: 0 the replay ran to its end (whether or not "
        "it differs), 1 it stopped (a tool call the recording does not have, no recorded "
        "reply left, a provider's error) or the run could not be read, 2 a usage error "
        "(no such run, its task gone or without tools, no recorded steps, a file that "
        "cannot be read, --cassette with a change).",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "show", "watch", "replay", "resume"],
        default="list",
        help="resume RUN: queue again a run that ended budget_exhausted (POST "
        "/v1/runs/RUN/resume); it goes on at the step it reached",
    )
    p.add_argument("run_id", nargs="?")
    p.add_argument("--task")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument(
        "--transcript",
        action="store_true",
        help="with show: an agent run's recorded steps (step, kind, tool, arguments, result "
        "head, tokens)",
    )
    p.add_argument("--model", help="replay: ask this model instead of the task's")
    p.add_argument(
        "--prompt-file", type=Path, help="replay: this prompt template instead of the task's"
    )
    p.add_argument(
        "--system-file", type=Path, help="replay: this system message instead of the task's"
    )
    p.add_argument(
        "--cassette",
        action="store_true",
        help="replay: serve the model's replies from the recording too (no provider is asked)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="replay: the directory for the new transcript (default: a temp dir)",
    )
    p = sub.add_parser("trigger", parents=[common], help="enqueue a run now")
    p.add_argument("task")
    p.add_argument(
        "--approve-sensitive",
        action="store_true",
        help="approve the agent's sensitive tool calls in this run in advance",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="a param for this run, merged over the task's (V is read as JSON if it is"
        " JSON, else as a string); repeatable",
    )
    p.add_argument(
        "--key",
        help="an idempotency key: the same key again (within limits.trigger_key_window)"
        " answers with the run it made",
    )
    p = sub.add_parser(
        "backfill",
        parents=[common],
        help="enqueue each occurrence of a task's schedule in [--from, --to) as if it fired",
    )
    p.add_argument("task")
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="T1",
        help="the range's start, inclusive (ISO 8601 with a UTC offset)",
    )
    p.add_argument(
        "--to", dest="end", required=True, metavar="T2", help="the range's end, exclusive"
    )
    p.add_argument("--dry-run", action="store_true", help="list the occurrences; enqueue nothing")
    p = sub.add_parser("pause", parents=[common], help="pause a task's schedule")
    p.add_argument("task")
    p.add_argument("--reason", default="paused by operator")
    p = sub.add_parser("resume", parents=[common], help="resume a paused task")
    p.add_argument("task")
    p = sub.add_parser("cancel", parents=[common], help="cancel a queued or running run")
    p.add_argument("run_id")
    p = sub.add_parser(
        "approvals",
        parents=[common],
        help="agent runs parked for a decision on a tool call (GET /v1/approvals)",
    )
    p.add_argument("--limit", type=int, default=100)
    p = sub.add_parser(
        "approve",
        parents=[common],
        help="run the tool call a parked run waits on, or --skip it (POST /v1/approvals/RUN/...)",
        description="Decide on the call a run parked at (`agentd approvals` lists them): "
        "run it, or with --skip tell the model it was skipped (the --note says why); "
        "either way the run is queued again and resumes at that call.",
    )
    p.add_argument("run_id")
    p.add_argument("--call", help="the call id: refused if the run waits on another")
    p.add_argument("--skip", action="store_true", help="skip the call instead of running it")
    p.add_argument("--note", help="why (shown to the model for a skip)")
    p = sub.add_parser(
        "deny",
        parents=[common],
        help="end a parked run denied (POST /v1/approvals/RUN/deny)",
    )
    p.add_argument("run_id")
    p.add_argument("--call", help="the call id: refused if the run waits on another")
    p.add_argument("--note", help="why")
    p = sub.add_parser("quarantine", parents=[common], help="runs that failed for good")
    p.add_argument("action", nargs="?", choices=["list", "show", "release", "drop"], default="list")
    p.add_argument("run_id", nargs="?")
    sub.add_parser("status", parents=[common], help="daemon health, tasks, running runs")
    p = sub.add_parser(
        "reload",
        parents=[common],
        help="make the running daemon re-read its config (SIGHUP); --wait for the outcome",
        description="Send SIGHUP to the daemon answering at the API (GET /v1/status names "
        "its pid). With --wait, return once a reload begun after the signal has ended: "
        "exit 0 when the new config is in force, 78 when the daemon rejected it (and "
        "keeps the running one). The file is not checked here: the daemon checks it, so "
        "a rejection shows wherever the daemon reports (log, /v1/status, metrics, alerts).",
    )
    p.add_argument("--wait", action="store_true", help="wait for the reload's outcome")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds --wait waits (default 90)")
    p.add_argument(
        "--pid",
        type=int,
        help="the daemon's pid as the supervisor knows it ($MAINPID): refused if the daemon "
        "answering at the API is another process",
    )
    p = sub.add_parser("spend", parents=[common], help="LLM spend per task and window")
    p.add_argument("--task")
    sub.add_parser("nodes", parents=[common], help="the daemons on this state: alive, held runs")
    p = sub.add_parser("alerts", parents=[common], help="alerts raised and their deliveries")
    p.add_argument("--limit", type=int, default=20)
    p = sub.add_parser(
        "backup",
        parents=[common],
        help="a consistent copy of the state DB and jobstore, also while the daemon runs",
    )
    p.add_argument("dest", help="a new or empty directory")
    p = sub.add_parser(
        "restore", parents=[common], help="put a backup in place (the daemon stopped)"
    )
    p.add_argument("src", help="a directory `agentd backup` wrote")
    p = sub.add_parser("doctor", parents=[common], help="check the state dir and its files")
    p.add_argument(
        "--repair",
        action="store_true",
        help="do what is safe: move damaged files aside, acknowledge a damaged WAL",
    )
    p = sub.add_parser(
        "events",
        parents=[common],
        help="the audit log: its newest events; --follow to stream it",
        description="The newest --limit events of the audit log, oldest of them first, "
        "from the daemon (GET /v1/events?tail=N) or, when none answers, from the state DB. "
        "With --follow, instead, each new event as it happens (GET /v1/events/stream).",
    )
    p.add_argument("--follow", "-f", action="store_true", help="stream new events")
    p.add_argument(
        "--limit", type=int, default=50, help="how many of the newest events (default 50)"
    )
    p = sub.add_parser(
        "prune", parents=[common], help="remove the history the config's `history:` does not keep"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show what would go; the DB is opened read-only"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Under systemd (JOURNAL_STREAM set) the journal stamps every line itself; a second
    # timestamp would only push the message off the right edge of `systemctl status`.
    # When stderr is the journal, each line also carries its syslog priority (<3> for
    # an error), so `journalctl -p err` finds agentd's errors (agentd.journal).
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    fmt = stamp + "%(levelname)s %(name)s %(message)s"
    handler.setFormatter(
        journal.JournalFormatter(fmt) if journal.stderr_is_journal() else logging.Formatter(fmt)
    )
    # The daemon logs at INFO (its config's log_level applies later). Any other command
    # shows agentd's own lines only: a library's INFO (httpx logs every request) is
    # noise on an operator's terminal, and its warnings still show.
    parser = build_parser()
    args = parser.parse_args(argv)
    run = args.command == "run"
    logging.basicConfig(level=logging.INFO if run else logging.WARNING, handlers=[handler])
    if not run:
        logging.getLogger("agentd").setLevel(logging.INFO)
    logging.Formatter.converter = time.gmtime
    # The format above uses none of the caller's frame, thread or process: skipping
    # their lookup (the logging docs' "Optimization" knobs) cuts a third of the cost of
    # a line, and the daemon writes one per audit event, several per run.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    config_path: Path = args.config or default_config()
    if args.command == "run":
        from agentd.configload import ConfigLoad
        from agentd.procs import EARLY

        EARLY.install()  # (done at import already when started as `agentd run`)
        # The config parses in a child while this process imports the daemon's modules
        # (aiohttp, SQLAlchemy, APScheduler: 0.47 s), on the other core: hence the
        # import here, after the fork, and not at the top.
        load = ConfigLoad(config_path)
        from agentd.daemon import run_daemon

        code = run_daemon(config_path, load, accept_empty_state=args.accept_empty_state)
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
        if args.command == "check-config":
            return config_invalid(exc, args)
        if args.command in ("prune", "doctor", "backup", "restore"):
            # They work on the state dir itself, which only a valid config names.
            print(exc.render(), file=sys.stderr)
            return exitcodes.CONFIG
        # The operator commands still reach a running daemon through its API.
        from agentd.ops import broken_config_command

        return broken_config_command(config_path, exc, args, parser)
    if args.command == "check-config":
        return check_config(config, args)
    if args.command == "doctor":
        from agentd.state.sqlite.statedir import doctor

        return doctor(config.daemon.state_dir, args)
    if args.command in ("backup", "restore"):
        from agentd.state.sqlite import backup as state_backup

        if args.command == "backup":
            return state_backup.backup_command(config, args)
        return state_backup.restore_command(config, args)
    if args.command == "prune":
        # Directly on the state DB, no API: the engine's own batches.
        if config.state.url is not None:
            from agentd.state.postgres import retention as pg_retention

            return pg_retention.prune_command(config, args)
        from agentd.state.sqlite.retention import prune_command

        return prune_command(config, args)
    from agentd.ops import state_command  # the daemon's modules: kept off `run`'s path

    return state_command(config, args, parser)


def config_invalid(exc: ConfigError, args: argparse.Namespace) -> int:
    """``check-config`` on an invalid file: every problem, as text on stderr or, with
    ``--json``, as ``{"ok": false, "source", "problems": [{"path", "message"}]}``."""
    if args.json:
        problems = [{"path": p.path, "message": p.message} for p in exc.problems]
        print(json.dumps({"ok": False, "source": exc.source, "problems": problems}, indent=2))
    else:
        print(exc.render(), file=sys.stderr)
    return exitcodes.CONFIG


def check_config(config: Config, args: argparse.Namespace) -> int:
    # Imported here: the other commands have no use for them (0.02 s).
    from zoneinfo import ZoneInfo

    import yaml

    from agentd.clock import SystemClock
    from agentd.config import inactive_reason, redacted, secret_refs
    from agentd.redact import read_secrets
    from agentd.schedule import next_fires

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
    # What is withheld from commands and scrubbed from texts (see agentd.redact).
    refs = secret_refs(config)
    report["secrets"] = [
        {"path": ref.where, "env": ref.env, "file": str(ref.file) if ref.file else None}
        for ref in refs
    ]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{config.source}: OK, {len(config.tasks)} task(s)")
    if args.quiet:
        return 0
    for task_id, entry in report["tasks"].items():
        note = f"  (inactive: {entry['inactive']})" if entry["inactive"] else ""
        print(f"  {task_id}: {entry['kind']}, {entry['schedule']} in {entry['timezone']}{note}")
        for t in entry.get("next", []):
            print(f"      {t['local']}   ({t['utc']})")
    if args.show:
        # Masked by key (``redacted``), then by value: a secret ${VAR}-substituted into
        # any string of the file is not shown either.
        print(read_secrets(refs).text(yaml.safe_dump(redacted(config), sort_keys=False)))
        print(
            "# Secrets: never in a command's environment (unless its task's `env` names\n"
            "# the variable), and their values are scrubbed from every stored or logged\n"
            "# text. CREDENTIALS_DIRECTORY is withheld from commands too."
        )
        for ref in report["secrets"]:
            held = f"${ref['env']}" if ref["env"] else ref["file"]
            print(f"#   {ref['path']}: {held}")
        if not report["secrets"]:
            print("#   (none configured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
