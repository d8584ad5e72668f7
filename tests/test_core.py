"""shmd._sys._core: the compiled core's argument checks, its semaphore waits and signals."""

from __future__ import annotations

import errno
import math
import mmap
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from shmd._sys import _core, libc


@pytest.fixture
def area() -> Iterator[int]:
    """The address of a fresh page (anonymous shared mapping), pinned for the test."""
    page = mmap.mmap(-1, mmap.PAGESIZE)
    pin = libc.Pinned(page, 0, libc.MUTEX_AREA + libc.SEM_AREA, "test area")
    try:
        yield pin.address
    finally:
        pin.release()
        page.close()


def test_sizes_fit_the_segment_areas() -> None:
    """This libc's pthread_mutex_t and sem_t fit the bytes the layout reserves for them."""
    assert 0 < _core.MUTEX_SIZE <= libc.MUTEX_AREA
    assert 0 < _core.SEM_SIZE <= libc.SEM_AREA


@pytest.mark.parametrize(
    "call",
    [
        lambda: _core.mutex_init(0),
        lambda: _core.mutex_lock(0, None),
        lambda: _core.mutex_unlock(0),
        lambda: _core.sem_init(0),
        lambda: _core.sem_post(0),
        lambda: _core.sem_wait(0, 0.0),
        lambda: _core.sem_drain(0),
    ],
)
def test_address_zero_is_refused(call: object) -> None:
    """Address 0 (a released Pinned) raises ValueError instead of crashing the interpreter."""
    with pytest.raises(ValueError, match="address since it is 0"):
        call()  # type: ignore[operator]


@pytest.mark.parametrize("timeout", [math.nan, 1e10])
def test_a_wait_beyond_reason_is_refused(area: int, timeout: float) -> None:
    """A NaN or absurd timeout raises ValueError; a negative one means try once."""
    assert _core.sem_init(area) == 0
    with pytest.raises(ValueError, match="timeout is not between"):
        _core.sem_wait(area, timeout)
    assert _core.sem_wait(area, -1.0) == errno.ETIMEDOUT


def test_wrong_argument_counts_and_types_raise_type_error(area: int) -> None:
    """Calls with the wrong number or type of arguments raise TypeError."""
    with pytest.raises(TypeError):
        _core.mutex_lock(area)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _core.sem_wait(area, "soon")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _core.mutex_unlock("here")  # type: ignore[arg-type]


def test_semaphore_counts_posts_and_drains(area: int) -> None:
    """Posts are taken one per wait; drain takes the rest; an empty wait times out."""
    assert _core.sem_init(area) == 0
    for _ in range(3):
        assert _core.sem_post(area) == 0
    assert _core.sem_wait(area, 0.0) == 0
    _core.sem_drain(area)
    assert _core.sem_wait(area, 0.0) == errno.ETIMEDOUT


def test_a_blocked_sem_wait_lets_other_threads_run(area: int) -> None:
    """sem_wait releases the GIL: a thread posts while the main thread waits."""
    assert _core.sem_init(area) == 0
    waiting = threading.Event()

    def post() -> None:
        waiting.wait(30)
        _core.sem_post(area)

    poster = threading.Thread(target=post)
    poster.start()
    try:
        # From here the poster needs the GIL to post: if sem_wait held it,
        # the wait would run to its deadline and time out.
        waiting.set()
        assert _core.sem_wait(area, 30.0) == 0
    finally:
        poster.join()


def test_a_signal_handler_that_raises_ends_the_wait(area: int) -> None:
    """A signal during sem_wait runs its Python handler at once; its exception ends the wait."""
    assert _core.sem_init(area) == 0

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            _core.sem_wait(area, 30.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # Not a speed check: ignoring the signal would wait out all 30 s.
    assert time.monotonic() - started < 25


def test_a_signal_handler_that_returns_lets_the_wait_go_on(area: int) -> None:
    """After a handler that returns, the wait resumes to its deadline and then times out."""
    assert _core.sem_init(area) == 0
    seen: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert _core.sem_wait(area, 1.0) == errno.ETIMEDOUT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert seen == [signal.SIGALRM]


def test_mutex_lock_reports_a_timeout_as_etimedout(area: int) -> None:
    """A mutex held by another thread: try-once and timed locks return ETIMEDOUT."""
    assert _core.mutex_init(area) == 0
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        assert _core.mutex_lock(area, None) == 0
        held.set()
        done.wait(30)
        assert _core.mutex_unlock(area) == 0

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        assert _core.mutex_lock(area, 0.0) == errno.ETIMEDOUT
        assert _core.mutex_lock(area, 0.05) == errno.ETIMEDOUT
        assert _core.mutex_unlock(area) == errno.EPERM  # not ours
    finally:
        done.set()
        t.join()
    assert _core.mutex_lock(area, 1.0) == 0
    assert _core.mutex_unlock(area) == 0


def test_fences_take_no_arguments() -> None:
    """The three barriers are plain no-argument calls."""
    for fence in (_core.fence, _core.store_fence, _core.load_fence):
        fence()
        with pytest.raises(TypeError):
            fence(1)  # type: ignore[call-arg]
