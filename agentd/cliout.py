"""How the CLI's read commands print: one switch, ``-o table|wide|json|yaml``.

A leaf: it imports nothing of agentd, so every command can use it before it knows
whether a daemon answers.

Invariants:

- ``json`` and ``yaml`` print the command's records (for most, as the API returns
  them), instants as the API's ISO 8601 UTC text whatever ``--utc`` says; the same
  data in both.
- ``table`` and ``wide`` are for people: an instant is shown in the operator's local
  zone (the process's ``TZ``, else the system's), or in UTC with ``--utc``; ``table``
  cuts a long cell at ``CELL_MAX`` characters, ``wide`` adds columns and cuts nothing.
- Colour (ANSI SGR) only when the stream is a terminal and ``NO_COLOR`` is unset or
  empty (https://no-color.org); never in ``json`` or ``yaml``. Colour never changes a
  cell's width, so columns line up with and without it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any, Final

FORMATS: Final = ("table", "wide", "json", "yaml")
CELL_MAX: Final = 60
"""The widest cell ``table`` prints (``wide`` prints every character)."""

_ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]00:00)$")
"""How the API and the state DB write an instant (UTC)."""

_SGR: Final = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}
STATUS_COLOURS: Final = {
    "succeeded": "green",
    "ok": "green",
    "alive": "green",
    "running": "cyan",
    "queued": "blue",
    "awaiting_approval": "magenta",
    "failed": "red",
    "quarantined": "red",
    "timed_out": "red",
    "budget_exhausted": "yellow",
    "cancelled": "yellow",
    "dropped": "dim",
    "skipped": "dim",
    "paused": "yellow",
}
"""The colour of a cell that is exactly one of these words (a run's status, an outcome)."""


def colour_enabled(stream: IO[str] | None = None) -> bool:
    """Colour on ``stream`` (stdout by default): a terminal, and no ``NO_COLOR``."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, colour: str | None, on: bool) -> str:
    """``text`` in ``colour`` (a name of ``_SGR``) when ``on``; as it is otherwise."""
    if not on or not colour or colour not in _SGR:
        return text
    return f"\x1b[{_SGR[colour]}m{text}\x1b[0m"


class View:
    """The output switches of one command: ``fmt`` (one of ``FORMATS``), ``utc``, and
    whether colour is on (decided once, from stdout)."""

    def __init__(self, fmt: str = "table", utc: bool = False, colour: bool | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"output format must be one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.utc = utc
        self.colour = colour_enabled() if colour is None else colour
        if fmt in ("json", "yaml"):
            self.colour = False

    @property
    def machine(self) -> bool:
        """``json`` or ``yaml``: the data, not a table."""
        return self.fmt in ("json", "yaml")

    @property
    def wide(self) -> bool:
        return self.fmt == "wide"

    # ------------------------------------------------------------ instants

    def instant(self, value: str, seconds: bool = True) -> str:
        """An ISO 8601 UTC instant as ``YYYY-MM-DD HH:MM:SS`` in the operator's zone (or
        UTC with ``--utc``); text that is no such instant comes back as it is."""
        moment = parse_instant(value)
        if moment is None:
            return value
        local = moment if self.utc else moment.astimezone()
        return local.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")

    def instant_zoned(self, value: str) -> str:
        """``instant`` with the zone's abbreviation after it (``UTC``, ``CET``)."""
        moment = parse_instant(value)
        if moment is None:
            return value
        local = moment.astimezone(UTC) if self.utc else moment.astimezone()
        return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.tzname() or "")

    @property
    def zone(self) -> str:
        """The zone tables show instants in (its abbreviation now)."""
        return "UTC" if self.utc else (datetime.now().astimezone().tzname() or "local")

    # ------------------------------------------------------------ cells

    def cell(self, value: Any, cut: bool = True) -> str:
        """One table cell: ``-`` for nothing, ``yes``/``no`` for a flag, an instant in
        the operator's zone, a long text cut at ``CELL_MAX`` (not in ``wide``)."""
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, dict | list):
            text = json.dumps(value, default=str, sort_keys=True) if value else "-"
        else:
            text = str(value)
        if isinstance(value, str):
            text = self.instant(text)
        text = " ".join(text.splitlines()) if "\n" in text else text
        if cut and not self.wide and len(text) > CELL_MAX:
            return text[: CELL_MAX - 3] + "..."
        return text

    def painted(self, text: str, column: str = "") -> str:
        """A cell in its colour: a status word by ``STATUS_COLOURS``."""
        if not self.colour:
            return text
        colour = STATUS_COLOURS.get(text.strip())
        if colour is None and column in ("error", "last_error") and text.strip() != "-":
            colour = "red"
        return paint(text, colour, True)

    # ------------------------------------------------------------ printing

    def table_lines(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
        """``rows`` as a table of ``columns``: an upper-case header, cells padded to the
        widest of each column, trailing blanks dropped; ``(none)`` for no rows."""
        if not rows:
            return ["(none)"]
        cells = [[self.cell(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        head = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
        lines = [paint(head.rstrip(), "bold", self.colour)]
        for row in cells:
            parts = [
                self.painted(v, c) + " " * (w - len(v))
                for v, c, w in zip(row, columns, widths, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
        return lines

    def dump(self, data: Any) -> str:
        """``data`` as JSON (indented) or YAML (block style, keys in their order)."""
        plain = json.loads(json.dumps(data, default=str))
        if self.fmt == "yaml":
            import yaml  # only when asked for: 0.02 s

            return str(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)).rstrip("\n")
        return json.dumps(plain, indent=2)


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``: a span as an operator reads it."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_line(done: int, total: int, elapsed_s: float | None, width: int = 20) -> str:
    """``[########------------]  40% 4/10 ETA 12s``: a bar of ``done`` of ``total`` and,
    when ``elapsed_s`` (since the attempt began) is known and some but not all is done,
    the time left at the pace so far."""
    frac = min(1.0, max(0.0, done / total)) if total > 0 else 0.0
    filled = round(frac * width)
    eta = ""
    if elapsed_s is not None and 0 < done < total:
        eta = f" ETA {duration(elapsed_s / done * (total - done))}"
    return f"[{'#' * filled}{'-' * (width - filled)}] {frac:4.0%} {done}/{total}{eta}"


def parse_instant(text: str) -> datetime | None:
    """The UTC instant ``text`` holds when it is the API's ISO 8601 form, else None."""
    if not isinstance(text, str) or not _ISO_UTC.match(text):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
