"""Ring arithmetic: pure functions, no syscalls (the record header is in :mod:`shmd.bus.layout`).

Sequence numbers are unbounded (u64; at a billion records a second they
last 584 years).  Record ``seq`` lives in slot ``seq % capacity``.  The
writer publishes in two steps:

1. *reserve*: store ``reserve_seq = write_seq + n``, then write the n slots;
2. *commit*: store ``write_seq = reserve_seq``.

So records below ``write_seq`` are complete, and the slots the writer may be
overwriting right now hold seqs in ``[reserve_seq - capacity, write_seq -
capacity + n)``.  A reader that copied record ``s`` keeps it only if ``s >=
reserve_seq - capacity`` when it re-reads ``reserve_seq`` *after* the copy
(:func:`still_valid`); a writer killed between the two steps leaves
``reserve_seq > write_seq`` and its half-written records are never read.
"""

from __future__ import annotations

from collections.abc import Iterator

from shmd.bus.layout import RECORD_HEADER_SIZE, TOPIC_MAX, RawRecord
from shmd.errors import PayloadTooLarge, TopicError


def slot_of(seq: int, capacity: int) -> int:
    """The slot index holding record ``seq`` (capacity is a power of two)."""
    return seq & (capacity - 1)


def oldest_present(reserve_seq: int, capacity: int) -> int:
    """The oldest seq no writer can be overwriting right now."""
    return max(0, reserve_seq - capacity)


def plan_read(
    cursor: int,
    write_seq: int,
    reserve_seq: int,
    capacity: int,
    limit: int,
) -> tuple[int, int, int]:
    """Records ``[start, end)`` to read from ``cursor``, at most ``limit`` of them.

    Returns ``(start, end, lost)``: ``lost`` records the writer overwrote
    before the reader got to them.  (A plain tuple: this runs once per read,
    and building a NamedTuple would cost more than the arithmetic.)
    """
    start = max(cursor, oldest_present(reserve_seq, capacity))
    end = min(write_seq, start + limit) if write_seq > start else start
    return start, end, start - cursor


def still_valid(seq: int, reserve_seq: int, capacity: int) -> bool:
    """Whether record ``seq``, copied before ``reserve_seq`` was re-read, is intact."""
    return seq >= reserve_seq - capacity


def free_slots(write_seq: int, slowest_cursor: int, capacity: int) -> int:
    """Slots the writer may fill without overwriting what the slowest reader has not read."""
    return max(0, capacity - (write_seq - slowest_cursor))


def runs(start: int, end: int, capacity: int) -> Iterator[tuple[int, int]]:
    """Split ``[start, end)`` into (first seq, count) runs that do not wrap the ring."""
    seq = start
    while seq < end:
        first_slot = slot_of(seq, capacity)
        count = min(end - seq, capacity - first_slot)
        yield seq, count
        seq += count


def check_record(length: int, topic: int, max_payload: int) -> None:
    """Raise the error a user would want for a record that cannot be published."""
    if length > max_payload:
        raise PayloadTooLarge(
            f"Failed to publish a {length}-byte record since a slot holds at most "
            f"{max_payload} bytes of payload (slot size {max_payload + RECORD_HEADER_SIZE} "
            f"minus the {RECORD_HEADER_SIZE}-byte record header); raise segment.slot_size"
        )
    if not 0 <= topic <= TOPIC_MAX:
        raise TopicError(f"Failed to publish since topic {topic} is not between 0 and {TOPIC_MAX}")


def drop_lapped(
    out: list[RawRecord],
    start: int,
    end: int,
    cut: int,
    everything: bool,
) -> list[RawRecord]:
    """The records of a batch read ``[start, end)`` that the writer did not lap.

    The writer lapped us while we copied: every slot of a seq below ``cut``
    may hold a torn record or a whole one of a later lap.  Those positions
    are dropped (the caller counts them lost).  The header seq cannot say
    which to drop (a later lap's record there carries seq + capacity);
    positions can: with every topic, ``out`` holds one record per position
    from ``start``.  With a topic filter, a slot of a seq at or above ``cut``
    was not touched, so its header seq is its position, and a later lap's
    record carries a seq of at least ``end``.
    """
    if everything:
        return out[cut - start :]
    return [r for r in out if cut <= r[0] < end]
