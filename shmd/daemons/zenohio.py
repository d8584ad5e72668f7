"""The bridge to Zenoh: the ``zenoh`` sink of a reader and the ``zenoh`` source of the writer.

The sink publishes each record on ``<prefix>/<topic name>`` (the topic id
where the bus names none) with a :class:`~shmd.daemons.bridge.Stamp` as the
sample's attachment; the source subscribes to a key expression, maps each
key's last chunk to a topic of ``segment.topics`` (or a decimal id), checks
the stamp with a :class:`~shmd.daemons.bridge.Ledger` and publishes into the
local bus.  ``eclipse-zenoh`` is an optional extra (``shmd[zenoh]``): it is
imported only here, when such a sink or source is built, in the process that
uses it, and its session is opened after any fork (there is none: both
daemons are single processes) and closed on stop, after its publishers or
subscriber are undeclared, so that its threads never keep the process alive.

The source keeps its accounting in :func:`status_path` (a JSON file beside
the segment under /dev/shm), which ``shmctl status`` shows and a restarted
writer resumes from.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import structlog

from shmd.bus.layout import REC_PAYLOAD, REC_SEQ, REC_TIMESTAMP, REC_TOPIC, TOPIC_MAX, RawRecord
from shmd.config import Config, ZenohSinkConfig, ZenohSourceConfig
from shmd.control.fields import TopicMap
from shmd.daemons.bridge import Ledger, StampCounter, StampError, Verdict, decode_stamp
from shmd.daemons.sinks import BusView, SinkError
from shmd.daemons.sources import SourceError, SourceHost

if TYPE_CHECKING:
    import zenoh

log = structlog.get_logger("shmd.daemons.zenohio")

#: What the one-line error says to do when the package is missing.
INSTALL_HINT = "install it with: pip install 'shmd[zenoh]' (the eclipse-zenoh package)"
#: How often the source logs what it counted and rewrites its status file.
FLUSH_INTERVAL = 0.5


class ZenohUnavailable(Exception):
    """The eclipse-zenoh package cannot be imported."""


def import_zenoh() -> ModuleType:
    """The ``zenoh`` module, or :class:`ZenohUnavailable` saying how to install it."""
    try:
        import zenoh  # noqa: PLC0415 - the optional extra, imported only where it is used
    except ImportError:
        raise ZenohUnavailable(
            f"Failed to use type zenoh since the Python package zenoh is not installed; "
            f"{INSTALL_HINT}"
        ) from None
    return zenoh


def zenoh_users(cfg: Config, role: str | None = None, instance: str | None = None) -> list[str]:
    """The keys of ``cfg`` naming a zenoh sink or source (for ``role``/``instance``, or all)."""
    found: list[str] = []
    if role in (None, "writer") and isinstance(cfg.writer.source, ZenohSourceConfig):
        found.append("writer.source")
    if role in (None, "reader"):
        if instance is not None:
            if isinstance(cfg.reader_settings(instance).sink, ZenohSinkConfig):
                found.append(f"reader.instances.{instance}.sink")
        else:
            if isinstance(cfg.reader.defaults.sink, ZenohSinkConfig):
                found.append("reader.defaults.sink")
            found += [
                f"reader.instances.{name}.sink"
                for name, s in cfg.reader.instances
                if isinstance(s.sink, ZenohSinkConfig)
            ]
    return found


def missing_zenoh(
    cfg: Config, role: str | None = None, instance: str | None = None
) -> tuple[str, str] | None:
    """(key, one-line error) when ``cfg`` needs zenoh here and it is not installed, else None."""
    users = zenoh_users(cfg, role, instance)
    if not users:
        return None
    try:
        import_zenoh()
    except ZenohUnavailable as exc:
        return users[0], str(exc)
    return None


def session_config(zenoh: ModuleType, cfg: ZenohSinkConfig | ZenohSourceConfig) -> Any:
    """The ``zenoh.Config`` of a sink or source: mode, endpoints, scouting."""
    conf = zenoh.Config()
    conf.insert_json5("mode", json.dumps(cfg.mode))
    conf.insert_json5("connect/endpoints", json.dumps(list(cfg.connect)))
    conf.insert_json5("listen/endpoints", json.dumps(list(cfg.listen)))
    # Off unless asked: no multicast and no gossip, so nothing is sent to
    # any address but the endpoints given.
    conf.insert_json5("scouting/multicast/enabled", json.dumps(cfg.scouting))
    conf.insert_json5("scouting/gossip/enabled", json.dumps(cfg.scouting))
    return conf


def open_session(cfg: ZenohSinkConfig | ZenohSourceConfig) -> tuple[ModuleType, zenoh.Session]:
    """Import zenoh and open a session; :class:`ZenohUnavailable` or OSError-free ZError text."""
    z = import_zenoh()
    try:
        return z, z.open(session_config(z, cfg))
    except z.ZError as exc:
        where = ", ".join((*cfg.listen, *cfg.connect)) or "scouting"
        raise ZenohUnavailable(
            f"Failed to open the Zenoh session ({cfg.mode}, {where}) since {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _close_session(session: zenoh.Session | None, undeclare: list[Any]) -> None:
    for entity in undeclare:
        try:
            entity.undeclare()
        except Exception:  # already gone with its session: nothing left to release
            pass
    if session is not None and not session.is_closed():
        closing: Any = session  # its stub leaves close() untyped
        closing.close()


# -- the sink -------------------------------------------------------------------------


def topic_key(prefix: str, topic: int, topics: TopicMap) -> str:
    """The Zenoh key of a record of ``topic``: its name, else its id, under ``prefix``."""
    name = topics.name(topic)
    return f"{prefix}/{name if name is not None else topic}"


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
        self._view: BusView | None = None
        self._publishers: dict[tuple[str, bool], zenoh.Publisher] = {}
        log.info(
            "bridge_open",
            direction="out",
            mode=cfg.mode,
            prefix=cfg.prefix,
            listen=",".join(cfg.listen),
            connect=",".join(cfg.connect),
            session=f"{self.stamps.session:016x}",
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

    def write(self, records: list[RawRecord]) -> None:
        view = self._view
        assert view is not None, "bind() before write()"
        generation, lost, topics = view.generation, view.lost, view.topics
        small = self.cfg.express_max
        try:
            for r in records:
                payload = r[REC_PAYLOAD]
                key = topic_key(self.cfg.prefix, r[REC_TOPIC], topics)
                stamp = self.stamps.next(generation, r[REC_SEQ], r[REC_TIMESTAMP], lost)
                data = payload if isinstance(payload, bytes) else bytes(payload)
                self._publisher(key, len(data) <= small).put(data, attachment=stamp)
        except self.z.ZError as exc:
            raise SinkError(
                f"Failed to publish records to Zenoh since {_first_line(exc)}"
            ) from None

    def close(self) -> None:
        pubs, self._publishers = list(self._publishers.values()), {}
        _close_session(self.session, pubs)
        log.info("bridge_closed", direction="out", sent=self.stamps.index)


# -- the source ---------------------------------------------------------------------------


def status_path(segment: str) -> Path:
    """Where the source of the bus ``segment`` keeps its accounting: beside the segment."""
    return Path("/dev/shm") / (segment.lstrip("/") + ".bridge")


def read_status(segment: str) -> dict[str, Any] | None:
    """The source's status file of ``segment`` (``shmctl status``), None if none or unreadable."""
    try:
        data = json.loads(status_path(segment).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def topic_of(key: str, topics: TopicMap) -> int | None:
    """The topic a key's last chunk names: a name of ``topics`` or a decimal id; None if neither."""
    last = key.rsplit("/", 1)[-1]
    if last in topics:
        return topics[last]
    if last.isdigit() and len(last) <= 2 and int(last) <= TOPIC_MAX:
        # An id is taken only where the bus gives it no name, so that one
        # topic never arrives under two keys.
        topic = int(last)
        return topic if topics.name(topic) is None else None
    return None


class ZenohSource:
    """``zenoh``: samples of a key expression published into the bus, with the accounting."""

    def __init__(self, cfg: ZenohSourceConfig) -> None:
        self.cfg = cfg
        self.topics = cfg.topic_names
        self.path = status_path(cfg.segment)
        self.ledger = _resume(self.path)
        self.refused_by: dict[str, int] = {}
        self._lock = threading.Lock()
        self._host: SourceHost | None = None
        self._session: zenoh.Session | None = None
        self._subscriber: Any = None
        self._pending_lost: dict[str, tuple[int, bool]] = {}
        self._pending_refused: dict[str, tuple[int, str, str]] = {}
        self._dirty = True
        self._closed = False

    def start(self, host: SourceHost) -> None:
        self._host = host
        try:
            z, self._session = open_session(self.cfg)
            self._subscriber = self._session.declare_subscriber(self.cfg.key, self._on_sample)
        except ZenohUnavailable as exc:
            raise SourceError(str(exc)) from None
        except Exception as exc:  # a ZError from declare: the session is closed again
            _close_session(self._session, [])
            raise SourceError(
                f"Failed to subscribe to {self.cfg.key!r} since {_first_line(exc)}"
            ) from None
        del z
        log.info(
            "bridge_open",
            direction="in",
            mode=self.cfg.mode,
            key=self.cfg.key,
            listen=",".join(self.cfg.listen),
            connect=",".join(self.cfg.connect),
            resumed=len(self.ledger.origins),
        )
        self._flush()
        host.call_later(FLUSH_INTERVAL, self._tick)

    # -- a sample (a Zenoh thread) -----------------------------------------------------------

    def _on_sample(self, sample: zenoh.Sample) -> None:
        try:
            self._take(sample)
        except Exception as exc:  # never into Zenoh's thread: counted, logged, dropped
            with self._lock:
                self._refuse("error", str(getattr(sample, "key_expr", "?")), _first_line(exc))

    def _take(self, sample: zenoh.Sample) -> None:
        key = str(sample.key_expr)
        attachment = sample.attachment
        with self._lock:
            if self._closed or self._host is None:
                return
            if sample.kind != sample.kind.PUT:
                self._refuse("delete", key, "a DELETE sample carries no record")
                return
            try:
                stamp = decode_stamp(attachment.to_bytes() if attachment is not None else None)
            except StampError as exc:
                self._refuse("attachment", key, str(exc))
                return
            origin = key.rsplit("/", 1)[0] if "/" in key else ""
            verdict = self.ledger.account(origin, stamp)
            self._dirty = True
            self._note(origin, key, verdict, stamp.generation)
            if not verdict.publish:
                return
            topic = topic_of(key, self.topics)
            if topic is None:
                self._refuse("key", key, "its last chunk is no topic name or unnamed id of the bus")
                return
            payload = sample.payload
            if len(payload) > self._host.max_payload:
                self._refuse(
                    "oversize",
                    key,
                    f"its {len(payload)}-byte payload is larger than a slot's "
                    f"{self._host.max_payload} bytes",
                )
                return
            self._host.publish_batch((payload.to_bytes(),), topic)

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
        with self._lock:
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

    def status(self) -> dict[str, Any]:
        """The status file's content (call with the lock held, or from the writer's loop)."""
        data = self.ledger.to_dict()
        data.update(
            key=self.cfg.key,
            pid=os.getpid(),
            updated=time.time(),
            refused_by=dict(sorted(self.refused_by.items())),
        )
        return data

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sub, self._subscriber = self._subscriber, None
        _close_session(self._session, [sub] if sub is not None else [])
        self._session = None
        self._dirty = True
        self._flush()
        ledger = self.ledger
        log.info("bridge_closed", direction="in", lost=ledger.lost, refused=ledger.refused)


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
