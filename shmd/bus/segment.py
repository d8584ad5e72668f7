"""The shared-memory segment: one shm fd, two mappings, the mutex and semaphore.

:class:`Segment` owns the fd and both mappings and knows where every field
lives; it has no policy.  :class:`~shmd.bus.publisher.Publisher` and
:class:`~shmd.bus.subscriber.Subscriber` build the bus on top of it.

Lifetimes follow the kernel's rules, and the three steps stay distinct:

* ``close()`` unmaps and closes *this process's* view;
* ``shm_unlink()`` removes the *name*: processes that have it mapped or
  hold the fd keep using the memory, new ``shm_open`` calls fail;
* the memory itself goes when the last mapping and the last fd are gone.

Only the creator unlinks (iceoryx2's rule): openers never do, whatever goes
wrong for them.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import time
from dataclasses import dataclass

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import (
    HEADER_FIELDS_END,
    HEADER_SIZE,
    OFF_ACTIVE,
    OFF_BYTES_PUBLISHED,
    OFF_GENERATION,
    OFF_HEARTBEAT_NS,
    OFF_MAGIC,
    OFF_MUTEX,
    OFF_RATE_MILLI,
    OFF_RESERVE_SEQ,
    OFF_SEM,
    OFF_SLEEP_COUNT,
    OFF_WRITE_SEQ,
    OFF_WRITER_PID,
    OFF_WRITER_WAITING,
    Geometry,
    Header,
    Policy,
    ReaderEntry,
    decode_entry,
    decode_header,
    encode_header,
    entry_offset,
    validate_header,
)
from shmd.errors import SegmentClosed, SegmentError, SegmentLayoutError

# memoryview.cast("Q") reads and writes native-endian words with one aligned
# load or store, which is what makes the counters safe to share.  The spec
# says little-endian; every platform shmd supports is.
if sys.byteorder != "little":  # pragma: no cover - guards a port
    raise ImportError("shmd's segment layout is little-endian")


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """Everything a user needs to know about a segment, read in one go."""

    name: str | None
    header: Header
    geometry: Geometry
    readers: list[ReaderEntry]


def _map(fd: int, length: int, offset: int, writable: bool, populate: bool = False) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    # MAP_POPULATE maps every page now.  Otherwise each process takes a
    # page fault on its first touch of every 4 KiB of the ring, which the
    # first lap pays in full: measured here, the first copy of a 1 MiB
    # record into or out of a fresh mapping took 0.7-1 ms, later ones
    # 0.08-0.1 ms.  The pages exist already (posix_fallocate at creation):
    # populating costs page-table entries, not memory.
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(fd, length, flags, prot, offset=offset)


class Segment:
    """One mapped shm segment.

    ``q`` and ``u`` are the control part viewed as u64 and u32 words (index =
    byte offset // 8 or // 4); ``ring`` is a memoryview of the ring,
    writable only in the writer.
    """

    def __init__(
        self,
        fd: OwnedFd,
        name: str | None,
        geometry: Geometry,
        *,
        control_writable: bool,
        ring_writable: bool,
        populate: bool = False,
    ) -> None:
        self.name = name
        self.geometry = geometry
        self._fd: OwnedFd | None = fd
        self.control_writable = control_writable
        self.ring_writable = ring_writable
        self._control: mmap.mmap | None = None
        self._ring_map: mmap.mmap | None = None
        self._mutex: libc.Pinned | None = None
        self._sem: libc.Pinned | None = None
        try:
            self._control = _map(fd.fileno(), geometry.control_size, 0, control_writable, populate)
            # The ring is a second mapping of the same fd at a page-aligned
            # offset, so that readers can map it PROT_READ: a reader's stray
            # write faults in that reader, and nobody else sees a thing.
            self._ring_map = _map(
                fd.fileno(), geometry.ring_size, geometry.ring_offset, ring_writable, populate
            )
        except OSError as exc:
            self.close()
            raise SegmentError(f"Failed to map the segment since {exc.strerror}") from None
        self.control = memoryview(self._control)
        self.q = self.control.cast("Q")
        self.u = self.control.cast("I")
        self.ring = memoryview(self._ring_map)

    # -- construction ---------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        geometry: Geometry,
        policy: Policy,
        *,
        mode: int = 0o600,
        generation: int | None = None,
        write_seq: int = 0,
    ) -> Segment:
        """Create, size, reserve and initialise a new segment named ``name``.

        Fails with :class:`~shmd.errors.SegmentExists` if the name is taken.
        On any failure after shm_open the half-made segment is unlinked, so
        nothing is left in /dev/shm.
        """
        fd = OwnedFd(libc.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode))
        try:
            # shm_open applies the umask; the configured mode is what we want.
            os.fchmod(fd.fileno(), mode)
            # posix_fallocate reserves the pages now, so a full /dev/shm is
            # an error here rather than a SIGBUS on some later first touch
            # (tmpfs allocates lazily; ftruncate alone reserves nothing).
            try:
                os.posix_fallocate(fd.fileno(), 0, geometry.segment_size)
            except OSError as exc:
                reason = (
                    "/dev/shm has no room for it" if exc.errno == errno.ENOSPC else exc.strerror
                )
                raise SegmentError(
                    f"Failed to reserve {geometry.segment_size} bytes for segment {name!r} "
                    f"since {reason}"
                ) from None
            seg = cls(fd, name, geometry, control_writable=True, ring_writable=True, populate=True)
        except BaseException:
            fd.close()
            libc.shm_unlink(name)
            raise
        try:
            seg._initialise(policy, generation, write_seq)
        except BaseException:
            seg.close()
            libc.shm_unlink(name)
            raise
        return seg

    def _initialise(self, policy: Policy, generation: int | None, write_seq: int) -> None:
        now = time.time_ns()
        head = encode_header(
            self.geometry,
            generation=generation if generation is not None else now,
            writer_pid=os.getpid(),
            policy=policy,
            created_ns=now,
            write_seq=write_seq,
        )
        # Everything but the magic first; the magic last, so that an opener
        # racing with us sees "not an shmd segment" rather than half a header.
        self.control[8:HEADER_FIELDS_END] = head[8:]
        libc.mutex_init_robust(self._pinned_mutex().address)
        libc.sem_init(self._pinned_sem().address)
        libc.fence()
        self.control[OFF_MAGIC:8] = head[:8]

    @classmethod
    def open(
        cls,
        *,
        name: str | None = None,
        fd: int | OwnedFd | None = None,
        control_writable: bool = True,
        ring_writable: bool = False,
        populate: bool = False,
    ) -> Segment:
        """Map an existing segment by name or by an fd received from the writer.

        ``populate`` maps every page up front (readers and writers, which
        will touch all of them; see ``_map``); a look at the header does not.

        The header is read and validated against the object's real size
        before the rest is mapped (a hostile header cannot make us map past
        the end).  An fd passed as ``int`` is duplicated; an ``OwnedFd`` is
        taken over.
        """
        if (name is None) == (fd is None):
            raise ValueError("Failed to open a segment since exactly one of name or fd is needed")
        if name is not None:
            flags = os.O_RDWR if control_writable or ring_writable else os.O_RDONLY
            owned = OwnedFd(libc.shm_open(name, flags))
        elif isinstance(fd, OwnedFd):
            owned = fd
        else:
            assert fd is not None
            owned = OwnedFd(os.dup(fd))
        try:
            geometry = cls._read_geometry(owned.fileno(), name)
            return cls(
                owned,
                name,
                geometry,
                control_writable=control_writable,
                ring_writable=ring_writable,
                populate=populate,
            )
        except BaseException:
            owned.close()
            raise

    @staticmethod
    def _read_geometry(fd: int, name: str | None) -> Geometry:
        st = os.fstat(fd)
        label = repr(name) if name else f"fd {fd}"
        if not stat.S_ISREG(st.st_mode):
            raise SegmentLayoutError(f"Failed to attach to {label} since it is not a shm object")
        if st.st_size < HEADER_SIZE:
            raise SegmentLayoutError(
                f"Failed to attach to {label} since it is {st.st_size} bytes, too small for "
                f"the {HEADER_SIZE}-byte header"
            )
        with _map(fd, HEADER_SIZE, 0, False) as head_map:
            header = decode_header(head_map[:HEADER_SIZE])
        return validate_header(header, st.st_size)

    # -- fields ---------------------------------------------------------------------

    def fileno(self) -> int:
        """The segment fd (for passing to readers)."""
        if self._fd is None:
            raise SegmentClosed("Failed to use the segment since it was closed")
        return self._fd.fileno()

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the shm object: equal for two fds of the same segment."""
        st = os.fstat(self.fileno())
        return st.st_dev, st.st_ino

    def header(self) -> Header:
        """A snapshot of the header (fields read one by one, not atomically as a set)."""
        return decode_header(self.control)

    def entry(self, index: int) -> ReaderEntry:
        """A snapshot of reader-table entry ``index``."""
        return decode_entry(self.control, index)

    def entries(self) -> list[ReaderEntry]:
        """Snapshots of every reader-table entry."""
        return [decode_entry(self.control, i) for i in range(self.geometry.max_readers)]

    def info(self) -> SegmentInfo:
        """Header, geometry and attached readers."""
        return SegmentInfo(
            self.name, self.header(), self.geometry, [e for e in self.entries() if e.state != 0]
        )

    @property
    def generation(self) -> int:
        """The segment's generation."""
        return int(self.q[OFF_GENERATION // 8])

    @property
    def writer_pid(self) -> int:
        """The pid of the writer that created (or adopted) the segment."""
        return int(self.u[OFF_WRITER_PID // 4])

    @property
    def active(self) -> bool:
        """The shared *active* flag."""
        return bool(self.u[OFF_ACTIVE // 4])

    @property
    def write_seq(self) -> int:
        """Records with seq below this are committed."""
        return int(self.q[OFF_WRITE_SEQ // 8])

    @property
    def reserve_seq(self) -> int:
        """The writer may be writing seqs in [write_seq, reserve_seq)."""
        return int(self.q[OFF_RESERVE_SEQ // 8])

    @property
    def rate(self) -> float:
        """The writer's last measured publish rate (records/s)."""
        return int(self.q[OFF_RATE_MILLI // 8]) / 1000

    @property
    def heartbeat_ns(self) -> int:
        """CLOCK_MONOTONIC ns of the writer's last status tick (0: none yet)."""
        return int(self.q[OFF_HEARTBEAT_NS // 8])

    # Word indices the hot paths use directly (no property call per access).
    WRITE_SEQ = OFF_WRITE_SEQ // 8
    RESERVE_SEQ = OFF_RESERVE_SEQ // 8
    BYTES_PUBLISHED = OFF_BYTES_PUBLISHED // 8
    HEARTBEAT_NS = OFF_HEARTBEAT_NS // 8
    RATE_MILLI = OFF_RATE_MILLI // 8
    ACTIVE = OFF_ACTIVE // 4
    WRITER_PID = OFF_WRITER_PID // 4
    WRITER_WAITING = OFF_WRITER_WAITING // 4
    SLEEP_COUNT = OFF_SLEEP_COUNT // 4

    @staticmethod
    def entry_words(index: int) -> tuple[int, int]:
        """(u64 word index, u32 word index) of the start of entry ``index``."""
        off = entry_offset(index)
        return off // 8, off // 4

    # -- mutex and semaphore ------------------------------------------------------

    def _pinned_mutex(self) -> libc.Pinned:
        if self._mutex is None:
            if self._control is None:
                raise SegmentClosed("Failed to use the mutex since the segment was closed")
            self._mutex = libc.Pinned(self._control, OFF_MUTEX, libc.MUTEX_AREA, "shared mutex")
        return self._mutex

    def _pinned_sem(self) -> libc.Pinned:
        if self._sem is None:
            if self._control is None:
                raise SegmentClosed("Failed to use the semaphore since the segment was closed")
            self._sem = libc.Pinned(self._control, OFF_SEM, libc.SEM_AREA, "shared semaphore")
        return self._sem

    def lock(self, timeout: float | None) -> libc.LockResult:
        """Lock the shared mutex (see :func:`shmd._sys.libc.mutex_lock`)."""
        return libc.mutex_lock(self._pinned_mutex().address, timeout)

    def unlock(self) -> None:
        """Unlock the shared mutex."""
        libc.mutex_unlock(self._pinned_mutex().address)

    def mutex_owner(self) -> int:
        """The tid holding the mutex, 0 if none (diagnostics only)."""
        return libc.mutex_owner_tid(self.control, OFF_MUTEX)

    def sem_post(self) -> None:
        """Wake the writer waiting for space (block policy)."""
        libc.sem_post(self._pinned_sem().address)

    def sem_wait(self, timeout: float) -> bool:
        """Wait for a reader's post; False on timeout."""
        return libc.sem_wait(self._pinned_sem().address, timeout)

    def sem_drain(self) -> None:
        """Forget stale posts."""
        libc.sem_drain(self._pinned_sem().address)

    # -- teardown -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd is None

    def close(self) -> None:
        """Unmap both parts and close the fd (never unlinks); idempotent.

        The ctypes pins and memoryviews export the mmaps' buffers; they are
        released first, or ``mmap.close()`` raises BufferError.
        """
        for pin in (self._mutex, self._sem):
            if pin is not None:
                pin.release()
        self._mutex = self._sem = None
        for attr in ("q", "u", "control", "ring"):
            view = self.__dict__.pop(attr, None)
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    pass  # a caller still holds a zero-copy slice of it: see below
        for m in (self._control, self._ring_map):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    # Zero-copy record views the caller still holds keep
                    # the mapping alive; munmap happens when the last one
                    # is garbage-collected.  Unmapping under them would
                    # turn their next access into a SIGSEGV.
                    pass
        self._control = self._ring_map = None
        fd, self._fd = self._fd, None
        if fd is not None:
            fd.close()

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def unlink_name(name: str) -> None:
        """Remove a segment's name (see the module docstring for what that means)."""
        libc.shm_unlink(name)
