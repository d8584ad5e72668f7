"""shmd.bus.reservation: zero-copy reserve/commit of one slot or a batch."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest
from helpers import Bus
from structlog.testing import capture_logs

from shmd import Publisher
from shmd.errors import PayloadTooLarge, SegmentClosed, TopicError


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
    """The with form commits on success and abandons on an exception, freeing the seq
    (reserve_seq stays up: it is never lowered)."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    with pub.reserve(3) as buf:
        buf[:] = b"one"
    with pytest.raises(RuntimeError), pub.reserve(3) as buf:
        buf[:] = b"bad"
        raise RuntimeError
    assert (pub.segment.write_seq, pub.segment.reserve_seq) == (1, 2)
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
    assert (pub.segment.write_seq, pub.segment.reserve_seq) == (3, 5)
    assert pub.publish(b"next") == 3  # the first abandoned seq, under the standing reserve
    assert (pub.segment.write_seq, pub.segment.reserve_seq) == (4, 5)
    assert pub.publish_batch([b"a", b"b"]) == 5
    assert (pub.segment.write_seq, pub.segment.reserve_seq) == (6, 6)
    with pytest.raises(ValueError, match="Failed to reserve 9 slots since the ring has 8"):
        pub.reserve_batch(9, 4)


def test_a_reader_copying_an_abandoned_slot_drops_it(
    bus: Bus,
) -> None:
    """A reservation half-filled over the oldest unread slot and abandoned while a reader a
    ring behind copies that slot: the reader's re-check still sees it reserved and drops it."""
    cap = 8
    pub = bus.publisher(capacity=cap)
    sub = bus.subscriber(pub, start="oldest")
    pub.publish_batch([b"rec%d" % s for s in range(cap)])

    def tear_the_slot(start: int, end: int) -> None:
        sub._r.hook = None  # once
        res = pub.reserve(4)  # seq 8: slot 0, which holds seq 0
        res.buffer[:2] = b"\xee\xee"
        res.abandon()

    sub._r.hook = tear_the_slot  # between the read's plan and its copy
    got = sub.read(cap)
    assert [(r.seq, r.payload) for r in got] == [(s, b"rec%d" % s) for s in range(1, cap)]
    assert sub.lost == 1


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda pub: pub.reserve("8"), TypeError, "size is str, not an int"),
        (lambda pub: pub.reserve(8, topic=1.5), TypeError, "topic is float, not an int"),
        (lambda pub: pub.reserve_batch(None, 8), TypeError, "count is NoneType, not an int"),
        (lambda pub: pub.reserve(8, 1, 2), TypeError, "takes a size and an optional topic"),
        (lambda pub: pub.reserve(-1), ValueError, "Failed to reserve -1 bytes since a size"),
        (lambda pub: pub.reserve(33), PayloadTooLarge, "Failed to publish a 33-byte record"),
        (lambda pub: pub.reserve(8, topic=64), TopicError, "topic 64 is not between 0 and 63"),
        (lambda pub: pub.reserve(8, 1 << 70), TopicError, f"topic {1 << 70} is not between"),
        (lambda pub: pub.reserve_batch(0, 8), ValueError, "Failed to reserve 0 slots since"),
        (lambda pub: pub.reserve_batch(1 << 70, 8), ValueError, f"reserve {1 << 70} slots"),
    ],
    ids=[
        "size",
        "topic-type",
        "count",
        "arity",
        "negative",
        "big",
        "topic",
        "huge-topic",
        "no-slots",
        "huge-count",
    ],
)
def test_a_bad_reservation_is_refused_and_reserves_nothing(
    bus: Bus, call: Callable[[Publisher], object], error: type[Exception], match: str
) -> None:
    """A reserve the core cannot take raises the one-line error a user reads, and leaves
    reserve_seq where it was."""
    pub = bus.publisher()
    with pytest.raises(error, match=re.escape(match) if error is not TypeError else match):
        call(pub)
    assert pub.segment.reserve_seq == pub.segment.write_seq == 0
    assert pub.reserve(8).commit() == 0


def test_a_commit_after_another_record_or_twice_is_refused(bus: Bus) -> None:
    """Committing after a publish took the seq, after an abandon, or with a bad length fails
    and publishes nothing."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    late = pub.reserve(4)
    pub.publish(b"took")
    with pytest.raises(ValueError, match="reservation of seq 0 since seq 0 was published after"):
        late.commit()
    gone = pub.reserve(4)
    gone.abandon()
    gone.abandon()  # idempotent
    with pytest.raises(ValueError, match="since it was already abandoned"):
        gone.commit()
    res = pub.reserve(4)
    for bad, error in ((5, ValueError), (-1, ValueError), ("2", TypeError)):
        with pytest.raises(error):
            res.commit(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes an optional length"):
        res.commit(1, 2)  # type: ignore[call-arg]
    res.buffer[:] = b"kept"
    assert res.commit(length=4) == 1
    assert [r.payload for r in sub.read()] == [b"took", b"kept"]


def test_commit_releases_the_buffers_and_waits_for_an_exported_one(bus: Bus) -> None:
    """A buffer something still exports blocks the commit (BufferError, nothing published);
    once it goes, the commit publishes and no buffer can write into the record any more."""
    pub = bus.publisher()
    sub = bus.subscriber(pub)
    res = pub.reserve_batch(2, 3)
    first, second = res.buffers
    second[:] = b"two"
    first[:] = b"one"
    pinned = struct.iter_unpack("B", first)  # holds an export of the first buffer
    with pytest.raises(BufferError):
        res.commit()
    assert pub.segment.write_seq == 0 and sub.read() == []
    del pinned
    assert res.commit() == 1
    assert [r.payload for r in sub.read()] == [b"one", b"two"]
    for buf in (first, second, res.buffer):
        with pytest.raises(ValueError, match="released"):
            buf[0] = 0


def test_a_reservation_held_over_close_keeps_the_ring_mapped(bus: Bus) -> None:
    """Closing the publisher under an open reservation leaves its buffer writable memory
    (the mapping goes with the last view), and the commit says the writer was closed."""
    pub = bus.publisher()
    res = pub.reserve(8)
    buf = res.buffer
    pub.close()
    buf[:] = b"no crash"
    assert bytes(buf) == b"no crash"
    with pytest.raises(ValueError, match="Failed to commit since the writer was closed"):
        res.commit()
    with pytest.raises(SegmentClosed):
        pub.reserve(8)


def test_block_policy_reserve_waits_for_the_slot_then_takes_it(bus: Bus) -> None:
    """On a full ring, reserve goes to the block policy's wait (a stopped reader is evicted
    after block_timeout), then hands out the slot."""
    cap = 4
    pub = bus.publisher(capacity=cap, policy="block", block_timeout=0.05)
    stuck = bus.subscriber(pub, "stuck")
    for i in range(cap):
        with pub.reserve(1) as buf:
            buf[:] = b"%d" % i
    with capture_logs() as logs:
        res = pub.reserve_batch(2, 1, topic=3)
    (evicted,) = [e for e in logs if e["event"] == "reader_evicted"]
    assert (evicted["reader"], evicted["seq"]) == ("stuck", 0)
    assert (res.seq, res.topic, len(res.buffers)) == (cap, 3, 2)
    assert res.commit() == cap + 1
    assert stuck.index not in pub.readers
