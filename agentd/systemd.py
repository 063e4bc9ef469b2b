"""Talking to systemd: sd_notify states and the watchdog, through ``sdnotify``.

``sdnotify`` is a thin socket wrapper with three gaps this module closes:

- it encodes latin-1 and swallows the error when it cannot, so a status line with a
  task name like ``Übersicht`` would silently vanish; status text is made ASCII here;
- it knows nothing of message size: systemd reads one datagram per message, so every
  message is built here as one string and refused if it would not fit;
- it swallows every socket error; here they are logged once, not hidden.

Without ``NOTIFY_SOCKET`` (a terminal, Kubernetes, tests) every call is a no-op, so
callers never ask "am I under systemd?".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import sdnotify

log = logging.getLogger("agentd.systemd")

MAX_MESSAGE_BYTES = 4096
MAX_STATUS_CHARS = 400
# Variables meant for agentd alone: a task's command must not inherit them (a child that
# pings the watchdog would hide a wedged daemon).
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def ascii_status(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """One printable ASCII line: systemd shows STATUS= verbatim in ``systemctl status``."""
    flat = " ".join(text.split())
    safe = flat.encode("ascii", "replace").decode("ascii")
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog period systemd expects of *this* process, or None.

    ``WATCHDOG_PID`` names the process the watchdog is meant for; when it is another
    process (we were started by a wrapper that forwarded its environment) we must not
    ping on its behalf.
    """
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(pid):
        log.info("watchdog is for pid %s, not us (pid %d): not pinging", owner, pid)
        return None
    return usec / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, which is what MONOTONIC_USEC= must carry."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """sd_notify for one daemon process. Build it once at start; it takes the notify
    variables out of the environment (like ``sd_notify(unset_environment=1)``) so that
    the commands agentd runs do not inherit them."""

    def __init__(self, pid: int | None = None) -> None:
        # sdnotify reads os.environ itself, so this does too.
        environ = os.environ
        self.socket_path = environ.get("NOTIFY_SOCKET") or None
        self.watchdog_s = watchdog_interval_s(environ, os.getpid() if pid is None else pid)
        self._sd: sdnotify.SystemdNotifier | None = None
        self._failed = False
        self.last_status: str | None = None
        if self.socket_path:
            try:
                # debug=True: errors raise, and send() decides how to report them.
                self._sd = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                log.error("cannot use NOTIFY_SOCKET=%s: %s", self.socket_path, exc)
        for name in NOTIFY_VARS:
            environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram with ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="...")``."""
        if self._sd is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        data = message.encode("ascii", "replace")
        if len(data) >= MAX_MESSAGE_BYTES:
            log.error("sd_notify message of %d bytes not sent (limit 4 KiB)", len(data))
            return False
        try:
            self._sd.socket.sendall(data)
        except OSError as exc:
            if not self._failed:
                log.error("sd_notify to %s failed: %s", self.socket_path, exc)
            self._failed = True
            return False
        if self._failed:
            log.info("sd_notify to %s works again", self.socket_path)
            self._failed = False
        return True

    # The states agentd uses, one method each so call sites read like the protocol.

    def ready(self, status: str) -> bool:
        self.last_status = ascii_status(status)
        return self.send(READY=1, STATUS=self.last_status)

    def status(self, text: str) -> bool:
        """Send STATUS= only when it changed: it is refreshed every second."""
        line = ascii_status(text)
        if line == self.last_status:
            return False
        self.last_status = line
        return self.send(STATUS=line)

    def reloading(self) -> bool:
        return self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def stopping(self, status: str) -> bool:
        self.last_status = ascii_status(status)
        return self.send(STOPPING=1, STATUS=self.last_status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more; systemd only ever lengthens its timeout with this,
        so sending it when the configured stop timeout would have sufficed is harmless."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))
