"""The writer's control server: the listener, its peers and what they ask for.

Each connection is a :class:`Peer`: it must say Hello (a reader) or Publish
(``shmctl publish``) within ``control.handshake_timeout``; a reader then
gets its eventfd, the segment fd and the lifeline's read end in the
Welcome, and the connection stays open as the liveness channel both ways:
a Detach (or a hang-up) frees the reader's entry, and the writer tells an
evicted reader so with a Detach of its own.  The server runs on the
writer's loop; the writer (:class:`ServerHost`) owns the segment and says
when it is shutting down.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor, Timer
from shmd.bus.layout import ALL_TOPICS, ReaderEntry
from shmd.bus.publisher import Publisher, ReaderHandle
from shmd.config import Config
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import SOCKET_TYPES, ChannelError, PeerClosed, WireError
from shmd.control.listener import accept, bind_listener, check_inherited_listener
from shmd.daemons import fdstore, logs
from shmd.daemons.dormant import DormantReaders
from shmd.errors import ReaderTableFull, ShmdError, UnknownTopic

Refusal = tuple[protocol.RefuseCode, str]


class ServerHost(Protocol):
    """What the control server needs of the writer."""

    #: Read at every use: a reload changes ``control.allowed_*``.
    cfg: Config
    log: FilteringBoundLogger
    reactor: Reactor
    #: Held around every call into the publisher (a source thread publishes too).
    lock: threading.Lock

    @property
    def shutting_down(self) -> bool:
        """The active flag is cleared: no new readers, drained ones keep their entries."""

    def readers_gone(self) -> None:
        """Shutting down, and the last attached reader's connection is closed."""


@dataclass(eq=False)
class Peer:
    """One control connection."""

    conn: Connection
    pid: int
    uid: int
    gid: int
    #: Drops the peer unless it says Hello or Publish first; None once it did.
    handshake: Timer | None = None
    handle: ReaderHandle | None = None
    instance: str | None = None
    detached: bool = False
    #: Its Detach was SUSPEND (a durable reader leaving to come back).
    suspended: bool = False
    #: A durable reader's grace in seconds (its Hello's, capped); 0: not durable.
    durable: float = 0.0
    #: A durable reader's new process: (redeliver_until, records handed back).
    redeliver: tuple[int, int] | None = None
    published: int = 0
    connected_at: float = field(default_factory=time.monotonic)


def open_listener(cfg: Config, control: list[int] | None) -> tuple[socket.socket, str | None]:
    """The listening socket: from socket activation (checked), else bound here.

    Returns it with the path bound here (None when activated), which the
    writer unlinks at exit.
    """
    ctl = cfg.control
    sock_type = SOCKET_TYPES[ctl.type]
    if control is not None:
        if len(control) != 1:
            for fd in control:
                os.close(fd)
            raise WireError(
                f"Failed to take the control socket from systemd since it passed "
                f"{len(control)} fds named {fdstore.CONTROL!r}; expected one "
                "(FileDescriptorName= in shm-writer.socket)"
            )
        sock = socket.socket(fileno=control[0])
        check_inherited_listener(sock, ctl.socket, sock_type)
        return sock, None
    parent = os.path.dirname(ctl.socket)
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise WireError(
                f"Failed to bind the control socket {ctl.socket} since its directory "
                f"{parent} is missing and cannot be created ({exc.strerror})"
            ) from None
    return bind_listener(ctl.socket, sock_type, ctl.mode), ctl.socket


class ControlServer:
    """Accepts peers, runs their handshake, attaches readers, serves Publish, tells evictions.

    ``restored`` holds the adopted segment's readers until they reconnect.
    """

    def __init__(
        self,
        host: ServerHost,
        pub: Publisher,
        control: list[int] | None,
        lifeline_r: OwnedFd,
        restored: dict[int, ReaderHandle],
    ) -> None:
        self.host = host
        self.log = host.log
        self.pub = pub
        self.lifeline_r = lifeline_r
        #: Readers of an adopted segment, waiting for them to reconnect.
        self.restored = fdstore.RestoredReaders(pub, restored, host.lock, host.log)
        #: Durable readers whose process went, kept for their grace.
        self.dormant = DormantReaders(pub, host.reactor, host.lock, host.log)
        self.peers: dict[int, Peer] = {}  # by connection fd
        self._last_lost: dict[int, int] = {}
        self.listener, self.bound_path = open_listener(host.cfg, control)
        self.listener.setblocking(False)
        host.reactor.add(self.listener.fileno(), self._on_listener)

    def attached(self) -> list[Peer]:
        """The peers that are attached readers."""
        return [p for p in self.peers.values() if p.handle is not None]

    # -- connections -----------------------------------------------------------------

    def _on_listener(self, events: int) -> None:
        for _ in range(64):
            try:
                conn = accept(self.listener, max_message=self.host.cfg.control.max_message)
            except WireError as exc:
                self.log.warning(logs.ACCEPT_FAILED, error=str(exc))
                return
            if conn is None:
                return
            self._new_peer(conn)

    def _new_peer(self, conn: Connection) -> None:
        pid, uid, gid = conn.peer_credentials()
        ctl = self.host.cfg.control
        try:
            groups = {gid, *conn.peer_groups()}
        except WireError:
            groups = {gid}  # the primary group is all we know
        if not ctl.peer_allowed(uid, groups):
            self.log.warning(
                logs.READER_REFUSED,
                pid=pid,
                uid=uid,
                gid=gid,
                code="not_allowed",
                reason="uid and groups are not in control.allowed_users/groups",
            )
            self._refuse_and_close(
                conn, protocol.RefuseCode.NOT_ALLOWED, f"uid {uid} is not allowed to attach"
            )
            return
        peer = Peer(conn, pid, uid, gid)
        self.peers[conn.fileno()] = peer
        self.host.reactor.add(conn.fileno(), functools.partial(self._on_peer, peer))
        peer.handshake = self.host.reactor.call_later(
            ctl.handshake_timeout, functools.partial(self._handshake_timeout, peer)
        )
        self.log.debug(logs.READER_CONNECTED, pid=pid, uid=uid)

    @staticmethod
    def _refuse_and_close(conn: Connection, code: protocol.RefuseCode, reason: str) -> None:
        try:
            conn.queue(protocol.Refuse(code, reason).encode())
        except (ChannelError, OSError):
            pass  # best effort: the peer may be gone or not reading
        conn.close()

    def _handshake_timeout(self, peer: Peer) -> None:
        if peer.conn.closed or peer.handshake is None:
            return
        self.log.warning(
            logs.READER_REFUSED,
            pid=peer.pid,
            uid=peer.uid,
            code="bad_message",
            reason=f"no Hello within {self.host.cfg.control.handshake_timeout:g} s",
        )
        self.drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, "handshake timeout"))

    def _handshake_done(self, peer: Peer) -> None:
        if peer.handshake is not None:
            peer.handshake.cancel()
            peer.handshake = None

    def _on_peer(self, peer: Peer, events: int) -> None:
        try:
            if events & select.EPOLLOUT:
                peer.conn.on_writable()
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                for frame in peer.conn.on_readable():
                    with frame:
                        msg = protocol.decode(frame.body, len(frame.fds))
                    if not self._on_message(peer, msg):
                        return
            self._update_interest(peer)
        except PeerClosed:
            self.drop(peer)
        except (ChannelError, protocol.ProtocolError) as exc:
            # Another protocol version is told so (Refuse's layout is the same
            # in every version, so the peer can read why).
            code = (
                protocol.RefuseCode.VERSION
                if isinstance(exc, protocol.VersionMismatch)
                else protocol.RefuseCode.BAD_MESSAGE
            )
            event = logs.READER_REFUSED if peer.handle is None else logs.READER_ERROR
            self.log.warning(
                event,
                pid=peer.pid,
                uid=peer.uid,
                reader=peer.instance,
                code=code.name.lower(),
                error=str(exc),
            )
            self.drop(peer, refuse=(code, str(exc)[:512]))

    def _update_interest(self, peer: Peer) -> None:
        if not peer.conn.closed:
            want = select.EPOLLIN | (select.EPOLLOUT if peer.conn.wants_write else 0)
            self.host.reactor.modify(peer.conn.fileno(), want)

    def _on_message(self, peer: Peer, msg: protocol.Message) -> bool:
        """Handle one message; False when the peer was dropped."""
        if isinstance(msg, protocol.Hello):
            return self._on_hello(peer, msg)
        if isinstance(msg, protocol.Publish):
            return self._on_publish(peer, msg)
        if isinstance(msg, protocol.Detach):
            peer.detached = True
            peer.suspended = msg.code == protocol.DetachCode.SUSPEND
            self.drop(peer, reason=msg.reason or msg.code.name.lower())
            return False
        reason = f"a {type(msg).__name__} is not for the writer"
        event = logs.READER_REFUSED if peer.handle is None else logs.READER_ERROR
        self.log.warning(
            event,
            pid=peer.pid,
            uid=peer.uid,
            reader=peer.instance,
            code="bad_message",
            error=reason,
        )
        self.drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, reason))
        return False

    # -- Hello and Publish ---------------------------------------------------------------

    @staticmethod
    def _start(hello: protocol.Hello, resume: bool) -> str | int:
        """Where a new entry's cursor starts (see Publisher.add_reader)."""
        if resume:
            return hello.resume_cursor
        if hello.start in (protocol.StartCode.OLDEST, protocol.StartCode.RESUME):
            # A resume from another generation starts over: with everything
            # the new generation still holds.
            return "oldest"
        return "latest"

    def _topics(self, hello: protocol.Hello) -> int | Refusal:
        """The Hello's topic mask with its named topics added, or why it is refused."""
        try:
            return hello.topics | self.host.cfg.segment.topics.mask(hello.topic_names)
        except UnknownTopic as exc:
            return (protocol.RefuseCode.UNKNOWN_TOPIC, str(exc))

    def _admit(
        self, peer: Peer, hello: protocol.Hello, resume: bool, topics: int
    ) -> ReaderHandle | Refusal:
        """The reader's entry (restored, or new), or why it is refused."""
        if self.host.shutting_down:
            return (protocol.RefuseCode.SHUTTING_DOWN, "the writer is shutting down")
        if any(p.instance == hello.instance for p in self.attached()):
            return (
                protocol.RefuseCode.DUPLICATE_INSTANCE,
                f"a reader named {hello.instance!r} is attached already",
            )
        if hello.durable_ms and not resume:
            back = self._reawaken(peer, hello, topics)
            if back is not None:
                return back
        elif not hello.durable_ms:
            # Freed, if it was dormant: this process starts afresh below.
            self.dormant.forget(
                hello.instance, "a new process of it attached without asking to be durable"
            )
        restored = self.restored.claim(hello.instance, peer.pid, resume, hello.resume_cursor)
        if restored is not None:
            self.pub.table.set_wait(restored.index, int(hello.wait))
            return restored
        try:
            with self.host.lock:
                handle = self.pub.add_reader(
                    hello.instance,
                    peer.pid,
                    topics=topics,
                    start=self._start(hello, resume),
                    wait=int(hello.wait),
                    durable_ms=int(peer.durable * 1000),
                )
        except ReaderTableFull as exc:
            return (protocol.RefuseCode.TABLE_FULL, str(exc))
        fdstore.keep_reader(handle.index, handle.eventfd)
        return handle

    def _reawaken(self, peer: Peer, hello: protocol.Hello, topics: int) -> ReaderHandle | None:
        """A new process of a durable reader: its kept entry at its cursor, or None if none."""
        handle = self.dormant.claim(hello.instance) or self.restored.pop_durable(hello.instance)
        if handle is None:
            return None
        # Under block the source may be waiting for this reader's cursor,
        # holding the lock: with its topics unchanged, none is needed.
        lock = self.host.lock if handle.topics != topics else contextlib.nullcontext()
        with lock:
            cursor, taken, again = self.pub.table.reawaken(
                handle.index, peer.pid, topics, int(hello.wait), int(peer.durable * 1000)
            )
        peer.redeliver = (taken if taken > cursor else 0, again)
        return handle

    def keep_durable(self, handle: ReaderHandle, reason: str) -> bool:
        """Keep a durable reader's entry for its grace (False: it is not durable)."""
        grace = self.pub.segment.entry(handle.index).durable_ms / 1000
        if not grace:
            return False
        self.dormant.keep(handle, grace, reason)
        return True

    def _on_hello(self, peer: Peer, hello: protocol.Hello) -> bool:
        if peer.handle is not None or peer.published:
            self.drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, "a second Hello"))
            return False
        resume = (
            hello.start == protocol.StartCode.RESUME
            and hello.last_generation == self.pub.generation
        )
        peer.durable = min(hello.durable_ms / 1000, self.host.cfg.writer.max_durable_grace)
        topics = self._topics(hello)
        handle = topics if isinstance(topics, tuple) else self._admit(peer, hello, resume, topics)
        if isinstance(handle, tuple):
            self.log.warning(
                logs.READER_REFUSED,
                pid=peer.pid,
                uid=peer.uid,
                reader=hello.instance,
                code=handle[0].name.lower(),
                reason=handle[1],
            )
            self.drop(peer, refuse=handle)
            return False
        self._handshake_done(peer)
        peer.handle, peer.instance = handle, hello.instance
        mask = self.pub.segment.entry(handle.index).topics
        g = self.pub.geometry
        cursor = self.pub.segment.entry(handle.index).cursor
        welcome = protocol.Welcome(
            generation=self.pub.generation,
            capacity=g.capacity,
            slot_size=g.slot_size,
            max_readers=g.max_readers,
            reader_index=handle.index,
            ring_offset=g.ring_offset,
            segment_size=g.segment_size,
            policy=protocol.PolicyCode(int(self.pub.policy)),
            start_cursor=cursor,
            resumed=resume or peer.redeliver is not None,
            topics=self.host.cfg.segment.topics,
            redeliver_until=peer.redeliver[0] if peer.redeliver else 0,
        )
        try:
            peer.conn.queue(
                welcome.encode(),
                [handle.eventfd.fileno(), self.pub.segment.fileno(), self.lifeline_r.fileno()],
            )
        except ChannelError as exc:
            self.log.warning(logs.READER_ERROR, pid=peer.pid, reader=peer.instance, error=str(exc))
            self.drop(peer)
            return False
        named: dict[str, str] = {}
        names = () if mask == ALL_TOPICS else self.host.cfg.segment.topics.names_in(mask)
        if names:
            named["topic_names"] = ",".join(names)
        if peer.durable:
            named["durable"] = f"{peer.durable:g}"
        if peer.redeliver is not None:
            named["redelivered"] = str(peer.redeliver[1])
        self.log.info(
            logs.READER_ATTACHED,
            reader=hello.instance,
            pid=peer.pid,
            uid=peer.uid,
            index=handle.index,
            seq=cursor,
            generation=self.pub.generation,
            topics=f"{mask:#x}",
            start=protocol.StartCode(hello.start).name.lower(),
            wait=hello.wait.name.lower(),
            **named,
        )
        return True

    def _on_publish(self, peer: Peer, msg: protocol.Publish) -> bool:
        if peer.handle is not None:
            self.drop(
                peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, "a reader connection cannot publish")
            )
            return False
        self._handshake_done(peer)
        try:
            with self.host.lock:
                seq = self.pub.publish(msg.payload, msg.topic)
        except ShmdError as exc:
            named: dict[str, str] = {}
            if self.host.cfg.topic_name(msg.topic) is not None:
                named["topic_name"] = self.host.cfg.segment.topics.label(msg.topic)
            self.log.warning(
                logs.RECORD_REFUSED, pid=peer.pid, error=str(exc), topic=msg.topic, **named
            )
            self.drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, str(exc)[:512]))
            return False
        peer.published += 1
        try:
            peer.conn.queue(protocol.PublishAck(seq=seq, count=1).encode())
        except ChannelError as exc:
            self.log.warning(logs.READER_ERROR, pid=peer.pid, error=str(exc))
            self.drop(peer)
            return False
        return True

    # -- leaving -----------------------------------------------------------------------

    def drop(self, peer: Peer, *, refuse: Refusal | None = None, reason: str | None = None) -> None:
        """Forget a connection; free its reader entry; log what happened."""
        conn = peer.conn
        if conn.closed:
            return
        self._handshake_done(peer)
        fd = conn.fileno()
        self.peers.pop(fd, None)
        self.host.reactor.remove(fd)
        if refuse is not None:
            self._refuse_and_close(conn, *refuse)
        else:
            conn.close()
        shutting_down = self.host.shutting_down
        if (
            peer.handle is not None
            and peer.durable
            and not shutting_down
            and refuse is None
            and (peer.suspended or not peer.detached)
        ):
            # A durable reader whose process went (or suspended): keep it.
            why = "it suspended" if peer.suspended else "connection closed without Detach"
            self.dormant.keep(peer.handle, peer.durable, why)
            self._last_lost.pop(peer.handle.index, None)
        elif peer.handle is not None:
            if shutting_down and peer.detached:
                # Drained after we cleared the active flag.  Its entry and
                # stored eventfd stay: if this is a restart, the next writer
                # finds the reader there and wakes it to resume.  (On a stop
                # systemd drops the store and the segment goes with us.)
                entry: ReaderEntry | None = self.pub.segment.entry(peer.handle.index)
            else:
                with self.host.lock:
                    entry = self.pub.remove_reader(peer.handle.index)
                fdstore.forget_reader(peer.handle.index)
            fields = {
                "reader": peer.instance,
                "pid": peer.pid,
                "index": peer.handle.index,
                "generation": self.pub.generation,
            }
            if entry is not None:
                fields.update(seq=entry.cursor, delivered=entry.delivered, lost=entry.lost)
            self._last_lost.pop(peer.handle.index, None)
            if peer.detached:
                self.log.info(logs.READER_DETACHED, reason=reason or "detach", **fields)
            else:
                # Refused by us (a second Hello, a bad message): say why.
                why = refuse[1] if refuse is not None else "connection closed without Detach"
                self.log.warning(logs.READER_LOST, reason=why, **fields)
        elif peer.published:
            self.log.debug(logs.PUBLISHER_DONE, pid=peer.pid, records=peer.published)
        if shutting_down and not self.attached():
            self.host.readers_gone()

    def refuse_handshakes(self) -> None:
        """Shutting down: refuse the connections still waiting for their handshake."""
        for peer in [p for p in self.peers.values() if p.handle is None]:
            self.drop(peer, refuse=(protocol.RefuseCode.SHUTTING_DOWN, "shutting down"))

    def drop_all(self, *, detached: bool) -> None:
        """Close every connection (``detached``: as if each reader had said Detach)."""
        for peer in list(self.peers.values()):
            peer.detached = peer.detached or detached
            self.drop(peer)

    def handle_evictions(self) -> None:
        """Tell the readers the publisher evicted (policy block) and free their entries."""
        evicted, self.pub.evictions = self.pub.evictions, []
        detach = protocol.Detach(protocol.DetachCode.EVICTED, "held the ring up").encode()
        for ev in evicted:
            fdstore.forget_reader(ev.index)
            self.restored.evicted(ev)  # evicted before it reconnected after our restart
            self.dormant.evicted(ev)  # a durable reader evicted while its process was gone
            for peer in list(self.peers.values()):
                if peer.handle is not None and peer.handle.index == ev.index:
                    peer.handle = None  # the publisher already dropped it
                    self._last_lost.pop(ev.index, None)
                    self.log.warning(
                        logs.READER_LOST,
                        reader=ev.name,
                        pid=ev.pid,
                        index=ev.index,
                        generation=self.pub.generation,
                        seq=ev.cursor,
                        lag=ev.write_seq - ev.cursor,
                        reason="evicted: it held the ring up under policy block",
                    )
                    try:
                        peer.conn.queue(detach)
                    except ChannelError:
                        pass
                    self.drop(peer)
            self.pub.free_evicted(ev.index)

    def report_overruns(self) -> None:
        """Log each reader that lost records since the last call (``overrun``)."""
        for index, handle in list(self.pub.readers.items()):
            lost = self.pub.segment.entry(index).lost
            before = self._last_lost.get(index, 0)
            if lost > before:
                self.log.warning(
                    logs.OVERRUN,
                    reader=handle.name,
                    pid=handle.pid,
                    lost=lost,
                    new_lost=lost - before,
                    generation=self.pub.generation,
                )
            self._last_lost[index] = lost

    def close(self) -> None:
        """Close every connection and the listener; unlink the socket we bound."""
        reactor = self.host.reactor
        self.dormant.close()
        for peer in list(self.peers.values()):
            self._handshake_done(peer)
            reactor.remove(peer.conn.fileno())
            peer.conn.close()
        self.peers.clear()
        if self.listener.fileno() >= 0:
            reactor.remove(self.listener.fileno())
            self.listener.close()
            if self.bound_path is not None:
                try:
                    os.unlink(self.bound_path)
                except FileNotFoundError:
                    pass
