"""The fields of control message bodies: limits, strict checks, and little-endian bytes.

What :mod:`shmd.control.protocol`'s messages are built from.  Every body
starts with the ``type u16, version u16`` prefix (:data:`PREFIX`), then the
type's fields in a fixed order; strings are ``u16 length + UTF-8``, blobs
``u32 length + bytes``.  A check that fails raises :class:`Invalid`, whose
message is the "since ..." part of the ProtocolError the protocol makes of
it.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, TypeVar

from shmd.errors import TopicError, UnknownTopic

U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# Topics are 0..63; bit t of a topic mask subscribes to topic t.
TOPIC_COUNT: Final = 64
ALL_TOPICS: Final = U64_MAX
# Longest reason string, in UTF-8 bytes.
MAX_REASON: Final = 1024
INSTANCE_PATTERN: Final = "[A-Za-z0-9_.:@-]{1,31}"
_INSTANCE_RE: Final = re.compile(INSTANCE_PATTERN)
# A topic's name (segment.topics): 1 to 32 bytes, never all digits (a digit
# string is an id wherever a topic is asked for).
TOPIC_NAME_PATTERN: Final = "[a-z][a-z0-9_.-]{0,31}"
_TOPIC_NAME_RE: Final = re.compile(TOPIC_NAME_PATTERN)

PREFIX: Final = struct.Struct("<HH")
PREFIX_SIZE: Final = PREFIX.size
LE_U8: Final = struct.Struct("<B")
LE_U16: Final = struct.Struct("<H")
LE_U32: Final = struct.Struct("<I")


class Invalid(Exception):
    """A check failed; the message is the "since ..." part of a ProtocolError."""


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum_list(cls: type[enum.IntEnum]) -> str:
    return ", ".join(f"{m.value} ({m.name.lower()})" for m in cls)


# -- field checks: each raises Invalid -----------------------------------------


def _show(value: str, limit: int = 40) -> str:
    """repr() of a peer-supplied string, cut so an error message stays short."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"


def check_uint(name: str, value: object, maximum: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise Invalid(f"{name} {value} is outside {minimum}..{maximum}")
    return value


def check_member(name: str, cls: type[_E], value: object) -> _E:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be a {cls.__name__}, not {type(value).__name__}")
    try:
        return cls(value)
    except ValueError:
        raise Invalid(f"{name} {value} is not one of {_enum_list(cls)}") from None


def check_instance(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"the instance name must be a str, not {type(value).__name__}")
    if not _INSTANCE_RE.fullmatch(value):
        raise Invalid(
            f"the instance name {_show(value)} does not match {INSTANCE_PATTERN} "
            "(1 to 31 ASCII letters, digits, '_', '.', ':', '@' or '-')"
        )
    return value


def check_topic_name(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"a topic name must be a str, not {type(value).__name__}")
    if not _TOPIC_NAME_RE.fullmatch(value):
        raise Invalid(
            f"the topic name {_show(value)} does not match {TOPIC_NAME_PATTERN} "
            "(a lower-case letter, then up to 31 lower-case letters, digits, '_', '.' or '-')"
        )
    return value


def check_reason(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"the reason must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise Invalid("the reason contains a lone surrogate, which UTF-8 cannot carry") from None
    if size > MAX_REASON:
        raise Invalid(f"the reason is {size} bytes of UTF-8, more than {MAX_REASON}")
    if not value.isprintable():
        raise Invalid(f"the reason {_show(value)} contains control or other unprintable characters")
    return value


def safe_reason(text: str) -> str:
    """Make any text a valid Refuse/Detach reason (e.g. an exception's message).

    Unprintable characters are escaped the way repr() does, and the result is
    cut to MAX_REASON bytes of UTF-8 on a character boundary.  A text that is
    already a valid reason comes back unchanged.
    """
    escaped = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return escaped.encode("utf-8")[:MAX_REASON].decode("utf-8", errors="ignore")


# -- topic names ---------------------------------------------------------------


class TopicMap(Mapping[str, int]):
    """Topic names to ids 0..63 (``segment.topics``; the Welcome's ``topics``).

    Names match :data:`TOPIC_NAME_PATTERN`; names and ids are each unique.
    It iterates in id order, is immutable and hashable, and equals any
    mapping of the same pairs.  Building one from impossible pairs raises
    :class:`Invalid`.
    """

    __slots__ = ("_ids", "_names")

    def __init__(self, pairs: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        ids: dict[str, int] = {}
        names: dict[int, str] = {}
        for name, topic in items:
            check_topic_name(name)
            check_uint(f"the id of topic {name!r}", topic, TOPIC_COUNT - 1)
            if name in ids:
                raise Invalid(f"the topic name {name!r} is given twice")
            if topic in names:
                raise Invalid(f"topics {names[topic]!r} and {name!r} both have id {topic}")
            ids[name], names[topic] = topic, name
        self._names: dict[int, str] = dict(sorted(names.items()))
        self._ids: dict[str, int] = {n: t for t, n in self._names.items()}

    def __getitem__(self, name: str) -> int:
        return self._ids[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __hash__(self) -> int:
        return hash(tuple(self._ids.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._ids) == dict(other.items())

    def __repr__(self) -> str:
        return f"TopicMap({self._ids!r})"

    def name(self, topic: int) -> str | None:
        """The name of topic id ``topic``, or None if the map does not name it."""
        return self._names.get(topic)

    def label(self, topic: int) -> str:
        """The name of topic id ``topic`` if it has one, else the id as text."""
        return self._names.get(topic, str(topic))

    def resolve(self, topic: str | int) -> int:
        """The id of a topic given by name, by id, or by id as a digit string.

        Raises :class:`~shmd.errors.UnknownTopic` for a name the map does not
        hold and :class:`~shmd.errors.TopicError` for an id outside 0..63.
        """
        if isinstance(topic, str) and topic.isdigit() and topic.isascii():
            topic = int(topic)
        if isinstance(topic, str):
            if topic not in self._ids:
                raise UnknownTopic(topic, tuple(sorted(self._ids)))
            return self._ids[topic]
        if isinstance(topic, bool) or not isinstance(topic, int) or not 0 <= topic < TOPIC_COUNT:
            raise TopicError(f"Failed to find topic {topic!r} since ids are 0..{TOPIC_COUNT - 1}")
        return topic

    def mask(self, topics: Iterable[str | int]) -> int:
        """The u64 topic mask of these topics (names or ids)."""
        mask = 0
        for t in topics:
            mask |= 1 << self.resolve(t)
        return mask

    def names_in(self, mask: int) -> tuple[str, ...]:
        """The names of the topics of ``mask`` that the map names, in id order."""
        return tuple(n for t, n in self._names.items() if mask >> t & 1)


#: The empty map (a bus that names no topics).
NO_TOPICS: Final = TopicMap()


# -- bytes --------------------------------------------------------------------


class BodyReader:
    """Sequential little-endian reads after the prefix, raising Invalid on shortage."""

    def __init__(self, body: bytes) -> None:
        self._buf = body
        self._pos = PREFIX_SIZE

    def _take(self, size: int, what: str) -> bytes:
        end = self._pos + size
        if end > len(self._buf):
            raise Invalid(
                f"the body is {len(self._buf)} bytes but {what} needs bytes "
                f"{self._pos} to {end - 1}"
            )
        chunk = self._buf[self._pos : end]
        self._pos = end
        return chunk

    def fixed(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        values: tuple[int, ...] = st.unpack(self._take(st.size, what))
        return values

    def string(self, what: str) -> str:
        (size,) = LE_U16.unpack(self._take(2, f"the length of {what}"))
        raw = self._take(size, f"{what} ({size} bytes)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid(
                f"{what} is not valid UTF-8 ({exc.reason} at its byte {exc.start})"
            ) from None

    def blob(self, what: str) -> bytes:
        (size,) = LE_U32.unpack(self._take(4, f"the length of {what}"))
        return self._take(size, f"{what} ({size} bytes)")

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise Invalid(
                f"{len(self._buf) - self._pos} bytes trail the message "
                f"(it ends at byte {self._pos}, the body is {len(self._buf)} bytes)"
            )


def encode_string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return LE_U16.pack(len(raw)) + raw


def decode_bool(name: str, value: int) -> bool:
    if value not in (0, 1):
        raise Invalid(f"{name} is {value}, not 0 or 1")
    return value == 1
