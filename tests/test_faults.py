"""Faults, hostile participants and broken input, with real processes and real segments.

Each test injects one fault into a running bus (a stopped reader, a process
that holds the shared mutex and never lets go, a writer killed half-way
through a record, an eventfd nobody drains, attach/detach churn) or feeds a
component input built to break it (segment headers, configuration files,
the start-up environment), and checks the defined outcome: the bus goes on,
nothing is delivered torn, what is lost is counted, and every failure is one
clear log line.  The restart scenarios that need systemd's fd store live in
tests/system/test_system_faults.py.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_bus import Bus as ProcBus
from daemon_bus import (
    Daemon,
    assert_contiguous,
    program,
    read_lines,
    running_bus,
    tick_numbers,
    wait_until,
)
from helpers import Bus, ChildEnd, Procs, attach, maps_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import (
    ALL_TOPICS,
    OFF_CAPACITY,
    OFF_CONTROL_SIZE,
    OFF_MAX_READERS,
    OFF_POLICY,
    OFF_RESERVE_SEQ,
    OFF_RING_OFFSET,
    OFF_SEGMENT_SIZE,
    OFF_SLOT_SIZE,
    OFF_VERSION,
    OFF_WRITE_SEQ,
    Geometry,
    Policy,
    ReaderState,
    topic_mask,
)
from shmd.bus.loop import ReaderLoop
from shmd.bus.publisher import Publisher
from shmd.bus.segment import Segment
from shmd.bus.subscriber import RawRecord, Subscriber
from shmd.config import ConfigError, load_config
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.listener import connect
from shmd.daemons import logs
from shmd.errors import ReaderEvicted, SegmentLayoutError

SEQPACKET = socket.SOCK_SEQPACKET
DEADLINE = 30.0  # the machine is shared and small: generous, but every wait is bounded


@pytest.fixture
def world() -> Iterator[ProcBus]:
    """A bus of real shm-writer/shm-reader processes, all killed and removed afterwards."""
    with running_bus() as b:
        yield b


def ticks(bus: ProcBus, instance: str) -> list[int]:
    """The tick numbers in reader ``instance``'s file sink."""
    return tick_numbers(read_lines(bus.out(instance)))


def receives_more(bus: ProcBus, instance: str, more: int, timeout: float = DEADLINE) -> None:
    """Wait until reader ``instance`` got ``more`` ticks past the last one it has now."""
    have = ticks(bus, instance)
    target = (have[-1] if have else 0) + more

    def reached() -> bool:
        numbers = ticks(bus, instance)
        return bool(numbers) and numbers[-1] >= target

    wait_until(reached, timeout, what=f"reader {instance} reaching tick {target}")


def gaps(numbers: list[int]) -> int:
    """How many numbers are missing between the first and the last (no duplicates allowed)."""
    assert len(set(numbers)) == len(numbers), "a record was delivered twice"
    assert numbers == sorted(numbers), "records were delivered out of order"
    return numbers[-1] - numbers[0] + 1 - len(numbers)


# -- a reader that speaks the protocol itself (the hostile participant) ------------------------


def raw_attach(bus: ProcBus, instance: str) -> tuple[Connection, Subscriber]:
    """Connect, say Hello and map the segment from the Welcome, as shm-reader does."""
    conn = connect(bus.socket, SEQPACKET, timeout=DEADLINE)
    conn.send(protocol.Hello(instance=instance, pid=os.getpid()).encode(), timeout=DEADLINE)
    frame = conn.recv(timeout=DEADLINE)
    fds = [f.detach() for f in frame.fds]
    msg = protocol.decode(frame.body, len(fds))
    assert isinstance(msg, protocol.Welcome), msg
    os.close(fds[2])  # the lifeline: this reader does not care when the writer goes
    sub = Subscriber.attach(index=msg.reader_index, fd=OwnedFd(fds[1]), eventfd=OwnedFd(fds[0]))
    return conn, sub


def announce_sleep_raw(sub: Subscriber) -> None:
    """Announce a sleep as the protocol says (step [S3] alone), without Subscriber.prepare_sleep's
    drain of the eventfd first (as a reader that does not use shmd's code may)."""
    sub._r.announce()


# -- a stalled or malicious participant cannot stop the bus ------------------------------------


def test_mutex_hog_costs_the_writer_one_timeout_and_is_named(
    world: ProcBus,
    procs: Procs,
) -> None:
    """A reader that locks the shared mutex and never unlocks costs publishing nothing; the
    next reader-table change names it in one mutex_stalled line; all recovers once it is killed."""
    world.configure(
        segment={"mutex_timeout": 0.5}, writer={"source": {"type": "ticker", "rate": 100.0}}
    )
    w = world.writer()
    healthy = world.file_reader("healthy")
    receives_more(world, "healthy", 5)

    def hog(ch: ChildEnd) -> None:
        _conn, sub = raw_attach(world, "hog")
        assert sub.segment.lock(None) is libc.LockResult.ACQUIRED
        ch.send("locked")
        ch.recv(timeout=3600)

    child = procs.fork(hog)
    child.expect("locked", DEADLINE)
    mark = w.mark()
    # 100 ticks/s: if commits waited mutex_timeout for the hog (2/s), 200
    # more ticks would take 100 s.  (Readers announce their sleeps without
    # the mutex: the healthy one sleeps and wakes as always.)
    receives_more(world, "healthy", 200)
    assert not w.find("mutex_stalled", since=mark)  # publishing never takes the mutex
    late = world.file_reader("late")  # a reader-table change meets the hog
    stalled = w.wait_for("mutex_stalled", DEADLINE, since=mark)
    assert (stalled["holder_tid"], stalled["holder_pid"], stalled["reader"]) == (
        child.pid,
        child.pid,
        "hog",
    )
    receives_more(world, "late", 5)
    assert len(w.find("mutex_stalled", since=mark)) == 1  # one line per stall
    assert child.kill() == -signal.SIGKILL
    w.wait_for("reader_lost", DEADLINE, reader="hog")
    assert w.wait_for("mutex_recovered", DEADLINE, since=mark)["stalled"] > 0
    # The writer is the only one that locks (readers never do): it gets
    # EOWNERDEAD and repairs the table.
    died = wait_until(
        lambda: w.find("mutex_owner_died"),
        DEADLINE,
        what="the writer repairing the mutex the hog died holding",
    )
    assert died[0]["role"] == "writer"
    assert not [e for d in (healthy, late) for e in d.find("mutex_owner_died")]
    receives_more(world, "healthy", 20)
    w.terminate()
    assert w.wait_exit(DEADLINE) == 0
    assert_contiguous(ticks(world, "healthy"), "ticks of the healthy reader")


@pytest.mark.parametrize("tamper", [False, True], ids=["full-counter", "full-and-blocking"])
def test_an_eventfd_nobody_drains_never_blocks_the_writer(
    world: ProcBus,
    procs: Procs,
    tamper: bool,
) -> None:
    """A reader asleep with its eventfd counter at the maximum (even with O_NONBLOCK cleared
    on the file description it shares with the writer) cannot make the writer block."""
    world.configure(writer={"source": {"type": "ticker", "rate": 200.0}})
    w = world.writer()
    world.file_reader("healthy")

    def sleeper(ch: ChildEnd) -> None:
        _conn, sub = raw_attach(world, "deaf")
        assert sub.eventfd is not None
        efd = sub.eventfd.fileno()
        os.eventfd_write(efd, 0xFFFF_FFFF_FFFF_FFFE)  # the largest value an eventfd holds
        if tamper:
            # File status flags belong to the open file description, which
            # the writer's copy of this eventfd shares.
            fcntl.fcntl(efd, fcntl.F_SETFL, fcntl.fcntl(efd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        announce_sleep_raw(sub)  # the writer answers it with one write into the full counter
        ch.send("armed")
        ch.recv(timeout=3600)

    # Marked before the child exists: the writer may answer its announcement
    # (and find the tampering) before the child's "armed" reaches us.
    mark = w.mark()
    child = procs.fork(sleeper)
    child.expect("armed", DEADLINE)
    receives_more(world, "healthy", 200)
    if tamper:
        tampered = w.wait_for("eventfd_tampered", DEADLINE, since=mark)
        assert (tampered["reader"], tampered["pid"]) == ("deaf", child.pid)
    else:
        assert not w.find("eventfd_tampered")
    w.terminate()
    assert w.wait_exit(DEADLINE) == 0
    assert_contiguous(ticks(world, "healthy"), "ticks of the healthy reader")


def test_a_stopped_reader_under_drop_oldest_loses_exactly_what_it_reports(
    world: ProcBus,
) -> None:
    """A SIGSTOPped reader holds nobody up; after SIGCONT its lost count (stats, drained and
    the writer's overrun) equals the records missing from its output, and the others miss none."""
    cap = 16
    world.configure(
        segment={"capacity": cap, "policy": "drop-oldest"},
        writer={"source": {"type": "ticker", "rate": 200.0}},
    )
    w = world.writer()
    stopped = world.file_reader("stopped", stats_interval=0.2)
    world.file_reader("fine")
    receives_more(world, "stopped", 5)
    stopped.send(signal.SIGSTOP)
    try:
        receives_more(world, "fine", 4 * cap)  # the ring wrapped under the stopped reader
    finally:
        stopped.send(signal.SIGCONT)
    lost_line = stopped.wait_for("stats", DEADLINE, lost=lambda n: n > 0)
    overrun = w.wait_for("overrun", DEADLINE, reader="stopped")
    receives_more(world, "stopped", 20)
    w.terminate()
    cleared = w.wait_for("active_cleared", DEADLINE)
    assert stopped.wait_exit(DEADLINE) == 0 and w.wait_exit(DEADLINE) == 0
    drained = stopped.wait_for("drained")
    numbers = ticks(world, "stopped")
    missing = gaps(numbers)
    assert missing >= 2 * cap
    assert drained["lost"] == missing
    assert lost_line["lost"] <= missing and overrun["lost"] <= missing
    assert numbers[-1] == drained["seq"] == cleared["seq"]  # tick N is seq N - 1
    fine = world.processes[-1]
    assert fine.wait_exit(DEADLINE) == 0 and fine.wait_for("drained")["lost"] == 0
    assert_contiguous(ticks(world, "fine"), "ticks of the reader that kept up")


# -- a writer killed half-way through a record ------------------------------------------------


def record(seq: int) -> bytes:
    """The payload every writer in these tests gives record ``seq`` (length varies with it)."""
    return hashlib.blake2b(seq.to_bytes(8, "little"), digest_size=64).digest()[: 8 + seq % 57]


def checking_reader(pub: Publisher, index: int) -> Callable[[ChildEnd], None]:
    """A child body: a ReaderLoop that checks every record against :func:`record`.

    Says ``ready``, then at the end ``exit RESULT DELIVERED LOST BAD MISSING DUPLICATE NEXT``.
    """
    handle = pub.readers[index]

    def body(ch: ChildEnd) -> None:
        sub = attach(pub, handle)
        state = {"next": sub.cursor, "bad": 0, "missing": 0, "dup": 0}

        def check(batch: list[RawRecord]) -> None:
            for seq, _ts, _topic, data in batch:
                if bytes(data) != record(seq):
                    state["bad"] += 1
                if seq < state["next"]:
                    state["dup"] += 1
                else:
                    state["missing"] += seq - state["next"]
                state["next"] = seq + 1

        ch.send("ready")
        result = ReaderLoop(sub, check).run()
        ch.send(
            f"exit {result.name} {sub.delivered} {sub.lost} {state['bad']} "
            f"{state['missing']} {state['dup']} {state['next']}"
        )

    return body


def test_writers_killed_mid_record_never_deliver_it_torn(shm_name: str, procs: Procs) -> None:
    """Writer processes SIGKILLed with a half-written record reserved, each followed by one
    that adopts the segment in place: three reader processes get every committed record
    intact, exactly once, and count what the ring overwrote as lost."""
    cap, rounds = 16, 8
    pub = Publisher.create(shm_name, capacity=cap, slot_size=128, max_readers=4)
    try:
        indexes = [pub.add_reader(f"r{i}", os.getpid()).index for i in range(3)]
        readers = [procs.fork(checking_reader(pub, i)) for i in indexes]
        for r in readers:
            r.expect("ready")
        # What systemd's fd store keeps for the next writer: the segment, the eventfds.
        seg_fd = pub.segment.fileno()
        eventfds = {i: pub.readers[i].eventfd.fileno() for i in indexes}

        def writer(ch: ChildEnd, rnd: int) -> None:
            new = Publisher.adopt(shm_name, OwnedFd(os.dup(seg_fd)))
            for index, efd in eventfds.items():
                assert new.restore_reader(index, OwnedFd(os.dup(efd))) is not None
            new.wake_all()
            rng = random.Random(rnd)
            for _ in range(rng.randrange(20, 60)):
                first = new.write_seq
                new.publish_batch([record(s) for s in range(first, first + rng.randrange(1, 9))])
            if rnd == rounds:
                new.deactivate()
                ch.send(f"done {new.write_seq}")
                return
            seq = new.write_seq
            res = new.reserve(len(record(seq)))
            res.buffer[: len(res.buffer) // 2] = b"\xee" * (len(res.buffer) // 2)
            ch.send(f"torn {seq}")
            ch.recv(timeout=3600)  # killed here

        discarded = []
        for rnd in range(rounds + 1):
            child = procs.fork(functools.partial(writer, rnd=rnd))
            if rnd < rounds:
                discarded.append(int(child.expect("torn", DEADLINE).split()[1]))
                assert child.kill() == -signal.SIGKILL
                seg = pub.segment
                assert seg.reserve_seq == seg.write_seq + 1  # the torn record, never committed
            else:
                end = int(child.expect("done", DEADLINE).split()[1])
                assert child.wait() == 0
        # Every torn seq was reused by the next writer for a whole record.
        assert discarded == sorted(set(discarded)) and discarded[-1] < end
        for r in readers:
            fields = r.expect("exit", DEADLINE).split()
            result, delivered, lost, bad, missing, dup, nxt = fields[1], *map(int, fields[2:])
            assert (result, bad, dup, nxt) == ("DRAINED", 0, 0, end), fields
            assert missing == lost and delivered + lost == end, fields
            assert r.wait() == 0
    finally:
        pub.close()


@pytest.mark.parametrize("topics", [ALL_TOPICS, topic_mask([0])], ids=["all", "filtered"])
def test_reader_lapped_while_copying_drops_positions_not_seqs(
    bus: Bus,
    topics: int,
) -> None:
    """A writer that laps a reader between its read plan and its copy leaves records of the
    next lap in the slots it copies: they are dropped as lost, never delivered early (and
    then again in their turn)."""
    cap = 8
    pub = bus.publisher(capacity=cap)
    sub = bus.subscriber(pub, start="oldest", topics=topics)
    pub.publish_batch([record(s) for s in range(cap)])

    def lap_the_reader(start: int, end: int) -> None:
        sub._r.hook = None  # once
        first = pub.write_seq
        pub.publish_batch([record(s) for s in range(first, first + cap // 2)])

    sub._r.hook = lap_the_reader  # between the read's plan and its copy
    got = sub.read(cap)
    assert [(r.seq, r.payload) for r in got] == [(s, record(s)) for s in range(cap // 2, cap)]
    assert sub.lost == cap // 2
    assert [r.seq for r in sub.read(cap)] == list(range(cap, cap + cap // 2))


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copied"])
def test_reader_copying_a_dead_writers_half_written_slot_drops_it(
    bus: Bus,
    procs: Procs,
    in_place: bool,
) -> None:
    """A reader a whole ring behind plans its read, a writer reserves the oldest unread slot,
    half-overwrites it and is SIGKILLed, a successor adopts the segment, and only then the
    reader copies and re-checks: the torn slot is dropped as lost, never delivered."""
    cap = 8
    pub = bus.publisher(capacity=cap, slot_size=64)
    sub = bus.subscriber(pub, start="oldest")
    pub.publish_batch([record(s) for s in range(cap)])  # a full ring the reader has not read
    successors: list[Publisher] = []

    def writer(ch: ChildEnd) -> None:
        res = pub.reserve(len(record(cap)))  # seq 8: slot 0, which holds seq 0
        res.buffer[: len(res.buffer) // 2] = b"\xee" * (len(res.buffer) // 2)
        ch.send("torn")
        ch.recv(timeout=3600)  # killed here

    def tear_the_slot(start: int, end: int) -> None:
        sub._r.hook = None  # once
        child = procs.fork(writer)
        child.expect("torn", DEADLINE)
        assert child.kill() == -signal.SIGKILL
        stored = OwnedFd(os.dup(pub.segment.fileno()))
        if not in_place:
            Segment.unlink_name(pub.name)  # a clean stop removed the name: adopt copies
        successors.append(Publisher.adopt(pub.name, stored))

    sub._r.hook = tear_the_slot  # between the read's plan and its copy
    try:
        got = sub.read(cap)
        (successor,) = successors
        assert [(r.seq, r.payload) for r in got] == [(s, record(s)) for s in range(1, cap)]
        assert sub.lost == 1
        assert (successor.write_seq, successor.segment.reserve_seq) == (cap, cap + 1)
        # The successor reuses the torn seq for a whole record.
        successor.publish(record(cap))
        if in_place:
            assert [(r.seq, r.payload) for r in sub.read(cap)] == [(cap, record(cap))]
    finally:
        for s in successors:
            s.close()


# -- attach/detach churn ---------------------------------------------------------------------


def writer_resources(pid: int, segment: str) -> tuple[list[str], list[str], set[str]]:
    """A process's fd targets, its mappings of the segment, and the files it has mapped."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed while we listed
    with open(f"/proc/{pid}/maps") as f:
        files = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return sorted(fds), maps_lines(segment, pid), files


def test_64_readers_churning_leak_nothing_in_the_writer(world: ProcBus, procs: Procs) -> None:
    """64 readers at a time attaching and leaving (Detach or just hanging up), 320 in all,
    while the writer publishes: its table, fds and mappings end as they began."""
    children, per_child, rounds = 8, 8, 5
    world.configure(
        segment={"max_readers": 72}, writer={"source": {"type": "ticker", "rate": 500.0}}
    )
    w = world.writer()
    world.file_reader("steady")
    receives_more(world, "steady", 10)
    before = writer_resources(w.pid, world.segment)
    assert len(before[1]) == 2  # the control part and the ring

    def churn(ch: ChildEnd, k: int) -> None:
        delivered = 0
        for rnd in range(rounds):
            pairs = [raw_attach(world, f"c{k}-{rnd}-{i}") for i in range(per_child)]
            for i, (conn, sub) in enumerate(pairs):
                delivered += len(sub.read_batch())  # the mapping works
                if (rnd + i) % 2:
                    conn.send(
                        protocol.Detach(protocol.DetachCode.NORMAL, "churn").encode(),
                        timeout=DEADLINE,
                    )
                conn.close()
                sub.close()
        ch.send(f"done {delivered}")

    kids = [procs.fork(functools.partial(churn, k=k)) for k in range(children)]
    for kid in kids:
        kid.expect("done", 120)
        assert kid.wait() == 0
    total = children * per_child * rounds

    def gone() -> bool:
        left = [
            e
            for e in w.find("reader_detached") + w.find("reader_lost")
            if e["reader"].startswith("c")
        ]
        return len(left) >= total

    wait_until(gone, DEADLINE, what=f"the writer seeing all {total} churning readers leave")
    attached = [e for e in w.find("reader_attached") if e["reader"].startswith("c")]
    assert len(attached) == total
    assert len(w.find("reader_detached")) == total // 2
    assert not w.find("reader_refused")
    receives_more(world, "steady", 10)  # publishing went on throughout
    assert writer_resources(w.pid, world.segment) == before
    seg = Segment.open(name=world.segment, control_writable=False)
    try:
        assert [e.name for e in seg.entries() if e.state != ReaderState.FREE] == ["steady"]
    finally:
        seg.close()
    w.terminate()
    assert w.wait_exit(DEADLINE) == 0
    assert_contiguous(ticks(world, "steady"), "ticks of the steady reader")


# -- hostile input: segment headers ----------------------------------------------------------

#: Header fields a hostile or corrupt segment may claim anything in: (offset, struct format).
HEADER_FIELDS = {
    "version": (OFF_VERSION, "<I"),
    "control_size": (OFF_CONTROL_SIZE, "<I"),
    "capacity": (OFF_CAPACITY, "<I"),
    "slot_size": (OFF_SLOT_SIZE, "<I"),
    "policy": (OFF_POLICY, "<I"),
    "max_readers": (OFF_MAX_READERS, "<I"),
    "ring_offset": (OFF_RING_OFFSET, "<Q"),
    "segment_size": (OFF_SEGMENT_SIZE, "<Q"),
    "write_seq": (OFF_WRITE_SEQ, "<Q"),
    "reserve_seq": (OFF_RESERVE_SEQ, "<Q"),
}
GEOMETRY = Geometry(8, 64, 4)


def _near(value: int) -> st.SearchStrategy[int]:
    """Values a corruption likes: near the real one, powers of two, extremes, anything."""
    return st.one_of(
        st.integers(max(0, value - 2), value + 2),
        st.sampled_from([0, 1, 4096, 1 << 24, 1 << 31, (1 << 32) - 1, 1 << 62, (1 << 64) - 1]),
        st.integers(0, (1 << 64) - 1),
    )


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[dict[str, int], int | None, int, bytes, bytes]:
    """Header fields to overwrite, a size to cut the object to, a reader entry index and its
    bytes, and bytes to write over the start of the ring."""
    real = {
        "version": 1,
        "control_size": GEOMETRY.control_size,
        "capacity": 8,
        "slot_size": 64,
        "policy": 1,
        "max_readers": 4,
        "ring_offset": GEOMETRY.ring_offset,
        "segment_size": GEOMETRY.segment_size,
        "write_seq": 0,
        "reserve_seq": 0,
    }
    fields = draw(st.sets(st.sampled_from(sorted(HEADER_FIELDS)), max_size=3))
    values = {f: draw(_near(real[f]), label=f) for f in sorted(fields)}
    if draw(st.booleans()):  # counters a reader will believe
        write = draw(st.integers(0, 1 << 62) | st.integers(0, 40), label="write_seq")
        values.update(write_seq=write, reserve_seq=write + draw(st.integers(0, 8)))
    size = draw(st.none() | st.integers(0, 2 * GEOMETRY.segment_size))
    index = draw(st.integers(-1, 5))
    entry = bytearray(draw(st.binary(min_size=128, max_size=128), label="entry"))
    if draw(st.booleans()):  # an attached entry whose cursor is near the counters
        entry[0:4] = (1).to_bytes(4, "little")
        cursor = values.get("write_seq", 0) - draw(st.integers(-2, 20))
        entry[8:16] = (cursor % (1 << 64)).to_bytes(8, "little")
    ring = draw(st.binary(max_size=GEOMETRY.ring_size), label="ring")
    return values, size, index, bytes(entry), ring


def fuzz_segment_open(name: str, examples: int) -> None:
    """Open hostile segments by name and read from them: only SegmentLayoutError may come out
    (ReaderEvicted for an entry that is not attached)."""

    @settings(max_examples=examples, database=None, suppress_health_check=list(HealthCheck))
    @given(corruptions())
    def one(case: tuple[dict[str, int], int | None, int, bytes, bytes]) -> None:
        values, size, index, entry, ring = case
        seg = Segment.create(name, GEOMETRY, Policy.BLOCK)
        try:
            fd = seg.fileno()
            for field, value in values.items():
                off, fmt = HEADER_FIELDS[field]
                os.pwrite(
                    fd, struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1)), off
                )
            if 0 <= index < GEOMETRY.max_readers:
                os.pwrite(fd, entry, 256 + 128 * index)
            os.pwrite(fd, ring, GEOMETRY.ring_offset)
            if size is not None:
                os.ftruncate(fd, size)
        finally:
            seg.close()
        try:
            try:
                opened = Segment.open(name=name)
            except SegmentLayoutError as exc:
                assert str(exc).startswith("Failed to attach"), exc
                return
            try:
                # Touch both ends of both mappings: a mapping past the end of
                # the object would SIGBUS here and kill this process.
                g = opened.geometry
                assert opened.control[0] + opened.control[g.control_size - 1] >= 0
                assert opened.ring[0] + opened.ring[g.ring_size - 1] >= 0
                opened.entries()
                try:
                    sub = Subscriber(opened, index)
                    for _ in range(3):
                        # Record lengths in the ring are the writer's word
                        # (readers map it read-only): a corrupt one yields
                        # bytes of the same mapping, never a fault.
                        sub.read_batch(64)
                except (SegmentLayoutError, ReaderEvicted):
                    pass
            finally:
                opened.close()
        finally:
            libc.shm_unlink(name)

    one()


def test_hostile_segment_headers_give_a_clear_error_and_never_crash(
    shm_name: str,
    procs: Procs,
) -> None:
    """Segments whose header claims impossible capacities, slot sizes, offsets or counters
    (and objects cut short) give SegmentLayoutError on open or read, never a wild access:
    400 of them, in a child process whose death by SIGBUS/SIGSEGV would show."""
    child = procs.fork(lambda ch: fuzz_segment_open(shm_name, 400))
    assert child.wait(300) == 0


# -- hostile input: the configuration ---------------------------------------------------------

#: Every key the configuration knows, anywhere: random trees use them, and others.
CONFIG_KEYS = sorted(
    {
        "segment",
        "control",
        "writer",
        "reader",
        "logging",
        "name",
        "capacity",
        "slot_size",
        "max_readers",
        "policy",
        "block_timeout",
        "unlink_on_exit",
        "mutex_timeout",
        "socket",
        "type",
        "mode",
        "allowed_users",
        "allowed_groups",
        "handshake_timeout",
        "max_message",
        "source",
        "rate",
        "topic",
        "path",
        "framing",
        "callable",
        "shutdown_grace",
        "status_interval",
        "reconnect_grace",
        "defaults",
        "instances",
        "topics",
        "start",
        "sink",
        "stats_interval",
        "reconnect_timeout",
        "summary_rate",
        "command",
        "level",
        "target",
    }
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "drop-oldest",
            "block",
            "ticker",
            "fifo",
            "stdin",
            "python",
            "journal",
            "file",
            "stdout",
            "exec",
            "all",
            "latest",
            "oldest",
            "seqpacket",
            "stream",
            "0660",
            "0o660",
            "/shmd-bus",
            "/run/x.sock",
            "m:f",
            "shmd",
            "root",
            "info",
        ]
    ),
    st.text(max_size=12),
)
TREES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(CONFIG_KEYS) | st.text(max_size=6) | st.integers(0, 9),
            inner,
            max_size=5,
        )
    ),
    max_leaves=40,
)


def _load_text(data: bytes) -> None:
    fd, path = tempfile.mkstemp(prefix="shmd-test-", suffix=".yaml")
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            load_config(path, env={})
        except ConfigError as exc:
            assert str(exc).startswith(path), exc
    finally:
        os.unlink(path)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(CONFIG_KEYS[:5]) | st.sampled_from(CONFIG_KEYS), TREES, max_size=5
    )
)
def test_random_yaml_trees_give_a_config_or_a_config_error(tree: dict[str, Any]) -> None:
    """Any YAML tree of known and unknown keys and values loads or raises ConfigError."""
    _load_text(yaml.safe_dump(tree).encode())


@settings(max_examples=300)
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_random_bytes_give_a_config_or_a_config_error(data: bytes) -> None:
    """Any bytes as a configuration file load or raise ConfigError, nothing else."""
    _load_text(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: " + "[" * 5000 + "]" * 5000, "nested deeper than Python"),
        ("[" * 5000, "nested deeper than Python"),
        ("a: " + "{b: " * 3000 + "1" + "}" * 3000, "nested deeper than Python"),
        (
            "control:\n  allowed_users: &u [root]\nreader:\n  defaults:\n    topics: *u\n",
            "anchors and aliases",
        ),
    ],
    ids=["deep-lists", "deep-unclosed", "deep-mappings", "alias"],
)
def test_pathological_yaml_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    """Nesting deeper than any configuration needs, and YAML aliases (a billion laughs in
    waiting), are refused with a ConfigError instead of a RecursionError or a long hang."""
    path = tmp_path / "shmd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """Nine levels of nine aliases each (387 million nodes once expanded) are refused in
    well under a second, not after hours."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "shmd.yaml"
    path.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(path, env={})
    assert time.monotonic() - t0 < 5.0


# -- a hostile start-up environment -----------------------------------------------------------


def in_private_mounts(world: ProcBus, name: str, script: str, *args: str) -> Any:
    """Run shm-writer inside ``unshare --mount`` after ``script`` (sh, "$1".. = ``args``)
    changed that private mount namespace; skipped without root and unshare(1)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    config = world.config_path if world.config_path.exists() else world.configure()
    wrapper = f'{script} || exit 77; shift {len(args)}; exec "$@"'
    argv = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        wrapper,
        "sh",
        *args,
        *program("shm-writer"),
        "--config",
        str(config),
    ]
    return world.spawn(name, argv)


def expect_start_failed(d: Daemon) -> dict[str, Any]:
    """The writer exits 1 after exactly one start_failed line (an error, no traceback)."""
    status = d.wait_exit(DEADLINE)
    if status == 77:
        pytest.skip(f"cannot change the private mount namespace here: {d.stderr()}")
    assert status == 1, d.stderr()
    [failed] = d.find("start_failed")
    assert failed["level"] == "error"
    assert "Traceback" not in d.stderr()
    return failed


def test_a_full_dev_shm_at_start_is_one_clear_line_and_exit_1(world: ProcBus) -> None:
    """With no room in /dev/shm for the segment the writer logs start_failed naming the
    size it needed and exits 1, leaving nothing behind."""
    world.configure(segment={"capacity": 1024, "slot_size": 4096})
    size = Geometry(1024, 4096, 8).segment_size
    d = in_private_mounts(
        world, "shm-writer (full /dev/shm)", "mount -t tmpfs -o size=64k shmd-test-full /dev/shm"
    )
    failed = expect_start_failed(d)
    assert failed["error"] == (
        f"Failed to reserve {size} bytes for segment {world.segment!r} "
        "since /dev/shm has no room for it"
    )
    assert not Path(world.socket).exists()


@pytest.mark.parametrize("missing", [False, True], ids=["read-only", "missing"])
def test_an_unusable_socket_directory_is_one_clear_line_and_exit_1(
    world: ProcBus,
    missing: bool,
) -> None:
    """A control socket directory that is read-only, or missing under a read-only parent,
    stops the writer with one start_failed line saying so; its segment is removed again."""
    ro = world.dir / "ro"
    ro.mkdir()
    world.socket = str(ro / "sub" / "ctl.sock") if missing else str(ro / "ctl.sock")
    world.configure(control={"socket": world.socket})
    d = in_private_mounts(
        world,
        "shm-writer (read-only socket dir)",
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"',
        str(ro),
    )
    failed = expect_start_failed(d)
    prefix = f"Failed to bind the control socket {world.socket} since "
    if missing:
        assert failed["error"] == (
            f"{prefix}its directory {ro / 'sub'} is missing and cannot "
            "be created (Read-only file system)"
        )
    else:
        assert failed["error"].startswith(prefix)
        assert "read-only file system" in failed["error"].lower()
    d.wait_for("segment_unlinked", segment=world.segment)
    assert not world.segment_exists()


def test_an_unreadable_configuration_is_one_config_error_and_exit_78(
    world: ProcBus,
    procs: Procs,
) -> None:
    """A writer whose user may not read its configuration logs one config_error line
    naming the file and uid and exits 78, with no traceback (run as nobody in a fork)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    path = world.configure()
    os.chmod(world.dir, 0o755)
    os.chmod(path, 0o600)
    err_r, err_w = os.pipe()

    def as_nobody(ch: ChildEnd) -> None:
        from shmd.daemons import writer  # noqa: PLC0415 - runs in the child

        os.dup2(err_w, 2)
        # A fresh process as far as logging goes: nothing configured, stderr is fd 2.
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the child
        os.environ.pop("JOURNAL_STREAM", None)
        logs.reset_logging()
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        try:
            writer.main(["--config", str(path), "--log-target", "json"])
        except SystemExit as exc:
            ch.send(f"exit {exc.code}")

    child = procs.fork(as_nobody)
    os.close(err_w)
    assert child.expect("exit", DEADLINE) == "exit 78"
    assert child.wait() == 0
    with os.fdopen(err_r, "rb") as f:
        lines = f.read().decode().splitlines()
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert (event["event"], event["path"], event["line"], event["key"]) == (
        "config_error",
        str(path),
        None,
        None,
    )
    assert event["error"] == (
        f"{path}: Failed to read the configuration since uid 65534 may "
        "not read it (permission denied)"
    )
