"""``shm-reader --instance NAME``: one reader daemon (the template ``shm-reader@NAME``).

Connects to the writer's control socket (connecting may be what starts the
writer, through socket activation), says Hello, receives its eventfd and the
segment fd in the Welcome, maps the segment (control part read-write, since
the process-shared mutex lives there and locking writes to it; the ring
read-only), and runs :class:`~shmd.bus.loop.ReaderLoop` with the control
socket and a signal pipe in the same epoll.

Exit statuses: 0 after draining once the writer cleared the active flag (or
after SIGTERM), 1 when the writer vanished without clearing it, the sink
failed or the writer evicted us (``Restart=on-failure`` brings the reader
back), 77 when the writer refused our credentials, 78 for a bad config.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor, SignalWakeup
from shmd.bus.loop import LoopExit, ReaderLoop
from shmd.bus.subscriber import RawRecord, Subscriber
from shmd.config import Config, ReaderSettings
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import SOCKET_TYPES, ChannelError, Frame, PeerClosed, WireError
from shmd.control.listener import connect
from shmd.daemons import logs, sdnotify
from shmd.daemons.process import (
    EXIT_FAILURE,
    EXIT_NOPERMISSION,
    EXIT_OK,
    base_parser,
    check_config,
    load_or_exit,
    setup_logging,
)
from shmd.daemons.sinks import RecordSink, SinkError, make_sink
from shmd.errors import ReaderEvicted, ShmdError

_RETRY_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}


class ReaderExit(Exception):
    """Leave the daemon with this status after logging ``event``."""

    def __init__(self, status: int, event: str, message: str, **fields: object) -> None:
        super().__init__(message)
        self.status = status
        self.event = event
        self.fields = fields


class ReaderDaemon:
    """One reader's connection, subscription, sink and loop."""

    def __init__(
        self,
        cfg: Config,
        settings: ReaderSettings,
        instance: str,
        log: FilteringBoundLogger,
        sink: RecordSink | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.instance = instance
        self.log = log
        self.conn: Connection | None = None
        self.sub: Subscriber | None = None
        #: The sink; built from the settings in run() unless given (shmctl tail).
        self.sink: RecordSink | None = sink
        self.reactor = Reactor()
        self.loop: ReaderLoop | None = None
        self._wakeup: SignalWakeup | None = None
        self.welcome: protocol.Welcome | None = None
        self.stop_reason: str | None = None
        #: SIGTERM/SIGINT arrived: finish and exit 0.
        self.stopping = False
        #: The read end of the writer's lifeline (see protocol.Welcome).
        self.lifeline: OwnedFd | None = None
        self.lifeline_hup = False
        self._woken = False
        #: The pid in the segment's header when we attached (see _await_writer).
        self._writer_pid = 0
        self._next_stats = 0.0
        self._stats_mark = (time.monotonic(), 0)
        self._reported_lost = 0
        self._watchdog = sdnotify.watchdog_interval()
        self._next_watchdog = 0.0

    # -- attaching ---------------------------------------------------------------

    def connect(self, *, resume: bool = False, deadline: float | None = None) -> None:
        """Connect (retrying while the socket is missing or refusing), Hello, Welcome.

        With ``resume``, ask to continue at our cursor in our generation
        (after the writer restarted); the new segment fd replaces the old
        mapping and the counters carry over.
        """
        ctl = self.cfg.control
        if deadline is None:
            deadline = time.monotonic() + self.settings.reconnect_timeout
        if self.conn is not None:
            self.conn.close()
        self.conn = self._dial(deadline)
        old = self.sub if resume else None
        frame = self._exchange_hello(self._hello(old), ctl.handshake_timeout)
        msg, fds = self._answer(frame)
        self._attach(msg, fds, old)

    def _dial(self, deadline: float) -> Connection:
        """Connect to the control socket, retrying while it is missing or refusing."""
        ctl = self.cfg.control
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

    def _hello(self, old: Subscriber | None) -> protocol.Hello:
        """Our Hello: where to start, or (``old``) where to resume."""
        if old is not None:
            return protocol.Hello(
                instance=self.instance,
                pid=os.getpid(),
                topics=self.settings.topic_mask,
                start=protocol.StartCode.RESUME,
                resume_cursor=old.cursor,
                last_generation=old.segment.generation,
            )
        start = (
            protocol.StartCode.OLDEST
            if self.settings.start == "oldest"
            else protocol.StartCode.LATEST
        )
        return protocol.Hello(
            instance=self.instance, pid=os.getpid(), topics=self.settings.topic_mask, start=start
        )

    def _answer(self, frame: Frame) -> tuple[protocol.Welcome, list[int]]:
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

    def _attach(self, msg: protocol.Welcome, fds: list[int], old: Subscriber | None) -> None:
        """Map the segment from the Welcome's fds; on a resume replace ``old``."""
        eventfd, segfd, lifeline = OwnedFd(fds[0]), OwnedFd(fds[1]), OwnedFd(fds[2])
        try:
            new = Subscriber.attach(
                index=msg.reader_index,
                fd=segfd,
                eventfd=eventfd,
                mutex_timeout=self.cfg.segment.mutex_timeout,
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
                "Failed to attach since the segment fd "
                "is of another generation than the Welcome says",
            )
        if old is not None:
            # A writer that no longer held our entry (we came back after its
            # reconnect_grace) started a new one at the oldest record the
            # ring still holds: what lies between is lost, and counted.
            skipped = max(0, msg.start_cursor - old.cursor) if msg.resumed else 0
            new.carry_over(old.delivered, old.lost + skipped)
            if not msg.resumed:
                self.log.warning(
                    "generation_changed",
                    generation=msg.generation,
                    old_generation=old.segment.generation,
                    seq=msg.start_cursor,
                    reason="the restarted writer could not adopt the old segment; "
                    "reading starts over in the new generation",
                )
            old.close()
        if self.lifeline is not None:
            self.lifeline.close()
        self.sub, self.lifeline, self.lifeline_hup = new, lifeline, False
        self.welcome = msg
        self._writer_pid = new.segment.writer_pid
        self.log.info(
            logs.ATTACHED,
            generation=msg.generation,
            index=msg.reader_index,
            seq=msg.start_cursor,
            capacity=msg.capacity,
            slot_size=msg.slot_size,
            policy=msg.policy.name.lower().replace("_", "-"),
            writer_pid=new.segment.writer_pid,
            resumed=msg.resumed,
        )

    def _exchange_hello(self, hello: protocol.Hello, timeout: float) -> Frame:
        """Send the Hello and return the writer's answer (a Welcome or a Refuse)."""
        assert self.conn is not None
        try:
            self.conn.send(hello.encode(), timeout=timeout)
        except PeerClosed:
            pass  # refused before our Hello arrived (not allowed): its Refuse is queued
        try:
            return self.conn.recv(timeout=timeout)
        except PeerClosed:
            pass
        # Linux: a writer that refuses and closes with our Hello still unread
        # in its queue makes our next recv fail with ECONNRESET although its
        # Refuse is queued here; the error is reported (and cleared) first,
        # so one more recv returns the Refuse, or EOF.
        try:
            return self.conn.recv(timeout=timeout)
        except PeerClosed:
            raise ReaderExit(
                EXIT_FAILURE,
                logs.WRITER_LOST,
                "Failed to attach since the writer closed the connection during the handshake",
            ) from None

    # -- running -------------------------------------------------------------------

    def _on_records(self, records: list[RawRecord]) -> None:
        assert self.sink is not None
        self.sink.write(records)

    def _on_control(self, events: int) -> None:
        assert self.conn is not None and self.loop is not None and self.sub is not None
        try:
            for frame in self.conn.on_readable():
                with frame:
                    msg = protocol.decode(frame.body, len(frame.fds))
                if isinstance(msg, protocol.Detach):
                    self.log.info("writer_detach", code=msg.code.name.lower(), reason=msg.reason)
                    if msg.code == protocol.DetachCode.EVICTED:
                        self.stop_reason = "evicted"
                        self.loop.stop()
        except (PeerClosed, ChannelError, protocol.ProtocolError) as exc:
            self.reactor.remove(self.conn.fileno())
            self.conn.close()
            if self.sub.active:
                # The writer died (or broke the protocol) without clearing
                # the flag: what is committed is still valid and gets
                # drained; then we wait for a restarted writer (or exit).
                self.stop_reason = "writer_lost"
                self.log.error(
                    logs.WRITER_LOST,
                    generation=self.sub.segment.generation,
                    writer_pid=self.sub.segment.writer_pid,
                    seq=self.sub.cursor,
                    error=str(exc),
                )
                self.loop.stop()

    def _on_lifeline(self, events: int) -> None:
        """The lifeline hung up: no writer holds the bus, and none is being restarted."""
        self.lifeline_hup = True
        if self.lifeline is not None:
            self.reactor.remove(self.lifeline.fileno())
        if self.loop is not None and self.sub is not None and self.sub.active:
            if self.stop_reason is None:
                self.stop_reason = "writer_lost"
            self.loop.stop()

    def _on_wake(self, events: int) -> None:
        """While waiting for a restarted writer: our eventfd fired."""
        assert self.sub is not None and self.sub.eventfd is not None
        try:
            os.read(self.sub.eventfd.fileno(), 8)
        except BlockingIOError:
            return
        self._woken = True

    def _on_signal(self, signum: signal.Signals) -> None:
        handler = getattr(self, f"handle_{signum.name.lower()}", None)
        if handler is not None:
            handler()

    def handle_sigterm(self) -> None:
        """systemctl stop: drain what is there, detach, exit 0."""
        self._stop("SIGTERM")

    def handle_sigint(self) -> None:
        """Ctrl-C: as SIGTERM."""
        self._stop("SIGINT")

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stopping = True
        if self.loop is not None:
            self.loop.stop()

    def handle_sighup(self) -> None:
        """Nothing to reload in a reader (restart it to apply new settings)."""
        self.log.info("reload_ignored", reason="restart the reader to apply new settings")

    def _tick(self) -> float | None:
        """Periodic stats and watchdog; returns seconds until the next one."""
        now = time.monotonic()
        if now >= self._next_stats:
            self._stats(now)
            self._next_stats = now + self.settings.stats_interval
        nxt = self._next_stats
        if self._watchdog:
            if now >= self._next_watchdog:
                sdnotify.watchdog()
                self._next_watchdog = now + self._watchdog / 2
            nxt = min(nxt, self._next_watchdog)
        return max(0.0, nxt - time.monotonic())

    def _stats(self, now: float) -> None:
        sub = self.sub
        assert sub is not None
        t0, d0 = self._stats_mark
        rate = (sub.delivered - d0) / (now - t0) if now > t0 else 0.0
        self._stats_mark = (now, sub.delivered)
        lag = sub.available()
        level = self.log.warning if sub.lost > self._reported_lost else self.log.info
        level(
            logs.STATS,
            delivered=sub.delivered,
            lost=sub.lost,
            seq=sub.cursor,
            lag=lag,
            rate=round(rate, 1),
            generation=sub.segment.generation,
        )
        self._reported_lost = sub.lost
        sdnotify.status(
            f"{sub.delivered} records delivered, {sub.lost} lost, lag {lag}, {rate:.1f}/s"
        )

    def run(self) -> int:
        """Attach, read until the writer goes for good (or we are stopped), detach.

        A writer that clears the active flag or vanishes may be restarting
        (``systemctl restart``, or a crash with ``Restart=on-failure``): we
        drain, then wait up to ``reconnect_timeout`` for it.  The lifeline
        tells us when no writer is coming: it hangs up once neither the
        writer nor systemd's fd store holds its write end.
        """
        if self.sink is None:
            self.sink = make_sink(self.settings.sink)
        self.connect()
        self._wakeup = SignalWakeup(
            self.reactor, [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], self._on_signal
        )
        sdnotify.ready()
        while True:
            outcome = self._session()
            sub = self.sub
            assert sub is not None
            if outcome == "stopped":
                self.log.info(
                    logs.DRAINED,
                    delivered=sub.delivered,
                    lost=sub.lost,
                    seq=sub.cursor,
                    generation=sub.segment.generation,
                    reason=self.stop_reason,
                )
                self._detach(protocol.DetachCode.NORMAL, self.stop_reason or "stopped")
                return EXIT_OK
            if outcome == "evicted":
                raise ReaderExit(
                    EXIT_FAILURE,
                    logs.EXITING,
                    "the writer evicted this reader",
                    reason="evicted",
                    delivered=sub.delivered,
                    lost=sub.lost,
                    seq=sub.cursor,
                )
            if outcome == "drained":
                self.log.info(
                    logs.WRITER_INACTIVE, generation=sub.segment.generation, seq=sub.cursor
                )
                self.log.info(
                    logs.DRAINED,
                    delivered=sub.delivered,
                    lost=sub.lost,
                    seq=sub.cursor,
                    generation=sub.segment.generation,
                )
                self._detach(protocol.DetachCode.NORMAL, "drained")
            if self._await_writer():
                continue
            if self.stopping or outcome == "drained":
                self.stop_reason = self.stop_reason or "writer_stopped"
                return EXIT_OK
            raise ReaderExit(
                EXIT_FAILURE,
                logs.EXITING,
                "the writer vanished without clearing the active flag and did not come back",
                reason="writer_lost",
                delivered=sub.delivered,
                lost=sub.lost,
                seq=sub.cursor,
            )

    def _session(self) -> str:
        """Read on one connection; returns drained, writer_lost, evicted or stopped."""
        sub, conn, lifeline = self.sub, self.conn, self.lifeline
        assert sub is not None and conn is not None and lifeline is not None
        self.stop_reason = None if not self.stopping else self.stop_reason
        self.loop = ReaderLoop(sub, self._on_records, reactor=self.reactor, tick=self._tick)
        self.reactor.add(conn.fileno(), self._on_control)
        if not self.lifeline_hup:
            self.reactor.add(lifeline.fileno(), self._on_lifeline, 0)  # 0: hang-up only
        try:
            result = LoopExit.STOPPED if self.stopping else self.loop.run()
            # Deliver what is committed whatever happened: nothing is
            # dropped on the floor.
            self.loop.drain()
        finally:
            self.loop.close()
            self.loop = None
            self.reactor.remove(lifeline.fileno())
            if not conn.closed:
                self.reactor.remove(conn.fileno())
        if result is LoopExit.DRAINED:
            return "drained"
        if self.stop_reason in ("writer_lost", "evicted"):
            return self.stop_reason
        return "stopped"

    def _await_writer(self) -> bool:
        """Wait for a restarted writer and resume with it; False when none comes.

        Two signs tell a successor: a wake-up through our (stored) eventfd,
        and its pid in the old segment's header, which it writes before it
        wakes anyone (adopting in place, or by copy).  The header is needed
        because a slow reader's read loop may have taken the successor's
        wake-up together with the old writer's shutdown wake-up in one
        eventfd read.  Once the old writer has closed our connection (see
        :meth:`_hang_up`) every wake-up of its own is in, so what is pending
        then is dropped, and any later wake-up is a successor's.
        """
        sub = self.sub
        assert sub is not None
        self._hang_up()
        timeout = self.settings.reconnect_timeout
        deadline = time.monotonic() + timeout
        self._on_wake(0)
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
                self.connect(resume=True, deadline=deadline)
            except (ReaderExit, ChannelError, protocol.ProtocolError) as exc:
                failures += 1
                if failures == 1:  # the retries say nothing new
                    self.log.warning("resume_failed", error=str(exc))
                if self.conn is not None:
                    self.conn.close()
            else:
                return True
            # A successor that is up but did not take us (yet) gets another
            # try after a pause; otherwise only a new wake-up brings one.
            ready = self._writer_changed()
            if ready:
                self._wait_for_wake(min(deadline, time.monotonic() + pause))
                pause = min(pause * 2, 1.0)
                if self.stopping or self.lifeline_hup or time.monotonic() >= deadline:
                    return False

    def _writer_changed(self) -> bool:
        """Whether another writer than the one we attached to stamped our segment."""
        assert self.sub is not None and self.welcome is not None
        return self.sub.segment.writer_pid != self._writer_pid

    def _hang_up(self) -> None:
        """Close the control connection once the writer has closed its end.

        The writer closes a drained reader's connection only after it cleared
        the active flag and wrote every reader's eventfd; waiting for that
        close (at most handshake_timeout) means no wake-up of its shutdown
        can arrive after we start waiting for its successor, and be taken
        for the successor's.
        """
        conn = self.conn
        if conn is None or conn.closed:
            return
        try:
            while True:
                conn.recv(timeout=self.cfg.control.handshake_timeout).close()
        except (PeerClosed, ChannelError, OSError):
            pass  # closed (or silent for too long): either way we are done with it
        conn.close()

    def _wait_for_wake(self, deadline: float) -> bool:
        """Sleep until our eventfd fires (True), or the lifeline hangs up, we are stopped
        or the deadline passes (False)."""
        sub, lifeline = self.sub, self.lifeline
        assert sub is not None and sub.eventfd is not None and lifeline is not None
        efd, lfd = sub.eventfd.fileno(), lifeline.fileno()
        self._woken = False
        self.reactor.add(efd, self._on_wake)
        if not self.lifeline_hup:
            self.reactor.add(lfd, self._on_lifeline, 0)
        try:
            while not self.stopping and not self.lifeline_hup:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.reactor.poll(left)
                if self._woken:
                    return True
            return False
        finally:
            # Unregister before connect() closes these fds: the restarted
            # writer hands us the *same* eventfd (from its fd store), and
            # epoll keys a registration on the open file description, so an
            # fd closed while registered would keep firing under its old
            # number for as long as the new fd keeps the description alive.
            self.reactor.remove(efd)
            self.reactor.remove(lfd)

    def detach(self, code: protocol.DetachCode, reason: str) -> None:
        """Tell the writer we leave (best effort), so it logs a detach, not a loss."""
        self._detach(code, reason)

    def _detach(self, code: protocol.DetachCode, reason: str) -> None:
        if self.conn is None or self.conn.closed:
            return
        if self.sub is not None:
            # A one-record read may have left its cursor for later: store it
            # now, so the writer's reader_detached reports every record read.
            self.sub.release()
        try:
            self.conn.send(protocol.Detach(code, reason).encode(), timeout=1.0)
        except ChannelError:
            pass  # the writer is gone already: nothing to tell

    def close(self) -> None:
        """Release everything (never unlinks anything: the writer owns the segment)."""
        if self._wakeup is not None:
            self._wakeup.close()
        if self.loop is not None:
            self.loop.close()
        if self.conn is not None:
            self.conn.close()
        if self.sub is not None:
            self.sub.close()
        if self.lifeline is not None:
            self.lifeline.close()
        if self.sink is not None:
            try:
                self.sink.close()
            except (OSError, ShmdError) as exc:
                self.log.warning("sink_failed", error=str(exc))
        self.reactor.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shm-reader``."""
    parser = base_parser("shm-reader", "An shmd reader daemon (the unit shm-reader@INSTANCE).")
    parser.add_argument(
        "--instance",
        default=os.environ.get("SHMD_INSTANCE"),
        help="this reader's name: its identity in the segment, the logs and "
        "shmctl (the unit passes %%i; default $SHMD_INSTANCE)",
    )
    args = parser.parse_args(argv)
    if not args.instance:
        parser.error("--instance is required (or set SHMD_INSTANCE)")
    try:
        protocol.Hello(instance=args.instance, pid=os.getpid())
    except protocol.ProtocolError as exc:
        parser.error(f"--instance {args.instance!r}: {exc.reason}")
    cfg = load_or_exit(args, "reader", args.instance)
    settings = cfg.reader_settings(args.instance)
    if args.check_config:
        return check_config(cfg)
    log = setup_logging(cfg, args, "reader", args.instance)
    daemon = ReaderDaemon(cfg, settings, args.instance, log)
    status = EXIT_FAILURE
    try:
        status = daemon.run()
        log.info(logs.EXITING, status=status, reason=daemon.stop_reason or "drained")
    except ReaderExit as exc:
        status = exc.status
        (log.info if status == EXIT_OK else log.error)(
            exc.event, error=str(exc), status=status, **exc.fields
        )
        if exc.event != logs.EXITING:
            log.error(logs.EXITING, status=status, reason=exc.event)
    except ReaderEvicted as exc:
        log.error(logs.EXITING, status=EXIT_FAILURE, reason="evicted", error=str(exc))
    except SinkError as exc:
        log.error("sink_failed", error=str(exc))
        daemon.detach(protocol.DetachCode.ERROR, "sink failed")
        log.error(logs.EXITING, status=EXIT_FAILURE, reason="sink_failed")
    except (ShmdError, OSError) as exc:
        log.error(logs.EXITING, status=EXIT_FAILURE, reason="error", error=str(exc))
    finally:
        daemon.close()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
