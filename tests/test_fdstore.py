"""Tests of shmd.daemons.fdstore: the fd store's names and sorting what systemd hands back.

The fd store itself (systemd keeping fds across a restart) is exercised by
tests/system; here real pipes stand in for the fds LISTEN_FDNAMES names.
"""

from __future__ import annotations

import os
import threading

import pytest
import structlog
from helpers import Bus
from structlog.testing import capture_logs

from shmd._sys.fd import OwnedFd
from shmd.bus.layout import ReaderState
from shmd.bus.publisher import ReaderHandle
from shmd.daemons import fdstore, logs


def pipe_fds(n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n):
        fds.extend(os.pipe2(os.O_CLOEXEC))
    return fds


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("index", [0, 7, 1023])
def test_reader_names_round_trip(index: int) -> None:
    """reader_index() reads back the index reader_name() put in the name."""
    assert fdstore.reader_name(index) == f"reader-{index}"
    assert fdstore.reader_index(fdstore.reader_name(index)) == index


@pytest.mark.parametrize("name", ["reader-", "reader-x", "reader--1", "segment", "lifeline-r"])
def test_reader_index_refuses_other_names(name: str) -> None:
    """A name that is not reader-<digits> has no index."""
    assert fdstore.reader_index(name) is None


def test_inherited_sorts_the_fds_by_name_and_closes_unknown_ones() -> None:
    """Each name lands in its field, the listener raw; a name the writer never stores is closed."""
    a, b, c, d, e, f, g, h = pipe_fds(4)
    found = fdstore.inherited(
        {
            "control": [a],
            "segment": [b],
            "lifeline-r": [c],
            "lifeline-w": [d],
            "reader-3": [e],
            "reader-bad": [f],
            "stray": [g, h],
        }
    )
    try:
        assert found.control == [a]
        assert [x.fileno() for x in found.segment] == [b]
        assert [x.fileno() for x in found.lifeline_r] == [c]
        assert [x.fileno() for x in found.lifeline_w] == [d]
        assert {k: [x.fileno() for x in v] for k, v in found.readers.items()} == {
            "reader-3": [e],
            "reader-bad": [f],
        }
        assert not is_open(g) and not is_open(h)
    finally:
        os.close(a)
        for owned in (found.segment, found.lifeline_r, found.lifeline_w, *found.readers.values()):
            for x in owned:
                x.close()


def test_an_unnamed_listener_is_taken_as_the_control_socket() -> None:
    """Without FileDescriptorName= the listener comes as "unknown": still the control socket."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        found = fdstore.inherited({"unknown": [r]})
        assert found.control == [r] and found.segment == [] and found.readers == {}
    finally:
        os.close(r)
        os.close(w)


def test_wake_orphans_writes_each_eventfd_once_and_closes_it() -> None:
    """Each orphaned eventfd gets one wake-up (counter 1) and is closed; one event says how many."""
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    dups = [os.dup(fd) for fd in efds]
    try:
        with capture_logs() as captured:
            fdstore.wake_orphans([OwnedFd(fd) for fd in efds], generation=5, log=logs.get_logger())
        assert [os.eventfd_read(fd) for fd in dups] == [1, 1]
        assert not any(is_open(fd) for fd in efds)
        assert [(e["event"], e["readers"], e["generation"]) for e in captured] == [
            ("readers_woken", 2, 5)
        ]
    finally:
        for fd in dups:
            os.close(fd)


def test_restored_durable_readers_go_to_a_new_process_and_are_kept_past_the_grace(
    bus: Bus,
) -> None:
    """A restored durable entry is handed to pop_durable, and kept (not freed) when the grace
    ends; a plain one is freed and logged lost."""
    pub = bus.publisher()
    durable = pub.add_reader("dur", 1, durable_ms=5000)
    other = pub.add_reader("dur2", 1, durable_ms=5000)
    plain = pub.add_reader("plain", 1)
    handles = {h.index: h for h in (durable, other, plain)}
    restored = fdstore.RestoredReaders(pub, handles, threading.Lock(), structlog.get_logger())
    assert restored.pop_durable("plain") is None
    assert restored.pop_durable("dur") is durable
    assert restored.names() == ["dur2", "plain"]
    kept: list[ReaderHandle] = []

    def keep(handle: ReaderHandle, why: str) -> bool:
        if pub.segment.entry(handle.index).durable_ms:
            kept.append(handle)
            return True
        return False

    with capture_logs() as captured:
        restored.expire(10.0, keep)
    assert kept == [other] and not restored
    assert pub.segment.entry(other.index).state == ReaderState.ATTACHED
    assert pub.segment.entry(plain.index).state == ReaderState.FREE
    assert [(e["event"], e["reader"]) for e in captured] == [(logs.READER_LOST, "plain")]
