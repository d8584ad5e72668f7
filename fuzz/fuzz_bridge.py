"""Fuzz target: the zenoh bridge's stamps and accounting (shmd.daemons.bridge).

What a hostile Zenoh peer controls: every attachment, and the order, gaps,
sessions and generations of a stream of records.  The input is a list of
steps; a step is five bytes, or a raw attachment::

    b0  bit 7: raw (the next 56 bytes are an attachment as sent)
        bits 0-1 origin, 2-3 session, 4-5 generation, 6 all_topics
    b1  seq step (int8: negative is a record from the past)
    b2  index step (int8)
    b3  bus_lost step (uint8)
    b4  unused (the timestamp's low byte)

A raw attachment must decode to a stamp that encodes back to the same bytes,
or raise StampError.  Every stamp goes to one Ledger; the checks: no count
is ever negative, a record is published only after every earlier published
record of its origin and generation (the bus stays in order), an origin's
``received`` is what was published from it, the ledger's ``lost`` is the sum
of the verdicts', and its plain data reads back equal.
"""

from __future__ import annotations

from shmd.daemons.bridge import STAMP_SIZE, Ledger, Stamp, StampError, decode_stamp

_STEP = 5


def _signed(b: int) -> int:
    return b - 256 if b > 127 else b


def test_one_input(data: bytes) -> None:
    """Run the steps in ``data`` through decode_stamp and a Ledger; assert the invariants."""
    ledger = Ledger()
    # (origin, session, generation) -> [seq, index, bus_lost] of the sender's stream
    streams: dict[tuple[int, int, int], list[int]] = {}
    last_published: dict[str, tuple[int, int]] = {}  # origin -> (generation, seq)
    published: dict[str, int] = {}
    lost = 0
    pos = 0
    while pos < len(data):
        b0 = data[pos]
        if b0 & 0x80:
            raw = data[pos + 1 : pos + 1 + STAMP_SIZE]
            pos += 1 + STAMP_SIZE
            try:
                stamp = decode_stamp(raw)
            except StampError:
                continue
            assert stamp.encode() == raw
            origin = f"raw{b0 & 3}"
        else:
            step = data[pos : pos + _STEP].ljust(_STEP, b"\0")
            pos += _STEP
            key = (b0 & 3, (b0 >> 2) & 3, (b0 >> 4) & 3)
            seq, index, bus_lost = streams.setdefault(key, [100, 0, 0])
            seq = max(0, seq + _signed(step[1]))
            index = max(0, index + _signed(step[2]))
            bus_lost += step[3]
            streams[key] = [seq, index, bus_lost]
            origin = f"o{key[0]}"
            stamp = Stamp(key[2], seq, step[4], key[1], index, bus_lost, bool(b0 & 0x40))
        verdict = ledger.account(origin, stamp)
        assert verdict.lost >= 0 and verdict.before >= 0
        lost += verdict.lost
        if verdict.publish:
            before = last_published.get(origin)
            if before is not None and before[0] == stamp.generation:
                assert stamp.seq > before[1], (origin, before, stamp)
            last_published[origin] = (stamp.generation, stamp.seq)
            published[origin] = published.get(origin, 0) + 1
    for name, o in ledger.origins.items():
        assert o.lost >= 0 and o.reordered >= 0
        assert o.received == published.get(name, 0), (name, o)
    assert ledger.lost == lost
    assert Ledger.from_dict(ledger.to_dict()) == ledger
