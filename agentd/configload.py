"""A config file is parsed and validated in a forked child; the daemon gets the result.

Parsing 10,000 tasks allocates about a million short-lived objects (YAML nodes, raw
dicts). Parsed in the daemon, they left its heap fragmented: 27 MiB of RSS at 10,000
tasks that was never given back. On a reload, the parsing thread also took the GIL
from the event loop at every switch interval. In a child, both stay in the child: the
daemon only unpickles the validated config (a small share of parsing, validating and
fingerprinting it), and at cold start the child parses while
the daemon imports its other modules, on the other core.

The child is bounded, so that no file can cost the daemon more than a refusal:

* it dies with its parent (``PR_SET_PDEATHSIG``): a daemon killed during a parse
  leaves no orphan behind, however large the file;
* its address space may grow ``memory_mib`` beyond its size at fork (``RLIMIT_AS``),
  its CPU time is capped (``RLIMIT_CPU``, a backstop), and the parent waits at most
  ``timeout_s`` for its answer, then kills it.

A child that crashed, was killed, ran out of time or memory, or raised something
unexpected is a ``ConfigError`` (the file is not accepted; the caller keeps its running
config or, at start, exits 78), never a reason to parse the same file in-process: that
would hand a file that broke a bound straight to the daemon. Only when no child can be
made (no pipe, no fork) is the file parsed here, as it was before there were children.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import resource
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from agentd import procs
from agentd.config import Config, ConfigError, ConfigProblem, TaskIndex, load_config, task_index

log = logging.getLogger("agentd.config")

CHILD_TIMEOUT_S = 30.0
"""10,000 tasks parse in under 1 s, 5 s on a loaded machine; a wedged or swamped child
must not hold a start or a reload longer than this."""
CHILD_MEMORY_MIB = 1024
"""How far the child's address space may grow past its size at fork: 10,000 tasks
need under 300 MiB."""
CHILD_CPU_S = 60
"""The child's CPU time limit: a backstop for the wall-clock timeout."""
_READ_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1


class ChildFailed(Exception):
    """The child gave no usable answer (not: the config is invalid)."""


class ConfigLoad:
    """One config file being loaded: the constructor forks, ``result()`` collects.

    ``before`` is the running config and its index, for a reload: unchanged tasks keep
    their fingerprints (the child has the parent's memory, so nothing is sent to it).

    Fork on the main thread (``cli`` and the daemon's event loop do): the child's
    death signal fires when the *thread* that forked it exits, so a child forked from
    a worker thread would die with that thread. Elsewhere it is forked without one.
    """

    def __init__(
        self,
        path: Path,
        before: tuple[Config, TaskIndex] | None = None,
        *,
        memory_mib: int = CHILD_MEMORY_MIB,
        cpu_s: int = CHILD_CPU_S,
    ) -> None:
        self.path = path
        self.before = before
        self.memory_mib = memory_mib
        self.cpu_s = cpu_s
        self.pid: int | None = None
        self._fd: int | None = None
        self._fork_error: str | None = None
        self._reaped = False
        self._killed = False
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # out of file descriptors: parse here instead
            self._fork_error = f"pipe failed: {exc}"
            return
        parent = os.getpid()
        with_parent = threading.current_thread() is threading.main_thread()
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: parse here instead
            os.close(read_fd)
            os.close(write_fd)
            self._fork_error = f"fork failed: {exc}"
            return
        if pid == 0:
            os.close(read_fd)
            _child(path, before, write_fd, parent if with_parent else None, memory_mib, cpu_s)
        os.close(write_fd)
        procs.own(pid)  # waited for by ``_collect``, never by the daemon's reaper
        self.pid, self._fd = pid, read_fd

    def kill(self) -> None:
        """Give up on this load: the child is killed, so a waiting ``result`` returns."""
        self._killed = True
        if self.pid is not None and not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def result(self, timeout_s: float = CHILD_TIMEOUT_S) -> tuple[Config, TaskIndex]:
        """The validated config and its index; raises ConfigError when it is invalid or
        could not be parsed within the child's bounds."""
        if self._fork_error:
            log.warning("config parse: no child process (%s); parsing in-process", self._fork_error)
            config = load_config(self.path)
            return config, task_index(config, self.before)
        try:
            payload = self._collect(timeout_s)
        except ChildFailed as exc:
            if self._killed:
                raise ConfigError(str(self.path), [ConfigProblem("", "load abandoned")]) from None
            log.warning("config parse failed in its child process: %s; file not accepted", exc)
            raise ConfigError(str(self.path), [ConfigProblem("", str(exc))]) from None
        if payload[0] == "invalid":
            raise ConfigError(payload[1], payload[2])
        config, index = payload[1], payload[2]
        if self.before:  # the tasks the child left out are the running config's
            kept = self.before[0].tasks
            tasks = {tid: kept[tid] if t is None else t for tid, t in config.tasks.items()}
            config = config.model_copy(update={"tasks": tasks})
        return config, index

    def _collect(self, timeout_s: float) -> tuple[Any, ...]:
        assert self.pid is not None and self._fd is not None
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        late = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(self.pid, signal.SIGKILL)
                    late = True
                    break
                ready, _, _ = select.select([self._fd], [], [], left)
                if ready:
                    chunk = os.read(self._fd, _READ_BYTES)
                    if not chunk:
                        break
                    chunks.append(chunk)
        finally:
            os.close(self._fd)
            status = _reap(self.pid)
            self._reaped = True
            procs.disown(self.pid)
        if late:
            raise ChildFailed(
                f"config not parsed within {timeout_s:g} s: parsing stopped "
                "(a file that never ends, or far too large?)"
            )
        if status is not None:
            raise ChildFailed(self._died(status))
        try:
            payload = pickle.loads(b"".join(chunks))
        except Exception as exc:
            raise ChildFailed(f"config parse gave an unreadable result: {exc!r}") from None
        if not isinstance(payload, tuple) or payload[0] not in (
            "ok",
            "invalid",
            "toolarge",
            "crash",
        ):
            raise ChildFailed(f"config parse gave an unexpected {type(payload).__name__}")
        if payload[0] == "toolarge":
            raise ChildFailed(f"config too large: parsing needed more than {payload[1]} MiB")
        if payload[0] == "crash":
            raise ChildFailed(f"config parse failed: {payload[1].strip().splitlines()[-1]}")
        return payload

    def _died(self, status: int) -> str:
        """Why the child gave no answer, from its wait status."""
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
            if sig == signal.SIGXCPU:
                return f"config parse used more than {self.cpu_s} s of CPU: parsing stopped"
            return (
                f"config parse failed: its process was killed by signal {sig} ({name}); "
                f"it may use {self.memory_mib} MiB more than the daemon"
            )
        return f"config parse failed: its process exited {os.waitstatus_to_exitcode(status)}"


def _reap(pid: int) -> int | None:
    """Wait for the child: its wait status, or None when it exited 0."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else: judge by what it wrote
        return None
    return None if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else status


def _bound(parent: int | None, memory_mib: int, cpu_s: int) -> None:
    """The child's own bounds: death with ``parent`` (when forked from its main
    thread), address space and CPU time."""
    if parent is not None and sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above: nobody is waiting
            os._exit(0)
    try:
        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError):
        size = 0
    for which, want in (
        (resource.RLIMIT_AS, size + (memory_mib << 20)),
        (resource.RLIMIT_CPU, cpu_s),
    ):
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft == resource.RLIM_INFINITY or want < soft:
            resource.setrlimit(which, (want, hard))


def _child(
    path: Path,
    before: tuple[Config, TaskIndex] | None,
    fd: int,
    parent: int | None,
    memory_mib: int,
    cpu_s: int,
) -> NoReturn:
    """Parse, report on ``fd``, exit without any of the parent's cleanup."""
    code = 0
    try:
        # The parent's handlers would write signal numbers to its event loop's wakeup fd.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _bound(parent, memory_mib, cpu_s)
        gc.disable()  # short-lived: its garbage leaves with it
        try:
            data = pickle.dumps(_parse(path, before), protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            data = pickle.dumps(("toolarge", memory_mib))
        except BaseException:
            data = pickle.dumps(("crash", traceback.format_exc()))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _parse(path: Path, before: tuple[Config, TaskIndex] | None) -> tuple[object, ...]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return ("invalid", exc.source, exc.problems)
    index = task_index(config, before)
    if before:
        # An unchanged task kept its index entry (the same object): the parent has that
        # task already, so it is not pickled.
        kept = before[1]
        slim = {t: None if kept.get(t) is index[t] else c for t, c in config.tasks.items()}
        config = config.model_copy(update={"tasks": slim})
    return ("ok", config, index)
