"""``yaml.safe_load`` for config files, with PyYAML's Python constructor taken off
the common path.

libyaml (``CSafeLoader``) parses and composes the node tree in C, but turning nodes
into dicts, lists and strings is PyYAML's generic Python constructor: generators per
container, a merge-key pass per mapping, a method lookup per node. On a 10,000-task
config that was 0.33 s of a 0.56 s load, on the path of every cold start and reload.

``load`` walks the composed tree itself for the tags a config is made of (maps,
sequences, strings) and hands every other node (int, float, bool, null, timestamp,
binary, set, ...) to PyYAML's own ``SafeConstructor``, so each value is what
``safe_load`` gives. Whatever it does not handle exactly the same way -- merge keys
(``<<``), an alias that refers to its own ancestor, an unhashable key -- sends the
whole document through PyYAML's constructor instead, errors included. One difference,
on purpose: where PyYAML fails with a plain Python error on a bad explicitly tagged
value, ``load`` raises a ``YAMLError`` that says where.
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


class _Slow(Exception):
    """This document needs PyYAML's own constructor."""


def load(text: str) -> Any:
    """As ``yaml.load(text, Loader=CSafeLoader)``: same values, same ``YAMLError``s."""
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            return _construct(loader, node, {}, set())
        except _Slow:
            pass
        try:
            return loader.construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # see _value
            raise ConstructorError(None, None, f"cannot read a value: {exc}", None) from None
    finally:
        loader.dispose()


def _construct(loader: Any, node: Any, done: dict[int, Any], open_: set[int]) -> Any:
    cls, tag = node.__class__, node.tag
    if cls is _SCALAR:  # PyYAML's own cache keeps an aliased scalar the same object
        return node.value if tag == _STR else _value(loader, node)
    key = id(node)
    if key in done:  # an alias: the same object, as PyYAML gives
        return done[key]
    if key in open_:  # a container inside itself
        raise _Slow
    value: Any
    if tag == _MAP and cls is _MAPPING:
        open_.add(key)
        value = {}
        for k_node, v_node in node.value:
            if k_node.tag == _MERGE:
                raise _Slow
            k = _construct(loader, k_node, done, open_)
            try:
                value[k] = _construct(loader, v_node, done, open_)
            except TypeError:  # unhashable key: PyYAML's ConstructorError says where
                raise _Slow from None
    elif tag == _SEQ and cls is _SEQUENCE:
        open_.add(key)
        value = [_construct(loader, item, done, open_) for item in node.value]
    else:
        return _value(loader, node)
    open_.discard(key)
    done[key] = value
    return value


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
