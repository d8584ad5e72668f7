"""Writing a batch of records into their slots: the publisher's two batch writers.

Both write header and payload of records ``seq, seq + 1, ...`` into the
ring (a writable view of it); neither reserves nor commits (the publisher
does, around them).  :func:`write_dense` builds whole slots in C, for
records that nearly fill them; :func:`write_loop` packs one record at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat

from shmd.bus.layout import RECORD_HEADER, RECORD_HEADER_SIZE, slot_packer
from shmd.bus.ring import runs

#: Slots larger than this take the loop (the per-record overhead no longer matters).
DENSE_SLOT_MAX = 2048
#: Bytes built per join in the dense path.
_DENSE_BLOB = 64 * 1024

_pack = RECORD_HEADER.pack_into

Payloads = Sequence[bytes | bytearray | memoryview]


def _chunked(pieces: Iterable[tuple[int, int]], most: int) -> Iterator[tuple[int, int]]:
    """Split (first, count) runs into runs of at most ``most``."""
    for first, count in pieces:
        for start in range(first, first + count, most):
            yield start, min(most, first + count - start)


def write_dense(  # noqa: PLR0917 - the publisher's batch path, called from one place
    ring: memoryview,
    capacity: int,
    slot: int,
    seq: int,
    ts: int,
    topic: int,
    payloads: Payloads,
    lengths: list[int],
    longest: int,
    pad: int,
) -> None:
    """Records of ``payloads`` (``lengths``, the longest ``longest`` bytes, ``pad``
    bytes short of a slot), packed whole: one struct.pack per slot, one join and
    one copy per run.  Raises struct.error for a payload that does not pack as
    ``s`` (not bytes): the caller then takes :func:`write_loop`."""
    mask = capacity - 1
    packer = slot_packer(longest, pad)
    # Blobs stay small: a large one is a fresh mmap in malloc, whose page
    # faults cost more than the copy.
    chunk = max(1, _DENSE_BLOB // slot)
    for first, count in _chunked(runs(seq, seq + len(payloads), capacity), chunk):
        i = first - seq
        blob = b"".join(
            map(
                packer.pack,
                range(first, first + count),
                repeat(ts),
                lengths[i : i + count],
                repeat(topic),
                repeat(0),
                repeat(0),
                payloads[i : i + count],
            )
        )
        off = (first & mask) * slot
        ring[off : off + len(blob)] = blob


def write_loop(  # noqa: PLR0917 - the publisher's batch path
    ring: memoryview, capacity: int, slot: int, seq: int, ts: int, topic: int, payloads: Payloads
) -> None:
    """Records of ``payloads``, one header pack and one payload copy each."""
    mask, pack = capacity - 1, _pack
    for p in payloads:
        off = (seq & mask) * slot
        length = len(p)
        pack(ring, off, seq, ts, length, topic, 0, 0)
        start = off + RECORD_HEADER_SIZE
        ring[start : start + length] = p
        seq += 1
