"""A client's way onto the bus: dial the writer, say Hello, map what the Welcome hands over.

:class:`~shmd.client.subscription.Subscription` runs these steps to attach,
and again to resume after the writer restarted: :func:`dial` (retrying
while no writer listens yet), :func:`hello` (where to start, or to resume),
:func:`exchange_hello`, :func:`answer` (the Welcome, or the error a Refuse
means) and :func:`subscribe` (the segment mapped from the Welcome's fds).
:func:`hang_up` ends a connection the writer is closing.

Every failure a user can meet is a :class:`~shmd.errors.ConnectError` whose
message says what to do.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import time
from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd.bus.layout import ALL_TOPICS
from shmd.bus.subscriber import Subscriber
from shmd.bus.wait import WaitStrategy
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.fields import U32_MAX
from shmd.control.frames import (
    DEFAULT_MAX_MESSAGE,
    SOCKET_TYPES,
    ChannelError,
    Frame,
    PeerClosed,
    WireError,
)
from shmd.control.listener import connect
from shmd.errors import BusUnavailable, ConnectError, NotAdmitted, Refused

#: Where the shipped units put the writer's control socket.
DEFAULT_SOCKET = "/run/shmd/control.sock"

#: connect() errnos that mean "no writer listens yet": dial retries them.
_RETRY_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}


@dataclass(frozen=True)
class Options:
    """What a client asks of the writer, and how long it waits for one."""

    #: The writer's control socket.
    socket: str = DEFAULT_SOCKET
    #: This reader's name: its identity in the segment, the writer's logs and shmctl.
    name: str = field(default_factory=lambda: f"client-{os.getpid()}")
    #: The topic mask (bit t = topic t); with ``topic_names``, may be 0.
    topics: int = ALL_TOPICS
    #: Topics by name, resolved by the writer (segment.topics); added to the mask.
    topic_names: tuple[str, ...] = ()
    #: "latest" (records published from now on) or "oldest" (whatever the ring still holds).
    start: str = "latest"
    wait: WaitStrategy = field(default_factory=WaitStrategy.sleep)
    #: How long to keep dialling a socket that is missing or refusing, and
    #: to wait for a restarted writer (seconds).
    timeout: float = 10.0
    #: The longest one step of the handshake may take (seconds).
    handshake_timeout: float = 2.0
    #: "seqpacket" or "stream", as the writer's control.type.
    socket_type: str = "seqpacket"
    max_message: int = DEFAULT_MAX_MESSAGE
    #: How long a reader waits for the shared mutex (seconds).
    mutex_timeout: float = 0.5
    #: Durable: how long the writer keeps this reader's entry and cursor after
    #: its process went, for the next process of this name (seconds; 0: not).
    durable: float = 0.0

    def __post_init__(self) -> None:
        try:
            protocol.Hello(
                instance=self.name,
                pid=os.getpid(),
                topics=self.topics,
                topic_names=self.topic_names,
            )
        except protocol.ProtocolError as exc:
            raise ValueError(f"Failed to set up a client since {exc.reason}") from None
        if self.start not in ("latest", "oldest"):
            raise ValueError(
                f'Failed to set up a client since start must be "latest" or "oldest" '
                f"(got {self.start!r})"
            )
        if self.socket_type not in SOCKET_TYPES:
            raise ValueError(
                f"Failed to set up a client since the socket type {self.socket_type!r} is not "
                f"one of {', '.join(sorted(SOCKET_TYPES))}"
            )
        for what in ("timeout", "handshake_timeout", "mutex_timeout", "durable"):
            value = getattr(self, what)
            if not isinstance(value, int | float) or not value >= 0:  # NaN fails too
                raise ValueError(
                    f"Failed to set up a client since {what} must be a number of seconds >= 0 "
                    f"(got {value!r})"
                )
        if self.durable > U32_MAX / 1000:
            raise ValueError(
                f"Failed to set up a client since durable must be at most "
                f"{U32_MAX // 1000} s (got {self.durable!r})"
            )


@dataclass
class Attached:
    """A client on the bus: its connection, subscription, lifeline and the Welcome."""

    conn: Connection
    sub: Subscriber
    #: The read end of the writer's lifeline (see protocol.Welcome).
    lifeline: OwnedFd
    welcome: protocol.Welcome


def attach(
    opts: Options,
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
    conn = dial(opts, deadline)
    try:
        frame = exchange_hello(conn, hello(opts, old), opts.handshake_timeout)
        msg, fds = answer(frame, opts.socket)
        sub, lifeline = subscribe(msg, fds, old, opts, log)
    except BaseException:
        conn.close()
        raise
    named: dict[str, int] = {}
    if msg.redeliver_until:
        named["redeliver_until"] = msg.redeliver_until
    log.info(
        "attached",
        generation=msg.generation,
        index=msg.reader_index,
        seq=msg.start_cursor,
        capacity=msg.capacity,
        slot_size=msg.slot_size,
        policy=msg.policy.name.lower().replace("_", "-"),
        writer_pid=sub.segment.writer_pid,
        resumed=msg.resumed,
        wait=sub.wait_strategy.label,
        **named,
    )
    return Attached(conn, sub, lifeline, msg)


def dial(opts: Options, deadline: float) -> Connection:
    """Connect to the control socket, retrying while it is missing or refusing."""
    delay = 0.05
    while True:
        try:
            return connect(
                opts.socket,
                SOCKET_TYPES[opts.socket_type],
                timeout=opts.handshake_timeout,
                max_message=opts.max_message,
            )
        except WireError as exc:
            # listener.connect raises "from None" inside its except block:
            # the OSError is still the context, just not shown.
            cause = exc.__cause__ or exc.__context__
            code = cause.errno if isinstance(cause, OSError) else 0
            if code in (errno.EACCES, errno.EPERM):
                raise NotAdmitted(_no_access(opts.socket)) from None
            if code not in _RETRY_ERRNOS:
                raise ConnectError(str(exc)) from None
            if time.monotonic() + delay > deadline:
                waited = f" (tried for {opts.timeout:g} s)" if opts.timeout else ""
                raise BusUnavailable(f"{exc}{waited}") from None
            # Not a synchronisation stand-in: a bounded back-off between
            # attempts while no writer is listening yet.
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _no_access(path: str) -> str:
    """Why this user may not open the socket, with who may."""
    prefix = f"Failed to connect to {path} since this user may not open it"
    try:
        st = os.stat(path)
    except OSError:
        return f"{prefix} (permission denied on the way to it)"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    return (
        f"{prefix} (owned by {owner}:{group}, mode {mode:04o}): run it as a member of "
        f"group {group}, or change control.mode"
    )


def hello(opts: Options, old: Subscriber | None) -> protocol.Hello:
    """Our Hello: where to start, or (``old``) where to resume."""
    wait = protocol.WaitCode(opts.wait.code)
    durable_ms = round(opts.durable * 1000)
    if old is not None:
        return protocol.Hello(
            instance=opts.name,
            pid=os.getpid(),
            topics=opts.topics,
            start=protocol.StartCode.RESUME,
            resume_cursor=old.cursor,
            last_generation=old.segment.generation,
            wait=wait,
            topic_names=opts.topic_names,
            durable_ms=durable_ms,
        )
    start = protocol.StartCode.OLDEST if opts.start == "oldest" else protocol.StartCode.LATEST
    return protocol.Hello(
        instance=opts.name,
        pid=os.getpid(),
        topics=opts.topics,
        start=start,
        wait=wait,
        topic_names=opts.topic_names,
        durable_ms=durable_ms,
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
        raise BusUnavailable(
            "Failed to attach since the writer closed the connection during the handshake"
        ) from None


def answer(frame: Frame, path: str) -> tuple[protocol.Welcome, list[int]]:
    """The Welcome and its fds, or the error a Refuse (or anything else) means."""
    fds = [f.detach() for f in frame.fds]
    try:
        msg = protocol.decode(frame.body, len(fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if isinstance(msg, protocol.Refuse):
        code = msg.code.name.lower()
        if msg.code == protocol.RefuseCode.NOT_ALLOWED:
            raise NotAdmitted(
                f"Failed to attach to {path} since the writer refused: {msg.reason} (it admits "
                "root, its own user, control.allowed_users and members of control.allowed_groups)"
            )
        raise Refused(f"Failed to attach since the writer refused: {msg.reason}", code)
    if not isinstance(msg, protocol.Welcome):
        for fd in fds:
            os.close(fd)
        raise ConnectError(
            f"Failed to attach since the writer answered with a {type(msg).__name__}"
        )
    return msg, fds


def subscribe(
    msg: protocol.Welcome,
    fds: list[int],
    old: Subscriber | None,
    opts: Options,
    log: FilteringBoundLogger,
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
            mutex_timeout=opts.mutex_timeout,
            wait=opts.wait,
        )
    except BaseException:
        for f in (eventfd, segfd, lifeline):
            f.close()
        raise
    if new.segment.generation != msg.generation:
        new.close()
        lifeline.close()
        raise ConnectError(
            "Failed to attach since the segment fd is of another generation than the Welcome says"
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
