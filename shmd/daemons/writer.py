"""``shm-writer``: owns the segment, the readers' eventfds and the control listener.

One thread, one epoll loop (:class:`~shmd._sys.reactor.Reactor`).  Signal
handlers only queue the signal and wake the loop; the loop dispatches to
``handle_<signal>`` methods (gunicorn's arbiter).  Each connection is a
:class:`Peer`: it must say Hello (a reader) or Publish (``shmctl publish``)
within ``control.handshake_timeout``; a reader then gets its eventfd and the
segment fd in the Welcome message, and the connection stays open as the
liveness channel both ways.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor, SignalWakeup
from shmd.bus.layout import Geometry, Policy, ReaderEntry
from shmd.bus.publisher import Publisher, ReaderHandle
from shmd.bus.segment import Segment
from shmd.config import Config, ConfigError, TickerSource, diff_reloadable, load_config
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import SOCKET_TYPES, ChannelError, PeerClosed, WireError
from shmd.control.listener import accept, bind_listener, check_inherited_listener
from shmd.daemons import logs, sdnotify
from shmd.daemons.process import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    base_parser,
    check_config,
    fail,
    load_or_exit,
    setup_logging,
)
from shmd.daemons.sources import AnySource, PythonRecords, SourceError, TickerRecords, make_source
from shmd.errors import PayloadTooLarge, ReaderTableFull, ShmdError

LISTEN_FDNAME = "control"
#: The segment's file mode: the writer's group (shmd) may read it, so that
#: operators in that group can run `shmctl status`; readers need no access
#: at all (they get the fd over the socket).
SEGMENT_MODE = 0o640


@dataclass(eq=False)
class Peer:
    """One control connection."""

    conn: Connection
    pid: int
    uid: int
    gid: int
    deadline: float | None
    handle: ReaderHandle | None = None
    instance: str | None = None
    detached: bool = False
    published: int = 0
    connected_at: float = field(default_factory=time.monotonic)


class Writer:
    """The writer daemon's state and loop."""

    def __init__(
        self, cfg: Config, log: FilteringBoundLogger, config_path: str | None = None
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.config_path = config_path
        self.reactor = Reactor()
        self.pub: Publisher | None = None
        self.listener: socket.socket | None = None
        self.bound_path: str | None = None  # set when we bound (not activated): we unlink it
        self.peers: dict[int, Peer] = {}  # by connection fd
        self.source: AnySource | None = None
        self.max_payload = cfg.segment.payload_max
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        #: Written by other threads' call_later to wake the loop.
        self._wake = OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.reactor.add(self._wake.fileno(), self._on_wake)
        self._timer_seq = itertools.count()
        self._lock = threading.Lock()  # publisher calls from a python source thread
        self._wakeup: SignalWakeup | None = None
        self._shutting_down = False
        self._exit: int | None = None
        self._final_status = EXIT_OK  # what a completed shutdown exits with
        self._last_lost: dict[int, int] = {}
        self._rate_mark = (time.monotonic(), 0)
        self.rate = 0.0
        self._sock_type = SOCKET_TYPES[cfg.control.type]
        #: The lifeline pipe: readers get the read end; its write end lives
        #: here and in systemd's fd store, so it hangs up only when the
        #: writer is gone and not coming back.
        self.lifeline_r: OwnedFd | None = None
        self.lifeline_w: OwnedFd | None = None
        #: Readers of an adopted segment, waiting for them to reconnect.
        self.restored: dict[int, ReaderHandle] = {}
        #: Stored eventfds of readers of a stored segment we could not adopt:
        #: woken once we listen, they reconnect and start over (generation_changed).
        self._orphans: list[OwnedFd] = []

    # -- timers (the loop's own; sources use call_later) -------------------------

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop after ``delay`` seconds; callable from any thread.

        heappush and heappop are single C calls, atomic under the GIL; a
        push from a source thread also writes the loop's wake-up eventfd, so
        a sleeping loop sees the new timer at once.
        """
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))
        if threading.current_thread() is not threading.main_thread():
            os.eventfd_write(self._wake.fileno(), 1)

    def _on_wake(self, events: int) -> None:
        try:
            os.eventfd_read(self._wake.fileno())
        except BlockingIOError:
            pass

    def _run_timers(self) -> float | None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()
            now = time.monotonic()
        return None if not self._timers else max(0.0, self._timers[0][0] - now)

    # -- start-up ------------------------------------------------------------------

    def start(self) -> None:
        """Adopt the stored segment or create one, take or bind the listener, start the source."""
        fds = sdnotify.listen_fds()
        control = fds.pop(LISTEN_FDNAME, None) or fds.pop(sdnotify.UNKNOWN_FDNAME, None)
        self.pub = self._segment(fds)
        self.listener = self._listener(control)
        self.listener.setblocking(False)
        self.reactor.add(self.listener.fileno(), self._on_listener)
        self._wakeup = SignalWakeup(
            self.reactor, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], self._on_signal
        )
        self.source = make_source(self.cfg.writer.source)
        self.source.start(self)
        self.log.info(
            logs.LISTENER_READY,
            socket=self.cfg.control.socket,
            type=self.cfg.control.type,
            activated=self.bound_path is None,
            generation=self.pub.generation,
        )
        if self._orphans:
            self._wake_orphans()
        if self.restored:
            grace = self.cfg.writer.reconnect_grace
            self.call_later(grace, self._reconnect_expired)
            # "The writer is back": readers waiting for us reconnect now.
            self.pub.wake_all()
            self.log.info(
                "readers_restored",
                generation=self.pub.generation,
                grace=grace,
                readers=",".join(h.name for h in self.restored.values()),
            )
        self.call_later(self.cfg.writer.status_interval, self._status_tick)
        interval = sdnotify.watchdog_interval()
        if interval:
            self._watchdog(interval / 2)
        sdnotify.ready(self._status_text())

    # -- the segment, the fd store and the lifeline ---------------------------------

    def _segment(self, stored: dict[str, list[int]]) -> Publisher:
        """Adopt the segment systemd kept for us across a restart, or create a new one.

        The fd store (FileDescriptorStoreMax= in the unit) holds, by name:
        ``segment`` (the shm fd), ``lifeline-r``/``lifeline-w`` (the lifeline
        pipe) and ``reader-<index>`` (each attached reader's eventfd).  It
        survives ``systemctl restart`` and a crash followed by
        ``Restart=on-failure``; ``systemctl stop`` releases it (systemd 252),
        which hangs up the lifeline and tells readers the bus is gone.
        """
        seg = self.cfg.segment
        owned = {name: [OwnedFd(fd) for fd in fds] for name, fds in stored.items()}
        pub = self._adopt(owned.pop("segment", []))
        lifeline = (owned.pop("lifeline-r", []), owned.pop("lifeline-w", []))
        # The stored lifeline is kept even with a new generation: the readers
        # holding its read end wait for us (and we wake them), they must not
        # see it hang up and leave.
        if len(lifeline[0]) == 1 and len(lifeline[1]) == 1:
            self.lifeline_r, self.lifeline_w = lifeline[0][0], lifeline[1][0]
        else:
            for f in (*lifeline[0], *lifeline[1]):
                f.close()
            r, w = os.pipe2(os.O_CLOEXEC)
            self.lifeline_r, self.lifeline_w = OwnedFd(r), OwnedFd(w)
        if pub is None:
            pub = Publisher.create(
                seg.name,
                capacity=seg.capacity,
                slot_size=seg.slot_size,
                max_readers=seg.max_readers,
                policy=Policy.parse(seg.policy),
                block_timeout=seg.block_timeout,
                mutex_timeout=seg.mutex_timeout,
                mode=SEGMENT_MODE,
            )
            for name in [n for n in owned if n.startswith("reader-")]:
                fds = owned.pop(name)
                self._orphans += fds[:1]
                for f in fds[1:]:
                    f.close()
        else:
            self._restore_readers(pub, owned)
        for name, fds in owned.items():
            for f in fds:
                f.close()
            if name.startswith("reader-"):
                # Not restored: a later reader at that index stores its own.
                sdnotify.remove_fds(name)
        self._store(pub)
        return pub

    def _wake_orphans(self) -> None:
        """Wake the readers of the segment we could not adopt: they reconnect asking to
        resume in the old generation, and start over in the new one."""
        assert self.pub is not None
        orphans, self._orphans = self._orphans, []
        for efd in orphans:
            try:
                os.write(efd.fileno(), (1).to_bytes(8, "little"))
            except OSError:
                pass  # a full counter wakes the reader just as well
            finally:
                efd.close()
        self.log.info(
            "readers_woken",
            generation=self.pub.generation,
            readers=len(orphans),
            reason="the stored segment could not be adopted; they start over",
        )

    def _adopt(self, segment_fds: list[OwnedFd]) -> Publisher | None:
        """The stored segment as a Publisher, or None (nothing stored, or unusable)."""
        if not segment_fds:
            return None
        for extra in segment_fds[1:]:
            extra.close()
        seg = self.cfg.segment
        try:
            # A look first: a segment the configuration no longer describes
            # is not adopted (nor copied) at all.
            with Segment.open(fd=segment_fds[0].fileno()) as stored:
                mismatch = self._config_mismatch(stored.geometry, Policy(stored.header().policy))
                if mismatch:
                    # Tells its waiting readers that a successor is up (see
                    # ReaderDaemon._await_writer); they also get a wake-up.
                    stored.u[Segment.WRITER_PID] = os.getpid()
            if mismatch:
                segment_fds[0].close()
                return None
            return Publisher.adopt(
                seg.name,
                segment_fds[0],
                block_timeout=seg.block_timeout,
                mutex_timeout=seg.mutex_timeout,
                mode=SEGMENT_MODE,
            )
        except (ShmdError, OSError) as exc:
            self.log.error(
                "segment_invalid",
                segment=seg.name,
                error=str(exc),
                action="starting a new generation; readers start over",
            )
            segment_fds[0].close()
            return None

    def _restore_readers(self, pub: Publisher, owned: dict[str, list[OwnedFd]]) -> None:
        """Re-own the adopted segment's attached entries with their stored eventfds."""
        for name in [n for n in owned if n.startswith("reader-")]:
            fds = owned.pop(name)
            index = int(name[7:]) if name[7:].isdigit() else -1
            if index < 0 or len(fds) != 1:
                for f in fds:
                    f.close()
                continue
            handle = pub.restore_reader(index, fds[0])
            if handle is not None:
                self.restored[index] = handle
        pub.free_unclaimed()

    def _store(self, pub: Publisher) -> None:
        """Hand systemd what a restart needs (no-ops without NOTIFY_SOCKET)."""
        assert self.lifeline_r is not None and self.lifeline_w is not None
        # What a restart needs, kept by systemd (no-ops without NOTIFY_SOCKET).
        sdnotify.remove_fds("segment")
        sdnotify.store_fds("segment", [pub.segment.fileno()])
        sdnotify.remove_fds("lifeline-r")
        sdnotify.store_fds("lifeline-r", [self.lifeline_r.fileno()])
        sdnotify.remove_fds("lifeline-w")
        sdnotify.store_fds("lifeline-w", [self.lifeline_w.fileno()])
        for index, handle in self.restored.items():
            sdnotify.remove_fds(f"reader-{index}")
            sdnotify.store_fds(f"reader-{index}", [handle.eventfd.fileno()])

    def _config_mismatch(self, g: Geometry, policy: Policy) -> bool:
        """A stored segment whose geometry the configuration changed is not reused."""
        seg = self.cfg.segment
        want = (seg.capacity, seg.slot_size, seg.max_readers, Policy.parse(seg.policy))
        have = (g.capacity, g.slot_size, g.max_readers, policy)
        if want == have:
            return False
        self.log.warning(
            "segment_invalid",
            segment=seg.name,
            error=f"the stored segment has capacity, slot size, max_readers, policy "
            f"{have} but the configuration says {want}",
            action="starting a new generation; readers start over",
        )
        return True

    def _reconnect_expired(self) -> None:
        """Restored readers that did not reconnect within reconnect_grace are gone."""
        for index in list(self.restored):
            self._forget_restored(
                index,
                f"did not reconnect within "
                f"{self.cfg.writer.reconnect_grace:g} s of the "
                "writer's restart",
            )

    def _forget_restored(self, index: int, reason: str) -> None:
        """Free a restored reader's entry and stored eventfd; log it as lost."""
        assert self.pub is not None
        handle = self.restored.pop(index)
        with self._lock:
            entry = self.pub.remove_reader(index)
        sdnotify.remove_fds(f"reader-{index}")
        self.log.warning(
            logs.READER_LOST,
            reader=handle.name,
            pid=handle.pid,
            index=index,
            generation=self.pub.generation,
            seq=entry.cursor if entry else None,
            reason=reason,
        )

    def _listener(self, control: list[int] | None) -> socket.socket:
        """The listening socket: from socket activation (checked), else bound here."""
        ctl = self.cfg.control
        if control is not None:
            if len(control) != 1:
                for fd in control:
                    os.close(fd)
                raise WireError(
                    f"Failed to take the control socket from systemd since it passed "
                    f"{len(control)} fds named {LISTEN_FDNAME!r}; expected one "
                    "(FileDescriptorName= in shm-writer.socket)"
                )
            sock = socket.socket(fileno=control[0])
            check_inherited_listener(sock, ctl.socket, self._sock_type)
            return sock
        parent = os.path.dirname(ctl.socket)
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o755, exist_ok=True)
            except OSError as exc:
                raise WireError(
                    f"Failed to bind the control socket {ctl.socket} since its directory "
                    f"{parent} is missing and cannot be created ({exc.strerror})"
                ) from None
        sock = bind_listener(ctl.socket, self._sock_type, ctl.mode)
        self.bound_path = ctl.socket
        return sock

    # -- publishing (sources call this; thread-safe) ---------------------------------

    def publish_batch(self, payloads: Sequence[bytes], topic: int) -> None:
        """Publish for a source; a refused record is logged, never fatal."""
        assert self.pub is not None
        try:
            with self._lock:
                # Checked under the lock begin_shutdown holds to clear the
                # active flag: a source thread's record is either committed
                # before the flag clears (so every reader drains it) or not
                # published at all, never committed after readers left.
                if self._shutting_down:
                    return
                self.pub.publish_batch(payloads, topic)
        except (PayloadTooLarge, ShmdError) as exc:
            self.log.warning("record_refused", error=str(exc), topic=topic)
        if self.pub.evictions and threading.current_thread() is threading.main_thread():
            self._handle_evictions()

    def source_finished(self, reason: str) -> None:
        """A finite source ended: shut down cleanly (exit 1 if it failed)."""
        self.log.info("source_finished", reason=reason)
        if isinstance(self.source, PythonRecords) and self.source.error is not None:
            # A source that raised is a failure: Restart=on-failure restarts it.
            self._final_status = EXIT_FAILURE
        self.begin_shutdown(f"source finished: {reason}")

    # -- connections -----------------------------------------------------------------

    def _on_listener(self, events: int) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                conn = accept(self.listener, max_message=self.cfg.control.max_message)
            except WireError as exc:
                self.log.warning("accept_failed", error=str(exc))
                return
            if conn is None:
                return
            self._new_peer(conn)

    def _new_peer(self, conn: Connection) -> None:
        pid, uid, gid = conn.peer_credentials()
        ctl = self.cfg.control
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
        peer = Peer(conn, pid, uid, gid, time.monotonic() + ctl.handshake_timeout)
        self.peers[conn.fileno()] = peer
        self.reactor.add(conn.fileno(), functools.partial(self._on_peer, peer))
        self.call_later(ctl.handshake_timeout, functools.partial(self._handshake_timeout, peer))
        self.log.debug(logs.READER_CONNECTED, pid=pid, uid=uid)

    def _refuse_and_close(self, conn: Connection, code: protocol.RefuseCode, reason: str) -> None:
        try:
            conn.queue(protocol.Refuse(code, reason).encode())
        except (ChannelError, OSError):
            pass  # best effort: the peer may be gone or not reading
        conn.close()

    def _handshake_timeout(self, peer: Peer) -> None:
        if peer.conn.closed or peer.deadline is None:
            return
        self.log.warning(
            logs.READER_REFUSED,
            pid=peer.pid,
            uid=peer.uid,
            code="bad_message",
            reason=f"no Hello within {self.cfg.control.handshake_timeout:g} s",
        )
        self._drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, "handshake timeout"))

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
            self._drop(peer)
        except (ChannelError, protocol.ProtocolError) as exc:
            # Another protocol version is told so (Refuse's layout is the same
            # in every version, so the peer can read why).
            code = (
                protocol.RefuseCode.VERSION
                if isinstance(exc, protocol.VersionMismatch)
                else protocol.RefuseCode.BAD_MESSAGE
            )
            event = logs.READER_REFUSED if peer.handle is None else "reader_error"
            self.log.warning(
                event,
                pid=peer.pid,
                uid=peer.uid,
                reader=peer.instance,
                code=code.name.lower(),
                error=str(exc),
            )
            self._drop(peer, refuse=(code, str(exc)[:512]))

    def _update_interest(self, peer: Peer) -> None:
        if not peer.conn.closed:
            want = select.EPOLLIN | (select.EPOLLOUT if peer.conn.wants_write else 0)
            self.reactor.modify(peer.conn.fileno(), want)

    def _on_message(self, peer: Peer, msg: protocol.Message) -> bool:
        """Handle one message; False when the peer was dropped."""
        if isinstance(msg, protocol.Hello):
            return self._on_hello(peer, msg)
        if isinstance(msg, protocol.Publish):
            return self._on_publish(peer, msg)
        if isinstance(msg, protocol.Detach):
            peer.detached = True
            self._drop(peer, reason=msg.reason or msg.code.name.lower())
            return False
        reason = f"a {type(msg).__name__} is not for the writer"
        event = logs.READER_REFUSED if peer.handle is None else "reader_error"
        self.log.warning(
            event,
            pid=peer.pid,
            uid=peer.uid,
            reader=peer.instance,
            code="bad_message",
            error=reason,
        )
        self._drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, reason))
        return False

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

    def _on_hello(self, peer: Peer, hello: protocol.Hello) -> bool:
        assert self.pub is not None
        if peer.handle is not None or peer.published:
            self._drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, "a second Hello"))
            return False
        refuse: tuple[protocol.RefuseCode, str] | None = None
        if self._shutting_down:
            refuse = (protocol.RefuseCode.SHUTTING_DOWN, "the writer is shutting down")
        elif any(
            p.instance == hello.instance and p.handle is not None for p in self.peers.values()
        ):
            refuse = (
                protocol.RefuseCode.DUPLICATE_INSTANCE,
                f"a reader named {hello.instance!r} is attached already",
            )
        resume = (
            hello.start == protocol.StartCode.RESUME
            and hello.last_generation == self.pub.generation
        )
        restored = next((h for h in self.restored.values() if h.name == hello.instance), None)
        if refuse is None and restored is not None and not resume:
            # A new process of a reader we were waiting for: the old one is
            # gone, and its entry must not hold the ring up until the grace ends.
            self._forget_restored(restored.index, "a new process of the reader attached")
            restored = None
        if refuse is None and resume and restored is not None:
            # A reader of the segment we adopted: same entry, same eventfd.
            del self.restored[restored.index]
            handle = restored
            with self._lock:
                self.pub.resume_reader(handle.index, peer.pid, hello.resume_cursor)
        elif refuse is None:
            try:
                with self._lock:
                    handle = self.pub.add_reader(
                        hello.instance,
                        peer.pid,
                        topics=hello.topics,
                        start=self._start(hello, resume),
                    )
            except ReaderTableFull as exc:
                refuse = (protocol.RefuseCode.TABLE_FULL, str(exc))
            else:
                sdnotify.remove_fds(f"reader-{handle.index}")  # nothing stale may stay
                sdnotify.store_fds(f"reader-{handle.index}", [handle.eventfd.fileno()])
        if refuse is not None:
            self.log.warning(
                logs.READER_REFUSED,
                pid=peer.pid,
                uid=peer.uid,
                reader=hello.instance,
                code=refuse[0].name.lower(),
                reason=refuse[1],
            )
            self._drop(peer, refuse=refuse)
            return False
        peer.handle, peer.instance, peer.deadline = handle, hello.instance, None
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
            resumed=resume,
        )
        assert self.lifeline_r is not None
        try:
            peer.conn.queue(
                welcome.encode(),
                [handle.eventfd.fileno(), self.pub.segment.fileno(), self.lifeline_r.fileno()],
            )
        except ChannelError as exc:
            self.log.warning("reader_error", pid=peer.pid, reader=peer.instance, error=str(exc))
            self._drop(peer)
            return False
        self.log.info(
            logs.READER_ATTACHED,
            reader=hello.instance,
            pid=peer.pid,
            uid=peer.uid,
            index=handle.index,
            seq=cursor,
            generation=self.pub.generation,
            topics=f"{hello.topics:#x}",
            start=protocol.StartCode(hello.start).name.lower(),
        )
        return True

    def _on_publish(self, peer: Peer, msg: protocol.Publish) -> bool:
        assert self.pub is not None
        if peer.handle is not None:
            self._drop(
                peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, "a reader connection cannot publish")
            )
            return False
        peer.deadline = None
        try:
            with self._lock:
                seq = self.pub.publish(msg.payload, msg.topic)
        except ShmdError as exc:
            self.log.warning("record_refused", pid=peer.pid, error=str(exc), topic=msg.topic)
            self._drop(peer, refuse=(protocol.RefuseCode.BAD_MESSAGE, str(exc)[:512]))
            return False
        peer.published += 1
        try:
            peer.conn.queue(protocol.PublishAck(seq=seq, count=1).encode())
        except ChannelError as exc:
            self.log.warning("reader_error", pid=peer.pid, error=str(exc))
            self._drop(peer)
            return False
        return True

    def _drop(
        self,
        peer: Peer,
        *,
        refuse: tuple[protocol.RefuseCode, str] | None = None,
        reason: str | None = None,
    ) -> None:
        """Forget a connection; free its reader entry; log what happened."""
        conn = peer.conn
        if conn.closed:
            return
        fd = conn.fileno()
        self.peers.pop(fd, None)
        self.reactor.remove(fd)
        if refuse is not None:
            self._refuse_and_close(conn, *refuse)
        else:
            conn.close()
        if peer.handle is not None and self.pub is not None:
            if self._shutting_down and peer.detached:
                # Drained after we cleared the active flag.  Its entry and
                # stored eventfd stay: if this is a restart, the next writer
                # finds the reader there and wakes it to resume.  (On a stop
                # systemd drops the store and the segment goes with us.)
                entry: ReaderEntry | None = self.pub.segment.entry(peer.handle.index)
            else:
                with self._lock:
                    entry = self.pub.remove_reader(peer.handle.index)
                sdnotify.remove_fds(f"reader-{peer.handle.index}")
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
            self.log.debug("publisher_done", pid=peer.pid, records=peer.published)
        if self._shutting_down and not any(p.handle for p in self.peers.values()):
            self._finish_shutdown()

    def _handle_evictions(self) -> None:
        assert self.pub is not None
        evicted, self.pub.evictions = self.pub.evictions, []
        for ev in evicted:
            sdnotify.remove_fds(f"reader-{ev.index}")
            if self.restored.pop(ev.index, None) is not None:
                # Evicted before it reconnected after our restart.
                self.log.warning(
                    logs.READER_LOST,
                    reader=ev.name,
                    pid=ev.pid,
                    index=ev.index,
                    generation=self.pub.generation,
                    seq=ev.cursor,
                    lag=ev.write_seq - ev.cursor,
                    reason="evicted before it reconnected: it held the ring up under policy block",
                )
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
                        peer.conn.queue(
                            protocol.Detach(
                                protocol.DetachCode.EVICTED, "held the ring up"
                            ).encode()
                        )
                    except ChannelError:
                        pass
                    self._drop(peer)
            self.pub.free_evicted(ev.index)

    # -- periodic work ------------------------------------------------------------------

    def _status_text(self) -> str:
        assert self.pub is not None
        n = sum(1 for p in self.peers.values() if p.handle is not None)
        return (
            f"{n} reader{'s' if n != 1 else ''} attached, {self.pub.write_seq} records "
            f"published, {self.rate:.1f}/s, generation {self.pub.generation}"
        )

    def _status_tick(self) -> None:
        assert self.pub is not None
        now = time.monotonic()
        t0, s0 = self._rate_mark
        seq = self.pub.write_seq
        if now > t0:
            self.rate = (seq - s0) / (now - t0)
        self._rate_mark = (now, seq)
        self.pub.heartbeat(self.rate)
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
        if self.pub.evictions:
            self._handle_evictions()
        sdnotify.status(self._status_text())
        if not self._shutting_down:
            self.call_later(self.cfg.writer.status_interval, self._status_tick)

    def _watchdog(self, period: float) -> None:
        sdnotify.watchdog()
        self.call_later(period, lambda: self._watchdog(period))

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: signal.Signals) -> None:
        handler = getattr(self, f"handle_{signum.name.lower()}", None)
        if handler is not None:
            handler()

    def handle_sigterm(self) -> None:
        """systemctl stop: the termination flow."""
        self.begin_shutdown("SIGTERM")

    def handle_sigint(self) -> None:
        """Ctrl-C: the termination flow; a second one cuts the grace period short."""
        if self._shutting_down:
            self.log.warning("shutdown_forced", reason="second SIGINT")
            self._finish_shutdown()
        else:
            self.begin_shutdown("SIGINT")

    def handle_sighup(self) -> None:
        """systemctl reload: apply what can change live, refuse the rest."""
        sdnotify.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            self.log.error(
                logs.CONFIG_ERROR,
                path=err.path,
                line=err.line,
                key=err.key,
                error=str(err),
                action="reload refused; running configuration kept",
            )
            sdnotify.ready(self._status_text())
            return
        live, refused = diff_reloadable(self.cfg, new)
        if live:
            # Only the live keys change: a refused key changed in the same file
            # keeps its running value (and the next reload reports it again).
            old = self.cfg
            logs.set_level(new.logging.level)
            source = old.writer.source
            if (
                isinstance(self.source, TickerRecords)
                and isinstance(source, TickerSource)
                and isinstance(new.writer.source, TickerSource)
            ):
                self.source.set_rate(new.writer.source.rate)
                source = replace(source, rate=new.writer.source.rate)
            control = replace(
                old.control,
                allowed_users=new.control.allowed_users,
                allowed_groups=new.control.allowed_groups,
                allowed_uids=new.control.allowed_uids,
                allowed_gids=new.control.allowed_gids,
            )
            self.cfg = replace(
                old,
                control=control,
                writer=replace(
                    old.writer, source=source, status_interval=new.writer.status_interval
                ),
                logging=replace(old.logging, level=new.logging.level),
            )
        self.log.info(
            logs.RELOAD,
            path=new.source_path or "built-in defaults",
            applied=",".join(live) or "none",
            refused=",".join(refused) or "none",
        )
        if refused:
            self.log.warning(
                "reload_refused",
                keys=",".join(refused),
                reason="these settings need a restart (systemctl restart)",
            )
        sdnotify.ready(self._status_text())

    # -- shutdown ------------------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        """Clear the active flag, wake every reader, give them the grace period."""
        if self._shutting_down or self.pub is None:
            return
        self._shutting_down = True
        sdnotify.stopping()
        if self.source is not None:
            self.source.close()
        with self._lock:
            self.pub.deactivate()
        self.log.info(
            logs.ACTIVE_CLEARED,
            reason=reason,
            seq=self.pub.write_seq,
            generation=self.pub.generation,
            readers=sum(1 for p in self.peers.values() if p.handle),
        )
        # Refuse connections still waiting for their handshake.
        for peer in [p for p in self.peers.values() if p.handle is None]:
            self._drop(peer, refuse=(protocol.RefuseCode.SHUTTING_DOWN, "shutting down"))
        if not any(p.handle for p in self.peers.values()):
            self._finish_shutdown()
            return
        grace = self.cfg.writer.shutdown_grace
        self.call_later(grace, self._grace_expired)

    def _grace_expired(self) -> None:
        if self._exit is not None:
            return
        waiting = [p.instance for p in self.peers.values() if p.handle]
        self.log.warning(
            "shutdown_grace_expired",
            readers=",".join(filter(None, waiting)),
            grace=self.cfg.writer.shutdown_grace,
        )
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._exit is not None:
            return
        for peer in list(self.peers.values()):
            peer.detached = peer.detached or self._shutting_down
            self._drop(peer)
        self._exit = self._final_status

    def close(self) -> None:
        """Release everything; unlink what we own per configuration."""
        if self.source is not None:
            self.source.close()
        for peer in list(self.peers.values()):
            self.reactor.remove(peer.conn.fileno())
            peer.conn.close()
        self.peers.clear()
        if self._wakeup is not None:
            self._wakeup.close()
        if self.listener is not None:
            self.reactor.remove(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self.bound_path is not None:
                try:
                    os.unlink(self.bound_path)
                except FileNotFoundError:
                    pass
        if self.pub is not None:
            self.pub.close()
            if self.cfg.segment.unlink_on_exit:
                self.pub.unlink()
        self.reactor.remove(self._wake.fileno())
        self._wake.close()
        # Our end of the lifeline.  Without systemd (or on a stop, once
        # systemd drops its stored copy) the readers now see it hang up.
        for end in (self.lifeline_r, self.lifeline_w, *self._orphans):
            if end is not None:
                end.close()
        self._orphans = []
        self.reactor.close()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until shut down; returns the exit status."""
        while self._exit is None:
            timeout = self._run_timers()
            if self._exit is not None:
                break
            self.reactor.poll(timeout)
            if self.pub is not None and self.pub.evictions:
                self._handle_evictions()
        return self._exit


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shm-writer``."""
    parser = base_parser("shm-writer", "The shmd writer daemon: owns the bus and publishes.")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args, "writer")
    if args.check_config:
        return check_config(cfg)
    log = setup_logging(cfg, args, "writer")
    writer = Writer(cfg, log, args.config)
    try:
        try:
            writer.start()
        except (ShmdError, SourceError, OSError) as exc:
            fail(log, "start_failed", exc)
        generation = writer.pub.generation if writer.pub else None
        status = writer.run()
    except SystemExit:
        raise
    except BaseException as exc:  # a bug: log it with its traceback, exit non-zero
        log.exception("crashed", error=str(exc))
        status = EXIT_FAILURE
    finally:
        writer.close()
    if status == EXIT_OK:
        log.info(logs.SHUTDOWN_COMPLETE, generation=generation)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["EXIT_CONFIG", "Writer", "main"]
