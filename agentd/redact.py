"""Secret values scrubbed out of every text agentd stores, sends or logs.

The config never holds a secret: it names the environment variable or the file that
does (``token_env``, ``api_key_file``, ``secret_env``, ...; see ``config.secret_refs``).
What those hold is read here, once per config (at start and at each reload), into a
``Redactor``: an immutable matcher that replaces each value, wherever it appears in a
text, with ``[redacted]``. Texts are scrubbed where they leave agentd's hands: the
state layer (run and attempt errors, event data, hence run.json, events.jsonl, the API,
SSE and alert payloads, which are all read from it) and the log handlers
(``RedactingFilter``).

Invariants:
- A ``Redactor`` never holds or shows a value in its ``repr``; ``describe()`` gives
  only how many values are scrubbed.
- Values shorter than ``MIN_LENGTH`` are not scrubbed (replacing every "abc" in every
  log line would make the logs unreadable and protect nothing); ``too_short`` names
  where they came from, so the daemon can say so once.
- A value is also matched in its JSON-escaped form, since events are stored as JSON.
- The empty ``Redactor`` (no secrets configured) costs one attribute test per text.

A leaf: imports nothing of agentd.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_LENGTH = 6
MASK = "[redacted]"


@dataclass(frozen=True)
class SecretRef:
    """Where the config says a secret is: an environment variable or a file, and the
    config path that names it (``daemon.http.token_env``)."""

    where: str
    env: str | None = None
    file: Path | None = None


class SecretUnavailable(Exception):
    """A configured secret source yields nothing (unset, empty, unreadable). The message
    names the source, never a value."""


def read_secret(
    env_name: str | None,
    path: Path | None,
    what: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The one reader of a secret: the variable ``env_name`` (preferred) or the file
    ``path``, stripped. None when neither is configured; ``SecretUnavailable`` when a
    configured source yields nothing (each caller turns it into its own refusal: a bind
    refused, a delivery failed, a provider call not made)."""
    if env_name is None and path is None:
        return None
    env = os.environ if environ is None else environ
    problems: list[str] = []
    if env_name is not None:
        value = env.get(env_name, "").strip()
        if value:
            return value
        problems.append(f"environment variable {env_name} is unset or empty")
    if path is not None:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            problems.append(f"{what} file {path} cannot be read: {reason}")
        else:
            if value:
                return value
            problems.append(f"{what} file {path} is empty")
    raise SecretUnavailable(f"no {what}: " + "; ".join(problems))


class Redactor:
    """Replaces every known secret value in a text with ``[redacted]``."""

    __slots__ = ("_count", "_pattern", "too_short")

    def __init__(self, values: Iterable[str] = (), too_short: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        count = 0
        for value in values:
            if len(value) < MIN_LENGTH:
                continue
            count += 1
            forms.add(value)
            forms.add(json.dumps(value)[1:-1])  # as it appears inside a JSON string
        # Longest first: a secret that contains another is masked whole.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._count = count
        self.too_short: tuple[str, ...] = tuple(too_short)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __repr__(self) -> str:
        return f"Redactor({self.describe()})"

    def describe(self) -> str:
        return f"{self._count} secret value(s) scrubbed"

    def text(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self.text(text)

    def value(self, obj: Any) -> Any:
        """``obj`` with every string inside it scrubbed (dicts, lists, tuples; keys too)."""
        if self._pattern is None:
            return obj
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self.value(k): self.value(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.value(v) for v in obj]
        return obj

    def contains(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None


NOTHING = Redactor()


def read_secrets(refs: Iterable[SecretRef], environ: Mapping[str, str] | None = None) -> Redactor:
    """The values behind ``refs`` as they are now (stripped, as their readers strip
    them). A variable that is unset or a file that cannot be read holds nothing to
    scrub: whoever needs the secret reports that at the moment of use."""
    env = os.environ if environ is None else environ
    values: list[str] = []
    short: list[str] = []
    for ref in refs:
        value = ""
        if ref.env is not None:
            value = env.get(ref.env, "").strip()
        elif ref.file is not None:
            try:
                value = ref.file.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                value = ""
        if not value:
            continue
        if len(value) >= MIN_LENGTH:
            values.append(value)
        else:
            short.append(ref.where)
    return Redactor(values, short)


class RedactingFilter(logging.Filter):
    """Scrubs a record's message and traceback before any handler formats it. Added
    to the handlers (not the loggers) so that every logger's records pass it; the
    daemon swaps ``redactor`` on each config it applies."""

    def __init__(self, redactor: Redactor = NOTHING) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        if not redactor:
            return True
        message = record.getMessage()
        if redactor.contains(message):
            record.msg = redactor.text(message)
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.text(record.stack_info)
        return True


def install(redactor: Redactor, logger: logging.Logger | None = None) -> RedactingFilter:
    """Put one ``RedactingFilter`` on every handler of ``logger`` (the root by default),
    or update the one already there; returns it."""
    target = logger or logging.getLogger()
    found: RedactingFilter | None = None
    for handler in target.handlers:
        for f in handler.filters:
            if isinstance(f, RedactingFilter):
                found = f
    if found is None:
        found = RedactingFilter(redactor)
    found.redactor = redactor
    for handler in target.handlers:
        if found not in handler.filters:
            handler.addFilter(found)
    return found
