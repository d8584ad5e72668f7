"""One reader's session engine: attach, wait, follow the writer, resume, detach.

:class:`Session` is what every way of reading a
:class:`~shmd.client.subscription.Subscription` runs on.  It dials the
writer's control socket, says Hello and maps the segment from the Welcome
(:mod:`shmd.client.handshake`); it watches the control connection (the
writer's Detach, or its death) and the writer's *lifeline* in one epoll
with the eventfd, so it learns at once when the writer stops, dies or
evicts it; when the writer stops or dies and a successor comes up
(``systemctl restart``, ``Restart=on-failure``), it resumes at its cursor
within ``timeout``, losing nothing under ``block``.  A read that finds
nothing calls :meth:`Session._idle`: end the session, or wait by the
strategy.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal, Self

import structlog
from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor
from shmd.bus.loop import LOOK_INTERVAL, wait_turn
from shmd.bus.subscriber import Subscriber
from shmd.client import handshake
from shmd.client.handshake import Options
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.fields import NO_TOPICS, TopicMap
from shmd.control.frames import ChannelError, PeerClosed
from shmd.errors import ConnectError, ReaderEvicted, SegmentClosed, WriterGone

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


class Session:
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

    def open(self) -> Self:
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
        self._bind(got.sub)

    def _bind(self, sub: Subscriber) -> None:
        """A new subscriber is attached: the ways to read may bind its methods."""

    def _current(self) -> Subscriber:
        sub = self.sub
        if sub is None:
            raise SegmentClosed("Failed to read since the subscription is not open")
        return sub

    # -- foreign event loops -----------------------------------------------------------

    def fileno(self) -> int:
        """An fd that is readable when :meth:`poll` has something to do (an epoll fd).

        Register it for reading with any event loop; when it is readable,
        call :meth:`poll` until it returns an empty list.
        """
        return self.reactor.fileno()

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
