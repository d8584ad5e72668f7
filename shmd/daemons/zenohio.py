"""What the zenoh sink and source share: the optional package, sessions, keys, the status file.

``eclipse-zenoh`` is an optional extra (``shmd[zenoh]``), imported only
here, when a zenoh sink (:mod:`shmd.daemons.zenoh_sink`, in a reader) or
source (:mod:`shmd.daemons.zenoh_source`, in the writer) is built: in the
process that uses it, which never forks.  A session is closed on stop after
its publishers or subscriber are undeclared, so that Zenoh's threads never
keep the process alive.  docs/BRIDGE.md is the operator's side of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from shmd.bus.layout import TOPIC_MAX
from shmd.config import Config, ZenohSinkConfig, ZenohSourceConfig
from shmd.control.fields import TopicMap

if TYPE_CHECKING:
    import zenoh

#: What the one-line error says to do when the package is missing.
INSTALL_HINT = "install it with: pip install 'shmd[zenoh]' (the eclipse-zenoh package)"


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
    # Zenoh's shared-memory transport is for peers on one host, which the bus
    # is already: off, so the bridge leaves nothing under /dev/shm (which a
    # reader's sandbox does not even show).
    conf.insert_json5("transport/shared_memory/enabled", "false")
    return conf


def open_session(cfg: ZenohSinkConfig | ZenohSourceConfig) -> tuple[ModuleType, zenoh.Session]:
    """Import zenoh and open a session; :class:`ZenohUnavailable` or OSError-free ZError text."""
    z = import_zenoh()
    try:
        return z, z.open(session_config(z, cfg))
    except z.ZError as exc:
        where = ", ".join((*cfg.listen, *cfg.connect)) or "scouting"
        raise ZenohUnavailable(
            f"Failed to open the Zenoh session ({cfg.mode}, {where}) since {first_line(exc)}"
        ) from None


#: Where in Zenoh's Rust sources an error was made (" at /…/src/tcp.rs:61."): not for users.
_RUST_LOCATION = re.compile(r"\s+at \S+\.rs:\d+\.?")


def first_line(exc: BaseException) -> str:
    """An exception's message on one line, without Zenoh's source locations."""
    text = _RUST_LOCATION.sub("", str(exc)).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def close_session(session: zenoh.Session | None, undeclare: list[Any]) -> None:
    for entity in undeclare:
        try:
            entity.undeclare()
        except Exception:  # already gone with its session: nothing left to release
            pass
    if session is not None and not session.is_closed():
        closing: Any = session  # its stub leaves close() untyped
        closing.close()


def topic_key(prefix: str, topic: int, topics: TopicMap) -> str:
    """The Zenoh key of a record of ``topic``: its name, else its id, under ``prefix``."""
    name = topics.name(topic)
    return f"{prefix}/{name if name is not None else topic}"


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
