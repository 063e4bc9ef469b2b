"""The processes agentd is responsible for: command groups that outlive their daemon,
children handed to agentd by the kernel, and signals that arrive before the loop runs.

Three guarantees, each with its own mechanism (Linux; elsewhere they are no-ops):

* **A command's process group does not outlive its attempt unnoticed.** Right after
  spawning, the runner records the group id (the leader's pid), the leader's start time
  (``/proc/<pid>/stat`` field 22, in clock ticks since boot) and the boot id in the
  attempt's row. Whoever recovers the run (the next start, or the lease sweep) first ends
  that group (``end_groups``: SIGTERM, SIGKILL after ``kill_grace``) and only then
  re-queues it, so an ``overlap: skip`` task never runs twice at once after a
  ``kill -9`` of the daemon. The start time and boot id make a recycled pid harmless: a
  process with the group's pid but another start time means the group is gone (Linux
  does not hand out a pid that is still some group's id), and a leader that died while
  members of its group live on leaves those members findable by their group id.
* **agentd reaps what it inherits.** ``set_subreaper`` makes orphaned descendants
  (a task's double-forked daemon) agentd's children, whether it is PID 1 or under
  systemd; ``Reaper`` waits for each such child by its pid, never with ``waitpid(-1)``,
  so the exit status of agentd's own children (commands, alert commands, the config
  parse) stays with whoever waits for them (see ``Reaper``).
* **A stop during start-up is a clean stop** (``EarlySignals``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

log = logging.getLogger("agentd.procs")

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.05
"""How often ``end_groups`` looks whether a group it signalled is gone."""
_BOOT_ID: str | None = None


# ------------------------------------------------------------------ /proc


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), "" where there is none. A
    process recorded under another boot is gone for certain."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                _BOOT_ID = fh.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (so ``[0]`` is field 3,
    the state), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: it ends at the last ")".
    return raw[raw.rfind(b")") + 2 :].decode().split()


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22), or None if it is gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


@dataclass(frozen=True)
class GroupRecord:
    """A command's process group as recorded with its attempt."""

    pgid: int
    start: int
    """The leader's start time (``start_ticks``)."""
    boot: str


def record_group(pgid: int) -> GroupRecord | None:
    """What to record for a group just spawned (None: no /proc to read it from)."""
    start = start_ticks(pgid)
    return None if start is None else GroupRecord(pgid, start, boot_id())


def _all_pids() -> Iterable[int]:
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                yield int(name)


def group_members(rec: GroupRecord) -> list[int]:
    """The live (not zombie) processes of the recorded group, or [] when it is gone."""
    if rec.boot != boot_id():
        return []
    leader = start_ticks(rec.pgid)
    if leader is not None and leader != rec.start:
        return []  # the pid went to another process: our group ended before that
    members = []
    for pid in _all_pids():
        fields = _stat(pid)
        # state, ppid, pgrp, ..., starttime: a member started after its leader.
        if (
            fields
            and int(fields[2]) == rec.pgid
            and fields[0] != "Z"
            and int(fields[19]) >= rec.start
        ):
            members.append(pid)
    return members


@dataclass(frozen=True)
class GroupEnd:
    """What ending a recorded group found and did (for the run's ``orphan_killed``)."""

    pgid: int
    found: int
    """Live processes of the group when it was looked at."""
    leader_alive: bool
    term_sufficed: bool
    """All were gone within the grace after SIGTERM; else SIGKILL was sent."""
    left: int = 0
    """Still alive after SIGKILL and another grace (should be 0: unkillable D state)."""

    def data(self) -> dict[str, Any]:
        return {
            "pgid": self.pgid,
            "found": self.found,
            "leader_alive": self.leader_alive,
            "signal": "SIGTERM" if self.term_sufficed else "SIGKILL",
            "term_sufficed": self.term_sufficed,
            "left": self.left,
        }


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):  # ESRCH: gone meanwhile
        os.killpg(pgid, sig)


def _wait_gone(recs: Mapping[str, GroupRecord], within_s: float) -> dict[str, list[int]]:
    """Poll until every group is gone or ``within_s``; the ones still alive."""
    deadline = time.monotonic() + within_s
    while True:
        alive = {key: m for key, rec in recs.items() if (m := group_members(rec))}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)


def end_groups(recs: Mapping[str, GroupRecord], grace_s: float) -> dict[str, GroupEnd]:
    """Make sure each recorded group is gone: SIGTERM to every live one at once, SIGKILL
    to those still alive after ``grace_s``. Blocks up to twice ``grace_s``: call it off
    the event loop. Returns, by key, what was found of each group that was still alive
    (a group already gone has no entry)."""
    found = {key: m for key, rec in recs.items() if (m := group_members(rec))}
    if not found:
        return {}
    live = {key: recs[key] for key in found}
    for key, rec in live.items():
        log.warning(
            "process group %d of a lost attempt still runs (pids %s): SIGTERM",
            rec.pgid,
            " ".join(map(str, found[key])),
        )
        _killpg(rec.pgid, signal.SIGTERM)
    stubborn = _wait_gone(live, grace_s)
    for key in stubborn:
        log.warning("process group %d outlived SIGTERM by %gs: SIGKILL", live[key].pgid, grace_s)
        _killpg(live[key].pgid, signal.SIGKILL)
    left = _wait_gone({key: live[key] for key in stubborn}, max(grace_s, 1.0))
    for key, pids in left.items():
        log.error("process group %d still alive after SIGKILL: %s", live[key].pgid, pids)
    return {
        key: GroupEnd(
            pgid=rec.pgid,
            found=len(found[key]),
            leader_alive=rec.pgid in found[key],
            term_sufficed=key not in stubborn,
            left=len(left.get(key, ())),
        )
        for key, rec in live.items()
    }


# ------------------------------------------------------------------ reaping


def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_subreaper() -> bool:
    """``PR_SET_CHILD_SUBREAPER``: orphaned descendants become agentd's children (as
    they would be as PID 1), so their exit is agentd's to reap. True if set."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def is_subreaper() -> bool:
    """True if orphans come to this process (set, or PID 1)."""
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        ok = libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
        return ok and flag.value != 0
    except (OSError, AttributeError):
        return False


_OWN: set[int] = set()
"""Pids of children agentd spawned and waits for itself (see ``own``)."""


def own(pid: int) -> None:
    """``pid`` is a child agentd spawned and waits for: the reaper leaves it alone."""
    _OWN.add(pid)


def disown(pid: int) -> None:
    """Its waiter is done with ``pid`` (reaped it)."""
    _OWN.discard(pid)


def _children() -> list[int]:
    """This process's children, from every thread's ``children`` file (a child belongs
    to the thread that forked it, an adopted orphan to one of them); by a scan of /proc
    where the kernel has no such file."""
    me = os.getpid()
    pids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{me}/task")
        for tid in tids:
            with open(f"/proc/{me}/task/{tid}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
        return pids
    except (OSError, ValueError):
        pass
    for pid in _all_pids():
        fields = _stat(pid)
        if fields and int(fields[1]) == me:
            pids.append(pid)
    return pids


def child_holding(fd: int, target: str) -> int | None:
    """The child of this process whose file descriptor ``fd`` is ``target`` (what
    ``/proc/<pid>/fd/<fd>`` links to: ``pipe:[4711]``), or None (none, or no /proc). A
    pipe agentd made for one spawn is that spawn's alone: this finds the pid of a child
    that a library spawned without telling it (the MCP SDK's stdio servers)."""
    for pid in _children():
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return pid
        except OSError:
            continue
    return None


class Reaper:
    """Waits for the zombies among agentd's children that nobody else waits for.

    An adopted orphan (see ``set_subreaper``) is nobody's: unreaped, it stays a zombie
    for the daemon's life. Every child agentd spawned itself has a waiter (asyncio's
    child watcher for commands and alert commands, ``configload`` for the config parse,
    ``subprocess`` in a Python task's thread) that waits for its pid: a blind
    ``waitpid(-1)`` would take that child's exit status from it. So the reaper waits
    only for specific pids, and only for a zombie that (1) is not ``own``ed and (2) was
    a zombie already at a scan ``min_age_s`` earlier: a waiter reaps its child within
    microseconds of its exit, so a zombie that old has none. It scans ``min_age_s``
    after a SIGCHLD, and again while a young zombie waits: an idle daemon with no
    children never wakes for it.

    Its one blind spot: a Python task that spawns a child and does not wait for it
    within ``min_age_s`` of its exit loses that exit status (``Popen.wait`` then says 0).
    """

    def __init__(self, min_age_s: float = 1.0) -> None:
        self.min_age_s = min_age_s
        self.reaped = 0
        self._seen: dict[int, float] = {}
        self._loop: Any = None
        self._timer: Any = None

    def attach(self, loop: Any) -> None:
        """Scan after each SIGCHLD, on ``loop`` (its thread does the waiting)."""
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)

    def detach(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGCHLD)
        if self._timer is not None:
            self._timer.cancel()
        self._loop = self._timer = None

    def _on_sigchld(self) -> None:
        if self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self.min_age_s, self._scan_soon)

    def _scan_soon(self) -> None:
        self._timer = None
        if self.scan() and self._loop is not None:
            self._timer = self._loop.call_later(self.min_age_s, self._scan_soon)

    def scan(self, now: float | None = None) -> int:
        """Reap the zombies nobody waits for; returns how many young ones are left to
        look at again."""
        now = time.monotonic() if now is None else now
        zombies = set()
        for pid in _children():
            fields = _stat(pid)
            if fields and fields[0] == "Z" and pid not in _OWN:
                zombies.add(pid)
        young = 0
        for pid in zombies:
            first = self._seen.setdefault(pid, now)
            if now - first < self.min_age_s:
                young += 1
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = 0, 0  # its own waiter took it after all
            if got:
                self.reaped += 1
                log.info(
                    "reaped orphan pid=%d exit=%d (a command's descendant, adopted)",
                    pid,
                    os.waitstatus_to_exitcode(status),
                )
        # Kept: the young zombies only (the others were reaped above, or by their waiter).
        self._seen = {
            pid: t for pid, t in self._seen.items() if pid in zombies and now - t < self.min_age_s
        }
        return young


# ------------------------------------------------------------------ start-up signals


class EarlySignals:
    """SIGTERM, SIGINT and SIGHUP caught from the first moment of ``agentd run``,
    before the config is read or the state opened: their default actions would end the
    process (-15) whatever it had taken. They are only noted here; the daemon replays
    them into its own handlers once its loop has them (``Daemon.startup``), so a stop
    during start-up becomes a clean stop (exit 0, lock, DB and port released) and a
    SIGHUP a reload. What remains uncovered is the interpreter's own start, before any
    of agentd's code runs (about 20 ms)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.installed = False

    def install(self) -> None:
        if self.installed:
            return
        for sig in self.SIGNALS:
            signal.signal(sig, self._note)
        self.installed = True

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    @property
    def stop_requested(self) -> bool:
        return any(s in (signal.SIGTERM, signal.SIGINT) for s in self.pending)

    def take(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken


EARLY = EarlySignals()
