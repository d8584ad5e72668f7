"""The epoll reactor the daemons and the reader loop run on.

:class:`Reactor` is a small level-triggered epoll loop: fds with a callback
each.  Signals arrive through :class:`SignalWakeup` (gunicorn's arbiter
pattern: the handler only queues the signal number and writes a byte to a
pipe that the loop watches; the loop then dispatches to ``handle_<signal>``
methods).
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable
from types import FrameType

from shmd._sys.fd import OwnedFd

Handler = Callable[[int], None]


class Reactor:
    """Level-triggered epoll loop dispatching readiness to per-fd callbacks."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = select.epoll()  # close-on-exec by default
        self._handlers: dict[int, Handler] = {}

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

    def poll(self, timeout: float | None) -> int:
        """Wait up to ``timeout`` seconds (None: forever) and dispatch; returns events handled."""
        assert self._epoll is not None
        try:
            ready = self._epoll.poll(-1 if timeout is None else max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            return 0
        for fd, events in ready:
            handler = self._handlers.get(fd)
            if handler is not None:  # an earlier handler in this batch may have removed it
                handler(events)
        return len(ready)

    def close(self) -> None:
        """Close the epoll fd; idempotent."""
        ep, self._epoll = self._epoll, None
        self._handlers.clear()
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
