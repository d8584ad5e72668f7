"""The one place shmd calls into libc through ctypes.

Everything here is unsafe in the C sense: a wrong address crashes the
interpreter.  The rest of shmd never touches ctypes or raw addresses; it goes
through the typed wrappers below, which take a writable buffer plus an offset
and derive the address themselves (so that a read-only mapping is refused
with a Python error instead of a SIGSEGV).

Each call has its own errno table (``_*_ERRORS``): the errnos the call is
documented to return, mapped to the exception class and the reason a user
reads.  An errno outside the table becomes :class:`SysCallError`.
"""

from __future__ import annotations

import _thread
import ctypes
import ctypes.util
import enum
import errno as E  # noqa: N812 - the errno tables read better with a short prefix
import os
import platform
import time
from collections.abc import Callable, Mapping

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

# glibc >= 2.34 has shm_open, the pthread and semaphore functions in libc.so.6
# itself (Debian 12 ships 2.36), so one library handle serves every call.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

#: Bytes reserved in the segment for a pthread_mutex_t.  glibc's is 40 bytes on
#: x86-64, 48 on aarch64 and at most 48 on every 64-bit Linux port; 64 leaves
#: room and keeps the next field cache-line aligned.  Checked at import below.
MUTEX_AREA = 64
#: Bytes reserved for a sem_t (32 on every 64-bit glibc port).
SEM_AREA = 32

_MUTEX_SIZES = {"x86_64": 40, "aarch64": 48, "riscv64": 40, "ppc64le": 40, "s390x": 40}
_SEM_SIZE = 32
_machine = platform.machine()
if _MUTEX_SIZES.get(_machine, 48) > MUTEX_AREA:  # pragma: no cover - guards a port
    raise ImportError(f"pthread_mutex_t on {_machine} does not fit the segment's mutex area")

CLOCK_MONOTONIC = 1
EOWNERDEAD = E.EOWNERDEAD
ENOTRECOVERABLE = E.ENOTRECOVERABLE


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _deadline(timeout: float) -> _Timespec:
    """An absolute CLOCK_MONOTONIC deadline ``timeout`` seconds from now."""
    ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + max(0, int(timeout * 1e9))
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


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

_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_PTHREAD_MUTEX_ERRORCHECK = 2

for _fn in (
    "pthread_mutex_lock",
    "pthread_mutex_trylock",
    "pthread_mutex_unlock",
    "pthread_mutex_consistent",
    "pthread_mutex_destroy",
):
    getattr(_libc, _fn).argtypes = [ctypes.c_void_p]
    getattr(_libc, _fn).restype = ctypes.c_int
_libc.pthread_mutex_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.pthread_mutex_clocklock.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]
_libc.pthread_mutexattr_init.argtypes = [ctypes.c_void_p]
_libc.pthread_mutexattr_destroy.argtypes = [ctypes.c_void_p]
_libc.pthread_mutexattr_setpshared.argtypes = [ctypes.c_void_p, ctypes.c_int]
_libc.pthread_mutexattr_setrobust.argtypes = [ctypes.c_void_p, ctypes.c_int]
_libc.pthread_mutexattr_settype.argtypes = [ctypes.c_void_p, ctypes.c_int]


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
    attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 bytes; generous
    for rc in (
        _libc.pthread_mutexattr_init(attr),
        _libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
        _libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
        _libc.pthread_mutexattr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK),
        _libc.pthread_mutex_init(ctypes.c_void_p(address), attr),
    ):
        if rc != 0:
            _libc.pthread_mutexattr_destroy(attr)
            _raise("initialise the shared mutex", rc, _MUTEX_INIT_ERRORS, "")
    _libc.pthread_mutexattr_destroy(attr)


def mutex_lock(address: int, timeout: float | None) -> LockResult:
    """Lock, waiting at most ``timeout`` seconds (None: forever; 0: try once).

    pthread functions return the error number instead of setting errno.
    EOWNERDEAD means *acquired*: the kernel handed us the lock because its
    owner died (robust futex list).  We mark it consistent right away and
    report OWNER_DIED; if we did not, unlocking would make it permanently
    unusable (ENOTRECOVERABLE for everyone after us).
    """
    addr = ctypes.c_void_p(address)
    if timeout is None:
        rc = _libc.pthread_mutex_lock(addr)
    elif timeout <= 0:
        rc = _libc.pthread_mutex_trylock(addr)
        if rc == E.EBUSY:
            return LockResult.TIMEOUT
    else:
        # Uncontended (nearly always): one trylock, no deadline to build.
        rc = _libc.pthread_mutex_trylock(addr)
        if rc == E.EBUSY:
            rc = _libc.pthread_mutex_clocklock(
                addr, CLOCK_MONOTONIC, ctypes.byref(_deadline(timeout))
            )
            if rc == E.ETIMEDOUT:
                return LockResult.TIMEOUT
    if rc == 0:
        return LockResult.ACQUIRED
    if rc == EOWNERDEAD:
        rc2 = _libc.pthread_mutex_consistent(addr)
        if rc2 != 0:  # pragma: no cover - only EINVAL, which EOWNERDEAD rules out
            _raise("mark the shared mutex consistent", rc2, _MUTEX_LOCK_ERRORS, "")
        return LockResult.OWNER_DIED
    _raise("lock the shared mutex", rc, _MUTEX_LOCK_ERRORS, "")
    raise AssertionError("unreachable")  # pragma: no cover


def mutex_unlock(address: int) -> None:
    """Unlock a mutex this thread holds."""
    rc = _libc.pthread_mutex_unlock(ctypes.c_void_p(address))
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

_libc.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
_libc.sem_post.argtypes = [ctypes.c_void_p]
_libc.sem_trywait.argtypes = [ctypes.c_void_p]
_libc.sem_clockwait.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]

_SEM_ERRORS: dict[int, tuple[type[ShmdError], str]] = {
    E.EINVAL: (SegmentError, "it is not a valid semaphore (corrupt segment?)"),
    E.EOVERFLOW: (SegmentError, "its value would overflow"),
}


def sem_init(address: int) -> None:
    """Initialise a process-shared semaphore with value 0 at ``address``."""
    if _libc.sem_init(ctypes.c_void_p(address), 1, 0) != 0:
        _raise("initialise the shared semaphore", ctypes.get_errno(), _SEM_ERRORS, "")


def sem_post(address: int) -> None:
    """Add one to the semaphore, waking a waiter."""
    if _libc.sem_post(ctypes.c_void_p(address)) != 0:
        err = ctypes.get_errno()
        if err == E.EOVERFLOW:  # already far more wake-ups pending than anyone needs
            return
        _raise("post the shared semaphore", err, _SEM_ERRORS, "")


def sem_wait(address: int, timeout: float) -> bool:
    """Wait until the semaphore is positive and take one; False on timeout."""
    addr = ctypes.c_void_p(address)
    deadline = _deadline(timeout)
    while True:
        if _libc.sem_clockwait(addr, CLOCK_MONOTONIC, ctypes.byref(deadline)) == 0:
            return True
        err = ctypes.get_errno()
        if err == E.ETIMEDOUT:
            return False
        if err != E.EINTR:  # a signal interrupted the wait: wait out the rest
            _raise("wait on the shared semaphore", err, _SEM_ERRORS, "")


def sem_drain(address: int) -> None:
    """Take every pending post without waiting."""
    addr = ctypes.c_void_p(address)
    while _libc.sem_trywait(addr) == 0:
        pass


# -- memory ordering ------------------------------------------------------------

# Python has no memory-barrier primitive, and both the sleep handshake and the
# block-policy handshake need a StoreLoad barrier (store my flag, then load the
# other side's), which even x86's TSO does not give for free.
#
# On x86-64 every atomic read-modify-write instruction is a full barrier
# (lock-prefixed, or xchg with memory), and taking plus releasing an
# uncontended lock executes such instructions in any implementation of a
# lock: CPython's _thread.lock is sem_trywait's compare-exchange and
# sem_post's fetch-add on glibc (3.11, 3.12), a compare-exchange on its
# PyMutex from 3.13.  A _thread.lock costs no ctypes call: ~0.2 us against
# ~0.8 us for the pthread mutex pair below, and after a sleep, when caches
# and TLBs are cold, it touches far fewer pages (measured on this project's
# VM after 1 ms asleep: 15 us against 36 us), which is what a wake-up's
# latency is made of.
#
# Elsewhere we lock and unlock a private pthread mutex.  Candidly: on aarch64
# an acquire RMW followed by a release store does not order an earlier plain
# store before a later plain load in every case the architecture allows, so
# that is a best effort, not a proof; shmd is tested on x86-64 only, and a
# port should bring a real barrier (a one-line C helper around
# atomic_thread_fence(memory_order_seq_cst)).
if _machine == "x86_64":
    _barrier = _thread.allocate_lock()
    _barrier_acquire = _barrier.acquire
    _barrier_release = _barrier.release

    def fence() -> None:
        """A full memory barrier (see the comment above)."""
        _barrier_acquire()
        _barrier_release()

    # x86-64 is TSO: stores are not reordered with stores, nor loads with
    # loads, so the reserve -> slots -> commit order (and the reader's mirror
    # image) needs no barrier there; only StoreLoad needs fence().
    def store_fence() -> None:
        """StoreStore barrier: free on x86-64."""

    def load_fence() -> None:
        """LoadLoad barrier: free on x86-64."""

    #: True where store_fence() and load_fence() do nothing (hot paths skip the call).
    TSO = True

    #: fence() as two calls a hot path can make inline (saving the call to
    #: fence() itself, ~1 us cold): the first, then the second.
    FENCE_PAIR: tuple[Callable[[], object], Callable[[], object]] = (
        _barrier_acquire,
        _barrier_release,
    )

else:  # pragma: no cover - exercised on non-x86 machines only
    _fence_mutex = ctypes.create_string_buffer(64)
    _libc.pthread_mutex_init(_fence_mutex, None)
    _fence_addr = ctypes.c_void_p(ctypes.addressof(_fence_mutex))

    def fence() -> None:
        """A full memory barrier (see the comment above)."""
        _libc.pthread_mutex_lock(_fence_addr)
        _libc.pthread_mutex_unlock(_fence_addr)

    store_fence = fence
    load_fence = fence
    TSO = False

    def _nothing() -> None:
        pass

    FENCE_PAIR = (fence, _nothing)


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
