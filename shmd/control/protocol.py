"""Protocol layer of the shmd control socket: what the frame bodies mean.

Every body starts with ``type u16, version u16`` (little-endian), then the
type's fields in a fixed order; strings are ``u16 length + UTF-8``.  Each
message type carries a fixed number of fds (they travel beside the body, see
:mod:`shmd.control.frames`), and :func:`decode` checks that number too.

Decoding is strict: a body decodes only if it is exactly what ``encode()``
produces for some valid message (no trailing bytes, no unknown enum values,
no booleans other than 0 and 1), so ``decode(b, n).encode() == b`` always
holds.  Anything else raises :class:`ProtocolError` saying what is wrong.
Building a message with impossible field values raises it as well.

Compatibility rules (docs/PROTOCOL.md, "Control protocol"): the 4-byte
type/version prefix and the layout of :class:`Refuse` never change, so a
peer speaking another version can always be told why it was refused.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias, TypeVar

from shmd.errors import ShmdError

PROTOCOL_VERSION: Final = 1

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

_PREFIX: Final = struct.Struct("<HH")
PREFIX_SIZE: Final = _PREFIX.size
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")


class ProtocolError(ShmdError):
    """A message is malformed, or a field value is impossible."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"Failed to {action} since {reason}")
        self.action = action
        self.reason = reason


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version (answer a Hello with Refuse(VERSION))."""

    def __init__(self, action: str, reason: str, *, peer_version: int, msg_type: int) -> None:
        super().__init__(action, reason)
        self.peer_version = peer_version
        self.msg_type = msg_type


class _Invalid(Exception):
    """A check failed; the message is the "since ..." part of a ProtocolError."""


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    DETACH = 4
    PUBLISH = 5
    PUBLISH_ACK = 6


class Start(enum.IntEnum):
    """Where a new reader starts reading."""

    LATEST = 0  # records published after it attached
    OLDEST = 1  # the oldest record still in the ring
    RESUME = 2  # at Hello.resume_cursor (reconnecting after a writer restart)


class Policy(enum.IntEnum):
    """The writer's overrun policy (same values as the segment header's)."""

    DROP_OLDEST = 0
    BLOCK = 1


class RefuseCode(enum.IntEnum):
    VERSION = 1  # the peer's protocol version is not this writer's
    NOT_ALLOWED = 2  # the peer's uid/gid is not allowed (control.allowed_users/groups)
    DUPLICATE_INSTANCE = 3  # a reader with that instance name is attached already
    TABLE_FULL = 4  # every reader table entry is taken (segment.max_readers)
    BAD_MESSAGE = 5  # the first message was not a valid Hello or Publish
    SHUTTING_DOWN = 6  # the writer is stopping
    BUSY = 7  # temporarily unable (e.g. still recovering after a restart): retry later


class DetachCode(enum.IntEnum):
    NORMAL = 1  # the sender is done (a reader drained after the active flag cleared)
    SHUTDOWN = 2  # the writer is stopping
    EVICTED = 3  # the writer removed the reader (it held the ring up under policy block)
    ERROR = 4  # the sender hit an error and is leaving (the reason says which)


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum_list(cls: type[enum.IntEnum]) -> str:
    return ", ".join(f"{m.value} ({m.name.lower()})" for m in cls)


# -- field checks: each raises _Invalid ---------------------------------------


def _show(value: str, limit: int = 40) -> str:
    """repr() of a peer-supplied string, cut so an error message stays short."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"


def _uint(name: str, value: object, maximum: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise _Invalid(f"{name} {value} is outside {minimum}..{maximum}")
    return value


def _member(name: str, cls: type[_E], value: object) -> _E:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{name} must be a {cls.__name__}, not {type(value).__name__}")
    try:
        return cls(value)
    except ValueError:
        raise _Invalid(f"{name} {value} is not one of {_enum_list(cls)}") from None


def _instance(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"the instance name must be a str, not {type(value).__name__}")
    if not _INSTANCE_RE.fullmatch(value):
        raise _Invalid(
            f"the instance name {_show(value)} does not match {INSTANCE_PATTERN} "
            "(1 to 31 ASCII letters, digits, '_', '.', ':', '@' or '-')"
        )
    return value


def _reason(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"the reason must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Invalid("the reason contains a lone surrogate, which UTF-8 cannot carry") from None
    if size > MAX_REASON:
        raise _Invalid(f"the reason is {size} bytes of UTF-8, more than {MAX_REASON}")
    if not value.isprintable():
        raise _Invalid(
            f"the reason {_show(value)} contains control or other unprintable characters"
        )
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


def _validate(msg: object, check: Callable[[], None]) -> None:
    """Run a message's checks at construction; failures become ProtocolError."""
    try:
        check()
    except _Invalid as exc:
        raise ProtocolError(f"build a {type(msg).__name__}", str(exc)) from None


def _set(msg: object, name: str, value: object) -> None:
    # Normalise a field of a frozen dataclass (e.g. an int to its enum).
    object.__setattr__(msg, name, value)


_M = TypeVar("_M")


def _construct(cls: Callable[..., _M], *args: object) -> _M:
    """Build a message from decoded fields; a failed check becomes _Invalid again."""
    try:
        return cls(*args)
    except ProtocolError as exc:
        raise _Invalid(exc.reason) from None


# -- bytes --------------------------------------------------------------------


class _Reader:
    """Sequential little-endian reads after the prefix, raising _Invalid on shortage."""

    def __init__(self, body: bytes) -> None:
        self._buf = body
        self._pos = PREFIX_SIZE

    def _take(self, size: int, what: str) -> bytes:
        end = self._pos + size
        if end > len(self._buf):
            raise _Invalid(
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
        (size,) = _U16.unpack(self._take(2, f"the length of {what}"))
        raw = self._take(size, f"{what} ({size} bytes)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Invalid(
                f"{what} is not valid UTF-8 ({exc.reason} at its byte {exc.start})"
            ) from None

    def blob(self, what: str) -> bytes:
        (size,) = _U32.unpack(self._take(4, f"the length of {what}"))
        return self._take(size, f"{what} ({size} bytes)")

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise _Invalid(
                f"{len(self._buf) - self._pos} bytes trail the message "
                f"(it ends at byte {self._pos}, the body is {len(self._buf)} bytes)"
            )


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _bool_byte(name: str, value: int) -> bool:
    if value not in (0, 1):
        raise _Invalid(f"{name} is {value}, not 0 or 1")
    return value == 1


# -- messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Reader -> writer, its first message: who it is and where it wants to start.

    The protocol version the reader speaks is the prefix's version field.
    """

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    N_FDS: ClassVar[int] = 0
    _FIELDS: ClassVar[struct.Struct] = struct.Struct("<QQQIB")

    instance: str
    pid: int
    topics: int = ALL_TOPICS
    start: Start = Start.LATEST
    resume_cursor: int = 0
    last_generation: int = 0

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        _instance(self.instance)
        _uint("the pid", self.pid, U32_MAX, minimum=1)
        _uint("the topic mask", self.topics, U64_MAX, minimum=1)
        start = _member("start", Start, self.start)
        _set(self, "start", start)
        _uint("the resume cursor", self.resume_cursor, U64_MAX)
        _uint("the last generation", self.last_generation, U64_MAX)
        if start != Start.RESUME and self.resume_cursor != 0:
            raise _Invalid(
                f"the resume cursor is {self.resume_cursor} but start is {start.name.lower()} "
                "(only start resume uses it; send 0)"
            )
        if start == Start.RESUME and self.last_generation == 0:
            raise _Invalid("start is resume but the last generation is 0 (none seen)")

    def subscribes(self, topic: int) -> bool:
        """Whether this reader wants records of ``topic`` (0..63)."""
        return bool(self.topics >> topic & 1)

    def encode(self) -> bytes:
        fixed = self._FIELDS.pack(
            self.topics, self.resume_cursor, self.last_generation, self.pid, self.start
        )
        return _PREFIX.pack(self.TYPE, PROTOCOL_VERSION) + fixed + _string(self.instance)

    @classmethod
    def _decode(cls, r: _Reader, version: int) -> Self:
        topics, cursor, generation, pid, start = r.fixed(cls._FIELDS, "the fixed fields")
        instance = r.string("the instance name")
        r.end()
        return _construct(cls, instance, pid, topics, start, cursor, generation)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Writer -> reader: attached; how to map the segment and where to start.

    Carries 3 fds, in this order: the reader's eventfd, the segment's fd,
    and the read end of the writer's *lifeline* pipe (it reports a hang-up
    only when neither the writer nor systemd's fd store holds the bus any
    more: the writer is gone for good, not restarting).
    """

    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    N_FDS: ClassVar[int] = 3
    FD_NAMES: ClassVar[tuple[str, str, str]] = ("eventfd", "segment", "lifeline")
    _FIELDS: ClassVar[struct.Struct] = struct.Struct("<QQQQIIIIBB")

    generation: int
    capacity: int
    slot_size: int
    max_readers: int
    reader_index: int
    ring_offset: int
    segment_size: int
    policy: Policy
    start_cursor: int
    resumed: bool = False

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        _uint("the generation", self.generation, U64_MAX, minimum=1)
        capacity = _uint("the capacity", self.capacity, U32_MAX, minimum=1)
        if capacity & (capacity - 1):
            raise _Invalid(f"the capacity {capacity} is not a power of two")
        slot = _uint("the slot size", self.slot_size, U32_MAX, minimum=8)
        if slot % 8:
            raise _Invalid(f"the slot size {slot} is not a multiple of 8")
        readers = _uint("max_readers", self.max_readers, U32_MAX, minimum=1)
        index = _uint("the reader index", self.reader_index, U32_MAX)
        if index >= readers:
            raise _Invalid(f"the reader index {index} is not below max_readers {readers}")
        offset = _uint("the ring offset", self.ring_offset, U64_MAX)
        size = _uint("the segment size", self.segment_size, U64_MAX)
        if offset + capacity * slot > size:
            raise _Invalid(
                f"the ring (offset {offset} + {capacity} slots x {slot} bytes) ends past "
                f"the segment size {size}"
            )
        _set(self, "policy", _member("the policy", Policy, self.policy))
        _uint("the start cursor", self.start_cursor, U64_MAX)
        if not isinstance(self.resumed, bool):
            raise _Invalid(f"resumed must be a bool, not {type(self.resumed).__name__}")

    def encode(self) -> bytes:
        fixed = self._FIELDS.pack(
            self.generation,
            self.ring_offset,
            self.segment_size,
            self.start_cursor,
            self.capacity,
            self.slot_size,
            self.max_readers,
            self.reader_index,
            self.policy,
            self.resumed,
        )
        return _PREFIX.pack(self.TYPE, PROTOCOL_VERSION) + fixed

    @classmethod
    def _decode(cls, r: _Reader, version: int) -> Self:
        (generation, offset, size, cursor, capacity, slot, readers, index, policy, resumed) = (
            r.fixed(cls._FIELDS, "the fields")
        )
        r.end()
        return _construct(
            cls,
            generation,
            capacity,
            slot,
            readers,
            index,
            offset,
            size,
            policy,
            cursor,
            _bool_byte("resumed", resumed),
        )


@dataclass(frozen=True, slots=True)
class Refuse:
    """Writer -> peer: not attached, and why; the writer closes the connection next.

    Its layout is frozen for all versions, so decode() accepts it whatever
    version it says; ``version`` is the protocol version of its sender.
    """

    TYPE: ClassVar[MessageType] = MessageType.REFUSE
    N_FDS: ClassVar[int] = 0

    code: RefuseCode
    reason: str = ""
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        _set(self, "code", _member("the refuse code", RefuseCode, self.code))
        _reason(self.reason)
        _uint("the version", self.version, U16_MAX, minimum=1)

    def encode(self) -> bytes:
        return _PREFIX.pack(self.TYPE, self.version) + _U16.pack(self.code) + _string(self.reason)

    @classmethod
    def _decode(cls, r: _Reader, version: int) -> Self:
        (code,) = r.fixed(_U16, "the refuse code")
        reason = r.string("the reason")
        r.end()
        return _construct(cls, code, reason, version)


@dataclass(frozen=True, slots=True)
class Detach:
    """Either direction: a graceful goodbye; the sender closes the connection next."""

    TYPE: ClassVar[MessageType] = MessageType.DETACH
    N_FDS: ClassVar[int] = 0

    code: DetachCode
    reason: str = ""

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        _set(self, "code", _member("the detach code", DetachCode, self.code))
        _reason(self.reason)

    def encode(self) -> bytes:
        return (
            _PREFIX.pack(self.TYPE, PROTOCOL_VERSION) + _U16.pack(self.code) + _string(self.reason)
        )

    @classmethod
    def _decode(cls, r: _Reader, version: int) -> Self:
        (code,) = r.fixed(_U16, "the detach code")
        reason = r.string("the reason")
        r.end()
        return _construct(cls, code, reason)


@dataclass(frozen=True, slots=True)
class Publish:
    """Client -> writer (``shmctl publish``): publish one record on a topic."""

    TYPE: ClassVar[MessageType] = MessageType.PUBLISH
    N_FDS: ClassVar[int] = 0

    topic: int
    payload: bytes

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        _uint("the topic", self.topic, TOPIC_COUNT - 1)
        if not isinstance(self.payload, bytes | bytearray | memoryview):
            raise _Invalid(f"the payload must be bytes, not {type(self.payload).__name__}")
        _set(self, "payload", bytes(self.payload))
        if len(self.payload) > U32_MAX:
            raise _Invalid(f"the payload is {len(self.payload)} bytes, more than {U32_MAX}")

    def encode(self) -> bytes:
        return (
            _PREFIX.pack(self.TYPE, PROTOCOL_VERSION)
            + _U32.pack(self.topic)
            + _U32.pack(len(self.payload))
            + self.payload
        )

    @classmethod
    def _decode(cls, r: _Reader, version: int) -> Self:
        (topic,) = r.fixed(_U32, "the topic")
        payload = r.blob("the payload")
        r.end()
        return _construct(cls, topic, payload)


@dataclass(frozen=True, slots=True)
class PublishAck:
    """Writer -> client: ``count`` Publish messages are in the ring, the last at ``seq``.

    The writer may acknowledge several Publish messages with one PublishAck.
    """

    TYPE: ClassVar[MessageType] = MessageType.PUBLISH_ACK
    N_FDS: ClassVar[int] = 0
    _FIELDS: ClassVar[struct.Struct] = struct.Struct("<QI")

    seq: int
    count: int = 1

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        _uint("the sequence number", self.seq, U64_MAX)
        _uint("the count", self.count, U32_MAX, minimum=1)

    def encode(self) -> bytes:
        return _PREFIX.pack(self.TYPE, PROTOCOL_VERSION) + self._FIELDS.pack(self.seq, self.count)

    @classmethod
    def _decode(cls, r: _Reader, version: int) -> Self:
        seq, count = r.fixed(cls._FIELDS, "the fields")
        r.end()
        return _construct(cls, seq, count)


Message: TypeAlias = Hello | Welcome | Refuse | Detach | Publish | PublishAck

MESSAGE_CLASSES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Refuse, Detach, Publish, PublishAck)
}


def decode(body: bytes, n_fds: int) -> Message:
    """Decode one frame body that arrived with ``n_fds`` fds; strict, see the module doc."""
    body = bytes(body)
    if len(body) < PREFIX_SIZE:
        raise ProtocolError(
            "decode a message",
            f"the body is {len(body)} bytes, shorter than the {PREFIX_SIZE}-byte "
            "type/version prefix",
        )
    raw_type, version = _PREFIX.unpack_from(body)
    cls = MESSAGE_CLASSES.get(raw_type)
    name = cls.__name__ if cls is not None else f"message of type {raw_type}"
    if version != PROTOCOL_VERSION and cls is not Refuse:
        raise VersionMismatch(
            f"decode a {name}",
            f"it is protocol version {version} but this side speaks {PROTOCOL_VERSION}",
            peer_version=version,
            msg_type=raw_type,
        )
    if cls is None:
        known = ", ".join(f"{t.value} ({MESSAGE_CLASSES[t].__name__})" for t in MessageType)
        raise ProtocolError("decode a message", f"its type {raw_type} is unknown (known: {known})")
    if n_fds != cls.N_FDS:
        raise ProtocolError(
            f"decode a {name}",
            f"{n_fds} fd{'' if n_fds == 1 else 's'} came with it but a {name} carries "
            f"exactly {cls.N_FDS}",
        )
    try:
        return cls._decode(_Reader(body), version)
    except _Invalid as exc:
        raise ProtocolError(f"decode a {name}", str(exc)) from None
