"""shmd itself: the library's Publisher and Subscriber, the way an application uses them.

Four columns, all with the block policy (nothing is ever dropped) and the same record
format, warm-up, timed part and per-record checks as every other impl (see
``benchmarks.harness``):

``shmd`` (the headline)
    The writer publishes ONE RECORD PER ``publish()`` CALL, from the harness's own loop
    (``send_steady``/``send_paced``), as every peer sends: the way an application
    publishes events as they arrive. Readers copy (``read_batch(copy=True)``: they take
    what has been committed) and sleep in epoll on their eventfd only when there is
    nothing to read.
``shmd-batch``
    The batched writer, what shmd is designed for when records come in bursts:
    ``publish_batch`` of 64 records stamped one by one (one commit and at most one
    wake-up per reader per batch), and ``reserve_batch`` for big records (one copy,
    straight into the slots). No peer batches; compare it with ``shmd``, not as the
    headline. Throughput only.
``shmd-zc`` (zero-copy, the counterpart of ``iceoryx2-zc``)
    One record per ``reserve()``: the writer produces the record in place (it writes
    the stamps, as the iceoryx2-zc writer does into its loan) and commits it; readers
    take one view into the ring at a time (as the iceoryx2-zc reader holds one sample),
    check it and release it. Throughput only.
``shmd-spin``
    ``shmd``'s writer, with readers that spin (``WaitStrategy.spin()``: busy-poll the
    commit counter, no syscall, never announce a sleep, so the writer writes no eventfd).
    A spinning reader takes a core, so it runs only where readers + writer <= the CPUs
    this process may use; no peer's reader spins (iceoryx2's sleeps in
    ``Listener.timed_wait``), so it is labelled, not a like-for-like column.
``shmd-into``
    ``shmd``'s writer, with readers that copy each record into one reused buffer
    (``read_into``), as the unix-seqpacket peer's readers ``recv_into`` theirs: no
    allocation per record.
"""

from __future__ import annotations

import math
import os
import select
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from benchmarks.harness import (
    HEAD,
    LAST,
    STEADY,
    TAIL,
    TIME_MASK,
    Case,
    CaseResult,
    Kind,
    LatencyCase,
    PassFd,
    ReaderStats,
    Role,
    RoleControl,
    RunDir,
    Sent,
    ThroughputCase,
    WriterStats,
    check,
    run_roles,
    send_paced,
    send_steady,
    shm_prefix,
    steady_plan,
    vm_hwm_kib,
)
from shmd import Publisher, Subscriber
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import RECORD_HEADER_SIZE, Policy
from shmd.bus.segment import Segment
from shmd.bus.wait import WaitStrategy
from shmd.errors import SegmentNotFound

Variant = Literal["record", "batch", "zc", "spin", "into"]

#: Records per publish_batch in throughput runs (bounded by half the ring).
BATCH = 64
#: Payloads at least this big are written in place through reserve().
RESERVE_FROM = 2048


@dataclass
class ShmdChannel:
    name: str
    capacity: int
    slot_size: int
    eventfds: list[PassFd]

    def close(self) -> None:
        for fd in self.eventfds:
            fd.close()


def _capacity(depth: int) -> int:
    cap = 2
    while cap < depth:
        cap *= 2
    return cap


def writer_role(ctl: RoleControl, chan: ShmdChannel, case: Case, variant: Variant) -> WriterStats:
    """Create the segment, attach the readers' entries, publish every record."""
    pub = Publisher.create(
        chan.name,
        capacity=chan.capacity,
        slot_size=chan.slot_size,
        max_readers=max(1, case.readers),
        policy=Policy.BLOCK,
        block_timeout=60.0,
    )
    try:
        for i, fd in enumerate(chan.eventfds):
            pub.add_reader(f"bench{i}", os.getpid(), eventfd=OwnedFd(os.dup(fd.fd)))
        chan.close()
        ctl.bound()
        ctl.ready()
        ctl.wait_go()
        if isinstance(case, LatencyCase):
            cpu0 = time.process_time_ns()
            t_start, t_end = send_paced(pub.publish, case.payload, case.count, case.rate_hz)
            sent = Sent(0, case.count, case.count, t_start, t_end, cpu0)
        elif variant == "batch":
            batch = min(BATCH, chan.capacity // 2)
            if case.payload >= RESERVE_FROM:
                sent = _reserved_batches(pub, case, batch)
            else:
                sent = _batched(pub, case, batch)
        elif variant == "zc":
            sent = _in_place(pub, case)
        else:
            # One publish() per record, from the very loop every peer's writer runs.
            sent = send_steady(pub.publish, case)
        ctl.sent()
        ctl.wait_close()
        cpu = time.process_time_ns() - sent.cpu_start
    finally:
        pub.close()
        pub.unlink()
    return sent.stats(cpu)


class _Batches:
    """send_steady's warm-up and end rule, taken at batch boundaries (shmd-batch)."""

    def __init__(self, case: ThroughputCase, batch: int) -> None:
        self.warm_n, warm_ns, timed_n, self.timed_ns = steady_plan(case)
        self.batch = batch
        self.warm_end = time.monotonic_ns() + warm_ns
        self.seq = 0
        self.warmup = -1
        self.last_from = 0
        self.end = 0
        self.timed_n = timed_n
        self.calls = 0
        self.t_start = 0
        self.cpu0 = 0

    def next(self, t: int) -> tuple[int, int, int]:
        """(first seq, count, flags of the batch's last record) of the batch starting at t.

        flags: STEADY goes on the batch's first record (see ``first_flags``), LAST on the
        last record of the last batch; count 0 when the run is over.
        """
        if self.warmup < 0 and self.seq >= self.warm_n and t >= self.warm_end:
            self.warmup = self.seq
            self.last_from = self.seq + self.timed_n
            self.cpu0 = time.process_time_ns()
            self.t_start = t
            self.end = t + self.timed_ns
        if self.warmup >= 0:
            self.calls += 1
            if self.seq + self.batch >= self.last_from and t >= self.end:
                short = min(self.batch, self.last_from - self.seq)
                return self.seq, self.batch if short <= 0 else short, LAST
        return self.seq, self.batch, 0

    def ends(self, first: int, count: int, last: int, t: int) -> list[tuple[int, int, int]]:
        """(index in batch, seq, stamp) of the batch's records that carry a flag."""
        out = []
        steady = STEADY if first == self.warmup else 0
        if steady:
            out.append((0, first, t | steady | (last if count == 1 else 0)))
        if last and not (steady and count == 1):
            out.append((count - 1, first + count - 1, time.monotonic_ns() | last))
        return out

    def sent(self) -> Sent:
        return Sent(
            self.warmup,
            self.seq,
            self.calls,
            self.t_start,
            time.monotonic_ns(),
            self.cpu0,
        )


def _batched(pub: Publisher, case: ThroughputCase, batch: int) -> Sent:
    middle = bytes(case.payload - HEAD.size - TAIL.size)
    pack_head, pack_tail, now = HEAD.pack, TAIL.pack, time.monotonic_ns
    publish_batch = pub.publish_batch
    plan = _Batches(case, batch)
    while True:
        t = now()
        first, count, last = plan.next(t)
        records = [
            pack_head(seq, now()) + middle + pack_tail(seq) for seq in range(first, first + count)
        ]
        for i, seq, stamp in plan.ends(first, count, last, t):
            records[i] = pack_head(seq, stamp) + middle + pack_tail(seq)
        publish_batch(records)
        plan.seq = first + count
        if last:
            return plan.sent()


def _reserved_batches(pub: Publisher, case: ThroughputCase, batch: int) -> Sent:
    """Big records through reserve_batch: the whole record copied in, stamped, one commit."""
    payload = case.payload
    template = bytes(payload)
    tail = payload - TAIL.size
    pack_head, pack_tail, now = HEAD.pack_into, TAIL.pack_into, time.monotonic_ns
    plan = _Batches(case, batch)
    while True:
        t = now()
        first, count, last = plan.next(t)
        res = pub.reserve_batch(count, payload)
        for seq, buf in enumerate(res.buffers, first):
            # The copying writer copies the whole record in, as a socket peer sends it
            # whole (and as the copying iceoryx2 writer does).
            buf[:] = template
            pack_head(buf, 0, seq, now())
            pack_tail(buf, tail, seq)
        for i, seq, stamp in plan.ends(first, count, last, t):
            pack_head(res.buffers[i], 0, seq, stamp)
        res.commit()
        plan.seq = first + count
        if last:
            return plan.sent()


def _in_place(pub: Publisher, case: ThroughputCase) -> Sent:
    """shmd-zc: one reserve() per record, produced in place (the stamps), committed.

    send_steady's loop, with the record made in its slot instead of in a buffer.
    """
    payload = case.payload
    tail = payload - TAIL.size
    pack_head, pack_tail, now = HEAD.pack_into, TAIL.pack_into, time.monotonic_ns
    reserve = pub.reserve
    warm_n, warm_ns, timed_n, timed_ns = steady_plan(case)
    seq = 0
    warm_end = now() + warm_ns
    while True:
        t = now()
        if seq >= warm_n and t >= warm_end:
            break
        res = reserve(payload)
        buf = res.buffer
        pack_head(buf, 0, seq, t)
        pack_tail(buf, tail, seq)
        res.commit()
        seq += 1
    warmup = seq
    last_from = warmup + timed_n - 1
    cpu0 = time.process_time_ns()
    t = t_start = now()
    end = t_start + timed_ns
    flags = STEADY
    while True:
        if seq >= last_from and t >= end:
            flags |= LAST
        res = reserve(payload)
        buf = res.buffer
        pack_head(buf, 0, seq, t | flags)
        pack_tail(buf, tail, seq)
        res.commit()
        seq += 1
        if flags >= LAST:
            break
        flags = 0
        t = now()
    return Sent(warmup, seq, seq - warmup, t_start, now(), cpu0)


def reader_role(  # noqa: PLR0912, PLR0915 - one measuring loop, kept in one piece
    ctl: RoleControl, chan: ShmdChannel, case: Case, index: int, variant: Variant
) -> ReaderStats:
    """Attach by name to entry ``index``; read and check every record."""
    zero_copy = variant == "zc"
    spin = variant == "spin"
    efd = OwnedFd(os.dup(chan.eventfds[index].fd))
    chan.close()
    sub = Subscriber.attach(
        index=index,
        name=chan.name,
        eventfd=efd,
        wait=WaitStrategy.spin() if spin else WaitStrategy.sleep(),
    )
    epoll = select.epoll(1)
    epoll.register(efd.fileno(), select.EPOLLIN)
    latency = isinstance(case, LatencyCase)
    records = case.count if isinstance(case, LatencyCase) else 0
    payload = case.payload
    latencies = [0] * records if latency else []
    unpack_head, unpack_tail, now = HEAD.unpack_from, TAIL.unpack_from, time.monotonic_ns
    cpu_now = time.process_time_ns
    tail = payload - TAIL.size
    read_batch, prepare_sleep, spin_wait = sub.read_batch, sub.prepare_sleep, sub.spin
    read: Callable[..., list[Any]] = read_batch
    if variant == "into":
        into_buf = bytearray(payload)
        into_view = memoryview(into_buf)
        read_into = sub.read_into

        def read_one(limit: int, *, copy: bool, hold: bool) -> list[Any]:
            # One record per call into the reused buffer, as a batch of one.
            got = read_into(into_buf)
            return [] if got is None else [(got[0], got[1], got[2], into_view[: got[3]])]

        read = read_one

    # A zero-copy reader holds one record at a time, as the iceoryx2-zc reader holds one
    # sample: a view held over a whole ring would keep the writer waiting on a full ring
    # until the batch is checked (1 MiB, one reader: 0.36x iceoryx2-zc, against 0.64x
    # holding one; docs/PERFORMANCE.md).
    limit = 1 if zero_copy else 4096
    expected = 0
    error = ""
    t_first = warmup = steady_stamp = 0
    done = False
    try:
        ctl.ready()
        cpu0 = cpu_now()
        while not done and not error:
            batch = read(limit, copy=not zero_copy, hold=zero_copy)
            if not batch:
                if spin:
                    spin_wait(math.inf)
                    continue
                sleep = prepare_sleep()
                if sleep != 0.0:
                    epoll.poll(-1 if sleep is None else sleep)
                continue
            t = now()
            for _seq, _ts, _topic, record in batch:
                if len(record) != payload:
                    error = check(record, expected, payload)
                    break
                head, sent = unpack_head(record, 0)
                if head != expected or unpack_tail(record, tail)[0] != expected:
                    error = check(record, expected, payload)
                    break
                if latency:
                    latencies[expected] = t - sent
                    expected += 1
                    if expected == records:
                        done = True
                        break
                    continue
                expected += 1
                if sent >= STEADY:
                    if sent & STEADY:
                        t_first, cpu0 = t, cpu_now()
                        warmup, steady_stamp = expected - 1, sent & TIME_MASK
                    if sent >= LAST:
                        done = True
                        break
            if zero_copy:
                if not error and not sub.still_valid(batch[0][0]):
                    error = f"record {batch[0][0]}: overwritten while held"
                del batch
                sub.release()
        t_last = now()
        cpu = cpu_now() - cpu0
        stats = ReaderStats(
            index,
            not error,
            f"reader {index}: {error}" if error else "",
            expected,
            expected * payload,
            t_first,
            t_last,
            cpu,
            vm_hwm_kib(),
            latencies[:expected],
            warmup_records=warmup,
            steady_stamp_ns=steady_stamp,
        )
        ctl.result(stats)
    finally:
        epoll.close()
        sub.close()
    return stats


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


class ShmdImpl:
    """shmd's library: one variant per column (see the module docstring)."""

    kind: Kind = "shmd"
    #: The writer process's function (a test wraps it to count publish calls).
    writer_target: Callable[..., WriterStats] = staticmethod(writer_role)

    def __init__(self, variant: Variant) -> None:
        self.variant: Variant = variant
        self.zero_copy = variant == "zc"
        self.name = {
            "record": "shmd",
            "batch": "shmd-batch",
            "zc": "shmd-zc",
            "spin": "shmd-spin",
            "into": "shmd-into",
        }[variant]

    def available(self) -> str | None:
        return None

    def supports(self, case: Case) -> str | None:
        if isinstance(case, LatencyCase) and case.rate_hz == 0:
            return "back-to-back latency is measured for ping-pong floors only"
        if self.variant in ("zc", "batch") and isinstance(case, LatencyCase):
            return "latency is measured with one publish() per record and a copying reader"
        if self.variant == "spin" and case.readers + 1 > usable_cpus():
            return (
                f"{case.readers} spinning readers + the writer would oversubscribe the "
                f"{usable_cpus()} CPUs"
            )
        return None

    def run(self, case: Case, timeout: float) -> CaseResult:
        slot = (case.payload + RECORD_HEADER_SIZE + 7) // 8 * 8
        # The run directory's prefix names the segment, so that sweep_stale()
        # removes it should the whole harness be SIGKILLed.
        rundir = RunDir()
        try:
            chan = ShmdChannel(
                f"/{shm_prefix(rundir.path)}-{uuid.uuid4().hex[:8]}",
                _capacity(case.depth),
                slot,
                [
                    PassFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                    for _ in range(case.readers)
                ],
            )
            try:
                readers = [
                    Role(reader_role, (chan, case, i, self.variant)) for i in range(case.readers)
                ]
                writer = Role(type(self).writer_target, (chan, case, self.variant))
                return run_roles(writer, readers, timeout)
            finally:
                chan.close()
                # A writer killed by the harness (timeout, failure) cannot unlink.
                try:
                    Segment.unlink_name(chan.name)
                except SegmentNotFound:
                    pass  # the writer unlinked it, as it should
        finally:
            rundir.close()


IMPLS = [
    ShmdImpl("record"),
    ShmdImpl("batch"),
    ShmdImpl("zc"),
    ShmdImpl("spin"),
    ShmdImpl("into"),
]
