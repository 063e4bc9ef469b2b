"""A config file is parsed and validated in a forked child; the daemon gets the result.

Parsing 10,000 tasks allocates about a million short-lived objects (YAML nodes, raw
dicts). Parsed in the daemon, they left its heap fragmented: 27 MiB of RSS at 10,000
tasks that was never given back. On a reload, the parsing thread also took the GIL
from the event loop at every switch interval. In a child, both stay in the child: the
daemon only unpickles the validated config (70 ms at 10,000 tasks, where parsing,
validating and fingerprinting take 620 ms), and at cold start the child parses while
the daemon imports its other modules, on the other core.

The child is a speed-up, never a new way to fail: if it cannot be forked, crashes, is
killed or outlives ``timeout_s``, the parent logs why and parses in-process as before.
A config error is not such a failure: the child reports it and the parent raises it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import select
import signal
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from agentd.config import Config, ConfigError, ConfigProblem, TaskIndex, load_config, task_index

log = logging.getLogger("agentd.config")

CHILD_TIMEOUT_S = 120.0  # 10,000 tasks take 0.6 s; a wedged child must not wedge a reload
_READ_BYTES = 1 << 20


class ChildFailed(Exception):
    """The child gave no usable answer (not: the config is invalid)."""


class ConfigLoad:
    """One config file being loaded: the constructor forks, ``result()`` collects.

    ``before`` is the running config and its index, for a reload: unchanged tasks keep
    their fingerprints (the child has the parent's memory, so nothing is sent to it).
    """

    def __init__(self, path: Path, before: tuple[Config, TaskIndex] | None = None) -> None:
        self.path = path
        self.before = before
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
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: parse here instead
            os.close(read_fd)
            os.close(write_fd)
            self._fork_error = f"fork failed: {exc}"
            return
        if pid == 0:
            os.close(read_fd)
            _child(path, before, write_fd)
        os.close(write_fd)
        self.pid, self._fd = pid, read_fd

    def kill(self) -> None:
        """Give up on this load: the child is killed, so a waiting ``result`` returns."""
        self._killed = True
        if self.pid is not None and not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def result(self, timeout_s: float = CHILD_TIMEOUT_S) -> tuple[Config, TaskIndex]:
        """The validated config and its index; raises ConfigError when it is invalid."""
        try:
            if self._fork_error:
                raise ChildFailed(self._fork_error)
            payload = self._collect(timeout_s)
        except ChildFailed as exc:
            if self._killed:
                raise ConfigError(str(self.path), [ConfigProblem("", "load abandoned")]) from None
            log.warning("config parse in a child process failed (%s); parsing in-process", exc)
            config = load_config(self.path)
            return config, task_index(config, self.before)
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
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(self.pid, signal.SIGKILL)
                    raise ChildFailed(f"no result within {timeout_s:g} s, child killed")
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
        if status:
            raise ChildFailed(status)
        try:
            payload = pickle.loads(b"".join(chunks))
        except Exception as exc:
            raise ChildFailed(f"unreadable result: {exc!r}") from None
        if not isinstance(payload, tuple) or payload[0] not in ("ok", "invalid", "crash"):
            raise ChildFailed(f"unexpected result {type(payload).__name__}")
        if payload[0] == "crash":
            raise ChildFailed(f"child raised: {payload[1].strip().splitlines()[-1]}")
        return payload


def _reap(pid: int) -> str | None:
    """Wait for the child; why it failed, or None when it exited 0."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else: judge by what it wrote
        return None
    if os.WIFSIGNALED(status):
        return f"child killed by signal {os.WTERMSIG(status)}"
    code = os.waitstatus_to_exitcode(status)
    return f"child exited {code}" if code else None


def _child(path: Path, before: tuple[Config, TaskIndex] | None, fd: int) -> NoReturn:
    """Parse, report on ``fd``, exit without any of the parent's cleanup."""
    code = 0
    try:
        # The parent's handlers would write signal numbers to its event loop's wakeup fd.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()  # short-lived: its garbage leaves with it
        payload: tuple[object, ...]
        try:
            config = load_config(path)
            index = task_index(config, before)
            if before:
                # An unchanged task kept its index entry (the same object): the parent
                # has that task already, so it is not pickled (10,000 tasks: 118 ms).
                kept = before[1]
                slim = {t: None if kept.get(t) is index[t] else c for t, c in config.tasks.items()}
                config = config.model_copy(update={"tasks": slim})
            payload = ("ok", config, index)
        except ConfigError as exc:
            payload = ("invalid", exc.source, exc.problems)
        except BaseException:
            payload = ("crash", traceback.format_exc())
        view = memoryview(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        code = 70
    finally:
        os._exit(code)
