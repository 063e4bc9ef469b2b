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
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agentd import __version__, exitcodes, journal
from agentd.cliout import FORMATS
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


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)$")


class Parser(argparse.ArgumentParser):
    """argparse, which says ``did you mean `tasks`?`` after an invalid choice (a command,
    a ``runs`` action...) that is close to a valid one (``difflib``): Python 3.11's
    argparse lists the choices only."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            import difflib  # only on this error path: 0.003 s

            choices = re.findall(r"'([^']*)'", match["choices"])
            close = difflib.get_close_matches(match["given"], choices, n=1)
            if close:
                message += f"\ndid you mean `{close[0]}`?"
        super().error(message)


def _completer(what: str) -> Any:
    """An argcomplete completer of task names (``what`` "task") or run ids ("run"), which
    imports ``agentd.clicomplete`` only when the shell asks for a completion."""

    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        from agentd.clicomplete import complete as run

        return run(what, prefix, parsed_args, parsed_args.config or default_config())

    return complete


def _task_arg(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    setattr(parser.add_argument(*names, **kwargs), "completer", _completer("task"))  # noqa: B010


def _run_arg(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    setattr(parser.add_argument(*names, **kwargs), "completer", _completer("run"))  # noqa: B010


def _watch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="keep showing it: redrawn in place on a terminal every --interval seconds; "
        "elsewhere printed again whenever it changes (Ctrl-C ends it)",
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between --watch refreshes (2)"
    )


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $AGENTD_CONFIG, /etc/agentd/agentd.yaml, ./config/agentd.yaml)",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=None,
        help="output format: table (the default), wide (more columns, nothing cut), json, "
        "yaml (json and yaml: the records, instants as the API's UTC text)",
    )
    common.add_argument("--json", action="store_true", help="the same as -o json")
    common.add_argument(
        "--utc",
        action="store_true",
        help="show instants in UTC (default: the local zone, $TZ or the system's)",
    )
    common.add_argument("--url", help="the daemon's API (default: from the config's daemon.http)")

    parser = Parser(
        prog="agentd",
        description="Run background agent work. The operator commands ask the daemon's "
        "HTTP API (the call each makes is in its --help) and, when no daemon answers, read "
        "the state DB read-only (a write command writes it as the daemon would).",
    )
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.add_argument(
        "--accept-empty-state",
        action="store_true",
        help="start even though state.sqlite is missing or empty beside a jobstore that "
        "holds jobs: begin afresh, deliberately",
    )
    p = sub.add_parser(
        "check-config", parents=[common], help="validate the config (no API call: the file)"
    )
    p.add_argument("--next", type=int, default=0, metavar="N", help="show each task's next N fires")
    p.add_argument("--show", action="store_true", help="print the config, secrets redacted")
    p.add_argument(
        "--quiet", "-q", action="store_true", help="one line when valid (problems in full)"
    )
    p = sub.add_parser(
        "completion",
        parents=[common],
        help="print the shell completion script: bash, zsh or fish (no API call)",
        description="Print the script that completes agentd's commands and options in "
        "bash, zsh or fish, and task names and run ids from the daemon's API when one "
        "answers (GET /v1/tasks, GET /v1/runs), else from the config and the state DB "
        "(read-only). It is argcomplete's: each TAB runs `agentd` to ask.",
        epilog="bash: `source <(agentd completion bash)` (or save it under "
        "/etc/bash_completion.d/); zsh: `source <(agentd completion zsh)` after compinit; "
        "fish: `agentd completion fish > ~/.config/fish/completions/agentd.fish`.",
    )
    p.add_argument("shell", choices=["bash", "zsh", "fish"])
    p = sub.add_parser(
        "tasks",
        parents=[common],
        help="list tasks (GET /v1/tasks); `tasks show TASK` (GET /v1/tasks/TASK ...)",
        description="List the tasks (GET /v1/tasks), or show one (`tasks show TASK`): its "
        "definition from the config file (secrets redacted), its next fires "
        "(GET /v1/tasks/TASK), its last runs (GET /v1/runs?task=TASK), its spend "
        "(GET /v1/spend?task=TASK) and its alerts (GET /v1/alerts).",
    )
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    _task_arg(p, "task", nargs="?")
    p.add_argument("--last", type=int, default=5, metavar="N", help="show: its last N runs (5)")
    _watch_args(p)
    p = sub.add_parser(
        "runs",
        parents=[common],
        help="list runs (GET /v1/runs); `runs show|watch|replay|resume RUN`",
        description="List runs (`runs`: GET /v1/runs, newest first), show one (`runs show "
        "RUN`: GET /v1/runs/RUN and /v1/runs/RUN/events; with --transcript its recorded "
        "agent steps, GET /v1/runs/RUN/transcript), follow one (`runs watch RUN`: GET "
        "/v1/runs/RUN/events/stream), or replay an agent run "
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
    _run_arg(p, "run_id", nargs="?")
    _task_arg(p, "--task")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only runs created at or after WHEN: a date or ISO 8601 time (in the local "
        "zone unless it has an offset; with --utc in UTC), or an age: 90m, 2h, 1d ago",
    )
    p.add_argument("--until", metavar="WHEN", help="only runs created before WHEN (as --since)")
    _watch_args(p)
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
    p = sub.add_parser(
        "logs",
        parents=[common],
        help="a run's stdout or --stderr; -f follows a live run (GET /v1/runs/RUN/output)",
        description="Print what a run wrote on stdout (or --stderr), as its workspace "
        "keeps it (capped at the task's output limit), from the daemon (GET "
        "/v1/runs/RUN/output, in slices) or, when none answers, from the workspace "
        "itself. With -f, keep following it until the run is final (a retry's new "
        "attempt starts the output again, said on stderr).",
    )
    _run_arg(p, "run_id")
    p.add_argument("--follow", "-f", action="store_true", help="follow a live run to its end")
    p.add_argument("--stderr", action="store_true", help="its stderr instead of its stdout")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between -f's polls (0.5)")
    p = sub.add_parser(
        "trigger", parents=[common], help="enqueue a run now (POST /v1/tasks/TASK/trigger)"
    )
    _task_arg(p, "task")
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
        help="enqueue each occurrence of a task's schedule in [--from, --to) as if it fired "
        "(POST /v1/tasks/TASK/backfill)",
    )
    _task_arg(p, "task")
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
    p = sub.add_parser(
        "pause", parents=[common], help="pause a task's schedule (POST /v1/tasks/TASK/pause)"
    )
    _task_arg(p, "task")
    p.add_argument("--reason", default="paused by operator")
    p = sub.add_parser(
        "resume", parents=[common], help="resume a paused task (POST /v1/tasks/TASK/resume)"
    )
    _task_arg(p, "task")
    p = sub.add_parser(
        "cancel",
        parents=[common],
        help="cancel a queued or running run (POST /v1/runs/RUN/cancel)",
    )
    _run_arg(p, "run_id")
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
        "either way the run is queued again and resumes at that call "
        "(POST /v1/approvals/RUN/approve or /v1/approvals/RUN/skip).",
    )
    _run_arg(p, "run_id")
    p.add_argument("--call", help="the call id: refused if the run waits on another")
    p.add_argument("--skip", action="store_true", help="skip the call instead of running it")
    p.add_argument("--note", help="why (shown to the model for a skip)")
    p = sub.add_parser(
        "deny",
        parents=[common],
        help="end a parked run denied (POST /v1/approvals/RUN/deny)",
    )
    _run_arg(p, "run_id")
    p.add_argument("--call", help="the call id: refused if the run waits on another")
    p.add_argument("--note", help="why")
    p = sub.add_parser(
        "quarantine",
        parents=[common],
        help="runs that failed for good (GET /v1/quarantine; show, release, drop RUN)",
        description="List the quarantined runs (GET /v1/quarantine), show one (GET "
        "/v1/quarantine/RUN), queue one again (release: POST /v1/quarantine/RUN/release) "
        "or give it up (drop: POST /v1/quarantine/RUN/drop).",
    )
    p.add_argument("action", nargs="?", choices=["list", "show", "release", "drop"], default="list")
    _run_arg(p, "run_id", nargs="?")
    sub.add_parser(
        "status",
        parents=[common],
        help="daemon health, tasks, running runs (GET /v1/status, /healthz, /readyz)",
    )
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
    p = sub.add_parser(
        "spend", parents=[common], help="LLM spend per task and window (GET /v1/spend)"
    )
    _task_arg(p, "--task")
    sub.add_parser(
        "nodes",
        parents=[common],
        help="the daemons on this state: alive, held runs (GET /v1/nodes)",
    )
    p = sub.add_parser(
        "alerts", parents=[common], help="alerts raised and their deliveries (GET /v1/alerts)"
    )
    p.add_argument("--limit", type=int, default=20)
    p = sub.add_parser(
        "backup",
        parents=[common],
        help="a consistent copy of the state DB and jobstore, also while the daemon runs "
        "(no API call: the state dir)",
    )
    p.add_argument("dest", help="a new or empty directory")
    p = sub.add_parser(
        "restore",
        parents=[common],
        help="put a backup in place (the daemon stopped; no API call: the state dir)",
    )
    p.add_argument("src", help="a directory `agentd backup` wrote")
    p = sub.add_parser(
        "doctor",
        parents=[common],
        help="check the state dir and its files (no API call: the state dir)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="do what is safe: move damaged files aside, acknowledge a damaged WAL",
    )
    p = sub.add_parser(
        "events",
        parents=[common],
        help="the audit log: its newest events (GET /v1/events); --follow to stream it",
        description="The newest --limit events of the audit log, oldest of them first, "
        "from the daemon (GET /v1/events?tail=N) or, when none answers, from the state DB. "
        "With --follow, instead, each new event as it happens (GET /v1/events/stream). "
        "--task and --kind keep the events of that task, of that kind (each may be "
        "given more than once): among the newest 5,000 events (the most one tail "
        "returns), of which the newest --limit that match are shown.",
    )
    p.add_argument("--follow", "-f", action="store_true", help="stream new events")
    p.add_argument(
        "--limit", type=int, default=50, help="how many of the newest events (default 50)"
    )
    _task_arg(p, "--task", action="append", help="only this task's events")
    p.add_argument("--kind", action="append", help="only events of this kind (e.g. failure)")
    p = sub.add_parser(
        "prune",
        parents=[common],
        help="remove the history the config's `history:` does not keep (no API call: the state DB)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show what would go; the DB is opened read-only"
    )
    # A command's --help opens with its one line (which names its API call) when it has
    # no longer description.
    for choice in sub._choices_actions:
        command = sub.choices[choice.dest]
        if command.description is None:
            command.description = choice.help
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
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (agentd completion)
        import argcomplete

        argcomplete.autocomplete(parser, always_complete_options=False)
    args = parser.parse_args(argv)
    if args.json and args.output not in (None, "json"):
        parser.error(f"--json is -o json: not with -o {args.output}")
    args.output = "json" if args.json else (args.output or "table")
    args.json = args.output == "json"
    if args.command == "completion":
        return completion(args.shell)
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


def completion(shell: str) -> int:
    """``agentd completion SHELL``: argcomplete's script for ``shell``, which runs
    ``agentd`` (with ``_ARGCOMPLETE`` set) on each TAB; see ``agentd.clicomplete``."""
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["agentd"], shell=shell))
    return 0


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
