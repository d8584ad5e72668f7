"""What crosses the Zenoh bridge besides the payload, and the receiving side's accounting.

Pure functions and plain state, no I/O and no zenoh: the sink
(:mod:`shmd.daemons.zenohio`) encodes a :class:`Stamp` into each sample's
attachment, the source decodes it and feeds it to a :class:`Ledger`, which
says whether to publish the record and what was lost on the way.

The attachment is 56 bytes, little-endian (docs/BRIDGE.md)::

    0   3  magic b"SHZ"
    3   1  version (1)
    4   1  flags: bit 0 = the sending bridge forwards every topic of its bus
    5   3  zero
    8   8  generation of the sending bus's segment
    16  8  seq of the record on the sending bus
    24  8  the sending writer's timestamp (its CLOCK_MONOTONIC ns at publish)
    32  8  session: a random id the sending bridge draws at start
    40  8  index: this session's count of records sent before this one
    48  8  bus_lost: records the sending bridge lost on its own bus so far

With the sink's ``pack`` on, one sample carries a run of records of one
topic: the stamp (flag bit 1 set) describes the first, and a table after it
each one's seq, timestamp and payload length (:class:`Packed`; the payloads
are the sample's payload, concatenated)::

    56  4  count: the records in the sample (1 or more)
    60  4  zero
    64  20 per record: seq (8), timestamp (8), payload length (4)

Loss is counted per *origin* (the key minus its last chunk, i.e. the sending
bridge's prefix): within one session by the index (what Zenoh dropped) plus
the growth of ``bus_lost`` (what the sending bus overwrote before the bridge
read it); across a new session (the sending bridge restarted) by the seq gap
on the sending bus, exact when it forwards every topic (flag bit 0).  A new
generation on the sending bus is reported, not counted.  A record that
arrives after a later one (reordered or duplicated) is not published: the
bus stays in order, and the gap its absence made stays counted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from itertools import islice
from operator import lt
from typing import Any, NamedTuple

MAGIC = b"SHZ"
VERSION = 1
FLAG_ALL_TOPICS = 1
#: The sample is a pack: a count and a table of records follow the stamp.
FLAG_PACKED = 2
_FORMAT = struct.Struct("<3sBB3xQQQQQQ")
#: The attachment's size in bytes.
STAMP_SIZE = _FORMAT.size
_COUNT = struct.Struct("<I4x")
#: One record of a pack's table: seq, timestamp, payload length.
PACK_ENTRY = struct.Struct("<QQI")
#: Where a pack's table starts in its attachment.
PACK_TABLE = STAMP_SIZE + _COUNT.size
#: The most records one pack may carry (a sender makes far smaller ones).
PACK_MAX_RECORDS = 65536
_U64 = (1 << 64) - 1


class StampError(ValueError):
    """An attachment that is not a bridge stamp."""


class Stamp(NamedTuple):
    """One record's bridge attachment (a tuple: one is made per record received)."""

    generation: int
    seq: int
    timestamp_ns: int
    session: int
    # The attachment's own name for it (docs/BRIDGE.md); as a field it hides
    # tuple.index(), which nothing here calls.
    index: int  # type: ignore[assignment]
    bus_lost: int
    all_topics: bool = True

    def encode(self) -> bytes:
        """The 56-byte attachment."""
        flags = FLAG_ALL_TOPICS if self.all_topics else 0
        return _FORMAT.pack(
            MAGIC,
            VERSION,
            flags,
            self.generation & _U64,
            self.seq & _U64,
            self.timestamp_ns & _U64,
            self.session & _U64,
            self.index & _U64,
            self.bus_lost & _U64,
        )


def decode_stamp(data: bytes | None) -> Stamp:
    """Read an attachment; :class:`StampError` says why it is not one."""
    if data is None:
        raise StampError("the sample has no attachment")
    if len(data) != STAMP_SIZE:
        raise StampError(f"the attachment is {len(data)} bytes, not {STAMP_SIZE}")
    stamp, flags = _header(data)
    if flags & FLAG_PACKED:
        raise StampError("the attachment is a pack's, without its table")
    return stamp


def _header(data: bytes) -> tuple[Stamp, int]:
    """The stamp at the start of ``data`` (at least STAMP_SIZE bytes) and its flags."""
    magic, version, flags, gen, seq, ts, session, index, lost = _FORMAT.unpack_from(data)
    if magic != MAGIC:
        raise StampError(f"the attachment does not start with {MAGIC!r}")
    if version != VERSION:
        raise StampError(f"the attachment is of version {version}, not {VERSION}")
    if flags & ~(FLAG_ALL_TOPICS | FLAG_PACKED) or data[5:8] != b"\0\0\0":
        raise StampError("the attachment has unknown flags set")
    return Stamp(gen, seq, ts, session, index, lost, bool(flags & FLAG_ALL_TOPICS)), flags


class Packed(NamedTuple):
    """A pack's attachment: the first record's stamp and its table, column by column.

    Columns, not rows of (seq, timestamp, length): the receiving side checks
    and slices a whole pack with C-level builtins (``max``, ``sum``,
    ``map``) instead of a Python loop per record.
    """

    first: Stamp
    seqs: tuple[int, ...]
    timestamps: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def entries(self) -> list[tuple[int, int, int]]:
        """The table's rows: each record's (seq, timestamp, length)."""
        return list(zip(self.seqs, self.timestamps, self.lengths, strict=True))

    @property
    def increasing(self) -> bool:
        """Whether every record's seq is above the one before it (as a sender makes them)."""
        seqs = self.seqs
        return all(map(lt, seqs, islice(seqs, 1, None)))

    def stamps(self) -> list[Stamp]:
        """Each record's stamp, as if it had been sent alone (index = the first's + i)."""
        f = self.first
        g, session, index, lost, every = f.generation, f.session, f.index, f.bus_lost, f.all_topics
        return [
            Stamp(g, seq, ts, session, (index + i) & _U64, lost, every)
            for i, (seq, ts) in enumerate(zip(self.seqs, self.timestamps, strict=True))
        ]


def decode(data: bytes | None, payload_size: int) -> Stamp | Packed:
    """A sample's attachment, alone or a pack whose lengths add up to ``payload_size``."""
    if data is not None and len(data) > STAMP_SIZE and data[4] & FLAG_PACKED:
        return decode_pack(data, payload_size)
    return decode_stamp(data)


def decode_pack(data: bytes, payload_size: int) -> Packed:
    """Read a pack's attachment; :class:`StampError` says why it is not one."""
    if len(data) < PACK_TABLE:
        raise StampError(f"the pack's attachment is {len(data)} bytes, less than {PACK_TABLE}")
    first, flags = _header(data)
    if not flags & FLAG_PACKED:
        raise StampError(f"the attachment is {len(data)} bytes, not {STAMP_SIZE}")
    (count,) = _COUNT.unpack_from(data, STAMP_SIZE)
    if not 0 < count <= PACK_MAX_RECORDS:
        raise StampError(f"the pack's count is {count}, not 1 to {PACK_MAX_RECORDS}")
    if data[STAMP_SIZE + 4 : PACK_TABLE] != bytes(4):
        raise StampError("the pack's count is followed by bytes that are not zero")
    if len(data) != PACK_TABLE + count * PACK_ENTRY.size:
        raise StampError(
            f"the pack's attachment is {len(data)} bytes, "
            f"not {PACK_TABLE + count * PACK_ENTRY.size} for {count} records"
        )
    # Rows to columns at C speed: one tuple per record from iter_unpack, no
    # Python bytecode per record.
    rows = PACK_ENTRY.iter_unpack(memoryview(data)[PACK_TABLE:])
    seqs, timestamps, lengths = zip(*rows, strict=True)
    if (seqs[0], timestamps[0]) != (first.seq, first.timestamp_ns):
        raise StampError("the pack's first record is not the one its stamp describes")
    total = sum(lengths)
    if total != payload_size:
        raise StampError(f"the pack's records add up to {total} bytes, not its {payload_size}")
    return Packed(first, seqs, timestamps, lengths)


class StampCounter:
    """The sending side: one session's stamps, in order."""

    def __init__(self, session: int, *, all_topics: bool) -> None:
        self.session = session
        self.all_topics = all_topics
        self.index = 0

    def next(self, generation: int, seq: int, timestamp_ns: int, bus_lost: int) -> bytes:
        """The attachment of the next record sent (``Stamp(...).encode()``, packed directly)."""
        index = self.index
        self.index = index + 1
        return _FORMAT.pack(
            MAGIC,
            VERSION,
            FLAG_ALL_TOPICS if self.all_topics else 0,
            generation & _U64,
            seq & _U64,
            timestamp_ns & _U64,
            self.session & _U64,
            index & _U64,
            bus_lost & _U64,
        )

    def next_pack(
        self, generation: int, entries: list[tuple[int, int, int]], bus_lost: int
    ) -> bytes:
        """The attachment of a pack of the next records, each (seq, timestamp, length)."""
        seq, ts, _ = entries[0]
        index = self.index
        self.index = index + len(entries)
        head = _FORMAT.pack(
            MAGIC,
            VERSION,
            FLAG_PACKED | (FLAG_ALL_TOPICS if self.all_topics else 0),
            generation & _U64,
            seq & _U64,
            ts & _U64,
            self.session & _U64,
            index & _U64,
            bus_lost & _U64,
        )
        pack = PACK_ENTRY.pack
        table = b"".join([pack(s & _U64, t & _U64, n) for s, t, n in entries])
        return head + _COUNT.pack(len(entries)) + table


@dataclass(slots=True)
class Origin:
    """What the receiving side knows of one sending bridge."""

    session: int
    generation: int
    seq: int  # the last seq published from this origin
    index: int  # the last index seen in this session
    bus_lost: int  # the last bus_lost seen in this session
    received: int = 0
    lost: int = 0
    reordered: int = 0
    restarts: int = 0
    generations: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the status file's entry)."""
        return {
            "session": self.session,
            "generation": self.generation,
            "seq": self.seq,
            "index": self.index,
            "bus_lost": self.bus_lost,
            "received": self.received,
            "lost": self.lost,
            "reordered": self.reordered,
            "restarts": self.restarts,
            "generations": self.generations,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Origin:
        """The entry back (:class:`KeyError`, :class:`TypeError` or ValueError if not one)."""
        keys = ("session", "generation", "seq", "index", "bus_lost", "received", "lost")
        more = ("reordered", "restarts", "generations")
        values = [d[k] for k in keys] + [d.get(k, 0) for k in more]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError("not an origin entry")
        return cls(*values)


class Verdict(NamedTuple):
    """What to do with one record, and what it told us (a tuple, like :class:`Stamp`)."""

    publish: bool
    #: Records lost on the way, counted now (0 or more).
    lost: int = 0
    #: ``joined``, ``restarted``, ``generation_changed``, ``reordered`` or "".
    event: str = ""
    #: Whether ``lost`` is exact (False: a seq gap across a restart of a
    #: bridge forwarding a topic subset counts every bus record in it).
    exact: bool = True
    #: ``joined``: records the origin sent or lost before this one, uncounted.
    before: int = 0


#: The verdict of a record that arrived right after its predecessor: nothing
#: lost, nothing to report (one shared value; most records get this one).
IN_ORDER = Verdict(True)


@dataclass
class Ledger:
    """The receiving side's accounting, per origin (see the module docstring)."""

    origins: dict[str, Origin] = field(default_factory=dict)
    #: Samples refused before accounting: no or a bad attachment, an unknown
    #: key, an oversized payload.
    refused: int = 0

    @property
    def lost(self) -> int:
        return sum(o.lost for o in self.origins.values())

    def account(self, origin: str, s: Stamp) -> Verdict:
        """Account one well-formed record from ``origin``."""
        o = self.origins.get(origin)
        if (
            o is not None
            and s.index == o.index + 1
            and s.session == o.session
            and s.generation == o.generation
            and s.seq > o.seq
            and s.bus_lost <= o.bus_lost
        ):
            # The next record of the session, nothing lost on the way or on the
            # sending bus: what account_slow() does in this case, without its
            # branches and without a new Verdict (tests/test_bridge.py checks
            # the two agree on every sequence it draws).
            o.seq, o.index = s.seq, s.index
            o.received += 1
            return IN_ORDER
        return self.account_slow(origin, s)

    def account_run(self, origin: str, p: Packed) -> bool:
        """Account a whole pack at once if each of its records takes account()'s fast path.

        That is: its first record is the next in order, its seqs increase,
        and its indexes do not wrap.  Then the ledger ends as account() on
        each record in turn would leave it, every verdict ``IN_ORDER``, and
        this returns True (tests/test_bridge.py checks the two agree).  Else
        it changes nothing and returns False: account each record alone.
        """
        o = self.origins.get(origin)
        s = p.first
        count = len(p.seqs)
        if (
            o is not None
            and s.index == o.index + 1
            and s.index + count - 1 <= _U64
            and s.session == o.session
            and s.generation == o.generation
            and s.seq > o.seq
            and s.bus_lost <= o.bus_lost
            and p.increasing
        ):
            o.seq, o.index = p.seqs[-1], s.index + count - 1
            o.received += count
            return True
        return False

    def account_slow(self, origin: str, s: Stamp) -> Verdict:
        """:meth:`account`, every case by the general rules (joins, gaps, reorders, restarts)."""
        o = self.origins.get(origin)
        if o is None:
            self.origins[origin] = Origin(s.session, s.generation, s.seq, s.index, s.bus_lost, 1)
            return Verdict(True, event="joined", before=s.index + s.bus_lost)
        if s.session == o.session and s.index <= o.index:
            o.reordered += 1
            return Verdict(False, event="reordered")
        if s.generation != o.generation:
            # A new segment on the sending side: its seqs start over; what its
            # writer's restart cost is the sending bus's, not the bridge's.
            lost = s.index - o.index - 1 if s.session == o.session else 0
            if s.session != o.session:
                o.restarts += 1
            o.session, o.generation, o.seq, o.index = s.session, s.generation, s.seq, s.index
            o.bus_lost = s.bus_lost
            o.generations += 1
            return self._take(o, Verdict(True, lost=lost, event="generation_changed"))
        if s.session != o.session:
            return self._restarted(o, s)
        if s.seq <= o.seq:
            # A record published already (a restarted sender re-reading its
            # ring): skipped, and the session's numbering followed.
            o.index, o.bus_lost = s.index, max(o.bus_lost, s.bus_lost)
            o.reordered += 1
            return Verdict(False, event="reordered")
        lost = (s.index - o.index - 1) + max(0, s.bus_lost - o.bus_lost)
        o.seq, o.index, o.bus_lost = s.seq, s.index, max(o.bus_lost, s.bus_lost)
        return self._take(o, Verdict(True, lost=lost))

    def _restarted(self, o: Origin, s: Stamp) -> Verdict:
        """A new session of the same generation: the sending bridge restarted."""
        o.restarts += 1
        o.session, o.index, o.bus_lost = s.session, s.index, s.bus_lost
        if s.seq <= o.seq:
            # It started at records it had sent already (start: oldest).
            o.reordered += 1
            return Verdict(False, event="restarted")
        gap = s.seq - o.seq - 1
        o.seq = s.seq
        return self._take(o, Verdict(True, lost=gap, event="restarted", exact=s.all_topics))

    @staticmethod
    def _take(o: Origin, v: Verdict) -> Verdict:
        o.received += 1
        o.lost += v.lost
        return v

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the status file's ``origins`` and ``refused``."""
        return {
            "lost": self.lost,
            "refused": self.refused,
            "origins": {k: o.to_dict() for k, o in sorted(self.origins.items())},
        }

    @classmethod
    def from_dict(cls, d: Any) -> Ledger:
        """A ledger back from :meth:`to_dict`'s data; an empty one if it is not that."""
        try:
            origins = {str(k): Origin.from_dict(v) for k, v in d["origins"].items()}
            refused = d["refused"]
            if not isinstance(refused, int) or refused < 0:
                raise ValueError("refused")
        except (KeyError, TypeError, ValueError, AttributeError):
            return cls()
        return cls(origins, refused)
