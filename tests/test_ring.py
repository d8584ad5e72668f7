"""shmd.bus.ring: ring arithmetic, checked as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmd.bus.layout import TOPIC_MAX
from shmd.bus.ring import (
    check_record,
    free_slots,
    slot_of,
    still_valid,
)
from shmd.errors import PayloadTooLarge, TopicError

U64 = (1 << 64) - 1
capacities = st.integers(1, 20).map(lambda e: 1 << e)
seqs = st.integers(0, 1 << 62)


@given(seqs, capacities)
def test_slot_of_is_seq_modulo_capacity(seq: int, cap: int) -> None:
    """The slot of a seq is seq mod capacity."""
    assert slot_of(seq, cap) == seq % cap


@given(capacities, seqs, st.integers(0, 1 << 22))
def test_free_slots_bounds(cap: int, slowest: int, ahead: int) -> None:
    """free_slots is capacity minus the slowest reader's lag, clamped to [0, capacity]."""
    write_seq = slowest + ahead
    free = free_slots(write_seq, slowest, cap)
    assert 0 <= free <= cap
    assert free == max(0, cap - ahead)
    assert free_slots(write_seq, write_seq, cap) == cap


@given(capacities, seqs, seqs)
def test_still_valid_is_a_threshold(cap: int, seq: int, reserve_seq: int) -> None:
    """A record stays valid exactly while reserve_seq is at most seq + capacity."""
    assert still_valid(seq, reserve_seq, cap) == (reserve_seq <= seq + cap)
    if still_valid(seq, reserve_seq, cap):
        assert all(still_valid(seq, r, cap) for r in (reserve_seq - 1, seq, seq + 1))


def test_check_record_names_both_sizes() -> None:
    """A payload over the slot's room raises PayloadTooLarge naming payload and slot sizes."""
    with pytest.raises(
        PayloadTooLarge,
        match=r"a 33-byte record .* at most 32 bytes of payload "
        r"\(slot size 64 minus the 32-byte record header",
    ):
        check_record(33, 0, 32)
    check_record(32, TOPIC_MAX, 32)


@pytest.mark.parametrize("topic", [-1, TOPIC_MAX + 1])
def test_check_record_rejects_bad_topics(topic: int) -> None:
    """A topic outside 0..63 raises TopicError naming it."""
    with pytest.raises(TopicError, match=f"topic {topic} is not between 0 and 63"):
        check_record(1, topic, 32)
