"""Shell completion's dynamic part: task names and run ids for argcomplete.

Imported only while a shell asks for a completion (``_ARGCOMPLETE`` set, see
``agentd.cli``). The daemon's API is asked first (``GET /v1/tasks``, ``GET /v1/runs``,
with a short timeout: a TAB must not hang); when no daemon answers, the config file's
tasks and the state DB, opened read-only (nothing is created or written). Any failure
is no completion: a TAB never prints an error into the operator's command line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentd.ops import CliCommands

log = logging.getLogger("agentd.cli")

COMPLETE_TIMEOUT_S = 2.0
"""How long one completion waits for the daemon's answer."""
RUNS_OFFERED = 100
"""How many of the newest runs a run id is completed from."""


def complete(
    what: str, prefix: str, parsed_args: argparse.Namespace, config_path: Path
) -> list[str]:
    """The task names (``what`` "task") or run ids ("run") that start with ``prefix``:
    runs of ``--task`` when one was given, newest first. ``config_path``: the file the
    command line names (or the default one)."""
    try:
        ops = _commands(parsed_args, config_path)
        try:
            values = _task_names(ops) if what == "task" else _run_ids(ops, parsed_args)
        finally:
            ops.close()
    except Exception:  # no daemon, no state, a broken config: nothing to offer
        log.debug("no %s completions", what, exc_info=True)
        return []
    return [v for v in values if v.startswith(prefix)]


def _commands(parsed_args: argparse.Namespace, config_path: Path) -> CliCommands:
    from agentd.config import ConfigError, load_config
    from agentd.ops import CliCommands

    try:
        config = load_config(config_path)
    except ConfigError:
        config = None  # the API only, as the commands do with a broken file
    return CliCommands(config, getattr(parsed_args, "url", None), timeout_s=COMPLETE_TIMEOUT_S)


def _task_names(ops: CliCommands) -> list[str]:
    tasks = ops.call(
        lambda c: [t["id"] for t in c.get("/v1/tasks")["tasks"]],
        lambda ctl: list(ctl.config.tasks),
    )
    return sorted(str(t) for t in tasks)


def _run_ids(ops: CliCommands, parsed_args: argparse.Namespace) -> list[str]:
    task = getattr(parsed_args, "task", None)
    task = task if isinstance(task, str) else None
    runs = ops.call(
        lambda c: c.get("/v1/runs", task=task, limit=RUNS_OFFERED)["runs"],
        lambda ctl: ctl.list_runs(task, None, RUNS_OFFERED),
    )
    return [str(r["id"]) for r in runs]
