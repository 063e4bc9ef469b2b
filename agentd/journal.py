"""Log lines that the systemd journal files at their level.

journald reads a service's stderr as a stream, one entry per line, at priority 6
(info) unless a line begins with a syslog priority prefix (``<3>`` for err; see
sd-daemon(3), ``SyslogLevelPrefix=`` on by default). Without the prefixes
``journalctl -p err -u agentd`` shows nothing while agentd logs errors.

The prefixes are written only when stderr *is* the journal stream: systemd names that
stream's device and inode in ``JOURNAL_STREAM``; a redirect (``agentd run 2>file``
under a unit, or a child that inherited the variable) does not match, and gets plain
lines. Every line of a multi-line record (a traceback) carries its record's prefix,
so the whole traceback is filed at the record's level.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
"""Python's levels as syslog priorities (crit, err, warning, info, debug)."""


def priority(levelno: int) -> int:
    """The syslog priority of a level, custom levels rounded to the next standard one
    below (a level between WARNING and ERROR is a warning)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


def stderr_is_journal(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (``JOURNAL_STREAM``
    is ``device:inode`` of it)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """A ``logging.Formatter`` that begins every line of a record with its priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))
