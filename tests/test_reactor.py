"""Tests of shmd._sys.reactor: the epoll reactor and signal wake-ups, on real pipes."""

from __future__ import annotations

import os
import select
import signal

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
