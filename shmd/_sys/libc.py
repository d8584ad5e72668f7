"""The one place shmd calls into libc: through the compiled core, or ctypes.

The robust mutex, the semaphore and the memory barriers are direct C calls
in :mod:`shmd._sys._core` (built with the package); the calls made once per
segment or process (shm_open, shm_unlink, mallopt, pinning an address) go
through ctypes.  Everything here is unsafe in the C sense: a wrong address
crashes the interpreter.  The rest of shmd never touches ctypes, the core or
raw addresses; it goes through the typed wrappers below, and takes addresses
only from :class:`Pinned`, which exports a writable buffer (so that a
read-only mapping is refused with a Python error instead of a SIGSEGV).

Each call has its own errno table (``_*_ERRORS``): the errnos the call is
documented to return, mapped to the exception class and the reason a user
reads.  An errno outside the table becomes :class:`SysCallError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno as E  # noqa: N812 - the errno tables read better with a short prefix
import os
from collections.abc import Callable, Mapping

try:
    from shmd._sys import _core
except ImportError as exc:  # pragma: no cover - a tree nobody built
    raise ImportError(
        "Failed to import shmd's compiled core (shmd._sys._core) since it was not built: "
        "install shmd with pip (pip install .) or run packaging/dev setup in a checkout "
        f"({exc})"
    ) from None
from shmd.errors import (
    MutexError,
    MutexNotWritable,
    MutexUnrecoverable,
    SegmentError,
    SegmentExists,
    SegmentNotFound,
    ShmdError,
    SysCallError,
)

# glibc >= 2.34 has shm_open in libc.so.6 itself (Debian 12 ships 2.36), so
# one library handle serves every ctypes call.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

#: Bytes reserved in the segment for a pthread_mutex_t.  glibc's is 40 bytes on
#: x86-64, 48 on aarch64 and at most 48 on every 64-bit Linux port; 64 leaves
#: room and keeps the next field cache-line aligned.  Checked at import below.
MUTEX_AREA = 64
#: Bytes reserved for a sem_t (32 on every 64-bit glibc port).
SEM_AREA = 32

if _core.MUTEX_SIZE > MUTEX_AREA or _core.SEM_SIZE > SEM_AREA:  # pragma: no cover - a port
    raise ImportError(
        f"Failed to import shmd since this libc's pthread_mutex_t ({_core.MUTEX_SIZE} bytes) "
        f"or sem_t ({_core.SEM_SIZE}) does not fit the segment's {MUTEX_AREA}/{SEM_AREA} bytes"
    )

EOWNERDEAD = E.EOWNERDEAD
ENOTRECOVERABLE = E.ENOTRECOVERABLE


_ErrTable = Mapping[int, tuple[type[ShmdError], str]]


def _raise(call: str, err: int, table: _ErrTable, what: str) -> None:
    cls, reason = table.get(err, (SysCallError, os.strerror(err)))
    target = f"{call} {what}" if what else call
    message = f"Failed to {target} since {reason}"
    if cls is SysCallError:
        raise SysCallError(err, message)
    raise cls(message)


# -- POSIX shared memory ------------------------------------------------------

_libc.shm_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
_libc.shm_open.restype = ctypes.c_int
_libc.shm_unlink.argtypes = [ctypes.c_char_p]
_libc.shm_unlink.restype = ctypes.c_int

_SHM_OPEN_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    E.EEXIST: (SegmentExists, "a segment of that name already exists"),
    E.ENOENT: (SegmentNotFound, "no segment of that name exists (is the writer running?)"),
    E.EACCES: (SegmentError, "permission was denied"),
    E.EINVAL: (SegmentError, "the name is invalid (it must be /name with no other slash)"),
    E.ENAMETOOLONG: (SegmentError, "the name is longer than 255 bytes"),
    E.EMFILE: (SegmentError, "this process has no free file descriptor"),
    E.ENFILE: (SegmentError, "the system has no free file descriptor"),
}

_SHM_UNLINK_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    E.ENOENT: (SegmentNotFound, "no segment of that name exists"),
    E.EACCES: (SegmentError, "permission was denied"),
    E.EINVAL: (SegmentError, "the name is invalid"),
    E.ENAMETOOLONG: (SegmentError, "the name is longer than 255 bytes"),
}


def shm_open(name: str, flags: int, mode: int = 0o600) -> int:
    """shm_open(3); the returned fd is close-on-exec (glibc always sets O_CLOEXEC)."""
    fd: int = _libc.shm_open(os.fsencode(name), flags | os.O_CLOEXEC, mode)
    if fd < 0:
        _raise("open shared-memory segment", ctypes.get_errno(), _SHM_OPEN_ERRORS, repr(name))
    return fd


def shm_unlink(name: str) -> None:
    """shm_unlink(3): removes the name; memory stays until the last mapping and fd are gone."""
    if _libc.shm_unlink(os.fsencode(name)) != 0:
        _raise("unlink shared-memory segment", ctypes.get_errno(), _SHM_UNLINK_ERRORS, repr(name))


# -- addresses inside a mapping ---------------------------------------------


class Pinned:
    """The address of ``size`` bytes at ``offset`` in a writable buffer.

    ``ctypes.c_char.from_buffer`` exports the buffer, which keeps an mmap from
    being closed (``BufferError: cannot close exported pointers exist``) until
    this object releases it: :meth:`release` must run before the mapping's
    owner closes it.  A read-only mapping cannot be exported writable, so
    pinning one raises :class:`MutexNotWritable` instead of handing out an
    address that would SIGSEGV on the first store.
    """

    __slots__ = ("_anchor", "address", "size")

    def __init__(self, buffer: object, offset: int, size: int, what: str) -> None:
        try:
            anchor = (ctypes.c_char * size).from_buffer(buffer, offset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise MutexNotWritable(
                f"Failed to use the {what} since it lives in memory mapped read-only "
                "(the control part must be mapped read-write, even in a reader)"
            ) from exc
        self._anchor: ctypes.Array[ctypes.c_char] | None = anchor
        self.address: int = ctypes.addressof(anchor)
        self.size = size

    def release(self) -> None:
        """Drop the buffer export; the address must not be used afterwards."""
        self.address = 0
        self._anchor = None


# -- process-shared robust mutex --------------------------------------------


class LockResult(enum.Enum):
    """What a lock attempt gave."""

    #: The caller holds the lock.
    ACQUIRED = "acquired"
    #: The caller holds the lock, but its previous owner died holding it: the
    #: protected state may be half-updated and the caller must repair it.
    #: (Already marked consistent: the caller need not call anything else.)
    OWNER_DIED = "owner_died"
    #: The timeout passed; the caller does not hold the lock.
    TIMEOUT = "timeout"


_MUTEX_LOCK_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    ENOTRECOVERABLE: (
        MutexUnrecoverable,
        "a previous owner died holding it and it was never made consistent",
    ),
    E.EINVAL: (MutexError, "it is not an initialised mutex (corrupt segment?)"),
    E.EDEADLK: (MutexError, "this thread already holds it"),
    E.EAGAIN: (MutexError, "the maximum number of recursive locks was exceeded"),
}
_MUTEX_UNLOCK_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    E.EPERM: (MutexError, "this thread does not hold it"),
    E.EINVAL: (MutexError, "it is not an initialised mutex"),
}
_MUTEX_INIT_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    E.EINVAL: (MutexError, "an attribute is invalid"),
    E.ENOMEM: (MutexError, "memory ran out"),
    E.ENOTSUP: (MutexError, "robust process-shared mutexes are not supported here"),
}


def mutex_init_robust(address: int) -> None:
    """Initialise a process-shared robust mutex at ``address`` (the owner does this once).

    Error-checking type: glibc's robust *normal* mutex deadlocks forever when
    its owner thread locks it again (even pthread_mutex_clocklock waits out
    its whole timeout); the error-checking one returns EDEADLK at once, which
    mutex_lock turns into MutexError.
    """
    rc = _core.mutex_init(address)
    if rc != 0:
        _raise("initialise the shared mutex", rc, _MUTEX_INIT_ERRORS, "")


def mutex_lock(address: int, timeout: float | None) -> LockResult:
    """Lock, waiting at most ``timeout`` seconds (None: forever; 0: try once).

    pthread functions return the error number instead of setting errno.
    EOWNERDEAD means *acquired*: the kernel handed us the lock because its
    owner died (robust futex list).  The core marks it consistent right away
    and we report OWNER_DIED; if it did not, unlocking would make it
    permanently unusable (ENOTRECOVERABLE for everyone after us).  The GIL
    is released only when the first try finds the mutex taken.
    """
    rc = _core.mutex_lock(address, timeout)
    if rc == 0:
        return LockResult.ACQUIRED
    if rc == EOWNERDEAD:
        return LockResult.OWNER_DIED
    if rc == E.ETIMEDOUT:
        return LockResult.TIMEOUT
    _raise("lock the shared mutex", rc, _MUTEX_LOCK_ERRORS, "")
    raise AssertionError("unreachable")  # pragma: no cover


def mutex_unlock(address: int) -> None:
    """Unlock a mutex this thread holds."""
    rc = _core.mutex_unlock(address)
    if rc != 0:
        _raise("unlock the shared mutex", rc, _MUTEX_UNLOCK_ERRORS, "")


def mutex_owner_tid(buffer: memoryview | bytes, offset: int) -> int:
    """The kernel tid glibc records as the mutex's owner (0 when unlocked).

    glibc's ``struct __pthread_mutex_s`` starts ``int __lock; unsigned
    __count; int __owner;`` on every 64-bit Linux port, so ``__owner`` is
    the int at byte 8.  For a robust mutex the futex word (``__lock``) also
    carries the owner's tid in its low 30 bits; ``__owner`` is simpler to
    read and is only used for diagnostics ("who holds the bus up").
    """
    return int.from_bytes(buffer[offset + 8 : offset + 12], "little", signed=True)


# -- process-shared POSIX semaphore --------------------------------------------

_SEM_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    E.EINVAL: (SegmentError, "it is not a valid semaphore (corrupt segment?)"),
    E.EOVERFLOW: (SegmentError, "its value would overflow"),
}


def sem_init(address: int) -> None:
    """Initialise a process-shared semaphore with value 0 at ``address``."""
    rc = _core.sem_init(address)
    if rc != 0:
        _raise("initialise the shared semaphore", rc, _SEM_ERRORS, "")


def sem_post(address: int) -> None:
    """Add one to the semaphore, waking a waiter."""
    rc = _core.sem_post(address)
    if rc not in (0, E.EOVERFLOW):  # EOVERFLOW: far more wake-ups pending than anyone needs
        _raise("post the shared semaphore", rc, _SEM_ERRORS, "")


def sem_wait(address: int, timeout: float) -> bool:
    """Wait until the semaphore is positive and take one; False on timeout.

    A signal during the wait runs its Python handler (shmd's only queue the
    signal) and the wait goes on to the same deadline.
    """
    rc = _core.sem_wait(address, timeout)
    if rc == 0:
        return True
    if rc == E.ETIMEDOUT:
        return False
    _raise("wait on the shared semaphore", rc, _SEM_ERRORS, "")
    raise AssertionError("unreachable")  # pragma: no cover


def sem_drain(address: int) -> None:
    """Take every pending post without waiting."""
    _core.sem_drain(address)


# -- memory ordering ------------------------------------------------------------

# The hot paths (publishing, reading, the sleep announcement) order their
# shared accesses themselves, as C11 atomics in the core (shmd/_sys/_writer.c,
# _reader.c).  What is left in Python is off those paths and needs only these:
# the block policy's writer_waiting handshake and deactivate() a StoreLoad
# barrier (store my flag, then load the other side's: not free even under
# x86's TSO), still_valid() and the slowest-cursor scan an acquire fence.
#: A full memory barrier, StoreLoad included: atomic_thread_fence(memory_order_seq_cst).
fence: Callable[[], None] = _core.fence
#: Loads before it complete before loads and stores after it (an acquire fence).
load_fence: Callable[[], None] = _core.load_fence


# -- malloc tuning for big records ----------------------------------------------------------

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
_tuned_for = [0]  # the largest record size tuned for so far


def keep_big_allocations(record: int, retain: int) -> None:
    """Serve record-sized allocations from the heap and keep ``retain`` bytes of it.

    A copying read of a big record allocates a record-sized bytes object.
    glibc serves such sizes with a fresh mmap (or trims the heap top back to
    the kernel once a batch is freed), so every copy page-faults its way
    through fresh zero pages: on this kind of VM a 1 MiB copy took 1.1 ms
    instead of 0.18 ms.  Raising both thresholds keeps the memory in the
    heap for reuse.  Process-wide, only ever raised, a no-op for small
    records.
    """
    if record < 64 * 1024 or record <= _tuned_for[0]:
        return
    _tuned_for[0] = record
    _libc.mallopt(_M_MMAP_THRESHOLD, min(_MMAP_THRESHOLD_MAX, 2 * record))
    # A batch may hold a whole ring of copies: keep twice that before trimming.
    _libc.mallopt(_M_TRIM_THRESHOLD, min(1 << 30, max(2 * retain, 64 * 1024 * 1024)))
