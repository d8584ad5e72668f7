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

import os
import sys
import time

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor, Repeating
from shmd.bus.loop import LoopExit, ReaderLoop
from shmd.bus.subscriber import RawRecord, Subscriber
from shmd.config import Config, ReaderSettings
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import ChannelError, PeerClosed
from shmd.daemons import attach, logs, sdnotify
from shmd.daemons.attach import ReaderExit
from shmd.daemons.process import (
    EXIT_FAILURE,
    EXIT_OK,
    SignalDispatch,
    base_parser,
    check_config,
    load_or_exit,
    setup_logging,
)
from shmd.daemons.sinks import RecordSink, SinkError, make_sink
from shmd.errors import ReaderEvicted, ShmdError

__all__ = ["ReaderDaemon", "ReaderExit", "main"]


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
        self._signals: SignalDispatch | None = None
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
        self._stats_mark = (time.monotonic(), 0)
        self._reported_lost = 0
        self._watchdog = sdnotify.watchdog_interval()
        #: The stats line and (with WatchdogSec=) the watchdog ping run on
        #: reactor timers while a session reads (see _session); _due holds
        #: when each is next due meanwhile (at once in the first session).
        self._timers: list[Repeating] = []
        self._due = [0.0, 0.0]

    # -- attaching ---------------------------------------------------------------

    def connect(self, *, resume: bool = False, deadline: float | None = None) -> None:
        """Connect (retrying while the socket is missing or refusing), Hello, Welcome.

        With ``resume``, ask to continue at our cursor in our generation
        (after the writer restarted); the new segment fd replaces the old
        mapping and the counters carry over.
        """
        if deadline is None:
            deadline = time.monotonic() + self.settings.reconnect_timeout
        if self.conn is not None:
            self.conn.close()
        old = self.sub if resume else None
        got = attach.attach_to_writer(
            self.cfg, self.settings, self.instance, self.log, old=old, deadline=deadline
        )
        if self.lifeline is not None:
            self.lifeline.close()
        self.conn, self.sub, self.lifeline = got.conn, got.sub, got.lifeline
        self.welcome, self.lifeline_hup = got.welcome, False
        self._writer_pid = got.sub.segment.writer_pid

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

    # -- signals (SignalDispatch calls these) ------------------------------------------

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

    # -- periodic work (reactor timers, while a session reads) --------------------------

    def _start_timers(self) -> None:
        """Arm the stats and watchdog timers where the last session left them."""
        now = time.monotonic()
        every = self.reactor.call_every
        self._timers = [every(self.settings.stats_interval, self._stats, first=self._due[0] - now)]
        if self._watchdog:
            period = self._watchdog / 2
            self._timers.append(every(period, sdnotify.watchdog, first=self._due[1] - now))

    def _stop_timers(self) -> None:
        for i, timer in enumerate(self._timers):
            timer.cancel()
            self._due[i] = timer.when
        self._timers = []

    def _stats(self) -> None:
        sub = self.sub
        assert sub is not None
        now = time.monotonic()
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
        self._signals = SignalDispatch(self.reactor, self, self.log)
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
                self.detach(protocol.DetachCode.NORMAL, self.stop_reason or "stopped")
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
                self.detach(protocol.DetachCode.NORMAL, "drained")
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
        # The loop runs the reactor's due timers every turn, so stats and
        # watchdog pings keep coming while records keep it from sleeping.
        self.loop = ReaderLoop(
            sub, self._on_records, reactor=self.reactor, tick=self.reactor.run_timers
        )
        self.reactor.add(conn.fileno(), self._on_control)
        if not self.lifeline_hup:
            self.reactor.add(lifeline.fileno(), self._on_lifeline, 0)  # 0: hang-up only
        self._start_timers()
        try:
            result = LoopExit.STOPPED if self.stopping else self.loop.run()
            # Deliver what is committed whatever happened: nothing is
            # dropped on the floor.
            self.loop.drain()
        finally:
            self._stop_timers()
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
        :func:`attach.hang_up`) every wake-up of its own is in, so what is pending
        then is dropped, and any later wake-up is a successor's.
        """
        sub = self.sub
        assert sub is not None
        if self.conn is not None:
            attach.hang_up(self.conn, self.cfg.control.handshake_timeout)
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

    def _wait_for_wake(self, deadline: float) -> bool:
        """Sleep until our eventfd fires (True), or the lifeline hangs up, we are stopped
        or the deadline passes (False)."""
        sub, lifeline = self.sub, self.lifeline
        assert sub is not None and sub.eventfd is not None and lifeline is not None
        efd, lfd = sub.eventfd.fileno(), lifeline.fileno()
        left = deadline - time.monotonic()
        if self.stopping or self.lifeline_hup or left <= 0:
            return False
        self._woken = False
        self.reactor.add(efd, self._on_wake)
        if not self.lifeline_hup:
            self.reactor.add(lfd, self._on_lifeline, 0)
        try:
            self.reactor.run_until(lambda: self._woken or self.stopping or self.lifeline_hup, left)
            return self._woken
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
        if self._signals is not None:
            self._signals.close()
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
