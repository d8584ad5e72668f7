"""shmd.bus.slots: the dense and the loop batch writers lay out the same slots."""

from __future__ import annotations

import pytest

from shmd.bus.layout import RECORD_HEADER_SIZE
from shmd.bus.slots import write_dense, write_loop


@pytest.mark.parametrize("first", [0, 5, 14])
def test_dense_and_loop_write_the_same_bytes(first: int) -> None:
    """Both writers produce identical rings, wrapping or not (zero-padded slots)."""
    cap, slot = 16, 64
    payloads = [bytes([i]) * (i % 7 + 1) for i in range(10)]
    lengths = [len(p) for p in payloads]
    longest = max(lengths)
    rings = []
    for dense in (True, False):
        ring = memoryview(bytearray(cap * slot))
        if dense:
            pad = slot - RECORD_HEADER_SIZE - longest
            write_dense(ring, cap, slot, first, 123, 4, payloads, lengths, longest, pad)
        else:
            write_loop(ring, cap, slot, first, 123, 4, payloads)
        rings.append(bytes(ring))
    assert rings[0] == rings[1]
