"""Where the writer's records come from: ticker, FIFO, stdin or a Python callable.

A source is started with a :class:`SourceHost` (the writer) and publishes
through it.  The FIFO and stdin sources read framed bytes without blocking
the writer's loop; :class:`Deframer` (pure, no I/O) splits them into
payloads and refuses oversized frames without losing the frames around them.
:data:`SOURCES` maps each source type's config dataclass to its class.
"""

from __future__ import annotations

import inspect
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import structlog

from shmd._sys.fd import OwnedFd
from shmd._sys.reactor import Reactor
from shmd.config import (
    FifoSourceConfig,
    PythonSourceConfig,
    SourceConfig,
    StdinSourceConfig,
    TickerSourceConfig,
    ZenohSourceConfig,
)
from shmd.control.fields import TopicMap
from shmd.daemons.plugin import load_callable
from shmd.errors import ShmdError

if TYPE_CHECKING:
    from shmd.daemons.zenoh_source import ZenohSource

log = structlog.get_logger("shmd.daemons.sources")

_LEN = 4  # the length-prefix framing: u32 little-endian, then the payload


class SourceError(ShmdError):
    """A source cannot start."""


class SourceHost(Protocol):
    """What a source may ask of the writer."""

    reactor: Reactor
    max_payload: int

    def publish_batch(self, payloads: Sequence[bytes | memoryview], topic: int) -> None:
        """Publish records (thread-safe)."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer's loop after ``delay`` seconds."""

    def source_finished(self, reason: str) -> None:
        """A finite source ended (stdin EOF, generator exhausted)."""


@dataclass
class Deframer:
    """Split a byte stream into payloads: ``newline`` or ``length`` (u32 LE prefix) framing.

    Oversized frames are skipped whole (the bytes of a too-long line up to
    its newline, or the announced length) and reported; frames before and
    after them are delivered.
    """

    framing: str
    max_payload: int
    _buf: bytearray = field(default_factory=bytearray)
    _skip: int = 0  # length framing: body bytes of a refused frame still to discard
    _skipping_line: bool = False  # newline framing: inside a refused long line

    @property
    def partial(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf) + self._skip

    def reset(self) -> int:
        """Forget an incomplete frame (its producer went away); returns bytes dropped."""
        dropped = self.partial
        self._buf.clear()
        self._skip = 0
        self._skipping_line = False
        return dropped

    def feed(self, data: bytes) -> tuple[list[bytes], list[str]]:
        """Add bytes; returns (complete payloads, refusal messages)."""
        if self.framing == "newline":
            return self._feed_lines(data)
        return self._feed_length(data)

    def _feed_lines(self, data: bytes) -> tuple[list[bytes], list[str]]:
        out: list[bytes] = []
        errors: list[str] = []
        buf = self._buf
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping_line:
                self._skipping_line = False
            elif nl - start > self.max_payload:
                # A long line that arrived whole in one read: refused here,
                # or the writer would refuse the whole batch around it.
                errors.append(
                    f"Failed to publish a {nl - start}-byte line since a slot holds "
                    f"at most {self.max_payload} bytes of payload; it is dropped"
                )
            else:
                out.append(bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]
        if len(buf) > self.max_payload and not self._skipping_line:
            errors.append(
                f"Failed to publish a line since it is longer than the "
                f"{self.max_payload}-byte slot payload; it is dropped"
            )
            self._skipping_line = True
        if self._skipping_line:
            buf.clear()
        return out, errors

    def _feed_length(self, data: bytes) -> tuple[list[bytes], list[str]]:
        out: list[bytes] = []
        errors: list[str] = []
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        buf = self._buf
        buf += view
        pos = 0
        while len(buf) - pos >= _LEN:
            length = int.from_bytes(buf[pos : pos + _LEN], "little")
            if length > self.max_payload:
                errors.append(
                    f"Failed to publish a {length}-byte frame since a slot holds "
                    f"at most {self.max_payload} bytes of payload; it is dropped"
                )
                avail = len(buf) - pos - _LEN
                take = min(avail, length)
                pos += _LEN + take
                self._skip = length - take
                if self._skip:
                    break
                continue
            if len(buf) - pos - _LEN < length:
                break
            out.append(bytes(buf[pos + _LEN : pos + _LEN + length]))
            pos += _LEN + length
        del buf[:pos]
        return out, errors


class TickerSource:
    """``ticker``: a small record (``tick <n> <unix time>``) at a fixed rate."""

    def __init__(self, cfg: TickerSourceConfig) -> None:
        self.rate = cfg.rate
        self.topic = cfg.topic
        self.count = 0
        self._host: SourceHost | None = None
        self._next = 0.0
        self._generation = 0  # bumps on every rate change, so stale timers die

    def start(self, host: SourceHost) -> None:
        self._host = host
        self._schedule(reset=True)

    def set_rate(self, rate: float) -> None:
        """Change the rate live (reload); 0 stops the ticks at once."""
        self.rate = rate
        self._generation += 1  # the tick already scheduled at the old rate is void
        self._schedule(reset=True)

    def _schedule(self, *, reset: bool) -> None:
        if self._host is None or self.rate <= 0:
            return
        period = 1.0 / self.rate
        now = time.monotonic()
        if reset:
            self._generation += 1
            self._next = now + period
        else:
            self._next += period
            if self._next < now - period:  # fell far behind (suspend): skip, don't burst
                self._next = now + period
        gen = self._generation
        self._host.call_later(max(0.0, self._next - now), lambda: self._tick(gen))

    def _tick(self, gen: int) -> None:
        if gen != self._generation or self._host is None:
            return
        self.count += 1
        payload = f"tick {self.count} {time.time():.6f}".encode()
        self._host.publish_batch((payload,), self.topic)
        self._schedule(reset=False)

    def close(self) -> None:
        self._host = None


class StreamSource:
    """``fifo`` and ``stdin``: framed records from a byte stream, without blocking the loop."""

    def __init__(self, cfg: FifoSourceConfig | StdinSourceConfig) -> None:
        self.cfg = cfg
        self.topic = cfg.topic
        self.path = cfg.path if isinstance(cfg, FifoSourceConfig) else None
        self._fd: OwnedFd | None = None
        self._host: SourceHost | None = None
        self._deframer: Deframer | None = None
        self._stdin_was_blocking = False
        self.records = 0
        self.refused = 0

    def start(self, host: SourceHost) -> None:
        self._host = host
        self._deframer = Deframer(self.cfg.framing, host.max_payload)
        if self.path is not None:
            self._make_fifo(self.path)
            self._open_fifo()
        else:
            fd = os.dup(0)
            self._stdin_was_blocking = os.get_blocking(fd)
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
            self._fd = OwnedFd(fd)
            host.reactor.add(fd, self._on_readable)

    @staticmethod
    def _make_fifo(path: str) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            try:
                os.mkfifo(path, 0o660)
            except OSError as exc:
                raise SourceError(
                    f"Failed to create the FIFO {path} since {exc.strerror}"
                ) from None
            return
        except OSError as exc:
            raise SourceError(f"Failed to use the FIFO {path} since {exc.strerror}") from None
        if not stat.S_ISFIFO(st.st_mode):
            raise SourceError(
                f"Failed to use {path} as the FIFO source since it exists and is not a FIFO"
            )

    def _open_fifo(self) -> None:
        assert self._host is not None and self.path is not None
        # Non-blocking open of a FIFO's read end succeeds with no writer.
        # Linux reports EPOLLHUP on it only after a writer came and went
        # since this open, so re-opening after each hang-up resets it.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"Failed to open the FIFO {self.path} since {exc.strerror}") from None
        self._fd = OwnedFd(fd)
        self._host.reactor.add(fd, self._on_readable)

    def _on_readable(self, events: int) -> None:
        assert self._fd is not None and self._host is not None and self._deframer is not None
        payloads: list[bytes] = []
        eof = False
        for _ in range(64):  # bounded per turn, so other fds get their turn
            try:
                data = os.read(self._fd.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            got, errors = self._deframer.feed(data)
            payloads.extend(got)
            for e in errors:
                self.refused += 1
                log.warning("frame_refused", source=self.cfg.type, error=e)
        if payloads:
            self.records += len(payloads)
            self._host.publish_batch(payloads, self.topic)
        if eof:
            self._on_eof()

    def _on_eof(self) -> None:
        assert self._fd is not None and self._host is not None and self._deframer is not None
        dropped = self._deframer.reset()
        if dropped:
            log.warning(
                "frame_truncated",
                source=self.cfg.type,
                bytes=dropped,
                error="the producer closed the stream in the middle of a frame; "
                "the partial frame is dropped",
            )
        self._host.reactor.remove(self._fd.fileno())
        if self.path is None:
            self._close_fd()
            self._host.source_finished("end of standard input")
            return
        # The next producer starts on a frame boundary, on a fresh read end
        # (see _open_fifo).  Fresh *before* the old one closes: a producer may
        # open the FIFO through our old read end any time after the read that
        # saw EOF, write and leave; if for a moment no read end were open,
        # the kernel would free the pipe, its bytes with it.
        old = self._fd
        self._open_fifo()
        old.close()

    def _close_fd(self) -> None:
        assert self._fd is not None
        if self.path is None and self._stdin_was_blocking:
            # O_NONBLOCK belongs to the open file description, which our dup
            # shares with fd 0 and with everyone else holding it (the shell
            # of an interactive run, the rest of a pipeline): leave it as found.
            os.set_blocking(self._fd.fileno(), True)
        self._fd.close()

    def close(self) -> None:
        if self._fd is not None and not self._fd.closed and self._host is not None:
            self._host.reactor.remove(self._fd.fileno())
            self._close_fd()
        self._host = None


class SourceContext:
    """What a ``python:`` source's callable is handed: publish, and when to stop."""

    def __init__(
        self, host: SourceHost, stop: threading.Event, topics: TopicMap | None = None
    ) -> None:
        self._host = host
        self.stopping = stop
        self.max_payload = host.max_payload
        #: The bus's topic names (segment.topics).
        self.topics = TopicMap() if topics is None else topics

    def publish(self, payload: bytes, topic: int | str = 0) -> None:
        """Publish one record on a topic given by id or by name (UnknownTopic if not named)."""
        self._host.publish_batch((payload,), self.topics.resolve(topic))

    def publish_batch(self, payloads: Sequence[bytes], topic: int | str = 0) -> None:
        """Publish records with one commit."""
        self._host.publish_batch(payloads, self.topics.resolve(topic))


class PythonSource:
    """``python: "package.module:callable"`` in a thread of its own.

    The callable is either a generator function (or returns an iterable):
    each item is ``bytes`` (topic 0) or ``(topic, bytes)``, the topic an id
    or a name of ``segment.topics``; or a function
    taking one argument, a :class:`SourceContext`, that publishes itself and
    returns when ``ctx.stopping`` is set.  Either way, when it returns the
    source is finished and the writer shuts down cleanly.
    """

    def __init__(self, cfg: PythonSourceConfig) -> None:
        self.spec = cfg.callable
        self.topics = cfg.topic_names
        self.fn = load_callable(cfg.callable, SourceError)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, host: SourceHost) -> None:
        ctx = SourceContext(host, self._stop, self.topics)

        def run() -> None:
            try:
                wants_ctx = _takes_argument(self.fn)
                result = self.fn(ctx) if wants_ctx else self.fn()
                if result is not None and isinstance(result, Iterable):
                    self._pump(host, result)
                reason = f"{self.spec} returned"
            except BaseException as exc:  # reported, then the writer stops
                self.error = exc
                reason = f"{self.spec} raised {type(exc).__name__}: {exc}"
                log.error("source_failed", source="python", error=reason)
            if not self._stop.is_set():
                host.call_later(0.0, lambda: host.source_finished(reason))

        self._thread = threading.Thread(target=run, name="shmd-source", daemon=True)
        self._thread.start()

    def _pump(self, host: SourceHost, items: Iterable[object]) -> None:
        for item in items:
            if self._stop.is_set():
                return
            if isinstance(item, tuple):
                topic, payload = item
                name_or_id = topic if isinstance(topic, str) else int(topic)
                host.publish_batch((bytes(payload),), self.topics.resolve(name_or_id))
            else:
                host.publish_batch((bytes(item),), 0)  # type: ignore[call-overload]

    def close(self) -> None:
        self._stop.set()
        # The thread is a daemon thread: a callable that ignores `stopping`
        # cannot keep the writer from exiting.


def _takes_argument(fn: Callable[..., object]) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 1


def _zenoh_source(cfg: ZenohSourceConfig) -> ZenohSource:
    """``zenoh`` (shmd.daemons.zenoh_source): imported only by a writer that has one."""
    from shmd.daemons.zenoh_source import ZenohSource  # noqa: PLC0415 - the optional extra's module

    return ZenohSource(cfg)


AnySource: TypeAlias = "TickerSource | StreamSource | PythonSource | ZenohSource"

#: The runtime class of each ``writer.source`` type: a new type is its config
#: dataclass (shmd.config.model, in SourceConfig), a class here, and a line here.
SOURCES: dict[type[SourceConfig], Callable[[Any], AnySource]] = {
    TickerSourceConfig: TickerSource,
    FifoSourceConfig: StreamSource,
    StdinSourceConfig: StreamSource,
    PythonSourceConfig: PythonSource,
    ZenohSourceConfig: _zenoh_source,
}


def make_source(cfg: SourceConfig) -> AnySource:
    """Build the configured source (not started)."""
    return SOURCES[type(cfg)](cfg)
