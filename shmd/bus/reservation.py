"""A reservation of slots the caller fills in place: the publisher's zero-copy path."""

from __future__ import annotations

from typing import Protocol

from shmd.bus.segment import Segment


class Reserver(Protocol):
    """The publisher a reservation commits through."""

    segment: Segment

    @property
    def write_seq(self) -> int:
        """The seq the next record gets."""
        ...

    def _commit_reserved(self, seq: int, count: int, topic: int, length: int) -> None:
        """Write the headers of ``count`` filled slots from ``seq`` and commit them."""
        ...


class Reservation:
    """Slots reserved by :meth:`Publisher.reserve` (one) or :meth:`Publisher.reserve_batch`.

    Fill ``buffers`` (one payload buffer per slot; ``buffer`` is the first,
    the only one of :meth:`Publisher.reserve`), then commit.  Usable as a
    context manager that gives ``buffer``: commits every slot whole on a
    clean exit; on an exception nothing is committed (the slots are reused
    next time).
    """

    __slots__ = ("_done", "_pub", "buffer", "buffers", "seq", "topic")

    def __init__(self, pub: Reserver, seq: int, topic: int, buffers: list[memoryview]) -> None:
        self._pub = pub
        #: The first record's seq.
        self.seq = seq
        self.topic = topic
        self.buffers = buffers
        self.buffer = buffers[0]
        self._done = False

    def commit(self, length: int | None = None) -> int:
        """Publish every record with its first ``length`` bytes (default: all); the last seq."""
        if self._done:
            raise ValueError("Failed to commit the reservation since it was already committed")
        size = len(self.buffer)
        length = size if length is None else length
        if not 0 <= length <= size:
            raise ValueError(f"Failed to commit {length} bytes since {size} were reserved")
        self._done = True
        for b in self.buffers:
            b.release()
        n = len(self.buffers)
        self._pub._commit_reserved(self.seq, n, self.topic, length)
        return self.seq + n - 1

    def abandon(self) -> None:
        """Give the slots back without publishing.

        The next publish reuses them.  ``reserve_seq`` stays up (see
        :func:`shmd.bus.adopt.take_over`): the caller may have written into
        a slot a lagging reader was copying.
        """
        if not self._done:
            self._done = True
            for b in self.buffers:
                b.release()

    def __enter__(self) -> memoryview:
        return self.buffer

    def __exit__(self, et: type[BaseException] | None, *_: object) -> None:
        if et is None:
            if not self._done:
                self.commit()
        else:
            self.abandon()
