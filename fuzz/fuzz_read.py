"""Fuzz what a reader reads from a ring that a buggy or hostile writer controls.

The harness is the writer: a real shm segment per geometry (made once per
process, its name unlinked at once, so nothing is left in /dev/shm), whose
counters, reader entry and slots it fills from the input; a real
:class:`~shmd.bus.subscriber.Subscriber` (the compiled ``_core.Reader``)
attaches to it by fd and reads.  Nothing writes while it reads, so a read's
result is exact: :func:`expected` says what it must be (docs/PROTOCOL.md,
"Reading"), and every record must be what its slot holds, with a length
<= slot_size - 32 and a topic <= 63; otherwise the documented errors only
(SegmentLayoutError for a corrupt slot, ReaderEvicted for an entry taken
away).

Input (little-endian): ``flags u8, mode u8, write_seq u64, reserve_seq u64,
cursor u64, topics u64, limit u64``, then the ring's bytes from slot 0
(zero past the input).  flags: bits 0-1 the geometry, 2 copy, 3 hold, 4
stamp every slot's seq with the seq the reader expects there, 5 tame
lengths and topics (to max_payload + 1 and 65), 6 evict the entry between
reads, 7 block policy.  mode: bit 0 writer_waiting, bit 1 counters relative
to the cursor, bit 2 limit as any int64 (else 0..2 x capacity + 1), bits
3-4 how many reads (1-4).

    python -m fuzz read fuzz/corpus/read -max_total_time=60
"""

from __future__ import annotations

import atexit
import os
import struct
from dataclasses import dataclass

from shmd.bus.layout import (
    OFF_POLICY,
    RECORD_HEADER_SIZE,
    RQ_CURSOR,
    RQ_TOKEN,
    RQ_TOPICS,
    RU_STATE,
    TOPIC_MAX,
    Geometry,
    Policy,
    ReaderState,
)
from shmd.bus.segment import Segment
from shmd.bus.subscriber import COPY_BATCH_BYTES, Subscriber
from shmd.errors import ReaderEvicted, SegmentLayoutError

U64 = (1 << 64) - 1
INPUT = struct.Struct("<BBQQQQQ")
#: (capacity, slot_size): the smallest slot, a few big ones (copy_limit < capacity),
#: a ring that defers one-record cursors (capacity >= 64).
GEOMETRIES = ((2, 40), (8, 64), (64, 48), (8, COPY_BATCH_BYTES // 4))
TOKEN = 0x5EED
_RECORD_FIELDS = struct.Struct("<QQII")
_OFF_LENGTH = 16
_OFF_TOPIC = 20
_WRITER_WAITING = Segment.WRITER_WAITING

_segments: dict[int, Segment] = {}


def _segment(which: int) -> Segment:
    """The writer's segment of geometry ``which``, made at first use; closed at exit."""
    seg = _segments.get(which)
    if seg is None:
        capacity, slot = GEOMETRIES[which]
        name = f"/shmd-fuzz-read-{os.getpid()}-{which}"
        seg = Segment.create(name, Geometry(capacity, slot, 1), Policy.DROP_OLDEST)
        Segment.unlink_name(name)  # the fd and mappings keep it; no name is left behind
        _segments[which] = seg
        if len(_segments) == 1:
            atexit.register(close)
    return seg


def close() -> None:
    """Close every segment made so far (their names are gone already)."""
    for seg in _segments.values():
        seg.close()
    _segments.clear()


@dataclass(frozen=True, slots=True)
class Case:
    """One input, decoded."""

    which: int
    copy: bool
    hold: bool
    stamp: bool
    tame: bool
    evict: bool
    block: bool
    writer_waiting: bool
    write_seq: int
    reserve_seq: int
    cursor: int
    topics: int
    limit: int
    reads: int
    ring: bytes


def decode(data: bytes) -> Case:
    """The input's fields (short inputs are padded with zeros)."""
    head = (data[: INPUT.size] + bytes(INPUT.size))[: INPUT.size]
    flags, mode, w, r, cursor, topics, limit_raw = INPUT.unpack(head)
    which = flags & 3
    cap = GEOMETRIES[which][0]
    if mode & 2:
        w = (cursor + w % (2 * cap + 1)) & U64
        r = (w + r % (2 * cap + 1) - cap) & U64
    limit = limit_raw - (1 << 64) if limit_raw >= 1 << 63 else limit_raw
    if not mode & 4:
        limit = limit_raw % (2 * cap + 2)
    return Case(
        which=which,
        copy=bool(flags & 4),
        hold=bool(flags & 8),
        stamp=bool(flags & 16),
        tame=bool(flags & 32),
        evict=bool(flags & 64),
        block=bool(flags & 128),
        writer_waiting=bool(mode & 1),
        write_seq=w,
        reserve_seq=r,
        cursor=cursor,
        topics=topics,
        limit=limit,
        reads=1 + (mode >> 3 & 3),
        ring=data[INPUT.size :],
    )


def _write(seg: Segment, case: Case) -> None:
    """Be the writer: the slots, the counters and the reader's entry."""
    capacity, slot = seg.geometry.capacity, seg.geometry.slot_size
    ring = seg.ring
    size = capacity * slot
    ring[:size] = bytes(size)
    body = case.ring[:size]
    ring[: len(body)] = body
    if case.stamp or case.tame:
        for s in range(case.cursor, case.cursor + capacity):
            off = (s % capacity) * slot
            if case.stamp:
                struct.pack_into("<Q", ring, off, s & U64)
            if case.tame:
                length, topic = struct.unpack_from("<II", ring, off + _OFF_LENGTH)
                struct.pack_into(
                    "<II",
                    ring,
                    off + _OFF_LENGTH,
                    length % (slot - RECORD_HEADER_SIZE + 2),
                    topic % 66,
                )
    q0, u0 = Segment.entry_words(0)
    seg.u[u0 + RU_STATE] = ReaderState.ATTACHED
    seg.q[q0 + RQ_TOKEN] = TOKEN
    seg.q[q0 + RQ_CURSOR] = case.cursor
    seg.q[q0 + RQ_TOPICS] = case.topics
    seg.u[OFF_POLICY // 4] = Policy.BLOCK if case.block else Policy.DROP_OLDEST
    seg.u[_WRITER_WAITING] = int(case.writer_waiting)
    # Attaching validates the counters (write <= reserve <= write + capacity):
    # sane ones now, the input's once the reader is attached.
    seg.q[Segment.WRITE_SEQ] = seg.q[Segment.RESERVE_SEQ] = 0


def _counters(seg: Segment, case: Case) -> None:
    seg.q[Segment.WRITE_SEQ] = case.write_seq
    seg.q[Segment.RESERVE_SEQ] = case.reserve_seq


class Corrupt(Exception):
    """The model's verdict: the read reports slot ``seq`` as corrupt."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


def expected(
    seg: Segment, case: Case, cursor: int, limit: int, copy: bool
) -> tuple[list[tuple[int, int, int, bytes]], int, int]:
    """(records, new cursor, lost) a read from ``cursor`` must give, with nobody writing;
    raises Corrupt when it must report a corrupt slot."""
    g = seg.geometry
    cap, slot = g.capacity, g.slot_size
    w, r = case.write_seq, case.reserve_seq
    if w <= cursor:
        return [], cursor, 0
    limit = max(1, limit)
    if copy:
        limit = min(limit, max(1, COPY_BATCH_BYTES // slot))
    limit = min(limit, cap)
    start = r - cap if r > cap and r - cap > cursor else cursor
    end = start if w <= start else min(w, start + limit)
    rows: list[tuple[int, int, int, bytes]] = []
    bad: int | None = None
    for s in range(start, end):
        off = (s % cap) * slot
        seq, ts, length, topic = _RECORD_FIELDS.unpack_from(seg.ring, off)
        if seq != s or length > g.max_payload or topic > TOPIC_MAX:
            bad = s if bad is None else bad
            continue
        if case.topics >> topic & 1:
            body = off + RECORD_HEADER_SIZE
            rows.append((seq, ts, topic, bytes(seg.ring[body : body + length])))
    # Nobody writes: the re-read reserve_seq is R, and start >= R - capacity.
    if bad is not None:
        raise Corrupt(bad)
    return rows, end, start - cursor


def _check_read(sub: Subscriber, seg: Segment, case: Case, evicted: bool) -> bool:
    """One read against the model; False when it ended in an error (no further reads)."""
    before, lost_before = sub.cursor, sub.lost
    corrupt_seq = -1
    try:
        want, end, lost = expected(seg, case, before, case.limit, case.copy)
        want_error: type[Exception] | None = ReaderEvicted if evicted and end > before else None
    except Corrupt as exc:
        want, end, lost = [], before, 0
        want_error = ReaderEvicted if evicted else SegmentLayoutError
        corrupt_seq = exc.seq
    if evicted and case.write_seq <= before:
        want_error = None
    try:
        got = sub.read_batch(case.limit, copy=case.copy, hold=case.hold)
    except (SegmentLayoutError, ReaderEvicted) as exc:
        assert type(exc) is want_error, f"{exc!r}, expected {want_error}"
        if want_error is SegmentLayoutError:
            assert f"record {corrupt_seq} " in str(exc), (str(exc), corrupt_seq)
        assert sub.cursor == before and sub.lost == lost_before
        return False
    assert want_error is None, f"read gave {len(got)} records, expected {want_error}"
    rows = []
    for seq, ts, topic, payload in got:
        if not case.copy:
            assert isinstance(payload, memoryview) and payload.readonly
        assert len(payload) <= seg.geometry.max_payload and 0 <= topic <= TOPIC_MAX
        rows.append((seq, ts, topic, bytes(payload)))
        if isinstance(payload, memoryview):
            payload.release()
    assert rows == want, (rows, want)
    assert sub.cursor == end and sub.lost - lost_before == lost, (sub.cursor, end, lost)
    return True


def test_one_input(data: bytes) -> None:
    """One input: see the module docstring."""
    case = decode(data)
    seg = _segment(case.which)
    _write(seg, case)
    seg.sem_drain()  # block-policy reads may have posted the writer's semaphore
    sub = Subscriber.attach(index=0, fd=seg.fileno(), token=TOKEN)
    try:
        _counters(seg, case)
        evicted = False
        for i in range(case.reads):
            if not _check_read(sub, seg, case, evicted):
                break
            if case.evict and i == 0:
                q0, _ = Segment.entry_words(0)
                seg.q[q0 + RQ_TOKEN] = TOKEN + 1  # the entry went to another reader
                evicted = True
        sub.release()
    finally:
        sub.close()
