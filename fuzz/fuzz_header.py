"""Fuzz the segment header a reader validates before it maps anything.

Input: ``actual_size u64 LE`` (the object's size as fstat reports it), then the
header bytes (any length).  ``decode_header`` + ``validate_header`` must
return a Geometry consistent with the header and with the size, or raise
SegmentLayoutError; nothing else.  Then the same bytes go into a real shm
object (a memfd of ``actual_size`` bytes) and ``Segment.open`` must agree:
the same Geometry, or a SegmentError.

    python -m fuzz header fuzz/corpus/header -max_total_time=60
"""

from __future__ import annotations

import os
import struct

from shmd.bus.layout import (
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    MAX_CAPACITY,
    MAX_READERS,
    MAX_SEGMENT,
    MAX_SLOT_SIZE,
    PAGE_SIZE,
    READER_ENTRY_SIZE,
    RECORD_HEADER_SIZE,
    Geometry,
    decode_header,
    validate_header,
)
from shmd.bus.segment import Segment
from shmd.errors import SegmentError, SegmentLayoutError

_SIZE = struct.Struct("<Q")
#: Objects up to this size are made for real (a sparse memfd costs nothing).
_REAL_SIZE_MAX = MAX_SEGMENT + (1 << 20)

_memfd: int | None = None


def _object(size: int, content: bytes) -> int:
    """The process's one memfd, ``size`` bytes starting with ``content`` (the rest zero)."""
    global _memfd  # noqa: PLW0603  # one fd per fuzzing process, reused for every input
    if _memfd is None:
        _memfd = os.memfd_create("shmd-fuzz-header", os.MFD_CLOEXEC)
    os.ftruncate(_memfd, 0)
    os.ftruncate(_memfd, size)
    os.pwrite(_memfd, content[:size], 0)
    return _memfd


def close() -> None:
    """Close the process's memfd (tests; a fuzzing process just exits)."""
    global _memfd  # noqa: PLW0603
    if _memfd is not None:
        os.close(_memfd)
        _memfd = None


def check_geometry(g: Geometry, header: bytes, actual_size: int) -> None:
    """Everything a reader relies on once validate_header returned ``g``."""
    h = decode_header(header)
    assert h.magic == MAGIC and h.version == LAYOUT_VERSION
    c, s, r = g.capacity, g.slot_size, g.max_readers
    assert (c, s, r) == (h.capacity, h.slot_size, h.max_readers)
    assert 2 <= c <= MAX_CAPACITY and c & (c - 1) == 0, c
    assert s % 8 == 0 and RECORD_HEADER_SIZE + 8 <= s <= MAX_SLOT_SIZE, s
    assert 1 <= r <= MAX_READERS, r
    assert h.policy in (0, 1)
    assert (h.control_size, h.ring_offset, h.segment_size) == (
        g.control_size,
        g.ring_offset,
        g.segment_size,
    )
    assert HEADER_SIZE + r * READER_ENTRY_SIZE <= g.control_size
    assert g.ring_offset % PAGE_SIZE == 0 and g.ring_size % PAGE_SIZE == 0
    assert g.ring_offset + c * s <= g.segment_size <= actual_size <= (1 << 64) - 1
    assert g.segment_size <= MAX_SEGMENT + g.control_size
    assert h.write_seq <= h.reserve_seq <= h.write_seq + c
    assert g.max_payload == s - RECORD_HEADER_SIZE > 0


def validate(header: bytes, actual_size: int) -> Geometry | None:
    """The pure checks: a consistent Geometry, or None for a SegmentLayoutError."""
    try:
        g = validate_header(decode_header(header), actual_size)
    except SegmentLayoutError:
        return None
    check_geometry(g, header, actual_size)
    return g


def test_one_input(data: bytes) -> None:
    """One input: see the module docstring."""
    (actual_size,) = _SIZE.unpack((data[:8] + bytes(8))[:8])
    header = data[8:]
    validate(header, actual_size)
    if actual_size > _REAL_SIZE_MAX:
        return
    # The real object: what open() reads is its first HEADER_SIZE bytes.
    content = (header + bytes(HEADER_SIZE))[:HEADER_SIZE]
    expected = validate(content, actual_size) if actual_size >= HEADER_SIZE else None
    try:
        seg = Segment.open(fd=_object(actual_size, content), control_writable=False)
    except SegmentLayoutError:
        assert expected is None, f"open refused what validate_header accepted: {expected}"
        return
    except SegmentError as exc:
        # Mapping failed (ENOMEM for a huge ring): documented, and only after validation.
        assert expected is not None, f"open got past validation of an invalid header: {exc}"
        return
    with seg:
        assert seg.geometry == expected, (seg.geometry, expected)
        assert len(seg.ring) == seg.geometry.ring_size
