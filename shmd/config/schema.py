"""The configuration's schema, read from its dataclasses.

Each section is a frozen dataclass (:mod:`shmd.config.model`) whose fields,
in order, are the keys the file may spell.  A field's type says how its
value is read (``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
choices, a nested section, or a union of dataclasses tagged by ``type:``);
its metadata (:func:`spec`) holds the bounds, extra checks, or a reader of
its own for the few values no type describes.  :func:`parse` turns a
:class:`~shmd.config.nodes.Node` into the dataclass and :func:`to_dict` turns
it back into the file's plain data: no key, choice or type is written twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NoReturn, TypedDict, Unpack

from shmd.config.nodes import Builder, Node, describe

#: Checks a value once read; ``done`` holds the section's fields read before it.
Check = Callable[[Any, Mapping[str, Any]], None]
#: Reads a field no type describes: ``(section, field name, default) -> value``.
Reader = Callable[["Map", str, Any], Any]

_REQUIRED: Any = object()


class Spec(TypedDict, total=False):
    """A field's metadata (all optional)."""

    lo: float  # int and float: the bounds, inclusive
    hi: float
    lo_open: bool  # float: lo itself is refused
    checks: tuple[Check, ...]
    read: Reader
    dump: Callable[[Any], Any]
    in_file: bool  # False: derived or bookkeeping, not a key of the file
    sorted_keys: bool  # a tagged union's known keys, sorted in the unknown-key error


def spec(**meta: Unpack[Spec]) -> Spec:
    """Metadata for ``dataclasses.field(metadata=...)`` (a field the file must give)."""
    return meta


def setting(default: Any, **meta: Unpack[Spec]) -> Any:
    """A field with its default and metadata."""
    return dataclasses.field(default=default, metadata=meta)


class BadValue(Exception):
    """A check refused a value; reported at its key (or at ``at``'s when it was not given)."""

    def __init__(self, message: str, *, at: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.at = at


class Map:
    """One mapping of the file; a key it does not know is refused with the closest known one."""

    def __init__(
        self, b: Builder, node: Node | None, key: str, allowed: Iterable[str], *, context: str = ""
    ) -> None:
        self.b = b
        self.key = key
        self.line = node.line if node is not None else None
        items: dict[str, Node]
        if node is None or node.value is None:
            items = {}
        elif isinstance(node.value, dict):
            items = node.value
        else:
            b.fail(f"must be a mapping (got {describe(node)})", node.line, key)
        allowed = list(allowed)
        for name, child in items.items():
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else ""
                b.fail(
                    f"unknown key{context} (known keys: {', '.join(allowed)}){also}",
                    child.line,
                    child.key,
                )
        self.items = items

    def node(self, name: str) -> Node | None:
        return self.items.get(name)

    def bad(self, n: Node, message: str) -> NoReturn:
        self.b.fail(message, n.line, n.key)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        n = self.items.get(name)
        if n is None:
            return default
        if not isinstance(n.value, str) or n.value not in choices:
            self.bad(n, f"must be one of {' | '.join(choices)} (got {describe(n)})")
        return n.value


def _bool(m: Map, n: Node, meta: Spec) -> bool:
    if not isinstance(n.value, bool):
        m.bad(n, f"must be true or false (got {describe(n)})")
    return n.value


def _str(m: Map, n: Node, meta: Spec) -> str:
    v = n.value
    if not isinstance(v, str):
        m.bad(n, f"must be a string (got {describe(n)})")
    if not v or "\0" in v:
        m.bad(n, f"must be a non-empty string without NUL bytes (got {v!r})")
    return v


def _int(m: Map, n: Node, meta: Spec) -> int:
    v, lo, hi = n.value, int(meta["lo"]), int(meta["hi"])
    if isinstance(v, bool) or not isinstance(v, int):
        m.bad(n, f"must be an integer (got {describe(v)})")
    if not lo <= v <= hi:
        m.bad(n, f"must be between {lo} and {hi} (got {v})")
    return v


def _float(m: Map, n: Node, meta: Spec) -> float:
    v, lo, hi = n.value, meta["lo"], meta["hi"]
    if isinstance(v, bool) or not isinstance(v, int | float):
        m.bad(n, f"must be a number (got {describe(v)})")
    x = float(v)
    if not math.isfinite(x):
        m.bad(n, f"must be a finite number (got {v})")
    if meta.get("lo_open") and x <= lo:
        m.bad(n, f"must be greater than {lo:g} (got {v})")
    if x < lo or x > hi:
        m.bad(n, f"must be between {lo:g} and {hi:g} (got {v})")
    return x


#: How a given value of each plain type is checked.
_SCALARS: dict[Any, Callable[[Map, Node, Spec], Any]] = {
    bool: _bool,
    str: _str,
    int: _int,
    float: _float,
}


def tag(cls: type) -> str | None:
    """The ``type:`` name of a tagged dataclass (its ``type`` field is one Literal), else None."""
    tp = typing.get_type_hints(cls).get("type")
    if typing.get_origin(tp) is Literal and len(typing.get_args(tp)) == 1:
        return str(typing.get_args(tp)[0])
    return None


def file_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields the file spells, in order; a tagged dataclass's ``type`` first."""
    found = [f for f in dataclasses.fields(cls) if f.metadata.get("in_file", True)]
    if tag(cls) is not None:
        found.sort(key=lambda f: f.name != "type")
    return found


def members(tp: Any) -> tuple[type, ...]:
    """The dataclasses of a tagged union (``A | B``), or () if ``tp`` is not one."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return ()
    args = typing.get_args(tp)
    return args if all(isinstance(a, type) and tag(a) is not None for a in args) else ()


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def parse(b: Builder, cls: type, node: Node | None, key: str, *, context: str = "") -> Any:
    """Read one section (or one type of a tagged union) into its dataclass."""
    fields, hints = file_fields(cls), typing.get_type_hints(cls)
    m = Map(b, node, key, [f.name for f in fields], context=context)
    done: dict[str, Any] = {}
    for f in fields:
        if f.name != "type" or tag(cls) is None:
            done[f.name] = _read(m, f, hints[f.name], done)
    return cls(**done)


def _read(m: Map, f: dataclasses.Field[Any], tp: Any, done: Mapping[str, Any]) -> Any:
    n, default, meta = m.node(f.name), _default(f), typing.cast(Spec, f.metadata)
    if n is None and default is _REQUIRED:
        m.b.fail(f"{f.name} is required here", m.line, m.key or None)
    child = f"{m.key}.{f.name}" if m.key else f.name
    value: Any
    if "read" in meta:
        value = meta["read"](m, f.name, default)
    elif dataclasses.is_dataclass(tp):
        value = parse(m.b, typing.cast(type, tp), n, child)
    elif members(tp):
        kind = union_tag(m.b, f, tp, n, child)
        chosen = next(c for c in members(tp) if tag(c) == kind)
        value = parse(m.b, chosen, n, child, context=f" for {f.name} type {kind}")
    elif typing.get_origin(tp) is Literal:
        value = m.choice(f.name, default, typing.get_args(tp))
    else:
        value = default if n is None else _SCALARS[tp](m, n, meta)
    for check in meta.get("checks", ()):
        try:
            check(value, done)
        except BadValue as exc:
            at = n or (m.node(exc.at) if exc.at else None)
            if at is None:
                # Defaults that only fail together (a zenoh sink with no
                # endpoints): blamed on the section itself.
                m.b.fail(exc.message, m.line, m.key or None)
            m.bad(at, exc.message)
    return value


def union_tag(b: Builder, f: dataclasses.Field[Any], tp: Any, node: Node | None, key: str) -> str:
    """The ``type:`` a tagged union's mapping names (its default's when absent)."""
    keys: list[str] = []
    for c in members(tp):
        keys += [k.name for k in file_fields(c) if k.name not in keys]
    if f.metadata.get("sorted_keys"):
        keys.sort()
    kinds = tuple(str(tag(c)) for c in members(tp))
    return Map(b, node, key, keys).choice("type", _default(f).type, kinds)


def field_of(cls: type, name: str) -> tuple[dataclasses.Field[Any], Any]:
    """A field of ``cls`` and its resolved type."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f, typing.get_type_hints(cls)[name]


def to_dict(obj: Any) -> dict[str, Any]:
    """A section as plain data in the file's own schema (tuples as lists)."""
    out: dict[str, Any] = {}
    for f in file_fields(type(obj)):
        dump = f.metadata.get("dump", plain)
        out[f.name] = dump(getattr(obj, f.name))
    return out


def plain(value: Any) -> Any:
    """A field's value as YAML/JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value
