"""The ``zenoh`` sink: each record a Zenoh sample on ``<prefix>/<topic>``, stamped (docs/BRIDGE.md).

The key names the topic by its name on this bus (its id where it has none);
the attachment is a :class:`~shmd.daemons.bridge.Stamp`: the record's seq,
the writer's timestamp and the segment's generation, and this session's
count and the reader's losses, so that the receiving side can account for
every record.  Congestion control follows the bus's policy (``block`` ->
``BLOCK``, ``drop-oldest`` -> ``DROP``); records up to ``express_max`` bytes
go express.  With ``pack`` on, each run of records of one topic (and one
side of ``express_max``) that the reader took at once is one sample, a
:class:`~shmd.daemons.bridge.Packed` one (at most :data:`PACK_RECORDS`
records and :data:`PACK_BYTES` of payload and table).  The session opens when the
sink is built (before the reader attaches and says READY) and closes in
:meth:`ZenohSink.close`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import structlog

from shmd.bus.layout import REC_PAYLOAD, REC_SEQ, REC_TIMESTAMP, REC_TOPIC, RawRecord
from shmd.config import ZenohSinkConfig
from shmd.control.fields import TopicMap
from shmd.daemons.bridge import PACK_ENTRY, PACK_TABLE, StampCounter
from shmd.daemons.sinks import BusView, SinkError
from shmd.daemons.zenohio import (
    ZenohUnavailable,
    close_session,
    first_line,
    open_session,
    topic_key,
)

if TYPE_CHECKING:
    import zenoh

log = structlog.get_logger("shmd.daemons.zenoh_sink")

#: The most records one packed sample carries.
PACK_RECORDS = 1024
#: The most bytes of payload and table one packed sample carries (a record
#: larger than this goes alone).  Within one batch of Zenoh's (64 KiB): with
#: 1 MiB packs, which Zenoh fragments, the sink took 8.8-10.4 us a 4 KiB
#: record against 5.3-6.0 us with these (docs/PERFORMANCE.md).
PACK_BYTES = 48 * 1024


class ZenohSink:
    """``zenoh``: every record as a sample on ``<prefix>/<topic>`` with its stamp."""

    def __init__(self, cfg: ZenohSinkConfig) -> None:
        self.cfg = cfg
        try:
            self.z, self.session = open_session(cfg)
        except ZenohUnavailable as exc:
            raise SinkError(str(exc)) from None
        block = cfg.policy == "block"
        self.congestion = self.z.CongestionControl.BLOCK if block else self.z.CongestionControl.DROP
        self.stamps = StampCounter(secrets.randbits(64), all_topics=True)
        self.samples = 0  # Zenoh samples put (fewer than records when packing)
        self._view: BusView | None = None
        self._publishers: dict[tuple[str, bool], zenoh.Publisher] = {}
        # (topic id, express) -> its publisher's put, for the topic names of
        # _routes_for (a writer restarted with other names gets new routes).
        self._routes: dict[tuple[int, bool], Callable[..., None]] = {}
        self._routes_for: object = None
        log.info(
            "bridge_sending",
            mode=cfg.mode,
            prefix=cfg.prefix,
            listen=",".join(cfg.listen),
            connect=",".join(cfg.connect),
            session=f"{self.stamps.session:016x}",
            pack=cfg.pack,
        )

    def bind(self, view: BusView, *, all_topics: bool) -> None:
        """The subscription whose generation, names and losses each stamp carries."""
        self._view = view
        self.stamps.all_topics = all_topics

    def _publisher(self, key: str, express: bool) -> zenoh.Publisher:
        pub = self._publishers.get((key, express))
        if pub is None:
            pub = self.session.declare_publisher(
                key, congestion_control=self.congestion, express=express
            )
            self._publishers[(key, express)] = pub
        return pub

    def _routes_of(self, topics: TopicMap) -> dict[tuple[int, bool], Callable[..., None]]:
        """The routes learnt for these topic names (none yet after the names changed)."""
        if topics is not self._routes_for:
            self._routes, self._routes_for = {}, topics
        return self._routes

    def _route(self, route: tuple[int, bool], topics: TopicMap) -> Callable[..., None]:
        """A new route: the put of the publisher of (topic, express)."""
        key = topic_key(self.cfg.prefix, route[0], topics)
        put = self._routes[route] = self._publisher(key, route[1]).put
        return put

    def write(self, records: list[RawRecord]) -> None:
        view = self._view
        assert view is not None, "bind() before write()"
        try:
            if self.cfg.pack:
                self._write_packed(records, view)
                return
            generation, lost, topics = view.generation, view.lost, view.topics
            routes = self._routes_of(topics)
            small = self.cfg.express_max
            stamp = self.stamps.next
            for r in records:
                payload = r[REC_PAYLOAD]
                data = payload if isinstance(payload, bytes) else bytes(payload)
                route = (r[REC_TOPIC], 0 < len(data) <= small)
                put = routes.get(route) or self._route(route, topics)
                put(data, attachment=stamp(generation, r[REC_SEQ], r[REC_TIMESTAMP], lost))
                self.samples += 1
        except self.z.ZError as exc:
            raise SinkError(f"Failed to publish records to Zenoh since {first_line(exc)}") from None

    def _write_packed(self, records: list[RawRecord], view: BusView) -> None:
        """One sample per run of records (:meth:`_runs`)."""
        generation, lost, topics = view.generation, view.lost, view.topics
        routes = self._routes_of(topics)
        pack = self.stamps.next_pack
        for route, datas, entries in self._runs(records):
            put = routes.get(route) or self._route(route, topics)
            put(b"".join(datas), attachment=pack(generation, entries, lost))
            self.samples += 1

    def _runs(
        self, records: list[RawRecord]
    ) -> Iterator[tuple[tuple[int, bool], list[bytes], list[tuple[int, int, int]]]]:
        """Runs of one topic and one side of express_max, within PACK_RECORDS and PACK_BYTES.

        Each is its route (topic, express), its payloads and its table's
        entries (seq, timestamp, length).
        """
        small = self.cfg.express_max
        datas: list[bytes] = []
        entries: list[tuple[int, int, int]] = []
        size = PACK_TABLE
        route = (-1, False)
        for r in records:
            payload = r[REC_PAYLOAD]
            data = payload if isinstance(payload, bytes) else bytes(payload)
            this = (r[REC_TOPIC], 0 < len(data) <= small)
            size += len(data) + PACK_ENTRY.size
            if datas and (this != route or len(datas) >= PACK_RECORDS or size > PACK_BYTES):
                yield route, datas, entries
                datas, entries, size = [], [], PACK_TABLE + len(data) + PACK_ENTRY.size
            route = this
            datas.append(data)
            entries.append((r[REC_SEQ], r[REC_TIMESTAMP], len(data)))
        if datas:
            yield route, datas, entries

    def close(self) -> None:
        self._routes, self._routes_for = {}, None
        pubs, self._publishers = list(self._publishers.values()), {}
        close_session(self.session, pubs)
        log.info("bridge_sent", sent=self.stamps.index, samples=self.samples)
