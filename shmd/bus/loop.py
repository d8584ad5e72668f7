"""The reader loop: a subscriber's whole life, on the epoll reactor or asyncio.

:class:`ReaderLoop` drains, sleeps in epoll on the eventfd (and whatever
else the daemon watches), wakes, drains again; it returns once the writer
cleared the active flag and everything left was delivered.
:func:`aiter_records` is the same loop for asyncio.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import AsyncIterator, Callable

from shmd._sys.reactor import Reactor
from shmd.bus.subscriber import RawRecord, Record, Subscriber

#: How often (seconds) a loop that does not sleep looks at its reactor's other
#: fds (control socket, signals) with a zero-timeout poll.
LOOK_INTERVAL = 0.01


def wait_turn(sub: Subscriber, reactor: Reactor, limit: float | None) -> bool:
    """Wait once, by ``sub``'s strategy, for records, with ``reactor``'s fds watched too.

    Returns after at most ``limit`` seconds (None: no limit but the
    strategy's), or sooner once records may be there, the writer went
    inactive, or a watched fd was handled: the caller reads, then calls
    again.  ``sleep`` announces the sleep and polls the reactor, which the
    eventfd wakes; ``spin`` busy-polls for at most :data:`LOOK_INTERVAL`,
    then looks at the reactor's fds with a zero-timeout poll; ``backoff``
    spins and yields for its times, then sleeps.

    ``limit`` 0 announces the sleep whatever the strategy and polls
    without waiting: the reactor's epoll fd then becomes readable once
    there is something to do, which is how a foreign event loop waits
    (:meth:`shmd.client.Subscription.poll`).

    Returns whether the reactor was polled (its fds looked at).
    """
    strategy = sub.wait_strategy
    if limit != 0 and strategy.name == "spin":
        sub.spin(LOOK_INTERVAL if limit is None else min(LOOK_INTERVAL, limit))
        reactor.poll(0)
        return True
    if limit != 0 and strategy.name == "backoff":
        spin, yield_ = strategy.spin_seconds, strategy.yield_seconds
        if limit is not None:
            spin = min(spin, limit)
            yield_ = min(yield_, max(0.0, limit - spin))
        if sub.spin(spin, yield_):
            return False
    sleep = sub.prepare_sleep()
    if sleep == 0.0:
        return False
    if sleep is None or (limit is not None and limit < sleep):
        sleep = limit
    reactor.poll(sleep)
    return True


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
        self,
        sub: Subscriber,
        on_records: Callable[[list[RawRecord]], None],
        *,
        reactor: Reactor | None = None,
        batch: int = 4096,
        copy: bool = True,
        tick: Callable[[], float | None] | None = None,
    ) -> None:
        if sub.eventfd is None and sub.wait_strategy.sleeps:
            raise ValueError(
                "Failed to build a reader loop since the subscriber has no eventfd "
                f"(its {sub.wait_strategy.name} strategy sleeps on one)"
            )
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
        if sub.eventfd is not None:
            self.reactor.add(sub.eventfd.fileno(), self._on_eventfd)

    def _on_eventfd(self, events: int) -> None:
        """Nothing to do: the wake-up only had to end the epoll_wait.

        The counter stays readable (level-triggered) until the next
        prepare_sleep drains it, which is before this loop can sleep again.
        """

    def stop(self) -> None:
        """Make :meth:`run` return STOPPED at its next turn."""
        self._stopped = True

    def drain(self, until: float | None = None) -> int:
        """Deliver everything committed so far; returns records delivered.

        With ``until`` (a time.monotonic() value), return once it has
        passed even if records keep coming: a writer faster than this
        reader would otherwise keep it here for good.
        """
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
            if until is not None and time.monotonic() >= until:
                return total

    def run(self) -> LoopExit:
        """Run until drained after the writer went inactive, or stopped.

        Waits by the subscriber's :attr:`~Subscriber.wait_strategy`: ``sleep``
        in the reactor's epoll; ``spin`` busy-polls (the reactor's other fds
        are looked at every :data:`LOOK_INTERVAL`, with a zero-timeout
        poll); ``backoff`` spins and yields for its times, then sleeps in
        the epoll.  Whatever the strategy, a loop kept busy by records looks
        at the other fds every :data:`LOOK_INTERVAL` too, so a signal or the
        writer's hang-up is handled while records keep coming.
        """
        sub = self.sub
        next_look = time.monotonic() + LOOK_INTERVAL
        while not self._stopped:
            limit = self.tick() if self.tick is not None else None
            self.drain(next_look)
            if self._stopped:
                break
            if not sub.active:
                # The flag is cleared only after the writer's last commit:
                # one more drain after seeing it delivers everything.
                self.drain()
                return LoopExit.DRAINED
            if time.monotonic() >= next_look:
                self.reactor.poll(0)
            elif not wait_turn(sub, self.reactor, limit):
                continue
            next_look = time.monotonic() + LOOK_INTERVAL
        return LoopExit.STOPPED

    def close(self) -> None:
        """Unregister the eventfd (and close the reactor if this loop made it)."""
        if self.sub.eventfd is not None and not self.sub.eventfd.closed:
            self.reactor.remove(self.sub.eventfd.fileno())
        if self._own_reactor:
            self.reactor.close()


async def aiter_records(
    sub: Subscriber,
    *,
    batch: int = 4096,
    copy: bool = True,
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
