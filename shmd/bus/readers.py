"""The writer's side of the reader table: its entries, their eventfds, the shared mutex.

The table lives in the segment's control part (docs/PROTOCOL.md, "Reader
table"); readers and the writer share it.  The writer changes an entry only
under the robust, process-shared mutex, except when the mutex is stalled
(see :meth:`ReaderTable.lock`): publishing and waking never take it.

:class:`ReaderTable` keeps one :class:`ReaderHandle` per reader the writer
knows (``handles``) and owns each handle's eventfd.  It tells its owner,
through two callbacks, what the publisher's hot paths cache about it: that
the set of handles changed (``changed``, called before any eventfd of a
removed handle closes), and that a reader's cursor was set to a seq the
ring may still hold for it (``rewound``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd._sys.proc import pid_alive
from shmd.bus.layout import (
    ALL_TOPICS,
    R_NAME,
    RQ_ATTACHED_NS,
    RQ_CURSOR,
    RQ_DELIVERED,
    RQ_LAST_ACTIVE_NS,
    RQ_LOST,
    RQ_REDELIVERED,
    RQ_TAKEN,
    RQ_TOKEN,
    RQ_TOPICS,
    RU_DURABLE_MS,
    RU_PID,
    RU_SLEEP_SEQ,
    RU_STATE,
    RU_WAIT,
    RU_WAKE_SEQ,
    ReaderEntry,
    ReaderState,
    decode_record_header,
    encode_name,
    entry_offset,
)
from shmd.bus.segment import Segment
from shmd.errors import ReaderTableFull

log = structlog.get_logger("shmd.bus.readers")

_ONE = (1).to_bytes(8, "little")
_FREE = ReaderState.FREE


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


class ReaderTable:
    """The reader-table entries this writer manages, and the eventfds it wakes them with."""

    def __init__(
        self,
        segment: Segment,
        *,
        mutex_timeout: float,
        changed: Callable[[], None],
        rewound: Callable[[int], None],
    ) -> None:
        self.segment = segment
        self.geometry = segment.geometry
        self.mutex_timeout = mutex_timeout
        #: The readers this writer knows, by entry index.
        self.handles: dict[int, ReaderHandle] = {}
        self._changed = changed
        self._rewound = rewound
        #: CLOCK_MONOTONIC seconds when the mutex last timed out, while that
        #: stall lasts (see lock); None when the mutex behaves.
        self._stalled_since: float | None = None
        #: (index, token) of readers whose eventfd we found in blocking mode
        #: (logged once each).
        self._tampered: set[tuple[int, int]] = set()

    @property
    def name(self) -> str | None:
        """The segment's name."""
        return self.segment.name

    # -- the shared mutex ----------------------------------------------------------

    def lock(self, timeout: float | None) -> bool:
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
                reader = next((h.name for h in self.handles.values() if h.pid == pid), None)
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

    def check_stall(self) -> None:
        """While stalled, try the mutex once (no wait) and end the stall if it is free.

        The writer calls this on its status tick: a holder that let go or
        died ends the stall (``mutex_recovered``) within one tick, not only
        at the next reader-table change, which may never come (or may try
        in the microseconds a reader legitimately holds the mutex).
        """
        if self._stalled_since is not None and self.lock(0):
            self.segment.unlock()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the mutex (waiting at most ``mutex_timeout``), or go on without it (stalled)."""
        got = self.lock(self.mutex_timeout)
        try:
            yield
        finally:
            if got:
                self.segment.unlock()

    def _repair(self) -> None:
        """Make the table consistent after a lock holder died (we hold the lock).

        Free the entries of dead processes this writer does not know (left
        by a previous writer's readers).  Nothing else can be half-done: the
        only word readers change under the mutex is ``sleep_count``, whose
        value means nothing (only its changes do), and the writer's own
        table changes are its own to finish.
        """
        u = self.segment.u
        freed = []
        for i in range(self.geometry.max_readers):
            _, u0 = Segment.entry_words(i)
            if (
                u[u0 + RU_STATE] != _FREE
                and i not in self.handles
                and not pid_alive(u[u0 + RU_PID])
            ):
                u[u0 + RU_STATE] = _FREE
                freed.append(i)
        log.warning("mutex_owner_died", role="writer", segment=self.name, freed_entries=freed)

    # -- entries ---------------------------------------------------------------------

    def add(
        self,
        name: str,
        pid: int,
        write_seq: int,
        *,
        topics: int = ALL_TOPICS,
        start: str | int = "latest",
        eventfd: OwnedFd | None = None,
        wait: int = 0,
        durable_ms: int = 0,
    ) -> ReaderHandle:
        """Take a free table entry for a reader and make its eventfd.

        ``start`` is ``"latest"`` (only records published from now on),
        ``"oldest"`` (everything still in the ring) or an explicit cursor
        (resume after a writer restart; clamped into what the ring holds).
        ``eventfd`` is the reader's eventfd if the caller made it (the
        table takes it over); by default a new one.  ``wait`` is the
        reader's wait strategy's code (shmd.bus.wait.WaitCode), for status;
        ``durable_ms`` a durable reader's grace (0: not durable).
        """
        raw_name = encode_name(name)
        seg, cap = self.segment, self.geometry.capacity
        if start == "latest":
            cursor = write_seq
        elif start == "oldest":
            cursor = max(0, write_seq - cap)
        elif isinstance(start, int):
            cursor = min(max(start, 0, write_seq - cap), write_seq)
        else:
            raise ValueError(
                f"Failed to add reader {name!r} since start {start!r} is not "
                "latest, oldest or a cursor"
            )
        efd = eventfd or OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        with self.locked():
            index = next(
                (
                    i
                    for i in range(self.geometry.max_readers)
                    if seg.u[Segment.entry_words(i)[1] + RU_STATE] == _FREE
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
            q, u = seg.q, seg.u
            off = entry_offset(index)
            token = q[q0 + RQ_TOKEN] + 1
            now = time.monotonic_ns()
            q[q0 + RQ_CURSOR] = cursor
            q[q0 + RQ_DELIVERED] = 0
            q[q0 + RQ_LOST] = 0
            q[q0 + RQ_LAST_ACTIVE_NS] = now
            q[q0 + RQ_ATTACHED_NS] = now
            q[q0 + RQ_TOPICS] = topics
            q[q0 + RQ_TOKEN] = token
            q[q0 + RQ_TAKEN] = cursor
            q[q0 + RQ_REDELIVERED] = 0
            u[u0 + RU_DURABLE_MS] = durable_ms
            u[u0 + RU_SLEEP_SEQ] = 0
            u[u0 + RU_WAKE_SEQ] = 0
            u[u0 + RU_PID] = pid
            u[u0 + RU_WAIT] = wait
            seg.control[off + R_NAME : off + R_NAME + 32] = raw_name
            u[u0 + RU_STATE] = ReaderState.ATTACHED
        handle = ReaderHandle(index, name, pid, topics, token, efd, q0, u0)
        self.handles[index] = handle
        self._changed()
        self._rewound(cursor)
        return handle

    def remove(self, index: int) -> ReaderEntry | None:
        """Free a reader's table entry and close the writer's copy of its eventfd.

        Returns the entry as it was (for the detach log line), None if unknown.
        """
        handle = self.handles.pop(index, None)
        if handle is None:
            return None
        self._changed()
        seg = self.segment
        entry = seg.entry(index)
        with self.locked():
            seg.u[handle.u0 + RU_STATE] = _FREE
        handle.eventfd.close()
        return entry

    def restore(self, index: int, eventfd: OwnedFd) -> ReaderHandle | None:
        """Re-own an attached (or dormant) entry of an adopted segment with its stored eventfd.

        Returns None (and closes the eventfd) when the entry is neither.
        """
        entry = self.segment.entry(index) if 0 <= index < self.geometry.max_readers else None
        if entry is None or entry.state not in (ReaderState.ATTACHED, ReaderState.DORMANT):
            eventfd.close()
            return None
        q0, u0 = Segment.entry_words(index)
        handle = ReaderHandle(
            index, entry.name, entry.pid, entry.topics, entry.token, eventfd, q0, u0
        )
        self.handles[index] = handle
        self._changed()
        self._rewound(entry.cursor)
        return handle

    def set_wait(self, index: int, wait: int) -> None:
        """Record how the reader of entry ``index`` waits (a WaitCode; informational)."""
        _, u0 = Segment.entry_words(index)
        self.segment.u[u0 + RU_WAIT] = wait

    def resume(self, index: int, pid: int, cursor: int, write_seq: int) -> int:
        """A restored reader reconnected: record its pid and cursor; returns the cursor used.

        The cursor is clamped into what the ring still holds (anything older
        is counted lost by the reader's next read).
        """
        seg = self.segment
        q0, u0 = Segment.entry_words(index)
        cursor = min(max(cursor, 0), write_seq)
        seg.u[u0 + RU_PID] = pid
        seg.q[q0 + RQ_CURSOR] = cursor
        seg.q[q0 + RQ_LAST_ACTIVE_NS] = time.monotonic_ns()
        self.handles[index].pid = pid
        self._rewound(cursor)
        return cursor

    def suspend(self, index: int) -> None:
        """A durable reader's process went: keep its entry and cursor, marked dormant.

        The handle stays, so the block policy waits for its cursor like any
        slow reader's (and evicts it after ``block_timeout``).
        """
        _, u0 = Segment.entry_words(index)
        with self.locked():
            self.segment.u[u0 + RU_STATE] = ReaderState.DORMANT

    def reawaken(
        self, index: int, pid: int, topics: int, wait: int, durable_ms: int
    ) -> tuple[int, int, int]:
        """A new process of a dormant durable reader: hand it the entry at its cursor.

        Returns ``(cursor, taken, redelivered)``: where it resumes, the mark
        below which its previous process had been handed records, and how
        many records of its topics in between the ring still holds (they
        are delivered again; counted in the entry's ``redelivered``).  The
        topics and the grace are the new process's.  The handle set stays
        the same, and with the same topics nothing the publisher caches
        changes: then the caller need not hold off publishing (a publish
        blocked on this reader's cursor waits for exactly this).
        """
        seg, handle = self.segment, self.handles[index]
        q0, u0 = handle.q0, handle.u0
        q, u = seg.q, seg.u
        cursor, taken = q[q0 + RQ_CURSOR], q[q0 + RQ_TAKEN]
        again = self.count_records(cursor, taken, topics)
        with self.locked():
            q[q0 + RQ_TOPICS] = topics
            q[q0 + RQ_LAST_ACTIVE_NS] = time.monotonic_ns()
            q[q0 + RQ_REDELIVERED] += again
            u[u0 + RU_PID] = pid
            u[u0 + RU_WAIT] = wait
            u[u0 + RU_DURABLE_MS] = durable_ms
            u[u0 + RU_STATE] = ReaderState.ATTACHED
        changed = handle.topics != topics
        handle.pid, handle.topics = pid, topics
        if changed:
            self._changed()
        return cursor, taken, again

    def count_records(self, start: int, end: int, topics: int) -> int:
        """Records of ``topics`` with seqs in [start, end) that the ring still holds intact."""
        seg, g = self.segment, self.geometry
        write_seq = seg.q[Segment.WRITE_SEQ]
        first = max(start, write_seq - g.capacity, 0)
        count = 0
        ring = seg.ring
        for seq in range(first, min(end, write_seq)):
            # Our own ring (the one writer): nothing writes it under us.
            got, _, _, topic = decode_record_header(ring, (seq % g.capacity) * g.slot_size)
            if got == seq and topics >> topic & 1:
                count += 1
        return count

    def free_unclaimed(self) -> None:
        """Free attached entries that no restored handle owns (their readers are gone)."""
        u = self.segment.u
        with self.locked():
            for i in range(self.geometry.max_readers):
                _, u0 = Segment.entry_words(i)
                if i not in self.handles and u[u0 + RU_STATE] != _FREE:
                    u[u0 + RU_STATE] = _FREE

    def free_evicted(self, index: int) -> None:
        """Return an evicted reader's entry to the free list (after its connection closed)."""
        u = self.segment.u
        _, u0 = Segment.entry_words(index)
        if u[u0 + RU_STATE] == ReaderState.EVICTED:
            u[u0 + RU_STATE] = _FREE

    def free_all_evicted(self) -> None:
        """Free every evicted entry (a new writer adopting the segment: their readers left)."""
        u = self.segment.u
        for i in range(self.geometry.max_readers):
            _, u0 = Segment.entry_words(i)
            if u[u0 + RU_STATE] == ReaderState.EVICTED:
                u[u0 + RU_STATE] = _FREE

    def evict(self, h: ReaderHandle, write_seq: int, timeout: float) -> Eviction:
        """Mark a reader evicted (it held the bus up ``timeout``), wake it, drop its handle."""
        seg = self.segment
        cursor = seg.q[h.q0 + RQ_CURSOR]
        seg.u[h.u0 + RU_STATE] = ReaderState.EVICTED
        self.handles.pop(h.index, None)
        self._changed()
        log.warning(
            "reader_evicted",
            segment=self.name,
            reader=h.name,
            pid=h.pid,
            seq=cursor,
            write_seq=write_seq,
            timeout=timeout,
        )
        self.answer([h])
        h.eventfd.close()
        return Eviction(h.index, h.name, h.pid, cursor, write_seq)

    def entries(self) -> list[ReaderEntry]:
        """Snapshots of the attached readers' entries."""
        return [self.segment.entry(i) for i in self.handles]

    def close(self) -> None:
        """Close every reader's eventfd and forget the handles (the entries stay)."""
        for handle in self.handles.values():
            handle.eventfd.close()
        self.handles.clear()
        self._changed()

    # -- waking ------------------------------------------------------------------------

    def answer(self, handles: Iterable[ReaderHandle]) -> None:
        """Wake these readers whatever they announced (shutdown, adoption, eviction)."""
        u = self.segment.u
        for h in handles:
            u[h.u0 + RU_WAKE_SEQ] = u[h.u0 + RU_SLEEP_SEQ]
            self.write_eventfd(h)

    def restore_nonblocking(self, h: ReaderHandle, fd: int) -> None:
        """Set O_NONBLOCK again on a reader's eventfd (the reader cleared it); log it once."""
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

    def write_eventfd(self, h: ReaderHandle) -> None:
        """One wake-up write to a reader's eventfd; never blocks."""
        fd = h.eventfd.fileno()
        # O_NONBLOCK is a flag of the open file description, which the
        # reader's copy of the eventfd shares: a reader can clear it, and a
        # blocking write on a full counter would then hang the writer.  Put
        # it back first.  (A reader clearing it again between these two
        # calls could still win; see docs/RELIABILITY.md.)  This costs one
        # F_GETFL per wake-up, and the writer writes an eventfd only to
        # answer a reader that announced a sleep.
        if os.get_blocking(fd):
            self.restore_nonblocking(h, fd)
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            # The counter is at its maximum: the reader has not read its
            # eventfd for 2**64-2 wake-ups.  It is readable already, so the
            # reader will wake; dropping this write loses nothing.
            pass
