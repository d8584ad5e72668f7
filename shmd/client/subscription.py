"""One program's subscription to the bus: :func:`connect` and :class:`Subscription`.

A subscription is the whole life of one reader: its engine
(:class:`~shmd.client.session.Session`: attach, wait, follow the writer,
resume, detach) and the ways to read on it, with a durable reader's
accounting.  The reader daemon (``shm-reader@NAME``) is this class plus a
sink, signals and timers.

Ways to read, all on one engine (:meth:`~shmd.client.session.Session._idle`):

* ``for rec in sub`` — :class:`~shmd.bus.layout.Record` after record;
  ends once the bus stopped and everything was read;
* :meth:`~Subscription.batches` — lists of plain tuples, as the daemon reads;
* :meth:`~Subscription.wait` with :meth:`~Subscription.read_batch` /
  :meth:`~Subscription.read_into` — for hot loops;
* :meth:`~Subscription.fileno` and :meth:`~Subscription.poll` — for any
  event loop that waits on fds (selectors, trio, Qt);
* ``async for rec in sub`` — asyncio, on those two.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Literal

from structlog.typing import FilteringBoundLogger

from shmd.bus.layout import ALL_TOPICS, RawRecord, Record
from shmd.bus.subscriber import Subscriber
from shmd.bus.wait import WaitStrategy
from shmd.client.handshake import DEFAULT_SOCKET, Options
from shmd.client.session import Session
from shmd.errors import TopicError

__all__ = ["DEFAULT_SOCKET", "Options", "Subscription", "connect"]


#: What a client subscribes to: "all", a topic (id 0..63 or name), or several.
Topics = Literal["all"] | int | str | Iterable[int | str]


def topic_mask(topics: Topics) -> tuple[int, tuple[str, ...]]:
    """The u64 mask of the ids in ``topics``, and its names (which the writer resolves)."""
    if topics == "all":
        return ALL_TOPICS, ()
    items = [topics] if isinstance(topics, int | str) else list(topics)
    if not items:
        raise TopicError("Failed to subscribe since the list of topics is empty")
    mask = 0
    names: list[str] = []
    for t in items:
        if isinstance(t, str):
            if t not in names:
                names.append(t)
        elif isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 63:
            raise TopicError(f"Failed to subscribe since {t!r} is not a topic id 0..63 or a name")
        else:
            mask |= 1 << t
    return mask, tuple(names)


def connect(
    socket: str = DEFAULT_SOCKET,
    *,
    name: str | None = None,
    topics: Topics = "all",
    start: Literal["latest", "oldest"] = "latest",
    wait: WaitStrategy | None = None,
    timeout: float = 10.0,
    handshake_timeout: float = 2.0,
    socket_type: Literal["seqpacket", "stream"] = "seqpacket",
    durable: float = 0.0,
    log: FilteringBoundLogger | None = None,
) -> Subscription:
    """Join the bus whose writer listens on ``socket``; returns an open :class:`Subscription`.

    ``name`` is this reader's identity (default ``client-<pid>``): two
    readers of one name cannot be attached at once.  ``topics`` takes ids
    and names (``segment.topics`` of the writer's config; an unknown name is
    :class:`~shmd.errors.Refused` with code ``unknown_topic``, naming the
    ones the bus has).  ``start="oldest"``
    begins with whatever the ring still holds.  ``timeout`` is how long to
    keep trying while the socket is missing or nobody listens on it, and
    how long to wait for a restarted writer later.  ``durable`` (seconds,
    at most the writer's ``writer.max_durable_grace``) makes the reader
    durable: when this process dies or closes while the bus runs, the
    writer keeps the reader's entry and cursor that long, and the next
    process of the same ``name`` resumes there; what it gets again is
    counted in :attr:`Subscription.redelivered` (docs/CLIENT.md, "Durable
    readers").  ``log`` gets the
    lifecycle events (attached, writer_lost, awaiting_writer, ...); by
    default nothing is logged.

    Raises :class:`~shmd.errors.BusUnavailable` (no writer answered within
    ``timeout``), :class:`~shmd.errors.NotAdmitted` (this user may not
    join) or another :class:`~shmd.errors.ConnectError`.
    """
    mask, names = topic_mask(topics)
    opts = Options(
        socket=socket,
        name=name if name is not None else f"client-{os.getpid()}",
        topics=mask,
        topic_names=names,
        start=start,
        wait=wait if wait is not None else WaitStrategy.sleep(),
        timeout=timeout,
        handshake_timeout=handshake_timeout,
        socket_type=socket_type,
        durable=durable,
    )
    sub = Subscription(opts, log=log)
    try:
        return sub.open()
    except BaseException:
        sub.close()
        raise


class Subscription(Session):
    """One reader on the bus: a :class:`~shmd.client.session.Session` and the ways to read it.

    Not thread-safe: one thread reads.  Use it as a context manager, or
    call :meth:`close`.
    """

    def _bind(self, sub: Subscriber) -> None:
        if not self.options.durable:
            # No Python frame per read: the subscriber's own (bound C) methods.
            self.read_batch = sub.read_batch  # type: ignore[method-assign]  # bound C method
            self.read_into = sub.read_into  # type: ignore[method-assign]  # bound C method

    # -- reading -----------------------------------------------------------------------

    def read_batch(
        self, limit: int = 4096, *, copy: bool = True, hold: bool = False
    ) -> list[RawRecord]:
        """Up to ``limit`` new records, as ``(seq, timestamp_ns, topic, payload)``; never waits.

        See :meth:`shmd.bus.subscriber.Subscriber.read_batch` (``copy=False``
        gives zero-copy views, ``hold=True`` keeps their slots from reuse
        until :meth:`release`).  Pair it with :meth:`wait`.  On a durable
        subscription a record read without ``hold`` counts as done at once
        (at-most-once); with ``hold`` it is done at :meth:`release`.
        """
        sub = self._current()
        rows = sub.read_batch(limit, copy=copy, hold=hold)
        if hold:
            sub.take(sub.cursor)
        if self._redeliver_until and rows:
            self._count_redelivered(rows)
        return rows

    def read_into(self, buffer: memoryview | bytearray, /) -> tuple[int, int, int, int] | None:
        """Copy the next record into ``buffer``; ``(seq, timestamp_ns, topic, nbytes)`` or None.

        See :meth:`shmd.bus.subscriber.Subscriber.read_into`.  Never waits.
        A durable subscription counts the record done at once (at-most-once).
        """
        got = self._current().read_into(buffer)
        if got is not None and got[0] < self._redeliver_until:
            self._redelivered += 1
        return got

    def still_valid(self, seq: int) -> bool:
        """Whether zero-copy record ``seq`` was intact until now (call after using its view)."""
        return self._current().still_valid(seq)

    def release(self) -> None:
        """Let the writer reuse the slots of records read with ``hold=True``.

        Under block a slot stays held while a view of its record (or a slice
        or numpy array of one) still lives: it goes when the last of them does.
        """
        self._current().release()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until records may be read: True (read now), False once the subscription ended.

        True comes as soon as records are committed past the cursor (or
        ``timeout`` seconds passed, or the session changed): a read after
        it may still find nothing (records of other topics, or none yet),
        and the caller waits again.  False: the bus stopped (or
        :meth:`stop` was called) and every record was delivered.  Raises
        :class:`~shmd.errors.WriterGone` when the writer died and no
        successor came within the timeout, and
        :class:`~shmd.errors.ReaderEvicted` when the writer evicted us.
        """
        sub = self._current()
        if self._end is None and sub.available() > 0:
            if time.monotonic() >= self._next_look:
                self._look()
            return True
        return self._idle(timeout)

    def batches(self, limit: int = 4096, *, copy: bool = True) -> Iterator[list[RawRecord]]:
        """Every record, in non-empty lists of plain tuples, until the subscription ends.

        Durable: a batch is done when the next one is asked for.
        """
        if not self.options.durable:
            yield from self._batches(limit, copy, hold=False)
            return
        for batch in self._batches(limit, copy, hold=True):
            sub = self._current()
            sub.take(sub.cursor)
            if self._redeliver_until:
                self._count_redelivered(batch)
            yield batch
            self._current().release()

    def _batches(self, limit: int, copy: bool, *, hold: bool) -> Iterator[list[RawRecord]]:
        while True:
            sub = self._current()
            before = sub.cursor
            batch = sub.read_batch(limit, copy=copy, hold=hold)
            if batch:
                yield batch
                if time.monotonic() >= self._next_look:
                    self._look()
            elif sub.cursor == before and not self._idle(None):
                return

    def __iter__(self) -> Iterator[Record]:
        """Every record, copied, until the subscription ends.

        Durable: a record is done when the next one is asked for.
        """
        new = tuple.__new__
        if not self.options.durable:
            for batch in self._batches(4096, True, hold=False):
                for row in batch:
                    yield new(Record, row)
            return
        for batch in self._batches(4096, True, hold=True):
            if self._redeliver_until:
                self._count_redelivered(batch)
            for row in batch:
                seq = row[0]
                self._current().take(seq + 1, seq)
                yield new(Record, row)

    def _count_redelivered(self, rows: list[RawRecord]) -> None:
        """Count the rows a previous process of ours was handed already."""
        until = self._redeliver_until
        again = sum(1 for row in rows if row[0] < until)
        self._redelivered += again
        if self._current().cursor >= until:
            self._redeliver_until = 0  # past the mark: nothing more comes again

    def poll(self, limit: int = 4096, *, copy: bool = True) -> list[Record] | None:
        """The records there are now (maybe none), without waiting; None once ended.

        After an empty list the subscription has announced its sleep (what
        the strategy, even ``spin``, does here), so :meth:`fileno` becomes
        readable once there is something to do.  While a restarted writer
        is awaited, this blocks for up to the timeout.  Durable: a list is
        done when poll() is called again.
        """
        return self._poll(limit, copy, take=True)

    def _poll(self, limit: int, copy: bool, *, take: bool) -> list[Record] | None:
        self._drain_eventfd = True
        sub = self._current()
        durable = bool(self.options.durable)
        if durable:
            sub.release()  # the caller is back: done with what it had
        new = tuple.__new__
        while True:
            before = sub.cursor
            rows = sub.read_batch(limit, copy=copy, hold=durable)
            if rows:
                if durable and take:
                    sub.take(sub.cursor)
                if self._redeliver_until:
                    self._count_redelivered(rows)
                if time.monotonic() >= self._next_look:
                    self._look()
                return [new(Record, row) for row in rows]
            if sub.cursor != before:
                continue
            self._woken = False
            if not self._idle(0):
                return None
            if self.sub is not sub:  # resumed on a restarted writer: read there
                sub = self._current()
                continue
            # Return [] only with our sleep announcement standing and
            # nothing consumed since: the eventfd handler drains what fires
            # here, so a wake-up for records of other topics, the writer
            # going inactive or a control event seen by this poll would
            # otherwise leave the epoll fd quiet with nobody announced.
            if self._woken or self._end is not None or not sub.active or sub.available():
                continue
            return []

    async def __aiter__(self) -> AsyncIterator[Record]:
        """Every record, for asyncio: waits with ``loop.add_reader`` on :meth:`fileno`."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self.fileno()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                ready.clear()
                records = self._poll(4096, True, take=False)
                if records is None:
                    return
                if not records:
                    await ready.wait()
                    continue
                for rec in records:
                    if self.options.durable:  # done with the one before
                        self._current().take(rec.seq + 1, rec.seq)
                    yield rec
        finally:
            loop.remove_reader(fd)

    # -- state -----------------------------------------------------------------------------

    @property
    def delivered(self) -> int:
        """Records delivered to this program, across writer restarts."""
        return self._current().delivered

    @property
    def lost(self) -> int:
        """Records this reader never got (overwritten under drop-oldest, or skipped on resume)."""
        return self._current().lost

    @property
    def redelivered(self) -> int:
        """Durable: records delivered again that a previous process of this reader was handed."""
        return self._redelivered

    @property
    def lag(self) -> int:
        """Records committed past the cursor (some may be of other topics)."""
        return self._current().available()
