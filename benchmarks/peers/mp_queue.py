"""multiprocessing.Queue peer: one bounded queue per reader.

The writer puts every record (as one immutable ``bytes`` shared by all queues, because
``put`` pickles later on the queue's feeder thread) into every reader's queue. Queues are
bounded to the case's depth, so ``put`` blocks when a reader is behind and nothing is
dropped or buffered without limit.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import Buffer, Case, Reader, StreamImpl, Writer


@dataclass
class QueueChannel:
    # multiprocessing.Queue objects: picklable only while a child is being spawned,
    # which is exactly when the harness hands the channel over.
    queues: list[Any]


class _QueueWriter:
    def __init__(self, chan: QueueChannel) -> None:
        self._queues = chan.queues

    def wait_readers(self, deadline: float) -> None:
        """Nothing to wait for: the queues exist before any reader starts."""

    def send(self, record: bytearray) -> None:
        data = bytes(record)
        for q in self._queues:
            q.put(data)

    def close(self) -> None:
        for q in self._queues:
            q.close()
            # Flush the feeder thread: every reader has its records by now.
            q.join_thread()


class _QueueReader:
    def __init__(self, chan: QueueChannel, index: int) -> None:
        self._queue = chan.queues[index]

    def recv(self) -> Buffer:
        data: bytes = self._queue.get()
        return data

    def close(self) -> None:
        self._queue.close()


class MpQueueImpl(StreamImpl):
    """One bounded multiprocessing.Queue (spawn context) per reader."""

    name = "mp-queue"
    kind = "peer"

    def prepare(self, case: Case, workdir: str) -> QueueChannel:
        ctx = multiprocessing.get_context("spawn")
        return QueueChannel([ctx.Queue(maxsize=case.depth) for _ in range(case.readers)])

    def cleanup(self, channel: QueueChannel) -> None:
        for q in channel.queues:
            q.close()
            q.cancel_join_thread()
        channel.queues.clear()

    def open_writer(self, channel: QueueChannel, case: Case) -> Writer:
        return _QueueWriter(channel)

    def open_reader(self, channel: QueueChannel, case: Case, index: int) -> Reader:
        return _QueueReader(channel, index)


IMPLS = [MpQueueImpl()]
