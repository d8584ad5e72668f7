"""Tests of shmd._sys.reactor: the epoll reactor, its timers and signal wake-ups, on real pipes."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor, SignalWakeup

# -- Reactor ----------------------------------------------------------------------------------


def test_reactor_dispatches_ready_fds() -> None:
    """A readable fd's handler runs with its events; removed fds and idle polls run nothing."""
    r, w = (OwnedFd(fd) for fd in os.pipe())
    reactor = Reactor()
    seen: list[int] = []
    try:
        reactor.add(r.fileno(), seen.append)
        assert reactor.poll(0) == 0 and seen == []
        os.write(w.fileno(), b"x")
        assert reactor.poll(5) == 1
        assert seen == [select.EPOLLIN]
        reactor.remove(r.fileno())
        reactor.remove(r.fileno())  # unknown now: ignored
        assert reactor.poll(0) == 0 and seen == [select.EPOLLIN]
    finally:
        reactor.close()
        reactor.close()  # idempotent
        r.close()
        w.close()


def test_reactor_modify_changes_the_events_watched() -> None:
    """modify() switches an fd from EPOLLIN to EPOLLOUT."""
    r, w = (OwnedFd(fd) for fd in os.pipe())
    reactor = Reactor()
    seen: list[int] = []
    try:
        reactor.add(w.fileno(), seen.append, select.EPOLLIN)
        assert reactor.poll(0) == 0  # a pipe's write end is never readable
        reactor.modify(w.fileno(), select.EPOLLOUT)
        assert reactor.poll(5) == 1 and seen == [select.EPOLLOUT]
    finally:
        reactor.close()
        r.close()
        w.close()


def test_a_handler_removing_another_ready_fd_suppresses_its_handler() -> None:
    """When one handler removes another fd ready in the same poll, that fd's handler is skipped."""
    pipes = [tuple(OwnedFd(fd) for fd in os.pipe()) for _ in range(2)]
    reactor = Reactor()
    calls: list[int] = []
    try:
        for i, (r, w) in enumerate(pipes):
            other = pipes[1 - i][0].fileno()

            def handler(events: int, i: int = i, other: int = other) -> None:
                calls.append(i)
                reactor.remove(other)

            reactor.add(r.fileno(), handler)
            os.write(w.fileno(), b"x")
        reactor.poll(5)
        assert len(calls) == 1
    finally:
        reactor.close()
        for r, w in pipes:
            r.close()
            w.close()


def test_signal_wakeup_turns_a_signal_into_a_dispatch() -> None:
    """A signal wakes the reactor and is dispatched by number; close() restores the old handler."""
    previous = signal.getsignal(signal.SIGUSR1)
    reactor = Reactor()
    got: list[signal.Signals] = []
    wakeup = SignalWakeup(reactor, [signal.SIGUSR1], got.append)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert reactor.poll(5) == 1
        assert got == [signal.SIGUSR1]
    finally:
        wakeup.close()
        wakeup.close()  # idempotent
        reactor.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


# -- timers ---------------------------------------------------------------------------------
# Elapsed times are bounded loosely and only from below (a timer never runs
# early) or far above (a poll that should have ended at a deadline did not
# wait out its long timeout): the machine may be busy.


def test_timers_run_in_deadline_order_never_early() -> None:
    """call_later callbacks run by due time, each no earlier than its delay, ties by order."""
    reactor = Reactor()
    ran: list[tuple[str, float]] = []
    start = time.monotonic()
    try:

        def note(name: str) -> Callable[[], None]:
            return lambda: ran.append((name, time.monotonic() - start))

        for name, delay in [("late", 0.05), ("first", 0.0), ("tie", 0.0), ("mid", 0.02)]:
            reactor.call_later(delay, note(name))
        while len(ran) < 4:
            reactor.poll(30)
        assert [n for n, _ in ran] == ["first", "tie", "mid", "late"]
        assert ran[2][1] >= 0.02 and ran[3][1] >= 0.05
        assert time.monotonic() - start < 20  # the polls ended at the deadlines, not after 30 s
        assert reactor.next_timer() is None
    finally:
        reactor.close()


def test_a_cancelled_timer_never_runs_nor_bounds_the_wait() -> None:
    """cancel() keeps the callback from running and next_timer() skips it."""
    reactor = Reactor()
    ran: list[str] = []
    try:
        timer = reactor.call_later(0.0, lambda: ran.append("cancelled"))
        assert not timer.cancelled and reactor.next_timer() == 0.0
        timer.cancel()
        timer.cancel()  # idempotent
        assert timer.cancelled and reactor.next_timer() is None
        assert reactor.poll(0) == 0 and reactor.run_timers() is None
        assert ran == []
    finally:
        reactor.close()


def test_fd_handlers_run_before_the_timers_due_in_the_same_poll() -> None:
    """One poll dispatches the ready fds, then the due timers; a run timer is spent."""
    r, w = (OwnedFd(fd) for fd in os.pipe())
    reactor = Reactor()
    order: list[str] = []
    try:
        reactor.add(r.fileno(), lambda events: order.append("fd"))
        timer = reactor.call_later(0.0, lambda: order.append("timer"))
        os.write(w.fileno(), b"x")
        assert reactor.poll(30) == 1
        assert order == ["fd", "timer"] and timer.cancelled
    finally:
        reactor.close()
        r.close()
        w.close()


def test_a_timer_added_by_a_timer_waits_for_the_next_run() -> None:
    """A callback re-arming itself with delay 0 runs once per run_timers(), which returns 0."""
    reactor = Reactor()
    runs: list[int] = []

    def again() -> None:
        runs.append(len(runs))
        reactor.call_later(0.0, again)

    try:
        reactor.call_later(0.0, again)
        assert reactor.run_timers() == 0.0 and runs == [0]
        assert reactor.run_timers() == 0.0 and runs == [0, 1]
    finally:
        reactor.close()
    assert reactor.next_timer() is None  # close() dropped the pending one


def test_call_later_from_another_thread_wakes_a_sleeping_poll() -> None:
    """A timer another thread adds ends a poll with no deadline; it runs on the loop's thread."""
    reactor = Reactor()
    ran_on: list[int] = []
    start = time.monotonic()
    helper = threading.Thread(
        target=lambda: reactor.call_later(0.0, lambda: ran_on.append(threading.get_ident()))
    )
    try:
        helper.start()
        while not ran_on and time.monotonic() - start < 20:
            reactor.poll(30)
        helper.join(20)
        assert ran_on == [threading.get_ident()]
        assert time.monotonic() - start < 20  # woken, not the 30 s timeout
    finally:
        reactor.close()


def test_run_until_returns_when_done_or_at_the_deadline() -> None:
    """run_until() polls until its predicate holds (True), else gives up at the timeout (False)."""
    r, w = (OwnedFd(fd) for fd in os.pipe())
    reactor = Reactor()
    seen: list[int] = []
    try:
        reactor.add(r.fileno(), seen.append)
        os.write(w.fileno(), b"x")
        assert reactor.run_until(lambda: bool(seen), 30) is True
        reactor.remove(r.fileno())
        start = time.monotonic()
        assert reactor.run_until(lambda: False, 0.02) is False
        assert 0.02 <= time.monotonic() - start < 20
        assert reactor.next_timer() is None  # its deadline timer is gone
    finally:
        reactor.close()
        r.close()
        w.close()


def test_call_every_repeats_until_cancelled() -> None:
    """call_every() runs its callback each period, first after ``first``; cancel() ends it."""
    reactor = Reactor()
    runs: list[float] = []
    start = time.monotonic()
    try:
        repeating = reactor.call_every(0.01, lambda: runs.append(time.monotonic()), first=0.0)
        assert reactor.run_until(lambda: len(runs) >= 3, 30)
        # Never early: run i comes at least i periods after the start.
        assert all(t - start >= i * 0.01 for i, t in enumerate(runs))
        repeating.cancel()
        assert reactor.next_timer() is None
        count = len(runs)
        assert reactor.run_until(lambda: False, 0.03) is False
        assert len(runs) == count
    finally:
        reactor.close()
