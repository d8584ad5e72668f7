"""Floors: what the kernel primitives cost on their own, from Python.

``floor-eventfd-pingpong`` (latency only)
    Two processes and two eventfds. The pinger writes its CLOCK_MONOTONIC stamp as the
    eventfd value and waits for the pong; the ponger reads the stamp, answers at once and
    records now - stamp. Paced at ``rate_hz`` or back-to-back (``rate_hz == 0``). This is the
    cost of one wake-up between two Python processes; nothing that wakes a sleeping
    reader through the kernel can beat it.

``floor-shm-eventfd``
    The minimal thing shmd could do: a ring of records in one shared memory file (memfd),
    one "wake" eventfd per reader (writer adds 1 per record) and one "credit" eventfd per
    reader (reader returns the records it has finished with before it sleeps). The writer
    blocks on the slowest reader's credit eventfd only when the ring is full, so nothing is
    dropped. Readers get a zero-copy view of the slot. No locks, no reader table, no
    control socket, no liveness: a lower bound, not a design.

``floor-shm-eventfd-epoll`` (latency only)
    The same ring, with the reader waiting the way shmd's readers must. Their eventfd is
    non-blocking: the writer shares its open file description, so a blocking one would let
    a reader's full counter block the writer. So the reader cannot block in ``read()``; it
    sleeps in ``epoll_wait`` (as shmd's reader daemon does, beside its other fds). It learns
    what arrived from a count the writer stores after each slot, and drains its eventfd
    before it sleeps, not after it wakes, so its wake-up path has no syscall but the
    ``epoll_wait`` itself (shmd's readers do the same). The difference between this floor
    and ``floor-shm-eventfd`` is what the waiting alone costs.
"""

from __future__ import annotations

import mmap
import os
import select
import time
from dataclasses import dataclass

from benchmarks.harness import (
    Buffer,
    Case,
    CaseResult,
    Kind,
    LatencyCase,
    PassFd,
    Reader,
    ReaderStats,
    Role,
    RoleControl,
    StreamImpl,
    Writer,
    WriterStats,
    run_roles,
    vm_hwm_kib,
)


def _eventfd_missing() -> str | None:
    if not hasattr(os, "eventfd") or not hasattr(os, "memfd_create"):
        return "needs os.eventfd and os.memfd_create (Linux, Python >= 3.10)"
    return None


# --------------------------------------------------------------------------- ping-pong


@dataclass
class PingPongChannel:
    ping: PassFd
    pong: PassFd

    def close(self) -> None:
        self.ping.close()
        self.pong.close()


def pinger_role(ctl: RoleControl, chan: PingPongChannel, case: LatencyCase) -> WriterStats:
    """Writes its stamp into ``ping`` and waits for ``pong``, ``case.count`` times."""
    ping, pong = chan.ping.fd, chan.pong.fd
    try:
        ctl.bound()
        ctl.ready()
        ctl.wait_go()
        cpu0 = time.process_time_ns()
        now, write, read = time.monotonic_ns, os.eventfd_write, os.eventfd_read
        period = 1e9 / case.rate_hz if case.rate_hz else 0.0
        t_start = now()
        for seq in range(case.count):
            if period:
                # Pacing, not synchronisation: holds the rate; the sample starts below.
                delay = t_start + seq * period - now()
                if delay > 0:
                    time.sleep(delay / 1e9)
            write(ping, now())
            read(pong)
        t_end = now()
        ctl.sent()
        ctl.wait_close()
        cpu = time.process_time_ns() - cpu0
    finally:
        chan.close()
    return WriterStats(case.count, t_start, t_end, cpu, vm_hwm_kib())


def ponger_role(
    ctl: RoleControl, chan: PingPongChannel, case: LatencyCase, index: int
) -> ReaderStats:
    """Answers every ping at once; one-way latency = read time - stamp in the eventfd."""
    ping, pong = chan.ping.fd, chan.pong.fd
    latencies = [0] * case.count
    error, done, t_first, t_last = "", case.count, 0, 0
    try:
        ctl.ready()
        cpu0 = time.process_time_ns()
        now, write, read = time.monotonic_ns, os.eventfd_write, os.eventfd_read
        previous = 0
        for seq in range(case.count):
            stamp = read(ping)
            t = now()
            write(pong, 1)
            # An eventfd adds up unread writes: a lost or doubled ping shows up as a value
            # that is not a fresh stamp (a sum of two stamps lies in the future).
            if not previous < stamp <= t:
                error = (
                    f"record {seq}: eventfd value {stamp} is not a stamp between {previous} and {t}"
                )
                done = seq
                break
            if seq == 0:
                t_first = t
            latencies[seq] = t - stamp
            previous = stamp
        t_last = now()
        cpu = time.process_time_ns() - cpu0
    finally:
        chan.close()
    return ReaderStats(
        index,
        not error,
        f"reader {index}: {error}" if error else "",
        done,
        done * 8,
        t_first,
        t_last,
        cpu,
        vm_hwm_kib(),
        latencies[:done],
    )


class EventfdPingPong:
    """Latency floor: one eventfd wake each way between two Python processes."""

    name = "floor-eventfd-pingpong"
    kind: Kind = "floor"

    def available(self) -> str | None:
        return _eventfd_missing()

    def supports(self, case: Case) -> str | None:
        if not isinstance(case, LatencyCase):
            return "latency floor only (an eventfd carries a counter, not records)"
        return None

    def run(self, case: Case, timeout: float) -> CaseResult:
        assert isinstance(case, LatencyCase)
        ping = PassFd(os.eventfd(0, os.EFD_CLOEXEC))
        try:
            pong = PassFd(os.eventfd(0, os.EFD_CLOEXEC))
        except BaseException:
            ping.close()
            raise
        chan = PingPongChannel(ping, pong)
        try:
            return run_roles(
                Role(pinger_role, (chan, case)), [Role(ponger_role, (chan, case, 0))], timeout
            )
        finally:
            chan.close()


# --------------------------------------------------------------------------- shm + eventfd

_COUNT_SIZE = 8  # the epoll floor's count of records sent, a native u64 after the ring


@dataclass
class ShmChannel:
    memfd: PassFd
    wake: list[PassFd]
    credit: list[PassFd]
    slots: int
    payload: int
    counted: bool = False  # a u64 count of records sent follows the ring (the epoll floor)

    @property
    def size(self) -> int:
        return self.slots * self.payload + (_COUNT_SIZE if self.counted else 0)

    def close(self) -> None:
        for owned in (self.memfd, *self.wake, *self.credit):
            owned.close()


class _ShmWriter:
    def __init__(self, chan: ShmChannel) -> None:
        self._chan = chan
        self._map = mmap.mmap(chan.memfd.fd, chan.size)
        chan.memfd.close()
        self._wake = [w.fd for w in chan.wake]
        self._credited = [0] * len(chan.credit)
        self._floor = 0
        self._sent = 0

    def wait_readers(self, deadline: float) -> None:
        """Nothing to wait for: the fds were handed to every reader at spawn."""

    def send(self, record: bytearray) -> None:
        seq, slots, payload = self._sent, self._chan.slots, self._chan.payload
        if seq - self._floor >= slots:
            self._wait_for_space(seq)
        offset = (seq % slots) * payload
        self._map[offset : offset + payload] = record
        self._sent = seq + 1
        # The eventfd write is a syscall taking a kernel spinlock: it orders the slot
        # store above before the reader's eventfd read returns, on any architecture.
        for fd in self._wake:
            os.eventfd_write(fd, 1)

    def _wait_for_space(self, seq: int) -> None:
        credited, credit = self._credited, self._chan.credit
        while seq - min(credited) >= self._chan.slots:
            slowest = credited.index(min(credited))
            credited[slowest] += os.eventfd_read(credit[slowest].fd)
        self._floor = min(credited)

    def close(self) -> None:
        self._map.close()
        self._chan.close()


class _ShmReader:
    def __init__(self, chan: ShmChannel, index: int) -> None:
        self._chan = chan
        self._map = mmap.mmap(chan.memfd.fd, chan.size)
        chan.memfd.close()
        self._view = memoryview(self._map)
        self._wake = chan.wake[index].fd
        self._credit = chan.credit[index].fd
        self._available = 0
        self._consumed = 0
        self._seq = 0

    def recv(self) -> Buffer:
        if not self._available:
            # Everything returned so far is finished with (recv is only called again
            # once the previous record was checked): hand the slots back, then sleep.
            if self._consumed:
                os.eventfd_write(self._credit, self._consumed)
                self._consumed = 0
            self._available = os.eventfd_read(self._wake)
        self._available -= 1
        self._consumed += 1
        payload = self._chan.payload
        offset = (self._seq % self._chan.slots) * payload
        self._seq += 1
        return self._view[offset : offset + payload]

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # A slice handed out by recv() is still referenced (e.g. by a traceback after
            # a failed check); the mapping then goes away when the process exits.
            pass
        self._chan.close()


class _CountingShmWriter(_ShmWriter):
    """The writer of the epoll floor: stores the count of records sent after each slot."""

    def __init__(self, chan: ShmChannel) -> None:
        super().__init__(chan)
        ring = chan.slots * chan.payload
        self._count = memoryview(self._map)[ring : ring + _COUNT_SIZE].cast("Q")

    def send(self, record: bytearray) -> None:
        # The base class's send() with the count stored, written out: a hook would add a
        # call to the floor's measured path.
        seq, slots, payload = self._sent, self._chan.slots, self._chan.payload
        if seq - self._floor >= slots:
            self._wait_for_space(seq)
        offset = (seq % slots) * payload
        self._map[offset : offset + payload] = record
        # x86-64 keeps stores in order, so a reader that sees the count sees the slot
        # (this floor is measured there; it is a yardstick, not a portable protocol).
        self._sent = self._count[0] = seq + 1
        for fd in self._wake:
            os.eventfd_write(fd, 1)

    def close(self) -> None:
        self._count.release()
        super().close()


class _EpollShmReader(_ShmReader):
    """The reader of the epoll floor: sleeps in epoll_wait on a non-blocking eventfd."""

    def __init__(self, chan: ShmChannel, index: int) -> None:
        super().__init__(chan, index)
        ring = chan.slots * chan.payload
        self._count = self._view[ring : ring + _COUNT_SIZE].cast("Q")
        self._known = 0  # records the writer's count said were sent, at our last look
        self._epoll = select.epoll(1)
        self._epoll.register(self._wake, select.EPOLLIN)

    def recv(self) -> Buffer:
        seq, count = self._seq, self._count
        if seq >= self._known:
            if self._consumed:
                os.eventfd_write(self._credit, self._consumed)
                self._consumed = 0
            self._known = count[0]
            while seq >= self._known:
                # Drain, then look again, then sleep: a write after the drain leaves the
                # eventfd readable, so a record sent after the look still wakes us.
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass  # nothing pending
                self._known = count[0]
                if seq < self._known:
                    break
                self._epoll.poll()
                self._known = count[0]
        self._consumed += 1
        payload = self._chan.payload
        offset = (seq % self._chan.slots) * payload
        self._seq = seq + 1
        return self._view[offset : offset + payload]

    def close(self) -> None:
        self._epoll.close()
        self._count.release()
        super().close()


class ShmEventfd(StreamImpl):
    """Floor: record ring in a memfd + one wake and one credit eventfd per reader."""

    name = "floor-shm-eventfd"
    kind = "floor"

    counted = False  # no count after the ring: the reader learns it from the eventfd
    wake_flags = os.EFD_CLOEXEC  # blocking: the reader sleeps in read()

    def available(self) -> str | None:
        return _eventfd_missing()

    def prepare(self, case: Case, workdir: str) -> ShmChannel:
        memfd = os.memfd_create("shmd-bench-floor", os.MFD_CLOEXEC)
        chan = ShmChannel(PassFd(memfd), [], [], case.depth, case.payload, self.counted)
        try:
            os.ftruncate(memfd, chan.size)
            for _ in range(case.readers):
                chan.wake.append(PassFd(os.eventfd(0, self.wake_flags)))
                chan.credit.append(PassFd(os.eventfd(0, os.EFD_CLOEXEC)))
        except BaseException:
            chan.close()
            raise
        return chan

    def cleanup(self, channel: ShmChannel) -> None:
        channel.close()

    def open_writer(self, channel: ShmChannel, case: Case) -> Writer:
        return _ShmWriter(channel)

    def open_reader(self, channel: ShmChannel, case: Case, index: int) -> Reader:
        return _ShmReader(channel, index)


class ShmEventfdEpoll(ShmEventfd):
    """Floor: the same ring, read by a reader that sleeps in epoll as shmd's must."""

    name = "floor-shm-eventfd-epoll"
    counted = True
    wake_flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK

    def supports(self, case: Case) -> str | None:
        if not isinstance(case, LatencyCase):
            return "latency floor only (how a reader waits matters when each record wakes it)"
        return super().supports(case)

    def open_writer(self, channel: ShmChannel, case: Case) -> Writer:
        return _CountingShmWriter(channel)

    def open_reader(self, channel: ShmChannel, case: Case, index: int) -> Reader:
        return _EpollShmReader(channel, index)


IMPLS = [EventfdPingPong(), ShmEventfd(), ShmEventfdEpoll()]
