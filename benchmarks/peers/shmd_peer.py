"""shmd itself: the library's Publisher and Subscriber, the way an application uses them.

``shmd`` (copying) and ``shmd-zc`` (zero-copy: the writer produces big
records in place in their slots, the reader checks views into the ring,
held until checked, then released), each the counterpart of ``iceoryx2``
and ``iceoryx2-zc``.  Both use the block policy, so
nothing is ever dropped, and the same record format and per-record checks as
every other impl (head seq, tail seq, length; see ``benchmarks.harness``).

What differs from a socket peer is what shmd is designed for:

* the writer publishes throughput runs in batches (``publish_batch``: one
  commit and at most one wake-up per reader per batch) of records stamped
  one by one, and big records through ``reserve_batch()`` (one copy,
  straight into the slots, one commit per batch);
* the reader takes whole batches (``read_batch``: one C-level header decode
  per run of slots) and sleeps in epoll on its eventfd only when there is
  nothing to read.

Latency runs publish each record on its own (``publish``) at the paced
rate, so the sample is one publish, one wake-up and one read.
"""

from __future__ import annotations

import os
import select
import time
import uuid
from dataclasses import dataclass

from benchmarks.harness import (
    HEAD,
    TAIL,
    Case,
    CaseResult,
    Kind,
    LatencyCase,
    PassFd,
    ReaderStats,
    Role,
    RoleControl,
    RunDir,
    WriterStats,
    check,
    run_roles,
    send_paced,
    shm_prefix,
    vm_hwm_kib,
)
from shmd import Publisher, Subscriber
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import RECORD_HEADER_SIZE, Policy
from shmd.bus.segment import Segment
from shmd.errors import SegmentNotFound

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


def writer_role(ctl: RoleControl, chan: ShmdChannel, case: Case, zero_copy: bool) -> WriterStats:
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
        cpu0 = time.process_time_ns()
        if isinstance(case, LatencyCase):
            records = case.count
            t_start, t_end = send_paced(pub.publish, case.payload, records, case.rate_hz)
        else:
            records = case.records
            batch = min(BATCH, chan.capacity // 2)
            if case.payload >= RESERVE_FROM:
                t_start, t_end = _in_place(pub, case.payload, records, batch, zero_copy)
            else:
                t_start, t_end = _batched(pub, case.payload, records, batch)
        ctl.sent()
        ctl.wait_close()
        cpu = time.process_time_ns() - cpu0
    finally:
        pub.close()
        pub.unlink()
    return WriterStats(records, t_start, t_end, cpu, vm_hwm_kib())


def _batched(pub: Publisher, payload: int, records: int, batch: int) -> tuple[int, int]:
    middle = bytes(payload - HEAD.size - TAIL.size)
    pack_head, pack_tail, now = HEAD.pack, TAIL.pack, time.monotonic_ns
    publish_batch = pub.publish_batch
    t_start = now()
    for start in range(0, records, batch):
        publish_batch(
            [
                pack_head(seq, now()) + middle + pack_tail(seq)
                for seq in range(start, min(start + batch, records))
            ]
        )
    return t_start, now()


def _in_place(
    pub: Publisher, payload: int, records: int, batch: int, zero_copy: bool
) -> tuple[int, int]:
    template = bytes(payload)
    tail = payload - TAIL.size
    pack_head, pack_tail, now = HEAD.pack_into, TAIL.pack_into, time.monotonic_ns
    t_start = now()
    for start in range(0, records, batch):
        res = pub.reserve_batch(min(batch, records - start), payload)
        for seq, buf in enumerate(res.buffers, start):
            if not zero_copy:
                # The copying variant copies the whole record in, as a socket
                # peer sends it whole (and as the copying iceoryx2 writer
                # does).  The zero-copy one produces the record in place: it
                # writes what it produces, the stamps, exactly like the
                # iceoryx2-zc writer into its loaned sample.
                buf[:] = template
            pack_head(buf, 0, seq, now())
            pack_tail(buf, tail, seq)
        res.commit()
    return t_start, now()


def reader_role(
    ctl: RoleControl, chan: ShmdChannel, case: Case, index: int, zero_copy: bool
) -> ReaderStats:
    """Attach by name to entry ``index``; read and check every record."""
    efd = OwnedFd(os.dup(chan.eventfds[index].fd))
    chan.close()
    sub = Subscriber.attach(index=index, name=chan.name, eventfd=efd)
    epoll = select.epoll(1)
    epoll.register(efd.fileno(), select.EPOLLIN)
    records = case.count if isinstance(case, LatencyCase) else case.records
    payload = case.payload
    latency = isinstance(case, LatencyCase)
    latencies = [0] * records if latency else []
    unpack_head, unpack_tail, now = HEAD.unpack_from, TAIL.unpack_from, time.monotonic_ns
    tail = payload - TAIL.size
    read_batch, prepare_sleep = sub.read_batch, sub.prepare_sleep
    expected = 0
    error = ""
    t_first = 0
    try:
        ctl.ready()
        cpu0 = time.process_time_ns()
        while expected < records and not error:
            batch = read_batch(4096, copy=not zero_copy, hold=zero_copy)
            if not batch:
                sleep = prepare_sleep()
                if sleep != 0.0:
                    epoll.poll(-1 if sleep is None else sleep)
                continue
            t = now()
            if not t_first:
                t_first = t
            for _seq, _ts, _topic, record in batch:
                if (
                    len(record) != payload
                    or unpack_head(record, 0)[0] != expected
                    or unpack_tail(record, tail)[0] != expected
                ):
                    error = check(record, expected, payload)
                    break
                if latency:
                    latencies[expected] = t - unpack_head(record, 0)[1]
                expected += 1
            if zero_copy:
                if not error and not sub.still_valid(batch[0][0]):
                    error = f"record {batch[0][0]}: overwritten while held"
                del batch
                sub.release()
        t_last = now()
        cpu = time.process_time_ns() - cpu0
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
        )
        ctl.result(stats)
    finally:
        epoll.close()
        sub.close()
    return stats


class ShmdImpl:
    """shmd's library, copying or zero-copy readers."""

    kind: Kind = "shmd"

    def __init__(self, zero_copy: bool) -> None:
        self.zero_copy = zero_copy
        self.name = "shmd-zc" if zero_copy else "shmd"

    def available(self) -> str | None:
        return None

    def supports(self, case: Case) -> str | None:
        if isinstance(case, LatencyCase) and case.rate_hz == 0:
            return "back-to-back latency is measured for ping-pong floors only"
        if self.zero_copy and isinstance(case, LatencyCase):
            return "latency is measured with the copying reader"
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
                    Role(reader_role, (chan, case, i, self.zero_copy)) for i in range(case.readers)
                ]
                return run_roles(Role(writer_role, (chan, case, self.zero_copy)), readers, timeout)
            finally:
                chan.close()
                # A writer killed by the harness (timeout, failure) cannot unlink.
                try:
                    Segment.unlink_name(chan.name)
                except SegmentNotFound:
                    pass  # the writer unlinked it, as it should
        finally:
            rundir.close()


IMPLS = [ShmdImpl(zero_copy=False), ShmdImpl(zero_copy=True)]
