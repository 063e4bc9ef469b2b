"""What every peer program shares: how it says "ready", how it reports, CPU time.

A peer prints ``READY {json}`` once it is set up (the harness times spawn -> READY,
interpreter start and imports included, as for agentd), then one JSON line with its
measurements just before it exits.
"""

from __future__ import annotations

import json
import math
import resource
import time
from typing import Any

LATE_TIMEOUT_S = 120.0
"""A run that has not started this long after it was due counts as missed."""


def ready(**info: Any) -> None:
    print("READY " + json.dumps(info), flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sleep_until(when: float) -> None:
    while (left := when - time.time()) > 0:
        time.sleep(min(left, 0.5))


def next_second() -> float:
    return float(math.floor(time.time()) + 1)


def idle_cron_fields() -> tuple[int, int]:
    """Hour and minute of a daily time 12 hours from now: registered, never due soon."""
    t = time.gmtime(time.time() + 12 * 3600)
    return t.tm_hour, t.tm_min
