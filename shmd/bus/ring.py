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

from shmd.bus.layout import RECORD_HEADER_SIZE, TOPIC_MAX
from shmd.errors import PayloadTooLarge, TopicError


def slot_of(seq: int, capacity: int) -> int:
    """The slot index holding record ``seq`` (capacity is a power of two)."""
    return seq & (capacity - 1)


def still_valid(seq: int, reserve_seq: int, capacity: int) -> bool:
    """Whether record ``seq``, copied before ``reserve_seq`` was re-read, is intact."""
    return seq >= reserve_seq - capacity


def free_slots(write_seq: int, slowest_cursor: int, capacity: int) -> int:
    """Slots the writer may fill without overwriting what the slowest reader has not read."""
    return max(0, capacity - (write_seq - slowest_cursor))


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
