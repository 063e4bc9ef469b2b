"""Executors: how a task's work is actually done. One module per kind.

Each exposes ``async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv) -> Result``.
Cancellation (timeout, cancel, shutdown) arrives as ``asyncio.CancelledError``; an
executor cleans up (kills its process group, closes its client) and re-raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from agentd.config import TaskConfig
from agentd.context import RunContext
from agentd.models import Result
from agentd.procs import GroupRecord
from agentd.threads import DaemonThreads


@dataclass(frozen=True)
class ExecEnv:
    """Daemon-wide settings an executor needs; kept small on purpose."""

    kill_grace_s: float = 5.0
    output_max_bytes: int = 10 * 1024 * 1024
    threads: DaemonThreads = field(default_factory=DaemonThreads)
    """Where sync Python callables run (see ``agentd.threads``)."""
    inherited_env: Mapping[bytes, bytes] | None = None
    """What commands inherit (``command.inherited_env()``), taken once by the daemon:
    copying ``os.environ`` for every command, decoding each variable and encoding it
    again for ``Popen``, is event-loop time per command. None: read
    the environment at each command. A snapshot also keeps a variable that one run's
    Python callable sets in the daemon out of every later command."""
    withheld_env: frozenset[bytes] = frozenset()
    """Variables never inherited by a command: those the config names as holding a
    secret (``config.secret_refs``) and systemd's ``CREDENTIALS_DIRECTORY``. A task that
    needs one names it in its own ``env`` (``OPENAI_API_KEY: ${OPENAI_API_KEY}``)."""
    child_umask: int = -1
    """The umask a command starts with: the one agentd was started with (the daemon
    itself runs with 077). -1: the daemon's own."""
    on_spawn: Callable[[RunContext, GroupRecord], None] | None = None
    """Called on the loop right after a command's process group is spawned, to record
    it durably with the attempt (the runner's; see ``agentd.procs``)."""
    spawn_prefix: tuple[str, ...] = ()
    """Exec'd in front of each command's argv: ``command.pdeathsig_prefix()``, which
    ties the command's leader to the daemon's life, or nothing."""


Execute = Callable[[TaskConfig, RunContext, ExecEnv], Awaitable[Result]]


def executor_for(kind: str) -> Execute:
    """Imported lazily so a daemon without agent tasks never imports httpx machinery."""
    if kind == "command":
        from agentd.executors.command import execute
    elif kind == "http":
        from agentd.executors.http import execute
    elif kind == "python":
        from agentd.executors.python import execute
    elif kind == "agent":
        from agentd.executors.agent import execute
    else:
        raise ValueError(f"unknown executor kind {kind!r}")
    return execute
