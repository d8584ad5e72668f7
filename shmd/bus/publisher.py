"""The writer side of the bus: owns the segment, publishes, wakes readers.

Publishing a batch of n records is (docs/PROTOCOL.md, "Publishing")::

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
readers (an atomic increment).  It is Dekker's: the reader stores
``sleep_seq``/``sleep_count`` then loads ``write_seq``, the writer stores
``write_seq`` then loads ``sleep_count``, each with a full fence in between,
so at least one of them sees the other.

All of that is the compiled core's ``Writer`` (shmd/_sys/_writer.c, with
each step's memory order written beside it); this class keeps what is not
per record: the reader table, the block policy's wait, adoption, closing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

import structlog

from shmd._sys import _core, libc
from shmd._sys.fd import OwnedFd
from shmd.bus import block
from shmd.bus.adopt import create_segment, open_stored, take_over
from shmd.bus.layout import (
    ALL_TOPICS,
    Geometry,
    Policy,
    ReaderEntry,
)
from shmd.bus.readers import Eviction, ReaderHandle, ReaderTable
from shmd.bus.reservation import Reservation
from shmd.bus.ring import check_record
from shmd.bus.segment import Segment
from shmd.errors import SegmentClosed

# ReaderHandle and Eviction (what the reader table hands out) and
# Reservation live in their own modules; re-exported here, where their
# users meet them.
__all__ = ["Eviction", "Publisher", "ReaderHandle", "Reservation"]

log = structlog.get_logger("shmd.bus.publisher")

#: room_until when nothing limits it (any policy but block).
_UNBOUNDED = (1 << 64) - 1


class Publisher:
    """Creates and owns a segment and publishes records into it.

    Use :meth:`create`; the publisher unlinks what it created only when
    :meth:`unlink` is called (the daemon decides, from its configuration).
    The reader table is :attr:`table` (shmd.bus.readers), adoption and
    stale-segment replacement are in shmd.bus.adopt, the block policy's
    waiting in shmd.bus.block, publishing and waking in the core's Writer.
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
        self._slot = self.geometry.slot_size
        self._max_payload = self.geometry.max_payload
        self._block = policy is Policy.BLOCK
        #: The compiled hot path: publishing, committing, waking.
        self._w = _core.Writer(
            control=segment._control,
            ring=segment._ring_map,
            capacity=self.geometry.capacity,
            slot_size=self._slot,
            write_seq=segment.write_seq,
            reserve_seq=segment.reserve_seq,
            slow=self._publish_slow,
            reserve_slow=self._reserve_slow,
            on_blocking=self._eventfd_blocking,
        )
        # Block policy: seqs below room_until are known to be free for every
        # reader (cursors only move forward), so most publishes skip the
        # space check.  Whatever can move a cursor back (a reader added,
        # restored or resumed) lowers it.  Other policies: unbounded (lowered
        # the same way, the next publish() puts it back).
        if self._block:
            self._w.room_until = segment.write_seq
        #: The handles in the core's wake table, by row.
        self._wake_handles: list[ReaderHandle] = []
        # No Python frame per record: publish and reserve are the core's own methods.
        self.publish = self._w.publish  # type: ignore[method-assign]  # the bound C method
        self.reserve = self._w.reserve  # type: ignore[method-assign]  # the bound C method
        self.reserve_batch = self._w.reserve_batch  # type: ignore[method-assign]  # the same
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
        pub._w.forget_sleepers()
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
        return int(self._w.seq)

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
        self._w.close()  # before the eventfds it names, and the mappings it holds
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
        wait: int = 0,
        durable_ms: int = 0,
    ) -> ReaderHandle:
        """Take a free table entry for a reader and make its eventfd (:meth:`ReaderTable.add`)."""
        self._check_open()
        return self.table.add(
            name,
            pid,
            self._w.seq,
            topics=topics,
            start=start,
            eventfd=eventfd,
            wait=wait,
            durable_ms=durable_ms,
        )

    def remove_reader(self, index: int) -> ReaderEntry | None:
        """Free a reader's entry, close its eventfd; the entry as it was (None: unknown)."""
        return self.table.remove(index)

    def restore_reader(self, index: int, eventfd: OwnedFd) -> ReaderHandle | None:
        """Re-own an attached entry of an adopted segment (:meth:`ReaderTable.restore`)."""
        return self.table.restore(index, eventfd)

    def resume_reader(self, index: int, pid: int, cursor: int) -> int:
        """A restored reader reconnected (:meth:`ReaderTable.resume`); the cursor used."""
        return self.table.resume(index, pid, cursor, self._w.seq)

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
        self._w.room_until = min(self._w.room_until, cursor + self.geometry.capacity)

    # -- publishing ---------------------------------------------------------------------

    def publish(self, payload: bytes | bytearray | memoryview, topic: int = 0) -> int:
        """Publish one record; returns its seq.

        The compiled core's ``Writer.publish`` (shmd/_sys/_writer.c), bound
        on the instance in ``__init__`` so that a record costs no Python
        frame; this method is what it stands for, and what it calls
        (:meth:`_publish_slow`) when it cannot go on alone.
        """
        return self._w.publish(payload, topic)

    def _publish_slow(self, payload: bytes | bytearray | memoryview, topic: int) -> int:
        """publish() when its one check fails: raise what is wrong, or make room and retry."""
        self._check_open()
        check_record(len(payload), topic, self._max_payload)
        if self._block:
            self._wait_for_space(1)  # leaves write_seq < room_until, or raises
        else:
            self._w.room_until = _UNBOUNDED
        return self._w.publish(payload, topic)

    def publish_batch(
        self,
        payloads: Sequence[bytes | bytearray | memoryview],
        topic: int = 0,
    ) -> int:
        """Publish records in order with one commit; returns the last one's seq."""
        self._check_open()
        n = len(payloads)
        if n == 0:
            return self._w.seq - 1
        check_record(max(map(len, payloads)), topic, self._max_payload)
        cap = self.geometry.capacity
        # More than the ring holds: one commit per ring-full.
        for i in range(0, n, cap):
            chunk = payloads[i : i + cap] if n > cap else payloads
            if self._block:
                self._wait_for_space(len(chunk))
            self._w.write_batch(chunk, topic)
        return self._w.seq - 1

    def _wait_for_space(self, n: int) -> None:
        """Block policy: make sure ``n`` slots are free for every reader (see shmd.bus.block)."""
        if self._w.seq + n > self._w.room_until:
            self._w.room_until = block.wait_for_space(self, n)

    def reserve(self, size: int, topic: int = 0) -> Reservation:
        """A slot's payload buffer to fill in place; commit it with ``Reservation.commit``.

        The zero-copy path: nothing is copied after the caller's own writes.
        The core's ``Writer.reserve``, bound on the instance like
        :meth:`publish`; what it cannot do alone goes to :meth:`_reserve_slow`.
        """
        return self._w.reserve(size, topic)

    def reserve_batch(self, count: int, size: int, topic: int = 0) -> Reservation:
        """``count`` consecutive slots' payload buffers to fill in place, committed together.

        Zero-copy and batched: one reserve, one commit and at most one wake-up
        per reader for the whole batch (``count`` <= capacity).
        """
        return self._w.reserve_batch(count, size, topic)

    def _reserve_slow(self, count: int, size: int, topic: int) -> Reservation:
        """reserve() when its one check fails: raise what is wrong, or make room and retry."""
        self._check_open()
        cap = self.geometry.capacity
        if count > cap:
            raise ValueError(f"Failed to reserve {count} slots since the ring has {cap}")
        if count < 1:
            raise ValueError(f"Failed to reserve {count} slots since a reservation takes 1 or more")
        if size < 0:
            raise ValueError(f"Failed to reserve {size} bytes since a size cannot be negative")
        check_record(size, topic, self._max_payload)
        if self._block:
            self._wait_for_space(count)  # leaves write_seq + count <= room_until, or raises
        else:
            self._w.room_until = _UNBOUNDED
        return self._w.reserve_batch(count, size, topic)

    def _readers_changed(self) -> None:
        """Hand the core the new wake table; call it before closing any eventfd."""
        self._wake_handles = list(self.readers.values())
        self._w.set_readers([(h.index, h.topics, h.eventfd.fileno()) for h in self._wake_handles])

    def _eventfd_blocking(self, row: int) -> None:
        """The core found a reader's eventfd without O_NONBLOCK (see ReaderTable.write_eventfd)."""
        h = self._wake_handles[row]
        self.table.restore_nonblocking(h, h.eventfd.fileno())

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
