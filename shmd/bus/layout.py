"""The segment's byte layout (docs/PROTOCOL.md, "Segment layout", is the spec).

Pure data: offsets, sizes, struct formats and the checks that decide whether
a header describes a segment this version can use.  No syscalls here.

A segment is two page-aligned parts of one shm object::

    [0, control_size)                 control part: header, mutex, semaphore,
                                      reader table (mapped read-write by all)
    [ring_offset, segment_size)       the ring: capacity x slot_size bytes
                                      (read-write for the writer, read-only
                                      for readers)

All integers are little-endian (the segment never leaves the machine, but
the spec is explicit so that another language can read it).
"""

from __future__ import annotations

import enum
import mmap
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from shmd._sys.libc import MUTEX_AREA, SEM_AREA
from shmd.errors import GeometryError, SegmentLayoutError

MAGIC = b"SHMDBUS1"
LAYOUT_VERSION = 2
PAGE_SIZE = mmap.PAGESIZE

# -- header (offset 0) --------------------------------------------------------
# Field offsets, each naturally aligned so that the 8-byte counters are
# single-copy atomic loads and stores on every 64-bit CPU.
OFF_MAGIC = 0  #: 8 bytes, "SHMDBUS1"
OFF_VERSION = 8  #: u32 layout version
OFF_CONTROL_SIZE = 12  #: u32 bytes of the control part (page multiple)
OFF_GENERATION = 16  #: u64, new for every segment a writer creates
OFF_WRITER_PID = 24  #: u32
OFF_ACTIVE = 28  #: u32, 1 while the writer publishes; 0 = shut down
OFF_CAPACITY = 32  #: u32 slots (power of two)
OFF_SLOT_SIZE = 36  #: u32 bytes per slot, record header included
OFF_POLICY = 40  #: u32, Policy
OFF_MAX_READERS = 44  #: u32 entries in the reader table
OFF_CREATED_NS = 48  #: u64 CLOCK_REALTIME ns at creation
OFF_RING_OFFSET = 56  #: u64
OFF_SEGMENT_SIZE = 64  #: u64
OFF_WRITE_SEQ = 72  #: u64: records with seq < write_seq are committed
OFF_RESERVE_SEQ = 80  #: u64: the writer may be writing seqs in [write_seq, reserve_seq)
OFF_WRITER_WAITING = 88  #: u32: the writer sleeps on the semaphore (block policy)
#: u32, bumped (under the mutex) by every reader announcing a sleep; the writer only
#: compares it with the value it saw last, to know when to look at the entries
OFF_SLEEP_COUNT = 92
OFF_BYTES_PUBLISHED = 96  #: u64 payload bytes committed
OFF_HEARTBEAT_NS = 104  #: u64 CLOCK_MONOTONIC ns of the writer's last status tick
HEADER_FIELDS_END = 112
#: u64: the writer's measured publish rate in milli-records/s, updated at each status tick
#: (outside the decoded header struct: tools read it with Segment.rate)
OFF_RATE_MILLI = 112
OFF_MUTEX = 128  #: MUTEX_AREA bytes: pthread_mutex_t (robust, process-shared)
OFF_SEM = OFF_MUTEX + MUTEX_AREA  #: SEM_AREA bytes: sem_t (process-shared)
OFF_READERS = 256  #: the reader table starts here
HEADER_SIZE = OFF_READERS

_HEAD = struct.Struct("<8sIIQIIIIIIQQQQQIIQQ")
assert _HEAD.size == HEADER_FIELDS_END
assert OFF_SEM + SEM_AREA <= OFF_READERS

# -- reader table entry -----------------------------------------------------------
READER_ENTRY_SIZE = 128
R_STATE = 0  #: u32, ReaderState
R_PID = 4  #: u32
R_CURSOR = 8  #: u64: next seq this reader will read
R_DELIVERED = 16  #: u64
R_LOST = 24  #: u64
R_LAST_ACTIVE_NS = 32  #: u64 CLOCK_MONOTONIC
#: u32, written by the reader only: bumped to announce that it goes to sleep in epoll
R_SLEEP_SEQ = 40
#: u32, written by the writer only: set to sleep_seq when it writes the reader's eventfd.
#: The reader is asleep (wants an eventfd write) while sleep_seq != wake_seq.
R_WAKE_SEQ = 44
R_TOPICS = 48  #: u64 subscription mask: bit t = topic t
R_ATTACHED_NS = 56  #: u64 CLOCK_MONOTONIC
R_NAME = 64  #: 32 bytes UTF-8, NUL padded
R_TOKEN = 96  #: u64, incremented every time the entry is taken
#: u32, written by the writer from the Hello: how the reader waits (shmd.bus.wait.WaitCode)
R_WAIT = 104
#: u32, written by the writer from the Hello: a durable reader's grace in ms (0: not durable),
#: how long the writer keeps the entry after the reader's process went (DORMANT)
R_DURABLE_MS = 108
#: u64, written by a durable reader only: the seq after the last record it handed to its
#: application (the records in [cursor, taken) are delivered again to its next process)
R_TAKEN = 112
#: u64, written by the writer: records handed back to new processes of this durable reader
R_REDELIVERED = 120
NAME_MAX = 31

_ENTRY = struct.Struct("<IIQQQQIIQQ32sQIIQQ")
assert _ENTRY.size == READER_ENTRY_SIZE

# Word indices of the entry's fields, relative to ``Segment.entry_words(i)``:
# ``seg.u[u0 + RU_STATE]`` is entry i's state, ``seg.q[q0 + RQ_CURSOR]`` its
# cursor (``u`` and ``q`` are the control part as u32 and u64 words).
RU_STATE = R_STATE // 4
RU_PID = R_PID // 4
RU_SLEEP_SEQ = R_SLEEP_SEQ // 4
RU_WAKE_SEQ = R_WAKE_SEQ // 4
RU_WAIT = R_WAIT // 4
RQ_CURSOR = R_CURSOR // 8
RQ_DELIVERED = R_DELIVERED // 8
RQ_LOST = R_LOST // 8
RQ_LAST_ACTIVE_NS = R_LAST_ACTIVE_NS // 8
RQ_TOPICS = R_TOPICS // 8
RQ_ATTACHED_NS = R_ATTACHED_NS // 8
RQ_TOKEN = R_TOKEN // 8
RU_DURABLE_MS = R_DURABLE_MS // 4
RQ_TAKEN = R_TAKEN // 8
RQ_REDELIVERED = R_REDELIVERED // 8


class ReaderState(enum.IntEnum):
    """Life of a reader-table entry."""

    FREE = 0
    ATTACHED = 1
    #: The writer evicted this reader (block policy timeout); the reader exits.
    EVICTED = 2
    #: A durable reader's process went; the writer keeps the entry (its cursor
    #: holds the ring under block) until a new process of it attaches or its
    #: grace ends.
    DORMANT = 3


class Policy(enum.IntEnum):
    """What the writer does when the ring is full for the slowest reader."""

    DROP_OLDEST = 0
    BLOCK = 1

    @classmethod
    def parse(cls, text: str) -> Policy:
        """From the configuration's spelling, ``drop-oldest`` or ``block``."""
        try:
            return cls[text.upper().replace("-", "_")]
        except KeyError:
            raise ValueError(f"unknown overrun policy {text!r} (drop-oldest or block)") from None

    @property
    def label(self) -> str:
        """The configuration's spelling."""
        return self.name.lower().replace("_", "-")


# -- records --------------------------------------------------------------------------
#: The record header, the one definition of it: each field's name and struct
#: code, in slot order.  Every struct below (and so every write and read path)
#: is built from this at import; adding a field is a line here, a
#: LAYOUT_VERSION bump and docs/PROTOCOL.md.
#: seq u64, timestamp ns u64 (CLOCK_MONOTONIC), length u32, topic u32, flags u32, reserved u32
RECORD_HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("seq", "Q"),
    ("timestamp_ns", "Q"),
    ("length", "I"),
    ("topic", "I"),
    ("flags", "I"),
    ("reserved", "I"),
)
_HEADER_CODES = "".join(code for _, code in RECORD_HEADER_FIELDS)
#: The fields a reader decodes: flags and reserved are written zero and read by no one.
_READ_CODES = "".join(c for name, c in RECORD_HEADER_FIELDS if name not in ("flags", "reserved"))

#: The whole header, as the writer packs it.
RECORD_HEADER = struct.Struct("<" + _HEADER_CODES)
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 32
#: (seq, timestamp_ns, length, topic): the prefix of the header a record's reader needs.
_READ_HEADER = struct.Struct("<" + _READ_CODES)
TOPIC_MAX = 63


def encode_record_header(seq: int, timestamp_ns: int, length: int, topic: int) -> bytes:
    """The 32 bytes at the start of a slot."""
    return RECORD_HEADER.pack(seq, timestamp_ns, length, topic, 0, 0)


def decode_record_header(buf: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """(seq, timestamp_ns, length, topic) of the record at ``offset``."""
    seq, ts, length, topic = _READ_HEADER.unpack_from(buf, offset)
    return seq, ts, length, topic


class Record(NamedTuple):
    """One record as a reader receives it."""

    seq: int
    timestamp_ns: int
    topic: int
    #: bytes (copying reads) or a read-only memoryview into the ring
    #: (zero-copy reads: check ``Subscriber.still_valid`` after use).
    payload: bytes | memoryview


#: A record as ``Subscriber.read_batch`` returns it, a plain tuple in
#: :class:`Record`'s order: (seq, timestamp_ns, topic, payload).
RawRecord = tuple[int, int, int, bytes | memoryview]

#: Where each field sits in a record row (a :class:`Record` or a
#: :data:`RawRecord`): ``row[REC_PAYLOAD]`` rather than ``row[3]``.  Literals,
#: so that a type checker knows each field's type (tests/test_layout.py
#: keeps them equal to Record's order).
REC_SEQ: Final = 0
REC_TIMESTAMP: Final = 1
REC_TOPIC: Final = 2
REC_PAYLOAD: Final = 3

ALL_TOPICS = (1 << 64) - 1

MAX_CAPACITY = 1 << 24
MAX_SLOT_SIZE = 1 << 30
MAX_SEGMENT = 1 << 34  # 16 GiB
MAX_READERS = 1024


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes that fix a segment's layout."""

    capacity: int
    slot_size: int
    max_readers: int

    def __post_init__(self) -> None:
        c, s, r = self.capacity, self.slot_size, self.max_readers
        if (
            isinstance(c, bool)
            or not isinstance(c, int)
            or not 2 <= c <= MAX_CAPACITY
            or c & (c - 1)
        ):
            raise GeometryError(
                f"Failed to lay out the segment since capacity {c!r} is not a power of two "
                f"between 2 and {MAX_CAPACITY}"
            )
        if (
            isinstance(s, bool)
            or not isinstance(s, int)
            or s % 8
            or not (RECORD_HEADER_SIZE + 8 <= s <= MAX_SLOT_SIZE)
        ):
            raise GeometryError(
                f"Failed to lay out the segment since slot size {s!r} is not a multiple of 8 "
                f"between {RECORD_HEADER_SIZE + 8} (record header {RECORD_HEADER_SIZE} bytes "
                f"+ 8) and {MAX_SLOT_SIZE}"
            )
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_READERS:
            raise GeometryError(
                f"Failed to lay out the segment since max_readers {r!r} is not between 1 "
                f"and {MAX_READERS}"
            )
        if c * s > MAX_SEGMENT:
            raise GeometryError(
                f"Failed to lay out the segment since its ring would take {c * s} bytes "
                f"(capacity {c} x slot size {s}), more than {MAX_SEGMENT}"
            )

    @property
    def control_size(self) -> int:
        """Bytes of the control part, rounded up to whole pages."""
        return _round_up(HEADER_SIZE + self.max_readers * READER_ENTRY_SIZE, PAGE_SIZE)

    @property
    def ring_offset(self) -> int:
        """Where the ring starts (page aligned, so it can be mapped on its own)."""
        return self.control_size

    @property
    def ring_size(self) -> int:
        """Bytes of the ring (a page multiple: slots are 8-aligned, capacity a power of two)."""
        return _round_up(self.capacity * self.slot_size, PAGE_SIZE)

    @property
    def segment_size(self) -> int:
        """Total bytes of the shm object."""
        return self.ring_offset + self.ring_size

    @property
    def max_payload(self) -> int:
        """The largest payload one record can carry."""
        return self.slot_size - RECORD_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded segment header."""

    magic: bytes
    version: int
    control_size: int
    generation: int
    writer_pid: int
    active: bool
    capacity: int
    slot_size: int
    policy: int
    max_readers: int
    created_ns: int
    ring_offset: int
    segment_size: int
    write_seq: int
    reserve_seq: int
    writer_waiting: int
    sleep_count: int
    bytes_published: int
    heartbeat_ns: int


def encode_header(
    geometry: Geometry,
    *,
    generation: int,
    writer_pid: int,
    policy: Policy,
    created_ns: int,
    write_seq: int = 0,
) -> bytes:
    """The header bytes a writer stores at offset 0 of a new segment (active = 1)."""
    return _HEAD.pack(
        MAGIC,
        LAYOUT_VERSION,
        geometry.control_size,
        generation,
        writer_pid,
        1,
        geometry.capacity,
        geometry.slot_size,
        int(policy),
        geometry.max_readers,
        created_ns,
        geometry.ring_offset,
        geometry.segment_size,
        write_seq,
        write_seq,
        0,
        0,
        0,
        0,
    )


def decode_header(buf: bytes | memoryview) -> Header:
    """Decode the fixed header fields; does not validate (see :func:`validate_header`)."""
    if len(buf) < HEADER_FIELDS_END:
        raise SegmentLayoutError(
            f"Failed to read the segment header since only {len(buf)} bytes are there "
            f"(the header needs {HEADER_SIZE})"
        )
    f = _HEAD.unpack_from(buf, 0)
    return Header(f[0], f[1], f[2], f[3], f[4], bool(f[5]), *f[6:])


def validate_header(h: Header, actual_size: int) -> Geometry:
    """Check a header against this version's rules and the object's real size.

    A reader maps whatever a header claims, so every size is checked against
    ``actual_size`` (from fstat) before anything is mapped: a corrupt or
    hostile header must give an error, never an out-of-bounds access.
    """
    if h.magic != MAGIC:
        raise SegmentLayoutError(
            f"Failed to attach since the segment's magic is {h.magic!r}, not {MAGIC!r} "
            "(not an shmd segment)"
        )
    if h.version != LAYOUT_VERSION:
        raise SegmentLayoutError(
            f"Failed to attach since the segment has layout version {h.version}, and this "
            f"shmd reads version {LAYOUT_VERSION} (upgrade or restart the other side)"
        )
    try:
        geometry = Geometry(h.capacity, h.slot_size, h.max_readers)
    except GeometryError as exc:
        raise SegmentLayoutError(f"Failed to attach since the header is corrupt: {exc}") from None
    if h.policy not in (0, 1):
        raise SegmentLayoutError(
            f"Failed to attach since the header's policy {h.policy} is unknown"
        )
    expected = (geometry.control_size, geometry.ring_offset, geometry.segment_size)
    claimed = (h.control_size, h.ring_offset, h.segment_size)
    if claimed != expected:
        raise SegmentLayoutError(
            "Failed to attach since the header's sizes (control, ring offset, total) "
            f"{claimed} do not match its geometry {expected}"
        )
    if actual_size < geometry.segment_size:
        raise SegmentLayoutError(
            f"Failed to attach since the segment is {actual_size} bytes but its header "
            f"claims {geometry.segment_size}"
        )
    if h.reserve_seq < h.write_seq or h.reserve_seq - h.write_seq > geometry.capacity:
        raise SegmentLayoutError(
            f"Failed to attach since the header's sequence counters are inconsistent "
            f"(write {h.write_seq}, reserve {h.reserve_seq})"
        )
    return geometry


@dataclass(frozen=True, slots=True)
class ReaderEntry:
    """A decoded reader-table entry."""

    index: int
    state: ReaderState
    pid: int
    cursor: int
    delivered: int
    lost: int
    last_active_ns: int
    #: sleep_seq != wake_seq: announced a sleep the writer has not answered yet
    asleep: bool
    topics: int
    attached_ns: int
    name: str
    token: int
    #: how the reader waits (shmd.bus.wait.WaitCode; 0 sleep)
    wait: int
    #: a durable reader's grace in ms (0: not durable)
    durable_ms: int = 0
    #: a durable reader's taken mark (see R_TAKEN)
    taken: int = 0
    #: records handed back again to new processes of this durable reader
    redelivered: int = 0


def entry_offset(index: int) -> int:
    """Offset of reader-table entry ``index`` in the control part."""
    return OFF_READERS + index * READER_ENTRY_SIZE


def decode_entry(buf: bytes | memoryview, index: int) -> ReaderEntry:
    """Decode one reader-table entry (an unknown state reads as FREE)."""
    f = _ENTRY.unpack_from(buf, entry_offset(index))
    try:
        state = ReaderState(f[0])
    except ValueError:
        state = ReaderState.FREE
    name = f[10].split(b"\0", 1)[0].decode("utf-8", "replace")
    return ReaderEntry(
        index,
        state,
        f[1],
        f[2],
        f[3],
        f[4],
        f[5],
        f[6] != f[7],
        f[8],
        f[9],
        name,
        f[11],
        f[12],
        f[13],
        f[14],
        f[15],
    )


def encode_name(name: str) -> bytes:
    """A reader instance name as stored in its entry (at most 31 UTF-8 bytes)."""
    raw = name.encode()
    if not raw or len(raw) > NAME_MAX or b"\0" in raw:
        raise ValueError(
            f"Failed to use reader name {name!r} since it must be 1 to {NAME_MAX} bytes of UTF-8"
        )
    return raw.ljust(32, b"\0")


def topic_mask(topics: object) -> int:
    """A subscription mask from ``None``/``"all"`` or an iterable of topic ids."""
    if topics is None or topics == "all":
        return ALL_TOPICS
    mask = 0
    for t in topics:  # type: ignore[attr-defined]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= TOPIC_MAX:
            raise ValueError(
                f"Failed to subscribe since topic {t!r} is not between 0 and {TOPIC_MAX}"
            )
        mask |= 1 << t
    return mask
