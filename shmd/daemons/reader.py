"""``shm-reader --instance NAME``: one reader daemon (the template ``shm-reader@NAME``).

A :class:`shmd.client.Subscription` (the same a program gets from
:func:`shmd.connect`) with a sink, signals and timers: it connects to the
writer's control socket (connecting may be what starts the writer, through
socket activation), says Hello, receives its eventfd and the segment fd in
the Welcome, maps the segment (control part read-write, since the
process-shared mutex lives there and locking writes to it; the ring
read-only), and reads with the control socket, the lifeline and a signal
pipe in the same epoll; a restarted writer is resumed with.

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

from shmd._sys.reactor import Repeating
from shmd.bus.subscriber import Subscriber
from shmd.client import Options, Subscription
from shmd.config import Config, ReaderSettings
from shmd.control import protocol
from shmd.daemons import logs, sdnotify
from shmd.daemons.process import (
    EXIT_FAILURE,
    EXIT_NOPERMISSION,
    EXIT_OK,
    SignalDispatch,
    base_parser,
    check_config,
    load_or_exit,
    setup_logging,
)
from shmd.daemons.sinks import BoundSink, RecordSink, SinkError, make_sink
from shmd.errors import (
    BusUnavailable,
    ConnectError,
    NotAdmitted,
    ReaderEvicted,
    Refused,
    ShmdError,
    WriterGone,
)

__all__ = ["ReaderDaemon", "ReaderExit", "client_options", "main"]


class ReaderExit(Exception):
    """Leave the daemon with this status after logging ``event``."""

    def __init__(self, status: int, event: str, message: str, **fields: object) -> None:
        super().__init__(message)
        self.status = status
        self.event = event
        self.fields = fields


def client_options(cfg: Config, settings: ReaderSettings, instance: str) -> Options:
    """What the reader ``instance`` asks of the writer, from the config."""
    return Options(
        socket=cfg.control.socket,
        name=instance,
        topics=settings.topic_mask,
        start=settings.start,
        wait=settings.wait_strategy,
        timeout=settings.reconnect_timeout,
        handshake_timeout=cfg.control.handshake_timeout,
        socket_type=cfg.control.type,
        max_message=cfg.control.max_message,
        mutex_timeout=cfg.segment.mutex_timeout,
        durable=settings.durable_grace,
    )


def exit_for(exc: ConnectError) -> ReaderExit:
    """The daemon's exit for a failed attach: 77 when not admitted, else 1."""
    if isinstance(exc, NotAdmitted):
        return ReaderExit(EXIT_NOPERMISSION, "refused", str(exc), code="not_allowed")
    if isinstance(exc, Refused):
        return ReaderExit(EXIT_FAILURE, "refused", str(exc), code=exc.code)
    if isinstance(exc, BusUnavailable):
        return ReaderExit(EXIT_FAILURE, logs.WRITER_LOST, str(exc))
    return ReaderExit(EXIT_FAILURE, "refused", str(exc))


class ReaderDaemon:
    """One reader's subscription (shmd.client), sink, signals and timers."""

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
        #: The subscription: the handshake, the reading, the resume after a
        #: writer restart.  Its reactor is ours: signals and timers go there.
        self.client = Subscription(client_options(cfg, settings, instance), log=log)
        self.reactor = self.client.reactor
        #: The sink; built from the settings in run() unless given (shmctl tail).
        self.sink: RecordSink | None = sink
        self._signals: SignalDispatch | None = None
        self._stats_mark = (time.monotonic(), 0)
        self._reported_lost = 0
        self._watchdog = sdnotify.watchdog_interval()
        self._timers: list[Repeating] = []

    @property
    def sub(self) -> Subscriber | None:
        """The current subscriber (a new one after each resume)."""
        return self.client.sub

    @property
    def stop_reason(self) -> str | None:
        return self.client.stop_reason

    def connect(self) -> None:
        """Attach (retrying while the socket is missing or refusing, up to reconnect_timeout)."""
        try:
            self.client.open()
        except ConnectError as exc:
            raise exit_for(exc) from None

    def stop(self, reason: str) -> None:
        """Deliver what is committed by now, detach, exit 0."""
        self.client.stop(reason)

    # -- signals (SignalDispatch calls these) ------------------------------------------

    def handle_sigterm(self) -> None:
        """systemctl stop: drain what is there, detach, exit 0."""
        self.stop("SIGTERM")

    def handle_sigint(self) -> None:
        """Ctrl-C: as SIGTERM."""
        self.stop("SIGINT")

    def handle_sighup(self) -> None:
        """Nothing to reload in a reader (restart it to apply new settings)."""
        self.log.info("reload_ignored", reason="restart the reader to apply new settings")

    # -- periodic work (reactor timers) -------------------------------------------------

    def _start_timers(self) -> None:
        """The stats line at once and every stats_interval; the watchdog ping (WatchdogSec=)."""
        every = self.reactor.call_every
        self._timers = [every(self.settings.stats_interval, self._stats, first=0.0)]
        if self._watchdog:
            self._timers.append(every(self._watchdog / 2, sdnotify.watchdog, first=0.0))

    def _stats(self) -> None:
        sub = self.client.sub
        assert sub is not None
        now = time.monotonic()
        t0, d0 = self._stats_mark
        rate = (sub.delivered - d0) / (now - t0) if now > t0 else 0.0
        self._stats_mark = (now, sub.delivered)
        lag = sub.available()
        level = self.log.warning if sub.lost > self._reported_lost else self.log.info
        durable: dict[str, int] = {}
        if self.settings.durable_grace:
            durable["redelivered"] = self.client.redelivered
        level(
            logs.STATS,
            delivered=sub.delivered,
            lost=sub.lost,
            seq=sub.cursor,
            lag=lag,
            rate=round(rate, 1),
            generation=sub.segment.generation,
            **durable,
        )
        self._reported_lost = sub.lost
        sdnotify.status(
            f"{sub.delivered} records delivered, {sub.lost} lost, lag {lag}, {rate:.1f}/s"
        )

    # -- running -------------------------------------------------------------------

    def run(self) -> int:
        """Attach, read until the writer goes for good (or we are stopped), detach.

        A writer that clears the active flag or vanishes may be restarting
        (``systemctl restart``, or a crash with ``Restart=on-failure``): the
        subscription drains, then waits up to ``reconnect_timeout`` for it
        and resumes.  The lifeline tells it when no writer is coming.
        """
        if self.sink is None:
            # A zenoh sink opens its session here, in this process, before READY.
            self.sink = make_sink(self.settings.sink)
        self.connect()
        if isinstance(self.sink, BoundSink):
            self.sink.bind(self.client, all_topics=self.settings.topics == "all")
        self._signals = SignalDispatch(self.reactor, self, self.log)
        sdnotify.ready()
        self._start_timers()
        client = self.client
        try:
            for batch in client.batches():
                self.sink.write(batch)
        except WriterGone as exc:
            raise self._exit("writer_lost", exc) from None
        except ReaderEvicted as exc:
            raise self._exit("evicted", exc) from None
        finally:
            for timer in self._timers:
                timer.cancel()
        return EXIT_OK

    def _exit(self, reason: str, exc: ShmdError) -> ReaderExit:
        sub = self.client.sub
        assert sub is not None
        return ReaderExit(
            EXIT_FAILURE,
            logs.EXITING,
            str(exc),
            reason=reason,
            delivered=sub.delivered,
            lost=sub.lost,
            seq=sub.cursor,
        )

    def detach(self, code: protocol.DetachCode, reason: str) -> None:
        """Tell the writer we leave (best effort), so it logs a detach, not a loss."""
        self.client.detach(code, reason)

    def close(self) -> None:
        """Release everything (never unlinks anything: the writer owns the segment)."""
        if self._signals is not None:
            self._signals.close()
        self.client.close()
        if self.sink is not None:
            try:
                self.sink.close()
            except (OSError, ShmdError) as exc:
                self.log.warning("sink_failed", error=str(exc))


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
