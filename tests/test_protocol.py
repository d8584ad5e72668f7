"""Tests for shmd.control.protocol: message encoding and strict decoding."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmd.bus import wait
from shmd.control.fields import (
    ALL_TOPICS,
    MAX_REASON,
    NO_TOPICS,
    U32_MAX,
    U64_MAX,
    Invalid,
    TopicMap,
    safe_reason,
)
from shmd.control.protocol import (
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    WELCOME_FIXED_SIZE,
    Detach,
    DetachCode,
    Hello,
    Message,
    MessageType,
    PolicyCode,
    ProtocolError,
    Publish,
    PublishAck,
    Refuse,
    RefuseCode,
    StartCode,
    VersionMismatch,
    WaitCode,
    Welcome,
    decode,
)
from shmd.errors import TopicError, UnknownTopic

# -- strategies -----------------------------------------------------------------

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)
instances = st.from_regex(r"[A-Za-z0-9_.:@-]{1,31}", fullmatch=True)
topic_names = st.from_regex(r"[a-z][a-z0-9_.-]{0,31}", fullmatch=True)
topic_maps = st.dictionaries(topic_names, st.integers(0, 63), max_size=64).map(
    lambda d: TopicMap({n: t for t, n in {t: n for n, t in d.items()}.items()})
)
reasons = st.text(max_size=120).filter(
    lambda s: s.isprintable() and len(s.encode("utf-8")) <= MAX_REASON
)


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    start = draw(st.sampled_from(StartCode))
    resume = start == StartCode.RESUME
    names = tuple(draw(st.lists(topic_names, max_size=64, unique=True)))
    return Hello(
        instance=draw(instances),
        pid=draw(st.integers(1, U32_MAX)),
        topics=draw(st.integers(0 if names else 1, U64_MAX)),
        start=start,
        resume_cursor=draw(u64) if resume else 0,
        last_generation=draw(st.integers(1, U64_MAX) if resume else u64),
        wait=draw(st.sampled_from(WaitCode)),
        topic_names=names,
        durable_ms=draw(st.integers(0, U32_MAX)),
    )


@st.composite
def welcomes(draw: st.DrawFn) -> Welcome:
    capacity = 1 << draw(st.integers(0, 24))
    slot = 8 * draw(st.integers(1, 1 << 20))
    readers = draw(st.integers(1, U32_MAX))
    offset = draw(st.integers(0, 1 << 40))
    return Welcome(
        generation=draw(st.integers(1, U64_MAX)),
        capacity=capacity,
        slot_size=slot,
        max_readers=readers,
        reader_index=draw(st.integers(0, readers - 1)),
        ring_offset=offset,
        segment_size=draw(st.integers(offset + capacity * slot, U64_MAX)),
        policy=draw(st.sampled_from(PolicyCode)),
        start_cursor=draw(u64),
        resumed=draw(st.booleans()),
        topics=draw(topic_maps),
        redeliver_until=draw(u64),
    )


refuses = st.builds(
    Refuse,
    code=st.sampled_from(RefuseCode),
    reason=reasons,
    version=st.just(PROTOCOL_VERSION) | st.integers(1, 0xFFFF),
)
detaches = st.builds(Detach, code=st.sampled_from(DetachCode), reason=reasons)
publishes = st.builds(Publish, topic=st.integers(0, 63), payload=st.binary(max_size=2000))
acks = st.builds(PublishAck, seq=u64, count=st.integers(1, U32_MAX))
messages: st.SearchStrategy[Message] = st.one_of(
    hellos(), welcomes(), refuses, detaches, publishes, acks
)
current_messages = messages.filter(lambda m: not isinstance(m, Refuse) or m.version == 1)


def prefix(msg_type: int, version: int = PROTOCOL_VERSION) -> bytes:
    return struct.pack("<HH", msg_type, version)


def string(raw: bytes) -> bytes:
    return struct.pack("<H", len(raw)) + raw


def hello_body(
    instance: bytes = b"r1",
    *,
    topics: int = ALL_TOPICS,
    cursor: int = 0,
    generation: int = 0,
    pid: int = 42,
    start: int = 0,
    wait: int = 0,
    names: tuple[bytes, ...] = (),
    count: int | None = None,
    durable: int = 0,
) -> bytes:
    fixed = struct.pack("<QQQIBBI", topics, cursor, generation, pid, start, wait, durable)
    tail = bytes([len(names) if count is None else count]) + b"".join(map(string, names))
    return prefix(MessageType.HELLO) + fixed + string(instance) + tail


def welcome_body(topics: tuple[tuple[int, bytes], ...] = (), **changes: int) -> bytes:
    fields = {
        "generation": 7,
        "ring_offset": 16384,
        "segment_size": 16384 + 1024 * 4096,
        "start_cursor": 99,
        "capacity": 1024,
        "slot_size": 4096,
        "max_readers": 64,
        "reader_index": 3,
        "policy": 0,
        "resumed": 0,
        "redeliver_until": 0,
    }
    fields.update(changes)
    pairs = b"".join(bytes([t]) + string(n) for t, n in topics)
    return (
        prefix(MessageType.WELCOME)
        + struct.pack("<QQQQIIIIBBQ", *fields.values())
        + bytes([len(topics)])
        + pairs
    )


# -- round trips ----------------------------------------------------------------


@settings(max_examples=500)
@given(messages)
def test_every_message_round_trips(msg: Message) -> None:
    """decode(encode(m)) gives back an equal message of the same type."""
    body = msg.encode()
    decoded = decode(body, msg.N_FDS)
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert decoded.encode() == body


def test_fd_counts_are_declared_per_type() -> None:
    """Welcome carries the eventfd, the segment fd and the lifeline; every other message none."""
    assert Welcome.N_FDS == 3
    assert Welcome.FD_NAMES == ("eventfd", "segment", "lifeline")
    assert {cls.__name__: cls.N_FDS for cls in MESSAGE_CLASSES.values()} == {
        "Hello": 0,
        "Welcome": 3,
        "Refuse": 0,
        "Detach": 0,
        "Publish": 0,
        "PublishAck": 0,
    }


def test_hello_bytes_are_pinned() -> None:
    """Hello encodes to exactly the byte layout documented in docs/PROTOCOL.md."""
    msg = Hello(
        instance="1",
        pid=0x1234,
        topics=0b101,
        start=StartCode.RESUME,
        resume_cursor=0x0102,
        last_generation=7,
        wait=WaitCode.SPIN,
        durable_ms=30_000,
    )
    assert msg.encode().hex(" ") == (
        "01 00 04 00"  # type 1 (Hello), version 4
        " 05 00 00 00 00 00 00 00"  # topic mask: topics 0 and 2
        " 02 01 00 00 00 00 00 00"  # resume cursor
        " 07 00 00 00 00 00 00 00"  # last generation
        " 34 12 00 00"  # pid
        " 02"  # start = resume
        " 01"  # wait = spin
        " 30 75 00 00"  # durable grace: 30000 ms
        " 01 00 31"  # instance "1"
        " 00"  # no topic names
    )
    assert msg.subscribes(0) and msg.subscribes(2) and not msg.subscribes(1)


def test_hello_with_topic_names_bytes_are_pinned() -> None:
    """A Hello naming topics carries them after the instance, and may send mask 0."""
    msg = Hello(instance="1", pid=1, topics=0, topic_names=("ticks", "fx.eur"))
    body = msg.encode()
    assert body[4:12] == b"\0" * 8  # mask 0: only the named topics
    assert body.endswith(bytes.fromhex("01 00 31 02 05 00") + b"ticks" + b"\x06\x00fx.eur")
    assert decode(body, 0) == msg


def test_welcome_with_a_topic_map_bytes_are_pinned() -> None:
    """The Welcome carries the writer's topic map after its fixed fields, in id order."""
    msg = Welcome(
        7,
        1024,
        4096,
        64,
        3,
        16384,
        16384 + 4096 * 1024,
        PolicyCode.DROP_OLDEST,
        99,
        False,
        topics=TopicMap({"ticks": 3, "frames": 1}),
    )
    body = msg.encode()
    assert body == welcome_body(((1, b"frames"), (3, b"ticks")))
    assert (
        body[62:] == bytes.fromhex("02 01 06 00") + b"frames" + bytes.fromhex("03 05 00") + b"ticks"
    )
    decoded = decode(body, 3)
    assert isinstance(decoded, Welcome) and decoded.topics == {"frames": 1, "ticks": 3}
    assert len(body) == WELCOME_FIXED_SIZE + (3 + 6) + (3 + 5)


def test_wait_codes_are_the_buses() -> None:
    """The Hello's wait codes are the ones the reader-table entry holds (shmd.bus.wait)."""
    assert {c.name: c.value for c in WaitCode} == {c.name: c.value for c in wait.WaitCode}


def test_a_hello_with_an_unknown_wait_code_is_rejected() -> None:
    """A wait code the writer does not know fails the decode with the field's name."""
    body = bytearray(Hello(instance="1", pid=1).encode())
    body[4 + 29] = 9  # the wait byte
    with pytest.raises(ProtocolError, match="wait 9 is not one of"):
        decode(bytes(body), 0)


def test_welcome_and_short_messages_bytes_are_pinned() -> None:
    """Welcome, Refuse, Detach, Publish and PublishAck encode to the documented layouts."""
    assert decode(welcome_body(), 3).encode() == welcome_body()
    assert len(welcome_body()) == 63
    assert Refuse(RefuseCode.TABLE_FULL, "full").encode() == prefix(3) + b"\x04\x00" + string(
        b"full"
    )
    assert Detach(DetachCode.SHUTDOWN).encode() == prefix(4) + b"\x02\x00\x00\x00"
    assert Detach(DetachCode.SUSPEND).encode() == prefix(4) + b"\x05\x00\x00\x00"
    assert Publish(5, b"abc").encode() == prefix(5) + b"\x05\x00\x00\x00\x03\x00\x00\x00abc"
    assert PublishAck(9, 2).encode() == prefix(6) + struct.pack("<QI", 9, 2)


# -- what decode rejects ------------------------------------------------------------


@settings(max_examples=200)
@given(messages, st.data())
def test_every_truncation_is_rejected(msg: Message, data: st.DataObject) -> None:
    """Every strict prefix of a valid body raises ProtocolError."""
    body = msg.encode()
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(ProtocolError):
        decode(body[:cut], msg.N_FDS)


@settings(max_examples=200)
@given(messages, st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_rejected(msg: Message, extra: bytes) -> None:
    """Bytes after the end of a valid message raise ProtocolError (oversized body)."""
    with pytest.raises(ProtocolError, match="trail"):
        decode(msg.encode() + extra, msg.N_FDS)


@settings(max_examples=200)
@given(current_messages, st.integers(0, 0xFFFF).filter(lambda v: v != PROTOCOL_VERSION))
def test_wrong_version_is_rejected(msg: Message, version: int) -> None:
    """A message of another protocol version raises VersionMismatch (Refuse excepted)."""
    body = bytearray(msg.encode())
    struct.pack_into("<H", body, 2, version)
    if isinstance(msg, Refuse):
        if version == 0:
            with pytest.raises(ProtocolError, match=r"version 0 is outside 1\.\.65535"):
                decode(bytes(body), 0)
        else:
            assert decode(bytes(body), 0) == Refuse(msg.code, msg.reason, version)
        return
    with pytest.raises(VersionMismatch) as exc:
        decode(bytes(body), msg.N_FDS)
    assert exc.value.peer_version == version
    assert exc.value.msg_type == msg.TYPE
    assert f"protocol version {version} but this side speaks {PROTOCOL_VERSION}" in str(exc.value)


def test_refuse_from_another_version_is_readable() -> None:
    """A Refuse sent by a peer of protocol version 2 still decodes, with its version."""
    body = prefix(MessageType.REFUSE, 2) + b"\x01\x00" + string(b"I speak 2")
    refuse = decode(body, 0)
    assert refuse == Refuse(RefuseCode.VERSION, "I speak 2", version=2)
    assert refuse.encode() == body


@settings(max_examples=200)
@given(messages, st.integers(0, 8))
def test_wrong_fd_count_is_rejected(msg: Message, n_fds: int) -> None:
    """A message that arrived with a different number of fds than its type carries is rejected."""
    if n_fds == msg.N_FDS:
        n_fds += 1
    with pytest.raises(ProtocolError, match=rf"{n_fds} fds? came with it .* exactly {msg.N_FDS}"):
        decode(msg.encode(), n_fds)


@pytest.mark.parametrize("msg_type", [0, 7, 8, 0x100, 0xFFFF])
def test_unknown_type_is_rejected(msg_type: int) -> None:
    """A body whose type is not a known message type is rejected, naming the known ones."""
    with pytest.raises(
        ProtocolError, match=rf"its type {msg_type} is unknown \(known: 1 \(Hello\)"
    ):
        decode(prefix(msg_type) + b"\0" * 40, 0)


def test_unknown_type_of_another_version_is_a_version_mismatch() -> None:
    """A body of another version is reported as a version mismatch even when its type is unknown."""
    with pytest.raises(VersionMismatch, match="message of type 9 since it is protocol version 5"):
        decode(prefix(9, 5), 0)


def test_short_prefix_is_rejected() -> None:
    """A body shorter than the type/version prefix is rejected with its length."""
    for body in (b"", b"\x01", b"\x01\x00\x01"):
        with pytest.raises(ProtocolError, match=f"the body is {len(body)} bytes, shorter"):
            decode(body, 0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (hello_body(b""), r"instance name '' does not match"),
        (hello_body(b"a b"), r"instance name 'a b' does not match"),
        (hello_body(b"x" * 32), r"instance name 'x{32}' does not match"),
        (hello_body(b"y" * 5000), r"instance name 'y{40}'\.\.\. \(5000 chars\) does not match"),
        (hello_body("é".encode()), r"instance name 'é' does not match"),
        (hello_body(b"\xff"), r"the instance name is not valid UTF-8"),
        (hello_body(b"r1\n"), r"does not match"),
        (hello_body(topics=0), r"the topic mask 0 is outside 1\.\."),
        (hello_body(pid=0), r"the pid 0 is outside 1\.\."),
        (hello_body(start=3), r"start 3 is not one of 0 \(latest\), 1 \(oldest\), 2 \(resume\)"),
        (hello_body(cursor=5), r"resume cursor is 5 but start is latest"),
        (hello_body(start=2, cursor=5), r"start is resume but the last generation is 0"),
        (welcome_body(capacity=1000), r"capacity 1000 is not a power of two"),
        (welcome_body(capacity=0), r"capacity 0 is outside 1\.\."),
        (welcome_body(slot_size=4092), r"slot size 4092 is not a multiple of 8"),
        (welcome_body(reader_index=64), r"reader index 64 is not below max_readers 64"),
        (welcome_body(max_readers=0, reader_index=0), r"max_readers 0 is outside 1\.\."),
        (welcome_body(segment_size=16384), r"ring .* ends past the segment size 16384"),
        (welcome_body(policy=2), r"the policy 2 is not one of 0 \(drop_oldest\), 1 \(block\)"),
        (welcome_body(resumed=2), r"resumed is 2, not 0 or 1"),
        (welcome_body(generation=0), r"the generation 0 is outside 1\.\."),
        (prefix(3) + b"\x00\x00" + string(b""), r"refuse code 0 is not one of 1 \(version\)"),
        (prefix(3) + b"\x09\x00" + string(b""), r"refuse code 9 is not one of"),
        (hello_body(names=(b"ticks", b"ticks")), r"the topic name 'ticks' is given twice"),
        (hello_body(names=(b"Ticks",)), r"the topic name 'Ticks' does not match"),
        (hello_body(names=(b"7",)), r"the topic name '7' does not match"),
        (hello_body(names=(b"t" * 33,)), r"the topic name 't{33}' does not match"),
        (hello_body(count=65), r"65 topic names are more than the 64 topics"),
        (hello_body(count=2, names=(b"a",)), r"topic name 1 needs"),
        (
            welcome_body(((3, b"ticks"), (1, b"frames"))),
            r"named topic 1 has id 1, not above the previous one's 3",
        ),
        (welcome_body(((1, b"a"), (2, b"a"))), r"the topic name 'a' is given twice"),
        (welcome_body(((64, b"a"),)), r"the id of topic 'a' 64 is outside 0\.\.63"),
        (welcome_body(((1, b"A b"),)), r"the topic name 'A b' does not match"),
        (prefix(3) + b"\x01\x00" + string(b"\xc3"), r"the reason is not valid UTF-8"),
        (prefix(3) + b"\x01\x00" + string(b"a\x1b[2J"), r"control or other unprintable"),
        (prefix(3) + b"\x01\x00" + string(b"r" * 1025), r"1025 bytes of UTF-8, more than 1024"),
        (prefix(4) + b"\x06\x00" + string(b""), r"detach code 6 is not one of 1 \(normal\)"),
        (prefix(5) + struct.pack("<II", 64, 0), r"the topic 64 is outside 0\.\.63"),
        (prefix(5) + struct.pack("<II", 0, 10) + b"short", r"the payload \(10 bytes\) needs"),
        (prefix(6) + struct.pack("<QI", 1, 0), r"the count 0 is outside 1\.\."),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_invalid_field_values_are_rejected(body: bytes, message: str) -> None:
    """Decoding rejects out-of-range, inconsistent or ill-formed fields with a precise message."""
    msg_type = struct.unpack_from("<H", body)[0]
    with pytest.raises(ProtocolError, match=rf"^Failed to decode a \w+ since .*{message}"):
        decode(body, MESSAGE_CLASSES[msg_type].N_FDS)


def test_valid_hand_built_bodies_decode() -> None:
    """The hand-built bodies used for the rejection cases are valid when left unchanged."""
    assert decode(hello_body(), 0) == Hello("r1", pid=42)
    assert decode(hello_body(b"a-Z_0.9:x@y"), 0) == Hello("a-Z_0.9:x@y", pid=42)
    assert decode(welcome_body(), 3) == Welcome(
        7, 1024, 4096, 64, 3, 16384, 16384 + 4096 * 1024, PolicyCode.DROP_OLDEST, 99, False
    )
    assert decode(hello_body(topics=0, names=(b"a",)), 0) == Hello(
        "r1", pid=42, topics=0, topic_names=("a",)
    )


# -- building invalid messages ------------------------------------------------------


# The arg-type ignores below mark the values of the wrong type passed on
# purpose: the constructors must refuse what the annotations already forbid.
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Hello("no spaces", pid=1), "Failed to build a Hello since the instance name"),
        (lambda: Hello("r", pid=True), "Failed to build a Hello since the pid must be an int"),
        (lambda: Hello("r", pid=1, start=7), "start 7 is not one of"),  # type: ignore[arg-type]
        (lambda: Welcome(1, 8, 64, 4, 4, 0, 512, PolicyCode.BLOCK, 0), "reader index 4"),
        (lambda: Welcome(1, 8, 64, 4, 0, 0, 512, PolicyCode.BLOCK, 0, resumed=1), "must be a bool"),  # type: ignore[arg-type]
        (lambda: Refuse(RefuseCode.BUSY, "x" * (MAX_REASON + 1)), "more than 1024"),
        (lambda: Refuse(RefuseCode.BUSY, "\ud800"), "lone surrogate"),
        (lambda: Detach(9), "detach code 9 is not one of"),  # type: ignore[arg-type]
        (lambda: Publish(-1, b""), "the topic -1 is outside 0..63"),
        (lambda: Publish(0, "text"), "the payload must be bytes, not str"),  # type: ignore[arg-type]
        (lambda: PublishAck(U64_MAX + 1), "sequence number"),
        (
            lambda: Hello("r", pid=1, topics=0),
            "the topic mask 0 is outside 1..18446744073709551615",
        ),
        (lambda: Hello("r", pid=1, topic_names="ticks"), "must be a tuple of names, not str"),  # type: ignore[arg-type]
        (
            lambda: Hello("r", pid=1, topic_names=tuple(f"t{i}" for i in range(65))),
            "65 topic names",
        ),
        (
            lambda: Welcome(1, 8, 64, 4, 0, 0, 512, PolicyCode.BLOCK, 0, topics={"a": 1, "b": 1}),  # type: ignore[arg-type]
            "topics 'a' and 'b' both have id 1",
        ),
    ],
)
def test_building_an_invalid_message_fails(build: object, message: str) -> None:
    """Constructors refuse impossible field values with ProtocolError: nothing invalid is sent."""
    assert callable(build)
    with pytest.raises(ProtocolError) as exc:
        build()
    assert message in str(exc.value)


def test_enum_fields_are_normalised() -> None:
    """Plain ints given for enum fields become the enum members."""
    # The ignores: plain ints and a bytearray, which the annotations do not
    # admit, on purpose (what a decoder or a careless caller hands over).
    hello = Hello("r", pid=1, start=2, last_generation=1)  # type: ignore[arg-type]
    assert hello.start is StartCode.RESUME
    assert Refuse(4).code is RefuseCode.TABLE_FULL  # type: ignore[arg-type]
    assert Publish(1, bytearray(b"ab")).payload == b"ab"  # type: ignore[arg-type]


@settings(max_examples=500)
@given(
    st.text(max_size=2000)
    | st.binary(max_size=600).map(
        lambda b: b.decode("utf-16-le", "surrogatepass" if len(b) % 2 == 0 else "replace")
    )
)
def test_safe_reason_makes_any_text_a_valid_reason(text: str) -> None:
    """safe_reason() turns any text into a reason Refuse accepts, leaving valid reasons alone."""
    reason = safe_reason(text)
    assert Refuse(RefuseCode.BAD_MESSAGE, reason).reason == reason
    if text.isprintable() and len(text.encode("utf-8", "surrogatepass")) <= MAX_REASON:
        assert reason == text


def test_safe_reason_escapes_and_cuts() -> None:
    """safe_reason() escapes control characters like repr() and cuts on a character boundary."""
    assert safe_reason("bad\nline\x1b[0m") == "bad\\nline\\x1b[0m"
    assert safe_reason("é" * 600) == "é" * (MAX_REASON // 2)
    assert safe_reason("x" + "é" * 600) == "x" + "é" * ((MAX_REASON - 1) // 2)


# -- topic maps ---------------------------------------------------------------------


def test_a_topic_map_resolves_names_and_ids() -> None:
    """TopicMap resolves names, ids and digit strings, names ids, and builds masks."""
    topics = TopicMap({"ticks": 3, "frames": 1})
    assert list(topics) == ["frames", "ticks"]  # id order
    assert topics.resolve("ticks") == 3 and topics.resolve(5) == 5 and topics.resolve("7") == 7
    assert topics.name(3) == "ticks" and topics.name(4) is None
    assert topics.label(1) == "frames" and topics.label(9) == "9"
    assert topics.mask(["ticks", 0]) == 0b1001
    assert topics.names_in(0b1011) == ("frames", "ticks")
    assert topics == {"ticks": 3, "frames": 1} and hash(topics) == hash(
        TopicMap({"frames": 1, "ticks": 3})
    )
    assert NO_TOPICS == {} and not NO_TOPICS


def test_an_unknown_topic_name_lists_the_known_ones() -> None:
    """resolve() of a name the map lacks raises UnknownTopic naming the bus's names."""
    with pytest.raises(
        UnknownTopic, match=r"^unknown topic 'foo' \(this bus has: frames, ticks\)$"
    ):
        TopicMap({"ticks": 3, "frames": 1}).resolve("foo")
    with pytest.raises(UnknownTopic, match=r"this bus names no topics"):
        NO_TOPICS.resolve("foo")
    with pytest.raises(TopicError, match=r"ids are 0\.\.63"):
        NO_TOPICS.resolve(64)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ({"Ticks": 1}, "does not match"),
        ({"a": 64}, r"outside 0\.\.63"),
        ([("a", 1), ("a", 2)], "'a' is given twice"),
        ({"a": 1, "b": 1}, "both have id 1"),
    ],
)
def test_an_impossible_topic_map_is_refused(pairs: object, message: str) -> None:
    """TopicMap refuses bad names, ids out of range, and names or ids given twice."""
    with pytest.raises(Invalid, match=message):
        TopicMap(pairs)  # type: ignore[arg-type]


# -- fuzzing ------------------------------------------------------------------------


@settings(max_examples=3000)
@given(st.binary(max_size=120), st.integers(0, 4))
def test_random_bytes_raise_only_protocol_error(body: bytes, n_fds: int) -> None:
    """Random bodies raise ProtocolError or decode to a message re-encoding to the same bytes."""
    try:
        msg = decode(body, n_fds)
    except ProtocolError:
        return
    assert msg.encode() == body
    assert n_fds == msg.N_FDS


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, int]:
    msg = draw(messages)
    body = bytearray(msg.encode())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, len(body)))
        if op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif body and pos < len(body):
            if op == "flip":
                body[pos] ^= draw(st.integers(1, 255))
            else:
                del body[pos]
    return bytes(body), msg.N_FDS


@settings(max_examples=3000)
@given(mutated())
def test_mutated_bodies_raise_only_protocol_error(case: tuple[bytes, int]) -> None:
    """Bodies with bytes flipped, inserted or deleted raise ProtocolError or decode exactly."""
    body, n_fds = case
    try:
        msg = decode(body, n_fds)
    except ProtocolError as exc:
        assert str(exc).startswith("Failed to decode a ")
        return
    assert msg.encode() == body
