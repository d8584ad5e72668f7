"""shmd.bus.publisher: creating the bus, publishing, waking readers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from helpers import Bus, ChildEnd, Procs, drain, eventfd_count, in_dev_shm
from structlog.testing import capture_logs

from shmd.bus.layout import Policy, topic_mask
from shmd.bus.publisher import Publisher, ReaderHandle
from shmd.errors import GeometryError, PayloadTooLarge, SegmentClosed, TopicError


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries whose event is ``name``."""
    return [e for e in logs if e["event"] == name]


def payload(seq: int) -> bytes:
    """The payload the multi-process tests publish as record ``seq``."""
    return seq.to_bytes(8, "little") * 3


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
    with pytest.raises(GeometryError, match=message):
        Publisher.create(shm_name, **kwargs)  # type: ignore[arg-type]
    # (Only this name is looked at: other test runs on the machine create theirs.)
    assert not in_dev_shm(shm_name)


def test_unknown_policy_is_refused(shm_name: str) -> None:
    """A policy that is neither drop-oldest nor block raises ValueError, creating nothing."""
    with pytest.raises(ValueError, match="unknown overrun policy 'newest'"):
        Publisher.create(shm_name, policy="newest")
    assert not in_dev_shm(shm_name)


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


# -- a killed writer ----------------------------------------------------------------------


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


# -- waking readers ----------------------------------------------------------------------


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


@pytest.mark.parametrize("size", [1, 4096, 8000], ids=["small", "4KiB", "big"])
def test_wake_ups_come_after_the_commit(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A sleeping reader's eventfd is written only once the record is committed, whatever its
    size (no early wake-up: a woken reader always finds the record)."""
    pub = bus.publisher(capacity=4, slot_size=8192)
    sub = bus.subscriber(pub)
    assert sub.eventfd is not None
    fd = sub.eventfd.fileno()
    committed_at_wake: list[int] = []
    real = pub.table.restore_nonblocking

    def spy(h: ReaderHandle, efd: int) -> None:
        # The core calls this right before the eventfd write it is about to make.
        committed_at_wake.append(pub.segment.write_seq)
        real(h, efd)

    monkeypatch.setattr(pub.table, "restore_nonblocking", spy)
    assert sub.prepare_sleep() is None
    os.set_blocking(fd, True)  # so that the core reports the write it is about to make
    pub.publish(bytes(size))
    assert committed_at_wake == [1]
    assert eventfd_count(fd) == 1
    assert len(sub.read()) == 1


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
