"""The work agentd runs in the benchmarks: as little as possible, so agentd's own cost
is what gets measured. Plain (sync) functions, like most users' tasks and like the
peers' task functions."""

from __future__ import annotations

import time
from typing import Any


def noop(ctx: Any) -> None:
    """A trivial run."""


def sleep(ctx: Any) -> None:
    """A run that takes ``params.ms`` milliseconds, to have runs in flight."""
    time.sleep(float(ctx.params.get("ms", 100)) / 1000)


def lookup(ctx: Any, arguments: dict[str, Any]) -> str:
    """B11's tool (``ctx`` unused, ``None`` in the floor): trivial and idempotent, so
    each contender's cost around a tool call is what gets measured."""
    return f"value {int(arguments['n']) * 7}"
