"""shmd.bus.ring: ring arithmetic, checked as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmd.bus.layout import TOPIC_MAX
from shmd.bus.ring import (
    check_record,
    free_slots,
    oldest_present,
    plan_read,
    runs,
    slot_of,
    still_valid,
)
from shmd.errors import PayloadTooLarge, TopicError

U64 = (1 << 64) - 1
capacities = st.integers(1, 20).map(lambda e: 1 << e)
seqs = st.integers(0, 1 << 62)


@st.composite
def ring_states(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(capacity, cursor, write_seq, reserve_seq, limit) as a running bus can have them."""
    cap = draw(capacities)
    write_seq = draw(seqs)
    reserve_seq = write_seq + draw(st.integers(0, cap))
    cursor = draw(st.integers(0, write_seq))
    limit = draw(st.integers(1, 4 * cap))
    return cap, cursor, write_seq, reserve_seq, limit


@given(seqs, capacities)
def test_slot_of_is_seq_modulo_capacity(seq: int, cap: int) -> None:
    """The slot of a seq is seq mod capacity."""
    assert slot_of(seq, cap) == seq % cap


@given(ring_states())
def test_plan_read_invariants(state: tuple[int, int, int, int, int]) -> None:
    """A plan reads only committed, untouched records, at most limit, and counts skips as lost."""
    cap, cursor, write_seq, reserve_seq, limit = state
    start, end, lost = plan_read(cursor, write_seq, reserve_seq, cap, limit)
    assert start >= cursor and lost == start - cursor
    assert start >= oldest_present(reserve_seq, cap)  # nothing the writer may be overwriting
    assert start <= end <= write_seq  # only committed records
    assert end - start <= limit
    if cursor >= reserve_seq - cap:
        assert lost == 0  # a reader inside the ring loses nothing
    if start < write_seq:
        assert end > start  # progress whenever something is readable
    # every planned record lives in a slot that no reserved record occupies
    assert end - start <= cap


@given(ring_states())
def test_plan_read_after_lapping_resumes_at_the_oldest_present(
    state: tuple[int, int, int, int, int],
) -> None:
    """A lapped reader resumes exactly at reserve_seq - capacity and loses the gap."""
    cap, _, write_seq, reserve_seq, limit = state
    if reserve_seq <= cap:
        return
    start, _end, lost = plan_read(0, write_seq, reserve_seq, cap, limit)
    assert start == reserve_seq - cap
    assert lost == reserve_seq - cap


@given(capacities, seqs, st.integers(0, 1 << 22))
def test_runs_cover_the_range_without_wrapping(cap: int, start: int, span: int) -> None:
    """runs() splits [start, end) into contiguous pieces, none crossing the ring's end."""
    count = span % (8 * cap + 1)  # up to eight laps: enough to wrap, cheap to check
    end = start + count
    pieces = list(runs(start, end, cap))
    assert sum(n for _, n in pieces) == count
    seq = start
    for first, n in pieces:
        assert first == seq and n >= 1
        assert slot_of(first, cap) + n <= cap
        seq += n
    assert seq == end
    if count <= cap:
        assert len(pieces) <= 2


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


@given(seqs, capacities)
def test_oldest_present_never_negative(reserve_seq: int, cap: int) -> None:
    """oldest_present clamps at 0 for a ring that has not wrapped yet."""
    assert oldest_present(reserve_seq, cap) == max(0, reserve_seq - cap)


@given(capacities, st.lists(st.tuples(st.booleans(), st.integers(1, 70)), max_size=60))
def test_model_reader_sees_every_record_once_or_counts_it_lost(
    cap: int,
    steps: list[tuple[bool, int]],
) -> None:
    """Simulated publish/read interleavings: delivered + lost == published, in order, no repeats."""
    write_seq = 0
    cursor = 0
    delivered: list[int] = []
    lost = 0
    for publish, n in [*steps, (False, 1 << 30)]:
        if publish:
            write_seq += n  # drop-oldest: the writer never waits
            continue
        start, end, skipped = plan_read(cursor, write_seq, write_seq, cap, n)
        delivered.extend(range(start, end))
        lost += skipped
        cursor = end
    assert delivered == sorted(set(delivered))
    assert len(delivered) + lost == write_seq
    assert cursor == write_seq


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
