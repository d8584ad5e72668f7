"""The writer side of the bus: owns the segment, publishes, wakes readers.

Publishing a batch of n records is::

    [block policy: wait until the slowest reader leaves n free slots]
    reserve_seq = write_seq + n          (readers: these slots are in flux)
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from types import TracebackType

import structlog

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd._sys.proc import pid_alive
from shmd.bus.layout import (
    ALL_TOPICS,
    OFF_BYTES_PUBLISHED,
    OFF_READERS,
    R_ATTACHED_NS,
    R_CURSOR,
    R_DELIVERED,
    R_LAST_ACTIVE_NS,
    R_LOST,
    R_NAME,
    R_PID,
    R_SLEEP_SEQ,
    R_STATE,
    R_TOKEN,
    R_TOPICS,
    R_WAKE_SEQ,
    READER_ENTRY_SIZE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    TOPIC_MAX,
    Geometry,
    Header,
    Policy,
    ReaderEntry,
    ReaderState,
    encode_name,
    entry_offset,
    slot_packer,
)
from shmd.bus.ring import check_record, free_slots, runs
from shmd.bus.segment import Segment
from shmd.errors import (
    ReaderTableFull,
    SegmentClosed,
    SegmentExists,
    SegmentLayoutError,
    SegmentNotFound,
)

log = structlog.get_logger("shmd.bus.publisher")

_ONE = (1).to_bytes(8, "little")
_SLEEP = R_SLEEP_SEQ // 4
_WAKE = R_WAKE_SEQ // 4
_TSO = libc.TSO
_fence_begin, _fence_end = libc.FENCE_PAIR
_monotonic_ns = time.monotonic_ns
_get_blocking = os.get_blocking
_write = os.write
#: _room_until when nothing limits it (any policy but block).
_UNBOUNDED = 1 << 64
_RESERVE_SEQ = Segment.RESERVE_SEQ
_WRITE_SEQ = Segment.WRITE_SEQ
_BYTES_PUBLISHED = Segment.BYTES_PUBLISHED
_SLEEP_COUNT = Segment.SLEEP_COUNT


@dataclass(slots=True)
class ReaderHandle:
    """The writer's side of one attached reader."""

    index: int
    name: str
    pid: int
    topics: int
    token: int
    #: The reader's eventfd; the writer keeps it to wake the reader and
    #: passes a copy to the reader over the control socket.
    eventfd: OwnedFd
    #: Word indices of this reader's entry (precomputed for the hot path).
    q0: int = field(repr=False, default=0)
    u0: int = field(repr=False, default=0)


#: A row of Publisher._wake_table.
_WakeRow = tuple[int, int, int, int, ReaderHandle]


@dataclass(frozen=True, slots=True)
class Eviction:
    """A reader the writer evicted because it held the bus up (block policy)."""

    index: int
    name: str
    pid: int
    cursor: int
    write_seq: int


def _tgid(tid: int) -> int | None:
    """The process (thread group) a thread id belongs to, from /proc; None if unknown."""
    if tid <= 0:
        return None
    try:
        with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # gone already, or /proc hidden from us
    return None


class Publisher:
    """Creates and owns a segment and publishes records into it.

    Use :meth:`create`; the publisher unlinks what it created only when
    :meth:`unlink` is called (the daemon decides, from its configuration).
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
        self.mutex_timeout = mutex_timeout
        self.readers: dict[int, ReaderHandle] = {}
        #: Readers evicted since the owner last looked (it closes their connections).
        self.evictions: list[Eviction] = []
        self._seq = segment.write_seq
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
        #: CLOCK_MONOTONIC seconds when the mutex last timed out, while that
        #: stall lasts (see _lock); None when the mutex behaves.
        self._stalled_since: float | None = None
        #: (index, token) of readers whose eventfd we found in blocking mode
        #: (logged once each).
        self._tampered: set[tuple[int, int]] = set()

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
        try:
            seg = Segment.create(name, geometry, policy, mode=mode)
        except SegmentExists:
            if not replace_stale:
                raise
            cls._remove_stale(name)
            seg = Segment.create(name, geometry, policy, mode=mode)
        pub = cls(seg, policy, block_timeout=block_timeout, mutex_timeout=mutex_timeout)
        log.info(
            "segment_created",
            segment=name,
            generation=seg.generation,
            capacity=capacity,
            slot_size=slot_size,
            max_readers=max_readers,
            policy=policy.label,
            size=geometry.segment_size,
        )
        return pub

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

        The stored segment is validated like any opened one.  If ``name``
        still names that same object (the previous writer crashed), it is
        adopted in place; if the name is gone (a clean stop unlinked it
        before the restart), a new segment is created under the name with
        the same geometry, generation and sequence, and the ring and reader
        table are copied into it, so readers resume where they were.
        Either way records the previous writer reserved but never committed
        are discarded (``reserve_seq = write_seq``), and the entries keep
        their cursors.  Raises a :class:`~shmd.errors.ShmdError` when the
        stored segment is unusable: the caller then starts a new generation.
        """
        old: Segment | None = Segment.open(
            fd=fd, control_writable=True, ring_writable=True, populate=True
        )
        assert old is not None
        try:
            header = old.header()
            policy = Policy(header.policy)
            in_place = False
            try:
                named = Segment.open(name=name, control_writable=False)
            except SegmentNotFound:
                named = None
            if named is not None:
                try:
                    in_place = named.identity() == old.identity()
                    other_pid, other_active = named.writer_pid, named.active
                finally:
                    named.close()
                if not in_place:
                    if other_active and pid_alive(other_pid) and other_pid != os.getpid():
                        raise SegmentExists(
                            f"Failed to adopt segment {name!r} since writer pid {other_pid} "
                            "created another segment under that name and is running"
                        )
                    Segment.unlink_name(name)
            if in_place:
                seg, old = old, None
                seg.name = name
            else:
                seg = Segment.create(
                    name,
                    old.geometry,
                    policy,
                    mode=mode,
                    generation=header.generation,
                    write_seq=header.write_seq,
                )
                try:
                    _copy_state(old, seg)
                except BaseException:
                    seg.close()
                    Segment.unlink_name(name)
                    raise
                # Readers still map the old segment while they wait for a
                # successor; our pid in its header tells one whose wake-up
                # merged with the old writer's into one eventfd read that a
                # successor is up (in place, _take_over does the same).
                old.u[Segment.WRITER_PID] = os.getpid()
        finally:
            if old is not None:
                old.close()
        pub = cls(seg, policy, block_timeout=block_timeout, mutex_timeout=mutex_timeout)
        pub._take_over(header)
        log.info(
            "segment_adopted",
            segment=name,
            generation=seg.generation,
            seq=pub.write_seq,
            in_place=in_place,
            discarded=header.reserve_seq - header.write_seq,
            readers=sum(1 for e in seg.entries() if e.state == ReaderState.ATTACHED),
        )
        return pub

    def _take_over(self, header: Header) -> None:
        """Make an adopted segment ours: commit nothing half-written, active again."""
        seg = self.segment
        locked = self._lock(self.mutex_timeout)
        try:
            seg.q[Segment.RESERVE_SEQ] = header.write_seq
            seg.u[Segment.WRITER_PID] = os.getpid()
            seg.u[Segment.WRITER_WAITING] = 0
            for i in range(self.geometry.max_readers):
                _, u0 = Segment.entry_words(i)
                if seg.u[u0 + R_STATE // 4] == ReaderState.EVICTED:
                    seg.u[u0 + R_STATE // 4] = ReaderState.FREE
            seg.sem_drain()
            seg.u[Segment.ACTIVE] = 1
        finally:
            if locked:
                seg.unlock()
        self._seq = self._room_until = header.write_seq
        self._sleep_seen = -1

    def restore_reader(self, index: int, eventfd: OwnedFd) -> ReaderHandle | None:
        """Re-own an attached entry of an adopted segment with its stored eventfd.

        Returns None (and closes the eventfd) when the entry is not attached.
        """
        entry = self.segment.entry(index) if 0 <= index < self.geometry.max_readers else None
        if entry is None or entry.state != ReaderState.ATTACHED:
            eventfd.close()
            return None
        q0, u0 = Segment.entry_words(index)
        handle = ReaderHandle(
            index, entry.name, entry.pid, entry.topics, entry.token, eventfd, q0, u0
        )
        self.readers[index] = handle
        self._readers_changed()
        self._room_until = min(self._room_until, entry.cursor + self.geometry.capacity)
        return handle

    def resume_reader(self, index: int, pid: int, cursor: int) -> int:
        """A restored reader reconnected: record its pid and cursor; returns the cursor used.

        The cursor is clamped into what the ring still holds (anything older
        is counted lost by the reader's next read).
        """
        seg = self.segment
        q0, u0 = Segment.entry_words(index)
        cursor = min(max(cursor, 0), self._seq)
        seg.u[u0 + R_PID // 4] = pid
        seg.q[q0 + R_CURSOR // 8] = cursor
        seg.q[q0 + R_LAST_ACTIVE_NS // 8] = time.monotonic_ns()
        handle = self.readers[index]
        handle.pid = pid
        self._room_until = min(self._room_until, cursor + self.geometry.capacity)
        return cursor

    def free_unclaimed(self) -> None:
        """Free attached entries that no restored handle owns (their readers are gone)."""
        seg = self.segment
        locked = self._lock(self.mutex_timeout)
        try:
            for i in range(self.geometry.max_readers):
                _, u0 = Segment.entry_words(i)
                if i not in self.readers and seg.u[u0 + R_STATE // 4] != ReaderState.FREE:
                    seg.u[u0 + R_STATE // 4] = ReaderState.FREE
        finally:
            if locked:
                seg.unlock()

    def wake_all(self) -> None:
        """Write every reader's eventfd (after an adoption: 'the writer is back')."""
        self._answer(list(self.readers.values()))

    @staticmethod
    def _remove_stale(name: str) -> None:
        try:
            old = Segment.open(name=name, control_writable=False)
        except SegmentNotFound:
            return  # gone in between
        except SegmentLayoutError as exc:
            log.warning("segment_stale", segment=name, reason=str(exc))
            Segment.unlink_name(name)
            return
        try:
            pid, active = old.writer_pid, old.active
        finally:
            old.close()
        if active and pid_alive(pid) and pid != os.getpid():
            raise SegmentExists(
                f"Failed to create segment {name!r} since writer pid {pid} is running and owns it"
            )
        log.warning(
            "segment_stale", segment=name, writer_pid=pid, reason="its writer is gone; replacing it"
        )
        Segment.unlink_name(name)

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
        self._answer(list(self.readers.values()))

    def close(self) -> None:
        """Close every reader eventfd and unmap the segment (does not unlink); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fast_max = -1
        for handle in self.readers.values():
            handle.eventfd.close()
        self.readers.clear()
        self._readers_changed()
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

    # -- the shared mutex ----------------------------------------------------------

    def _lock(self, timeout: float | None) -> bool:
        """Lock; on a dead owner repair the table; False if ``timeout`` passed.

        After one timeout the mutex counts as stalled, and until a lock
        succeeds again every attempt only tries (no wait): a holder that
        never lets go (a stopped or hostile reader) costs the writer one
        ``mutex_timeout`` and one ``mutex_stalled`` line per stall, not one
        per reader-table change.  (Publishing never takes the mutex.)
        """
        stalled = self._stalled_since is not None
        result = self.segment.lock(0 if stalled else timeout)
        if result is libc.LockResult.TIMEOUT:
            if not stalled:
                self._stalled_since = time.monotonic()
                tid = self.segment.mutex_owner()
                pid = _tgid(tid)
                reader = next((h.name for h in self.readers.values() if h.pid == pid), None)
                log.warning(
                    "mutex_stalled",
                    segment=self.name,
                    holder_tid=tid,
                    holder_pid=pid,
                    reader=reader,
                    timeout=timeout,
                    action="changing the reader table without the mutex until it is free "
                    "again (publishing never takes it)",
                )
            return False
        if result is libc.LockResult.OWNER_DIED:
            self._repair()
        if stalled:
            assert self._stalled_since is not None
            log.info(
                "mutex_recovered",
                segment=self.name,
                stalled=round(time.monotonic() - self._stalled_since, 3),
            )
            self._stalled_since = None
        return True

    def _repair(self) -> None:
        """Make the table consistent after a lock holder died (we hold the lock).

        Free the entries of dead processes this writer does not know (left
        by a previous writer's readers).  Nothing else can be half-done: the
        only word readers change under the mutex is ``sleep_count``, whose
        value means nothing (only its changes do), and the writer's own
        table changes are its own to finish.
        """
        seg = self.segment
        freed = []
        for i in range(self.geometry.max_readers):
            _, u0 = Segment.entry_words(i)
            if (
                seg.u[u0 + R_STATE // 4] != ReaderState.FREE
                and i not in self.readers
                and not pid_alive(seg.u[u0 + R_PID // 4])
            ):
                seg.u[u0 + R_STATE // 4] = ReaderState.FREE
                freed.append(i)
        log.warning("mutex_owner_died", role="writer", segment=self.name, freed_entries=freed)

    # -- readers ---------------------------------------------------------------------------

    def add_reader(
        self,
        name: str,
        pid: int,
        *,
        topics: int = ALL_TOPICS,
        start: str | int = "latest",
        eventfd: OwnedFd | None = None,
    ) -> ReaderHandle:
        """Take a free table entry for a reader and make its eventfd.

        ``start`` is ``"latest"`` (only records published from now on),
        ``"oldest"`` (everything still in the ring) or an explicit cursor
        (resume after a writer restart; clamped into what the ring holds).
        ``eventfd`` is the reader's eventfd if the caller made it (the
        publisher takes it over); by default a new one.
        """
        self._check_open()
        raw_name = encode_name(name)
        seg = self.segment
        if start == "latest":
            cursor = self._seq
        elif start == "oldest":
            cursor = max(0, self._seq - self.geometry.capacity)
        elif isinstance(start, int):
            cursor = min(max(start, 0, self._seq - self.geometry.capacity), self._seq)
        else:
            raise ValueError(
                f"Failed to add reader {name!r} since start {start!r} is not "
                "latest, oldest or a cursor"
            )
        efd = eventfd or OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        locked = self._lock(self.mutex_timeout)
        try:
            index = next(
                (
                    i
                    for i in range(self.geometry.max_readers)
                    if seg.u[Segment.entry_words(i)[1] + R_STATE // 4] == ReaderState.FREE
                ),
                None,
            )
            if index is None:
                efd.close()
                raise ReaderTableFull(
                    f"Failed to attach reader {name!r} since all {self.geometry.max_readers} "
                    "reader-table entries are taken (raise segment.max_readers)"
                )
            q0, u0 = Segment.entry_words(index)
            off = entry_offset(index)
            token = seg.q[q0 + R_TOKEN // 8] + 1
            now = time.monotonic_ns()
            seg.q[q0 + R_CURSOR // 8] = cursor
            seg.q[q0 + R_DELIVERED // 8] = 0
            seg.q[q0 + R_LOST // 8] = 0
            seg.q[q0 + R_LAST_ACTIVE_NS // 8] = now
            seg.q[q0 + R_ATTACHED_NS // 8] = now
            seg.q[q0 + R_TOPICS // 8] = topics
            seg.q[q0 + R_TOKEN // 8] = token
            seg.u[u0 + _SLEEP] = 0
            seg.u[u0 + _WAKE] = 0
            seg.u[u0 + R_PID // 4] = pid
            seg.control[off + R_NAME : off + R_NAME + 32] = raw_name
            seg.u[u0 + R_STATE // 4] = ReaderState.ATTACHED
        finally:
            if locked:
                self.segment.unlock()
        handle = ReaderHandle(index, name, pid, topics, token, efd, q0, u0)
        self.readers[index] = handle
        self._readers_changed()
        self._room_until = min(self._room_until, cursor + self.geometry.capacity)
        return handle

    def remove_reader(self, index: int) -> ReaderEntry | None:
        """Free a reader's table entry and close the writer's copy of its eventfd.

        Returns the entry as it was (for the detach log line), None if unknown.
        """
        handle = self.readers.pop(index, None)
        if handle is None:
            return None
        self._readers_changed()
        seg = self.segment
        entry = seg.entry(index)
        locked = self._lock(self.mutex_timeout)
        try:
            seg.u[handle.u0 + R_STATE // 4] = ReaderState.FREE
        finally:
            if locked:
                seg.unlock()
        handle.eventfd.close()
        return entry

    def reader_entries(self) -> list[ReaderEntry]:
        """Snapshots of the attached readers' entries."""
        return [self.segment.entry(i) for i in self.readers]

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
        q[_RESERVE_SEQ] = seq + 1
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
        _fence_begin()  # StoreLoad (see _commit): libc.fence() without its call
        _fence_end()
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
        seg = self.segment
        if self._block:
            self._wait_for_space(n)
        seq = self._seq
        seg.q[Segment.RESERVE_SEQ] = seq + n
        libc.store_fence()  # the reserve must be visible before any slot changes
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
        if n > 1 and self._slot <= _DENSE_SLOT_MAX and pad <= max(256, longest):
            try:
                self._write_dense(seq, ts, topic, payloads, lengths, longest, pad)
            except struct.error:
                self._write_loop(seq, ts, topic, payloads)
        else:
            self._write_loop(seq, ts, topic, payloads)
        seq += n
        self._commit(seq, nbytes, 1 << topic)

    def _write_dense(  # noqa: PLR0917 - private, called from one place
        self,
        seq: int,
        ts: int,
        topic: int,
        payloads: Sequence[bytes | bytearray | memoryview],
        lengths: list[int],
        longest: int,
        pad: int,
    ) -> None:
        ring, mask, slot = self.segment.ring, self._mask, self._slot
        packer = slot_packer(longest, pad)
        # Blobs stay small: a large one is a fresh mmap in malloc, whose page
        # faults cost more than the copy.
        chunk = max(1, _DENSE_BLOB // slot)
        for first, count in _chunked(runs(seq, seq + len(payloads), self.geometry.capacity), chunk):
            i = first - seq
            blob = b"".join(
                map(
                    packer.pack,
                    range(first, first + count),
                    repeat(ts),
                    lengths[i : i + count],
                    repeat(topic),
                    repeat(0),
                    repeat(0),
                    payloads[i : i + count],
                )
            )
            off = (first & mask) * slot
            ring[off : off + len(blob)] = blob

    def _write_loop(
        self, seq: int, ts: int, topic: int, payloads: Sequence[bytes | bytearray | memoryview]
    ) -> None:
        ring, mask, slot, pack = self.segment.ring, self._mask, self._slot, self._pack
        for p in payloads:
            off = (seq & mask) * slot
            length = len(p)
            pack(ring, off, seq, ts, length, topic, 0, 0)
            start = off + RECORD_HEADER_SIZE
            ring[start : start + length] = p
            seq += 1

    def reserve(self, size: int, topic: int = 0) -> Reservation:
        """A slot's payload buffer to fill in place; commit it with ``Reservation.commit``.

        The zero-copy path: nothing is copied after the caller's own writes.
        """
        self._check_open()
        check_record(size, topic, self._max_payload)
        if self._block:
            self._wait_for_space(1)
        seq = self._seq
        self.segment.q[Segment.RESERVE_SEQ] = seq + 1
        libc.store_fence()
        off = (seq & self._mask) * self._slot + RECORD_HEADER_SIZE
        return Reservation(self, seq, topic, self.segment.ring[off : off + size])

    def reserve_batch(self, count: int, size: int, topic: int = 0) -> BatchReservation:
        """``count`` consecutive slots' payload buffers to fill in place, committed together.

        Zero-copy and batched: one reserve, one commit and at most one wake-up
        per reader for the whole batch (``count`` <= capacity).
        """
        self._check_open()
        check_record(size, topic, self._max_payload)
        if not 1 <= count <= self.geometry.capacity:
            raise ValueError(
                f"Failed to reserve {count} slots since the ring has {self.geometry.capacity}"
            )
        if self._block:
            self._wait_for_space(count)
        seq = self._seq
        self.segment.q[Segment.RESERVE_SEQ] = seq + count
        libc.store_fence()
        ring, mask, slot = self.segment.ring, self._mask, self._slot
        offsets = [((s & mask) * slot + RECORD_HEADER_SIZE) for s in range(seq, seq + count)]
        return BatchReservation(self, seq, topic, [ring[o : o + size] for o in offsets])

    def _commit_batch(self, res: BatchReservation, length: int) -> None:
        ring, mask, slot, pack = self.segment.ring, self._mask, self._slot, self._pack
        ts = time.monotonic_ns()
        end = res.seq + len(res.buffers)
        for seq in range(res.seq, end):
            pack(ring, (seq & mask) * slot, seq, ts, length, res.topic, 0, 0)
        self._commit(end, length * len(res.buffers), 1 << res.topic)

    def _commit_reservation(self, res: Reservation, length: int) -> None:
        off = (res.seq & self._mask) * self._slot
        self._pack(self.segment.ring, off, res.seq, time.monotonic_ns(), length, res.topic, 0, 0)
        self._commit(res.seq + 1, length, 1 << res.topic)

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
            (h.u0 + _SLEEP, h.u0 + _WAKE, h.topics, h.eventfd.fileno(), h)
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
            # See _write_eventfd (the same steps, without its call).
            if _get_blocking(fd):
                self._restore_nonblocking(h, fd)
            try:
                _write(fd, _ONE)
            except BlockingIOError:
                pass
        self._waiting = waiting

    def _answer(self, handles: Iterable[ReaderHandle]) -> None:
        """Wake these readers whatever they announced (shutdown, adoption, eviction)."""
        u = self.segment.u
        for h in handles:
            u[h.u0 + _WAKE] = u[h.u0 + _SLEEP]
            self._write_eventfd(h)

    def _restore_nonblocking(self, h: ReaderHandle, fd: int) -> None:
        os.set_blocking(fd, False)
        if (h.index, h.token) not in self._tampered:
            self._tampered.add((h.index, h.token))
            log.warning(
                "eventfd_tampered",
                segment=self.name,
                reader=h.name,
                pid=h.pid,
                index=h.index,
                error="the reader cleared O_NONBLOCK on its eventfd; restored",
            )

    def _write_eventfd(self, h: ReaderHandle) -> None:
        fd = h.eventfd.fileno()
        # O_NONBLOCK is a flag of the open file description, which the
        # reader's copy of the eventfd shares: a reader can clear it, and a
        # blocking write on a full counter would then hang the writer.  Put
        # it back first.  (A reader clearing it again between these two
        # calls could still win; see docs/RELIABILITY.md.)  This costs one
        # F_GETFL per wake-up, and the writer writes an eventfd only to
        # answer a reader that announced a sleep.
        if _get_blocking(fd):
            self._restore_nonblocking(h, fd)
        try:
            _write(fd, _ONE)
        except BlockingIOError:
            # The counter is at its maximum: the reader has not read its
            # eventfd for 2**64-2 wake-ups.  It is readable already, so the
            # reader will wake; dropping this write loses nothing.
            pass

    # -- block policy ----------------------------------------------------------------

    def _slowest(self) -> tuple[int, ReaderHandle | None]:
        q = self.segment.q
        slowest, who = self._seq, None
        for h in self.readers.values():
            c = q[h.q0 + R_CURSOR // 8]
            if c < slowest:
                slowest, who = c, h
        return slowest, who

    def _wait_for_space(self, n: int) -> None:
        """Block policy: wait until the slowest reader leaves ``n`` free slots.

        Sleeps on the segment's semaphore (the writer needs no epoll for
        this), at most WAIT_SLICE at a time; readers post it after advancing
        their cursor when they see ``writer_waiting``.  A reader that holds the bus up longer than
        ``block_timeout`` is evicted, never waited on forever.  What it
        finds free is remembered (``_room_until``), so the next publishes
        skip the check until they get there.
        """
        if self._seq + n <= self._room_until:
            return
        cap = self.geometry.capacity
        seg = self.segment
        deadline = time.monotonic() + self.block_timeout
        while True:
            slowest, who = self._slowest()
            if who is None or free_slots(self._seq, slowest, cap) >= n:
                self._room_until = slowest + cap
                return
            seg.u[Segment.WRITER_WAITING] = 1
            libc.fence()  # StoreLoad: our flag before the cursors we re-read
            slowest, who = self._slowest()
            if who is None or free_slots(self._seq, slowest, cap) >= n:
                seg.u[Segment.WRITER_WAITING] = 0
                self._room_until = slowest + cap
                return
            # A reader asleep behind us slept through records of topics it
            # did not subscribe to (a commit wakes subscribers only): it
            # would never move its cursor, and we would evict a healthy
            # reader.  Wake it; it skips those records and posts the
            # semaphore like any reader that advances.  (One that is not
            # asleep yet cannot fall asleep now: prepare_sleep sees
            # write_seq past its cursor and withdraws.)
            behind = [
                h
                for h in self.readers.values()
                if seg.u[h.u0 + _SLEEP] != seg.u[h.u0 + _WAKE]
                and free_slots(self._seq, seg.q[h.q0 + R_CURSOR // 8], cap) < n
            ]
            if behind:
                self._answer(behind)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seg.u[Segment.WRITER_WAITING] = 0
                self._evict_laggards(n)
                deadline = time.monotonic() + self.block_timeout
                continue
            # Readers post after moving their cursor without a fence of their
            # own (it would cost every read; see Subscriber._publish_cursor),
            # so a post can be missed once: re-checking every WAIT_SLICE
            # bounds what that costs.
            seg.sem_wait(min(remaining, WAIT_SLICE))
            seg.u[Segment.WRITER_WAITING] = 0

    def _evict_laggards(self, n: int) -> None:
        cap = self.geometry.capacity
        seg = self.segment
        laggards = [
            h
            for h in self.readers.values()
            if free_slots(self._seq, seg.q[h.q0 + R_CURSOR // 8], cap) < n
        ]
        for h in laggards:
            cursor = seg.q[h.q0 + R_CURSOR // 8]
            seg.u[h.u0 + R_STATE // 4] = ReaderState.EVICTED
            self.readers.pop(h.index, None)
            self._readers_changed()
            ev = Eviction(h.index, h.name, h.pid, cursor, self._seq)
            self.evictions.append(ev)
            log.warning(
                "reader_evicted",
                segment=self.name,
                reader=h.name,
                pid=h.pid,
                seq=cursor,
                write_seq=self._seq,
                timeout=self.block_timeout,
            )
            self._answer([h])
            h.eventfd.close()

    def free_evicted(self, index: int) -> None:
        """Return an evicted reader's entry to the free list (after its connection closed)."""
        seg = self.segment
        _, u0 = Segment.entry_words(index)
        if seg.u[u0 + R_STATE // 4] == ReaderState.EVICTED:
            seg.u[u0 + R_STATE // 4] = ReaderState.FREE

    def heartbeat(self, rate: float | None = None) -> None:
        """Record that the writer is alive, and its publish rate (shown by status tools)."""
        q = self.segment.q
        q[Segment.HEARTBEAT_NS] = time.monotonic_ns()
        if rate is not None:
            q[Segment.RATE_MILLI] = max(0, round(rate * 1000))


#: publish() wakes sleeping readers before it writes a record up to this long
#: (copying more could take longer than the wake-up takes to arrive).
EARLY_WAKE_MAX = 4096
#: Block policy: the longest the writer sleeps before it re-checks the cursors.
WAIT_SLICE = 0.01
#: Slots larger than this take the loop (the per-record overhead no longer matters).
_DENSE_SLOT_MAX = 2048
#: Bytes built per join in the dense path.
_DENSE_BLOB = 64 * 1024


def _chunked(pieces: Iterable[tuple[int, int]], most: int) -> Iterator[tuple[int, int]]:
    """Split (first, count) runs into runs of at most ``most``."""
    for first, count in pieces:
        for start in range(first, first + count, most):
            yield start, min(most, first + count - start)


def _copy_state(old: Segment, new: Segment) -> None:
    """Copy what readers resume from: the reader table, the counters, the ring."""
    g = old.geometry
    table_end = OFF_READERS + g.max_readers * READER_ENTRY_SIZE
    new.control[OFF_READERS:table_end] = old.control[OFF_READERS:table_end]
    new.q[OFF_BYTES_PUBLISHED // 8] = old.q[OFF_BYTES_PUBLISHED // 8]
    new.ring[:] = old.ring


class Reservation:
    """A slot reserved by :meth:`Publisher.reserve`; fill ``buffer``, then commit.

    Usable as a context manager: commits the whole buffer on a clean exit;
    on an exception nothing is committed (the slot is reused next time).
    """

    __slots__ = ("_done", "_pub", "buffer", "seq", "topic")

    def __init__(self, pub: Publisher, seq: int, topic: int, buffer: memoryview) -> None:
        self._pub = pub
        self.seq = seq
        self.topic = topic
        self.buffer = buffer
        self._done = False

    def commit(self, length: int | None = None) -> int:
        """Publish the record with the first ``length`` bytes (default: all); returns its seq."""
        if self._done:
            raise ValueError("Failed to commit the reservation since it was already committed")
        size = len(self.buffer)
        length = size if length is None else length
        if not 0 <= length <= size:
            raise ValueError(f"Failed to commit {length} bytes since {size} were reserved")
        self._done = True
        self.buffer.release()
        self._pub._commit_reservation(self, length)
        return self.seq

    def abandon(self) -> None:
        """Give the slot back without publishing."""
        if not self._done:
            self._done = True
            self.buffer.release()
            self._pub.segment.q[Segment.RESERVE_SEQ] = self._pub.write_seq

    def __enter__(self) -> memoryview:
        return self.buffer

    def __exit__(self, et: type[BaseException] | None, *_: object) -> None:
        if et is None:
            if not self._done:
                self.commit()
        else:
            self.abandon()


class BatchReservation:
    """Slots reserved by :meth:`Publisher.reserve_batch`: fill ``buffers``, then commit."""

    __slots__ = ("_done", "_pub", "buffers", "seq", "topic")

    def __init__(self, pub: Publisher, seq: int, topic: int, buffers: list[memoryview]) -> None:
        self._pub = pub
        self.seq = seq
        self.topic = topic
        self.buffers = buffers
        self._done = False

    def commit(self, length: int | None = None) -> int:
        """Publish every record with its first ``length`` bytes (default: all); last seq."""
        if self._done:
            raise ValueError("Failed to commit the reservation since it was already committed")
        size = len(self.buffers[0])
        length = size if length is None else length
        if not 0 <= length <= size:
            raise ValueError(f"Failed to commit {length} bytes since {size} were reserved")
        self._done = True
        for b in self.buffers:
            b.release()
        self._pub._commit_batch(self, length)
        return self.seq + len(self.buffers) - 1

    def abandon(self) -> None:
        """Give the slots back without publishing."""
        if not self._done:
            self._done = True
            for b in self.buffers:
                b.release()
            self._pub.segment.q[Segment.RESERVE_SEQ] = self._pub.write_seq
