"""The reader side of the bus: read every record from a cursor, sleep when idle.

A reader writes only into the control part (the mutex, ``sleepers`` and its
own table entry); the ring is mapped read-only.  Reading a batch::

    W = write_seq; R = reserve_seq          (what is committed, what is in flux)
    decode the headers of [cursor, W) in one struct.iter_unpack per run
    copy payloads (or slice zero-copy views)
    R' = reserve_seq                         (re-read after copying)
    records below R' - capacity were being overwritten while we copied:
    they are dropped and counted as lost, never delivered half-written

A reader that the writer lapped learns exactly how many records it lost and
resumes at the oldest record still present.
"""

from __future__ import annotations

import os
import select
import time
from typing import NamedTuple

import structlog

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.errors import ReaderEvicted, SegmentClosed, SegmentLayoutError
from shmd.layout import (
    ALL_TOPICS,
    R_ASLEEP,
    R_CURSOR,
    R_DELIVERED,
    R_LAST_ACTIVE_NS,
    R_LOST,
    R_STATE,
    R_TOKEN,
    R_TOPICS,
    RECORD_HEADER_SIZE,
    Policy,
    ReaderState,
)
from shmd.ring import plan_read, runs, slot_stride, still_valid
from shmd.segment import Segment

log = structlog.get_logger("shmd.subscriber")


class Record(NamedTuple):
    """One record as a reader receives it."""

    seq: int
    timestamp_ns: int
    topic: int
    #: bytes (copying reads) or a read-only memoryview into the ring
    #: (zero-copy reads: check :meth:`Subscriber.still_valid` after use).
    payload: bytes | memoryview


#: A record as :meth:`Subscriber.read_batch` returns it: (seq, timestamp_ns, topic, payload).
RawRecord = tuple[int, int, int, bytes | memoryview]

#: How long a reader sleeps when it cannot take the mutex to announce its sleep
#: (someone holds it far too long): it re-checks rather than risk a lost wake-up.
DEGRADED_SLEEP = 0.05


class Subscriber:
    """One reader attached to a segment through its reader-table entry."""

    def __init__(
        self, segment: Segment, index: int, eventfd: OwnedFd | None = None, *,
        token: int | None = None, mutex_timeout: float = 0.5,
    ) -> None:
        if not 0 <= index < segment.geometry.max_readers:
            raise SegmentLayoutError(
                f"Failed to attach since reader index {index} is outside the table "
                f"(0..{segment.geometry.max_readers - 1})"
            )
        self.segment = segment
        self.index = index
        self.eventfd = eventfd
        self.mutex_timeout = mutex_timeout
        g = segment.geometry
        self._cap = g.capacity
        self._mask = g.capacity - 1
        self._slot = g.slot_size
        self._max_payload = g.max_payload
        self._stride = slot_stride(g.slot_size)
        # Copying reads allocate a slot-sized object per record.
        libc.keep_big_allocations(g.slot_size, g.capacity * g.slot_size)
        self._q0, self._u0 = Segment.entry_words(index)
        q = segment.q
        self._token = q[self._q0 + R_TOKEN // 8] if token is None else token
        self._cursor: int = q[self._q0 + R_CURSOR // 8]
        self._topics: int = q[self._q0 + R_TOPICS // 8]
        self._block = segment.header().policy == Policy.BLOCK
        self._ring_map = segment._ring_map
        self.delivered = 0
        self.lost = 0
        self._held = False  # records read with hold=True whose slots are not released
        self._check_entry()

    @classmethod
    def attach(
        cls, *, index: int, fd: int | OwnedFd | None = None, name: str | None = None,
        eventfd: OwnedFd | None = None, token: int | None = None, mutex_timeout: float = 0.5,
    ) -> Subscriber:
        """Map a segment (by received fd or by name) and take over table entry ``index``."""
        seg = Segment.open(name=name, fd=fd, control_writable=True, ring_writable=False)
        try:
            return cls(seg, index, eventfd, token=token, mutex_timeout=mutex_timeout)
        except BaseException:
            seg.close()
            raise

    # -- state -------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """The seq this reader reads next."""
        return self._cursor

    @property
    def active(self) -> bool:
        """The writer's shared *active* flag."""
        return bool(self.segment.u[Segment.ACTIVE])

    def available(self) -> int:
        """Committed records past the cursor (some may be for other topics)."""
        return max(0, self.segment.q[Segment.WRITE_SEQ] - self._cursor)

    def still_valid(self, seq: int) -> bool:
        """Whether a zero-copy record ``seq`` was intact until now (call after using it)."""
        libc.load_fence()
        return still_valid(seq, self.segment.q[Segment.RESERVE_SEQ], self._cap)

    def _check_entry(self) -> None:
        seg = self.segment
        if seg.closed:
            raise SegmentClosed("Failed to read since the subscriber was closed")
        state = seg.u[self._u0 + R_STATE // 4]
        if state != ReaderState.ATTACHED or seg.q[self._q0 + R_TOKEN // 8] != self._token:
            raise ReaderEvicted(
                f"Failed to read since the writer evicted reader entry {self.index} "
                f"(state {ReaderState(state).name if state in (0, 1, 2) else state})"
            )

    # -- reading -------------------------------------------------------------------

    def read(self, limit: int = 4096, *, copy: bool = True) -> list[Record]:
        """Up to ``limit`` records from the cursor, in order, for this reader's topics.

        An empty list means nothing new (or only records of other topics,
        or only lost ones: see :attr:`lost`).  ``copy=False`` returns
        zero-copy views whose validity :meth:`still_valid` tells.
        """
        new = tuple.__new__
        return [new(Record, t) for t in self.read_batch(limit, copy=copy)]

    def read_batch(
        self, limit: int = 4096, *, copy: bool = True, hold: bool = False,
    ) -> list[RawRecord]:
        """As :meth:`read`, as plain ``(seq, timestamp_ns, topic, payload)`` tuples.

        The hot path: building a NamedTuple costs more than the whole rest of
        a 64-byte record's read, so loops that handle millions of records a
        second (the reader daemon, the benchmarks) unpack plain tuples.

        ``hold=True`` (with ``copy=False``) keeps the writer from reusing
        these slots until :meth:`release`: under the block policy the views
        cannot be overwritten while the caller uses them (the way iceoryx2
        loans samples).  Reading on before releasing is fine.
        """
        seg = self.segment
        try:
            q = seg.q
        except AttributeError:
            # Segment.close() drops its views: reading after close() is a
            # caller's mistake and gets the named error, not AttributeError.
            raise SegmentClosed("Failed to read since the subscriber was closed") from None
        write_seq = q[Segment.WRITE_SEQ]
        cursor = self._cursor
        if write_seq <= cursor:
            return []
        self._check_entry()
        libc.load_fence()  # write_seq before reserve_seq and the slots
        plan = plan_read(cursor, write_seq, q[Segment.RESERVE_SEQ], self._cap, limit)
        out: list[RawRecord] = []
        ring = seg.ring
        # Slicing the mmap copies into a bytes object; slicing the memoryview
        # makes a view into the ring (zero-copy).
        src = self._ring_map if copy else ring
        assert src is not None
        slot, mask, hdr, stride = self._slot, self._mask, RECORD_HEADER_SIZE, self._stride
        tmask = self._topics
        everything = tmask == ALL_TOPICS
        bad = -1
        for first, count in runs(plan.start, plan.end, self._cap):
            base = (first & mask) * slot
            # One C-level pass decodes every header of the run.
            heads = list(stride.iter_unpack(ring[base : base + count * slot]))
            # The run's first and last slots must hold the seqs we expect; a
            # mismatch is either the writer lapping us (settled by the
            # reserve_seq re-read below) or a corrupt segment.  Per-record
            # integrity is what that re-read guarantees: no record at or
            # above reserve_seq - capacity was touched while we copied.
            if bad < 0 and (heads[0][0] != first or heads[-1][0] != first + count - 1):
                bad = first
            starts = range(base + hdr, base + count * slot, slot)
            if everything:
                out += [(h[0], h[1], h[3], src[o : o + h[2]])
                        for h, o in zip(heads, starts, strict=True)]
            else:
                out += [(h[0], h[1], h[3], src[o : o + h[2]])
                        for h, o in zip(heads, starts, strict=True) if tmask >> h[3] & 1]
        libc.load_fence()  # the copies before the re-read
        oldest_ok = q[Segment.RESERVE_SEQ] - self._cap
        lost = plan.lost
        if plan.start < oldest_ok:
            # The writer lapped us while we copied: every slot of a seq
            # below oldest_ok may hold a torn record or a whole one of a
            # later lap.  Drop those positions and count them.  The header
            # seq cannot say which to drop (a later lap's record there
            # carries seq + capacity); positions can: with every topic,
            # out holds one record per position from plan.start.  With a
            # topic filter, a slot of a seq at or above oldest_ok was not
            # touched, so its header seq is its position, and a later
            # lap's record carries a seq of at least plan.end.
            cut = min(oldest_ok, plan.end)
            lost += cut - plan.start
            if everything:
                out = out[cut - plan.start :]
            else:
                out = [r for r in out if cut <= r[0] < plan.end]
        elif bad >= 0:
            raise SegmentLayoutError(
                f"Failed to read record {bad} since its slot holds another record although "
                "the writer had not lapped us (corrupt segment)"
            )
        self._advance(plan.end, len(out), lost, hold)
        return out

    def _advance(self, cursor: int, delivered: int, lost: int, hold: bool = False) -> None:
        self._cursor = cursor
        self.delivered += delivered
        self.lost += lost
        if hold:
            self._held = True
        else:
            self._publish_cursor()

    def release(self) -> None:
        """Let the writer reuse the slots of records read with ``hold=True``.

        Until then, under the block policy, the writer cannot overwrite them,
        so zero-copy views stay valid.  :meth:`prepare_sleep` releases too.
        """
        if self._held:
            self._publish_cursor()

    def _publish_cursor(self) -> None:
        self._held = False
        seg = self.segment
        q, q0 = seg.q, self._q0
        cursor = self._cursor
        q[q0 + R_CURSOR // 8] = cursor
        q[q0 + R_DELIVERED // 8] = self.delivered
        q[q0 + R_LOST // 8] = self.lost
        q[q0 + R_LAST_ACTIVE_NS // 8] = time.monotonic_ns()
        if self._block:
            # StoreLoad, pairing with the writer's fence after it sets
            # writer_waiting: one of us sees the other's store.
            libc.fence()
            if seg.u[Segment.WRITER_WAITING]:
                seg.sem_post()

    def carry_over(self, delivered: int, lost: int) -> None:
        """Continue counting from another subscriber's totals (a reader resuming on a
        restarted writer's segment); stored in the entry too, for the writer's reports."""
        self.delivered, self.lost = delivered, lost
        q, q0 = self.segment.q, self._q0
        q[q0 + R_DELIVERED // 8] = delivered
        q[q0 + R_LOST // 8] = lost

    # -- sleeping -------------------------------------------------------------------

    def _lock(self) -> bool:
        result = self.segment.lock(self.mutex_timeout)
        if result is libc.LockResult.TIMEOUT:
            return False
        if result is libc.LockResult.OWNER_DIED:
            sleepers = self.segment.recount_sleepers()
            log.warning("mutex_owner_died", role="reader", segment=self.segment.name,
                        sleepers=sleepers)
        return True

    def prepare_sleep(self) -> float | None:
        """Announce that this reader is going to sleep.

        Returns how long to sleep: 0.0 = do not (records arrived or the
        writer went inactive in between), None = until the eventfd fires,
        or a short timeout when the mutex could not be taken in time.
        """
        seg = self.segment
        u, q = seg.u, seg.q
        if self._held:
            self.release()  # a sleeping reader must not hold the writer up
        if q[Segment.WRITE_SEQ] > self._cursor or not u[Segment.ACTIVE]:
            return 0.0
        if not self._lock():
            return DEGRADED_SLEEP
        try:
            asleep = self._u0 + R_ASLEEP // 4
            if not u[asleep]:
                u[asleep] = 1
                u[Segment.SLEEPERS] += 1
            # StoreLoad: our flag must be visible before we re-read
            # write_seq (the writer stores write_seq, fences, reads sleepers).
            libc.fence()
            if q[Segment.WRITE_SEQ] > self._cursor or not u[Segment.ACTIVE]:
                u[asleep] = 0
                u[Segment.SLEEPERS] -= 1
                return 0.0
            return None
        finally:
            seg.unlock()

    def woke(self) -> None:
        """After a sleep: consume the eventfd, and withdraw the asleep flag if still set."""
        if self.eventfd is not None:
            try:
                os.read(self.eventfd.fileno(), 8)
            except BlockingIOError:
                pass
        seg = self.segment
        asleep = self._u0 + R_ASLEEP // 4
        if seg.u[asleep] and self._lock():
            try:
                if seg.u[asleep]:
                    seg.u[asleep] = 0
                    seg.u[Segment.SLEEPERS] -= 1
            finally:
                seg.unlock()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep on the eventfd until records may be there; False on timeout.

        The simple one-fd wait; daemons use :class:`shmd.reactor.ReaderLoop`,
        which watches further fds in the same epoll.
        """
        if self.eventfd is None:
            raise ValueError("Failed to wait since this subscriber has no eventfd")
        sleep = self.prepare_sleep()
        if sleep == 0.0:
            return True
        if sleep is not None and (timeout is None or sleep < timeout):
            timeout = sleep
        with select.epoll(1) as ep:
            ep.register(self.eventfd.fileno(), select.EPOLLIN)
            ready = ep.poll(-1 if timeout is None else timeout)
        self.woke()
        return bool(ready) or self.available() > 0

    def close(self) -> None:
        """Unmap the segment and close the eventfd (never unlinks); idempotent."""
        if self.eventfd is not None:
            self.eventfd.close()
        self._ring_map = None
        self.segment.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
