"""The ``zenoh`` source: Zenoh samples into the bus, every record accounted (docs/BRIDGE.md).

Each sample's key names its topic by its last chunk (a name of
``segment.topics``, or the id of a topic without one); its attachment is
the sending bridge's :class:`~shmd.daemons.bridge.Stamp`, which a
:class:`~shmd.daemons.bridge.Ledger` checks per origin (the key without its
last chunk): losses on the way, reorders, restarts and generations.
Samples wait in a bounded Zenoh FIFO channel (full, it holds Zenoh's
receiving thread back: the back-pressure ``BLOCK`` asks for) and one drain
thread of ours takes them: each waiting run is accounted in arrival order and
published with one commit per run of the same topic, so a burst costs the bus
one commit and one wake-up, not one per sample.  What they counted is logged,
and the account written to :func:`~shmd.daemons.zenohio.status_path` (for ``shmctl
status``, and for a restarted writer to resume from), on the writer's loop.
"""

from __future__ import annotations

import json
import os
import threading
import time
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import structlog

from shmd.config import ZenohSourceConfig
from shmd.daemons.bridge import IN_ORDER, Ledger, Packed, Stamp, StampError, Verdict, decode
from shmd.daemons.sources import SourceError, SourceHost
from shmd.daemons.zenohio import (
    ZenohUnavailable,
    close_session,
    first_line,
    open_session,
    status_path,
    topic_of,
)

if TYPE_CHECKING:
    import zenoh

log = structlog.get_logger("shmd.daemons.zenoh_source")

Buffer: TypeAlias = bytes | memoryview
#: Records to publish: runs of (topic, payloads), in the order they were accounted.
Runs: TypeAlias = list[tuple[int, list[Buffer]]]

#: How often the source logs what it counted and rewrites its status file.
FLUSH_INTERVAL = 0.5
#: Origins accounted at most: a peer spraying keys cannot grow the account without bound.
MAX_ORIGINS = 256
#: Samples Zenoh's FIFO channel holds before its receiving thread waits for ours.
CHANNEL_DEPTH = 1024
#: Samples the drain thread takes at most per round (accounted, then published).
DRAIN_MAX = 256
#: Seconds close() waits for the drain thread to leave.
DRAIN_JOIN_TIMEOUT = 5.0
#: Keys whose (origin, topic) is remembered at most (then forgotten and learnt again).
KEY_CACHE = 4096


class ZenohSource:
    """``zenoh``: samples of a key expression published into the bus, with the accounting."""

    def __init__(self, cfg: ZenohSourceConfig) -> None:
        self.cfg = cfg
        self.topics = cfg.topic_names
        self.path = status_path(cfg.segment)
        self.ledger = _resume(self.path)
        self.refused_by: dict[str, int] = {}
        self._state = threading.Lock()  # the ledger and the pending counts
        self._order = threading.Lock()  # one sample at a time, accounted then published
        self._host: SourceHost | None = None
        self._z: Any = None  # the zenoh module, once start() imported it
        self._session: zenoh.Session | None = None
        self._subscriber: Any = None
        self._drainer: threading.Thread | None = None
        self._pending_lost: dict[str, tuple[int, bool]] = {}
        self._keys: dict[str, tuple[str, int | None]] = {}  # key -> (origin, topic)
        self._put: Any = None  # zenoh.SampleKind.PUT
        self._pending_refused: dict[str, tuple[int, str, str]] = {}
        self._dirty = True
        self._closed = False

    def start(self, host: SourceHost) -> None:
        self._host = host
        try:
            self._z, self._session = open_session(self.cfg)
            self._put = self._z.SampleKind.PUT
            channel = self._z.handlers.FifoChannel(CHANNEL_DEPTH)
            self._subscriber = self._session.declare_subscriber(self.cfg.key, channel)
        except ZenohUnavailable as exc:
            raise SourceError(str(exc)) from None
        except Exception as exc:  # a ZError from declare: the session is closed again
            close_session(self._session, [])
            raise SourceError(
                f"Failed to subscribe to {self.cfg.key!r} since {first_line(exc)}"
            ) from None
        log.info(
            "bridge_receiving",
            mode=self.cfg.mode,
            key=self.cfg.key,
            listen=",".join(self.cfg.listen),
            connect=",".join(self.cfg.connect),
            resumed=len(self.ledger.origins),
        )
        self._flush()
        self._drainer = threading.Thread(
            target=self._drain, args=(self._subscriber,), name="zenoh-source", daemon=True
        )
        self._drainer.start()
        host.call_later(FLUSH_INTERVAL, self._tick)

    # -- samples (the drain thread) ----------------------------------------------------------

    def _drain(self, subscriber: Any) -> None:
        """Take samples until the subscriber is undeclared (its channel closed and empty)."""
        recv, try_recv = subscriber.recv, subscriber.try_recv
        zerror = self._z.ZError
        while True:
            try:
                # recv() releases the GIL while it waits; once close() has
                # undeclared the subscriber it raises ZError ("channel is empty
                # and closed") instead of blocking, and that is our way out.
                samples = [recv()]
            except zerror:
                return
            while len(samples) < DRAIN_MAX:
                more = try_recv()
                if more is None:
                    break
                samples.append(more)
            try:
                self._take(samples)
            except Exception as exc:  # the thread must go on: counted, logged
                with self._state:
                    self._refuse("error", str(samples[0].key_expr), first_line(exc))

    def _take(self, samples: list[zenoh.Sample]) -> None:
        """Account samples in order, then publish them, one commit per run of one topic."""
        # _order keeps close() from returning while a publish it accounted is
        # still on its way (block: up to block_timeout); _state is only ever
        # held briefly, so the writer's loop never waits on a publish to read
        # the counts.
        with self._order:
            with self._state:
                if self._closed or self._host is None:
                    return
                max_payload = self._host.max_payload
                runs: Runs = []
                for sample in samples:
                    self._choose_one(sample, max_payload, runs)
            publish = self._host.publish_batch
            for topic, payloads in runs:
                publish(payloads, topic)

    def _choose_one(self, sample: zenoh.Sample, max_payload: int, runs: Runs) -> None:
        """:meth:`_choose`, with a sample that breaks it counted and logged, not raised."""
        try:
            self._choose(sample, max_payload, runs)
        except Exception as exc:
            self._refuse("error", str(getattr(sample, "key_expr", "?")), first_line(exc))

    def _choose(self, sample: zenoh.Sample, max_payload: int, runs: Runs) -> None:
        """Account a sample's records; add those to publish to ``runs`` (topic, payloads)."""
        key = str(sample.key_expr)
        found = self._stamped(sample, key)
        if found is None:
            return
        origin, topic, stamped = found
        if type(stamped) is Stamp:
            chosen = self._admit(
                origin, key, topic, stamped, size=len(sample.payload), max_payload=max_payload
            )
            if chosen is not None:
                _add(runs, chosen, [sample.payload.to_bytes()])
            return
        assert isinstance(stamped, Packed)
        data = memoryview(sample.payload.to_bytes())
        # The sender's packs: their records next in order, of a topic of ours,
        # each fitting a slot.  Accounted at once and sliced without a Python
        # step per record (map over slices: views, nothing copied).
        lengths = stamped.lengths
        if (
            topic is not None
            and max(lengths) <= max_payload
            and self.ledger.account_run(origin, stamped)
        ):
            self._dirty = True
            ends = list(accumulate(lengths))
            _add(runs, topic, list(map(data.__getitem__, map(slice, [0, *ends], ends))))
            return
        at = 0
        for stamp, size in zip(stamped.stamps(), lengths, strict=True):
            chosen = self._admit(origin, key, topic, stamp, size=size, max_payload=max_payload)
            if chosen is not None:
                _add(runs, chosen, [data[at : at + size]])
            at += size

    def _admit(
        self, origin: str, key: str, topic: int | None, stamp: Stamp, *, size: int, max_payload: int
    ) -> int | None:
        """Account one record; the topic to publish it in, or None (refused or not in order)."""
        verdict = self.ledger.account(origin, stamp)
        self._dirty = True
        if verdict is not IN_ORDER:
            self._note(origin, key, verdict, stamp.generation)
            if not verdict.publish:
                return None
        if topic is None:
            self._refuse("key", key, "its last chunk is no topic name or unnamed id of the bus")
            return None
        if size > max_payload:
            self._refuse(
                "oversize",
                key,
                f"its {size}-byte payload is larger than a slot's {max_payload} bytes",
            )
            return None
        return topic

    def _stamped(
        self, sample: zenoh.Sample, key: str
    ) -> tuple[str, int | None, Stamp | Packed] | None:
        """(origin, topic, stamp or pack) of a sample fit for accounting; None when refused."""
        if sample.kind != self._put:
            self._refuse("delete", key, "a DELETE sample carries no record")
            return None
        attachment = sample.attachment
        try:
            data = attachment.to_bytes() if attachment is not None else None
            stamp = decode(data, len(sample.payload))
        except StampError as exc:
            self._refuse("attachment", key, str(exc))
            return None
        mapped = self._keys.get(key)
        if mapped is None:
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()  # a peer spraying keys: bounded, learnt again
            origin = key.rsplit("/", 1)[0] if "/" in key else ""
            mapped = self._keys[key] = (origin, topic_of(key, self.topics))
        origin, topic = mapped
        if origin not in self.ledger.origins and len(self.ledger.origins) >= MAX_ORIGINS:
            self._refuse("origin", key, f"{MAX_ORIGINS} origins are accounted already")
            return None
        return origin, topic, stamp

    def _note(self, origin: str, key: str, v: Verdict, generation: int) -> None:
        if v.lost:
            count, exact = self._pending_lost.get(origin, (0, True))
            self._pending_lost[origin] = (count + v.lost, exact and v.exact)
        if v.event == "joined":
            log.info("bridge_joined", origin=origin, key=key, before=v.before)
        elif v.event == "restarted":
            log.warning("bridge_peer_restarted", origin=origin, missed=v.lost, exact=v.exact)
        elif v.event == "generation_changed":
            log.info("bridge_generation_changed", origin=origin, generation=generation)

    def _refuse(self, reason: str, key: str, error: str) -> None:
        self.ledger.refused += 1
        self.refused_by[reason] = self.refused_by.get(reason, 0) + 1
        count, _, _ = self._pending_refused.get(reason, (0, "", ""))
        self._pending_refused[reason] = (count + 1, key, error)
        self._dirty = True

    # -- the writer's loop -----------------------------------------------------------------

    def _tick(self) -> None:
        if self._closed or self._host is None:
            return
        self._flush()
        self._host.call_later(FLUSH_INTERVAL, self._tick)

    def _flush(self) -> None:
        """Log what was counted since the last flush; rewrite the status file if it changed."""
        with self._state:
            lost, self._pending_lost = self._pending_lost, {}
            refused, self._pending_refused = self._pending_refused, {}
            dirty, self._dirty = self._dirty, False
            snapshot = self.status() if dirty else None
        for origin, (count, exact) in sorted(lost.items()):
            total = snapshot["origins"][origin]["lost"] if snapshot else None
            log.warning("bridge_lost", origin=origin, count=count, total=total, exact=exact)
        for reason, (count, key, error) in sorted(refused.items()):
            log.warning("bridge_refused", reason=reason, count=count, key=key, error=error)
        if snapshot is not None:
            _write_json(self.path, snapshot)

    def totals(self) -> tuple[int, int]:
        """(records lost, samples refused) so far, every origin (any thread)."""
        with self._state:
            return self.ledger.lost, self.ledger.refused

    def status(self) -> dict[str, Any]:
        """The status file's content (call with ``_state`` held)."""
        data = self.ledger.to_dict()
        data.update(
            key=self.cfg.key,
            pid=os.getpid(),
            updated=time.time(),
            refused_by=dict(sorted(self.refused_by.items())),
        )
        return data

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            sub, self._subscriber = self._subscriber, None
            drainer, self._drainer = self._drainer, None
        with self._order:
            pass  # a sample accounted as received before this is published by now
        started = sub is not None
        close_session(self._session, [sub] if started else [])
        self._session = None
        if drainer is not None:
            # Out of recv() at once, the subscriber undeclared; bounded all the
            # same (a daemon thread never keeps the process alive).
            drainer.join(timeout=DRAIN_JOIN_TIMEOUT)
            if drainer.is_alive():
                log.warning("bridge_drain_stuck", timeout=DRAIN_JOIN_TIMEOUT)
        if not started:
            return  # never subscribed: no account to keep
        self._dirty = True
        self._flush()
        ledger = self.ledger
        log.info("bridge_received", lost=ledger.lost, refused=ledger.refused)


def _add(runs: Runs, topic: int, payloads: list[Buffer]) -> None:
    """Add payloads of ``topic`` to the runs to publish (one commit per run of one topic)."""
    if runs and runs[-1][0] == topic:
        runs[-1][1].extend(payloads)
    else:
        runs.append((topic, payloads))


def _resume(path: Path) -> Ledger:
    """The accounting a previous writer left in ``path`` (a fresh one if none)."""
    try:
        return Ledger.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return Ledger()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` whole (a reader of it never sees half a file); failures are logged."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        log.warning("bridge_status_failed", path=str(path), error=exc.strerror or str(exc))
