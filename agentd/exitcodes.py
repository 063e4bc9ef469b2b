"""Every exit status agentd documents; a leaf module (imports nothing of agentd).

The numbers follow sysexits.h where one fits, so that a supervisor can tell "try
again later" (75) from "a person must act" (65, 73, 78): the systemd unit lists the
latter in ``RestartPreventExitStatus`` so a restart loop cannot hide them.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
"""A clean stop."""
REFUSED: Final = 1
"""A CLI command was refused (unknown run, finished run, ...)."""
USAGE: Final = 2
"""Bad command-line arguments."""
NOT_RUNNING: Final = 3
"""``agentd status``: no daemon answers."""
STATE_DAMAGED: Final = 65
"""EX_DATAERR: a state file is damaged or inconsistent (malformed DB, a WAL that fails
its checksum, a jobstore that is not a database, an empty state DB beside a jobstore that
holds jobs). Restore from backup or see ``agentd doctor``; restarting cannot fix it."""
UNAVAILABLE: Final = 69
"""EX_UNAVAILABLE: the HTTP address cannot be bound (in use, not an address here)."""
STATE_UNUSABLE: Final = 73
"""EX_CANTCREAT: the state dir cannot be used (not a directory, read-only, no
permission)."""
STATE_WRITE_FAILED: Final = 74
"""EX_IOERR: the daemon stopped but could not write its last records (disk full or
read-only); the runs concerned are recovered at the next start."""
LOCKED: Final = 75
"""EX_TEMPFAIL: another agentd holds the state dir's lock."""
CONFIG: Final = 78
"""EX_CONFIG: the config file is invalid or unreadable."""
FORCED: Final = 130
"""A forced stop (a second SIGINT)."""
