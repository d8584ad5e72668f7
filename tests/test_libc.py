"""shmd._sys.libc: shm_open/unlink, the robust process-shared mutex, the semaphore."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from helpers import ChildEnd, Procs, in_dev_shm

from shmd._sys import libc
from shmd.errors import (
    MutexError,
    MutexNotWritable,
    MutexUnrecoverable,
    SegmentError,
    SegmentExists,
    SegmentNotFound,
)


@dataclass
class Shared:
    """A one-page shm object with a robust mutex at 0 and a semaphore at 64."""

    mm: mmap.mmap
    mutex: libc.Pinned
    sem: libc.Pinned


@pytest.fixture
def shared(shm_name: str) -> Iterator[Shared]:
    """A real shm object holding an initialised mutex and semaphore (shared with forks)."""
    fd = libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        mm = mmap.mmap(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)
    s = Shared(
        mm,
        libc.Pinned(mm, 0, libc.MUTEX_AREA, "test mutex"),
        libc.Pinned(mm, libc.MUTEX_AREA, libc.SEM_AREA, "test semaphore"),
    )
    libc.mutex_init_robust(s.mutex.address)
    libc.sem_init(s.sem.address)
    try:
        yield s
    finally:
        s.mutex.release()
        s.sem.release()
        mm.close()


def hold_mutex(shared: Shared) -> Callable[[ChildEnd], None]:
    """A child body: lock the mutex, say so, and wait to be told to unlock (or be killed)."""

    def body(ch: ChildEnd) -> None:
        assert libc.mutex_lock(shared.mutex.address, None) is libc.LockResult.ACQUIRED
        ch.send(f"locked {os.getpid()}")
        if ch.recv() == "unlock":
            libc.mutex_unlock(shared.mutex.address)
            ch.send("unlocked")
        ch.recv()  # stay alive until told (or killed)

    return body


# -- shm_open / shm_unlink -----------------------------------------------------------


def test_shm_open_create_exclusive_twice_raises_segment_exists(shm_name: str) -> None:
    """A second O_CREAT|O_EXCL open of a name raises SegmentExists naming it."""
    fd = libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    os.close(fd)
    with pytest.raises(SegmentExists, match=f"segment '{shm_name}' since a segment of that name"):
        libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL)


def test_shm_open_fd_is_close_on_exec(shm_name: str) -> None:
    """shm_open returns an fd that an exec'd program does not inherit."""
    fd = libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


def test_shm_open_missing_name_says_the_writer_may_be_down(shm_name: str) -> None:
    """Opening a name that does not exist raises SegmentNotFound asking whether the writer runs."""
    with pytest.raises(
        SegmentNotFound,
        match=r"no segment of that name exists \(is the writer "
        r"running\?\)",
    ):
        libc.shm_open(shm_name, os.O_RDONLY)


@pytest.mark.parametrize("name", ["/a/b", "/", "/" + "x" * 300])
def test_shm_open_invalid_names(name: str) -> None:
    """Names with an inner slash, empty or over-long ones raise SegmentError, nothing created."""
    with pytest.raises(SegmentError, match="since the name is"):
        libc.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)


def test_shm_unlink_removes_the_name_once(shm_name: str) -> None:
    """shm_unlink removes the /dev/shm entry; a second unlink raises SegmentNotFound."""
    os.close(libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL))
    assert in_dev_shm(shm_name)
    libc.shm_unlink(shm_name)
    assert not in_dev_shm(shm_name)
    with pytest.raises(SegmentNotFound, match="Failed to unlink shared-memory segment"):
        libc.shm_unlink(shm_name)


# -- Pinned -------------------------------------------------------------------------------


def test_pinning_read_only_memory_raises_mutex_not_writable(shm_name: str) -> None:
    """A read-only mapping cannot be pinned: MutexNotWritable instead of a later SIGSEGV."""
    fd = libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        with (
            mmap.mmap(fd, mmap.PAGESIZE, prot=mmap.PROT_READ) as ro,
            pytest.raises(MutexNotWritable, match="must be mapped read-write"),
        ):
            libc.Pinned(ro, 0, libc.MUTEX_AREA, "shared mutex")
    finally:
        os.close(fd)
    with pytest.raises(MutexNotWritable):
        libc.Pinned(b"\0" * 64, 0, 64, "shared mutex")


def test_pin_blocks_munmap_until_released() -> None:
    """A pinned address keeps its mapping from being closed until release()."""
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    pin = libc.Pinned(mm, 128, 64, "area")
    assert pin.address != 0 and pin.size == 64
    with pytest.raises(BufferError):
        mm.close()
    pin.release()
    assert pin.address == 0
    mm.close()


# -- robust mutex ---------------------------------------------------------------------------


def test_lock_and_unlock(shared: Shared) -> None:
    """An unowned mutex is acquired with every kind of timeout and can be unlocked again."""
    for timeout in (None, 0, 0.5):
        assert libc.mutex_lock(shared.mutex.address, timeout) is libc.LockResult.ACQUIRED
        assert libc.mutex_owner_tid(shared.mm[: libc.MUTEX_AREA], 0) == os.getpid()
        libc.mutex_unlock(shared.mutex.address)
        assert libc.mutex_owner_tid(shared.mm[: libc.MUTEX_AREA], 0) == 0


def test_unlock_without_holding_raises(shared: Shared) -> None:
    """Unlocking a robust mutex this thread does not hold raises MutexError, not silence."""
    with pytest.raises(
        MutexError,
        match=r"^Failed to unlock the shared mutex since this thread "
        r"does not hold it$",
    ):
        libc.mutex_unlock(shared.mutex.address)


def test_lock_held_by_another_process_times_out(shared: Shared, procs: Procs) -> None:
    """While another live process holds the mutex, try-lock and timed lock report TIMEOUT."""
    child = procs.fork(hold_mutex(shared))
    pid = int(child.expect("locked").split()[1])
    assert libc.mutex_owner_tid(shared.mm[: libc.MUTEX_AREA], 0) == pid
    assert libc.mutex_lock(shared.mutex.address, 0) is libc.LockResult.TIMEOUT
    t0 = time.monotonic()
    assert libc.mutex_lock(shared.mutex.address, 0.05) is libc.LockResult.TIMEOUT
    assert time.monotonic() - t0 >= 0.05
    child.tell("unlock")
    child.expect("unlocked")
    assert libc.mutex_lock(shared.mutex.address, 0.5) is libc.LockResult.ACQUIRED
    libc.mutex_unlock(shared.mutex.address)
    child.tell("exit")
    assert child.wait() == 0


@pytest.mark.parametrize("timeout", [None, 0, 5.0])
def test_owner_killed_while_holding_gives_owner_died(
    shared: Shared,
    procs: Procs,
    timeout: float | None,
) -> None:
    """A SIGKILLed holder's mutex goes to the next locker as OWNER_DIED, then works normally."""
    child = procs.fork(hold_mutex(shared))
    child.expect("locked")
    assert child.kill() == -9
    assert libc.mutex_lock(shared.mutex.address, timeout) is libc.LockResult.OWNER_DIED
    libc.mutex_unlock(shared.mutex.address)
    # mutex_lock marked it consistent: the next lock is an ordinary one.
    assert libc.mutex_lock(shared.mutex.address, timeout) is libc.LockResult.ACQUIRED
    libc.mutex_unlock(shared.mutex.address)


def test_unlock_without_consistent_makes_the_mutex_unrecoverable(
    shared: Shared,
    procs: Procs,
) -> None:
    """If a locker skips pthread_mutex_consistent, every later lock raises MutexUnrecoverable."""
    child = procs.fork(hold_mutex(shared))
    child.expect("locked")
    child.kill()
    # What a careless locker does (raw libc, bypassing mutex_lock's repair).
    raw = ctypes.CDLL(None)
    raw.pthread_mutex_lock.argtypes = raw.pthread_mutex_unlock.argtypes = [ctypes.c_void_p]
    assert raw.pthread_mutex_lock(shared.mutex.address) == libc.EOWNERDEAD
    assert raw.pthread_mutex_unlock(shared.mutex.address) == 0
    with pytest.raises(MutexUnrecoverable, match="never made consistent"):
        libc.mutex_lock(shared.mutex.address, 0.5)


def test_relocking_in_the_same_thread_raises_instead_of_hanging(shared: Shared) -> None:
    """Locking a mutex this thread already holds raises MutexError at once (no self-deadlock)."""
    assert libc.mutex_lock(shared.mutex.address, None) is libc.LockResult.ACQUIRED
    try:
        for timeout in (None, 0, 5.0):
            t0 = time.monotonic()
            with pytest.raises(MutexError, match="since this thread already holds it"):
                libc.mutex_lock(shared.mutex.address, timeout)
            assert time.monotonic() - t0 < 1.0
    finally:
        libc.mutex_unlock(shared.mutex.address)


# -- semaphore ------------------------------------------------------------------------------


def test_semaphore_post_wait_timeout_and_drain(shared: Shared) -> None:
    """Posts are counted, a wait on zero times out, and drain forgets pending posts."""
    addr = shared.sem.address
    t0 = time.monotonic()
    assert libc.sem_wait(addr, 0.05) is False
    assert time.monotonic() - t0 >= 0.05
    libc.sem_post(addr)
    assert libc.sem_wait(addr, 1.0) is True
    for _ in range(3):
        libc.sem_post(addr)
    libc.sem_drain(addr)
    assert libc.sem_wait(addr, 0) is False


def test_semaphore_wakes_another_process(shared: Shared, procs: Procs) -> None:
    """A post in this process wakes a child waiting on the process-shared semaphore."""

    def body(ch: ChildEnd) -> None:
        ch.send("waiting")
        ch.send("woken" if libc.sem_wait(shared.sem.address, 20.0) else "timed out")

    child = procs.fork(body)
    child.expect("waiting")
    libc.sem_post(shared.sem.address)
    child.expect("woken")
    assert child.wait() == 0
