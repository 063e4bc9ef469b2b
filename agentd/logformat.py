"""How log lines look: ``key=value`` text for people and the journal, or one JSON object
per line for log shippers (``kubectl logs`` into Loki or Elasticsearch, no parsing).

``daemon.log_format``: ``text``, ``json`` or ``auto`` (the default). ``auto`` is JSON
only where nobody reads the stream directly and no journal files it: under Kubernetes
(``KUBERNETES_SERVICE_HOST`` set) with stderr not a terminal. Everywhere else it is
text: a terminal, the systemd journal (which stamps and files each line itself; see
``agentd.journal``), and a plain redirect, which a person usually reads.

A JSON line carries ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``msg`` (the
text line's message, already scrubbed of secrets by the handler's filter) and every
``key=value`` of the message as a field of its own (a quoted value decoded), so the
same keys can be queried as in the text lines; ``exc`` holds a traceback.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, Literal

Format = Literal["text", "json"]

FIELD = re.compile(r'(?:^|\s)([a-z_][a-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S+)')
"""A ``key=value`` of a message: the value bare, or JSON-quoted when it has spaces."""

RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


def resolve(setting: str, environ: Mapping[str, str], stream: IO[Any]) -> Format:
    """The format ``setting`` (``text``, ``json``, ``auto``) means on ``stream`` here."""
    if setting == "json":
        return "json"
    if setting == "text":
        return "text"
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return "json" if environ.get("KUBERNETES_SERVICE_HOST") and not interactive else "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key, raw in FIELD.findall(message):
            if key in RESERVED or key in out:
                continue
            if raw.startswith('"'):
                try:
                    out[key] = json.loads(raw)
                    continue
                except ValueError:
                    pass
            out[key] = raw
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def apply(fmt: Format, text_formatter: logging.Formatter | None = None) -> None:
    """Give every root handler the formatter of ``fmt`` (``text_formatter`` for text:
    the one the CLI set up, kept so a reload back to text restores it)."""
    for handler in logging.getLogger().handlers:
        if fmt == "json":
            if not isinstance(handler.formatter, JsonFormatter):
                handler._agentd_text = handler.formatter  # type: ignore[attr-defined]
                handler.setFormatter(JsonFormatter())
        else:
            previous = getattr(handler, "_agentd_text", None) or text_formatter
            if previous is not None and isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(previous)
