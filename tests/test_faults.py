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
import os
import signal
import socket
from collections.abc import Iterator

import pytest
from daemons import (
    Bus as ProcBus,
)
from daemons import (
    assert_contiguous,
    read_lines,
    running_bus,
    tick_numbers,
    wait_until,
)
from helpers import ChildEnd, Procs

from shmd import protocol, wire
from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.subscriber import Subscriber

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


def raw_attach(bus: ProcBus, instance: str) -> tuple[wire.Connection, Subscriber]:
    """Connect, say Hello and map the segment from the Welcome, as shm-reader does."""
    conn = wire.connect(bus.socket, SEQPACKET, timeout=DEADLINE)
    conn.send(protocol.Hello(instance=instance, pid=os.getpid()).encode(), timeout=DEADLINE)
    frame = conn.recv(timeout=DEADLINE)
    fds = [f.detach() for f in frame.fds]
    msg = protocol.decode(frame.body, len(fds))
    assert isinstance(msg, protocol.Welcome), msg
    os.close(fds[2])  # the lifeline: this reader does not care when the writer goes
    sub = Subscriber.attach(index=msg.reader_index, fd=OwnedFd(fds[1]),
                            eventfd=OwnedFd(fds[0]))
    return conn, sub


def announce_sleep(sub: Subscriber) -> None:
    """Set this reader's asleep flag (drain first: records may keep arriving)."""
    while True:
        sub.read_batch()
        if sub.prepare_sleep() is None:
            return


# -- a stalled or malicious participant cannot stop the bus ------------------------------------


def test_mutex_hog_costs_the_writer_one_timeout_and_is_named(
    world: ProcBus, procs: Procs,
) -> None:
    """A reader that locks the shared mutex and never unlocks is named in one mutex_stalled
    line; the writer keeps publishing at full rate, and recovers once the hog is killed."""
    world.configure(segment={"mutex_timeout": 0.5},
                    writer={"source": {"type": "ticker", "rate": 100.0}})
    w = world.writer()
    healthy = world.file_reader("healthy")
    receives_more(world, "healthy", 5)

    def hog(ch: ChildEnd) -> None:
        _conn, sub = raw_attach(world, "hog")
        # Asleep first, so that the writer has a reason to take the mutex at
        # every commit (it must wake us), then hold it for ever.
        announce_sleep(sub)
        assert sub.segment.lock(None) is libc.LockResult.ACQUIRED
        ch.send("locked")
        ch.recv(timeout=3600)

    child = procs.fork(hog)
    child.expect("locked", DEADLINE)
    mark = w.mark()
    stalled = w.wait_for("mutex_stalled", DEADLINE, since=mark)
    assert (stalled["holder_tid"], stalled["holder_pid"], stalled["reader"]) == (
        child.pid, child.pid, "hog")
    # 100 ticks/s: if every commit waited mutex_timeout for the hog (2/s),
    # 200 more ticks would take 100 s.
    receives_more(world, "healthy", 200)
    assert len(w.find("mutex_stalled", since=mark)) == 1  # one line per stall, not per commit
    assert child.kill() == -signal.SIGKILL
    w.wait_for("reader_lost", DEADLINE, reader="hog")
    assert w.wait_for("mutex_recovered", DEADLINE, since=mark)["stalled"] > 0
    # Whoever locks first after the kill (the writer, or the healthy reader
    # announcing a sleep) gets EOWNERDEAD and repairs the table.
    died = wait_until(lambda: w.find("mutex_owner_died") + healthy.find("mutex_owner_died"),
                      DEADLINE, what="somebody repairing the mutex the hog died holding")
    assert died[0]["role"] in ("writer", "reader")
    receives_more(world, "healthy", 20)
    w.terminate()
    assert w.wait_exit(DEADLINE) == 0
    assert_contiguous(ticks(world, "healthy"), "ticks of the healthy reader")


@pytest.mark.parametrize("tamper", [False, True], ids=["full-counter", "full-and-blocking"])
def test_an_eventfd_nobody_drains_never_blocks_the_writer(
    world: ProcBus, procs: Procs, tamper: bool,
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
        announce_sleep(sub)
        ch.send("armed")
        ch.recv(timeout=3600)

    child = procs.fork(sleeper)
    child.expect("armed", DEADLINE)
    mark = w.mark()
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
    world.configure(segment={"capacity": cap, "policy": "drop-oldest"},
                    writer={"source": {"type": "ticker", "rate": 200.0}})
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
