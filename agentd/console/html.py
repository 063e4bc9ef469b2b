"""Server-side HTML with escaping by default: the console's only way to make markup.

``Markup`` is text that is already HTML. ``render(template, **values)`` fills a
``str.format`` template (a literal in this package, never data) and escapes every value
that is not ``Markup``, so a task description, an error, a tool's arguments or an
output tail can never open a tag or close an attribute. Nothing else makes ``Markup``
from data: there is no "mark this safe" for a value that came from the state DB.
"""

from __future__ import annotations

import html
import string
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final


class Markup(str):
    """HTML that is safe to emit as it is: made by ``render``, ``escape`` or ``join``."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as text in HTML (element content or a quoted attribute); None is empty."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


class _Escaping(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, Markup) and not format_spec:
            return value
        return escape(format(value, format_spec))


_FORMATTER: Final = _Escaping()


def render(template: str, /, **values: Any) -> Markup:
    """``template`` (a trusted literal) with ``values`` escaped unless ``Markup``."""
    return Markup(_FORMATTER.vformat(template, (), values))


def join(parts: Iterable[Markup], sep: str = "") -> Markup:
    """Markup pieces joined; a piece that is plain text is escaped first."""
    return Markup(escape(sep).join(escape(p) for p in parts))


def seg(value: object) -> str:
    """One URL path segment or query value (a run id, a task name), percent-encoded; it
    still goes through ``render``'s escaping when put in an attribute."""
    return urllib.parse.quote(str(value), safe="")


def query(**params: object) -> str:
    """A query string of the params that are set (None and "" are left out)."""
    kept = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    return ("?" + urllib.parse.urlencode(kept)) if kept else ""
