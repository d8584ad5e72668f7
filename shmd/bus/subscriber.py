"""The reader side of the bus: read every record from a cursor, sleep when idle.

A reader writes only into the control part (the mutex, ``sleep_count`` and its
own table entry); the ring is mapped read-only.  Reading a batch::

    W = write_seq; R = reserve_seq          (what is committed, what is in flux)
    decode the headers of [cursor, W) in one struct.iter_unpack per run
    copy payloads (or slice zero-copy views)
    R' = reserve_seq                         (re-read after copying)
    records below R' - capacity were being overwritten while we copied:
    they are dropped and counted as lost, never delivered half-written

A reader that the writer lapped learns exactly how many records it lost and
resumes at the oldest record still present.

Kept whole (a little over 500 lines): reading and the sleep handshake share
the entry's cursor, the cursor a read leaves for later and the views cached
for the read path, and each half must settle what the other left before it
runs; split, every step would go through a second object's state.
"""

from __future__ import annotations

import mmap
import os
import select
import time

import structlog

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import (
    ALL_TOPICS,
    RECORD_HEADER_SIZE,
    RECORD_READ_HEADER,
    RQ_CURSOR,
    RQ_DELIVERED,
    RQ_LAST_ACTIVE_NS,
    RQ_LOST,
    RQ_TOKEN,
    RQ_TOPICS,
    RU_SLEEP_SEQ,
    RU_STATE,
    RU_WAKE_SEQ,
    Policy,
    RawRecord,
    ReaderState,
    Record,
    slot_stride,
)
from shmd.bus.ring import drop_lapped, plan_read, runs, still_valid
from shmd.bus.segment import Segment
from shmd.errors import ReaderEvicted, SegmentClosed, SegmentLayoutError

# Record and RawRecord, the rows a reader hands out, are defined with the
# record header in shmd.bus.layout; they are re-exported here, where their
# users meet them.
__all__ = ["COPY_BATCH_BYTES", "RawRecord", "Record", "Subscriber"]

log = structlog.get_logger("shmd.bus.subscriber")

_WRITE_SEQ = Segment.WRITE_SEQ
_RESERVE_SEQ = Segment.RESERVE_SEQ
_ATTACHED = int(ReaderState.ATTACHED)
_TSO = libc.TSO
#: (seq, timestamp_ns, length, topic) of the record header at an offset.
_HEAD = RECORD_READ_HEADER.unpack_from


#: The most slot bytes one copying read_batch copies (at least one record).
COPY_BATCH_BYTES = 1 << 20

#: Rings with at least this many slots let a one-record read leave its cursor
#: to the next call (one slot is then at most 1/64 of the writer's room).
DEFER_CURSOR_MIN_CAPACITY = 64

#: How long a reader sleeps when it cannot take the mutex to announce its sleep
#: (someone holds it far too long): it re-checks rather than risk a lost wake-up.
DEGRADED_SLEEP = 0.05


class Subscriber:
    """One reader attached to a segment through its reader-table entry."""

    def __init__(
        self,
        segment: Segment,
        index: int,
        eventfd: OwnedFd | None = None,
        *,
        token: int | None = None,
        mutex_timeout: float = 0.5,
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
        self._copy_limit = max(1, COPY_BATCH_BYTES // g.slot_size)
        # Copying reads allocate a slot-sized object per record.
        libc.keep_big_allocations(g.slot_size, g.capacity * g.slot_size)
        self._q0, self._u0 = Segment.entry_words(index)
        q = segment.q
        self._token = q[self._q0 + RQ_TOKEN] if token is None else token
        self._cursor: int = q[self._q0 + RQ_CURSOR]
        self._topics: int = q[self._q0 + RQ_TOPICS]
        self._block = segment.header().policy == Policy.BLOCK
        self._ring_map = segment._ring_map
        # The segment's views and our entry's word indices, for read_batch
        # (each lookup saved is ~1 us after a sleep).  Segment.close()
        # releases the views, so a read after it fails on the first access.
        self._q, self._u, self._ring = q, segment.u, segment.ring
        self._state_at = self._u0 + RU_STATE
        self._token_at = self._q0 + RQ_TOKEN
        self.delivered = 0
        self.lost = 0
        self._held = False  # records read with hold=True whose slots are not released
        #: A one-record read left its cursor for the next call to publish (see read_batch).
        self._cursor_owed = False
        #: Whether one-record reads may leave their cursor: only where one slot
        #: is a small part of the ring (a few big slots: the writer needs it).
        self._may_owe = g.capacity >= DEFER_CURSOR_MIN_CAPACITY
        #: The cursor at our last post of the writer's semaphore (block policy).
        self._posted_at = -1
        #: wait()'s epoll, made at its first call and kept (closed by close()).
        self._waiter: select.epoll | None = None
        self._check_entry()

    @classmethod
    def attach(
        cls,
        *,
        index: int,
        fd: int | OwnedFd | None = None,
        name: str | None = None,
        eventfd: OwnedFd | None = None,
        token: int | None = None,
        mutex_timeout: float = 0.5,
    ) -> Subscriber:
        """Map a segment (by received fd or by name) and take over table entry ``index``."""
        seg = Segment.open(
            name=name, fd=fd, control_writable=True, ring_writable=False, populate=True
        )
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
        state = seg.u[self._u0 + RU_STATE]
        if state != ReaderState.ATTACHED or seg.q[self._q0 + RQ_TOKEN] != self._token:
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

    def read_batch(  # noqa: PLR0912, PLR0915 - flat on purpose: each call costs, cold, after a sleep
        self,
        limit: int = 4096,
        *,
        copy: bool = True,
        hold: bool = False,
    ) -> list[RawRecord]:
        """As :meth:`read`, as plain ``(seq, timestamp_ns, topic, payload)`` tuples.

        The hot path: building a NamedTuple costs more than the whole rest of
        a 64-byte record's read, so loops that handle millions of records a
        second (the reader daemon, the benchmarks) unpack plain tuples.

        A copying read returns at most :data:`COPY_BATCH_BYTES` of slots (and
        at least one record), whatever ``limit`` says: fresh copies that stay
        small enough for the cache are much faster to make (measured here:
        eight 1 MiB copies held at once took 105 us per MiB, one at a time
        43 us per MiB).

        ``hold=True`` (with ``copy=False``) keeps the writer from reusing
        these slots until :meth:`release`: under the block policy the views
        cannot be overwritten while the caller uses them (the way iceoryx2
        loans samples).  Reading on before releasing is fine.
        """
        q = self._q
        try:
            write_seq = q[_WRITE_SEQ]
        except ValueError:
            # Segment.close() released the view: reading after close() is a
            # caller's mistake and gets the named error.
            raise SegmentClosed("Failed to read since the subscriber was closed") from None
        cursor = self._cursor
        if write_seq <= cursor:
            if self._cursor_owed:
                self._settle()
            if self._block:
                self._post_owed()
            return []
        if self._u[self._state_at] != _ATTACHED or q[self._token_at] != self._token:
            self._check_entry()  # raises the error that says what happened
        if not _TSO:
            libc.load_fence()  # write_seq before reserve_seq and the slots
        if copy and limit > self._copy_limit:
            limit = self._copy_limit
        reserve, cap = q[_RESERVE_SEQ], self._cap
        if cursor + cap >= reserve:  # not lapped: plan_read's answer, without the call
            start, end, lost = cursor, min(write_seq, cursor + limit), 0
        else:
            start, end, lost = plan_read(cursor, write_seq, reserve, cap, limit)
        ring = self._ring
        # Slicing the mmap copies into a bytes object; slicing the memoryview
        # makes a view into the ring (zero-copy).  (_ring_map is None only
        # after close(), which the first load above already caught.)
        src: mmap.mmap | memoryview = self._ring_map if copy else ring  # type: ignore[assignment]
        tmask = self._topics
        everything = tmask == ALL_TOPICS
        one = end - start == 1
        if one:
            # One record (a paced stream, woken per record): the same steps
            # as below without building a run, which after a sleep, with
            # cold caches, costs more than the record itself.
            base = (start & self._mask) * self._slot
            seq, ts, length, topic = _HEAD(ring, base)
            bad = start if seq != start else -1
            base += RECORD_HEADER_SIZE
            out: list[RawRecord] = (
                [(seq, ts, topic, src[base : base + length])]
                if everything or tmask >> topic & 1
                else []
            )
        else:
            out, bad = self._read_runs(src, start, end, tmask if not everything else None)
        if not _TSO:
            libc.load_fence()  # the copies before the re-read
        oldest_ok = q[_RESERVE_SEQ] - cap
        if start < oldest_ok:
            cut = min(oldest_ok, end)
            lost += cut - start
            out = drop_lapped(out, start, end, cut, everything)
        elif bad >= 0:
            raise SegmentLayoutError(
                f"Failed to read record {bad} since its slot holds another record although "
                "the writer had not lapped us (corrupt segment)"
            )
        self._cursor = end
        self.delivered += len(out)
        self.lost += lost
        if hold:
            self._held = True
        elif one and self._may_owe and not self._cursor_owed:
            # Publishing the cursor is four stores and a clock read, as much
            # as the rest of a one-record read; on the latency path it would
            # come before the caller has its record.  The next call publishes
            # it (a read, prepare_sleep, release, close), so the writer sees
            # this reader at most one slot behind, the way the floor's reader
            # hands back credit only before it sleeps.  Not in a ring of a few
            # big slots, where one slot is room the writer waits for (and a
            # big record's copy dwarfs the stores anyway).
            self._cursor_owed = True
        else:
            self._publish_cursor()
        return out

    def _read_runs(
        self,
        src: mmap.mmap | memoryview,
        start: int,
        end: int,
        tmask: int | None,
    ) -> tuple[list[RawRecord], int]:
        """Records ``[start, end)`` (of topics in ``tmask``, None: all), and the
        first seq whose slot held another record (-1: none)."""
        ring = self.segment.ring
        slot, mask, hdr, stride = self._slot, self._mask, RECORD_HEADER_SIZE, self._stride
        out: list[RawRecord] = []
        bad = -1
        # Most reads do not wrap the ring: one run, without a generator.
        pieces = (
            runs(start, end, self._cap)
            if (start & mask) + end - start > self._cap
            else ((start, end - start),)
            if end > start
            else ()
        )
        for first, count in pieces:
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
            if tmask is None:
                out += [
                    (h[0], h[1], h[3], src[o : o + h[2]])
                    for h, o in zip(heads, starts, strict=True)
                ]
            else:
                out += [
                    (h[0], h[1], h[3], src[o : o + h[2]])
                    for h, o in zip(heads, starts, strict=True)
                    if tmask >> h[3] & 1
                ]
        return out, bad

    def release(self) -> None:
        """Let the writer reuse the slots of records read with ``hold=True``.

        Until then, under the block policy, the writer cannot overwrite them,
        so zero-copy views stay valid.  :meth:`prepare_sleep` releases too.
        It also stores a cursor a one-record read left for later.
        """
        if self._held or self._cursor_owed:
            self._settle()

    def _settle(self) -> None:
        """Publish a cursor a read left for later, if the entry is still ours.

        Between that read and now the writer may have evicted us and given
        the entry to another reader: our cursor must not land in its entry.
        """
        if (
            not self.segment.closed
            and self._u[self._state_at] == _ATTACHED
            and self._q[self._token_at] == self._token
        ):
            self._publish_cursor()
        else:
            # Closed (close() already stored a left cursor; held slots went
            # with the mapping) or no longer our entry: nothing to store.
            self._held = self._cursor_owed = False

    def _publish_cursor(self) -> None:
        self._held = self._cursor_owed = False
        seg = self.segment
        q, q0 = seg.q, self._q0
        cursor = self._cursor
        q[q0 + RQ_CURSOR] = cursor
        q[q0 + RQ_DELIVERED] = self.delivered
        q[q0 + RQ_LOST] = self.lost
        q[q0 + RQ_LAST_ACTIVE_NS] = time.monotonic_ns()
        # No fence between the cursor store and the writer_waiting load: a
        # fence here would be paid on every read, and the writer waits
        # rarely.  Without it both sides can miss each other once (the
        # writer sees the old cursor, we see writer_waiting = 0); then we
        # post at our next read (see _post_owed) or after prepare_sleep's
        # fence, and the writer re-checks the cursors every
        # WAIT_SLICE anyway (shmd.bus.block.wait_for_space).
        if self._block and seg.u[Segment.WRITER_WAITING]:
            self._posted_at = cursor
            seg.sem_post()

    def _post_owed(self) -> None:
        """Post the writer that waits for space we freed but did not post for."""
        if self._posted_at != self._cursor and self.segment.u[Segment.WRITER_WAITING]:
            self._posted_at = self._cursor
            self.segment.sem_post()

    def carry_over(self, delivered: int, lost: int) -> None:
        """Continue counting from another subscriber's totals (a reader resuming on a
        restarted writer's segment); stored in the entry too, for the writer's reports."""
        self.delivered, self.lost = delivered, lost
        q, q0 = self.segment.q, self._q0
        q[q0 + RQ_DELIVERED] = delivered
        q[q0 + RQ_LOST] = lost

    # -- sleeping -------------------------------------------------------------------

    def _lock(self) -> bool:
        result = self.segment.lock(self.mutex_timeout)
        if result is libc.LockResult.TIMEOUT:
            return False
        if result is libc.LockResult.OWNER_DIED:
            # Nothing to repair for us: the one word readers change under the
            # mutex is sleep_count, and only its changes mean anything (ours
            # follows right away).
            log.warning("mutex_owner_died", role="reader", segment=self.segment.name)
        return True

    def prepare_sleep(self) -> float | None:
        """Announce that this reader is going to sleep.

        Returns how long to sleep: 0.0 = do not (records arrived or the
        writer went inactive in between), None = until the eventfd fires,
        or a short timeout when the mutex could not be taken in time.

        The eventfd is drained here, before announcing, not after waking:
        the wake-up path then costs no syscall, and a write answering this
        announcement can only come after the drain.  An announcement the
        writer has not answered yet (we withdrew it, or woke for something
        else) stands: the writer answers it at its next commit with one
        eventfd write, so we do not announce again.
        """
        seg = self.segment
        if seg.closed:
            raise SegmentClosed("Failed to sleep since the subscriber was closed")
        u, q = seg.u, seg.q
        if self._held or self._cursor_owed:
            self._settle()  # a sleeping reader must not hold the writer up
        if q[Segment.WRITE_SEQ] > self._cursor or not u[Segment.ACTIVE]:
            return 0.0
        self._check_entry()  # an evicted reader must not announce into a reused entry
        if self.eventfd is not None:
            try:
                os.read(self.eventfd.fileno(), 8)
            except BlockingIOError:
                pass  # nothing pending
        sleep_seq = self._u0 + RU_SLEEP_SEQ
        asked = u[sleep_seq]
        if asked == u[self._u0 + RU_WAKE_SEQ]:
            if not self._lock():
                return DEGRADED_SLEEP
            try:
                u[sleep_seq] = (asked + 1) & 0xFFFFFFFF
                u[Segment.SLEEP_COUNT] = (u[Segment.SLEEP_COUNT] + 1) & 0xFFFFFFFF
            finally:
                seg.unlock()
        # StoreLoad: our announcement must be visible before we re-read
        # write_seq (the writer stores write_seq, fences, reads sleep_count).
        libc.fence()
        if self._block:
            self._post_owed()  # after a fence: a writer waiting for us is seen now
        if q[Segment.WRITE_SEQ] > self._cursor or not u[Segment.ACTIVE]:
            return 0.0  # the announcement stands: one spurious wake-up later, no lost one
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep on the eventfd until records are committed past the cursor.

        True: records are committed past the cursor (:meth:`read` finds them,
        unless they are all of other topics or were lost to an overrun), or
        the writer went inactive.  False: ``timeout`` seconds passed first.

        A wake-up alone promises nothing: the writer wakes a sleeping reader
        of a small record *before* it commits it (the early wake-up of
        docs/PROTOCOL.md), so a reader can wake to a ring that has nothing
        new yet.  Then this announces a new sleep, which the writer answers
        right after the commit, and sleeps again.

        The simple one-fd wait, in an epoll this subscriber makes at the
        first call and keeps until :meth:`close`; daemons use
        :class:`shmd.bus.loop.ReaderLoop`, which watches further fds in the
        same epoll.
        """
        if self.eventfd is None:
            raise ValueError("Failed to wait since this subscriber has no eventfd")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            sleep = self.prepare_sleep()
            if sleep == 0.0:
                return True
            if sleep is not None and (left is None or sleep < left):
                left = sleep
            self._epoll_wait(left)
            if self.available() > 0 or not self.segment.u[Segment.ACTIVE]:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _epoll_wait(self, timeout: float | None) -> None:
        waiter = self._waiter
        if waiter is None:
            assert self.eventfd is not None  # wait() checked
            # One epoll for every wait: making one per call cost three more
            # syscalls (create, register, close) before each sleep.
            waiter = select.epoll(1)
            try:
                waiter.register(self.eventfd.fileno(), select.EPOLLIN)
            except BaseException:
                waiter.close()  # kept only once it watches the eventfd
                raise
            self._waiter = waiter
        waiter.poll(-1 if timeout is None else timeout, 1)

    def close(self) -> None:
        """Unmap the segment, close the eventfd and wait()'s epoll (never unlinks); idempotent."""
        if self._cursor_owed:
            self._settle()  # the writer's detach report counts every record we read
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()  # before the eventfd it watches
        if self.eventfd is not None:
            self.eventfd.close()
        self._ring_map = None
        self.segment.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
