"""shmd.bus.publisher: creating the bus, publishing, waking readers, the block policy."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from helpers import (
    Bus,
    ChildEnd,
    Procs,
    asleep_and_unlocked,
    attach,
    drain,
    eventfd_count,
    fd_targets,
    in_dev_shm,
    loop_reader,
    wait_until,
)
from structlog.testing import capture_logs

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus import publisher as publisher_module
from shmd.bus.layout import R_PID, R_STATE, Policy, ReaderState, topic_mask
from shmd.bus.loop import ReaderLoop
from shmd.bus.publisher import EARLY_WAKE_MAX, Eviction, Publisher
from shmd.bus.segment import Segment
from shmd.bus.subscriber import RawRecord
from shmd.errors import (
    GeometryError,
    PayloadTooLarge,
    ReaderEvicted,
    ReaderTableFull,
    SegmentClosed,
    SegmentExists,
    TopicError,
)


def payload(seq: int) -> bytes:
    """The payload the multi-process tests publish as record ``seq``."""
    return seq.to_bytes(8, "little") * 3


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries whose event is ``name``."""
    return [e for e in logs if e["event"] == name]


# -- create --------------------------------------------------------------------------------


def test_create_initialises_the_segment(shm_name: str) -> None:
    """create() makes an active segment owned by this pid with the asked geometry and policy."""
    with capture_logs() as logs:
        pub = Publisher.create(shm_name, capacity=16, slot_size=128, max_readers=3, policy="block")
    try:
        h = pub.segment.header()
        assert (h.active, h.writer_pid, h.capacity, h.slot_size, h.max_readers, h.policy) == (
            True,
            os.getpid(),
            16,
            128,
            3,
            Policy.BLOCK,
        )
        assert pub.policy is Policy.BLOCK and pub.write_seq == 0
        assert events(logs, "segment_created")[0]["generation"] == pub.generation
    finally:
        pub.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity 0 is not a power of two"),
        ({"capacity": 1000}, "capacity 1000 is not a power of two"),
        ({"capacity": 1 << 30}, f"capacity {1 << 30} is not a power of two"),
        ({"slot_size": 0}, "slot size 0 is not a multiple of 8"),
        ({"slot_size": 100}, "slot size 100 is not a multiple of 8"),
        ({"slot_size": 1 << 31}, f"slot size {1 << 31} is not a multiple of 8"),
        ({"max_readers": 0}, "max_readers 0 is not between 1"),
        ({"capacity": 1 << 20, "slot_size": 1 << 20}, "more than 17179869184"),
    ],
)
def test_impossible_geometry_is_refused_and_leaves_nothing(
    shm_name: str,
    kwargs: dict[str, int],
    message: str,
) -> None:
    """Zero or absurd sizes raise GeometryError naming the value; /dev/shm gets no entry."""
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(GeometryError, match=message):
        Publisher.create(shm_name, **kwargs)  # type: ignore[arg-type]
    assert not in_dev_shm(shm_name)
    assert not {n for n in set(os.listdir("/dev/shm")) - before if "shmd-test" in n}


def test_unknown_policy_is_refused(shm_name: str) -> None:
    """A policy that is neither drop-oldest nor block raises ValueError, creating nothing."""
    with pytest.raises(ValueError, match="unknown overrun policy 'newest'"):
        Publisher.create(shm_name, policy="newest")
    assert not in_dev_shm(shm_name)


def test_a_live_writers_segment_is_refused_and_a_dead_ones_replaced(
    shm_name: str,
    procs: Procs,
) -> None:
    """create() refuses a running writer's segment and replaces it once that writer is SIGKILLed."""

    def writer(ch: ChildEnd) -> None:
        pub = Publisher.create(shm_name, capacity=8, slot_size=64)
        ch.send(f"created {pub.generation}")
        ch.recv()

    child = procs.fork(writer)
    old_generation = int(child.expect("created").split()[1])
    with pytest.raises(SegmentExists, match=f"since writer pid {child.pid} is running and owns it"):
        Publisher.create(shm_name)
    with pytest.raises(SegmentExists, match="already exists"):
        Publisher.create(shm_name, replace_stale=False)
    with Segment.open(name=shm_name, control_writable=False) as seg:
        assert seg.generation == old_generation  # untouched

    assert child.kill() == -signal.SIGKILL  # a kill -9 leaves the segment behind
    assert in_dev_shm(shm_name)
    with capture_logs() as logs:
        pub = Publisher.create(shm_name)
    try:
        assert pub.generation != old_generation
        assert events(logs, "segment_stale")[0]["writer_pid"] == child.pid
        assert [n for n in os.listdir("/dev/shm") if n == shm_name.lstrip("/")] == [
            shm_name.lstrip("/")
        ]
    finally:
        pub.close()


def test_a_live_but_deactivated_writers_segment_is_replaced(shm_name: str, procs: Procs) -> None:
    """A segment whose writer still runs but cleared the active flag counts as stale."""

    def writer(ch: ChildEnd) -> None:
        pub = Publisher.create(shm_name, capacity=8, slot_size=64)
        pub.deactivate()
        ch.send("deactivated")
        ch.recv()

    child = procs.fork(writer)
    child.expect("deactivated")
    with capture_logs() as logs:
        Publisher.create(shm_name).close()
    assert events(logs, "segment_stale")[0]["writer_pid"] == child.pid


def test_a_corrupt_segment_is_replaced(shm_name: str) -> None:
    """A leftover object with an unreadable header is replaced, the reason logged."""
    fd = OwnedFd(libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL))
    with fd:
        os.ftruncate(fd.fileno(), 100)
    with capture_logs() as logs:
        Publisher.create(shm_name).close()
    assert "too small for the 256-byte header" in str(events(logs, "segment_stale")[0]["reason"])


def test_context_manager_closes_and_unlinks(shm_name: str) -> None:
    """Leaving the with block closes the publisher and removes the name from /dev/shm."""
    with capture_logs() as logs, Publisher.create(shm_name) as pub:
        assert in_dev_shm(shm_name)
    assert not in_dev_shm(shm_name)
    assert pub.segment.closed
    assert events(logs, "segment_unlinked")
    pub.close()  # idempotent
    pub.unlink()  # idempotent


def test_a_closed_publisher_refuses_to_publish(bus: Bus) -> None:
    """publish, reserve and add_reader on a closed publisher raise SegmentClosed."""
    pub = bus.publisher()
    handle = pub.add_reader("r", os.getpid())
    pub.close()
    assert handle.eventfd.closed
    for call in (lambda: pub.publish(b"x"), lambda: pub.reserve(1), lambda: pub.add_reader("s", 1)):
        with pytest.raises(SegmentClosed, match="publisher was closed"):
            call()


# -- publishing ---------------------------------------------------------------------------


def test_publish_assigns_consecutive_seqs(bus: Bus) -> None:
    """publish and publish_batch return the last seq and commit every record in order."""
    pub = bus.publisher(capacity=16)
    sub = bus.subscriber(pub)
    assert pub.publish(b"a", topic=3) == 0
    assert pub.publish_batch([b"b", bytearray(b"c"), memoryview(b"d")], topic=4) == 3
    assert pub.publish_batch([]) == 3
    assert [(r.seq, r.topic, r.payload) for r in sub.read()] == [
        (0, 3, b"a"),
        (1, 4, b"b"),
        (2, 4, b"c"),
        (3, 4, b"d"),
    ]
    h = pub.segment.header()
    assert (h.write_seq, h.reserve_seq, h.bytes_published) == (4, 4, 4)


def test_payload_too_large_names_both_sizes_and_publishes_nothing(bus: Bus) -> None:
    """A record over the slot's room raises PayloadTooLarge naming both sizes; nothing commits."""
    pub = bus.publisher(slot_size=64)
    with pytest.raises(
        PayloadTooLarge,
        match=r"Failed to publish a 33-byte record since a slot "
        r"holds at most 32 bytes of payload \(slot size 64",
    ):
        pub.publish(b"x" * 33)
    with pytest.raises(PayloadTooLarge):
        pub.publish_batch([b"ok", b"x" * 33])
    with pytest.raises(PayloadTooLarge):
        pub.reserve(33)
    with pytest.raises(TopicError, match="topic 64 is not between 0 and 63"):
        pub.publish(b"x", topic=64)
    assert pub.publish(b"x" * 32) == 0
    assert pub.segment.reserve_seq == pub.segment.write_seq == 1


def test_batch_larger_than_the_ring(bus: Bus) -> None:
    """A batch of several ring-fulls commits all of it; a reader from the oldest loses the rest."""
    pub = bus.publisher(capacity=8)
    sub = bus.subscriber(pub)
    assert pub.publish_batch([payload(i) for i in range(20)]) == 19
    records = drain(sub)
    assert [r.seq for r in records] == list(range(12, 20))
    assert sub.lost == 12


def test_heartbeat_is_stored(bus: Bus) -> None:
    """heartbeat() stores a fresh CLOCK_MONOTONIC time in the header."""
    pub = bus.publisher()
    before = time.monotonic_ns()
    pub.heartbeat()
    assert before <= pub.segment.header().heartbeat_ns <= time.monotonic_ns()


# -- zero-copy reserve/commit ---------------------------------------------------------------


def test_reserve_commit_publishes_in_place(bus: Bus) -> None:
    """A reservation is filled in the ring itself and becomes visible only on commit."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    res = pub.reserve(10, topic=5)
    assert res.seq == 0 and len(res.buffer) == 10
    assert pub.segment.reserve_seq == 1 and pub.segment.write_seq == 0
    res.buffer[:] = b"zero-copy!"
    assert sub.read() == []  # reserved, not committed
    assert res.commit(4) == 0
    (rec,) = sub.read()
    assert (rec.seq, rec.topic, rec.payload) == (0, 5, b"zero")
    with pytest.raises(ValueError, match="already committed"):
        res.commit()


def test_reservation_context_manager(bus: Bus) -> None:
    """The with form commits on success and abandons on an exception, freeing the seq."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    with pub.reserve(3) as buf:
        buf[:] = b"one"
    with pytest.raises(RuntimeError), pub.reserve(3) as buf:
        buf[:] = b"bad"
        raise RuntimeError
    assert pub.segment.reserve_seq == pub.segment.write_seq == 1
    res = pub.reserve(3)
    assert res.seq == 1
    with pytest.raises(ValueError, match="Failed to commit 4 bytes since 3 were reserved"):
        res.commit(4)
    res.buffer[:] = b"two"
    res.commit()
    assert [r.payload for r in sub.read()] == [b"one", b"two"]


def test_reserve_batch_commits_every_slot_at_once(bus: Bus) -> None:
    """A batch reservation fills consecutive slots in place and publishes them with one commit."""
    pub = bus.publisher(capacity=8)
    sub = bus.subscriber(pub)
    res = pub.reserve_batch(3, 4, topic=2)
    assert (res.seq, len(res.buffers)) == (0, 3)
    assert pub.segment.reserve_seq == 3 and pub.segment.write_seq == 0
    for i, buf in enumerate(res.buffers):
        buf[:] = b"rec%d" % i
    assert sub.read() == []  # reserved, not committed
    assert res.commit() == 2
    assert [(r.seq, r.topic, r.payload) for r in sub.read()] == [
        (0, 2, b"rec0"),
        (1, 2, b"rec1"),
        (2, 2, b"rec2"),
    ]
    abandoned = pub.reserve_batch(2, 4)
    abandoned.abandon()
    assert pub.segment.reserve_seq == pub.segment.write_seq == 3
    with pytest.raises(ValueError, match="Failed to reserve 9 slots since the ring has 8"):
        pub.reserve_batch(9, 4)


def test_torn_write_by_a_killed_writer_is_never_read(bus: Bus, procs: Procs) -> None:
    """A writer SIGKILLed between reserve and commit leaves no record; its slot counts as lost."""
    pub = bus.publisher(capacity=8)
    sub = bus.subscriber(pub)
    pub.publish_batch([payload(i) for i in range(8)])  # a full ring the reader has not read

    def writer(ch: ChildEnd) -> None:
        res = pub.reserve(24)
        res.buffer[:12] = b"TORN" * 3  # half of it
        ch.send("reserved")
        ch.recv()

    child = procs.fork(writer)
    child.expect("reserved")
    assert child.kill() == -signal.SIGKILL
    assert (pub.segment.write_seq, pub.segment.reserve_seq) == (8, 9)
    records = drain(sub)
    assert [(r.seq, r.payload) for r in records] == [(i, payload(i)) for i in range(1, 8)]
    assert sub.lost == 1  # seq 0's slot was being overwritten
    assert sub.read() == []
    # The bus goes on: the next commit takes the slot over.
    pub.publish(b"after")
    assert [(r.seq, r.payload) for r in sub.read()] == [(8, b"after")]


# -- readers -------------------------------------------------------------------------------


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


def test_a_removed_readers_eventfd_number_is_never_written(bus: Bus) -> None:
    """After remove_reader, a publish writes nothing to whatever now has that eventfd's number."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    assert sub.prepare_sleep() is None  # asleep, unanswered: a stale wake row would fire
    number = pub.readers[sub.index].eventfd.fileno()
    pub.remove_reader(sub.index)
    stranger = os.eventfd(0, os.EFD_NONBLOCK)  # usually gets that number: the lowest free
    try:
        if stranger != number:
            os.dup2(stranger, number)
        pub.publish(b"x")
        assert eventfd_count(number) == 0
    finally:
        os.close(stranger)
        if stranger != number:
            os.close(number)


def test_awake_reader_costs_no_eventfd_write(bus: Bus) -> None:
    """While a reader is not asleep, publishing never writes its eventfd."""
    pub = bus.publisher(capacity=64)
    sub = bus.subscriber(pub)
    assert sub.eventfd is not None
    pub.publish_batch([b"x"] * 10)
    for _ in range(10):
        pub.publish(b"y")
    assert eventfd_count(sub.eventfd.fileno()) == 0
    assert len(sub.read()) == 20
    assert sub.prepare_sleep() is None
    pub.publish(b"z")  # answers the announcement: one write
    assert eventfd_count(sub.eventfd.fileno()) == 1
    assert not pub.segment.entry(sub.index).asleep
    assert len(sub.read()) == 1
    for _ in range(10):  # awake again: no more writes
        pub.publish(b"w")
    assert eventfd_count(sub.eventfd.fileno()) == 0


def test_a_reader_woken_before_the_commit_is_woken_again_after_it(
    bus: Bus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """publish() wakes sleepers before it writes a small record; a reader that looks too soon
    finds nothing, announces again, and the commit's own check wakes it a second time."""
    pub = bus.publisher(capacity=64)
    sub = bus.subscriber(pub)
    assert sub.eventfd is not None
    seen: list[tuple[int, list[bytes | memoryview], float | None]] = []

    def write_then_look(fd: int, data: bytes) -> int:
        written = os.write(fd, data)
        if not seen:  # the early wake-up: the reader runs before the commit
            woken = eventfd_count(sub.eventfd.fileno())  # type: ignore[union-attr]
            seen.append((woken, [r.payload for r in sub.read()], sub.prepare_sleep()))
        return written

    monkeypatch.setattr(publisher_module, "_write", write_then_look)
    assert sub.prepare_sleep() is None
    pub.publish(b"small")
    assert seen == [(1, [], None)]  # woken, nothing committed yet, asleep again
    assert eventfd_count(sub.eventfd.fileno()) == 1  # the second wake-up, after the commit
    assert [r.payload for r in sub.read()] == [b"small"]


def test_big_records_wake_after_the_commit_only(
    bus: Bus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record longer than EARLY_WAKE_MAX is committed before its wake-up is written."""
    pub = bus.publisher(capacity=4, slot_size=EARLY_WAKE_MAX + 64)
    sub = bus.subscriber(pub)
    assert sub.eventfd is not None
    committed_at_wake: list[int] = []

    def spy(fd: int, data: bytes) -> int:
        committed_at_wake.append(pub.segment.write_seq)
        return os.write(fd, data)

    monkeypatch.setattr(publisher_module, "_write", spy)
    assert sub.prepare_sleep() is None
    pub.publish(bytes(EARLY_WAKE_MAX + 1))
    assert committed_at_wake == [1]
    assert len(sub.read()) == 1
    assert sub.prepare_sleep() is None
    pub.publish(bytes(EARLY_WAKE_MAX))
    assert committed_at_wake == [1, 1]  # the small one's wake-up came before its commit


def test_an_unanswered_announcement_stands_and_is_answered_once(bus: Bus) -> None:
    """A reader that announced a sleep and woke for something else is written exactly once."""
    pub = bus.publisher(capacity=64)
    sub = bus.subscriber(pub)
    count = pub.segment.header().sleep_count
    assert sub.prepare_sleep() is None
    assert sub.prepare_sleep() is None  # still announced: not counted again
    assert pub.segment.header().sleep_count == count + 1
    pub.publish_batch([b"a", b"b"])
    pub.publish(b"c")
    assert eventfd_count(sub.eventfd.fileno()) == 1  # type: ignore[union-attr]
    assert [r.payload for r in sub.read()] == [b"a", b"b", b"c"]


def test_prepare_sleep_drains_a_pending_wake_up_before_announcing(bus: Bus) -> None:
    """prepare_sleep consumes what the eventfd holds, so the epoll that follows waits."""
    pub = bus.publisher(capacity=64)
    sub = bus.subscriber(pub)
    assert sub.eventfd is not None
    os.write(sub.eventfd.fileno(), (3).to_bytes(8, "little"))  # stale wake-ups
    assert sub.prepare_sleep() is None
    assert eventfd_count(sub.eventfd.fileno()) == 0


def test_sleeping_readers_are_woken_only_for_their_topics(bus: Bus) -> None:
    """A commit writes the eventfd of sleeping readers subscribed to its topic, and no other."""
    pub = bus.publisher()
    one = bus.subscriber(pub, "one", topics=topic_mask([1]))
    two = bus.subscriber(pub, "two", topics=topic_mask([2]))
    every = bus.subscriber(pub, "all")
    for s in (one, two, every):
        assert s.prepare_sleep() is None
    pub.publish(b"for two", topic=2)
    counts = {s.index: eventfd_count(s.eventfd.fileno()) for s in (one, two, every)}  # type: ignore[union-attr]
    assert counts == {one.index: 0, two.index: 1, every.index: 1}
    assert pub.segment.entry(one.index).asleep
    assert not pub.segment.entry(two.index).asleep
    pub.publish(b"two again", topic=2)  # sleep_count unchanged: only `one` is looked at
    assert eventfd_count(one.eventfd.fileno()) == 0  # type: ignore[union-attr]
    pub.publish(b"for one", topic=1)
    assert eventfd_count(one.eventfd.fileno()) == 1  # type: ignore[union-attr]
    assert not any(pub.segment.entry(s.index).asleep for s in (one, two, every))


def test_deactivate_clears_active_and_wakes_everyone(bus: Bus) -> None:
    """deactivate() clears the active flag and writes every reader's eventfd, asleep or not."""
    pub = bus.publisher()
    sleeper = bus.subscriber(pub, "sleeper")
    awake = bus.subscriber(pub, "awake")
    assert sleeper.prepare_sleep() is None
    pub.deactivate()
    assert not pub.segment.active and not sleeper.active
    for s in (sleeper, awake):
        assert eventfd_count(s.eventfd.fileno()) == 1  # type: ignore[union-attr]
    assert not pub.segment.entry(sleeper.index).asleep
    assert sleeper.prepare_sleep() == 0.0  # an inactive bus is never slept on


# -- the mutex: dead and stuck holders ----------------------------------------------------


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
        seg.u[u0 + R_PID // 4] = os.getpid()
        seg.u[u0 + R_STATE // 4] = ReaderState.ATTACHED
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
    """Publishing and waking never take the mutex; a table change logs mutex_stalled once."""
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
    child.tell("release")
    assert child.wait() == 0


# -- block policy ---------------------------------------------------------------------------


def test_block_policy_one_writer_four_reader_processes(
    bus: Bus,
    procs: Procs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under block, 4 reader processes each get all 200k records in order; the writer waits."""
    n, readers = 200_000, 4
    pub = bus.publisher(capacity=64, slot_size=64, policy="block", block_timeout=15.0)
    children = []
    for i in range(readers):
        handle = pub.add_reader(f"r{i}", os.getpid())

        def body(ch: ChildEnd, handle_index: int = handle.index) -> None:
            sub = attach(pub, pub.readers[handle_index])
            state = {"next": 0, "bad": 0}

            def check(batch: list[RawRecord]) -> None:
                expected = state["next"]
                for seq, _ts, _topic, data in batch:
                    if seq != expected or data != payload(expected):
                        state["bad"] += 1
                    expected += 1
                state["next"] = expected

            ch.send("ready")
            result = ReaderLoop(sub, check).run()
            ch.send(f"exit {result.name} {state['next']} {state['bad']} {sub.lost} {sub.delivered}")

        children.append(procs.fork(body))
    for child in children:
        child.expect("ready")

    waits = 0
    real_wait = pub.segment.sem_wait

    def counting_wait(timeout: float) -> bool:
        nonlocal waits
        waits += 1
        return real_wait(timeout)

    monkeypatch.setattr(pub.segment, "sem_wait", counting_wait)
    records = [payload(i) for i in range(n)]
    for i in range(0, n, 16):
        pub.publish_batch(records[i : i + 16])
    pub.deactivate()
    for child in children:
        assert child.expect("exit") == f"exit DRAINED {n} 0 0 {n}"
        assert child.wait() == 0
    assert pub.evictions == []
    assert waits > 0  # the writer really had to wait for the readers


def test_block_policy_checks_space_again_for_a_reader_that_starts_behind(bus: Bus) -> None:
    """A reader added at the oldest record is waited for, although the space before it was known."""
    pub = bus.publisher(capacity=8, policy="block", block_timeout=0.05)
    fast = bus.subscriber(pub, "fast")
    for i in range(20):  # the fast reader keeps up: room is known up to its cursor + 8
        pub.publish(b"%d" % i)
        assert len(fast.read()) == 1
    late = bus.subscriber(pub, "late", start="oldest")
    assert pub.segment.entry(late.index).cursor == 12
    with capture_logs() as logs:
        pub.publish(b"20")  # would overwrite record 12, which `late` has not read
    (evicted,) = events(logs, "reader_evicted")
    assert (evicted["reader"], evicted["seq"]) == ("late", 12)
    assert [r.payload for r in fast.read()] == [b"20"]


def test_block_policy_evicts_a_stopped_reader_and_goes_on(
    bus: Bus,
    procs: Procs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped reader is evicted after block_timeout, reads ReaderEvicted; the writer goes on."""
    cap, timeout = 8, 0.3
    pub = bus.publisher(capacity=cap, policy="block", block_timeout=timeout)
    healthy = bus.subscriber(pub, "healthy")
    stalled = pub.add_reader("stalled", os.getpid())

    def body(ch: ChildEnd) -> None:
        sub = attach(pub, stalled)
        ch.send("attached")
        try:
            while True:
                sub.wait()
                sub.read()
        except ReaderEvicted as exc:
            ch.send(f"evicted {exc}")

    child = procs.fork(body)
    child.expect("attached")
    wait_until(asleep_and_unlocked(pub, stalled.index), "the stalled reader sleeps")
    child.signal(signal.SIGSTOP)

    pub.publish_batch([payload(i) for i in range(cap)])  # the ring is now full for it
    assert len(healthy.read()) == cap
    t0 = time.monotonic()
    with capture_logs() as logs:
        pub.publish(payload(cap))  # must wait block_timeout, then evict
    assert time.monotonic() - t0 >= timeout
    (ev,) = events(logs, "reader_evicted")
    assert (ev["reader"], ev["seq"], ev["write_seq"]) == ("stalled", 0, cap)
    assert pub.evictions == [Eviction(stalled.index, "stalled", os.getpid(), 0, cap)]
    assert pub.segment.entry(stalled.index).state == ReaderState.EVICTED
    assert stalled.index not in pub.readers

    # The writer goes on with the healthy reader alone, never waiting again.
    waits: list[float] = []

    def no_wait(timeout: float) -> bool:
        waits.append(timeout)
        return False

    monkeypatch.setattr(pub.segment, "sem_wait", no_wait)
    got = healthy.read()
    for i in range(cap + 1, 5 * cap):
        pub.publish(payload(i))
        got += healthy.read()
    assert waits == []
    assert [r.seq for r in got] == list(range(cap, 5 * cap))

    child.signal(signal.SIGCONT)
    assert "Failed to read since the writer evicted reader entry" in child.expect("evicted")
    assert child.wait() == 0
    pub.free_evicted(stalled.index)
    assert pub.segment.entry(stalled.index).state == ReaderState.FREE


def test_block_policy_wakes_a_sleeping_reader_of_other_topics(bus: Bus, procs: Procs) -> None:
    """A reader asleep on topic 1 holds the writer up on topic 2 records only until it is woken."""
    cap = 8
    pub = bus.publisher(capacity=cap, policy="block", block_timeout=10.0)
    handle = pub.add_reader("topic1", os.getpid(), topics=topic_mask([1]))
    child = procs.fork(loop_reader(pub, handle.index))
    child.expect("ready")
    wait_until(asleep_and_unlocked(pub, handle.index), "the reader sleeps")
    pub.publish_batch([b"other"] * (4 * cap), topic=2)
    assert pub.evictions == []
    assert pub.segment.entry(handle.index).cursor >= 3 * cap  # it kept up, skipping them
    pub.publish(b"mine", topic=1)
    assert child.expect("record") == f"record {4 * cap} 1 {b'mine'.hex()}"
    pub.deactivate()
    assert child.expect("exit") == "exit DRAINED 1 0"
    assert child.wait() == 0
