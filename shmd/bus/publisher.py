"""The writer side of the bus: owns the segment, publishes, wakes readers.

Publishing a batch of n records is::

    [block policy: wait until the slowest reader leaves n free slots]
    reserve_seq = write_seq + n          (readers: these slots are in flux;
                                          never lowered: an abandoned or dead
                                          writer's reserve stands)
    write n slots (header + payload)     (plain stores into the ring)
    write_seq = reserve_seq              (commit: readers may read them)
    fence; if sleep_count moved since we last looked (a reader announced a
    sleep): every entry with sleep_seq != wake_seq that subscribed to a topic
    in the batch gets wake_seq = sleep_seq and one eventfd write

so a reader that is awake costs the writer no syscall, and publishing never
takes the shared mutex.  Every word of the sleep handshake has one writer:
``sleep_seq`` the reader, ``wake_seq`` the writer, ``sleep_count`` the
readers (among themselves under the mutex).  It is Dekker's: the reader
stores ``sleep_seq``/``sleep_count`` then loads ``write_seq``, the writer
stores ``write_seq`` then loads ``sleep_count``, each with a full fence in
between, so at least one of them sees the other (see Subscriber.prepare_sleep).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from types import TracebackType

import structlog

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus import block
from shmd.bus.adopt import create_segment, open_stored, take_over
from shmd.bus.layout import (
    ALL_TOPICS,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RU_SLEEP_SEQ,
    RU_WAKE_SEQ,
    TOPIC_MAX,
    Geometry,
    Policy,
    ReaderEntry,
)
from shmd.bus.readers import Eviction, ReaderHandle, ReaderTable
from shmd.bus.reservation import Reservation
from shmd.bus.ring import check_record
from shmd.bus.segment import Segment
from shmd.bus.slots import DENSE_SLOT_MAX, write_dense, write_loop
from shmd.errors import SegmentClosed

# ReaderHandle and Eviction (what the reader table hands out) and
# Reservation live in their own modules; re-exported here, where their
# users meet them.
__all__ = ["EARLY_WAKE_MAX", "Eviction", "Publisher", "ReaderHandle", "Reservation"]

log = structlog.get_logger("shmd.bus.publisher")

_ONE = (1).to_bytes(8, "little")
_TSO = libc.TSO
_fence = libc.fence
_monotonic_ns = time.monotonic_ns
_get_blocking = os.get_blocking
_write = os.write
#: _room_until when nothing limits it (any policy but block).
_UNBOUNDED = 1 << 64
_RESERVE_SEQ = Segment.RESERVE_SEQ
_WRITE_SEQ = Segment.WRITE_SEQ
_BYTES_PUBLISHED = Segment.BYTES_PUBLISHED
_SLEEP_COUNT = Segment.SLEEP_COUNT

#: A row of Publisher._wake_table.
_WakeRow = tuple[int, int, int, int, ReaderHandle]


class Publisher:
    """Creates and owns a segment and publishes records into it.

    Use :meth:`create`; the publisher unlinks what it created only when
    :meth:`unlink` is called (the daemon decides, from its configuration).
    The reader table is :attr:`table` (shmd.bus.readers), adoption and
    stale-segment replacement are in shmd.bus.adopt, the block policy's
    waiting in shmd.bus.block; this class publishes and wakes.  It stays a
    little over 400 lines on purpose: publish(), the batch path, the commit
    and the wake-up share the cached views and the sleep bookkeeping as
    plain attributes, and each hop to another object would be paid again,
    cold, after every sleep.
    """

    def __init__(
        self,
        segment: Segment,
        policy: Policy,
        *,
        block_timeout: float,
        mutex_timeout: float,
    ) -> None:
        self.segment = segment
        self.geometry = segment.geometry
        self.policy = policy
        self.block_timeout = block_timeout
        self.table = ReaderTable(
            segment,
            mutex_timeout=mutex_timeout,
            changed=self._readers_changed,
            rewound=self._rewound,
        )
        #: The attached readers by entry index (the table's, not a copy).
        self.readers: dict[int, ReaderHandle] = self.table.handles
        #: Readers evicted since the owner last looked (it closes their connections).
        self.evictions: list[Eviction] = []
        self._seq = segment.write_seq
        #: The highest ``reserve_seq`` stored: it never goes down (see
        #: shmd.bus.adopt.take_over), so after an abandoned reservation or a
        #: take-over the next publishes may find their slots reserved already.
        self._reserved = segment.reserve_seq
        self._mask = self.geometry.capacity - 1
        self._slot = self.geometry.slot_size
        self._max_payload = self.geometry.max_payload
        #: publish()'s size limit: max_payload while open, -1 once closed, so
        #: one comparison sends a closed publisher's publish to the slow path.
        self._fast_max = self._max_payload
        self._pack = RECORD_HEADER.pack_into
        # The segment's views, for the hot paths (one lookup instead of two).
        self._q, self._u, self._ring = segment.q, segment.u, segment.ring
        self._block = policy is Policy.BLOCK
        #: Block policy: seqs below this are known to be free for every reader
        #: (cursors only move forward), so most publishes skip the space check.
        #: Whatever can move a cursor back (a reader added, restored or
        #: resumed) lowers it.  Other policies: _UNBOUNDED (lowered the same
        #: way, the next publish() puts it back).
        self._room_until = self._seq if self._block else _UNBOUNDED
        #: ``sleep_count`` when the writer last looked at the entries (-1: look
        #: at the next commit).
        self._sleep_seen = -1
        #: One row per reader for _wake_sleepers: (word index of sleep_seq,
        #: of wake_seq, topics, eventfd number, handle).  Rebuilt, with the
        #: two fields below reset, whenever the reader table changes, so it
        #: never names an eventfd we closed.
        self._wake_table: list[_WakeRow] = []
        #: Rows of readers seen asleep whose topics no commit since has
        #: carried: the only ones to look at while ``sleep_count`` stays the same.
        self._waiting: list[_WakeRow] = []
        self._closed = False
        self._unlinked = False

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        capacity: int = 1024,
        slot_size: int = 4096,
        max_readers: int = 64,
        policy: Policy | str = Policy.DROP_OLDEST,
        block_timeout: float = 1.0,
        mutex_timeout: float = 0.5,
        mode: int = 0o600,
        replace_stale: bool = True,
    ) -> Publisher:
        """Create segment ``name``.

        If the name exists and ``replace_stale`` is set, the old segment is
        replaced when its writer is dead or its header unreadable (left over
        by a kill -9); a segment whose writer still runs is never touched
        (:class:`~shmd.errors.SegmentExists`).
        """
        if isinstance(policy, str):
            policy = Policy.parse(policy)
        geometry = Geometry(capacity, slot_size, max_readers)
        seg = create_segment(name, geometry, policy, mode=mode, replace_stale=replace_stale)
        return cls(seg, policy, block_timeout=block_timeout, mutex_timeout=mutex_timeout)

    @classmethod
    def adopt(
        cls,
        name: str,
        fd: OwnedFd,
        *,
        block_timeout: float = 1.0,
        mutex_timeout: float = 0.5,
        mode: int = 0o600,
    ) -> Publisher:
        """Take over a segment a previous writer left (its fd, from systemd's fd store).

        In place if ``name`` still names it, else as a copy under ``name``
        (:func:`shmd.bus.adopt.open_stored`); records reserved but never
        committed are discarded, and the entries keep their cursors.  Raises
        a :class:`~shmd.errors.ShmdError` when the stored segment is
        unusable: the caller then starts a new generation.
        """
        seg, header, in_place = open_stored(name, fd, mode=mode)
        pub = cls(
            seg, Policy(header.policy), block_timeout=block_timeout, mutex_timeout=mutex_timeout
        )
        take_over(pub.table, header, in_place=in_place)
        pub._seq = pub._room_until = header.write_seq
        pub._reserved = seg.reserve_seq
        pub._sleep_seen = -1
        return pub

    @property
    def name(self) -> str:
        """The segment's name."""
        assert self.segment.name is not None
        return self.segment.name

    @property
    def generation(self) -> int:
        """The segment's generation."""
        return self.segment.generation

    @property
    def write_seq(self) -> int:
        """The seq the next record gets."""
        return self._seq

    def _check_open(self) -> None:
        if self._closed:
            raise SegmentClosed("Failed to publish since the publisher was closed")

    def deactivate(self) -> None:
        """Clear the active flag and wake every reader: they drain and return."""
        seg = self.segment
        seg.u[Segment.ACTIVE] = 0
        libc.fence()
        self.table.answer(list(self.readers.values()))

    def close(self) -> None:
        """Close every reader eventfd and unmap the segment (does not unlink); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fast_max = -1
        self.table.close()
        self.segment.close()

    def unlink(self) -> None:
        """Remove the segment's name; mappings (ours and readers') stay valid."""
        if not self._unlinked:
            self._unlinked = True
            Segment.unlink_name(self.name)
            log.info("segment_unlinked", segment=self.name)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        self.unlink()

    @property
    def mutex_timeout(self) -> float:
        """How long a reader-table change waits for the shared mutex."""
        return self.table.mutex_timeout

    # -- readers (the table's, with the publisher's checks) ------------------------

    def add_reader(
        self,
        name: str,
        pid: int,
        *,
        topics: int = ALL_TOPICS,
        start: str | int = "latest",
        eventfd: OwnedFd | None = None,
    ) -> ReaderHandle:
        """Take a free table entry for a reader and make its eventfd (:meth:`ReaderTable.add`)."""
        self._check_open()
        return self.table.add(name, pid, self._seq, topics=topics, start=start, eventfd=eventfd)

    def remove_reader(self, index: int) -> ReaderEntry | None:
        """Free a reader's entry, close its eventfd; the entry as it was (None: unknown)."""
        return self.table.remove(index)

    def restore_reader(self, index: int, eventfd: OwnedFd) -> ReaderHandle | None:
        """Re-own an attached entry of an adopted segment (:meth:`ReaderTable.restore`)."""
        return self.table.restore(index, eventfd)

    def resume_reader(self, index: int, pid: int, cursor: int) -> int:
        """A restored reader reconnected (:meth:`ReaderTable.resume`); the cursor used."""
        return self.table.resume(index, pid, cursor, self._seq)

    def free_unclaimed(self) -> None:
        """Free attached entries that no restored handle owns (their readers are gone)."""
        self.table.free_unclaimed()

    def free_evicted(self, index: int) -> None:
        """Return an evicted reader's entry to the free list (after its connection closed)."""
        self.table.free_evicted(index)

    def reader_entries(self) -> list[ReaderEntry]:
        """Snapshots of the attached readers' entries."""
        return self.table.entries()

    def wake_all(self) -> None:
        """Write every reader's eventfd (after an adoption: 'the writer is back')."""
        self.table.answer(list(self.readers.values()))

    def _rewound(self, cursor: int) -> None:
        """A reader's cursor was set to ``cursor``: the known room ends there."""
        self._room_until = min(self._room_until, cursor + self.geometry.capacity)

    # -- publishing ---------------------------------------------------------------------

    def publish(self, payload: bytes | bytearray | memoryview, topic: int = 0) -> int:
        """Publish one record; returns its seq.

        The latency path (one record, often to a sleeping reader): the same
        steps as a batch of one, written out flat, because every call and
        attribute lookup here is paid again, cold, after each sleep (1-3 us
        each on the VM this was measured on).  One comparison chain sends
        everything unusual (closed, too big, bad topic, block policy out of
        known room) to :meth:`_publish_slow`.
        """
        length = len(payload)
        seq = self._seq
        if length > self._fast_max or seq >= self._room_until or not 0 <= topic <= TOPIC_MAX:
            return self._publish_slow(payload, topic)
        # Before any store: a topic that is not an int fails here, not half-way.
        topics = 1 << topic
        u = self._u
        count = u[_SLEEP_COUNT]
        if length <= EARLY_WAKE_MAX and (count != self._sleep_seen or self._waiting):
            # Wake sleepers first: a wake-up takes longer to arrive (~20 us
            # on the VM this was measured on) than the rest of this publish
            # of a small record, so the reader still finds the record
            # committed, and it is woken that much sooner.  If it does not
            # (the writer was preempted), it finds nothing, announces a new
            # sleep, and the check after the commit below wakes it again:
            # waking early can cost a reader one more wake-up, never lose one.
            self._wake_sleepers(count, topics)
        q = self._q
        if seq >= self._reserved:
            q[_RESERVE_SEQ] = self._reserved = seq + 1
            if not _TSO:
                libc.store_fence()  # the reserve must be visible before the slot changes
        ring = self._ring
        off = (seq & self._mask) * self._slot
        self._pack(ring, off, seq, _monotonic_ns(), length, topic, 0, 0)
        off += RECORD_HEADER_SIZE
        ring[off : off + length] = payload
        # _commit, inline: the wake-up first, statistics after it.
        if not _TSO:
            libc.store_fence()  # the slot must be visible before the commit
        q[_WRITE_SEQ] = self._seq = seq + 1
        _fence()  # StoreLoad (see _commit)
        count = u[_SLEEP_COUNT]
        if count != self._sleep_seen or self._waiting:
            self._wake_sleepers(count, topics)
        q[_BYTES_PUBLISHED] += length
        return seq

    def _publish_slow(self, payload: bytes | bytearray | memoryview, topic: int) -> int:
        """publish() when its one check fails: raise what is wrong, or make room and retry."""
        self._check_open()
        check_record(len(payload), topic, self._max_payload)
        if self._block:
            self._wait_for_space(1)  # leaves _seq < _room_until, or raises
        else:
            self._room_until = _UNBOUNDED
        return self.publish(payload, topic)

    def publish_batch(
        self,
        payloads: Sequence[bytes | bytearray | memoryview],
        topic: int = 0,
    ) -> int:
        """Publish records in order with one commit; returns the last one's seq."""
        self._check_open()
        n = len(payloads)
        if n == 0:
            return self._seq - 1
        check_record(max(map(len, payloads)), topic, self._max_payload)
        cap = self.geometry.capacity
        if n <= cap:
            self._publish_chunk(payloads, topic)
        else:  # more than the ring holds: one commit per ring-full
            for i in range(0, n, cap):
                self._publish_chunk(payloads[i : i + cap], topic)
        return self._seq - 1

    def _publish_chunk(
        self, payloads: Sequence[bytes | bytearray | memoryview], topic: int
    ) -> None:
        n = len(payloads)
        if self._block:
            self._wait_for_space(n)
        seq = self._seq
        self._reserve_to(seq + n)
        ts = time.monotonic_ns()
        lengths = list(map(len, payloads))
        nbytes = sum(lengths)
        longest = max(lengths)
        pad = self._slot - RECORD_HEADER_SIZE - longest
        # Dense batches (records that nearly fill their slots) are built
        # whole in C: one struct.pack per slot via map(), one join, one copy
        # per run; about 5x faster than a Python loop for 64-byte records.
        # Sparse ones (small records in big slots) would copy mostly padding,
        # and non-bytes payloads do not pack as "s": those take the loop.
        ring, cap, slot = self._ring, self._mask + 1, self._slot
        if n > 1 and slot <= DENSE_SLOT_MAX and pad <= max(256, longest):
            try:
                write_dense(ring, cap, slot, seq, ts, topic, payloads, lengths, longest, pad)
            except struct.error:
                write_loop(ring, cap, slot, seq, ts, topic, payloads)
        else:
            write_loop(ring, cap, slot, seq, ts, topic, payloads)
        seq += n
        self._commit(seq, nbytes, 1 << topic)

    def _reserve_to(self, end: int) -> None:
        """Raise ``reserve_seq`` to ``end`` (never lower it), visible before any slot changes."""
        if end > self._reserved:
            self._q[_RESERVE_SEQ] = self._reserved = end
            libc.store_fence()  # the reserve before the slots' stores

    def _wait_for_space(self, n: int) -> None:
        """Block policy: make sure ``n`` slots are free for every reader (see shmd.bus.block)."""
        if self._seq + n > self._room_until:
            self._room_until = block.wait_for_space(self, n)

    def reserve(self, size: int, topic: int = 0) -> Reservation:
        """A slot's payload buffer to fill in place; commit it with ``Reservation.commit``.

        The zero-copy path: nothing is copied after the caller's own writes.
        """
        return self._reserve(1, size, topic)

    def reserve_batch(self, count: int, size: int, topic: int = 0) -> Reservation:
        """``count`` consecutive slots' payload buffers to fill in place, committed together.

        Zero-copy and batched: one reserve, one commit and at most one wake-up
        per reader for the whole batch (``count`` <= capacity).
        """
        return self._reserve(count, size, topic)

    def _reserve(self, count: int, size: int, topic: int) -> Reservation:
        self._check_open()
        check_record(size, topic, self._max_payload)
        if not 1 <= count <= self.geometry.capacity:
            raise ValueError(
                f"Failed to reserve {count} slots since the ring has {self.geometry.capacity}"
            )
        if self._block:
            self._wait_for_space(count)
        seq = self._seq
        self._reserve_to(seq + count)
        ring, mask, slot = self.segment.ring, self._mask, self._slot
        if count == 1:  # reserve(): one slice, no comprehension
            off = (seq & mask) * slot + RECORD_HEADER_SIZE
            return Reservation(self, seq, topic, [ring[off : off + size]])
        offsets = [((s & mask) * slot + RECORD_HEADER_SIZE) for s in range(seq, seq + count)]
        return Reservation(self, seq, topic, [ring[o : o + size] for o in offsets])

    def _commit_reserved(self, seq: int, count: int, topic: int, length: int) -> None:
        ring, mask, slot, pack = self.segment.ring, self._mask, self._slot, self._pack
        ts = time.monotonic_ns()
        end = seq + count
        for s in range(seq, end):
            pack(ring, (s & mask) * slot, s, ts, length, topic, 0, 0)
        self._commit(end, length * count, 1 << topic)

    def _commit(self, new_seq: int, nbytes: int, topics: int) -> None:
        seg = self.segment
        q = seg.q
        if not _TSO:
            libc.store_fence()  # the slots must be visible before the commit
        q[Segment.WRITE_SEQ] = self._seq = new_seq
        # StoreLoad: our write_seq store must be visible before we read
        # `sleep_count`, or a reader going to sleep right now and we could
        # miss each other (it sees the old write_seq, we see no new sleeper).
        libc.fence()
        count = seg.u[Segment.SLEEP_COUNT]
        # Unchanged, and nobody left waiting for a topic: every reader is
        # awake and will see the records itself.
        if count != self._sleep_seen or self._waiting:
            self._wake_sleepers(count, topics)
        q[Segment.BYTES_PUBLISHED] += nbytes

    def _readers_changed(self) -> None:
        """Rebuild the wake table from ``readers``; call it before closing any eventfd."""
        self._wake_table = [
            (h.u0 + RU_SLEEP_SEQ, h.u0 + RU_WAKE_SEQ, h.topics, h.eventfd.fileno(), h)
            for h in self.readers.values()
        ]
        # The next commit looks at every entry: whoever was waiting for a
        # topic is found again there.
        self._waiting = []
        self._sleep_seen = -1

    def _wake_sleepers(self, count: int, topics: int) -> None:
        """Answer every sleep announcement of a reader subscribed to ``topics``.

        A reader announces by bumping its own ``sleep_seq`` and then, under
        the mutex, ``sleep_count``; the writer answers by storing
        ``wake_seq = sleep_seq`` and writing the eventfd.  When
        ``sleep_count`` has not moved since the last look, only readers seen
        asleep for other topics can still want a wake-up.  Flat, like
        publish(): it is on the latency path.
        """
        u = self._u
        if count != self._sleep_seen:
            # Read before the entries: an announcement made after this load
            # moves sleep_count again and is seen at the next commit.
            self._sleep_seen = count
            rows = self._wake_table
        else:
            rows = self._waiting
        waiting: list[_WakeRow] = []
        for row in rows:
            sleep_at, wake_at, subscribed, fd, h = row
            asked = u[sleep_at]
            if asked == u[wake_at]:
                continue
            if not subscribed & topics:
                waiting.append(row)
                continue
            u[wake_at] = asked
            # See ReaderTable.write_eventfd (the same steps, without its call).
            if _get_blocking(fd):
                self.table.restore_nonblocking(h, fd)
            try:
                _write(fd, _ONE)
            except BlockingIOError:
                pass
        self._waiting = waiting

    def heartbeat(self, rate: float | None = None) -> None:
        """Record that the writer is alive, and its publish rate (shown by status tools).

        Also ends a mutex stall once the mutex is free again (see
        :meth:`ReaderTable.check_stall`): the writer calls this every
        ``writer.status_interval``.
        """
        q = self.segment.q
        q[Segment.HEARTBEAT_NS] = time.monotonic_ns()
        if rate is not None:
            q[Segment.RATE_MILLI] = max(0, round(rate * 1000))
        self.table.check_stall()


#: publish() wakes sleeping readers before it writes a record up to this long
#: (copying more could take longer than the wake-up takes to arrive).
EARLY_WAKE_MAX = 4096
