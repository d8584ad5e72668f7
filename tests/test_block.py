"""shmd.bus.block: the block policy waits for the slowest reader, evicts one that holds it up."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from helpers import Bus, ChildEnd, Procs, asleep_and_unlocked, attach, loop_reader, wait_until
from structlog.testing import capture_logs

from shmd.bus.layout import ReaderState, topic_mask
from shmd.bus.loop import ReaderLoop
from shmd.bus.readers import Eviction
from shmd.bus.subscriber import RawRecord
from shmd.errors import ReaderEvicted


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries whose event is ``name``."""
    return [e for e in logs if e["event"] == name]


def payload(seq: int) -> bytes:
    """The payload the multi-process tests publish as record ``seq``."""
    return seq.to_bytes(8, "little") * 3


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
