"""Where a reader's records go: journal, file, stdout, a child's stdin, or Python.

A sink gets whole batches (``write(records)``) of ``(seq, timestamp_ns,
topic, payload)`` tuples (:data:`~shmd.bus.layout.RawRecord`; a
:class:`~shmd.bus.layout.Record` is one too), read by the layout's
``REC_*`` indices, so that per-record work stays in C-level loops where it
can (``b"".join``).  A sink that can no longer take records raises
:class:`SinkError`; the reader then exits non-zero and systemd's
``Restart=on-failure`` brings it back.  :data:`SINKS` maps each sink type's
config dataclass to what builds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Any, BinaryIO, Protocol, runtime_checkable

import structlog

from shmd.bus.layout import REC_PAYLOAD, REC_SEQ, REC_TOPIC, RawRecord
from shmd.config import (
    ExecSinkConfig,
    FileSinkConfig,
    JournalSinkConfig,
    PythonSinkConfig,
    SinkConfig,
    StdoutSinkConfig,
    ZenohSinkConfig,
)
from shmd.control.fields import TopicMap
from shmd.daemons.plugin import load_callable
from shmd.errors import ShmdError

log = structlog.get_logger("shmd.daemons.sinks")


class SinkError(ShmdError):
    """The sink cannot take records any more."""


class RecordSink(Protocol):
    """What the reader loop writes into."""

    def write(self, records: list[RawRecord]) -> None:
        """Take a batch (in order)."""

    def close(self) -> None:
        """Flush and release."""


class BusView(Protocol):
    """What a sink may read of its reader's subscription (a :class:`shmd.client.Subscription`)."""

    @property
    def topics(self) -> TopicMap: ...

    @property
    def generation(self) -> int: ...

    @property
    def lost(self) -> int: ...


@runtime_checkable
class BoundSink(Protocol):
    """A sink that reads its subscription's state (the zenoh sink's stamps)."""

    def bind(self, view: BusView, *, all_topics: bool) -> None:
        """Called once attached, before READY."""


def _preview(payload: bytes | memoryview, limit: int = 64) -> str:
    data = bytes(payload[:limit])
    text = data.decode("utf-8", "replace")
    if all(c.isprintable() for c in text):
        return text + ("…" if len(payload) > limit else "")
    return data.hex() + ("…" if len(payload) > limit else "")


class JournalSink:
    """``journal``: one ``records`` summary line at most ``summary_rate`` times a second."""

    def __init__(self, cfg: JournalSinkConfig) -> None:
        self.period = 1.0 / cfg.summary_rate if cfg.summary_rate > 0 else float("inf")
        # When the next summary may be logged: the first batch's at once (a
        # last summary "at 0.0" held it back until CLOCK_MONOTONIC passed one
        # period, i.e. on a machine up for less than 1/summary_rate seconds),
        # never with summary_rate 0.
        self._next = float("-inf") if cfg.summary_rate > 0 else float("inf")
        self._names = cfg.topic_names
        self._count = 0
        self._first_seq: int | None = None
        # (seq, topic, first 65 payload bytes) of the last record not yet summarised.
        self._tail: tuple[int, int, bytes] | None = None

    def write(self, records: list[RawRecord]) -> None:
        if self._first_seq is None:
            self._first_seq = records[0][REC_SEQ]
        self._count += len(records)
        last = records[-1]
        self._tail = (last[REC_SEQ], last[REC_TOPIC], bytes(last[REC_PAYLOAD][:65]))
        now = time.monotonic()
        if now >= self._next:
            self._summarise()
            self._next = now + self.period

    def _summarise(self) -> None:
        assert self._tail is not None
        seq, topic, head = self._tail
        named: dict[str, str] = {}
        if self._names.name(topic) is not None:
            named["topic_name"] = self._names.label(topic)
        log.info(
            "records",
            count=self._count,
            first_seq=self._first_seq,
            seq=seq,
            topic=topic,
            payload=_preview(head),
            **named,
        )
        self._count, self._first_seq, self._tail = 0, None, None

    def close(self) -> None:
        # The records since the last summary get theirs, or they would look lost.
        if self._count and self.period != float("inf"):
            self._summarise()


def _frame(records: list[RawRecord], framing: str) -> bytes:
    if framing == "length":
        return b"".join(
            len(r[REC_PAYLOAD]).to_bytes(4, "little") + bytes(r[REC_PAYLOAD]) for r in records
        )
    return b"".join(bytes(r[REC_PAYLOAD]) + b"\n" for r in records)


class StreamSink:
    """``file`` and ``stdout``: payloads as lines or length-prefixed frames."""

    def __init__(self, stream: BinaryIO, framing: str, what: str, owned: bool) -> None:
        self.stream = stream
        self.framing = framing
        self.what = what
        self._owned = owned

    @classmethod
    def open_file(cls, cfg: FileSinkConfig) -> StreamSink:
        try:
            f = open(cfg.path, "ab")  # noqa: SIM115 - owned by the sink, closed in close()
        except OSError as exc:
            raise SinkError(
                f"Failed to open {cfg.path} for the file sink since {exc.strerror}"
            ) from None
        return cls(f, cfg.framing, cfg.path, owned=True)

    @classmethod
    def open_stdout(cls, cfg: StdoutSinkConfig) -> StreamSink:
        out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        return cls(out, cfg.framing, "standard output", owned=True)

    def write(self, records: list[RawRecord]) -> None:
        try:
            self.stream.write(_frame(records, self.framing))
            self.stream.flush()
        except OSError as exc:
            raise SinkError(
                f"Failed to write records to {self.what} since {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            pass
        if self._owned:
            self.stream.close()


class ExecSink:
    """``exec``: records as lines on a child command's stdin.

    The child's failure is the reader's: when the child exits or stops
    reading, the next write fails and the reader exits non-zero with the
    child's status in the log (``Restart=on-failure`` starts both again).
    """

    def __init__(self, cfg: ExecSinkConfig) -> None:
        self.command = list(cfg.command)
        try:
            self.child = subprocess.Popen(self.command, stdin=subprocess.PIPE)
        except OSError as exc:
            raise SinkError(
                f"Failed to start the exec sink {self.command[0]!r} since {exc.strerror}"
            ) from None
        assert self.child.stdin is not None
        self.stdin: IO[bytes] = self.child.stdin

    def write(self, records: list[RawRecord]) -> None:
        try:
            self.stdin.write(_frame(records, "lines"))
            self.stdin.flush()
        except (BrokenPipeError, ValueError):
            status = self.child.wait()
            raise SinkError(
                f"Failed to pipe records to {self.command[0]!r} since it exited "
                f"with status {status}"
            ) from None

    def close(self) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            status = self.child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.child.kill()
            status = self.child.wait()
        if status != 0:
            log.warning("sink_child_failed", command=self.command[0], status=status)


class PythonSink:
    """``python: "package.module:callable"``: the callable gets each batch (a list of Records)."""

    def __init__(self, cfg: PythonSinkConfig) -> None:
        self.fn: Callable[..., object] = load_callable(cfg.callable, SinkError)
        self.spec = cfg.callable

    def write(self, records: list[RawRecord]) -> None:
        try:
            self.fn(records)
        except Exception as exc:
            raise SinkError(
                f"Failed to hand records to {self.spec} since it raised {type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        closer = getattr(self.fn, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception as exc:  # the user's code: reported, never a traceback
                raise SinkError(
                    f"Failed to close {self.spec} since it raised {type(exc).__name__}: {exc}"
                ) from None


def _zenoh_sink(cfg: ZenohSinkConfig) -> RecordSink:
    """``zenoh`` (shmd.daemons.zenoh_sink): imported only by a reader that has one."""
    from shmd.daemons.zenoh_sink import ZenohSink  # noqa: PLC0415 - the optional extra's module

    return ZenohSink(cfg)


#: The runtime class (or constructor) of each sink type: a new type is its
#: config dataclass (shmd.config.model, in SinkConfig), a class here, and a line here.
SINKS: dict[type[SinkConfig], Callable[[Any], RecordSink]] = {
    JournalSinkConfig: JournalSink,
    FileSinkConfig: StreamSink.open_file,
    StdoutSinkConfig: StreamSink.open_stdout,
    ExecSinkConfig: ExecSink,
    PythonSinkConfig: PythonSink,
    ZenohSinkConfig: _zenoh_sink,
}


def make_sink(cfg: SinkConfig) -> RecordSink:
    """Build the configured sink."""
    return SINKS[type(cfg)](cfg)
