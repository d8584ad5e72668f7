"""The configuration's schema, read from its dataclasses.

Each section is a frozen dataclass (:mod:`shmd.config.model`); its fields,
in order, are the keys the file may spell.  A field's type says how its
value is read (``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
choices, a nested section, or a union of ``type:``-tagged dataclasses), and
its metadata (:func:`spec`) holds the bounds, the extra checks, or a reader
of its own for the few values no type describes (a permission mode, a list
of ids).  :func:`parse` turns a :class:`~shmd.config.yaml.Node` into the
dataclass, :func:`to_dict` turns it back into the file's plain data: no
list of keys, choices or types is written down twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NoReturn

from shmd.config.yaml import Builder, Node, describe

#: Checks a value once read; ``done`` holds the section's fields read before it.
Check = Callable[[Any, Mapping[str, Any]], None]
#: Reads a field no type describes: ``(section, field name, default) -> value``.
Reader = Callable[["Map", str, Any], Any]

_REQUIRED: Any = object()


class BadValue(Exception):
    """A check refused a value; reported at its key (or at ``at``'s when it was not given)."""

    def __init__(self, message: str, *, at: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.at = at


def spec(
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    checks: tuple[Check, ...] = (),
    read: Reader | None = None,
    dump: Callable[[Any], Any] | None = None,
    in_file: bool = True,
    sorted_keys: bool = False,
) -> dict[str, Any]:
    """A field's metadata: bounds, checks, its own reader or dumper, or not in the file at all.

    ``sorted_keys`` (a tagged union only) lists the known keys of all its
    types sorted in the error for an unknown key, instead of in field order.
    """
    return {
        "lo": lo,
        "hi": hi,
        "lo_open": lo_open,
        "checks": checks,
        "read": read,
        "dump": dump,
        "in_file": in_file,
        "sorted_keys": sorted_keys,
    }


class Map:
    """One mapping of the file, read key by key with type checks."""

    def __init__(
        self,
        b: Builder,
        node: Node | None,
        key: str,
        allowed: Iterable[str],
        *,
        context: str = "",
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

    def int_(self, name: str, default: int, lo: int, hi: int) -> int:
        n = self.items.get(name)
        if n is None:
            return default
        v = n.value
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(n, f"must be an integer (got {describe(v)})")
        if not lo <= v <= hi:
            self.bad(n, f"must be between {lo} and {hi} (got {v})")
        return v

    def float_(self, name: str, default: float, *, lo: float, hi: float, lo_open: bool) -> float:
        n = self.items.get(name)
        if n is None:
            return default
        v = n.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.bad(n, f"must be a number (got {describe(v)})")
        f = float(v)
        if not math.isfinite(f):
            self.bad(n, f"must be a finite number (got {v})")
        if lo_open and f <= lo:
            self.bad(n, f"must be greater than {lo:g} (got {v})")
        if f < lo or f > hi:
            self.bad(n, f"must be between {lo:g} and {hi:g} (got {v})")
        return f

    def bool_(self, name: str, default: bool) -> bool:
        n = self.items.get(name)
        if n is None:
            return default
        if not isinstance(n.value, bool):
            self.bad(n, f"must be true or false (got {describe(n)})")
        return n.value

    def str_(self, name: str, default: str) -> str:
        n = self.items.get(name)
        if n is None:
            return default
        if not isinstance(n.value, str):
            self.bad(n, f"must be a string (got {describe(n)})")
        if not n.value or "\0" in n.value:
            self.bad(n, f"must be a non-empty string without NUL bytes (got {n.value!r})")
        return n.value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        n = self.items.get(name)
        if n is None:
            return default
        if not isinstance(n.value, str) or n.value not in choices:
            self.bad(n, f"must be one of {' | '.join(choices)} (got {describe(n)})")
        return n.value


_HINTS: dict[type, dict[str, Any]] = {}
_FIELDS: dict[type, tuple[dataclasses.Field[Any], ...]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def tag(cls: type) -> str | None:
    """The ``type:`` name of a tagged dataclass (its ``type`` field is one Literal), else None."""
    tp = _hints(cls).get("type")
    if typing.get_origin(tp) is Literal and len(typing.get_args(tp)) == 1:
        name: str = typing.get_args(tp)[0]
        return name
    return None


def file_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    """The fields the file spells, in order; a tagged dataclass's ``type`` first."""
    if cls not in _FIELDS:
        found = [f for f in dataclasses.fields(cls) if f.metadata.get("in_file", True)]
        if tag(cls) is not None:
            found.sort(key=lambda f: f.name != "type")
        _FIELDS[cls] = tuple(found)
    return _FIELDS[cls]


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


def parse(b: Builder, cls: type[Any], node: Node | None, key: str, *, context: str = "") -> Any:
    """Read one section (or one type of a tagged union) into its dataclass."""
    m = Map(b, node, key, [f.name for f in file_fields(cls)], context=context)
    done: dict[str, Any] = {}
    tagged = tag(cls) is not None
    for f in file_fields(cls):
        if not (tagged and f.name == "type"):
            done[f.name] = _read(m, f, _hints(cls)[f.name], done)
    return cls(**done)


def _read(m: Map, f: dataclasses.Field[Any], tp: Any, done: Mapping[str, Any]) -> Any:
    n, default, meta = m.node(f.name), _default(f), f.metadata
    if n is None and default is _REQUIRED:
        m.b.fail(f"{f.name} is required here", m.line, m.key or None)
    child = f"{m.key}.{f.name}" if m.key else f.name
    value: Any
    if meta.get("read") is not None:
        value = meta["read"](m, f.name, default)
    elif dataclasses.is_dataclass(tp):
        value = parse(m.b, tp, n, child)  # type: ignore[arg-type]
    elif members(tp):
        kind = union_tag(m.b, f, tp, n, child)
        chosen = next(c for c in members(tp) if tag(c) == kind)
        value = parse(m.b, chosen, n, child, context=f" for {f.name} type {kind}")
    elif typing.get_origin(tp) is Literal:
        value = m.choice(f.name, default, typing.get_args(tp))
    elif tp is bool:
        value = m.bool_(f.name, default)
    elif tp is int:
        value = m.int_(f.name, default, int(meta["lo"]), int(meta["hi"]))
    elif tp is float:
        value = m.float_(f.name, default, lo=meta["lo"], hi=meta["hi"], lo_open=meta["lo_open"])
    elif tp is str:
        value = m.str_(f.name, default)
    else:
        raise TypeError(f"no reader for the field {f.name} of type {tp}")
    for check in meta.get("checks", ()):
        try:
            check(value, done)
        except BadValue as exc:
            at = n or (m.node(exc.at) if exc.at else None)
            assert at is not None  # every default passes every check
            m.bad(at, exc.message)
    return value


def union_tag(b: Builder, f: dataclasses.Field[Any], tp: Any, node: Node | None, key: str) -> str:
    """The ``type:`` a tagged union's mapping names (its default type's when absent)."""
    keys: list[str] = []
    for c in members(tp):
        keys += [k.name for k in file_fields(c) if k.name not in keys]
    if f.metadata.get("sorted_keys"):
        keys.sort()
    kinds = tuple(str(tag(c)) for c in members(tp))
    kind: str = Map(b, node, key, keys).choice("type", _default(f).type, kinds)
    return kind


def field_of(cls: type, name: str) -> tuple[dataclasses.Field[Any], Any]:
    """A field of ``cls`` and its resolved type."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f, _hints(cls)[name]


def to_dict(obj: Any) -> dict[str, Any]:
    """A section as plain data in the file's own schema (tuples as lists)."""
    out: dict[str, Any] = {}
    for f in file_fields(type(obj)):
        value = getattr(obj, f.name)
        dump = f.metadata.get("dump")
        out[f.name] = dump(value) if dump is not None else plain(value)
    return out


def plain(value: Any) -> Any:
    """A field's value as YAML/JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value
