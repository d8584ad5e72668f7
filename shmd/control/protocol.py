"""Protocol layer of the shmd control socket: what the frame bodies mean.

Every body starts with ``type u16, version u16`` (little-endian), then the
type's fields in a fixed order; strings are ``u16 length + UTF-8`` (the
field checks and byte helpers are :mod:`shmd.control.fields`).  Each
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
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias, TypeVar

from shmd.control.fields import (
    ALL_TOPICS,
    LE_U8,
    LE_U16,
    LE_U32,
    NO_TOPICS,
    PREFIX,
    PREFIX_SIZE,
    TOPIC_COUNT,
    U16_MAX,
    U32_MAX,
    U64_MAX,
    BodyReader,
    Invalid,
    TopicMap,
    check_instance,
    check_member,
    check_reason,
    check_topic_name,
    check_uint,
    decode_bool,
    encode_string,
)
from shmd.errors import ShmdError

#: 2: the Hello carries the reader's wait strategy.  3: the Hello may name
#: topics, the Welcome carries the writer's topic map.
PROTOCOL_VERSION: Final = 4


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


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    DETACH = 4
    PUBLISH = 5
    PUBLISH_ACK = 6


class StartCode(enum.IntEnum):
    """Where a new reader starts reading: Hello's wire code for it."""

    LATEST = 0  # records published after it attached
    OLDEST = 1  # the oldest record still in the ring
    RESUME = 2  # at Hello.resume_cursor (reconnecting after a writer restart)


class PolicyCode(enum.IntEnum):
    """The writer's overrun policy: Welcome's wire code for it.

    The same values as the segment header's ``shmd.bus.layout.Policy``,
    which this layer may not import.
    """

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
    UNKNOWN_TOPIC = 8  # the Hello names a topic the writer's topic map does not hold


class WaitCode(enum.IntEnum):
    """How a reader waits for records (the codes of shmd.bus.wait.WaitCode, which the
    reader-table entry holds too; tests/test_protocol.py checks they agree)."""

    SLEEP = 0  # blocks in epoll on its eventfd
    SPIN = 1  # busy-polls write_seq; the writer never writes its eventfd
    BACKOFF = 2  # spins, then yields, then sleeps


class DetachCode(enum.IntEnum):
    NORMAL = 1  # the sender is done (a reader drained after the active flag cleared)
    SHUTDOWN = 2  # the writer is stopping
    EVICTED = 3  # the writer removed the reader (it held the ring up under policy block)
    ERROR = 4  # the sender hit an error and is leaving (the reason says which)
    SUSPEND = 5  # a durable reader leaves and a new process of it comes back: keep its entry


def _validate(msg: object, check: Callable[[], None]) -> None:
    """Run a message's checks at construction; failures become ProtocolError."""
    try:
        check()
    except Invalid as exc:
        raise ProtocolError(f"build a {type(msg).__name__}", str(exc)) from None


def _set(msg: object, name: str, value: object) -> None:
    # Normalise a field of a frozen dataclass (e.g. an int to its enum).
    object.__setattr__(msg, name, value)


_M = TypeVar("_M")


def _construct(cls: Callable[..., _M], *args: object) -> _M:
    """Build a message from decoded fields; a failed check becomes Invalid again."""
    try:
        return cls(*args)
    except ProtocolError as exc:
        raise Invalid(exc.reason) from None


# -- messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Reader -> writer, its first message: who it is and where it wants to start.

    The protocol version the reader speaks is the prefix's version field.
    """

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    N_FDS: ClassVar[int] = 0
    _FIELDS: ClassVar[struct.Struct] = struct.Struct("<QQQIBBI")

    instance: str
    pid: int
    topics: int = ALL_TOPICS
    start: StartCode = StartCode.LATEST
    resume_cursor: int = 0
    last_generation: int = 0
    #: How the reader waits (shmd.bus.wait): informational, for logs and status.
    wait: WaitCode = WaitCode.SLEEP
    #: Topics by name (the writer's ``segment.topics``), added to ``topics``;
    #: with names, ``topics`` may be 0 ("only the named ones").
    topic_names: tuple[str, ...] = ()
    #: A durable reader's grace in ms (0: not durable): how long the writer
    #: keeps its entry and cursor after its process went, for a new process
    #: of the same name to resume there.
    durable_ms: int = 0

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        check_instance(self.instance)
        check_uint("the durable grace", self.durable_ms, U32_MAX)
        _set(self, "wait", check_member("wait", WaitCode, self.wait))
        check_uint("the pid", self.pid, U32_MAX, minimum=1)
        if isinstance(self.topic_names, str) or not isinstance(self.topic_names, tuple | list):
            raise Invalid(
                f"topic_names must be a tuple of names, not {type(self.topic_names).__name__}"
            )
        names = tuple(check_topic_name(n) for n in self.topic_names)
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise Invalid(f"the topic name {twice!r} is given twice")
        if len(names) > TOPIC_COUNT:
            raise Invalid(f"{len(names)} topic names are more than the {TOPIC_COUNT} topics")
        _set(self, "topic_names", names)
        check_uint("the topic mask", self.topics, U64_MAX, minimum=0 if names else 1)
        start = check_member("start", StartCode, self.start)
        _set(self, "start", start)
        check_uint("the resume cursor", self.resume_cursor, U64_MAX)
        check_uint("the last generation", self.last_generation, U64_MAX)
        if start != StartCode.RESUME and self.resume_cursor != 0:
            raise Invalid(
                f"the resume cursor is {self.resume_cursor} but start is {start.name.lower()} "
                "(only start resume uses it; send 0)"
            )
        if start == StartCode.RESUME and self.last_generation == 0:
            raise Invalid("start is resume but the last generation is 0 (none seen)")

    def subscribes(self, topic: int) -> bool:
        """Whether this reader wants records of ``topic`` (0..63)."""
        return bool(self.topics >> topic & 1)

    def encode(self) -> bytes:
        fixed = self._FIELDS.pack(
            self.topics,
            self.resume_cursor,
            self.last_generation,
            self.pid,
            self.start,
            self.wait,
            self.durable_ms,
        )
        names = b"".join(encode_string(n) for n in self.topic_names)
        return (
            PREFIX.pack(self.TYPE, PROTOCOL_VERSION)
            + fixed
            + encode_string(self.instance)
            + LE_U8.pack(len(self.topic_names))
            + names
        )

    @classmethod
    def _decode(cls, r: BodyReader, version: int) -> Self:
        topics, cursor, generation, pid, start, wait, durable = r.fixed(
            cls._FIELDS, "the fixed fields"
        )
        instance = r.string("the instance name")
        (count,) = r.fixed(LE_U8, "the topic name count")
        if count > TOPIC_COUNT:
            raise Invalid(f"{count} topic names are more than the {TOPIC_COUNT} topics")
        names = tuple(r.string(f"topic name {i}") for i in range(count))
        r.end()
        return _construct(
            cls, instance, pid, topics, start, cursor, generation, wait, names, durable
        )


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
    _FIELDS: ClassVar[struct.Struct] = struct.Struct("<QQQQIIIIBBQ")

    generation: int
    capacity: int
    slot_size: int
    max_readers: int
    reader_index: int
    ring_offset: int
    segment_size: int
    policy: PolicyCode
    start_cursor: int
    resumed: bool = False
    #: The writer's topic map (``segment.topics``): names to ids.
    topics: TopicMap = NO_TOPICS
    #: A durable reader's new process: the records below this seq (from
    #: ``start_cursor``) were handed to its previous process, and come again
    #: (0: none).
    redeliver_until: int = 0

    def __post_init__(self) -> None:
        _validate(self, self._check)

    def _check(self) -> None:
        check_uint("the generation", self.generation, U64_MAX, minimum=1)
        capacity = check_uint("the capacity", self.capacity, U32_MAX, minimum=1)
        if capacity & (capacity - 1):
            raise Invalid(f"the capacity {capacity} is not a power of two")
        slot = check_uint("the slot size", self.slot_size, U32_MAX, minimum=8)
        if slot % 8:
            raise Invalid(f"the slot size {slot} is not a multiple of 8")
        readers = check_uint("max_readers", self.max_readers, U32_MAX, minimum=1)
        index = check_uint("the reader index", self.reader_index, U32_MAX)
        if index >= readers:
            raise Invalid(f"the reader index {index} is not below max_readers {readers}")
        offset = check_uint("the ring offset", self.ring_offset, U64_MAX)
        size = check_uint("the segment size", self.segment_size, U64_MAX)
        if offset + capacity * slot > size:
            raise Invalid(
                f"the ring (offset {offset} + {capacity} slots x {slot} bytes) ends past "
                f"the segment size {size}"
            )
        _set(self, "policy", check_member("the policy", PolicyCode, self.policy))
        check_uint("the start cursor", self.start_cursor, U64_MAX)
        check_uint("the redelivery mark", self.redeliver_until, U64_MAX)
        if not isinstance(self.resumed, bool):
            raise Invalid(f"resumed must be a bool, not {type(self.resumed).__name__}")
        if not isinstance(self.topics, TopicMap):
            if not isinstance(self.topics, Mapping):
                raise Invalid(f"topics must be a TopicMap, not {type(self.topics).__name__}")
            _set(self, "topics", TopicMap(self.topics))

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
            self.redeliver_until,
        )
        pairs = b"".join(LE_U8.pack(t) + encode_string(n) for n, t in self.topics.items())
        head = PREFIX.pack(self.TYPE, PROTOCOL_VERSION) + fixed
        return head + LE_U8.pack(len(self.topics)) + pairs

    @classmethod
    def _decode(cls, r: BodyReader, version: int) -> Self:
        (
            generation,
            offset,
            size,
            cursor,
            capacity,
            slot,
            readers,
            index,
            policy,
            resumed,
            until,
        ) = r.fixed(cls._FIELDS, "the fields")
        (count,) = r.fixed(LE_U8, "the topic count")
        if count > TOPIC_COUNT:
            raise Invalid(f"{count} named topics are more than the {TOPIC_COUNT} topics")
        pairs: list[tuple[str, int]] = []
        for i in range(count):
            (topic,) = r.fixed(LE_U8, f"the id of named topic {i}")
            if pairs and topic <= pairs[-1][1]:
                raise Invalid(
                    f"named topic {i} has id {topic}, not above the previous one's "
                    f"{pairs[-1][1]} (the map is sent in ascending id order)"
                )
            pairs.append((r.string(f"the name of topic {topic}"), topic))
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
            decode_bool("resumed", resumed),
            TopicMap(pairs),
            until,
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
        _set(self, "code", check_member("the refuse code", RefuseCode, self.code))
        check_reason(self.reason)
        check_uint("the version", self.version, U16_MAX, minimum=1)

    def encode(self) -> bytes:
        return (
            PREFIX.pack(self.TYPE, self.version)
            + LE_U16.pack(self.code)
            + encode_string(self.reason)
        )

    @classmethod
    def _decode(cls, r: BodyReader, version: int) -> Self:
        (code,) = r.fixed(LE_U16, "the refuse code")
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
        _set(self, "code", check_member("the detach code", DetachCode, self.code))
        check_reason(self.reason)

    def encode(self) -> bytes:
        return (
            PREFIX.pack(self.TYPE, PROTOCOL_VERSION)
            + LE_U16.pack(self.code)
            + encode_string(self.reason)
        )

    @classmethod
    def _decode(cls, r: BodyReader, version: int) -> Self:
        (code,) = r.fixed(LE_U16, "the detach code")
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
        check_uint("the topic", self.topic, TOPIC_COUNT - 1)
        if not isinstance(self.payload, bytes | bytearray | memoryview):
            raise Invalid(f"the payload must be bytes, not {type(self.payload).__name__}")
        _set(self, "payload", bytes(self.payload))
        if len(self.payload) > U32_MAX:
            raise Invalid(f"the payload is {len(self.payload)} bytes, more than {U32_MAX}")

    def encode(self) -> bytes:
        return (
            PREFIX.pack(self.TYPE, PROTOCOL_VERSION)
            + LE_U32.pack(self.topic)
            + LE_U32.pack(len(self.payload))
            + self.payload
        )

    @classmethod
    def _decode(cls, r: BodyReader, version: int) -> Self:
        (topic,) = r.fixed(LE_U32, "the topic")
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
        check_uint("the sequence number", self.seq, U64_MAX)
        check_uint("the count", self.count, U32_MAX, minimum=1)

    def encode(self) -> bytes:
        return PREFIX.pack(self.TYPE, PROTOCOL_VERSION) + self._FIELDS.pack(self.seq, self.count)

    @classmethod
    def _decode(cls, r: BodyReader, version: int) -> Self:
        seq, count = r.fixed(cls._FIELDS, "the fields")
        r.end()
        return _construct(cls, seq, count)


Message: TypeAlias = Hello | Welcome | Refuse | Detach | Publish | PublishAck

#: A Welcome's size without its topic map (prefix, fixed fields, the map's count);
#: each named topic adds 3 bytes and its name.
WELCOME_FIXED_SIZE: Final = PREFIX_SIZE + Welcome._FIELDS.size + 1

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
    raw_type, version = PREFIX.unpack_from(body)
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
        return cls._decode(BodyReader(body), version)
    except Invalid as exc:
        raise ProtocolError(f"decode a {name}", str(exc)) from None
