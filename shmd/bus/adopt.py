"""A writer's segment from before: adopting a stored one, replacing a stale one.

:func:`open_stored` and :func:`take_over` are :meth:`Publisher.adopt
<shmd.bus.publisher.Publisher.adopt>`'s two halves (the segment a previous
writer left in systemd's fd store, then making it ours);
:func:`remove_stale` is what :meth:`Publisher.create
<shmd.bus.publisher.Publisher.create>` does with a name a dead writer left.
"""

from __future__ import annotations

import os

import structlog

from shmd._sys.fd import OwnedFd
from shmd._sys.proc import pid_alive
from shmd.bus.layout import (
    OFF_READERS,
    READER_ENTRY_SIZE,
    Geometry,
    Header,
    Policy,
    ReaderState,
)
from shmd.bus.readers import ReaderTable
from shmd.bus.segment import Segment
from shmd.errors import SegmentExists, SegmentLayoutError, SegmentNotFound

log = structlog.get_logger("shmd.bus.adopt")


def open_stored(name: str, fd: OwnedFd, *, mode: int) -> tuple[Segment, Header, bool]:
    """The segment to go on with, from a previous writer's stored ``fd``.

    Returns it, the stored segment's header as it was, and whether it is
    the stored object itself (``name`` still names it: the writer crashed)
    or a copy created under ``name`` (a clean stop unlinked the name): same
    geometry, generation and sequence, with the ring and reader table
    copied, so readers resume where they were.  Raises a
    :class:`~shmd.errors.ShmdError` when the stored segment is unusable.
    """
    old: Segment | None = Segment.open(
        fd=fd, control_writable=True, ring_writable=True, populate=True
    )
    assert old is not None
    try:
        header = old.header()
        policy = Policy(header.policy)
        in_place = False
        try:
            named = Segment.open(name=name, control_writable=False)
        except SegmentNotFound:
            named = None
        if named is not None:
            try:
                in_place = named.identity() == old.identity()
                other_pid, other_active = named.writer_pid, named.active
            finally:
                named.close()
            if not in_place:
                if other_active and pid_alive(other_pid) and other_pid != os.getpid():
                    raise SegmentExists(
                        f"Failed to adopt segment {name!r} since writer pid {other_pid} "
                        "created another segment under that name and is running"
                    )
                Segment.unlink_name(name)
        if in_place:
            seg, old = old, None
            seg.name = name
        else:
            seg = Segment.create(
                name,
                old.geometry,
                policy,
                mode=mode,
                generation=header.generation,
                write_seq=header.write_seq,
            )
            try:
                copy_state(old, seg)
            except BaseException:
                seg.close()
                Segment.unlink_name(name)
                raise
            # Readers still map the old segment while they wait for a
            # successor; our pid in its header tells one whose wake-up
            # merged with the old writer's into one eventfd read that a
            # successor is up (in place, take_over does the same).
            old.u[Segment.WRITER_PID] = os.getpid()
    finally:
        if old is not None:
            old.close()
    return seg, header, in_place


def copy_state(old: Segment, new: Segment) -> None:
    """Copy what readers resume from: the reader table, the counters, the ring."""
    g = old.geometry
    table_end = OFF_READERS + g.max_readers * READER_ENTRY_SIZE
    new.control[OFF_READERS:table_end] = old.control[OFF_READERS:table_end]
    new.q[Segment.BYTES_PUBLISHED] = old.q[Segment.BYTES_PUBLISHED]
    # The ring comes with whatever the old writer half-wrote, so the copy
    # says the same as the original about which slots may be torn.
    new.q[Segment.RESERVE_SEQ] = old.q[Segment.RESERVE_SEQ]
    new.ring[:] = old.ring


def take_over(table: ReaderTable, header: Header, *, in_place: bool) -> None:
    """Make an adopted segment ours: commit nothing half-written, active again.

    Records the previous writer reserved but never committed are discarded:
    the next publish rewrites their slots from ``write_seq`` on.  Evicted
    entries are freed (their readers left with the old writer); every other
    entry keeps its cursor.

    ``reserve_seq`` stays where the previous writer left it, never lowered.
    A lagging reader may have loaded it *before* that writer reserved, then
    copied one of the slots it was half-way through overwriting; the reader
    trusts its copy only if ``reserve_seq``, re-read after the copy, says
    nobody wrote there.  Lowered back to ``write_seq`` here, it would say
    exactly that, and the torn record would be delivered.
    """
    seg = table.segment
    with table.locked():
        seg.u[Segment.WRITER_PID] = os.getpid()
        seg.u[Segment.WRITER_WAITING] = 0
        table.free_all_evicted()
        seg.sem_drain()
        seg.u[Segment.ACTIVE] = 1
    log.info(
        "segment_adopted",
        segment=seg.name,
        generation=seg.generation,
        seq=header.write_seq,
        in_place=in_place,
        discarded=header.reserve_seq - header.write_seq,
        readers=sum(
            1 for e in seg.entries() if e.state in (ReaderState.ATTACHED, ReaderState.DORMANT)
        ),
    )


def create_segment(
    name: str, geometry: Geometry, policy: Policy, *, mode: int, replace_stale: bool
) -> Segment:
    """A new segment ``name``; one that exists is replaced if stale and ``replace_stale``.

    Stale: its writer is dead or its header unreadable (left over by a kill
    -9); a segment whose writer still runs is never touched
    (:class:`~shmd.errors.SegmentExists`).
    """
    try:
        seg = Segment.create(name, geometry, policy, mode=mode)
    except SegmentExists:
        if not replace_stale:
            raise
        remove_stale(name)
        seg = Segment.create(name, geometry, policy, mode=mode)
    log.info(
        "segment_created",
        segment=name,
        generation=seg.generation,
        capacity=geometry.capacity,
        slot_size=geometry.slot_size,
        max_readers=geometry.max_readers,
        policy=policy.label,
        size=geometry.segment_size,
    )
    return seg


def remove_stale(name: str) -> None:
    """Unlink ``name`` if its writer is gone or its header unreadable.

    Raises :class:`~shmd.errors.SegmentExists` when a running writer owns it.
    """
    try:
        old = Segment.open(name=name, control_writable=False)
    except SegmentNotFound:
        return  # gone in between
    except SegmentLayoutError as exc:
        log.warning("segment_stale", segment=name, reason=str(exc))
        Segment.unlink_name(name)
        return
    try:
        pid, active = old.writer_pid, old.active
    finally:
        old.close()
    if active and pid_alive(pid) and pid != os.getpid():
        raise SegmentExists(
            f"Failed to create segment {name!r} since writer pid {pid} is running and owns it"
        )
    log.warning(
        "segment_stale", segment=name, writer_pid=pid, reason="its writer is gone; replacing it"
    )
    Segment.unlink_name(name)
