"""``yaml.safe_load`` for config files, with PyYAML's Python constructor taken off
the common path, and the shape of the document bounded.

libyaml (``CSafeLoader``) parses and composes the node tree in C, but turning nodes
into dicts, lists and strings is PyYAML's generic Python constructor: generators per
container, a merge-key pass per mapping, a method lookup per node. On a 10,000-task
config that was 0.33 s of a 0.56 s load, on the path of every cold start and reload.

``load`` walks the composed tree itself for the tags a config is made of (maps,
sequences, strings) and hands every other scalar (int, float, bool, null, timestamp,
binary, ...) to PyYAML's own ``SafeConstructor``, so each value is what ``safe_load``
gives. Whatever it does not handle exactly the same way -- merge keys (``<<``), an
unhashable key, a tagged collection (``!!set``, ``!!omap``) -- sends the whole document
through PyYAML's constructor instead, errors included. One difference, on purpose:
where PyYAML fails with a plain Python error on a bad explicitly tagged value, ``load``
raises a ``YAMLError`` that says where.

Limits (``Rejected``, a ``YAMLError`` with the dotted path and line of the offence):
what ``safe_load`` would accept but a config must not be.

* Size is counted with **aliases expanded**: an alias counts as a copy of the whole
  node it refers to, because everything after parsing (interpolation, validation,
  fingerprints) copies it. At most ``MAX_NODES`` nodes and ``MAX_TEXT`` characters of
  scalar text, and at most ``MAX_DEPTH`` levels of nested collections. A "billion laughs"
  document of a few hundred bytes is rejected after visiting its few unique nodes.
* An alias to its own ancestor (a collection inside itself) is rejected.
* A key twice in one mapping is rejected, with both lines; ``safe_load`` keeps the last.

The checks cost next to nothing on the fast path: it counts each collection's children
while it builds it, and measures an aliased collection (``_measure``, memoised per node)
only where an alias is met. Before PyYAML's own constructor, ``_measure`` walks the
whole graph once, every unique node once, so the constructor never sees a document that
breaks a limit.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_SCALAR, _MAPPING, _SEQUENCE = yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode

MAX_DEPTH = 64
"""Levels of nested collections; the top-level mapping is level 1."""
MAX_NODES = 2_000_000
"""Nodes (collections, keys, values) with aliases expanded. A 10,000-task config has
100,000 to 500,000."""
MAX_TEXT = 256 << 20
"""Characters of scalar text with aliases expanded."""

LIMITS = (  # in the message of each size limit: which one it broke is not all there is to know
    f"limits: {MAX_DEPTH} levels of nesting, {MAX_NODES:,} nodes and "
    f"{MAX_TEXT >> 20} MiB of text, an alias counted as a copy of what it refers to"
)


class Rejected(yaml.YAMLError):
    """A document ``safe_load`` would read that a config must not be: too deep, too
    large once aliases are expanded, a collection inside itself, a duplicate key.
    ``path`` is dotted (``tasks.x.params[3]``); ``message`` says where in the file."""

    def __init__(self, message: str, node: Any = None, limits: bool = False) -> None:
        mark = getattr(node, "start_mark", None)
        if mark is not None:
            message = f"{message} at line {mark.line + 1}, column {mark.column + 1}"
        if limits:
            message = f"{message} ({LIMITS})"
        self.message = message
        self._parts: list[str | int] = []
        super().__init__(message)

    def inside(self, part: str | int) -> None:
        """Called on the way out, innermost first: ``part`` is a key or an index."""
        self._parts.append(part)

    @property
    def path(self) -> str:
        out: list[str] = []
        for part in reversed(self._parts):
            out.append(f"[{part}]" if isinstance(part, int) else ("." if out else "") + part)
        return "".join(out)

    def __str__(self) -> str:
        return f"{self.path or '<top>'}: {self.message}"


class _Slow(Exception):
    """This document needs PyYAML's own constructor."""


def load(text: str) -> Any:
    """As ``yaml.load(text, Loader=CSafeLoader)``: same values, same ``YAMLError``s;
    and ``Rejected`` for a document past the limits above."""
    loader = _LOADER(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the pure-Python composer, without libyaml's own limit
            raise Rejected(f"nested more than {MAX_DEPTH} levels deep", limits=True) from None
        if node is None:
            return None
        if node.__class__ is _SCALAR:
            return node.value if node.tag == _STR else _value(loader, node)
        try:
            return _construct(loader, node, {}, set(), [1, 0, {}], 1)
        except _Slow:
            pass
        _measure(loader, node, 1, {}, set())
        try:
            return loader.construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # see _value
            raise ConstructorError(None, None, f"cannot read a value: {exc}", None) from None
    finally:
        loader.dispose()


def _construct(
    loader: Any, node: Any, done: dict[int, Any], open_: set[int], tot: list[Any], depth: int
) -> Any:
    """The value of a collection ``node`` at nesting level ``depth``.

    ``done`` maps a built collection (by node id) to its value, so an alias gives the
    same object, as PyYAML does; ``open_`` holds the collections being built (an alias
    to one of them is a cycle). ``tot`` is [nodes, characters, _measure's memo]: this
    collection's children are added to it here, its own node by its parent."""
    key = id(node)
    if key in done:  # an alias
        nodes, chars, _ = _measure(loader, node, depth, tot[2], open_)
        tot[0] += nodes - 1
        tot[1] += chars
        _check_size(tot, node)
        return done[key]
    if key in open_:
        raise Rejected("an alias refers to its own ancestor, the collection", node)
    if depth > MAX_DEPTH:
        raise Rejected(f"nested more than {MAX_DEPTH} levels deep", node, limits=True)
    cls, tag, items = node.__class__, node.tag, node.value
    chars = 0
    value: Any
    if tag == _MAP and cls is _MAPPING:
        open_.add(key)
        value = {}
        for k_node, v_node in items:
            if k_node.__class__ is _SCALAR:
                k_tag = k_node.tag
                if k_tag == _STR:
                    k = k_node.value
                elif k_tag == _MERGE:
                    raise _Slow
                else:
                    k = _value(loader, k_node)
                chars += len(k_node.value)
            else:  # a collection as a key: unhashable, PyYAML's error says where
                raise _Slow
            if v_node.__class__ is _SCALAR:
                chars += len(v_node.value)
                v = v_node.value if v_node.tag == _STR else _value(loader, v_node)
            else:
                try:
                    v = _construct(loader, v_node, done, open_, tot, depth + 1)
                except Rejected as exc:
                    exc.inside(str(k))
                    raise
            try:
                value[k] = v
            except TypeError:  # unhashable key (a tagged scalar): PyYAML's error says where
                raise _Slow from None
        tot[0] += 2 * len(items)
        if len(value) < len(items):
            _duplicate(loader, node)
    elif tag == _SEQ and cls is _SEQUENCE:
        open_.add(key)
        value = []
        append = value.append
        for item in items:
            if item.__class__ is _SCALAR:
                chars += len(item.value)
                append(item.value if item.tag == _STR else _value(loader, item))
            else:
                try:
                    append(_construct(loader, item, done, open_, tot, depth + 1))
                except Rejected as exc:
                    exc.inside(len(value))
                    raise
        tot[0] += len(items)
    else:  # !!set, !!omap, !!pairs, or a tag no safe constructor knows
        raise _Slow
    tot[1] += chars
    _check_size(tot, node)
    open_.discard(key)
    done[key] = value
    return value


def _measure(
    loader: Any, node: Any, depth: int, memo: dict[int, tuple[int, int, int]], open_: set[int]
) -> tuple[int, int, int]:
    """(nodes, characters, height) of ``node`` with aliases expanded, checking on the way
    what ``_construct`` checks. Memoised by node, so a graph costs its unique nodes."""
    cls = node.__class__
    if cls is _SCALAR:
        return 1, len(node.value), 0
    key = id(node)
    known = memo.get(key)
    if known is not None:
        if depth + known[2] - 1 > MAX_DEPTH:
            raise Rejected(f"nested more than {MAX_DEPTH} levels deep", node, limits=True)
        return known
    if key in open_:
        raise Rejected("an alias refers to its own ancestor, the collection", node)
    if depth > MAX_DEPTH:
        raise Rejected(f"nested more than {MAX_DEPTH} levels deep", node, limits=True)
    open_.add(key)
    nodes, chars, height = 1, 0, 0
    children: list[tuple[str | int, Any]]
    if cls is _MAPPING:
        children = []
        for k_node, v_node in node.value:
            children.append(("?", k_node))
            children.append((str(k_node.value) if k_node.__class__ is _SCALAR else "?", v_node))
    else:
        children = list(enumerate(node.value))
    for part, child in children:
        try:
            n, c, h = _measure(loader, child, depth + 1, memo, open_)
        except Rejected as exc:
            exc.inside(part)
            raise
        nodes += n
        chars += c
        height = max(height, h)
        if nodes > MAX_NODES or chars > MAX_TEXT:
            large = _too_large(nodes, chars, child)
            large.inside(part)
            raise large
    if cls is _MAPPING:
        _duplicate(loader, node, measuring=True)
    open_.discard(key)
    memo[key] = result = (nodes, chars, height + 1)
    return result


def _check_size(tot: list[Any], node: Any) -> None:
    if tot[0] > MAX_NODES or tot[1] > MAX_TEXT:
        raise _too_large(tot[0], tot[1], node)


def _too_large(nodes: int, chars: int, node: Any) -> Rejected:
    what = (
        f"more than {MAX_NODES:,} nodes"
        if nodes > MAX_NODES
        else f"more than {MAX_TEXT >> 20} MiB of text"
    )
    return Rejected(f"config too large: {what} with aliases expanded", node, limits=True)


def _duplicate(loader: Any, node: Any, measuring: bool = False) -> None:
    """Raise for the first key that occurs twice in mapping ``node``, naming both lines.
    Without ``measuring`` the caller knows there is one (its dict came out shorter)."""
    first: dict[Any, Any] = {}
    for k_node, _ in node.value:
        if k_node.__class__ is not _SCALAR:
            continue  # a collection as a key: PyYAML's constructor rejects it
        if k_node.tag == _STR:
            k: Any = k_node.value
        elif k_node.tag == _MERGE:
            k = ("<<",)
        else:
            try:
                k = _value(loader, k_node)
                hash(k)
            except (yaml.YAMLError, TypeError):
                continue  # PyYAML's constructor says what is wrong with it
        seen = first.setdefault(k, k_node)
        if seen is not k_node:
            line, was = k_node.start_mark.line + 1, seen.start_mark.line + 1
            written = "" if seen.value == k_node.value else f", written {seen.value!r}"
            exc = Rejected(
                f"duplicate key {k_node.value!r} at line {line} (first at line {was}{written})"
            )
            exc.inside(str(k_node.value))
            raise exc
    if not measuring:  # the dict lost a key, yet no two keys compare equal here
        raise Rejected("a key occurs twice in this mapping", node)


def _value(loader: Any, node: Any) -> Any:
    """PyYAML's value for a node. Where its constructor fails with a plain Python error
    (``!!timestamp nope`` is an AttributeError, ``!!float x`` a ValueError), the error
    becomes a YAMLError with the node's line and column, so that a config says where."""
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise
    except Exception as exc:
        raise ConstructorError(
            None, None, f"cannot read {node.tag} value {node.value!r}: {exc}", node.start_mark
        ) from None
