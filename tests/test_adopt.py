"""shmd.bus.adopt: replacing a stale segment (and adopting a stored one, tests/test_faults.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from helpers import ChildEnd, Procs, in_dev_shm
from structlog.testing import capture_logs

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus.publisher import Publisher
from shmd.bus.segment import Segment
from shmd.errors import SegmentExists


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    """The captured log entries whose event is ``name``."""
    return [e for e in logs if e["event"] == name]


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


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copied"])
def test_adopt_keeps_seq_cursors_and_discards_the_uncommitted(
    shm_name: str, in_place: bool
) -> None:
    """adopt() goes on at write_seq with every entry's cursor, in place or copied under the name."""
    old = Publisher.create(shm_name, capacity=8, slot_size=64)
    handle = old.add_reader("r", os.getpid(), start="oldest")
    old.publish_batch([b"a", b"b", b"c"])
    old.reserve(1)  # reserved, never committed: discarded
    stored = OwnedFd(os.dup(old.segment.fileno()))
    old.close()
    if not in_place:
        Segment.unlink_name(shm_name)  # a clean stop removed the name
    with capture_logs() as logs:
        new = Publisher.adopt(shm_name, stored)
    try:
        (adopted,) = events(logs, "segment_adopted")
        assert (adopted["in_place"], adopted["discarded"], adopted["readers"]) == (in_place, 1, 1)
        # The discarded reservation's reserve stands (readers re-check against it).
        assert (new.write_seq, new.segment.reserve_seq) == (3, 4)
        assert new.segment.entry(handle.index).cursor == 0
        assert new.segment.active and new.segment.writer_pid == os.getpid()
        assert new.publish(b"d") == 3
    finally:
        new.close()
