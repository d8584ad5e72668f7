"""Durable readers whose process went: their entries, kept for their grace.

A reader that asked to be durable (``Hello.durable_ms``) and whose
connection closed without a final Detach (its process died, or it said
Detach SUSPEND) keeps its table entry and cursor: the entry turns
DORMANT, its handle stays with the publisher (so under ``block`` the
writer waits for its cursor like any slow reader's, and evicts it after
``block_timeout``), and its eventfd stays in the fd store.  A new process
of the same name takes the entry back (:meth:`DormantReaders.claim`);
when the grace ends first, the entry is freed and the reader logged lost.
"""

from __future__ import annotations

import functools
import threading

from structlog.typing import FilteringBoundLogger

from shmd._sys.reactor import Reactor, Timer
from shmd.bus.publisher import Publisher, ReaderHandle
from shmd.bus.readers import Eviction
from shmd.daemons import fdstore, logs


class DormantReaders:
    """The dormant durable readers, by entry index, each with its grace timer."""

    def __init__(
        self, pub: Publisher, reactor: Reactor, lock: threading.Lock, log: FilteringBoundLogger
    ) -> None:
        self.pub = pub
        self._reactor = reactor
        self._lock = lock
        self._log = log
        self._kept: dict[int, tuple[ReaderHandle, Timer]] = {}

    def __bool__(self) -> bool:
        return bool(self._kept)

    def names(self) -> list[str]:
        """The dormant readers' names."""
        return [h.name for h, _ in self._kept.values()]

    def keep(self, handle: ReaderHandle, grace: float, reason: str) -> None:
        """Keep ``handle``'s entry for ``grace`` seconds (its process went: ``reason``).

        Without the publisher's lock: a publish blocked on this very reader's
        cursor (policy block) holds it, and the entry's state is all that
        changes (under the table's mutex, which publishing never takes).
        """
        self.pub.table.suspend(handle.index)
        timer = self._reactor.call_later(
            grace, functools.partial(self._expire, handle.index, grace)
        )
        self._kept[handle.index] = (handle, timer)
        entry = self.pub.segment.entry(handle.index)
        self._log.info(
            logs.READER_DORMANT,
            reader=handle.name,
            pid=handle.pid,
            index=handle.index,
            generation=self.pub.generation,
            seq=entry.cursor,
            taken=entry.taken,
            grace=grace,
            reason=reason,
        )

    def claim(self, name: str) -> ReaderHandle | None:
        """Take back reader ``name``'s dormant entry (the caller reawakens it); None if none."""
        index = next((i for i, (h, _) in self._kept.items() if h.name == name), None)
        if index is None:
            return None
        handle, timer = self._kept.pop(index)
        timer.cancel()
        return handle

    def forget(self, name: str, reason: str) -> bool:
        """Free the dormant entry of reader ``name``, logged lost; False if there is none."""
        handle = self.claim(name)
        if handle is None:
            return False
        self._free(handle, reason)
        return True

    def _expire(self, index: int, grace: float) -> None:
        got = self._kept.pop(index, None)
        if got is not None:
            self._free(got[0], f"durable, but no new process of it attached within {grace:g} s")

    def _free(self, handle: ReaderHandle, reason: str) -> None:
        with self._lock:
            entry = self.pub.remove_reader(handle.index)
        fdstore.forget_reader(handle.index)
        self._log.warning(
            logs.READER_LOST,
            reader=handle.name,
            pid=handle.pid,
            index=handle.index,
            generation=self.pub.generation,
            seq=entry.cursor if entry else None,
            reason=reason,
        )

    def evicted(self, ev: Eviction) -> None:
        """The publisher evicted ``ev`` (policy block); log it if it was dormant."""
        got = self._kept.pop(ev.index, None)
        if got is None:
            return
        got[1].cancel()
        self._log.warning(
            logs.READER_LOST,
            reader=ev.name,
            pid=ev.pid,
            index=ev.index,
            generation=self.pub.generation,
            seq=ev.cursor,
            lag=ev.write_seq - ev.cursor,
            reason="evicted while dormant: no new process of it attached within block_timeout "
            "and it held the ring up under policy block",
        )

    def close(self) -> None:
        """Cancel every grace timer (the writer is going; the entries stay for its successor)."""
        for _, timer in self._kept.values():
            timer.cancel()
        self._kept.clear()
