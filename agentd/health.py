"""What ``/healthz`` and ``/readyz`` mean, kept apart from HTTP so it can be stepped.

Liveness asks only "is this process still doing its job": the main loop and the
scheduler have ticked recently. It never looks at LLM providers or the network, so a
dependency outage cannot make kubelet restart a healthy daemon. Readiness asks "should
work and traffic come here": startup done, not stopping, and the last write of each
state file (the state DB, the jobstore) worked.

Thread-safe: the main loop writes it (ticks, faults, the two flags) and the probe
listener (``agentd.probes``) reads it from its own thread; ``ticks`` and ``faults`` are
read and written under one lock, so a reader sees each whole, never a dict mid-change.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Health:
    stale_after_s: float = 30.0
    started: bool = False
    stopping: bool = False
    faults: dict[str, str] = field(default_factory=dict)
    """What cannot be written and why, e.g. ``{"state DB": "database or disk is full"}``:
    set when a write fails, cleared by the next write that works."""
    ticks: dict[str, float] = field(default_factory=dict)
    """Component name -> monotonic time of its last tick (main_loop, scheduler)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def fault(self, what: str, error: str | None) -> None:
        """``what`` ("state DB", "schedule DB") failed a write with ``error``, or, with
        None, wrote again."""
        with self._lock:
            if error is None:
                self.faults.pop(what, None)
            else:
                self.faults[what] = error

    def tick(self, component: str, now_mono: float) -> None:
        with self._lock:
            self.ticks[component] = now_mono

    def fault_snapshot(self) -> dict[str, str]:
        """A copy of ``faults``, safe to iterate from any thread."""
        with self._lock:
            return dict(self.faults)

    @property
    def tick_within_s(self) -> float:
        """How often a component must tick, idle or not: three times per staleness
        window, so one late tick on a loaded machine never turns /healthz 503."""
        return self.stale_after_s / 3

    def liveness(self, now_mono: float) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            ticks = dict(self.ticks)
        ages = {name: round(now_mono - t, 3) for name, t in ticks.items()}
        stale = sorted(name for name, age in ages.items() if age > self.stale_after_s)
        body: dict[str, Any] = {
            "status": "ok" if not stale else "unhealthy",
            "last_tick_age_s": ages,
            "stale_after_s": self.stale_after_s,
        }
        if stale:
            body["stale"] = stale
        return not stale, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.stopping:
            return False, {"status": "not_ready", "reason": "shutting down"}
        if not self.started:
            return False, {"status": "not_ready", "reason": "starting up"}
        faults = self.fault_snapshot()
        if faults:
            reason = "; ".join(f"{what} not writable: {why}" for what, why in faults.items())
            return False, {"status": "not_ready", "reason": reason}
        return True, {"status": "ready"}
