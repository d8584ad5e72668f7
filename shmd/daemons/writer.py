"""``shm-writer``: owns the segment, the readers' eventfds and the control listener.

One thread, one epoll loop (:class:`~shmd._sys.reactor.Reactor`) with its
timers.  Signal handlers only queue the signal and wake the loop; the loop
dispatches to ``handle_<signal>`` methods (gunicorn's arbiter, see
:class:`~shmd.daemons.process.SignalDispatch`).  The connections are the
:class:`~shmd.daemons.server.ControlServer`'s; what survives a restart is
in systemd's fd store (:mod:`shmd.daemons.fdstore`).  The writer itself
keeps the configuration and its reload, the source, the periodic work and
the shutdown.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor
from shmd.bus.publisher import Publisher
from shmd.config import Config, ConfigError, TickerSourceConfig, diff_reloadable, load_config
from shmd.daemons import fdstore, logs, sdnotify
from shmd.daemons.process import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    SignalDispatch,
    base_parser,
    check_config,
    fail,
    load_or_exit,
    setup_logging,
)
from shmd.daemons.server import ControlServer
from shmd.daemons.sources import AnySource, PythonSource, SourceError, TickerSource, make_source
from shmd.daemons.zenoh_source import ZenohSource
from shmd.errors import PayloadTooLarge, ShmdError


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
        self.server: ControlServer | None = None
        self.source: AnySource | None = None
        self.max_payload = cfg.segment.payload_max
        self.lock = threading.Lock()  # publisher calls from a python source thread
        self._signals: SignalDispatch | None = None
        self._shutting_down = False
        self._exit: int | None = None
        self._final_status = EXIT_OK  # what a completed shutdown exits with
        self._rate_mark = (time.monotonic(), 0)
        self.rate = 0.0
        #: The lifeline pipe: readers get the read end; its write end lives
        #: here and in systemd's fd store, so it hangs up only when the
        #: writer is gone and not coming back.
        self.lifeline_r: OwnedFd | None = None
        self.lifeline_w: OwnedFd | None = None
        #: Stored eventfds of readers of a stored segment we could not adopt.
        self._orphans: list[OwnedFd] = []

    @property
    def shutting_down(self) -> bool:
        """The termination flow has begun (the active flag is cleared)."""
        return self._shutting_down

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop after ``delay`` seconds; callable from any thread (sources)."""
        self.reactor.call_later(delay, fn)

    # -- start-up ------------------------------------------------------------------

    def start(self) -> None:
        """Adopt the stored segment or create one, take or bind the listener, start the source."""
        recovered = fdstore.recover(self.cfg, self.log)
        self.pub = recovered.pub
        self.lifeline_r, self.lifeline_w = recovered.lifeline_r, recovered.lifeline_w
        self._orphans = recovered.orphans
        self.server = ControlServer(
            self, self.pub, recovered.control, self.lifeline_r, recovered.restored
        )
        self._signals = SignalDispatch(self.reactor, self, self.log)
        self.source = make_source(self.cfg.writer.source)
        self.source.start(self)
        self.log.info(
            logs.LISTENER_READY,
            socket=self.cfg.control.socket,
            type=self.cfg.control.type,
            activated=self.server.bound_path is None,
            generation=self.pub.generation,
        )
        if self._orphans:
            orphans, self._orphans = self._orphans, []
            fdstore.wake_orphans(orphans, self.pub.generation, self.log)
        restored = self.server.restored
        if restored:
            grace = self.cfg.writer.reconnect_grace
            keep = self.server.keep_durable
            self.reactor.call_later(grace, lambda: restored.expire(grace, keep))
            # "The writer is back": readers waiting for us reconnect now.
            self.pub.wake_all()
            self.log.info(
                logs.READERS_RESTORED,
                generation=self.pub.generation,
                grace=grace,
                readers=",".join(restored.names()),
            )
        self.reactor.call_later(self.cfg.writer.status_interval, self._status_tick)
        interval = sdnotify.watchdog_interval()
        if interval:
            self._watchdog(interval / 2)
        sdnotify.ready(self._status_text())

    # -- publishing (sources call this; thread-safe) ---------------------------------

    def publish_batch(self, payloads: Sequence[bytes | memoryview], topic: int) -> None:
        """Publish for a source; a refused record is logged, never fatal."""
        assert self.pub is not None
        try:
            with self.lock:
                # Checked under the lock begin_shutdown holds to clear the
                # active flag: a source thread's record is either committed
                # before the flag clears (so every reader drains it) or not
                # published at all, never committed after readers left.
                if self._shutting_down:
                    return
                self.pub.publish_batch(payloads, topic)
        except (PayloadTooLarge, ShmdError) as exc:
            named: dict[str, str] = {}
            if self.cfg.topic_name(topic) is not None:
                named["topic_name"] = self.cfg.segment.topics.label(topic)
            self.log.warning("record_refused", error=str(exc), topic=topic, **named)
        if self.pub.evictions and threading.current_thread() is threading.main_thread():
            self._handle_evictions()

    def source_finished(self, reason: str) -> None:
        """A finite source ended: shut down cleanly (exit 1 if it failed)."""
        self.log.info("source_finished", reason=reason)
        if isinstance(self.source, PythonSource) and self.source.error is not None:
            # A source that raised is a failure: Restart=on-failure restarts it.
            self._final_status = EXIT_FAILURE
        self.begin_shutdown(f"source finished: {reason}")

    def _handle_evictions(self) -> None:
        assert self.server is not None
        self.server.handle_evictions()

    def readers_gone(self) -> None:
        """The control server's word that the last reader left while we shut down."""
        self._finish_shutdown()

    # -- periodic work ------------------------------------------------------------------

    def _attached(self) -> int:
        return len(self.server.attached()) if self.server is not None else 0

    def _status_text(self) -> str:
        assert self.pub is not None
        n = self._attached()
        text = (
            f"{n} reader{'s' if n != 1 else ''} attached, {self.pub.write_seq} records "
            f"published, {self.rate:.1f}/s, generation {self.pub.generation}"
        )
        if isinstance(self.source, ZenohSource):
            lost, refused = self.source.totals()
            text += f", bridge {lost} lost, {refused} refused"
        return text

    def _status_tick(self) -> None:
        assert self.pub is not None and self.server is not None
        now = time.monotonic()
        t0, s0 = self._rate_mark
        seq = self.pub.write_seq
        if now > t0:
            self.rate = (seq - s0) / (now - t0)
        self._rate_mark = (now, seq)
        self.pub.heartbeat(self.rate)
        self.server.report_overruns()
        if self.pub.evictions:
            self._handle_evictions()
        sdnotify.status(self._status_text())
        if not self._shutting_down:
            self.reactor.call_later(self.cfg.writer.status_interval, self._status_tick)

    def _watchdog(self, period: float) -> None:
        sdnotify.watchdog()
        self.reactor.call_later(period, lambda: self._watchdog(period))

    # -- signals (SignalDispatch calls these) ------------------------------------------------

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
                isinstance(self.source, TickerSource)
                and isinstance(source, TickerSourceConfig)
                and isinstance(new.writer.source, TickerSourceConfig)
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
                    old.writer,
                    source=source,
                    status_interval=new.writer.status_interval,
                    max_durable_grace=new.writer.max_durable_grace,
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
        # The source first: what it takes in until it is closed (a zenoh
        # source's samples, already counted as received) is still published.
        if self.source is not None:
            self.source.close()
        self._shutting_down = True
        sdnotify.stopping()
        with self.lock:
            self.pub.deactivate()
        self.log.info(
            logs.ACTIVE_CLEARED,
            reason=reason,
            seq=self.pub.write_seq,
            generation=self.pub.generation,
            readers=self._attached(),
        )
        if self.server is not None:
            self.server.refuse_handshakes()
        if not self._attached():
            self._finish_shutdown()
            return
        grace = self.cfg.writer.shutdown_grace
        self.reactor.call_later(grace, self._grace_expired)

    def _grace_expired(self) -> None:
        if self._exit is not None:
            return
        waiting = [p.instance for p in self.server.attached()] if self.server else []
        self.log.warning(
            logs.SHUTDOWN_GRACE_EXPIRED,
            readers=",".join(filter(None, waiting)),
            grace=self.cfg.writer.shutdown_grace,
        )
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._exit is not None:
            return
        if self.server is not None:
            self.server.drop_all(detached=self._shutting_down)
        self._exit = self._final_status

    def close(self) -> None:
        """Release everything; unlink what we own per configuration."""
        if self.source is not None:
            self.source.close()
        if self.server is not None:
            self.server.close()
        if self._signals is not None:
            self._signals.close()
        if self.pub is not None:
            self.pub.close()
            if self.cfg.segment.unlink_on_exit:
                self.pub.unlink()
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
            self.reactor.poll(None)  # until an fd is ready or a timer is due
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
