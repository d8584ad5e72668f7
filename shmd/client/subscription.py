"""One program's subscription to the bus: :func:`connect` and :class:`Subscription`.

A subscription is the whole life of one reader: it dials the writer's
control socket, says Hello, maps the segment from the Welcome, and reads,
waiting by its strategy while nothing is new.  It watches the control
connection (the writer's Detach, or its death) and the writer's *lifeline*
in one epoll with the eventfd, so it learns at once when the writer stops,
dies or evicts it; when the writer stops or dies and a successor comes up
(``systemctl restart``, ``Restart=on-failure``), it resumes at its cursor
within ``timeout``, losing nothing under ``block``.  The reader daemon
(``shm-reader@NAME``) is this class plus a sink, signals and timers.

Ways to read, all on one engine (:meth:`Subscription._idle`):

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
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Literal

import structlog
from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor
from shmd.bus.layout import ALL_TOPICS, RawRecord, Record
from shmd.bus.loop import LOOK_INTERVAL, wait_turn
from shmd.bus.subscriber import Subscriber
from shmd.bus.wait import WaitStrategy
from shmd.client import handshake
from shmd.client.handshake import DEFAULT_SOCKET, Options
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.fields import NO_TOPICS, TopicMap
from shmd.control.frames import ChannelError, PeerClosed
from shmd.errors import ConnectError, ReaderEvicted, SegmentClosed, TopicError, WriterGone

__all__ = ["DEFAULT_SOCKET", "Options", "Subscription", "connect"]

#: Why a session (one connection to one writer) ended.
SessionEnd = Literal["drained", "writer_lost", "evicted", "stopped"]


def _silent() -> FilteringBoundLogger:
    """A logger that drops everything: a library logs only when asked to."""
    # Every level below critical is a no-op method; critical (never logged
    # here) would go to a logger that returns it unprinted.
    wrapper = structlog.make_filtering_bound_logger(logging.CRITICAL)
    return structlog.wrap_logger(  # type: ignore[no-any-return]  # wrap_logger is typed Any
        structlog.ReturnLogger(), processors=[], wrapper_class=wrapper
    )


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


class Subscription:
    """One reader on the bus, for as long as the bus runs (see the module docstring).

    Not thread-safe: one thread reads.  Use it as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, opts: Options, *, log: FilteringBoundLogger | None = None) -> None:
        self.options = opts
        self.log = log if log is not None else _silent()
        #: The epoll of the eventfd, the control connection and the
        #: lifeline; the daemon adds its signal pipe and timers.
        self.reactor = Reactor()
        self.sub: Subscriber | None = None
        self.conn: Connection | None = None
        #: The read end of the writer's lifeline (see protocol.Welcome).
        self.lifeline: OwnedFd | None = None
        self.welcome: protocol.Welcome | None = None
        #: Why the last session ended, or the stop's reason (SIGTERM, ...).
        self.stop_reason: str | None = None
        #: stop() was called: finish what is committed, detach, end.
        self.stopping = False
        self.ended = False
        self._end: SessionEnd | None = None
        #: A stop delivers what was committed when it was asked, then ends.
        self._stop_at = 0
        self._saw_inactive = False
        self._lifeline_hup = False
        self._woken = False
        #: poll()/async mode: the eventfd is drained when it fires, so the
        #: epoll fd is readable only while there is something to do.
        self._drain_eventfd = False
        #: The pid in the segment's header when we attached (see _await_writer).
        self._writer_pid = 0
        self._next_look = 0.0
        #: Durable: records below this seq were handed to a previous process
        #: of ours, and count as redelivered when they come (0: none left).
        self._redeliver_until = 0
        self._redelivered = 0

    # -- attaching ---------------------------------------------------------------------

    def open(self) -> Subscription:
        """Attach (retrying while the socket is missing or refusing, up to the timeout)."""
        if self.sub is not None:
            raise ValueError("Failed to open the subscription since it is open already")
        self._attach(old=None, deadline=time.monotonic() + self.options.timeout)
        return self

    def _attach(self, *, old: Subscriber | None, deadline: float) -> None:
        # A successful resume closes the old subscriber's eventfd: unregister
        # it first (epoll keys a registration on the open file description,
        # and the restarted writer hands us the *same* eventfd from its fd
        # store, so a closed-while-registered fd would keep firing under its
        # old number).
        old_efd = old.eventfd.fileno() if old is not None and old.eventfd is not None else -1
        if old_efd >= 0:
            self.reactor.remove(old_efd)
        try:
            got = handshake.attach(self.options, self.log, old=old, deadline=deadline)
        except BaseException:
            if old_efd >= 0:
                self.reactor.add(old_efd, self._on_eventfd)
            raise
        if self.conn is not None:
            if not self.conn.closed:
                self.reactor.remove(self.conn.fileno())
            self.conn.close()
        if self.lifeline is not None:
            if not self.lifeline.closed:
                self.reactor.remove(self.lifeline.fileno())
            self.lifeline.close()
        self.conn, self.sub, self.lifeline = got.conn, got.sub, got.lifeline
        self.welcome, self._writer_pid = got.welcome, got.sub.segment.writer_pid
        if old is None:
            self._redeliver_until = got.welcome.redeliver_until
        self._end, self._saw_inactive, self._lifeline_hup = None, False, False
        assert got.sub.eventfd is not None  # a Welcome always hands one over
        self.reactor.add(got.sub.eventfd.fileno(), self._on_eventfd)
        self.reactor.add(got.conn.fileno(), self._on_control)
        self.reactor.add(got.lifeline.fileno(), self._on_lifeline, 0)  # 0: hang-up only
        if not self.options.durable:
            # No Python frame per read: the subscriber's own (bound C) methods.
            self.read_batch = got.sub.read_batch  # type: ignore[method-assign]  # bound C method
            self.read_into = got.sub.read_into  # type: ignore[method-assign]  # bound C method

    def _current(self) -> Subscriber:
        sub = self.sub
        if sub is None:
            raise SegmentClosed("Failed to read since the subscription is not open")
        return sub

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

    # -- foreign event loops -----------------------------------------------------------

    def fileno(self) -> int:
        """An fd that is readable when :meth:`poll` has something to do (an epoll fd).

        Register it for reading with any event loop; when it is readable,
        call :meth:`poll` until it returns an empty list.
        """
        return self.reactor.fileno()

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

    # -- the engine ----------------------------------------------------------------------

    def _idle(self, timeout: float | None) -> bool:
        """A read found nothing: end the session, or wait by the strategy.

        True: read again (records may be there, the timeout passed, or we
        resumed on a restarted writer); False: the subscription ended.
        """
        if self.ended:
            return False
        sub = self._current()
        if self._end is None and not sub.active:
            if not self._saw_inactive:
                # The flag is cleared only after the writer's last commit:
                # one more read after seeing it delivers everything.
                self._saw_inactive = True
                return True
            self._end = "drained"
        end = self._end
        if (
            end != "evicted"
            and sub.available() > 0
            and (end != "stopped" or sub.cursor < self._stop_at)
        ):
            return True  # committed records first, whatever ends the session
        if self._end is not None:
            return self._finish_session(self._end)
        limit = self.reactor.run_timers()
        if timeout is not None and (limit is None or timeout < limit):
            limit = timeout
        if wait_turn(sub, self.reactor, limit):
            self._next_look = time.monotonic() + LOOK_INTERVAL
        return True

    def _look(self) -> None:
        """Between batches: handle what the other fds and the timers have."""
        self.reactor.poll(0)
        self._next_look = time.monotonic() + LOOK_INTERVAL

    def _finish_session(self, end: SessionEnd) -> bool:
        sub = self._current()
        fields = {
            "delivered": sub.delivered,
            "lost": sub.lost,
            "seq": sub.cursor,
            "generation": sub.segment.generation,
        }
        if self.options.durable:
            fields["redelivered"] = self._redelivered
        if end == "stopped":
            self.log.info("drained", reason=self.stop_reason, **fields)
            self.detach(protocol.DetachCode.NORMAL, self.stop_reason or "stopped")
            self.ended = True
            return False
        if end == "evicted":
            self.stop_reason = "evicted"
            self.ended = True
            raise ReaderEvicted("Failed to read on since the writer evicted this reader")
        if end == "drained":
            self.log.info("writer_inactive", generation=fields["generation"], seq=fields["seq"])
            self.log.info("drained", **fields)
            self.detach(protocol.DetachCode.NORMAL, "drained")
        if self._await_writer():
            return True
        self.ended = True
        if self.stopping or end == "drained":
            self.stop_reason = self.stop_reason or "writer_stopped"
            return False
        self.stop_reason = "writer_lost"
        raise WriterGone(
            "Failed to read on since the writer vanished without clearing the active flag "
            f"and no writer came back within {self.options.timeout:g} s"
        )

    def stop(self, reason: str = "stopped") -> None:
        """Deliver what is committed by now, detach, and end (a signal's handler may call it)."""
        self.stop_reason = reason
        self.stopping = True
        if self.sub is not None and self._end is None:
            self._end = "stopped"
            self._stop_at = self.sub.cursor + self.sub.available()

    # -- the reactor's handlers ------------------------------------------------------------

    def _on_eventfd(self, events: int) -> None:
        """Woken: the epoll_wait returned, which is all a blocking read needs.

        The counter is drained by the next prepare_sleep, before the next
        sleep; in poll() mode it is drained here, or a level-triggered
        foreign loop would see our epoll fd readable on every turn.
        """
        self._woken = True
        if self._drain_eventfd:
            sub = self.sub
            if sub is not None and sub.eventfd is not None:
                try:
                    os.read(sub.eventfd.fileno(), 8)
                except BlockingIOError:
                    pass

    def _on_control(self, events: int) -> None:
        assert self.conn is not None and self.sub is not None
        try:
            for frame in self.conn.on_readable():
                with frame:
                    msg = protocol.decode(frame.body, len(frame.fds))
                if isinstance(msg, protocol.Detach):
                    self.log.info("writer_detach", code=msg.code.name.lower(), reason=msg.reason)
                    if msg.code == protocol.DetachCode.EVICTED:
                        self._end = "evicted"
        except (PeerClosed, ChannelError, protocol.ProtocolError) as exc:
            self.reactor.remove(self.conn.fileno())
            self.conn.close()
            if self.sub.active and self._end is None:
                # The writer died (or broke the protocol) without clearing
                # the flag: what is committed is still valid and gets
                # drained; then we wait for a restarted writer (or end).
                self._end = "writer_lost"
                self.log.error(
                    "writer_lost",
                    generation=self.sub.segment.generation,
                    writer_pid=self.sub.segment.writer_pid,
                    seq=self.sub.cursor,
                    error=str(exc),
                )

    def _on_lifeline(self, events: int) -> None:
        """The lifeline hung up: no writer holds the bus, and none is being restarted."""
        self._lifeline_hup = True
        if self.lifeline is not None:
            self.reactor.remove(self.lifeline.fileno())
        if self.sub is not None and self.sub.active and self._end is None:
            self._end = "writer_lost"

    # -- a restarted writer --------------------------------------------------------------

    def _await_writer(self) -> bool:
        """Wait for a restarted writer and resume with it; False when none comes.

        Two signs tell a successor: a wake-up through our (stored) eventfd,
        and its pid in the old segment's header, which it writes before it
        wakes anyone (adopting in place, or by copy).  The header is needed
        because a slow reader may have taken the successor's wake-up
        together with the old writer's shutdown wake-up in one eventfd
        read.  Once the old writer has closed our connection (see
        :func:`handshake.hang_up`) every wake-up of its own is in, so what
        is pending then is dropped, and any later wake-up is a successor's.
        """
        sub = self._current()
        if self.conn is not None and not self.conn.closed:
            self.reactor.remove(self.conn.fileno())
            handshake.hang_up(self.conn, self.options.handshake_timeout)
        timeout = self.options.timeout
        deadline = time.monotonic() + timeout
        self._drain_wakeups()
        self.log.info(
            "awaiting_writer", timeout=timeout, seq=sub.cursor, generation=sub.segment.generation
        )
        ready = self._writer_changed()
        pause = 0.05
        failures = 0
        while True:
            if not ready and not self._wait_for_wake(deadline):
                return False
            try:
                self._attach(old=self.sub, deadline=deadline)
            except (ConnectError, ChannelError, protocol.ProtocolError) as exc:
                failures += 1
                if failures == 1:  # the retries say nothing new
                    self.log.warning("resume_failed", error=str(exc))
            else:
                return True
            # A successor that is up but did not take us (yet) gets another
            # try after a pause; otherwise only a new wake-up brings one.
            ready = self._writer_changed()
            if ready:
                self._wait_for_wake(min(deadline, time.monotonic() + pause))
                pause = min(pause * 2, 1.0)
                if self.stopping or self._lifeline_hup or time.monotonic() >= deadline:
                    return False

    def _drain_wakeups(self) -> None:
        sub = self._current()
        assert sub.eventfd is not None
        try:
            os.read(sub.eventfd.fileno(), 8)
        except BlockingIOError:
            pass
        self._woken = False

    def _writer_changed(self) -> bool:
        """Whether another writer than the one we attached to stamped our segment."""
        return self._current().segment.writer_pid != self._writer_pid

    def _wait_for_wake(self, deadline: float) -> bool:
        """Sleep until our eventfd fires (True), or the lifeline hangs up, we are stopped
        or the deadline passes (False)."""
        left = deadline - time.monotonic()
        if self.stopping or self._lifeline_hup or left <= 0:
            return False
        self._drain_wakeups()
        self.reactor.run_until(lambda: self._woken or self.stopping or self._lifeline_hup, left)
        return self._woken and not self.stopping

    # -- leaving -------------------------------------------------------------------------

    def detach(self, code: protocol.DetachCode, reason: str) -> None:
        """Tell the writer we leave (best effort), so it logs a detach, not a loss.

        A durable reader leaving a running bus suspends instead: the writer
        keeps its entry for the next process of it.
        """
        if self.conn is None or self.conn.closed:
            return
        if (
            self.options.durable
            and code == protocol.DetachCode.NORMAL
            and self.sub is not None
            and self.sub.active
        ):
            code = protocol.DetachCode.SUSPEND
        if self.sub is not None:
            # A one-record read may have left its cursor for later: store it
            # now, so the writer's reader_detached reports every record read.
            self.sub.release()
        try:
            self.conn.send(protocol.Detach(code, reason).encode(), timeout=1.0)
        except ChannelError:
            pass  # the writer is gone already: nothing to tell

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

    @property
    def cursor(self) -> int:
        """The seq this reader reads next."""
        return self._current().cursor

    @property
    def topics(self) -> TopicMap:
        """The writer's topic names (``segment.topics``), from the Welcome."""
        return self.welcome.topics if self.welcome is not None else NO_TOPICS

    def topic_name(self, topic: int) -> str | None:
        """The name of topic id ``topic`` on this bus, None if it has none."""
        return self.topics.name(topic)

    @property
    def generation(self) -> int:
        """The segment's generation (a new one when a writer could not adopt the old segment)."""
        return self._current().segment.generation

    def close(self) -> None:
        """Detach if still attached, and release every fd and mapping; idempotent.

        Never unlinks anything: the writer owns the segment.
        """
        if self.sub is not None and not self.ended and self.conn is not None:
            self.detach(protocol.DetachCode.NORMAL, self.stop_reason or "closed")
        self.ended = True
        # Unregister before closing: epoll keys a registration on the open
        # file description, and a restarted writer hands us the *same*
        # eventfd (from its fd store).
        self.reactor.close()
        if self.conn is not None:
            self.conn.close()
        if self.lifeline is not None:
            self.lifeline.close()
        if self.sub is not None:
            self.sub.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
