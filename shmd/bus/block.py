"""The block policy's slow path: wait for the slowest reader, evict one that holds the bus up.

Only the publisher's slow paths come here, when the room it knows about
(``_room_until``: seqs below it are free for every reader) runs out; the
fast paths compare two integers and never call in.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

from shmd._sys import libc
from shmd.bus.layout import RQ_CURSOR, RU_SLEEP_SEQ, RU_WAKE_SEQ
from shmd.bus.readers import Eviction, ReaderHandle, ReaderTable
from shmd.bus.ring import free_slots
from shmd.bus.segment import Segment

#: The longest the writer sleeps before it re-checks the cursors.
WAIT_SLICE = 0.01
#: How long the writer yields and looks again before its first sleep of a wait.
YIELD_BEFORE_SLEEP = 50e-6


class Blocked(Protocol):
    """What the block policy needs of the publisher it holds up."""

    segment: Segment
    table: ReaderTable
    block_timeout: float
    #: Readers evicted since the owner last looked.
    evictions: list[Eviction]

    @property
    def write_seq(self) -> int:
        """The seq the next record gets."""
        ...


def slowest(pub: Blocked) -> tuple[int, ReaderHandle | None]:
    """The lowest cursor of any reader (``write_seq`` if none) and whose it is."""
    q = pub.segment.q
    low, who = pub.write_seq, None
    for h in pub.table.handles.values():
        c = q[h.q0 + RQ_CURSOR]
        if c < low:
            low, who = c, h
    # Acquire: the slots below the cursors we loaded are no longer being
    # copied once we overwrite them; pairs with the reader's release store of
    # its cursor ([R5], shmd/_sys/_reader.c publish_cursor).
    libc.load_fence()
    return low, who


def wait_for_space(pub: Blocked, n: int) -> int:
    """Wait until the slowest reader leaves ``n`` free slots; the new room bound.

    First yields and looks again for YIELD_BEFORE_SLEEP, then sleeps on
    the segment's semaphore (the writer needs no epoll for this), at most
    WAIT_SLICE at a time; readers post it after advancing
    their cursor when they see ``writer_waiting``.  A reader that holds
    the bus up longer than ``block_timeout`` is evicted, never waited on
    forever.  What it finds free is returned (the caller keeps it as
    ``_room_until``), so the next publishes skip the check until they get
    there.
    """
    seq = pub.write_seq
    cap = pub.segment.geometry.capacity
    seg = pub.segment
    now = time.monotonic()
    deadline, yield_until = now + pub.block_timeout, now + YIELD_BEFORE_SLEEP
    while True:
        low, who = slowest(pub)
        if who is None or free_slots(seq, low, cap) >= n:
            return low + cap
        # A reader that holds the slots we need is usually copying or checking them
        # and frees them within microseconds; a sleep costs it a sem_post and us a
        # futex wake-up (tens of microseconds on a VM) once a ring lap.  So look again
        # for a little while first, yielding the CPU to a reader that shares it.
        if time.monotonic() < yield_until:
            os.sched_yield()
            continue
        seg.u[Segment.WRITER_WAITING] = 1
        libc.fence()  # StoreLoad: our flag before the cursors we re-read
        low, who = slowest(pub)
        if who is None or free_slots(seq, low, cap) >= n:
            seg.u[Segment.WRITER_WAITING] = 0
            return low + cap
        # A reader asleep behind us slept through records of topics it
        # did not subscribe to (a commit wakes subscribers only): it
        # would never move its cursor, and we would evict a healthy
        # reader.  Wake it; it skips those records and posts the
        # semaphore like any reader that advances.  (One that is not
        # asleep yet cannot fall asleep now: prepare_sleep sees
        # write_seq past its cursor and withdraws.)
        behind = [
            h
            for h in pub.table.handles.values()
            if seg.u[h.u0 + RU_SLEEP_SEQ] != seg.u[h.u0 + RU_WAKE_SEQ]
            and free_slots(seq, seg.q[h.q0 + RQ_CURSOR], cap) < n
        ]
        if behind:
            pub.table.answer(behind)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seg.u[Segment.WRITER_WAITING] = 0
            evict_laggards(pub, n)
            deadline = time.monotonic() + pub.block_timeout
            continue
        # Readers post after moving their cursor without a fence of their
        # own (it would cost every read; see Subscriber._publish_cursor),
        # so a post can be missed once: re-checking every WAIT_SLICE
        # bounds what that costs.
        seg.sem_wait(min(remaining, WAIT_SLICE))
        seg.u[Segment.WRITER_WAITING] = 0


def evict_laggards(pub: Blocked, n: int) -> None:
    """Evict every reader that leaves fewer than ``n`` free slots (recorded in ``evictions``)."""
    seq = pub.write_seq
    cap = pub.segment.geometry.capacity
    q = pub.segment.q
    laggards = [
        h for h in pub.table.handles.values() if free_slots(seq, q[h.q0 + RQ_CURSOR], cap) < n
    ]
    for h in laggards:
        pub.evictions.append(pub.table.evict(h, seq, pub.block_timeout))
