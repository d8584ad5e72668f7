"""The epoll reactor, and the reader loop built on it.

:class:`Reactor` is a small level-triggered epoll loop: fds with a callback
each.  Signals arrive through :class:`SignalWakeup` (gunicorn's arbiter
pattern: the handler only queues the signal number and writes a byte to a
pipe that the loop watches; the loop then dispatches to ``handle_<signal>``
methods).

:class:`ReaderLoop` is the reader's whole life in one object: drain, sleep
in epoll on the eventfd (and whatever else the daemon watches), wake, drain
again; return once the writer cleared the active flag and everything left
was delivered.  :func:`aiter_records` is the same loop for asyncio.
"""

from __future__ import annotations

import asyncio
import enum
import os
import select
import signal
from collections.abc import AsyncIterator, Callable
from types import FrameType

from shmd._sys.fd import OwnedFd
from shmd.subscriber import RawRecord, Record, Subscriber

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

    def __init__(self, reactor: Reactor, signals: list[signal.Signals],
                 dispatch: Callable[[signal.Signals], None]) -> None:
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


class LoopExit(enum.Enum):
    """Why :meth:`ReaderLoop.run` returned."""

    #: The writer cleared the active flag and everything was delivered.
    DRAINED = "drained"
    #: :meth:`ReaderLoop.stop` was called (a signal, the writer hung up, ...).
    STOPPED = "stopped"


class ReaderLoop:
    """Drain, sleep in epoll, repeat, until the writer goes inactive.

    ``on_records(batch)`` gets every non-empty batch of ``(seq,
    timestamp_ns, topic, payload)`` tuples (:meth:`Subscriber.read_batch`).  The daemon adds its
    own fds (control socket, signal pipe) to ``reactor``; their handlers may
    call :meth:`stop`.  The eventfd is consumed by
    :meth:`Subscriber.prepare_sleep`, before the sleep is announced, so a
    wake-up costs this loop no syscall but the epoll_wait that returns it.
    """

    def __init__(
        self, sub: Subscriber, on_records: Callable[[list[RawRecord]], None], *,
        reactor: Reactor | None = None, batch: int = 4096, copy: bool = True,
        tick: Callable[[], float | None] | None = None,
    ) -> None:
        if sub.eventfd is None:
            raise ValueError("Failed to build a reader loop since the subscriber has no eventfd")
        self.sub = sub
        self.on_records = on_records
        self.reactor = reactor if reactor is not None else Reactor()
        self._own_reactor = reactor is None
        self.batch = batch
        self.copy = copy
        #: Called once per loop turn; returns the longest the loop may
        #: sleep before calling it again (None: no limit).  Daemons use it
        #: for periodic stats and watchdog pings.
        self.tick = tick
        self._stopped = False
        self.reactor.add(sub.eventfd.fileno(), self._on_eventfd)

    def _on_eventfd(self, events: int) -> None:
        """Nothing to do: the wake-up only had to end the epoll_wait.

        The counter stays readable (level-triggered) until the next
        prepare_sleep drains it, which is before this loop can sleep again.
        """

    def stop(self) -> None:
        """Make :meth:`run` return STOPPED at its next turn."""
        self._stopped = True

    def drain(self) -> int:
        """Deliver everything committed so far; returns records delivered."""
        total = 0
        sub = self.sub
        while True:
            before = sub.cursor
            batch = sub.read_batch(self.batch, copy=self.copy)
            if batch:
                total += len(batch)
                self.on_records(batch)
            elif sub.cursor == before:
                return total

    def run(self) -> LoopExit:
        """Run until drained after the writer went inactive, or stopped."""
        sub = self.sub
        while not self._stopped:
            limit = self.tick() if self.tick is not None else None
            self.drain()
            if self._stopped:
                break
            if not sub.active:
                # The flag is cleared only after the writer's last commit:
                # one more drain after seeing it delivers everything.
                self.drain()
                return LoopExit.DRAINED
            sleep = sub.prepare_sleep()
            if sleep == 0.0:
                continue
            if sleep is None or (limit is not None and limit < sleep):
                sleep = limit
            self.reactor.poll(sleep)
        return LoopExit.STOPPED

    def close(self) -> None:
        """Unregister the eventfd (and close the reactor if this loop made it)."""
        if self.sub.eventfd is not None and not self.sub.eventfd.closed:
            self.reactor.remove(self.sub.eventfd.fileno())
        if self._own_reactor:
            self.reactor.close()


async def aiter_records(
    sub: Subscriber, *, batch: int = 4096, copy: bool = True,
) -> AsyncIterator[list[Record]]:
    """Batches of records for asyncio code; ends once the writer went inactive and all is read.

    The eventfd is watched with ``loop.add_reader``; the coroutine never polls.
    """
    if sub.eventfd is None:
        raise ValueError("Failed to iterate since the subscriber has no eventfd")
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    fd = sub.eventfd.fileno()
    loop.add_reader(fd, ready.set)
    try:
        inactive = False
        while True:
            before = sub.cursor
            records = sub.read(batch, copy=copy)
            if records:
                yield records
                continue
            if sub.cursor != before:
                continue  # a batch of other topics' or lost records: read on
            if inactive:
                return
            if not sub.active:
                # The flag is cleared only after the writer's last commit:
                # one more drain after seeing it delivers everything.
                inactive = True
                continue
            ready.clear()
            sleep = sub.prepare_sleep()
            if sleep == 0.0:
                continue
            try:
                await asyncio.wait_for(ready.wait(), sleep)
            except TimeoutError:
                pass
            # asyncio watches the fd level-triggered: left readable until the
            # next prepare_sleep, it would call ready.set on every turn of the
            # event loop while the consumer works on the batch.
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
    finally:
        loop.remove_reader(fd)
