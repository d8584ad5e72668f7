"""The epoll reactor the daemons and the reader loop run on.

:class:`Reactor` is a small level-triggered epoll loop: fds with a callback
each, and timers (:meth:`Reactor.call_later`, :meth:`Reactor.call_every`)
whose deadlines bound the epoll timeout, on ``time.monotonic``.  Signals arrive through
:class:`SignalWakeup` (gunicorn's arbiter pattern: the handler only queues
the signal number and writes a byte to a pipe that the loop watches; the
loop then dispatches to ``handle_<signal>`` methods, see
:class:`shmd.daemons.process.SignalDispatch`).
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from shmd._sys.fd import OwnedFd

Handler = Callable[[int], None]


class Timer:
    """A callback :meth:`Reactor.call_later` will run; :meth:`cancel` it to not."""

    __slots__ = ("_callback", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        #: When it is due, on ``time.monotonic``.
        self.when = when
        self._callback: Callable[[], object] | None = callback

    @property
    def cancelled(self) -> bool:
        """Cancelled, or run already."""
        return self._callback is None

    def cancel(self) -> None:
        """Do not run it (no-op once run or cancelled); safe from any thread."""
        self._callback = None

    def _run(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class Repeating:
    """A callback :meth:`Reactor.call_every` runs every ``period`` seconds until cancelled."""

    def __init__(
        self, reactor: Reactor, period: float, callback: Callable[[], object], first: float
    ) -> None:
        self._reactor = reactor
        self._period = period
        self._callback = callback
        self._timer = reactor.call_later(first, self._fire)

    @property
    def when(self) -> float:
        """When it is next due, on ``time.monotonic`` (the last one, once cancelled)."""
        return self._timer.when

    def cancel(self) -> None:
        """Run it no more."""
        self._timer.cancel()

    def _fire(self) -> None:
        # Re-armed first, so that the callback may cancel it.
        self._timer = self._reactor.call_later(self._period, self._fire)
        self._callback()


class Reactor:
    """Level-triggered epoll loop dispatching readiness to per-fd callbacks, and timers.

    Not thread-safe but for :meth:`call_later` (and :meth:`Timer.cancel`):
    the thread that made the reactor runs it.
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = select.epoll()  # close-on-exec by default
        self._handlers: dict[int, Handler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._owner = threading.get_ident()
        #: Written by another thread's call_later so that a sleeping poll
        #: sees the new deadline at once.
        self._wake = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.add(self._wake.fileno(), self._on_wake)

    def fileno(self) -> int:
        """The epoll fd: readable while a watched fd is ready (for a foreign event loop)."""
        assert self._epoll is not None
        return self._epoll.fileno()

    def add(self, fd: int, handler: Handler, events: int = select.EPOLLIN) -> None:
        """Watch ``fd``; ``handler(events)`` runs when it is ready."""
        assert self._epoll is not None
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        """Change the events watched for ``fd``."""
        assert self._epoll is not None
        self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing it.

        (epoll watches the open file description, not the number: an fd
        closed without unregistering keeps firing while any dup of it lives,
        and its number may be reused by an unrelated file.)
        """
        if self._handlers.pop(fd, None) is not None and self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed by its owner: the kernel dropped it

    # -- timers ------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback()`` on the loop once ``delay`` seconds have passed.

        Callable from any thread: heappush is one C call, atomic under the
        GIL, and a push from another thread than the loop's also writes the
        wake-up eventfd, so a sleeping poll recomputes its timeout.  Timers
        due at the same time run in the order they were added.
        """
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        if threading.get_ident() != self._owner and not self._wake.closed:
            os.eventfd_write(self._wake.fileno(), 1)
        return timer

    def call_every(
        self, period: float, callback: Callable[[], object], *, first: float | None = None
    ) -> Repeating:
        """Run ``callback()`` every ``period`` seconds, the first time after ``first``.

        ``first`` defaults to ``period``; each next run is due ``period``
        after the previous one started.
        """
        return Repeating(self, period, callback, period if first is None else first)

    def next_timer(self) -> float | None:
        """Seconds until the next timer is due (0 when overdue), None without one."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return max(0.0, timers[0][0] - time.monotonic()) if timers else None

    def run_timers(self) -> float | None:
        """Run the timers due now; returns :meth:`next_timer`.

        Timers a callback adds wait for the next call, even with delay 0, so
        one that keeps re-arming itself cannot starve the fds.  A loop that
        may go on without polling (:class:`shmd.bus.loop.ReaderLoop` under
        load) calls this once per turn as its ``tick``.
        """
        now = time.monotonic()
        timers = self._timers
        due: list[Timer] = []
        while timers and timers[0][0] <= now:
            due.append(heapq.heappop(timers)[2])
        for timer in due:
            timer._run()
        return self.next_timer()

    def _on_wake(self, events: int) -> None:
        try:
            os.eventfd_read(self._wake.fileno())
        except BlockingIOError:
            pass

    # -- the loop ------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> int:
        """Wait up to ``timeout`` seconds (None: forever) and dispatch; returns events handled.

        The wait ends early when a timer is due; the fds' handlers run
        first, then the timers due by then.
        """
        assert self._epoll is not None
        due = self.next_timer()
        if due is not None and (timeout is None or due < timeout):
            timeout = due
        try:
            ready = self._epoll.poll(-1 if timeout is None else max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            ready = []
        for fd, events in ready:
            handler = self._handlers.get(fd)
            if handler is not None:  # an earlier handler in this batch may have removed it
                handler(events)
        if self._timers:
            self.run_timers()
        return len(ready)

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Poll until ``done()`` holds (True) or ``timeout`` seconds passed (False).

        ``done()`` is asked before each poll and after the last one, so a
        poll that both makes it true and reaches the deadline returns True.
        """
        expired: list[bool] = []
        timer = self.call_later(timeout, lambda: expired.append(True))
        try:
            while not done():
                if expired:
                    return False
                self.poll(None)
            return True
        finally:
            timer.cancel()

    def close(self) -> None:
        """Close the epoll fd and drop pending timers; idempotent."""
        ep, self._epoll = self._epoll, None
        self._handlers.clear()
        self._timers.clear()
        self._wake.close()
        if ep is not None:
            ep.close()


class SignalWakeup:
    """Turn signals into reactor events: the handler only queues and wakes.

    Uses ``signal.set_wakeup_fd`` on a non-blocking pipe; the loop reads the
    signal numbers from the pipe and calls ``dispatch(signum)``.
    """

    def __init__(
        self,
        reactor: Reactor,
        signals: list[signal.Signals],
        dispatch: Callable[[signal.Signals], None],
    ) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._r, self._w = OwnedFd(r), OwnedFd(w)
        self._reactor = reactor
        self._dispatch = dispatch
        self._signals = signals
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, self._noop) for s in signals}
        reactor.add(r, self._on_readable)

    @staticmethod
    def _noop(signum: int, frame: FrameType | None) -> None:
        """The real work happens in the loop; the C-level handler already wrote the byte."""

    def _on_readable(self, events: int) -> None:
        try:
            data = os.read(self._r.fileno(), 512)
        except BlockingIOError:
            return
        for num in data:
            self._dispatch(signal.Signals(num))

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd; idempotent."""
        if self._r.closed:
            return
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._reactor.remove(self._r.fileno())
        self._r.close()
        self._w.close()
