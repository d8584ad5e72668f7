"""Tests of shmd.daemons.bridge: the stamp codec and the receiving side's accounting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmd.daemons.bridge import (
    IN_ORDER,
    PACK_TABLE,
    STAMP_SIZE,
    Ledger,
    Packed,
    Stamp,
    StampCounter,
    StampError,
    Verdict,
    decode,
    decode_stamp,
)

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def stamp(seq: int, index: int, *, gen: int = 7, session: int = 1, lost: int = 0) -> Stamp:
    return Stamp(gen, seq, 1_000 + seq, session, index, lost)


@given(st.tuples(U64, U64, U64, U64, U64, U64), st.booleans())
def test_a_stamp_survives_encoding(fields: tuple[int, ...], all_topics: bool) -> None:
    """Every field of a stamp comes back from its 56 bytes unchanged."""
    gen, seq, ts, session, index, lost = fields
    s = Stamp(gen, seq, ts, session, index, lost, all_topics)
    data = s.encode()
    assert len(data) == STAMP_SIZE == 56
    assert decode_stamp(data) == s


def test_the_layout_is_the_documented_one() -> None:
    """Magic, version, flags, then the six u64 fields little-endian at 8-byte offsets."""
    data = Stamp(2, 3, 4, 5, 6, 7, all_topics=True).encode()
    assert data[:8] == b"SHZ\x01\x01\x00\x00\x00"
    words = [int.from_bytes(data[i : i + 8], "little") for i in range(8, 56, 8)]
    assert words == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (None, "no attachment"),
        (b"", "0 bytes"),
        (b"x" * 55, "55 bytes"),
        (b"NOP\x01" + bytes(52), "does not start with"),
        (b"SHZ\x02" + bytes(52), "version 2"),
        (b"SHZ\x01\x04" + bytes(51), "unknown flags"),
        (b"SHZ\x01\x02" + bytes(51), "a pack's, without its table"),
        (b"SHZ\x01\x00\x00\x01\x00" + bytes(48), "unknown flags"),
    ],
)
def test_garbage_is_not_a_stamp(data: bytes | None, why: str) -> None:
    """A missing, short, foreign or future attachment is a StampError saying which."""
    with pytest.raises(StampError, match=why):
        decode_stamp(data)


@given(st.binary(max_size=80))
def test_decoding_never_fails_otherwise(data: bytes) -> None:
    """Any bytes decode to a stamp or raise StampError, nothing else."""
    try:
        decode_stamp(data)
    except StampError:
        pass


ENTRIES = st.lists(
    st.tuples(U64, U64, st.integers(min_value=0, max_value=1 << 20)), min_size=1, max_size=40
)


@given(st.tuples(U64, U64, U64), st.integers(0, (1 << 64) - 41), ENTRIES, st.booleans())
def test_a_pack_survives_encoding(
    head: tuple[int, int, int],
    index: int,
    entries: list[tuple[int, int, int]],
    all_topics: bool,
) -> None:
    """A pack's stamps and table come back whole; each record's stamp is its own."""
    session, gen, lost = head
    c = StampCounter(session, all_topics=all_topics)
    c.index = index
    data = c.next_pack(gen, entries, lost)
    assert c.index == index + len(entries)
    assert len(data) == PACK_TABLE + 20 * len(entries)
    packed = decode(data, sum(n for _, _, n in entries))
    assert isinstance(packed, Packed)
    assert packed.entries == entries
    assert packed.stamps() == [
        Stamp(gen, seq, ts, session, index + i, lost, all_topics)
        for i, (seq, ts, _) in enumerate(entries)
    ]


def test_a_pack_is_laid_out_as_documented() -> None:
    """The stamp of the first record with flag bit 1, a u32 count, then 20 bytes a record."""
    data = StampCounter(5, all_topics=True).next_pack(2, [(3, 4, 10), (8, 9, 1)], 7)
    assert data[:8] == b"SHZ\x01\x03\x00\x00\x00"
    words = [int.from_bytes(data[i : i + 8], "little") for i in range(8, 56, 8)]
    assert words == [2, 3, 4, 5, 0, 7]
    assert data[56:64] == b"\x02\x00\x00\x00\x00\x00\x00\x00"
    assert data[64:] == b"".join(
        s.to_bytes(8, "little") + t.to_bytes(8, "little") + n.to_bytes(4, "little")
        for s, t, n in [(3, 4, 10), (8, 9, 1)]
    )
    assert decode(Stamp(2, 3, 4, 5, 0, 7).encode(), 99) == Stamp(2, 3, 4, 5, 0, 7)


def _pack(count: int = 2, *, first: tuple[int, int] = (3, 4), total: int = 11) -> bytes:
    """A pack's attachment with its fields as given (lengths 10 and the rest)."""
    head = bytearray(Stamp(2, first[0], first[1], 5, 0, 7).encode())
    head[4] |= 2
    table = b"".join(
        (3 + i).to_bytes(8, "little") + (4 + i).to_bytes(8, "little")
        + (10 if i == 0 else (total - 10) // max(1, count - 1)).to_bytes(4, "little")
        for i in range(count)
    )  # fmt: skip
    return bytes(head) + count.to_bytes(4, "little") + bytes(4) + table


@pytest.mark.parametrize(
    ("data", "size", "why"),
    [
        (_pack()[:60], 11, "less than 64"),
        (_pack()[:-1], 11, "not 104 for 2 records"),
        (_pack() + bytes(20), 11, "not 104 for 2 records"),
        (_pack(0), 0, "count is 0"),
        (_pack()[:56] + (1 << 31).to_bytes(4, "little") + bytes(4), 11, "count is 2147483648"),
        (_pack()[:60] + b"\x01" + _pack()[61:], 11, "not zero"),
        (_pack(first=(9, 4)), 11, "not the one its stamp describes"),
        (_pack(), 12, "add up to 11 bytes, not its 12"),
        (b"NOP" + _pack()[3:], 11, "does not start with"),
    ],
)
def test_a_broken_pack_is_refused(data: bytes, size: int, why: str) -> None:
    """A pack whose count, table, first record or lengths do not hold is a StampError."""
    with pytest.raises(StampError, match=why):
        decode(data, size)


@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_decoding_a_pack_never_fails_otherwise(data: bytes, size: int) -> None:
    """Any bytes with the pack flag decode or raise StampError, nothing else."""
    raw = bytearray(Stamp(1, 2, 3, 4, 5, 6).encode()) + data
    raw[4] |= 2
    for attempt in (bytes(raw), data):
        try:
            decode(attempt, size)
        except StampError:
            pass


def test_the_counter_numbers_one_session_contiguously() -> None:
    """Each next() is the session's next index, carrying the bus's state of the moment."""
    c = StampCounter(99, all_topics=False)
    stamps = [decode_stamp(c.next(4, 10 + i, 5, i)) for i in range(3)]
    assert [(s.index, s.seq, s.bus_lost) for s in stamps] == [(0, 10, 0), (1, 11, 1), (2, 12, 2)]
    assert {(s.session, s.generation, s.all_topics) for s in stamps} == {(99, 4, False)}


def test_an_unbroken_stream_loses_nothing() -> None:
    """Consecutive indexes publish every record and count no loss."""
    ledger = Ledger()
    verdicts = [ledger.account("a", stamp(100 + i, i)) for i in range(5)]
    assert verdicts[0] == Verdict(True, event="joined")
    assert all(v == Verdict(True) for v in verdicts[1:])
    assert (ledger.lost, ledger.origins["a"].received) == (0, 5)


def test_a_gap_in_the_index_is_counted_exactly() -> None:
    """Records dropped on the way (index 2..4 missing) are counted as 3 lost."""
    ledger = Ledger()
    for i in (0, 1, 5, 6):
        ledger.account("a", stamp(100 + i, i))
    assert ledger.lost == 3
    assert ledger.origins["a"].received == 4


def test_records_the_sending_bus_overwrote_are_counted() -> None:
    """A rise of bus_lost is loss too, on top of any index gap."""
    ledger = Ledger()
    ledger.account("a", stamp(100, 0))
    v = ledger.account("a", stamp(110, 2, lost=8))
    assert v == Verdict(True, lost=1 + 8)
    assert ledger.lost == 9


def test_the_first_record_of_an_origin_counts_nothing_before_it() -> None:
    """Joining a running stream reports what came before (before=) without counting it."""
    ledger = Ledger()
    v = ledger.account("a", stamp(500, 40, lost=2))
    assert v == Verdict(True, event="joined", before=42)
    assert ledger.lost == 0


def test_a_late_record_is_not_published_and_stays_counted() -> None:
    """A reordered record is dropped (the bus stays in order); its gap stays counted."""
    ledger = Ledger()
    for i in (0, 1, 3):
        ledger.account("a", stamp(100 + i, i))
    late = ledger.account("a", stamp(102, 2))
    assert late == Verdict(False, event="reordered")
    assert ledger.account("a", stamp(103, 3)).publish is False  # a duplicate too
    assert (ledger.lost, ledger.origins["a"].reordered) == (1, 2)


def test_a_restarted_sender_is_charged_its_seq_gap() -> None:
    """A new session continues the origin: what it missed is the bus seq gap."""
    ledger = Ledger()
    ledger.account("a", stamp(100, 0))
    ledger.account("a", stamp(101, 1))
    v = ledger.account("a", stamp(131, 0, session=2))
    assert v == Verdict(True, lost=29, event="restarted")
    ledger.account("a", stamp(132, 1, session=2))
    assert (ledger.lost, ledger.origins["a"].restarts) == (29, 1)


def test_a_restart_of_a_topic_subset_is_marked_inexact() -> None:
    """Across a restart of a bridge of some topics the seq gap is an upper bound."""
    ledger = Ledger()
    ledger.account("a", stamp(100, 0))
    s = Stamp(7, 120, 0, 2, 0, 0, all_topics=False)
    assert ledger.account("a", s) == Verdict(True, lost=19, event="restarted", exact=False)


def test_a_restart_that_rereads_old_records_skips_them() -> None:
    """start: oldest after a restart re-sends records: those are dropped, the rest go on."""
    ledger = Ledger()
    for i in range(3):
        ledger.account("a", stamp(100 + i, i))
    assert ledger.account("a", stamp(101, 0, session=2)).publish is False
    assert ledger.account("a", stamp(102, 1, session=2)).publish is False
    assert ledger.account("a", stamp(103, 2, session=2)) == Verdict(True)
    assert ledger.lost == 0


def test_a_generation_change_is_reported_not_counted() -> None:
    """A new segment on the sending side restarts its seqs without any loss counted."""
    ledger = Ledger()
    ledger.account("a", stamp(100, 0))
    v = ledger.account("a", stamp(0, 1, gen=8, lost=50))
    assert v == Verdict(True, event="generation_changed")
    assert ledger.account("a", stamp(1, 2, gen=8, lost=50)) == Verdict(True)
    assert (ledger.lost, ledger.origins["a"].generations) == (0, 1)


def test_a_generation_change_still_counts_an_index_gap() -> None:
    """Records Zenoh dropped around a generation change are still the bridge's loss."""
    ledger = Ledger()
    ledger.account("a", stamp(100, 0))
    assert ledger.account("a", stamp(3, 4, gen=8)).lost == 3


def test_origins_are_accounted_apart() -> None:
    """Two sending bridges do not disturb each other's counts."""
    ledger = Ledger()
    ledger.account("a", stamp(1, 0))
    ledger.account("b", stamp(1, 0, session=5))
    ledger.account("a", stamp(3, 2))
    ledger.account("b", stamp(2, 1, session=5))
    assert (ledger.origins["a"].lost, ledger.origins["b"].lost) == (1, 0)


def test_the_ledger_resumes_from_its_plain_data() -> None:
    """to_dict/from_dict round-trips, so a restarted receiver counts what it missed."""
    ledger = Ledger()
    ledger.account("a", stamp(1, 0))
    ledger.refused = 3
    again = Ledger.from_dict(ledger.to_dict())
    assert again == ledger
    assert again.account("a", stamp(10, 9)).lost == 8


@pytest.mark.parametrize(
    "junk",
    [
        None,
        [],
        {},
        {"origins": []},
        {"origins": {"a": {"seq": -1}}, "refused": 0},
        {"origins": {}, "refused": "x"},
    ],
)
def test_unreadable_ledger_data_gives_a_fresh_ledger(junk: object) -> None:
    """A damaged status file is not trusted: the accounting starts over."""
    assert Ledger.from_dict(junk) == Ledger()


# Biased towards the common case (the same session and generation, the next
# index) so that the fast path's every condition meets its edge often.
_stamps = st.lists(
    st.tuples(
        st.sampled_from(["o1", "o2"]),  # origin
        st.sampled_from([0, 0, 0, 1, 2]),  # session
        st.sampled_from([0, 0, 0, 1, 2]),  # generation
        st.sampled_from([1, 1, 2, 0, -1, 3]),  # seq step from the origin's last
        st.sampled_from([1, 1, 1, 0, 2, -1]),  # index step from the origin's last
        st.sampled_from([0, 0, 1, -1, 2]),  # bus_lost step from the origin's last
        st.booleans(),  # all_topics
    ),
    max_size=100,
)


@settings(max_examples=400)  # each mutation of the fast path fell to 100 in 28 of 30 tries
@given(_stamps)
def test_the_in_order_fast_path_agrees_with_the_general_rules(
    draws: list[tuple[str, int, int, int, int, int, bool]],
) -> None:
    """account() and account_slow() give the same verdicts and the same ledger on any sequence."""
    fast, slow = Ledger(), Ledger()
    last: dict[str, tuple[int, int, int]] = {}
    for origin, session, gen, dseq, dindex, dlost, all_topics in draws:
        seq0, index0, lost0 = last.get(origin, (10, 10, 10))
        s = Stamp(
            gen,
            max(0, seq0 + dseq),
            0,
            session,
            max(0, index0 + dindex),
            max(0, lost0 + dlost),
            all_topics,
        )
        last[origin] = (s.seq, s.index, s.bus_lost)
        assert fast.account(origin, s) == slow.account_slow(origin, s)
        assert fast.to_dict() == slow.to_dict()


def test_the_next_record_in_order_takes_the_fast_path() -> None:
    """A record right after its predecessor gets the shared IN_ORDER verdict."""
    ledger = Ledger()
    ledger.account("o", stamp(5, 0))
    assert ledger.account("o", stamp(6, 1)) is IN_ORDER
    assert ledger.account("o", stamp(8, 3)) is not IN_ORDER  # one lost: the general rules


# Packs drawn like _stamps: the first record relative to the origin's last,
# then each next seq relative to the one before (1 mostly; 0 or -1 breaks the
# increase), near the index's wrap now and then.
_packs = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 0, 1]),  # session
        st.sampled_from([0, 0, 0, 1]),  # generation
        st.sampled_from([1, 1, 2, 0, -1]),  # first seq step from the origin's last
        st.sampled_from([1, 1, 1, 0, 2]),  # first index step from the origin's last
        st.sampled_from([0, 0, 1, -1]),  # bus_lost step
        st.lists(st.sampled_from([1, 1, 1, 2, 0, -1]), max_size=6),  # seq steps in the pack
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(_packs, st.one_of(st.just(0), st.integers((1 << 64) - 16, (1 << 64) - 1)))
def test_accounting_a_pack_at_once_agrees_with_record_by_record(
    draws: list[tuple[int, int, int, int, int, list[int]]], index_base: int
) -> None:
    """account_run() leaves the ledger as account() per record would, or changes nothing."""
    whole, alone = Ledger(), Ledger()
    seq0, index0, lost0 = 10, index_base, 10
    for session, gen, dseq, dindex, dlost, steps in draws:
        seqs = [max(0, seq0 + dseq)]
        for step in steps:
            seqs.append(max(0, seqs[-1] + step))
        index = min(max(0, index0 + dindex), (1 << 64) - 1)
        first = Stamp(gen, seqs[0], 0, session, index, max(0, lost0 + dlost))
        p = Packed(first, tuple(seqs), (0,) * len(seqs), (1,) * len(seqs))
        before = whole.to_dict()
        if whole.account_run("o", p):
            verdicts = [alone.account("o", s) for s in p.stamps()]
            assert verdicts == [IN_ORDER] * len(seqs)
        else:
            assert whole.to_dict() == before
            for s in p.stamps():
                assert whole.account("o", s) == alone.account("o", s)
        assert whole.to_dict() == alone.to_dict()
        seq0, index0, lost0 = seqs[-1], p.stamps()[-1].index, first.bus_lost


def test_a_pack_next_in_order_is_accounted_at_once() -> None:
    """The second pack of a session, its seqs increasing, is one step; a gap is not."""
    ledger = Ledger()
    ledger.account("o", stamp(5, 0))
    in_order = Packed(stamp(6, 1), (6, 7, 9), (0, 0, 0), (1, 1, 1))
    assert in_order.increasing
    assert ledger.account_run("o", in_order)
    o = ledger.origins["o"]
    assert (o.seq, o.index, o.received) == (9, 3, 4)
    assert not ledger.account_run("o", Packed(stamp(11, 5), (11,), (0,), (1,)))  # 4 lost
    assert not Packed(stamp(12, 4), (12, 12), (0, 0), (1, 1)).increasing
    wraps = Ledger()
    wraps.account("o", stamp(5, (1 << 64) - 2))
    across = Packed(stamp(6, (1 << 64) - 1), (6, 7), (0, 0), (1, 1))  # its second index is 0
    assert not wraps.account_run("o", across)
