"""shmd.bus.reservation: zero-copy reserve/commit of one slot or a batch."""

from __future__ import annotations

import pytest
from helpers import Bus


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
