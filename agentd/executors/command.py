"""Run an external command in its own session, capturing capped output as it arrives.

Output is consumed by a ``SubprocessProtocol`` rather than ``StreamReader`` tasks: on
Python 3.11 ``Process.wait()`` only returns once every pipe is closed, so a grandchild
left holding stdout would hang the run. The protocol tells process exit and pipe EOF
apart, and its callbacks always consume data, so a chatty child never blocks on a full
pipe even past the output cap.

The child gets its own session (``start_new_session``) so one ``killpg`` reaches
everything it started. On cancellation the group gets SIGTERM, then SIGKILL after
``kill_grace_s``. After a normal exit, leftovers still holding our pipes after the grace
are killed too: the run is over when the command says so.

A command's group must not outlive its daemon either. Right after the spawn the group
is recorded with the attempt (``ExecEnv.on_spawn``, see ``agentd.procs``): whoever
recovers the run after a crash ends the group before it runs the command again. And
where util-linux's ``setpriv`` can do it, the command is exec'd through
``setpriv --pdeathsig TERM`` (``pdeathsig_prefix``), so its leader gets SIGTERM the
moment the daemon's loop thread dies, also in the instant before the record is written,
and also when no agentd ever starts again on that state: opt-in, with
``AGENTD_PDEATHSIG=1`` in the daemon's environment, because the extra exec of setpriv
(its dynamic loading) is about as much CPU as the rest of a trivial command's run. Only
the leader: the kernel
clears the death signal of its children, whom the recorded group covers. Why a wrapper:
``subprocess`` cannot set a death signal, ``preexec_fn`` is unsafe in a threaded
process and forbids ``vfork``, and a Python wrapper costs an interpreter start; setpriv
is a small C binary that calls ``prctl`` and execs, adding one exec per command. Where
it is missing (or the command's executable cannot be found, so that ``Popen`` reports
the error as before), commands start without it and the record alone is the guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import IO, Any

from agentd import procs
from agentd.config import TaskConfig
from agentd.context import RunContext
from agentd.executors import ExecEnv
from agentd.models import Result

# systemd hands these to the daemon alone; a child that saw them could ping the
# watchdog or send READY=1 on our behalf.
_SYSTEMD_VARS_B = (b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID")
_TAIL_BYTES = 4096


class _Sink:
    """One output file that stops growing at ``cap`` but keeps counting. Created on the
    first byte: a command that prints nothing leaves no empty files (two file creates
    were a third of the kernel CPU of a trivial command run)."""

    def __init__(self, path: Path, cap: int) -> None:
        self._path = path
        self._fh: IO[bytes] | None = None
        self._cap = cap
        self.written = 0
        self.seen = 0
        self._last = b"\n"

    def write(self, data: bytes) -> None:
        self.seen += len(data)
        room = self._cap - self.written
        if room > 0 and data:
            part = data[:room]
            if self._fh is None:
                # 0600 whatever the umask: a task's output may hold what it read.
                fd = os.open(
                    self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
                )
                self._fh = os.fdopen(fd, "wb")
            self._fh.write(part)
            self._fh.flush()  # so an operator can tail a long run
            self.written += len(part)
            self._last = part[-1:]

    def close(self) -> None:
        if self._fh is None or self._fh.closed:
            return
        if self.seen > self.written:
            lead = b"" if self._last == b"\n" else b"\n"
            self._fh.write(lead + f"[agentd: output truncated at {self._cap} bytes]\n".encode())
        self._fh.close()


class _Capture(asyncio.SubprocessProtocol):
    def __init__(self, workspace: Path, cap: int, loop: asyncio.AbstractEventLoop) -> None:
        self.sinks = {
            1: _Sink(workspace / "stdout.log", cap),
            2: _Sink(workspace / "stderr.log", cap),
        }
        self.tail = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes: dict[int, asyncio.Future[None]] = {fd: loop.create_future() for fd in (1, 2)}
        self.write_error: str | None = None

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        if fd == 2:
            self.tail += data
            del self.tail[:-_TAIL_BYTES]
        try:
            self.sinks[fd].write(bytes(data))
        except OSError as exc:  # disk full: keep draining the pipe, report it at the end
            self.write_error = f"cannot write output: {exc.strerror}"

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        fut = self.pipes.get(fd)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()

    def stderr_line(self) -> str:
        lines = [ln.strip() for ln in self.tail.decode(errors="replace").splitlines()]
        last = next((ln for ln in reversed(lines) if ln), "")
        return last[:200]


def use_pidfd_child_watcher() -> bool:
    """Reap children through pidfds on the event loop instead of one thread per child.

    Python 3.11's default ``ThreadedChildWatcher`` starts a thread for every command and
    waits for it to come up on the loop. 3.12 picks pidfds by itself, so this only acts
    on 3.11, and only where the kernel has ``pidfd_open`` (Linux 5.3+; a seccomp filter
    may still refuse it).
    Process-wide, like the policy it changes: the daemon calls it once, before its loop.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.get_event_loop_policy().set_child_watcher(asyncio.PidfdChildWatcher())
    return True


def pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig TERM --`` if asked for (``AGENTD_PDEATHSIG=1``) and this
    host's setpriv has that option (util-linux 2.33+) and it works here, else (). Runs it
    once: call it off the loop, at start."""
    if os.environ.get("AGENTD_PDEATHSIG") != "1" or not sys.platform.startswith("linux"):
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "TERM", "--")
    try:
        done = subprocess.run(
            [*prefix, "true"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if done.returncode == 0 else ()


def _spawn_argv(
    argv: list[str], prefix: tuple[str, ...], env: dict[bytes, bytes], cwd: str | Path | None
) -> list[str]:
    """``argv`` behind ``prefix`` when its executable can be found as ``Popen`` would
    find it; else ``argv`` alone, so that ``Popen`` raises the error it always did."""
    if not prefix:
        return argv
    exe = argv[0]
    if "/" in exe:
        target = os.path.join(cwd or ".", exe)
        found = os.path.isfile(target) and os.access(target, os.X_OK)
    else:
        path = env.get(b"PATH", os.defpath.encode()).decode(errors="replace")
        found = shutil.which(exe, path=path) is not None
    return [*prefix, *argv] if found else argv


def inherited_env() -> dict[bytes, bytes]:
    """What a command inherits: this process's environment without systemd's variables.
    As bytes, which ``Popen`` passes to the child as they are."""
    return {k: v for k, v in os.environb.items() if k not in _SYSTEMD_VARS_B}


def _child_env(task: TaskConfig, ctx: RunContext, exec_env: ExecEnv) -> dict[bytes, bytes]:
    cfg = task.command
    assert cfg is not None
    base = exec_env.inherited_env
    if base is None:
        base = inherited_env()
    if cfg.inherit_env:
        env = dict(base)
        for name in exec_env.withheld_env:  # the daemon's secrets; cfg.env may re-add one
            env.pop(name, None)
    else:
        env = {
            b"PATH": base.get(b"PATH", os.defpath.encode()),
            b"HOME": base.get(b"HOME", b"/"),
            b"LANG": base.get(b"LANG", b"C.UTF-8"),
        }
    enc = os.fsencode
    env.update((enc(k), enc(v)) for k, v in cfg.env.items())
    env[b"AGENTD_RUN_ID"] = enc(ctx.run_id)
    env[b"AGENTD_TASK"] = enc(ctx.task_id)
    env[b"AGENTD_ATTEMPT"] = str(ctx.attempt).encode()
    env[b"AGENTD_WORKSPACE"] = enc(ctx.workspace)
    env[b"AGENTD_SCHEDULED_FOR"] = (
        ctx.scheduled_for.isoformat().encode() if ctx.scheduled_for else b""
    )
    for name in _SYSTEMD_VARS_B:  # also when the task's own env names them
        env.pop(name, None)
    return env


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):  # ESRCH: the group is already gone
        os.killpg(pgid, sig)


async def _settle(futures: list[asyncio.Future[None]], timeout: float) -> bool:
    """Wait without cancelling the futures; True when all are done."""
    pending = [f for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return all(f.done() for f in futures)


async def execute(task: TaskConfig, ctx: RunContext, env: ExecEnv) -> Result:
    cfg = task.command
    assert cfg is not None
    argv = cfg.argv if cfg.argv is not None else ["/bin/sh", "-c", cfg.shell or ""]
    cap = task.output_max_bytes or env.output_max_bytes
    loop = asyncio.get_running_loop()
    proto = _Capture(ctx.workspace, cap, loop)  # made here: AGENTD_WORKSPACE must exist
    child_env = _child_env(task, ctx, env)
    spawn = asyncio.ensure_future(
        loop.subprocess_exec(
            lambda: proto,
            *_spawn_argv(argv, env.spawn_prefix, child_env, cfg.cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cfg.cwd,
            env=child_env,
            start_new_session=True,
            umask=env.child_umask,
        )
    )
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            transport, _ = await asyncio.shield(spawn)
            break
        except asyncio.CancelledError as exc:
            if spawn.cancelled():  # the loop itself is going away
                proto.close()
                raise
            # Cancelled mid-spawn, asyncio would kill only the leader, then wait for the
            # pipes, which a grandchild may hold for hours. Finish spawning (milliseconds)
            # so the whole group can be killed below.
            cancelled = exc
        except OSError as exc:
            proto.close()
            if cancelled is not None:
                raise cancelled from None
            where = f" ({exc.filename})" if exc.filename not in (None, argv[0]) else ""
            error = f"cannot start {argv[0]}: {exc.strerror}{where}"
            return Result(ok=False, error=error, retryable=False)
        except BaseException:
            proto.close()
            raise
    pgid = transport.get_pid()
    procs.own(pgid)  # asyncio's child watcher waits for it, not the daemon's reaper
    if env.on_spawn is not None:
        group = procs.record_group(pgid)
        if group is not None:
            env.on_spawn(ctx, group)
    pipes = list(proto.pipes.values())
    stragglers_killed = False
    try:
        if cancelled is not None:
            raise cancelled
        await asyncio.shield(proto.exited)  # cancelling us must not cancel the exit future
        if not await _settle(pipes, env.kill_grace_s):
            stragglers_killed = True
            _killpg(pgid, signal.SIGKILL)
            await _settle(pipes, env.kill_grace_s)
    except asyncio.CancelledError:
        _killpg(pgid, signal.SIGTERM)
        try:
            await _settle([proto.exited, *pipes], env.kill_grace_s)
        finally:  # even if cancelled again: nothing of the group may survive
            _killpg(pgid, signal.SIGKILL)
        await _settle([proto.exited, *pipes], env.kill_grace_s)
        raise
    finally:
        transport.close()
        proto.close()
        if transport.get_returncode() is not None:
            procs.disown(pgid)

    rc = transport.get_returncode()
    assert rc is not None
    out, err = proto.sinks[1], proto.sinks[2]
    detail: dict[str, Any] = {"stdout_bytes": out.seen, "stderr_bytes": err.seen}
    if stragglers_killed:
        detail["stragglers_killed"] = True
        ctx.log.warning("killed leftover processes still holding the command's output")
    if rc in cfg.success_exit_codes and proto.write_error is None:
        return Result(ok=True, exit_code=rc, detail=detail)
    if rc < 0:
        error = f"killed by signal {_signal_name(-rc)}"
    elif rc in cfg.success_exit_codes:
        error = proto.write_error or ""
    else:
        line = proto.stderr_line()
        error = f"exit code {rc}" + (f": {line}" if line else "")
    return Result(ok=False, error=error, exit_code=rc, detail=detail)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)
