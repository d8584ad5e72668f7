"""shmd.bus.readers: the reader table's entries, the shared mutex and its repair."""

from __future__ import annotations

import os
import signal
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from helpers import Bus, ChildEnd, Procs, eventfd_count, fd_targets
from structlog.testing import capture_logs

from shmd._sys import libc
from shmd.bus.layout import RU_PID, RU_STATE, Geometry, Policy, ReaderState
from shmd.bus.readers import ReaderTable
from shmd.bus.segment import Segment
from shmd.errors import ReaderTableFull


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries whose event is ``name``."""
    return [e for e in logs if e["event"] == name]


def test_add_reader_start_positions(bus: Bus) -> None:
    """latest starts at write_seq, oldest at the oldest present; cursors are clamped to the ring."""
    pub = bus.publisher(capacity=8)
    pub.publish_batch([b"x"] * 20)
    starts: dict[str | int, int] = {"latest": 20, "oldest": 12, 5: 12, 15: 15, 100: 20}
    for i, (start, cursor) in enumerate(starts.items()):
        h = pub.add_reader(f"r{i}", 4242, topics=0b110, start=start)
        e = pub.segment.entry(h.index)
        assert (e.state, e.cursor, e.pid, e.topics, e.name) == (
            ReaderState.ATTACHED,
            cursor,
            4242,
            0b110,
            f"r{i}",
        )
    with pytest.raises(ValueError, match="start 'newest' is not latest, oldest or a cursor"):
        pub.add_reader("bad", 1, start="newest")


def test_reader_table_full(bus: Bus) -> None:
    """Adding more readers than the table holds raises ReaderTableFull and leaks no eventfd."""
    pub = bus.publisher(max_readers=2)
    pub.add_reader("a", 1)
    pub.add_reader("b", 1)
    fds = len(fd_targets())
    with pytest.raises(ReaderTableFull, match="all 2 reader-table entries are taken"):
        pub.add_reader("c", 1)
    assert len(fd_targets()) == fds


def test_remove_reader_frees_its_entry(bus: Bus) -> None:
    """remove_reader frees the entry, closes the eventfd, and a new taker starts awake."""
    pub = bus.publisher()
    sub = bus.subscriber(pub, "gone")
    assert sub.prepare_sleep() is None
    assert pub.segment.entry(sub.index).asleep
    handle = pub.readers[sub.index]
    entry = pub.remove_reader(sub.index)
    assert entry is not None and entry.name == "gone"
    assert pub.segment.entry(sub.index).state == ReaderState.FREE
    assert handle.eventfd.closed
    assert pub.remove_reader(sub.index) is None
    pub.publish(b"nobody to wake")  # the removed sleeper is not answered (its fd is closed)
    again = pub.add_reader("next", 1)
    assert again.index == sub.index and again.token == handle.token + 1
    assert not pub.segment.entry(again.index).asleep


def test_holder_killed_with_the_mutex_is_repaired_and_the_bus_goes_on(
    bus: Bus,
    procs: Procs,
) -> None:
    """After a SIGKILLed holder, the writer gets OWNER_DIED, repairs the table, logs it, goes on."""
    pub = bus.publisher(max_readers=4)

    def holder(ch: ChildEnd) -> None:
        seg = Segment.open(fd=pub.segment.fileno())  # its own mapping, as a reader has
        assert seg.lock(None) is libc.LockResult.ACQUIRED
        # Holding an entry of a reader no live writer knows about (this
        # very process), as a previous writer's reader would.
        _, u0 = Segment.entry_words(3)
        seg.u[u0 + RU_PID] = os.getpid()
        seg.u[u0 + RU_STATE] = ReaderState.ATTACHED
        ch.send("locked")
        ch.recv()

    child = procs.fork(holder)
    child.expect("locked")
    assert child.kill() == -signal.SIGKILL
    with capture_logs() as logs:
        sub = bus.subscriber(pub)  # add_reader takes the mutex first
    (died,) = events(logs, "mutex_owner_died")
    assert (died["role"], died["freed_entries"]) == ("writer", [3])
    assert died["log_level"] == "warning"
    assert pub.segment.entry(3).state == ReaderState.FREE
    # The bus works: publish, read, and the sleep handshake through the mutex.
    pub.publish(b"after")
    assert [r.payload for r in sub.read()] == [b"after"]
    assert sub.prepare_sleep() is None
    pub.publish(b"wake")
    assert eventfd_count(sub.eventfd.fileno()) == 1  # type: ignore[union-attr]


def test_a_stuck_mutex_holder_does_not_stop_publishing(bus: Bus, procs: Procs) -> None:
    """Publishing and waking never take the mutex; a table change logs mutex_stalled once,
    and the first heartbeat after the holder lets go logs mutex_recovered."""
    pub = bus.publisher(mutex_timeout=0.05)
    sub = bus.subscriber(pub)
    assert sub.prepare_sleep() is None

    def holder(ch: ChildEnd) -> None:
        assert pub.segment.lock(None) is libc.LockResult.ACQUIRED
        ch.send(f"locked {os.getpid()}")
        ch.recv()
        pub.segment.unlock()

    child = procs.fork(holder)
    child.expect("locked")
    with capture_logs() as logs:
        pub.publish(b"still")
    assert events(logs, "mutex_stalled") == []
    assert eventfd_count(sub.eventfd.fileno()) == 1  # type: ignore[union-attr]
    assert [r.payload for r in sub.read()] == [b"still"]
    with capture_logs() as logs:
        pub.add_reader("late", 1)
        pub.add_reader("later", 1)
    (stalled,) = events(logs, "mutex_stalled")
    assert stalled["holder_tid"] == child.pid
    with capture_logs() as logs:
        pub.heartbeat()  # the holder still holds it: the stall goes on, silently
    assert logs == []
    child.tell("release")
    assert child.wait() == 0
    with capture_logs() as logs:
        pub.heartbeat()  # no table change needed to see that the stall ended
        pub.heartbeat()
    (recovered,) = events(logs, "mutex_recovered")
    assert recovered["stalled"] > 0
    assert pub.segment.lock(0) is libc.LockResult.ACQUIRED  # and it was left unlocked
    pub.segment.unlock()


def test_the_table_reports_changes_before_it_closes_an_eventfd(shm_name: str) -> None:
    """ReaderTable calls changed() on every change of its handles (while the eventfd is
    still open) and rewound() with each new cursor."""
    seg = Segment.create(shm_name, Geometry(8, 64, 2), Policy.DROP_OLDEST)
    calls: list[object] = []
    try:
        table = ReaderTable(
            seg,
            mutex_timeout=0.5,
            changed=lambda: calls.append([h.eventfd.closed for h in handles.values()]),
            rewound=calls.append,
        )
        handles = table.handles
        h = table.add("r", 1, 5, start="oldest")
        assert calls == [[False], 0]
        calls.clear()
        table.resume(h.index, 2, 3, 5)
        assert calls == [3] and h.pid == 2
        calls.clear()
        table.remove(h.index)
        assert calls == [[]] and h.eventfd.closed
    finally:
        seg.close()
        Segment.unlink_name(shm_name)


def test_a_suspended_durable_entry_keeps_its_cursor_and_is_taken_back_with_its_marks(
    bus: Bus,
) -> None:
    """suspend() keeps the entry dormant (holding the ring); reawaken() counts what comes again."""
    pub = bus.publisher(capacity=16, policy=Policy.BLOCK)
    sub = bus.subscriber(pub, "dur", topics=0b01, start="oldest")
    pub.publish_batch([b"a"] * 4, topic=0)
    pub.publish_batch([b"b"] * 2, topic=1)
    pub.publish_batch([b"c"] * 2, topic=0)
    rows = sub.read_batch(hold=True)
    assert [r[0] for r in rows] == [0, 1, 2, 3, 6, 7]
    # Handed over up to seq 6 (its record is in hand), done below seq 2.
    sub.take(7, 2)
    entry = pub.segment.entry(sub.index)
    assert (entry.cursor, entry.taken) == (2, 7)
    handle = pub.readers[sub.index]
    pub.table.suspend(sub.index)
    assert pub.segment.entry(sub.index).state == ReaderState.DORMANT
    assert sub.index in pub.readers  # still held: block waits for its cursor
    cursor, taken, again = pub.table.reawaken(sub.index, 4242, 0b01, 0, 5000)
    # Seqs 2, 3 and 6 are of topic 0 below the taken mark; 4 and 5 are not its topic.
    assert (cursor, taken, again) == (2, 7, 3)
    entry = pub.segment.entry(sub.index)
    assert (entry.state, entry.pid, entry.redelivered, entry.durable_ms) == (
        ReaderState.ATTACHED,
        4242,
        3,
        5000,
    )
    assert handle.pid == 4242


def test_count_records_counts_only_what_the_ring_still_holds(bus: Bus) -> None:
    """Records overwritten by a later lap are not counted, nor those of other topics."""
    pub = bus.publisher(capacity=8)
    pub.publish_batch([b"x"] * 20, topic=2)
    assert pub.table.count_records(0, 20, 1 << 2) == 8  # seqs 12..19 remain
    assert pub.table.count_records(14, 17, 1 << 2) == 3
    assert pub.table.count_records(14, 17, 1 << 3) == 0


def test_take_never_moves_a_published_cursor_back(bus: Bus) -> None:
    """After a read that published its cursor, take() stores its mark but releases nothing lower."""
    pub = bus.publisher(capacity=16, policy=Policy.BLOCK)
    sub = bus.subscriber(pub, "dur", start="oldest")
    pub.publish_batch([b"a"] * 8)
    assert len(sub.read_batch()) == 8  # not a hold read: the cursor is published at 8
    sub.take(6, 3)
    entry = pub.segment.entry(sub.index)
    assert (entry.cursor, entry.taken) == (8, 6)
