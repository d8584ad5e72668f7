"""The reader side of the bus: read every record from a cursor, sleep when idle.

A reader writes only into the control part (``sleep_count`` and its own table
entry); the ring is mapped read-only.  Reading a batch (docs/PROTOCOL.md,
"Reading")::

    W = write_seq; R = reserve_seq          (what is committed, what is in flux)
    copy payloads (or slice zero-copy views) of [max(cursor, R - capacity), W)
    R' = reserve_seq                         (re-read after copying)
    records below R' - capacity were being overwritten while we copied:
    they are dropped and counted as lost, never delivered half-written

A reader that the writer lapped learns exactly how many records it lost and
resumes at the oldest record still present.  Reading and the sleep
announcement are the compiled core's ``Reader`` (shmd/_sys/_reader.c, each
step's memory order written beside it); this class attaches, waits, closes,
and turns the core's errors into the library's.
"""

from __future__ import annotations

import select
import time

import structlog

from shmd._sys import _core, libc
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import (
    RQ_TOKEN,
    RU_STATE,
    Policy,
    RawRecord,
    ReaderState,
    Record,
)
from shmd.bus.ring import still_valid
from shmd.bus.segment import Segment
from shmd.bus.wait import WaitStrategy
from shmd.errors import ReaderEvicted, SegmentClosed, SegmentError, SegmentLayoutError

# Record and RawRecord, the rows a reader hands out, are defined with the
# record header in shmd.bus.layout; they are re-exported here, where their
# users meet them.
__all__ = ["COPY_BATCH_BYTES", "RawRecord", "Record", "Subscriber"]

log = structlog.get_logger("shmd.bus.subscriber")

#: The codes of the core's on_error (shmd/_sys/_reader.c).
_ERR_EVICTED, _ERR_CORRUPT, _ERR_CLOSED_SLEEP = 2, 3, 4

#: The most slot bytes one copying read_batch copies (at least one record).
COPY_BATCH_BYTES = _core.COPY_BATCH_BYTES

#: Rings with at least this many slots let a one-record read leave its cursor
#: to the next call (one slot is then at most 1/64 of the writer's room).
DEFER_CURSOR_MIN_CAPACITY = _core.DEFER_CURSOR_MIN_CAPACITY


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
        wait: WaitStrategy | None = None,
    ) -> None:
        if not 0 <= index < segment.geometry.max_readers:
            raise SegmentLayoutError(
                f"Failed to attach since reader index {index} is outside the table "
                f"(0..{segment.geometry.max_readers - 1})"
            )
        if not segment.control_writable:
            raise SegmentError(
                f"Failed to attach to reader entry {index} since the segment's control part "
                "is mapped read-only (a reader writes its cursor and sleep announcements "
                "there: open it with control_writable=True)"
            )
        self.segment = segment
        self.index = index
        self.eventfd = eventfd
        self.mutex_timeout = mutex_timeout
        #: How wait() waits (and ReaderLoop): sleep, spin or backoff.
        self.wait_strategy = wait if wait is not None else WaitStrategy.sleep()
        g = segment.geometry
        self._cap = g.capacity
        # Copying reads allocate a slot-sized object per record.
        libc.keep_big_allocations(g.slot_size, g.capacity * g.slot_size)
        self._q0, self._u0 = Segment.entry_words(index)
        q = segment.q
        self._token = q[self._q0 + RQ_TOKEN] if token is None else token
        #: wait()'s epoll, made at its first call and kept (closed by close()).
        self._waiter: select.epoll | None = None
        self._check_entry()
        #: The compiled hot path: reading, the sleep announcement.
        self._r = _core.Reader(
            control=segment._control,
            ring=segment._ring_map,
            ring_view=segment.ring,
            capacity=g.capacity,
            slot_size=g.slot_size,
            index=index,
            token=self._token,
            block=segment.header().policy == Policy.BLOCK,
            eventfd=-1 if eventfd is None else eventfd.fileno(),
            on_error=self._fail,
        )
        # No Python frame per read or sleep: these are the core's own methods.
        self.read_batch = self._r.read_batch  # type: ignore[method-assign]  # bound C method
        self.prepare_sleep = self._r.prepare_sleep  # type: ignore[method-assign]  # bound C method
        self.read_into = self._r.read_into  # type: ignore[method-assign]  # bound C method
        self.spin = self._r.spin  # type: ignore[method-assign]  # bound C method

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
        wait: WaitStrategy | None = None,
    ) -> Subscriber:
        """Map a segment (by received fd or by name) and take over table entry ``index``."""
        seg = Segment.open(
            name=name, fd=fd, control_writable=True, ring_writable=False, populate=True
        )
        try:
            return cls(seg, index, eventfd, token=token, mutex_timeout=mutex_timeout, wait=wait)
        except BaseException:
            seg.close()
            raise

    # -- state -------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """The seq this reader reads next."""
        return int(self._r.cursor)

    @property
    def delivered(self) -> int:
        """Records this subscriber delivered (carried over from a previous one: see carry_over)."""
        return int(self._r.delivered)

    @property
    def lost(self) -> int:
        """Records the writer overwrote before this reader read them (of any topic)."""
        return int(self._r.lost)

    @property
    def active(self) -> bool:
        """The writer's shared *active* flag."""
        return bool(self.segment.u[Segment.ACTIVE])

    def available(self) -> int:
        """Committed records past the cursor (some may be for other topics)."""
        return max(0, self.segment.q[Segment.WRITE_SEQ] - self._r.cursor)

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

    def _fail(self, code: int, seq: int) -> None:
        """The core's on_error: raise the error for ``code`` (see shmd/_sys/_reader.c)."""
        if code == _ERR_EVICTED:
            self._check_entry()  # raises the error that says what happened
            raise ReaderEvicted(
                f"Failed to read since the writer evicted reader entry {self.index}"
            )
        if code == _ERR_CORRUPT:
            raise SegmentLayoutError(
                f"Failed to read record {seq} since its slot holds another record although "
                "the writer had not lapped us (corrupt segment)"
            )
        if code == _ERR_CLOSED_SLEEP:
            raise SegmentClosed("Failed to sleep since the subscriber was closed")
        raise SegmentClosed("Failed to read since the subscriber was closed")

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
        self,
        limit: int = 4096,
        *,
        copy: bool = True,
        hold: bool = False,
    ) -> list[RawRecord]:
        """As :meth:`read`, as plain ``(seq, timestamp_ns, topic, payload)`` tuples.

        The hot path (the core's ``Reader.read_batch``, shmd/_sys/_reader.c,
        bound on the instance in ``__init__``): building a NamedTuple costs
        more than the whole rest of a 64-byte record's read, so loops that
        handle millions of records a second (the reader daemon, the
        benchmarks) unpack plain tuples.

        A read plans at most one ring (``capacity`` records), whatever
        ``limit`` says, so a hostile ``write_seq`` costs one ring's checks.
        A copying read returns at most :data:`COPY_BATCH_BYTES` of slots (and
        at least one record), whatever ``limit`` says: fresh copies that stay
        small enough for the cache are much faster to make (measured here:
        eight 1 MiB copies held at once took 105 us per MiB, one at a time
        43 us per MiB).

        ``hold=True`` (with ``copy=False``) keeps the writer from reusing
        these slots (the way iceoryx2 loans samples, but by lifetime): under
        the block policy each payload is a view of a ``_core.Loan``, and its
        slot stays held until :meth:`release` (or the next sleep
        announcement, or a read without ``hold``) *and* until the last view
        made from it (a slice, a ``numpy.frombuffer`` array) is gone; then
        the reader publishes its cursor at once, waking a writer that waits
        for that slot.  So a view kept past the release still reads its own
        record, at the price of the writer waiting for its slot (and
        evicting this reader after ``block_timeout``).  Reading on before
        releasing is fine.  After :meth:`close` live views stay readable
        (the ring stays mapped until the last one goes) but their slots are
        held only until the writer frees the entry.  Under drop-oldest
        nothing is held: check :meth:`still_valid`.

        A one-record read in a ring of at least 64 slots leaves its cursor
        to the next call (a read, :meth:`prepare_sleep`, :meth:`release`,
        :meth:`close`): the four stores would come before the caller has its
        record, on the latency path.
        """
        return self._r.read_batch(limit, copy=copy, hold=hold)

    def read_into(self, buffer: memoryview | bytearray, /) -> tuple[int, int, int, int] | None:
        """Copy the next record of this reader's topics into ``buffer``, as ``recv_into`` does.

        Returns ``(seq, timestamp_ns, topic, nbytes)``, the payload being
        ``buffer[:nbytes]``, or None when there is nothing new (the cursor
        may have moved past records of other topics or lost ones).  Nothing
        is allocated for the payload, so a copying reader of big records
        reuses one buffer.  A record longer than ``buffer`` raises
        ValueError and stays unread (call again with a bigger buffer).
        (The core's ``Reader.read_into``, bound on the instance.)
        """
        return self._r.read_into(buffer)

    def release(self) -> None:
        """Let the writer reuse the slots of records read with ``hold=True``.

        Until then, under the block policy, the writer cannot overwrite them,
        so zero-copy views stay valid.  A slot a view (or a slice of one, or
        an array over one) still lives on stays held past this call, until
        that view goes: the cursor published here stops at the first such
        record.  :meth:`prepare_sleep` and a read without ``hold`` release
        too.  It also stores a cursor a one-record read left for later.
        """
        self._r.settle()

    def take(self, taken: int, released: int | None = None) -> None:
        """A durable reader's marks: handed out below ``taken``, done below ``released``.

        ``taken`` goes into the entry (a new process of this reader gets the
        records in [cursor, taken) again, counted as redelivered);
        ``released`` publishes the cursor up to there, keeping the records
        above held (see :meth:`release`).  (The core's ``Reader.take``.)
        """
        self._r.take(taken, released)

    def carry_over(self, delivered: int, lost: int) -> None:
        """Continue counting from another subscriber's totals (a reader resuming on a
        restarted writer's segment); stored in the entry too, for the writer's reports."""
        self._r.set_totals(delivered, lost)

    # -- waiting -------------------------------------------------------------------

    def spin(self, seconds: float, yield_seconds: float = 0.0, /) -> bool:
        """Busy-poll for records (or the writer going inactive) without announcing a sleep.

        Polls ``write_seq`` and ``active`` for ``seconds`` (``math.inf``:
        until they change) with a pause instruction between looks, then for
        ``yield_seconds`` with ``sched_yield()``; True once records are
        committed past the cursor or the writer went inactive, False when
        the time is up.  No syscall while spinning, and the writer writes
        no eventfd for a reader that spins.  The GIL is released meanwhile
        and taken back every millisecond, when signal handlers run (their
        exception is raised).  (The core's ``Reader.spin``, bound on the
        instance.)
        """
        return self._r.spin(seconds, yield_seconds)

    def prepare_sleep(self) -> float | None:
        """Announce that this reader is going to sleep.

        Returns how long to sleep: 0.0 = do not (records arrived or the
        writer went inactive in between), None = until the eventfd fires.
        (The core's ``Reader.prepare_sleep``, bound on the instance.)

        The eventfd is drained here, before announcing, not after waking:
        the wake-up path then costs no syscall, and a write answering this
        announcement can only come after the drain.  An announcement the
        writer has not answered yet (we withdrew it, or woke for something
        else) stands: the writer answers it at its next commit with one
        eventfd write, so we do not announce again.  Announcing takes no
        lock: ``sleep_count`` is an atomic increment.
        """
        return self._r.prepare_sleep()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait, by :attr:`wait_strategy`, until records are committed past the cursor.

        True: records are committed past the cursor (:meth:`read` finds them,
        unless they are all of other topics or were lost to an overrun), or
        the writer went inactive.  False: ``timeout`` seconds passed first.

        A wake-up alone promises nothing (an announcement that stood after
        its reader woke for something else is answered later, with nothing
        new): woken to a ring with nothing new, this announces a new sleep
        and sleeps again.

        ``spin`` polls (:meth:`spin`) until then; ``backoff`` spins and
        yields for its times first, then sleeps.  The sleep is the simple
        one-fd wait, in an epoll this subscriber makes at the first call and
        keeps until :meth:`close`; daemons use
        :class:`shmd.bus.loop.ReaderLoop`, which watches further fds in the
        same epoll.
        """
        strategy = self.wait_strategy
        if strategy.sleeps and self.eventfd is None:
            raise ValueError(
                f"Failed to wait since this subscriber has no eventfd (its {strategy.name} "
                "strategy sleeps on one)"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        if strategy.name != "sleep":
            spin, yield_ = strategy.spin_seconds, strategy.yield_seconds
            if timeout is not None:
                spin = min(spin, timeout)
                yield_ = min(yield_, timeout - spin)
            if self._r.spin(spin, yield_):
                return True
            if not strategy.sleeps or (deadline is not None and time.monotonic() >= deadline):
                return False
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
        self._r.close()  # stores a cursor left for later; releases the mappings it holds
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()  # before the eventfd it watches
        if self.eventfd is not None:
            self.eventfd.close()
        self.segment.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
