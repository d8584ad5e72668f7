"""shmd.bus.subscriber: attaching, reading in order, lapping, zero-copy, sleeping and waking."""

from __future__ import annotations

import ctypes
import faulthandler
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy
import pytest
from helpers import (
    Bus,
    ChildEnd,
    Procs,
    asleep_and_unlocked,
    attach,
    drain,
    eventfd_count,
    loop_reader,
    maps_lines,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from shmd._sys import libc
from shmd.bus.layout import (
    ALL_TOPICS,
    REC_PAYLOAD,
    REC_SEQ,
    REC_TIMESTAMP,
    REC_TOPIC,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RU_SLEEP_SEQ,
    RU_WAKE_SEQ,
    Record,
    decode_record_header,
    topic_mask,
)
from shmd.bus.publisher import Publisher
from shmd.bus.segment import Segment
from shmd.bus.subscriber import COPY_BATCH_BYTES, DEFER_CURSOR_MIN_CAPACITY, Subscriber
from shmd.bus.wait import WaitStrategy
from shmd.errors import (
    ReaderEvicted,
    SegmentClosed,
    SegmentError,
    SegmentLayoutError,
    SegmentNotFound,
)


def payload(seq: int) -> bytes:
    """The payload these tests publish as record ``seq``."""
    return seq.to_bytes(8, "little") * 3


# -- attaching -----------------------------------------------------------------------------


def test_attach_by_fd_and_by_name_read_the_same_records(bus: Bus) -> None:
    """A subscriber attached by received fd and one attached by name read identical records."""
    pub = bus.publisher(capacity=16)
    by_fd = bus.subscriber(pub, "fd")
    handle = pub.add_reader("name", os.getpid())
    with Subscriber.attach(index=handle.index, name=pub.name, token=handle.token) as by_name:
        before = time.monotonic_ns()
        pub.publish_batch([payload(i) for i in range(5)], topic=7)
        after = time.monotonic_ns()
        got = by_fd.read()
        assert [(r.seq, r.topic, r.payload) for r in got] == [(i, 7, payload(i)) for i in range(5)]
        assert all(before <= r.timestamp_ns <= after for r in got)
        assert by_name.read() == got


def test_attach_after_the_writer_is_gone(shm_name: str) -> None:
    """Attaching by name after the writer unlinked its segment gives a SegmentNotFound to act on."""
    with Publisher.create(shm_name):
        pass
    with pytest.raises(
        SegmentNotFound,
        match=rf"Failed to open shared-memory segment "
        rf"'{shm_name}' since no segment of that name "
        r"exists \(is the writer running\?\)",
    ):
        Subscriber.attach(index=0, name=shm_name)


def test_attach_to_an_index_outside_the_table(bus: Bus) -> None:
    """An entry index past the reader table raises SegmentLayoutError naming the range."""
    pub = bus.publisher(max_readers=4)
    with pytest.raises(SegmentLayoutError, match=r"reader index 4 is outside the table \(0..3\)"):
        Subscriber.attach(index=4, fd=pub.segment.fileno())
    assert len(maps_lines(pub.name)) == 2  # only the writer's: the failed attach unmapped


def test_spawned_reader_attaches_by_name_with_an_eventfd_over_a_socket(
    bus: Bus,
    procs: Procs,
) -> None:
    """An exec'd reader gets its eventfd by SCM_RIGHTS, maps by name, sleeps, wakes, drains."""
    pub = bus.publisher(capacity=16)
    handle = pub.add_reader("spawned", os.getpid())
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = procs.python(
            "spawned_reader.py",
            pub.name,
            str(theirs.fileno()),
            pass_fds=[theirs.fileno()],
            stdout=subprocess.PIPE,
        )
        theirs.close()
        socket.send_fds(
            ours, [f"{handle.index} {handle.token}".encode()], [handle.eventfd.fileno()]
        )
    out = procs.lines(proc, "spawned reader")
    out.expect("ready")
    wait_until(asleep_and_unlocked(pub, handle.index), "the spawned reader sleeps")
    pub.publish(b"one", topic=3)
    pub.publish_batch([b"two", b"three"], topic=4)
    assert [out.expect("record") for _ in range(3)] == [
        f"record 0 3 {b'one'.hex()}",
        f"record 1 4 {b'two'.hex()}",
        f"record 2 4 {b'three'.hex()}",
    ]
    pub.deactivate()
    assert out.expect("exit") == "exit DRAINED 3 0"
    assert proc.wait(timeout=20) == 0


# -- reading -------------------------------------------------------------------------------


def test_read_respects_limit_and_advances_the_entry(bus: Bus) -> None:
    """read(limit) returns at most limit records and stores cursor and delivered in the table."""
    pub = bus.publisher(capacity=16)
    sub = bus.subscriber(pub)
    pub.publish_batch([payload(i) for i in range(10)])
    assert [r.seq for r in sub.read(4)] == [0, 1, 2, 3]
    assert sub.available() == 6
    e = pub.segment.entry(sub.index)
    assert (e.cursor, e.delivered, e.lost) == (4, 4, 0)
    assert [r.seq for r in sub.read()] == list(range(4, 10))
    assert sub.read() == []
    assert (sub.cursor, sub.delivered) == (10, 10)


def test_a_one_record_reads_cursor_is_published_by_the_next_call(bus: Bus) -> None:
    """A read of one record leaves the entry's cursor to the next call (here an empty read)."""
    pub = bus.publisher(capacity=DEFER_CURSOR_MIN_CAPACITY)
    sub = bus.subscriber(pub)
    pub.publish(b"one")
    assert [r.seq for r in sub.read()] == [0]
    assert pub.segment.entry(sub.index).cursor == 0  # not yet: the caller has its record first
    assert sub.read() == []
    e = pub.segment.entry(sub.index)
    assert (e.cursor, e.delivered) == (1, 1)
    pub.publish(b"two")
    pub.publish(b"three")
    assert [r.seq for r in sub.read(1)] == [1]
    assert [r.seq for r in sub.read(1)] == [2]  # a second one in a row publishes both
    assert pub.segment.entry(sub.index).cursor == 3


def test_a_ring_of_few_slots_gets_every_cursor_at_once(bus: Bus) -> None:
    """Below DEFER_CURSOR_MIN_CAPACITY slots, a one-record read stores its cursor itself."""
    pub = bus.publisher(capacity=DEFER_CURSOR_MIN_CAPACITY // 2)
    sub = bus.subscriber(pub)
    pub.publish(b"one")
    assert len(sub.read()) == 1
    assert pub.segment.entry(sub.index).cursor == 1


def test_prepare_sleep_release_and_close_publish_a_left_cursor(bus: Bus) -> None:
    """prepare_sleep publishes a cursor a one-record read left, and so do release() and close()."""
    pub = bus.publisher(capacity=DEFER_CURSOR_MIN_CAPACITY)
    sub = bus.subscriber(pub)
    pub.publish(b"one")
    assert len(sub.read()) == 1
    assert sub.prepare_sleep() is None
    assert pub.segment.entry(sub.index).cursor == 1
    pub.publish(b"between")
    assert len(sub.read()) == 1
    sub.release()  # what the reader daemon does before it sends Detach
    assert pub.segment.entry(sub.index).cursor == 2
    pub.publish(b"two")
    assert len(sub.read()) == 1
    sub.close()
    e = pub.segment.entry(sub.index)
    assert (e.cursor, e.delivered) == (3, 3)


def test_a_left_cursor_never_lands_in_an_entry_given_to_another_reader(bus: Bus) -> None:
    """A cursor left for later is dropped, not stored, once the entry was freed and reused."""
    pub = bus.publisher(capacity=DEFER_CURSOR_MIN_CAPACITY)
    sub = bus.subscriber(pub, "old")
    pub.publish(b"x")
    assert len(sub.read()) == 1  # cursor 1 left for later
    pub.remove_reader(sub.index)
    new = pub.add_reader("new", os.getpid(), start=0)
    assert new.index == sub.index
    assert sub.read() == []  # the empty read would publish it; the entry is not ours
    e = pub.segment.entry(new.index)
    assert (e.name, e.cursor, e.delivered) == ("new", 0, 0)
    with pytest.raises(ReaderEvicted):
        sub.prepare_sleep()


def test_a_held_cursor_never_lands_in_an_entry_given_to_another_reader(bus: Bus) -> None:
    """release() after hold=True reads stores nothing once the entry was freed and reused."""
    pub = bus.publisher(capacity=16)
    sub = bus.subscriber(pub, "old")
    pub.publish_batch([b"x", b"y"])
    batch = sub.read_batch(copy=False, hold=True)
    assert [seq for seq, *_ in batch] == [0, 1]
    del batch
    pub.remove_reader(sub.index)
    new = pub.add_reader("new", os.getpid(), start=0)
    sub.release()
    e = pub.segment.entry(new.index)
    assert (e.name, e.cursor, e.delivered) == ("new", 0, 0)


def test_read_skips_topics_it_did_not_subscribe(bus: Bus) -> None:
    """Records of other topics are passed over (the cursor moves) but not delivered."""
    pub = bus.publisher(capacity=16)
    sub = bus.subscriber(pub, topics=topic_mask([2, 5]))
    for i, topic in enumerate([1, 2, 3, 5, 2, 63]):
        pub.publish(payload(i), topic=topic)
    assert [(r.seq, r.topic) for r in sub.read()] == [(1, 2), (3, 5), (4, 2)]
    assert sub.cursor == 6 and sub.delivered == 3 and sub.lost == 0
    pub.publish(b"x", topic=1)
    assert sub.read() == []  # only another topic: nothing, but the cursor moved
    assert sub.cursor == 7


def test_lapped_reader_learns_exactly_how_many_it_lost(bus: Bus) -> None:
    """A reader the writer lapped resumes at the oldest record present and counts the gap."""
    cap = 8
    pub = bus.publisher(capacity=cap)
    sub = bus.subscriber(pub)
    pub.publish_batch([payload(i) for i in range(3)])
    assert len(sub.read(1)) == 1  # cursor 1
    pub.publish_batch([payload(i) for i in range(3, 30)])
    got = sub.read()
    assert [r.seq for r in got] == list(range(30 - cap, 30))
    assert [r.payload for r in got] == [payload(i) for i in range(30 - cap, 30)]
    assert sub.lost == 30 - cap - 1
    assert pub.segment.entry(sub.index).lost == 30 - cap - 1


def test_stalled_reader_process_reports_an_exact_lost_count(bus: Bus, procs: Procs) -> None:
    """A reader process stalled at cursor 0 while N records pass a ring of C loses exactly N - C."""
    cap, n = 64, 1000
    pub = bus.publisher(capacity=cap)
    handle = pub.add_reader("stalled", os.getpid())

    def body(ch: ChildEnd) -> None:
        sub = attach(pub, handle)
        ch.send("attached")
        assert ch.recv() == "go"  # stalled until the writer is done
        records = drain(sub)
        intact = all(r.payload == payload(r.seq) for r in records)
        seqs = [r.seq for r in records]
        ch.send(f"read {len(records)} {seqs[0]} {seqs[-1]} {sub.lost} {intact}")

    child = procs.fork(body)
    child.expect("attached")
    for i in range(0, n, 10):
        pub.publish_batch([payload(s) for s in range(i, i + 10)])
    child.tell("go")
    assert child.expect("read") == f"read {cap} {n - cap} {n - 1} {n - cap} True"
    assert child.wait() == 0
    e = pub.segment.entry(handle.index)
    assert (e.cursor, e.delivered, e.lost) == (n, cap, n - cap)


def test_zero_copy_views_turn_invalid_once_lapped(bus: Bus) -> None:
    """read(copy=False) gives read-only views into the ring; still_valid turns False after a lap."""
    cap = 8
    pub = bus.publisher(capacity=cap)
    sub = bus.subscriber(pub)
    with pub.reserve(24) as buf:
        buf[:] = payload(0)
    (rec,) = sub.read(copy=False)
    assert isinstance(rec.payload, memoryview) and rec.payload.readonly
    assert rec.payload == payload(0)
    with pytest.raises(TypeError, match="cannot modify read-only memory"):
        rec.payload[0] = 0
    pub.publish_batch([payload(i) for i in range(1, cap)])
    assert sub.still_valid(rec.seq)  # the ring is full, nothing overwritten yet
    pub.publish(payload(cap))  # overwrites slot 0
    assert not sub.still_valid(rec.seq)
    assert rec.payload == payload(cap)  # which is why the check exists


# -- held views (block policy): a slot stays held while a view of it lives --------------


def _held_ring(bus: Bus, cap: int = 8) -> tuple[Publisher, Subscriber]:
    """A block-policy writer (patient: tests end its waits) whose ring is full for one reader."""
    pub = bus.publisher(capacity=cap, policy="block", block_timeout=60.0)
    sub = bus.subscriber(pub)
    pub.publish_batch([payload(i) for i in range(cap)])
    return pub, sub


def _held_views(sub: Subscriber) -> list[memoryview]:
    """The payloads of one zero-copy hold read (views, by type)."""
    views = [r[3] for r in sub.read_batch(copy=False, hold=True)]
    assert all(isinstance(v, memoryview) for v in views)
    return [v for v in views if isinstance(v, memoryview)]


def _writer_waiting(seg: Segment) -> Callable[[], bool]:
    """A predicate: the writer sleeps on the semaphore waiting for space."""
    return lambda: seg.u[Segment.WRITER_WAITING] == 1


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda v: numpy.frombuffer(v, dtype=numpy.uint8), id="numpy-array"),
        pytest.param(lambda v: v[4:20], id="memoryview-slice"),
    ],
)
def test_what_is_made_from_a_held_view_holds_its_slot_past_release(
    bus: Bus, procs: Procs, keep: Callable[[memoryview], numpy.ndarray | memoryview]
) -> None:
    """Under block, an array or slice of a hold read's view kept past release() keeps the
    writer off that slot and reads its record; once it goes, the waiting writer goes on with
    no further call of the reader's."""
    cap = 8
    pub, sub = _held_ring(bus, cap)
    rows = _held_views(sub)
    kept = keep(rows[3])
    want = bytes(kept)
    assert want in payload(3)
    del rows
    sub.release()
    assert pub.segment.entry(sub.index).cursor == 3  # records 0..2 are free, 3 is held
    pub.publish_batch([payload(i) for i in range(cap, cap + 3)])  # into slots 0..2

    def writer(ch: ChildEnd) -> None:
        pub.publish(payload(cap + 3))  # slot 3: waits for the reader
        ch.send("published")

    child = procs.fork(writer)
    wait_until(_writer_waiting(pub.segment), "the writer waits for slot 3")
    assert sub.segment.write_seq == cap + 3  # it did not overwrite the held slot
    assert bytes(kept) == want  # still record 3's bytes
    del kept  # the last view of record 3: the reader republishes its cursor now
    child.expect("published")
    assert child.wait() == 0
    assert pub.segment.entry(sub.index).cursor == cap
    assert [r.payload for r in sub.read()] == [payload(i) for i in range(cap, cap + 4)]


def test_held_views_dropped_before_release_free_their_slots_at_release(bus: Bus) -> None:
    """Views of a hold read dropped before release() hold nothing after it; until then the
    cursor stays where the hold read found it."""
    pub, sub = _held_ring(bus)
    rows = _held_views(sub)
    assert [bytes(v) for v in rows] == [payload(i) for i in range(8)]
    del rows
    assert pub.segment.entry(sub.index).cursor == 0  # held until the release
    sub.release()
    assert pub.segment.entry(sub.index).cursor == 8
    pub.publish_batch([payload(i) for i in range(8, 16)])  # a whole ring, no wait
    assert pub.evictions == []
    assert [r.seq for r in sub.read()] == list(range(8, 16))


def test_the_cursor_stops_at_the_first_held_record_a_view_still_lives_on(bus: Bus) -> None:
    """With views of records 2 and 5 alive after release() the cursor is 2; dropping 5 first
    changes nothing, dropping 2 then frees the slots up to the cursor, and a read without
    hold never publishes past a live view."""
    pub, sub = _held_ring(bus)
    rows = _held_views(sub)
    two, five = rows[2], rows[5]
    del rows
    sub.release()

    def entry() -> int:
        return pub.segment.entry(sub.index).cursor

    assert entry() == 2
    del five
    assert entry() == 2
    pub.publish_batch([payload(8), payload(9)])  # slots 0 and 1
    assert [r.seq for r in sub.read()] == [8, 9]  # a read without hold
    assert entry() == 2 and sub.cursor == 10
    assert bytes(two) == payload(2)
    del two
    assert entry() == 10


def test_a_held_view_alive_at_close_keeps_the_mapping_not_the_entry(bus: Bus) -> None:
    """close() with a live held view: the view still reads its record (the ring stays mapped
    until it goes), the entry keeps the slot held until the writer frees it, and the view's
    end then touches no entry."""
    pub, sub = _held_ring(bus)
    rows = _held_views(sub)
    view = rows[6]
    del rows

    def reader_rings() -> int:
        """The reader's read-only ring mappings (the writer maps its own read-write)."""
        return sum(" r--s " in line for line in maps_lines(pub.name))

    assert reader_rings() == 1
    sub.close()
    assert reader_rings() == 1  # kept for the view
    assert pub.segment.entry(sub.index).cursor == 6  # the records it read, but the held one
    assert bytes(view) == payload(6)
    loan = view.obj
    with pytest.raises(BufferError, match="Failed to view record 6 since its slot was released"):
        memoryview(loan)
    del loan
    pub.remove_reader(sub.index)
    new = pub.add_reader("new", os.getpid(), start=0)
    del view
    assert reader_rings() == 0
    e = pub.segment.entry(new.index)
    assert (e.name, e.cursor, e.delivered) == ("new", 0, 0)


def test_held_views_under_drop_oldest_hold_nothing(bus: Bus) -> None:
    """Under drop-oldest a hold read's views are plain ring slices: after release() the
    writer laps them, and still_valid says so."""
    pub = bus.publisher(capacity=8)
    sub = bus.subscriber(pub)
    pub.publish_batch([payload(i) for i in range(8)])
    rows = _held_views(sub)
    view = rows[0]
    assert view.obj is sub.segment.ring.obj
    del rows
    sub.release()
    pub.publish(payload(8))
    assert not sub.still_valid(0)
    assert bytes(view) == payload(8)


def test_reader_cannot_write_the_ring_from_python(bus: Bus) -> None:
    """The reader's ring mapping is read-only: a store raises TypeError, nothing changes."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    pub.publish(b"keep")
    with pytest.raises(TypeError, match="cannot modify read-only memory"):
        sub.segment.ring[32:36] = b"evil"
    assert [r.payload for r in sub.read()] == [b"keep"]


def test_ctypes_write_to_the_ring_kills_only_that_reader(bus: Bus, procs: Procs) -> None:
    """A reader storing into its ring mapping dies of SIGSEGV; writer and other readers go on."""
    cap = 64
    pub = bus.publisher(capacity=cap)
    bystander = bus.subscriber(pub, "bystander")
    looper = pub.add_reader("looper", os.getpid())
    faulty = pub.add_reader("faulty", os.getpid())
    loop_child = procs.fork(loop_reader(pub, looper.index))
    loop_child.expect("ready")

    def body(ch: ChildEnd) -> None:
        faulthandler.disable()  # die of the signal quietly
        # A forked child also inherits the writer's read-write mapping of
        # the ring; aim at the read-only one the reader maps for itself.
        before = set(maps_lines(pub.name))
        sub = attach(pub, faulty)
        (line,) = [m for m in set(maps_lines(pub.name)) - before if " r--s " in m]
        address = int(line.split("-")[0], 16)
        ch.send("attached")
        assert ch.recv() == "read"
        ch.send(f"read {len(sub.read())}")
        assert ch.recv() == "write"
        ctypes.memmove(address, b"X", 1)
        ch.send("survived")

    child = procs.fork(body)
    child.expect("attached")
    pub.publish_batch([payload(i) for i in range(10)])
    child.tell("read")
    assert child.expect("read") == "read 10"  # it is a working reader until it misbehaves
    child.tell("write")
    assert child.wait() == -signal.SIGSEGV
    pub.publish_batch([payload(i) for i in range(10, 20)])
    got = bystander.read()
    assert [(r.seq, r.payload) for r in got] == [(i, payload(i)) for i in range(20)]
    pub.deactivate()
    lines = []
    while not (line := loop_child.expect("")).startswith("exit"):
        lines.append(line)
    assert lines == [f"record {i} 0 {payload(i).hex()}" for i in range(20)]
    assert line == "exit DRAINED 20 0"
    assert loop_child.wait() == 0


# -- every write path against every read path ----------------------------------------------

#: Payload lengths from one byte to a full 64-byte slot's 32 (and a run of equal ones).
LENGTHS = (1, 7, 16, 31, 32)
TOPIC = 5


def _payloads(n: int, equal: bool) -> list[bytes]:
    """Distinct payloads, all 20 bytes long when ``equal`` (what reserve_batch writes)."""
    lengths = [20] * n if equal else list(LENGTHS[:n])
    return [bytes((k * 31 + i) % 251 for i in range(n_)) for k, n_ in enumerate(lengths)]


def _publish_each(pub: Publisher, payloads: list[bytes]) -> None:
    for p in payloads:
        pub.publish(p, TOPIC)


def _publish_batch_dense(pub: Publisher, payloads: list[bytes]) -> None:
    pub.publish_batch(payloads, TOPIC)


def _publish_batch_loop(pub: Publisher, payloads: list[bytes]) -> None:
    # memoryviews do not pack as struct "s": the batch takes the per-slot loop.
    pub.publish_batch([memoryview(p) for p in payloads], TOPIC)


def _reserve_each(pub: Publisher, payloads: list[bytes]) -> None:
    for p in payloads:
        res = pub.reserve(32, TOPIC)
        res.buffer[: len(p)] = p
        res.commit(len(p))


def _reserve_batch(pub: Publisher, payloads: list[bytes]) -> None:
    res = pub.reserve_batch(len(payloads), 20, TOPIC)
    for buf, p in zip(res.buffers, payloads, strict=True):
        buf[:] = p
    res.commit()


WRITE_PATHS = {
    "publish": (_publish_each, False),
    "publish-block-policy": (_publish_each, False),
    "publish_batch-dense": (_publish_batch_dense, False),
    "publish_batch-loop": (_publish_batch_loop, False),
    "reserve": (_reserve_each, False),
    "reserve_batch": (_reserve_batch, True),
}


def _read_records(sub: Subscriber, n: int) -> list[tuple[int, int, int, bytes]]:
    return [(r.seq, r.timestamp_ns, r.topic, bytes(r.payload)) for r in sub.read()]


def _read_views(sub: Subscriber, n: int) -> list[tuple[int, int, int, bytes]]:
    got = [(r.seq, r.timestamp_ns, r.topic, bytes(r.payload)) for r in sub.read(copy=False)]
    assert all(sub.still_valid(seq) for seq, *_ in got)
    return got


def _read_one_by_one(sub: Subscriber, n: int) -> list[tuple[int, int, int, bytes]]:
    rows = [row for _ in range(n) for row in sub.read_batch(1)]
    return [(r[REC_SEQ], r[REC_TIMESTAMP], r[REC_TOPIC], bytes(r[REC_PAYLOAD])) for r in rows]


def _read_one_view_by_one(sub: Subscriber, n: int) -> list[tuple[int, int, int, bytes]]:
    rows = [row for _ in range(n) for row in sub.read_batch(1, copy=False)]
    return [(r[REC_SEQ], r[REC_TIMESTAMP], r[REC_TOPIC], bytes(r[REC_PAYLOAD])) for r in rows]


def _read_batch(sub: Subscriber, n: int) -> list[tuple[int, int, int, bytes]]:
    rows = sub.read_batch()
    return [(r[REC_SEQ], r[REC_TIMESTAMP], r[REC_TOPIC], bytes(r[REC_PAYLOAD])) for r in rows]


READ_PATHS = {
    "read": _read_records,
    "read-zero-copy": _read_views,
    "read_batch-one-record": _read_one_by_one,
    "read_batch-one-view": _read_one_view_by_one,
    "read_batch-runs": _read_batch,
}


@pytest.mark.parametrize("read_name", sorted(READ_PATHS))
@pytest.mark.parametrize("write_name", sorted(WRITE_PATHS))
@pytest.mark.parametrize("filtered", [False, True], ids=["all-topics", "topic-filter"])
def test_every_write_path_round_trips_through_every_read_path(
    bus: Bus, write_name: str, read_name: str, filtered: bool
) -> None:
    """Records written by each publisher path read back whole, in order, by each reader path."""
    write, equal = WRITE_PATHS[write_name]
    policy = "block" if write_name == "publish-block-policy" else "drop-oldest"
    pub = bus.publisher(capacity=16, slot_size=64, policy=policy)
    sub = bus.subscriber(pub, topics=topic_mask([TOPIC]) if filtered else ALL_TOPICS)
    # Lead the ring near its end (and, filtered, past records of another
    # topic) so that the five records wrap from slot 13 round to slot 1.
    for i in range(13):
        pub.publish(b"lead %d" % i, 0 if filtered else TOPIC)
    assert len(sub.read_batch()) == (0 if filtered else 13)
    payloads = _payloads(5, equal)
    before = time.monotonic_ns()
    write(pub, payloads)
    after = time.monotonic_ns()

    got = READ_PATHS[read_name](sub, len(payloads))

    assert [(seq, topic, p) for seq, _, topic, p in got] == [
        (13 + i, TOPIC, p) for i, p in enumerate(payloads)
    ]
    assert all(before <= ts <= after for _, ts, _, _ in got)
    assert sub.read_batch() == []
    assert (sub.delivered, sub.lost) == (len(payloads) + (0 if filtered else 13), 0)
    # What the slots hold, decoded with the layout's own structs: flags and
    # the reserved word are zero, the payload is followed by nothing of it.
    ring = pub.segment.ring
    for i, p in enumerate(payloads):
        off = ((13 + i) % 16) * 64
        seq, ts, length, topic, flags, reserved = RECORD_HEADER.unpack_from(ring, off)
        assert (seq, length, topic, flags, reserved) == (13 + i, len(p), TOPIC, 0, 0)
        assert decode_record_header(ring, off) == (seq, ts, length, topic)
        assert bytes(ring[off + RECORD_HEADER_SIZE : off + RECORD_HEADER_SIZE + len(p)]) == p


# -- eviction and misuse -------------------------------------------------------------------


def test_removed_reader_gets_reader_evicted(bus: Bus) -> None:
    """Once the writer freed or reused the entry, the old subscriber's read raises ReaderEvicted."""
    pub = bus.publisher()
    sub = bus.subscriber(pub, "old")
    pub.remove_reader(sub.index)
    pub.publish(b"x")
    with pytest.raises(ReaderEvicted, match=f"evicted reader entry {sub.index} \\(state FREE\\)"):
        sub.read()
    pub.add_reader("new", os.getpid())  # same entry, new token
    with pytest.raises(ReaderEvicted, match="state ATTACHED"):
        sub.read()


def _read_past_a_hostile_write_seq(pub: Publisher, sub: Subscriber, write_seq: int) -> None:
    """A writer claims ``write_seq`` records; a zero-copy read with the largest limit
    checks one ring of slots only and reports the corrupt slot."""
    pub.segment.q[Segment.WRITE_SEQ] = write_seq
    with pytest.raises(SegmentLayoutError, match="Failed to read record 1 since its slot"):
        sub.read_batch(sys.maxsize, copy=False)
    assert sub.cursor == 0


@pytest.mark.parametrize("write_seq", [1 << 45, (1 << 61) + 1])
def test_a_hostile_write_seq_is_read_one_ring_at_a_time(
    bus: Bus, procs: Procs, write_seq: int
) -> None:
    """A write_seq far past reserve_seq makes a read plan at most one ring, not 2^45
    positions (MemoryError) or 2^61 (an allocation wrapping to 8 bytes: SIGSEGV).

    In a child, whose death by a signal would show (found writing fuzz/fuzz_read.py)."""
    pub = bus.publisher()
    sub = bus.subscriber(pub, start="oldest")
    child = procs.fork(lambda ch: _read_past_a_hostile_write_seq(pub, sub, write_seq))
    assert child.wait(60) == 0


def test_read_after_close_raises_segment_closed(bus: Bus) -> None:
    """Reading from a closed subscriber raises SegmentClosed, not an AttributeError."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    pub.publish(b"x")
    sub.close()
    sub.close()  # idempotent
    with pytest.raises(SegmentClosed, match="subscriber was closed"):
        sub.read()


def test_release_after_close_with_held_views_does_nothing(bus: Bus) -> None:
    """release() after close() of a subscriber holding slots is a no-op, not an AttributeError."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    pub.publish(b"x")
    assert [bytes(r[3]) for r in sub.read_batch(copy=False, hold=True)] == [b"x"]
    sub.close()
    sub.release()
    sub.release()


def test_a_read_only_control_part_is_refused_at_attach(bus: Bus) -> None:
    """A subscriber on a segment whose control part is mapped read-only is refused with one
    sentence (a reader writes its cursor and sleep announcements there), and the writer goes on."""
    pub = bus.publisher()
    handle = pub.add_reader("ro", os.getpid())
    with (
        Segment.open(fd=pub.segment.fileno(), control_writable=False) as seg,
        pytest.raises(SegmentError, match="control part is mapped read-only"),
    ):
        Subscriber(seg, handle.index)
    assert pub.publish(b"fine") == 0  # the writer is unaffected


def test_a_copying_read_copies_about_a_mebibyte_at_most(bus: Bus) -> None:
    """Copying reads stop at COPY_BATCH_BYTES of slots (one record at least); views do not."""
    slot = 300_000
    pub = bus.publisher(capacity=8, slot_size=slot)
    copying = bus.subscriber(pub, "copying")
    viewing = bus.subscriber(pub, "viewing")
    pub.publish_batch([bytes([i]) * 1000 for i in range(4)])
    per_read = COPY_BATCH_BYTES // slot
    assert per_read == 3
    assert [r.payload[0] for r in copying.read(4096)] == [0, 1, 2]
    assert [r.payload[0] for r in copying.read(4096)] == [3]
    assert len(viewing.read(4096, copy=False)) == 4
    big = bus.publisher(capacity=2, slot_size=COPY_BATCH_BYTES + 64)
    one = bus.subscriber(big)
    big.publish_batch([b"a", b"b"])
    assert [r.payload for r in one.read(4096)] == [b"a"]  # never zero records


# -- sleeping and waking -------------------------------------------------------------------


def test_prepare_sleep_announces_only_when_idle(bus: Bus) -> None:
    """prepare_sleep refuses while records wait, and announces once when idle."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    count = pub.segment.header().sleep_count
    pub.publish(b"x")
    assert sub.prepare_sleep() == 0.0
    assert not pub.segment.entry(sub.index).asleep
    assert pub.segment.header().sleep_count == count
    sub.read()
    assert sub.prepare_sleep() is None
    assert pub.segment.entry(sub.index).asleep
    assert pub.segment.header().sleep_count == count + 1
    assert sub.prepare_sleep() is None  # idempotent: the announcement stands
    assert pub.segment.header().sleep_count == count + 1


def test_wait_times_out_without_records(bus: Bus) -> None:
    """wait(timeout) with nothing published returns False after the timeout, flag withdrawn."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    t0 = time.monotonic()
    assert sub.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.05


def _epolls() -> set[int]:
    """This process's open epoll fds."""
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "anon_inode:[eventpoll]":
                found.add(int(entry))
        except FileNotFoundError:
            pass  # the fd listdir itself had open
    return found


def test_wait_keeps_one_epoll_until_close(bus: Bus) -> None:
    """wait() makes one epoll at its first sleep, sleeps in it again, and close() closes it."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    before = _epolls()
    assert sub.wait(0.01) is False
    made = _epolls() - before
    assert len(made) == 1
    pub.publish(b"x")
    assert [r[3] for r in sub.read_batch()] == [b"x"]
    assert sub.wait(0.01) is False
    assert _epolls() - before == made
    sub.close()
    assert _epolls() == before


def test_wait_after_close_says_the_subscriber_was_closed(bus: Bus) -> None:
    """wait() on a closed subscriber raises SegmentClosed, not an AttributeError."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    sub.close()
    with pytest.raises(SegmentClosed, match="Failed to sleep since the subscriber was closed"):
        sub.wait(0)


def test_wait_needs_an_eventfd(bus: Bus) -> None:
    """A subscriber without an eventfd cannot wait and says so."""
    pub = bus.publisher()
    handle = pub.add_reader("r", os.getpid())
    with (
        Subscriber.attach(index=handle.index, fd=pub.segment.fileno()) as sub,
        pytest.raises(ValueError, match="has no eventfd"),
    ):
        sub.wait(0)


@pytest.mark.parametrize("spurious", [False, True], ids=["woken-by-the-commit", "woken-early"])
def test_reader_process_blocked_in_wait_is_woken_by_a_record(
    bus: Bus, procs: Procs, spurious: bool
) -> None:
    """A reader process asleep in wait() returns once a record of its topic is committed,
    and sleeps on through a wake-up that comes with nothing new in the ring."""
    pub = bus.publisher()
    handle = pub.add_reader("waiter", os.getpid(), topics=topic_mask([9]))

    def body(ch: ChildEnd) -> None:
        sub = attach(pub, handle)
        ch.send("waiting")
        woke = sub.wait(20)
        ch.send(f"woke {woke} {[r.payload for r in sub.read()]}")

    child = procs.fork(body)
    child.expect("waiting")
    wait_until(asleep_and_unlocked(pub, handle.index), "the reader sleeps")
    if spurious:
        u, (_, u0) = pub.segment.u, Segment.entry_words(handle.index)
        announced = u[u0 + RU_SLEEP_SEQ]
        # Answer the announcement and write the eventfd with the ring still
        # empty (what a standing announcement gets from a commit of a record
        # the reader had already read before it slept).
        u[u0 + RU_WAKE_SEQ] = announced
        os.eventfd_write(handle.eventfd.fileno(), 1)
        # The reader wakes to nothing and announces a new sleep (without the
        # re-sleep, wait() returned True here and read() found nothing).  Its
        # sleep_seq says so: the flag alone may be set again before we look.
        wait_until(
            lambda: u[u0 + RU_SLEEP_SEQ] != announced and asleep_and_unlocked(pub, handle.index)(),
            "the reader sleeps again",
        )
    pub.publish(b"ping", topic=9)
    assert child.expect("woke") == "woke True [b'ping']"
    assert child.wait() == 0


def test_a_dead_mutex_holder_does_not_stop_a_reader_from_sleeping(bus: Bus, procs: Procs) -> None:
    """Announcing a sleep takes no lock: with the mutex held by a SIGKILLed process (nobody
    repaired it yet) a reader announces, sleeps and is woken as always."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)

    def holder(ch: ChildEnd) -> None:
        seg = Segment.open(fd=pub.segment.fileno())
        assert seg.lock(None) is libc.LockResult.ACQUIRED
        ch.send("locked")
        ch.recv()

    child = procs.fork(holder)
    child.expect("locked")
    assert child.kill() == -signal.SIGKILL
    with capture_logs() as logs:
        assert sub.prepare_sleep() is None
    assert not [e for e in logs if e["event"] == "mutex_owner_died"]  # never locked
    assert pub.segment.entry(sub.index).asleep
    pub.publish(b"wake")
    assert eventfd_count(sub.eventfd.fileno()) == 1  # type: ignore[union-attr]
    assert [r.payload for r in sub.read()] == [b"wake"]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(1, 4).map(lambda e: 1 << e),
    st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=40),
)
def test_every_record_is_delivered_once_or_counted_lost(
    shm_names: Callable[[], str],
    cap: int,
    steps: list[tuple[bool, int]],
) -> None:
    """Publish and read interleaved at random under drop-oldest: the reader gets an increasing
    run of intact records, and delivered + lost == published (each example a fresh segment,
    its name from the test's factory)."""
    pub = Publisher.create(shm_names(), capacity=cap, slot_size=64)
    try:
        sub = attach(pub, pub.add_reader("r", os.getpid(), start="oldest"))
        try:
            got: list[Record] = []
            published = 0
            for publish, n in [*steps, (False, 1 << 20)]:
                if publish:
                    pub.publish_batch([b"%d" % s for s in range(published, published + n)])
                    published += n
                else:
                    while len(batch := sub.read(n)) or sub.cursor < pub.write_seq:
                        got += batch
                        if n < 1 << 20:
                            break
            seqs = [r.seq for r in got]
            assert seqs == sorted(set(seqs))
            assert all(r.payload == b"%d" % r.seq for r in got)
            assert len(got) + sub.lost == published == sub.cursor
        finally:
            sub.close()
    finally:
        pub.close()


# -- read_into -----------------------------------------------------------------------------


def test_read_into_copies_the_next_record_of_its_topics_into_the_buffer(bus: Bus) -> None:
    """read_into fills the caller's buffer with the next record of its topics, skips the
    others, returns None once caught up, and publishes its cursor by the next call."""
    pub = bus.publisher(capacity=DEFER_CURSOR_MIN_CAPACITY)
    sub = bus.subscriber(pub, topics=topic_mask([1]))
    pub.publish(b"zero", topic=0)
    pub.publish(b"one!", topic=1)
    pub.publish(b"two", topic=2)
    pub.publish(b"three", topic=1)
    buf = bytearray(16)
    assert sub.read_into(buf) == (*sub_row(pub, 1), 4)
    assert bytes(buf[:4]) == b"one!"
    got = sub.read_into(memoryview(buf))
    assert got is not None and got[0] == 3 and got[2] == 1 and bytes(buf[: got[3]]) == b"three"
    assert sub.read_into(buf) is None
    assert sub.cursor == 4 and sub.delivered == 2 and sub.lost == 0
    assert pub.segment.entry(sub.index).cursor == 4


def sub_row(pub: Publisher, seq: int) -> tuple[int, int, int]:
    """(seq, timestamp_ns, topic) of record ``seq`` as its slot holds them."""
    g = pub.geometry
    off = (seq % g.capacity) * g.slot_size
    s, ts, _length, topic = decode_record_header(pub.segment.ring, off)
    return (s, ts, topic)


def test_read_into_keeps_a_record_too_long_for_the_buffer(bus: Bus) -> None:
    """A record longer than the buffer raises ValueError and stays unread for a bigger one."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    pub.publish(b"x" * 20)
    with pytest.raises(ValueError, match="Failed to read record 0 since it has 20 bytes and the "):
        sub.read_into(bytearray(8))
    assert sub.cursor == 0
    big = bytearray(32)
    got = sub.read_into(big)
    assert got is not None and got[3] == 20 and bytes(big[:20]) == b"x" * 20


def test_read_into_refuses_a_read_only_buffer(bus: Bus) -> None:
    """bytes is not writable: a BufferError, and nothing is read."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    pub.publish(b"x")
    with pytest.raises(BufferError, match="not writable"):
        sub.read_into(b"\0" * 8)  # type: ignore[arg-type]
    assert sub.cursor == 0


def test_read_into_counts_what_the_writer_lapped(bus: Bus) -> None:
    """A reader lapped by the writer gets the oldest record still there and counts the rest."""
    pub = bus.publisher(capacity=8)
    sub = bus.subscriber(pub, start="oldest")
    pub.publish_batch([payload(i) for i in range(20)])
    buf = bytearray(64)
    got = sub.read_into(buf)
    assert got is not None and got[0] == 12 and bytes(buf[: got[3]]) == payload(12)
    assert sub.lost == 12


def test_read_into_drops_a_slot_overwritten_while_it_copies(bus: Bus) -> None:
    """The writer laps the reader between read_into's plan and its copy: the overwritten
    record is counted lost and never delivered, the next one is."""
    cap = 8
    pub = bus.publisher(capacity=cap)
    sub = bus.subscriber(pub, start="oldest")
    pub.publish_batch([payload(i) for i in range(cap)])

    def lap_the_reader(start: int, end: int) -> None:
        sub._r.hook = None  # once
        pub.publish(payload(cap))  # seq 8 into slot 0, where seq 0 is being read

    sub._r.hook = lap_the_reader
    buf = bytearray(64)
    got = sub.read_into(buf)
    assert got is not None and got[0] == 1 and bytes(buf[: got[3]]) == payload(1)
    assert sub.lost == 1


def test_read_into_after_close_raises_segment_closed(bus: Bus) -> None:
    """read_into on a closed subscriber says it was closed."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    sub.close()
    with pytest.raises(SegmentClosed, match="Failed to read since the subscriber was closed"):
        sub.read_into(bytearray(8))


# -- spinning ------------------------------------------------------------------------------


def test_spin_times_out_without_records_and_announces_nothing(bus: Bus) -> None:
    """spin() and its yield phase return False after their time; no sleep is announced."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    count = pub.segment.header().sleep_count
    t0 = time.monotonic()
    assert sub.spin(0.02) is False
    t1 = time.monotonic()
    assert sub.spin(0.0, 0.02) is False
    assert t1 - t0 >= 0.02 and time.monotonic() - t1 >= 0.02
    assert pub.segment.header().sleep_count == count
    assert not pub.segment.entry(sub.index).asleep


def test_spin_returns_at_once_for_records_or_an_inactive_writer(bus: Bus) -> None:
    """Records past the cursor, or the active flag cleared, end a spin with True."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    pub.publish(b"x")
    assert sub.spin(math.inf) is True
    sub.read()
    pub.deactivate()
    assert sub.spin(math.inf) is True


def test_spin_rejects_negative_times(bus: Bus) -> None:
    """A negative or NaN time is a ValueError."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    for args in ((-1.0,), (0.0, math.nan)):
        with pytest.raises(ValueError, match="Failed to spin since a time is negative or NaN"):
            sub.spin(*args)


def test_a_signal_handler_runs_while_spinning(bus: Bus) -> None:
    """The GIL comes back every millisecond: a SIGALRM handler's exception ends a spin."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)

    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):
            sub.spin(math.inf)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_close_is_refused_while_another_thread_spins(bus: Bus) -> None:
    """close() from another thread while one spins without the GIL raises, and works after."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(sub.spin(30.0)))
    t.start()
    try:
        wait_until(lambda: sub._r.spinning, "the thread spins")
        with pytest.raises(RuntimeError, match="another thread is waiting in spin"):
            sub.close()
    finally:
        pub.publish(b"end")
        t.join()
    assert result == [True]
    sub.close()


def test_a_spinning_waiter_is_never_woken_through_its_eventfd(bus: Bus, procs: Procs) -> None:
    """A reader process waiting with the spin strategy gets every record, announces no
    sleep, and the writer writes its eventfd only once: the shutdown wake-up."""
    pub = bus.publisher(capacity=64, policy="block", block_timeout=30.0)
    handle = pub.add_reader("spinner", os.getpid())

    def body(ch: ChildEnd) -> None:
        sub = attach(pub, handle, wait=WaitStrategy.spin())
        ch.send("ready")
        seqs: list[int] = []
        while True:
            assert sub.wait() is True
            seqs += [r.seq for r in sub.read()]
            if not sub.active and sub.available() == 0:
                break
        ch.send(f"got {len(seqs)} {seqs == list(range(len(seqs)))}")

    child = procs.fork(body)
    child.expect("ready")
    count = pub.segment.header().sleep_count
    for i in range(2000):
        pub.publish(payload(i))  # block policy: waits for the reader when the ring is full
    pub.deactivate()
    assert child.expect("got") == "got 2000 True"
    assert child.wait() == 0
    assert pub.segment.header().sleep_count == count
    assert eventfd_count(handle.eventfd.fileno()) == 1  # deactivate's


def test_wait_with_the_spin_strategy_needs_no_eventfd(bus: Bus) -> None:
    """A spinning subscriber without an eventfd waits: False on timeout, True for a record."""
    pub = bus.publisher()
    handle = pub.add_reader("r", os.getpid())
    with Subscriber.attach(
        index=handle.index, fd=pub.segment.fileno(), wait=WaitStrategy.spin()
    ) as sub:
        assert sub.wait(0.01) is False
        pub.publish(b"x")
        assert sub.wait(5) is True


def test_wait_with_backoff_sleeps_after_its_spin_and_yield(bus: Bus) -> None:
    """A backoff waiter that saw nothing for its spin and yield times announces a sleep and
    is woken by the next record through its eventfd."""
    pub = bus.publisher()
    sub = bus.subscriber(pub, wait=WaitStrategy.backoff(1e-4, 1e-4))
    count = pub.segment.header().sleep_count
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(sub.wait(30.0)))
    t.start()
    try:
        wait_until(lambda: pub.segment.entry(sub.index).asleep, "the waiter sleeps")
        assert pub.segment.header().sleep_count == count + 1
    finally:
        pub.publish(b"x")
        t.join()
    assert result == [True]
    assert eventfd_count(sub.eventfd.fileno()) == 1  # type: ignore[union-attr]
