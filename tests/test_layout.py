"""shmd.bus.layout: geometry rules, header encoding and validation, reader entries."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from shmd.bus.layout import (
    _HEAD,
    ALL_TOPICS,
    HEADER_FIELDS_END,
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    MAX_CAPACITY,
    MAX_READERS,
    MAX_SEGMENT,
    MAX_SLOT_SIZE,
    NAME_MAX,
    OFF_ACTIVE,
    OFF_CAPACITY,
    OFF_MAGIC,
    OFF_MUTEX,
    OFF_READERS,
    OFF_RESERVE_SEQ,
    OFF_SEM,
    OFF_SLEEP_COUNT,
    OFF_VERSION,
    OFF_WRITE_SEQ,
    PAGE_SIZE,
    R_SLEEP_SEQ,
    R_WAKE_SEQ,
    READER_ENTRY_SIZE,
    REC_PAYLOAD,
    REC_SEQ,
    REC_TIMESTAMP,
    REC_TOPIC,
    RECORD_HEADER,
    RECORD_HEADER_FIELDS,
    RECORD_HEADER_SIZE,
    TOPIC_MAX,
    Geometry,
    Header,
    Policy,
    ReaderState,
    Record,
    decode_entry,
    decode_header,
    decode_record_header,
    encode_header,
    encode_name,
    encode_record_header,
    entry_offset,
    topic_mask,
    validate_header,
)
from shmd.errors import GeometryError, SegmentLayoutError

U64 = (1 << 64) - 1
seqs = st.integers(0, 1 << 62)
capacities = st.integers(1, 24).map(lambda e: 1 << e)
slot_sizes = st.integers(RECORD_HEADER_SIZE // 8 + 1, 1 << 14).map(lambda w: w * 8)
reader_counts = st.integers(1, MAX_READERS)


def small_geometry() -> st.SearchStrategy[Geometry]:
    """Valid geometries whose ring stays within MAX_SEGMENT."""
    return (
        st.tuples(capacities, slot_sizes, reader_counts)
        .filter(lambda t: t[0] * t[1] <= MAX_SEGMENT)
        .map(lambda t: Geometry(*t))
    )


# -- Geometry ------------------------------------------------------------------------


@given(small_geometry())
def test_geometry_sizes_are_page_aligned_and_fit(g: Geometry) -> None:
    """Every valid geometry lays out page-aligned parts large enough for table and ring."""
    assert g.control_size % PAGE_SIZE == 0
    assert g.control_size >= HEADER_SIZE + g.max_readers * READER_ENTRY_SIZE
    assert g.ring_offset == g.control_size
    assert g.ring_size % PAGE_SIZE == 0
    assert g.ring_size >= g.capacity * g.slot_size
    assert g.segment_size == g.ring_offset + g.ring_size
    assert g.max_payload == g.slot_size - RECORD_HEADER_SIZE > 0


@given(
    st.integers(-(1 << 40), 1 << 40).filter(lambda c: not (2 <= c <= MAX_CAPACITY) or c & (c - 1))
)
def test_geometry_rejects_bad_capacity(capacity: int) -> None:
    """A capacity that is not a power of two in range raises GeometryError naming it."""
    with pytest.raises(GeometryError, match=f"capacity {capacity} is not a power of two"):
        Geometry(capacity, 64, 1)


@given(
    st.integers(-(1 << 40), 1 << 40).filter(
        lambda s: s % 8 or not RECORD_HEADER_SIZE + 8 <= s <= MAX_SLOT_SIZE
    )
)
def test_geometry_rejects_bad_slot_size(slot_size: int) -> None:
    """A slot size that is unaligned, too small for a header or absurd raises GeometryError."""
    with pytest.raises(GeometryError, match=f"slot size {slot_size} is not a multiple of 8"):
        Geometry(8, slot_size, 1)


@pytest.mark.parametrize("readers", [0, -1, MAX_READERS + 1])
def test_geometry_rejects_bad_reader_count(readers: int) -> None:
    """A reader table of zero or more than MAX_READERS entries raises GeometryError."""
    with pytest.raises(GeometryError, match=f"max_readers {readers} is not between 1"):
        Geometry(8, 64, readers)


@pytest.mark.parametrize("field", ["capacity", "slot_size", "max_readers"])
@pytest.mark.parametrize("value", [True, 8.0, "8", None])
def test_geometry_rejects_non_int_fields(field: str, value: object) -> None:
    """Booleans, floats, strings and None are refused even where their value would fit."""
    args: dict[str, object] = {"capacity": 8, "slot_size": 64, "max_readers": 1, field: value}
    with pytest.raises(GeometryError):
        Geometry(**args)  # type: ignore[arg-type]


def test_geometry_rejects_a_ring_larger_than_max_segment() -> None:
    """Capacity times slot size above MAX_SEGMENT is refused with both numbers in the message."""
    with pytest.raises(GeometryError, match=r"capacity 16777216 x slot size 2048"):
        Geometry(MAX_CAPACITY, 2048, 1)


def test_geometry_smallest_is_two_pages() -> None:
    """The smallest geometry is one control page and one ring page."""
    g = Geometry(2, RECORD_HEADER_SIZE + 8, 1)
    assert (g.control_size, g.ring_size, g.segment_size) == (PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE)
    assert g.max_payload == 8


# -- header ---------------------------------------------------------------------------


def test_layout_offsets_match_the_struct() -> None:
    """The named offsets are where the header struct puts its fields, and areas do not overlap."""
    g = Geometry(16, 128, 4)
    raw = encode_header(
        g, generation=5, writer_pid=42, policy=Policy.BLOCK, created_ns=1, write_seq=1000
    )
    assert raw[OFF_MAGIC : OFF_MAGIC + 8] == MAGIC
    assert struct.unpack_from("<I", raw, OFF_VERSION)[0] == LAYOUT_VERSION
    assert struct.unpack_from("<I", raw, OFF_ACTIVE)[0] == 1
    assert struct.unpack_from("<I", raw, OFF_CAPACITY)[0] == 16
    assert struct.unpack_from("<Q", raw, OFF_WRITE_SEQ)[0] == 1000
    assert struct.unpack_from("<Q", raw, OFF_RESERVE_SEQ)[0] == 1000
    assert struct.unpack_from("<I", raw, OFF_SLEEP_COUNT)[0] == 0
    assert len(raw) == HEADER_FIELDS_END <= OFF_MUTEX < OFF_SEM < OFF_READERS == HEADER_SIZE
    for off in (OFF_WRITE_SEQ, OFF_RESERVE_SEQ):
        assert off % 8 == 0  # single-copy atomic u64 loads and stores


@given(
    small_geometry(),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 32) - 1),
    st.sampled_from(Policy),
    st.integers(0, (1 << 63)),
)
def test_header_round_trip(
    g: Geometry, generation: int, pid: int, policy: Policy, write_seq: int
) -> None:
    """A header encoded for a geometry decodes to the same fields and validates to it."""
    raw = encode_header(
        g, generation=generation, writer_pid=pid, policy=policy, created_ns=123, write_seq=write_seq
    )
    h = decode_header(raw)
    assert (h.magic, h.version, h.generation, h.writer_pid, h.active) == (
        MAGIC,
        LAYOUT_VERSION,
        generation,
        pid,
        True,
    )
    assert (h.capacity, h.slot_size, h.max_readers, h.policy) == (
        g.capacity,
        g.slot_size,
        g.max_readers,
        policy,
    )
    assert h.write_seq == h.reserve_seq == write_seq
    assert validate_header(h, g.segment_size) == g


@given(st.binary(max_size=HEADER_FIELDS_END * 2), st.integers(0, 1 << 40))
def test_random_bytes_only_raise_segment_layout_error(raw: bytes, actual_size: int) -> None:
    """Arbitrary bytes as a header give SegmentLayoutError or a geometry that fits, nothing else."""
    try:
        g = validate_header(decode_header(raw), actual_size)
    except SegmentLayoutError:
        return
    assert g.segment_size <= actual_size


u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


_FIELD_VALUES = {
    "magic": st.binary(min_size=8, max_size=8),
    "version": u32,
    "control_size": u32,
    "capacity": u32,
    "slot_size": u32,
    "policy": u32,
    "max_readers": u32,
    "ring_offset": u64,
    "segment_size": u64,
    "write_seq": u64,
    "reserve_seq": u64,
}


@st.composite
def corrupted_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid header with random fields replaced, and a segment size near the right one."""
    g = draw(small_geometry())
    write_seq = draw(st.integers(0, 1 << 62))
    h = decode_header(
        encode_header(
            g, generation=1, writer_pid=1, policy=Policy.BLOCK, created_ns=0, write_seq=write_seq
        )
    )
    h = dataclasses.replace(h, reserve_seq=write_seq + draw(st.integers(0, 8)))
    corrupt = draw(st.sets(st.sampled_from(sorted(_FIELD_VALUES))))
    h = dataclasses.replace(
        h,
        **{
            f: draw(_FIELD_VALUES[f], label=f)  # type: ignore[arg-type]
            for f in sorted(corrupt)
        },
    )
    raw = _HEAD.pack(*(getattr(h, f.name) for f in dataclasses.fields(Header)))
    return raw, max(0, g.segment_size + draw(st.integers(-2 * PAGE_SIZE, 2 * PAGE_SIZE)))


@given(corrupted_headers())
def test_corrupted_headers_are_validated_without_overreach(case: tuple[bytes, int]) -> None:
    """A valid header with random fields corrupted gives SegmentLayoutError or a true geometry."""
    raw, actual = case
    try:
        got = validate_header(decode_header(raw), actual)
    except SegmentLayoutError as exc:
        assert str(exc).startswith("Failed to attach since")
        event("rejected")
        return
    event("accepted")
    back = decode_header(raw)
    assert back.magic == MAGIC and back.version == LAYOUT_VERSION and back.policy in (0, 1)
    assert (back.control_size, back.ring_offset, back.segment_size) == (
        got.control_size,
        got.ring_offset,
        got.segment_size,
    )
    assert got.segment_size <= actual
    assert 0 <= back.reserve_seq - back.write_seq <= got.capacity


def _valid_header(**changes: object) -> Header:
    g = Geometry(8, 64, 2)
    h = decode_header(
        encode_header(
            g, generation=1, writer_pid=1, policy=Policy.DROP_OLDEST, created_ns=0, write_seq=100
        )
    )
    return dataclasses.replace(h, **changes)  # type: ignore[arg-type]


SIZE = Geometry(8, 64, 2).segment_size


@pytest.mark.parametrize(
    ("changes", "actual", "message"),
    [
        ({"magic": b"NOTSHMD!"}, SIZE, r"magic is b'NOTSHMD!', not b'SHMDBUS1' \(not an shmd"),
        ({"version": 1}, SIZE, r"layout version 1, and this shmd reads version 2"),
        ({"capacity": 0}, SIZE, r"header is corrupt: .*capacity 0"),
        ({"slot_size": 12}, SIZE, r"header is corrupt: .*slot size 12"),
        ({"policy": 7}, SIZE, r"policy 7 is unknown"),
        ({"segment_size": SIZE * 2}, SIZE, r"sizes \(control, ring offset, total\)"),
        ({}, SIZE - 1, rf"segment is {SIZE - 1} bytes but its header claims {SIZE}"),
        ({"reserve_seq": 99}, SIZE, r"counters are inconsistent \(write 100, reserve 99\)"),
        ({"reserve_seq": 109}, SIZE, r"counters are inconsistent \(write 100, reserve 109\)"),
    ],
)
def test_validate_header_names_what_is_wrong(
    changes: dict[str, object], actual: int, message: str
) -> None:
    """Each kind of bad header gives SegmentLayoutError saying what is wrong with which value."""
    with pytest.raises(SegmentLayoutError, match=message):
        validate_header(_valid_header(**changes), actual)


def test_validate_header_accepts_a_reservation_of_a_full_ring() -> None:
    """reserve_seq may lead write_seq by up to capacity (a batch of a whole ring in flight)."""
    assert validate_header(_valid_header(reserve_seq=108), SIZE) == Geometry(8, 64, 2)


def test_decode_header_of_a_short_buffer() -> None:
    """Fewer bytes than the header fields raise SegmentLayoutError, not struct.error."""
    with pytest.raises(SegmentLayoutError, match="only 10 bytes are there"):
        decode_header(b"\0" * 10)


# -- records -------------------------------------------------------------------------


@given(seqs, st.integers(0, U64), st.integers(0, (1 << 32) - 1), st.integers(0, TOPIC_MAX))
def test_record_header_round_trip(seq: int, ts: int, length: int, topic: int) -> None:
    """A record header encodes to 32 bytes and decodes to the same fields."""
    raw = encode_record_header(seq, ts, length, topic)
    assert len(raw) == RECORD_HEADER_SIZE
    assert decode_record_header(b"pad" + raw, 3) == (seq, ts, length, topic)


def test_record_row_indices_follow_record_fields() -> None:
    """REC_SEQ, REC_TIMESTAMP, REC_TOPIC and REC_PAYLOAD are Record's field positions."""
    fields = Record._fields
    assert tuple(fields.index(f) for f in ("seq", "timestamp_ns", "topic", "payload")) == (
        REC_SEQ,
        REC_TIMESTAMP,
        REC_TOPIC,
        REC_PAYLOAD,
    )
    assert len(fields) == 4


def test_record_structs_are_built_from_the_field_list() -> None:
    """The header struct and its decoder agree with RECORD_HEADER_FIELDS."""
    names = [name for name, _ in RECORD_HEADER_FIELDS]
    assert names[:4] == ["seq", "timestamp_ns", "length", "topic"]
    assert RECORD_HEADER.size == RECORD_HEADER_SIZE == 32
    packed = encode_record_header(9, 8, 5, 7) + b"hello"
    assert decode_record_header(packed) == (9, 8, 5, 7)
    assert RECORD_HEADER.unpack_from(packed) == (9, 8, 5, 7, 0, 0)


# -- reader entries, names, topics, policy --------------------------------------------


@given(st.binary(min_size=READER_ENTRY_SIZE, max_size=READER_ENTRY_SIZE))
def test_decode_entry_never_raises(raw: bytes) -> None:
    """Any entry bytes decode: unknown states read as FREE and bad UTF-8 is replaced."""
    buf = bytes(OFF_READERS) + raw
    e = decode_entry(buf, 0)
    assert isinstance(e.state, ReaderState)
    assert len(e.name.encode()) <= 32 * 3


def test_entry_round_trip_through_the_table_offsets() -> None:
    """Fields stored at an entry's offsets decode back from decode_entry."""
    buf = bytearray(OFF_READERS + 3 * READER_ENTRY_SIZE)
    off = entry_offset(2)
    assert off == OFF_READERS + 2 * READER_ENTRY_SIZE
    struct.pack_into(
        "<IIQQQQIIQQ32sQ", buf, off, 1, 77, 10, 9, 1, 5, 1, 0, 0b110, 3, encode_name("reader-1"), 4
    )
    e = decode_entry(bytes(buf), 2)
    assert (
        e.index,
        e.state,
        e.pid,
        e.cursor,
        e.delivered,
        e.lost,
        e.asleep,
        e.topics,
        e.name,
        e.token,
    ) == (2, ReaderState.ATTACHED, 77, 10, 9, 1, True, 0b110, "reader-1", 4)


@pytest.mark.parametrize(
    ("sleep_seq", "wake_seq", "asleep"),
    [(0, 0, False), (1, 0, True), (7, 7, False), (0, 0xFFFFFFFF, True)],
)
def test_entry_is_asleep_while_its_announcement_is_unanswered(
    sleep_seq: int,
    wake_seq: int,
    asleep: bool,
) -> None:
    """An entry reads as asleep exactly while sleep_seq differs from wake_seq."""
    buf = bytearray(OFF_READERS + READER_ENTRY_SIZE)
    struct.pack_into("<II", buf, entry_offset(0) + R_SLEEP_SEQ, sleep_seq, wake_seq)
    assert decode_entry(bytes(buf), 0).asleep is asleep
    assert R_WAKE_SEQ == R_SLEEP_SEQ + 4


@pytest.mark.parametrize("name", ["", "x" * (NAME_MAX + 1), "a\0b", "é" * 16])
def test_encode_name_rejects_bad_names(name: str) -> None:
    """Empty, over-long (in UTF-8 bytes) or NUL-containing reader names raise ValueError."""
    with pytest.raises(ValueError, match="must be 1 to 31 bytes"):
        encode_name(name)


def test_encode_name_pads_to_32_bytes() -> None:
    """A name of NAME_MAX bytes fits with its NUL terminator."""
    assert encode_name("x" * NAME_MAX) == b"x" * NAME_MAX + b"\0"


def test_topic_mask() -> None:
    """Topic lists become bit masks; None and "all" mean every topic."""
    assert topic_mask(None) == topic_mask("all") == ALL_TOPICS
    assert topic_mask([0, 5, 63]) == 1 | 1 << 5 | 1 << 63
    assert topic_mask([]) == 0


@pytest.mark.parametrize("bad", [64, -1, True, "1"])
def test_topic_mask_rejects_bad_topics(bad: object) -> None:
    """Topics outside 0..63 or not ints raise ValueError naming the topic."""
    with pytest.raises(ValueError, match=f"topic {bad!r} is not between 0 and 63"):
        topic_mask([bad])


def test_policy_parse_and_label() -> None:
    """Policies parse from the configuration's spelling and print back the same way."""
    assert Policy.parse("drop-oldest") is Policy.DROP_OLDEST
    assert Policy.parse("BLOCK") is Policy.BLOCK
    assert [p.label for p in Policy] == ["drop-oldest", "block"]
    with pytest.raises(ValueError, match="unknown overrun policy 'fifo'"):
        Policy.parse("fifo")
