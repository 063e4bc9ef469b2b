"""When the daemon re-reads its state gauges (running, queued, quarantined, paused).

A scrape of ``/metrics`` never touches the DB: the main loop refreshes these gauges
from a few indexed reads instead. How often is a policy on a monotonic clock, kept
here apart from the loop so that it can be stepped in tests:

- while runs are in flight, every ``busy_refresh_s``;
- the moment the pool turns busy or idle, so ``running`` drops to 0 at once;
- idle, only after a write changed the DB (or the write probe is due), and at most
  every ``idle_refresh_s``. A change seen inside that window is *pending*:
  ``wait_s`` tells the loop when to come back for it, so an idle daemon shows it
  within ``idle_refresh_s`` instead of at whatever wakes the loop next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Version = tuple[int, int]


@dataclass
class GaugeSchedule:
    busy_refresh_s: float = 1.0
    idle_refresh_s: float = 5.0
    probe_every_s: float = 30.0
    """How often an idle daemon writes to its DB only to learn that it still can."""
    last_refresh: float = float("-inf")
    last_probe: float = float("-inf")
    seen_version: Version | None = None
    """The DB's change counter when the gauges were last read."""
    busy: bool = False
    pending: bool = False

    def due(self, now_mono: float, busy: bool, version: Callable[[], Version]) -> bool:
        """Whether to refresh now; if so, the refresh counts as done at ``now_mono``.
        ``version`` is read only when idle: busy, the time alone decides."""
        since_s = now_mono - self.last_refresh
        self.pending = False
        if busy != self.busy:
            due = True
        elif busy:
            due = since_s >= self.busy_refresh_s
        else:
            changed = version() != self.seen_version or self.probe_due(now_mono)
            due = changed and since_s >= self.idle_refresh_s
            self.pending = changed and not due
        if due:
            self.last_refresh, self.busy = now_mono, busy
        return due

    def probe_due(self, now_mono: float) -> bool:
        return now_mono - self.last_probe >= self.probe_every_s

    def reading(
        self, now_mono: float, probe_write: Callable[[], None], version: Callable[[], Version]
    ) -> None:
        """Just before the gauges are read: the write probe if it is due (what notices
        a full disk or a read-only file while nothing else writes), then the DB version
        that the read will show, so the probe's own write is not a change."""
        if self.probe_due(now_mono):
            self.last_probe = now_mono
            probe_write()
        self.seen_version = version()

    def wait_s(self, now_mono: float) -> float | None:
        """Seconds until a pending change may be shown; None when nothing waits."""
        if not self.pending:
            return None
        return max(0.0, self.idle_refresh_s - (now_mono - self.last_refresh))
