"""A reader's way onto the bus: dial the writer, say Hello, map what the Welcome hands over.

:func:`attach_to_writer` is what :meth:`shmd.daemons.reader.ReaderDaemon.connect`
does; its steps are functions: :func:`dial` (retrying while no writer
listens yet), :func:`hello` (where to start, or to resume),
:func:`exchange_hello`, :func:`answer` (the Welcome, or :class:`ReaderExit`
for a Refuse) and :func:`subscribe` (the segment mapped from the Welcome's
fds).  :func:`hang_up` ends a connection the writer is closing.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd.bus.subscriber import Subscriber
from shmd.bus.wait import WaitStrategy
from shmd.config import Config, ReaderSettings
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import SOCKET_TYPES, ChannelError, Frame, PeerClosed, WireError
from shmd.control.listener import connect
from shmd.daemons import logs
from shmd.daemons.process import EXIT_FAILURE, EXIT_NOPERMISSION

_RETRY_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}


class ReaderExit(Exception):
    """Leave the daemon with this status after logging ``event``."""

    def __init__(self, status: int, event: str, message: str, **fields: object) -> None:
        super().__init__(message)
        self.status = status
        self.event = event
        self.fields = fields


@dataclass
class Attached:
    """A reader on the bus: its connection, subscription, lifeline and the Welcome."""

    conn: Connection
    sub: Subscriber
    #: The read end of the writer's lifeline (see protocol.Welcome).
    lifeline: OwnedFd
    welcome: protocol.Welcome


def attach_to_writer(
    cfg: Config,
    settings: ReaderSettings,
    instance: str,
    log: FilteringBoundLogger,
    *,
    old: Subscriber | None,
    deadline: float,
) -> Attached:
    """Connect (retrying until ``deadline``), Hello, Welcome, map the segment.

    With ``old``, ask to continue at its cursor in its generation (after
    the writer restarted); the new mapping replaces it (closed) and the
    counters carry over.  On failure the new connection is closed.
    """
    conn = dial(cfg, deadline)
    try:
        frame = exchange_hello(conn, hello(instance, settings, old), cfg.control.handshake_timeout)
        msg, fds = answer(frame)
        sub, lifeline = subscribe(msg, fds, old, cfg, log, wait=settings.wait_strategy)
    except BaseException:
        conn.close()
        raise
    log.info(
        logs.ATTACHED,
        generation=msg.generation,
        index=msg.reader_index,
        seq=msg.start_cursor,
        capacity=msg.capacity,
        slot_size=msg.slot_size,
        policy=msg.policy.name.lower().replace("_", "-"),
        writer_pid=sub.segment.writer_pid,
        resumed=msg.resumed,
        wait=sub.wait_strategy.label,
    )
    return Attached(conn, sub, lifeline, msg)


def dial(cfg: Config, deadline: float) -> Connection:
    """Connect to the control socket, retrying while it is missing or refusing."""
    ctl = cfg.control
    delay = 0.05
    while True:
        try:
            return connect(
                ctl.socket,
                SOCKET_TYPES[ctl.type],
                timeout=ctl.handshake_timeout,
                max_message=ctl.max_message,
            )
        except WireError as exc:
            cause = exc.__cause__ or exc.__context__
            retry = isinstance(cause, OSError) and cause.errno in _RETRY_ERRNOS
            if not retry and "No such file" not in str(exc) and "refused" not in str(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise ReaderExit(EXIT_FAILURE, logs.WRITER_LOST, str(exc)) from None
            # Not a synchronisation stand-in: a bounded back-off between
            # attempts while no writer is listening yet.
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def hello(instance: str, settings: ReaderSettings, old: Subscriber | None) -> protocol.Hello:
    """Our Hello: where to start, or (``old``) where to resume."""
    if old is not None:
        return protocol.Hello(
            instance=instance,
            pid=os.getpid(),
            topics=settings.topic_mask,
            start=protocol.StartCode.RESUME,
            resume_cursor=old.cursor,
            last_generation=old.segment.generation,
            wait=protocol.WaitCode(settings.wait_strategy.code),
        )
    start = protocol.StartCode.OLDEST if settings.start == "oldest" else protocol.StartCode.LATEST
    return protocol.Hello(
        instance=instance,
        pid=os.getpid(),
        topics=settings.topic_mask,
        start=start,
        wait=protocol.WaitCode(settings.wait_strategy.code),
    )


def exchange_hello(conn: Connection, msg: protocol.Hello, timeout: float) -> Frame:
    """Send the Hello and return the writer's answer (a Welcome or a Refuse)."""
    try:
        conn.send(msg.encode(), timeout=timeout)
    except PeerClosed:
        pass  # refused before our Hello arrived (not allowed): its Refuse is queued
    try:
        return conn.recv(timeout=timeout)
    except PeerClosed:
        pass
    # Linux: a writer that refuses and closes with our Hello still unread
    # in its queue makes our next recv fail with ECONNRESET although its
    # Refuse is queued here; the error is reported (and cleared) first,
    # so one more recv returns the Refuse, or EOF.
    try:
        return conn.recv(timeout=timeout)
    except PeerClosed:
        raise ReaderExit(
            EXIT_FAILURE,
            logs.WRITER_LOST,
            "Failed to attach since the writer closed the connection during the handshake",
        ) from None


def answer(frame: Frame) -> tuple[protocol.Welcome, list[int]]:
    """The Welcome and its fds, or ReaderExit for a Refuse or anything else."""
    fds = [f.detach() for f in frame.fds]
    try:
        msg = protocol.decode(frame.body, len(fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if isinstance(msg, protocol.Refuse):
        status = (
            EXIT_NOPERMISSION if msg.code == protocol.RefuseCode.NOT_ALLOWED else (EXIT_FAILURE)
        )
        raise ReaderExit(
            status,
            "refused",
            f"Failed to attach since the writer refused: {msg.reason}",
            code=msg.code.name.lower(),
        )
    if not isinstance(msg, protocol.Welcome):
        for fd in fds:
            os.close(fd)
        raise ReaderExit(
            EXIT_FAILURE,
            "refused",
            f"Failed to attach since the writer answered with a {type(msg).__name__}",
        )
    return msg, fds


def subscribe(
    msg: protocol.Welcome,
    fds: list[int],
    old: Subscriber | None,
    cfg: Config,
    log: FilteringBoundLogger,
    *,
    wait: WaitStrategy | None = None,
) -> tuple[Subscriber, OwnedFd]:
    """Map the segment from the Welcome's fds; on a resume replace (and close) ``old``.

    Returns the subscriber and the lifeline's read end.
    """
    eventfd, segfd, lifeline = OwnedFd(fds[0]), OwnedFd(fds[1]), OwnedFd(fds[2])
    try:
        new = Subscriber.attach(
            index=msg.reader_index,
            fd=segfd,
            eventfd=eventfd,
            mutex_timeout=cfg.segment.mutex_timeout,
            wait=wait,
        )
    except BaseException:
        for f in (eventfd, segfd, lifeline):
            f.close()
        raise
    if new.segment.generation != msg.generation:
        new.close()
        lifeline.close()
        raise ReaderExit(
            EXIT_FAILURE,
            "refused",
            "Failed to attach since the segment fd is of another generation than the Welcome says",
        )
    if old is not None:
        # A writer that no longer held our entry (we came back after its
        # reconnect_grace) started a new one at the oldest record the
        # ring still holds: what lies between is lost, and counted.
        skipped = max(0, msg.start_cursor - old.cursor) if msg.resumed else 0
        new.carry_over(old.delivered, old.lost + skipped)
        if not msg.resumed:
            log.warning(
                "generation_changed",
                generation=msg.generation,
                old_generation=old.segment.generation,
                seq=msg.start_cursor,
                reason="the restarted writer could not adopt the old segment; "
                "reading starts over in the new generation",
            )
        old.close()
    return new, lifeline


def hang_up(conn: Connection, timeout: float) -> None:
    """Close the control connection once the writer has closed its end.

    The writer closes a drained reader's connection only after it cleared
    the active flag and wrote every reader's eventfd; waiting for that
    close (at most ``timeout``, the handshake timeout) means no wake-up of
    its shutdown can arrive after we start waiting for its successor, and
    be taken for the successor's.
    """
    if conn.closed:
        return
    try:
        while True:
            conn.recv(timeout=timeout).close()
    except (PeerClosed, ChannelError, OSError):
        pass  # closed (or silent for too long): either way we are done with it
    conn.close()
