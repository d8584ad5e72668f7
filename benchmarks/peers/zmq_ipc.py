"""ZeroMQ peer: XPUB over ipc:// to one SUB socket per reader.

Nothing may be dropped, so the publisher is an XPUB with ``XPUB_NODROP`` (a blocking send
waits when a subscriber's queue reaches its high-water mark instead of silently dropping)
and ``XPUB_VERBOSE`` (every subscription is passed up, not just the first per topic). The
writer counts those subscription messages until every reader is subscribed before the
measurement starts. High-water marks equal the case's depth on both sides. Readers use
``recv(copy=False)`` for records of 64 KiB and more (pyzmq's advice for large messages)
and ``recv()`` below that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import Buffer, Case, Reader, StreamImpl, Writer

MISSING: str | None
try:
    import zmq

    MISSING = None
except ImportError as exc:  # optional: the impl reports itself unavailable
    MISSING = f"pyzmq is not installed ({exc}; pip install 'pyzmq>=25', or the bench extra)"

ZERO_COPY_THRESHOLD = 64 * 1024


@dataclass(frozen=True)
class ZmqChannel:
    endpoint: str
    readers: int
    depth: int
    payload: int


class _ZmqWriter:
    def __init__(self, chan: ZmqChannel) -> None:
        self._chan = chan
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)
        self._sock.setsockopt(zmq.SNDHWM, chan.depth)
        self._sock.bind(chan.endpoint)

    def wait_readers(self, deadline: float) -> None:
        subscribed = 0
        while subscribed < self._chan.readers:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000)):
                raise RuntimeError(
                    f"Failed to see {self._chan.readers} subscriptions since only "
                    f"{subscribed} arrived before the deadline"
                )
            message = self._sock.recv()
            # b"\x01" + topic subscribes, b"\x00" + topic unsubscribes.
            if message[:1] == b"\x01":
                subscribed += 1

    def send(self, record: bytearray) -> None:
        # copy=True (the default) copies into a zmq message at once, so the caller may
        # reuse the buffer; copy_threshold only applies to copy=False sends.
        self._sock.send(record)

    def close(self) -> None:
        # Default linger: close() waits until queued records reach the readers (they all
        # have by now: the harness only closes once every reader reported).
        self._sock.close()
        self._ctx.term()


class _ZmqReader:
    def __init__(self, chan: ZmqChannel) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, chan.depth)
        self._sock.connect(chan.endpoint)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._zero_copy = chan.payload >= ZERO_COPY_THRESHOLD
        self._frame: Any = None

    def recv(self) -> Buffer:
        if self._zero_copy:
            self._frame = self._sock.recv(copy=False)
            view: memoryview = self._frame.buffer
            return view
        data: bytes = self._sock.recv()
        return data

    def close(self) -> None:
        self._frame = None
        self._sock.close(linger=0)
        self._ctx.term()


class ZmqIpcImpl(StreamImpl):
    """pyzmq XPUB/SUB over an ipc:// endpoint in the run's private directory."""

    name = "zmq-ipc"
    kind = "peer"

    def available(self) -> str | None:
        return MISSING

    def prepare(self, case: Case, workdir: str) -> ZmqChannel:
        return ZmqChannel(f"ipc://{workdir}/zmq.sock", case.readers, case.depth, case.payload)

    def open_writer(self, channel: ZmqChannel, case: Case) -> Writer:
        return _ZmqWriter(channel)

    def open_reader(self, channel: ZmqChannel, case: Case, index: int) -> Reader:
        return _ZmqReader(channel)


IMPLS = [ZmqIpcImpl()]
