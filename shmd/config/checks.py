"""The configuration's own limits, and the checks and readers no field type implies.

The bus's and the control protocol's limits are theirs (imported from
:mod:`shmd.bus.layout` and :mod:`shmd.control.fields`); those here exist only
in the file's schema.  A check refuses a value with
:class:`~shmd.config.schema.BadValue`; a reader reads a value of a shape of
its own (a permission mode, a list of ids or topics, an argv).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

from shmd.bus.layout import MAX_SEGMENT, TOPIC_MAX
from shmd.config.nodes import Node, describe
from shmd.config.schema import BadValue, Map
from shmd.control.fields import TOPIC_NAME_PATTERN, TopicMap

IdEntry: TypeAlias = str | int

# POSIX shm names: NAME_MAX (255) bytes including the leading slash.
MAX_SEGMENT_NAME = 255
# sizeof(sockaddr_un.sun_path) is 108 and the path needs its terminating NUL.
SUN_PATH_MAX = 108
MIN_MESSAGE = 1024
MAX_MESSAGE = 64 << 20
# No timeout or interval beyond a day: a larger number is almost certainly
# milliseconds typed as seconds, and it keeps poll()'s millisecond int small.
MAX_SECONDS = 86400.0
MAX_RATE = 1_000_000.0
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel
CALLABLE_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
)
_OCTAL_RE = re.compile(r"0o?([0-7]{1,4})")
_TOPIC_NAME_RE = re.compile(TOPIC_NAME_PATTERN)


def segment_name(name: str, done: Mapping[str, Any]) -> None:
    if not name.startswith("/") or "/" in name[1:] or len(name) < 2:
        raise BadValue(f"must be one slash followed by a name without slashes (got {name!r})")
    if len(name.encode()) > MAX_SEGMENT_NAME:
        raise BadValue(f"must be at most {MAX_SEGMENT_NAME} bytes long (got {len(name.encode())})")


def power_of_two(value: int, done: Mapping[str, Any]) -> None:
    if value & (value - 1):
        raise BadValue(f"must be a power of two (got {value})")


def multiple_of_8(value: int, done: Mapping[str, Any]) -> None:
    if value % 8:
        raise BadValue(f"must be a multiple of 8 (got {value})")


def fits_segment(slot_size: int, done: Mapping[str, Any]) -> None:
    """capacity * slot_size within the bus's limit; blamed on capacity if slot_size is default."""
    capacity = done["capacity"]
    if capacity * slot_size > MAX_SEGMENT:
        raise BadValue(
            f"capacity * slot_size must be at most {MAX_SEGMENT >> 30} GiB "
            f"(got {capacity} * {slot_size} = {capacity * slot_size} bytes)",
            at="capacity",
        )


def absolute_path(value: str, done: Mapping[str, Any]) -> None:
    if not value.startswith("/"):
        raise BadValue(f"must be an absolute path (got {value!r})")


def socket_path(value: str, done: Mapping[str, Any]) -> None:
    if len(value.encode()) >= SUN_PATH_MAX:
        raise BadValue(
            f"must be shorter than {SUN_PATH_MAX} bytes, the size of "
            f"sockaddr_un.sun_path (got {len(value.encode())})"
        )


def callable_spec(value: str, done: Mapping[str, Any]) -> None:
    if not CALLABLE_RE.fullmatch(value):
        raise BadValue(f"must look like 'package.module:function' (got {value!r})")


def read_mode(m: Map, name: str, default: int) -> int:
    """A permission mode: 0o660, 0660, "0660" or a plain integer."""
    n = m.node(name)
    if n is None:
        return default
    v = n.value
    octal = _OCTAL_RE.fullmatch(v.strip()) if isinstance(v, str) else None
    if octal is not None:
        mode = int(octal.group(1), 8)
    elif isinstance(v, int) and not isinstance(v, bool):
        mode = v
    else:
        m.bad(n, f'must be an octal permission mode like 0o660 or "0660" (got {describe(v)})')
    if not 0 <= mode <= 0o777:
        # YAML reads 660 (no leading zero) as decimal 660 = 0o1224.
        m.bad(
            n,
            f"must be a permission mode between 0 and 0o777; write it in octal "
            f'like 0o660 or "0660" (got {v!r} = {oct(mode) if mode >= 0 else mode})',
        )
    return mode


def dump_mode(mode: int) -> str:
    return f"0o{mode:o}"


def read_ids(m: Map, name: str, default: tuple[IdEntry, ...]) -> tuple[IdEntry, ...]:
    """User or group names and numeric ids, duplicates dropped; null means none."""
    n = m.node(name)
    if n is None or n.value is None:
        return default if n is None else ()
    if not isinstance(n.value, list):
        m.bad(n, f"must be a list of names or numeric ids (got {describe(n)})")
    out: list[IdEntry] = []
    for item in n.value:
        v = item.value
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, str | int):
            m.bad(item, f"must be a name or a numeric id (got {describe(v)})")
        if isinstance(v, int) and not 0 <= v <= MAX_ID:
            m.bad(item, f"must be between 0 and {MAX_ID} (got {v})")
        if isinstance(v, str) and (not v or any(c in v for c in ":\n\0 ")):
            m.bad(item, f"is not a valid user or group name (got {v!r})")
        if v not in out:
            out.append(v)
    return tuple(out)


def read_topic_map(m: Map, name: str, default: TopicMap) -> TopicMap:
    """``segment.topics``: a mapping of topic names to distinct ids 0..63; null means none."""
    n = m.node(name)
    if n is None or n.value is None:
        m.b.topics = default
        return default
    if not isinstance(n.value, dict):
        m.bad(n, f"must be a mapping of topic names to ids 0..{TOPIC_MAX} (got {describe(n)})")
    owner: dict[int, str] = {}
    for topic, item in n.value.items():
        if not _TOPIC_NAME_RE.fullmatch(topic):
            m.bad(
                item,
                f"topic name {topic!r} must be a lower-case letter, then up to 31 "
                "lower-case letters, digits, '_', '.' or '-'",
            )
        v = item.value
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= TOPIC_MAX:
            m.bad(item, f"must be a topic id 0..{TOPIC_MAX} (got {describe(v)})")
        if v in owner:
            m.bad(item, f"topic id {v} is given to {owner[v]!r} already")
        owner[v] = topic
    found = TopicMap((t, i) for i, t in owner.items())
    m.b.topics = found
    return found


def dump_topic_map(topics: TopicMap) -> dict[str, int]:
    return dict(topics)


def _topic_of(m: Map, item: Node, out_of_range: str) -> int:
    """A topic given by id or by a name of segment.topics."""
    v = item.value
    if isinstance(v, str) and not v.isdigit():
        known = m.b.topics
        if v not in known:
            has = ", ".join(sorted(known)) if known else "none (segment.topics is empty)"
            m.bad(item, f"unknown topic {v!r} (segment.topics names: {has})")
        return known[v]
    if isinstance(v, bool) or not isinstance(v, int):
        m.bad(
            item,
            f"must be a topic id 0..{TOPIC_MAX} or a name of segment.topics (got {describe(v)})",
        )
    if not 0 <= v <= TOPIC_MAX:
        m.bad(item, out_of_range.format(v))
    return v


def read_topic(m: Map, name: str, default: int) -> int:
    """One topic: an id 0..63 or a name of segment.topics, read as its id."""
    n = m.node(name)
    if n is None:
        return default
    return _topic_of(m, n, f"must be between 0 and {TOPIC_MAX} (got {{}})")


def read_topics(m: Map, name: str, default: object) -> Literal["all"] | tuple[int, ...]:
    """``all`` or a non-empty list of distinct topics (ids or names), as sorted ids."""
    n = m.node(name)
    if n is None or n.value == "all":
        return "all"
    if not isinstance(n.value, list) or not n.value:
        m.bad(
            n,
            f'must be "all" or a non-empty list of topic ids 0..{TOPIC_MAX} or names '
            f"of segment.topics (got {describe(n)})",
        )
    seen: set[int] = set()
    for item in n.value:
        v = _topic_of(m, item, f"must be a topic id 0..{TOPIC_MAX} (got integer {{}})")
        if v in seen:
            also = f" ({item.value!r} is topic {v})" if isinstance(item.value, str) else ""
            m.bad(item, f"topic {v} is listed twice{also}")
        seen.add(v)
    return tuple(sorted(seen))


def read_argv(m: Map, name: str, default: object) -> tuple[str, ...]:
    """A command line: a non-empty list of strings, the program first (required)."""
    n = m.node(name)
    assert n is not None  # required: parse() reported its absence
    if not isinstance(n.value, list) or not n.value:
        m.bad(n, f"must be a non-empty list of strings, the argv (got {describe(n)})")
    argv: list[str] = []
    for item in n.value:
        if not isinstance(item.value, str) or "\0" in item.value:
            m.bad(item, f"must be a string (got {describe(item)})")
        argv.append(item.value)
    if not argv[0]:
        m.bad(n.value[0], "the program name must not be empty")
    return tuple(argv)


# -- the zenoh sink and source (docs/BRIDGE.md) ------------------------------------------

#: A chunk of a Zenoh key: no '/', and none of the characters Zenoh reserves
#: for wildcards and verbatim chunks ('*', '$', '?', '#') or whitespace.
_KEY_CHUNK_RE = re.compile(r"[^/*$?#\s]+")
_ENDPOINT_RE = re.compile(r"(tcp|udp|tls|quic|ws|unixsock-stream)/(\S+)")
_HOST_PORT_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})")
MAX_KEY = 1024
MAX_ENDPOINTS = 64


def key_prefix(value: str, done: Mapping[str, Any]) -> None:
    """A Zenoh key of plain chunks (the sink's prefix; "" means the segment's name)."""
    if value == "":
        return
    chunks = value.split("/")
    if len(value) > MAX_KEY or not all(_KEY_CHUNK_RE.fullmatch(c) for c in chunks):
        raise BadValue(
            "must be a Zenoh key of non-empty chunks separated by '/', without "
            f"wildcards ('*', '$', '?', '#'), spaces or a leading or trailing '/' (got {value!r})"
        )


def key_expression(value: str, done: Mapping[str, Any]) -> None:
    """A Zenoh key expression: plain chunks, ``*`` or ``**`` ("" means the segment's name/*)."""
    if value == "":
        return
    chunks = value.split("/")
    if len(value) > MAX_KEY or not all(
        c in ("*", "**") or _KEY_CHUNK_RE.fullmatch(c) for c in chunks
    ):
        raise BadValue(
            "must be a Zenoh key expression of chunks separated by '/', each plain, "
            f"'*' or '**', without a leading or trailing '/' (got {value!r})"
        )
    if chunks[-1] == "**" and len(chunks) == 1:
        raise BadValue(f"must not be '**' alone: say whose keys to take (got {value!r})")


def _endpoint(text: str, *, listen: bool) -> str | None:
    """Why ``text`` is not a Zenoh endpoint, or None."""
    m = _ENDPOINT_RE.fullmatch(text)
    if m is None:
        return (
            "must be a Zenoh endpoint like tcp/10.0.0.1:7447 (protocols: tcp, udp, "
            f"tls, quic, ws, unixsock-stream; got {text!r})"
        )
    proto, address = m.groups()
    if proto == "unixsock-stream":
        return None if address.startswith("/") else f"must name an absolute path (got {text!r})"
    hp = _HOST_PORT_RE.fullmatch(address)
    lowest = 0 if listen else 1
    if hp is None or not lowest <= int(hp.group(2)) <= 65535:
        return f"must be {proto}/HOST:PORT with a port {lowest}..65535 (got {text!r})"
    return None


def _read_endpoints(
    m: Map, name: str, default: tuple[str, ...], *, listen: bool
) -> tuple[str, ...]:
    n = m.node(name)
    if n is None or n.value is None:
        return default if n is None else ()
    if not isinstance(n.value, list) or len(n.value) > MAX_ENDPOINTS:
        m.bad(n, f"must be a list of at most {MAX_ENDPOINTS} Zenoh endpoints (got {describe(n)})")
    out: list[str] = []
    for item in n.value:
        if not isinstance(item.value, str):
            m.bad(item, f"must be a Zenoh endpoint string (got {describe(item)})")
        why = _endpoint(item.value, listen=listen)
        if why is not None:
            m.bad(item, why)
        if item.value in out:
            m.bad(item, f"endpoint {item.value!r} is listed twice")
        out.append(item.value)
    return tuple(out)


def read_connect(m: Map, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """``connect``: the Zenoh endpoints to dial (port 1..65535)."""
    return _read_endpoints(m, name, default, listen=False)


def read_listen(m: Map, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """``listen``: the Zenoh endpoints to listen on (port 0 picks one)."""
    return _read_endpoints(m, name, default, listen=True)


def zenoh_reachable(scouting: bool, done: Mapping[str, Any]) -> None:
    """A Zenoh session with scouting off must be told where its peers are."""
    if scouting:
        return
    if done["mode"] == "client" and not done["connect"]:
        raise BadValue(
            "client mode needs connect endpoints (a router to dial) since scouting is off",
            at="mode",
        )
    if not done["connect"] and not done["listen"]:
        raise BadValue(
            "needs connect or listen endpoints since scouting is off (or set scouting: true)",
            at="connect",
        )
