"""shmd._sys._core: the compiled core's argument checks, semaphore waits and signals, loans."""

from __future__ import annotations

import ctypes
import errno
import gc
import math
import mmap
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import Bus, attach, maps_lines

from shmd._sys import _core, libc
from shmd.bus import layout


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
    for fence in (_core.fence, _core.load_fence):
        fence()
        with pytest.raises(TypeError):
            fence(1)  # type: ignore[call-arg]


# -- the hot path's types ----------------------------------------------------------------


def test_the_cores_layout_is_the_layout_modules() -> None:
    """Every offset the C knows (shmd/_sys/_bus.h) equals shmd.bus.layout's."""
    names = {
        "OFF_ACTIVE": layout.OFF_ACTIVE,
        "OFF_WRITE_SEQ": layout.OFF_WRITE_SEQ,
        "OFF_RESERVE_SEQ": layout.OFF_RESERVE_SEQ,
        "OFF_WRITER_WAITING": layout.OFF_WRITER_WAITING,
        "OFF_SLEEP_COUNT": layout.OFF_SLEEP_COUNT,
        "OFF_BYTES_PUBLISHED": layout.OFF_BYTES_PUBLISHED,
        "OFF_SEM": layout.OFF_SEM,
        "OFF_READERS": layout.OFF_READERS,
        "READER_ENTRY_SIZE": layout.READER_ENTRY_SIZE,
        "R_STATE": layout.RU_STATE * 4,
        "R_CURSOR": layout.RQ_CURSOR * 8,
        "R_DELIVERED": layout.RQ_DELIVERED * 8,
        "R_LOST": layout.RQ_LOST * 8,
        "R_LAST_ACTIVE_NS": layout.RQ_LAST_ACTIVE_NS * 8,
        "R_SLEEP_SEQ": layout.RU_SLEEP_SEQ * 4,
        "R_WAKE_SEQ": layout.RU_WAKE_SEQ * 4,
        "R_TOPICS": layout.RQ_TOPICS * 8,
        "R_TAKEN": layout.RQ_TAKEN * 8,
        "R_TOKEN": layout.RQ_TOKEN * 8,
        "RECORD_HEADER_SIZE": layout.RECORD_HEADER_SIZE,
        "TOPIC_MAX": layout.TOPIC_MAX,
        "STATE_ATTACHED": int(layout.ReaderState.ATTACHED),
        "REC_TOPIC": 20,
    }
    assert names == _core.LAYOUT
    offsets = {name: 0 for name, _ in layout.RECORD_HEADER_FIELDS}
    at = 0
    for name, code in layout.RECORD_HEADER_FIELDS:
        offsets[name] = at
        at += {"Q": 8, "I": 4}[code]
    assert offsets["topic"] == _core.LAYOUT["REC_TOPIC"]


def _no_reserve(count: int, size: int, topic: int) -> _core.Reservation:
    raise AssertionError("the test reserves nothing")


def _callbacks() -> dict[str, object]:
    return {
        "slow": lambda payload, topic: 0,
        "reserve_slow": _no_reserve,
        "on_blocking": lambda row: None,
    }


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"capacity": 3}, ValueError, "geometry is invalid"),
        ({"slot_size": 32}, ValueError, "geometry is invalid"),
        ({"reserve_seq": 100}, ValueError, "geometry is invalid"),
        ({"capacity": 64}, ValueError, "mappings are smaller than its geometry"),
        ({"slow": 5}, TypeError, "not callable"),
    ],
    ids=["capacity", "slot", "reserve", "too-small", "callback"],
)
def test_a_writer_on_bad_arguments_is_refused_and_holds_nothing(
    change: dict[str, object], error: type[Exception], match: str
) -> None:
    """A Writer made with a bad geometry or callback raises, and leaves both maps closable."""
    control, ring = mmap.mmap(-1, mmap.PAGESIZE), mmap.mmap(-1, 8 * 64)
    args: dict[str, object] = {
        "control": control,
        "ring": ring,
        "capacity": 8,
        "slot_size": 64,
        "write_seq": 0,
        "reserve_seq": 0,
        **_callbacks(),
        **change,
    }
    with pytest.raises(error, match=match):
        _core.Writer(**args)  # type: ignore[arg-type]
    control.close()  # BufferError if the failed Writer still held an export
    ring.close()


def test_a_reader_needs_a_writable_control_part() -> None:
    """A Reader refuses a read-only control buffer (it stores its cursor there)."""
    ring = mmap.mmap(-1, 8 * 64)
    with pytest.raises(BufferError):
        _core.Reader(
            control=bytes(mmap.PAGESIZE),
            ring=ring,
            ring_view=memoryview(ring),
            capacity=8,
            slot_size=64,
            index=0,
            token=1,
            block=False,
            eventfd=-1,
            on_error=lambda code, seq: None,
        )
    ring.close()


def test_a_closed_writer_sends_publish_to_the_slow_path_and_lets_go() -> None:
    """After close(), publish() goes to the slow callable, and the maps can be unmapped."""
    control, ring = mmap.mmap(-1, mmap.PAGESIZE), mmap.mmap(-1, 8 * 64)
    calls: list[tuple[object, int]] = []

    def slow(payload: object, topic: int) -> int:
        calls.append((payload, topic))
        return 42

    w = _core.Writer(
        control=control,
        ring=ring,
        capacity=8,
        slot_size=64,
        write_seq=0,
        reserve_seq=0,
        slow=slow,
        reserve_slow=_no_reserve,
        on_blocking=lambda row: None,
    )
    assert w.publish(b"x") == 0
    assert w.publish(b"y", topic=3) == 1 and w.seq == 2
    w.close()
    assert w.closed
    control.close()
    ring.close()
    assert w.publish(b"z", 5) == 42
    assert calls == [(b"z", 5)]
    with pytest.raises(TypeError, match="topic is str, not an int"):
        w.publish(b"z", "5")  # type: ignore[arg-type]


# -- loans: a hold read's views under the block policy -------------------------------------


def test_a_hold_read_under_block_lends_each_payload_read_only(bus: Bus) -> None:
    """Under block, a hold read's payloads are read-only views of one Loan per record; a
    Loan's every export holds its slot, and one released can no longer be viewed."""
    pub = bus.publisher(policy="block", block_timeout=60.0)
    sub = bus.subscriber(pub)
    pub.publish_batch([b"a" * 5, b"b" * 7])
    (_, _, _, a), (_, _, _, b) = sub.read_batch(copy=False, hold=True)
    assert isinstance(a, memoryview) and isinstance(b, memoryview)
    la, lb = a.obj, b.obj
    assert isinstance(la, _core.Loan) and isinstance(lb, _core.Loan)
    assert (la.seq, lb.seq, la.held) == (0, 1, True)
    assert a.readonly and bytes(a) == b"a" * 5 and bytes(b) == b"b" * 7
    with pytest.raises(TypeError, match="not writable"):
        ctypes.c_char.from_buffer(la)
    again = memoryview(la)  # a second export of record 0
    del a
    sub.release()

    def cursor() -> int:
        return pub.segment.entry(sub.index).cursor

    assert cursor() == 0
    again.release()  # record 0's last export: republished at once
    assert cursor() == 1 and not la.held and lb.held
    with pytest.raises(BufferError, match="Failed to view record 0 since its slot was released"):
        memoryview(la)
    del b
    assert cursor() == 2 and not lb.held


def test_reads_other_than_a_hold_read_under_block_stay_ring_slices(bus: Bus) -> None:
    """A zero-copy read without hold, and a hold read under drop-oldest, slice the ring view
    itself (the hot path makes no loan); a copying hold read gives bytes."""
    block = bus.publisher(policy="block", block_timeout=60.0)
    sub = bus.subscriber(block)
    block.publish_batch([b"x", b"y"])
    ((*_, view),) = sub.read_batch(1, copy=False)
    assert isinstance(view, memoryview) and view.obj is sub.segment.ring.obj
    ((*_, data),) = sub.read_batch(copy=True, hold=True)
    assert data == b"y"
    sub.release()
    drop = bus.publisher()
    other = bus.subscriber(drop)
    drop.publish(b"z")
    ((*_, held),) = other.read_batch(copy=False, hold=True)
    assert isinstance(held, memoryview) and held.obj is other.segment.ring.obj


def test_a_collected_reader_lets_its_loans_go_and_its_views_keep_the_mapping(bus: Bus) -> None:
    """A Subscriber dropped (never closed) with a held view alive is collected: no reference
    cycle through the Loan keeps it, the view still reads its bytes, and the ring is unmapped
    when the view goes."""
    pub = bus.publisher(policy="block", block_timeout=60.0)
    handle = pub.add_reader("r", os.getpid())
    sub = attach(pub, handle)
    pub.publish(b"kept")
    ((*_, view),) = sub.read_batch(copy=False, hold=True)
    assert isinstance(view, memoryview)
    loan = view.obj
    assert isinstance(loan, _core.Loan)

    def reader_rings() -> int:
        """The reader's read-only ring mappings (the writer maps its own read-write)."""
        return sum(" r--s " in line for line in maps_lines(pub.name))

    # Its fds closed (the collector would warn of them), its Reader left to the collector.
    sub.segment.close()
    assert sub.eventfd is not None
    sub.eventfd.close()
    del sub
    gc.collect()
    assert not loan.held  # the Reader let go: it was collected
    assert bytes(view) == b"kept"
    assert reader_rings() == 1  # kept for the view
    del view, loan
    assert reader_rings() == 0
