"""The typed configuration: one frozen dataclass per section, the schema in its fields.

A field's name is its key in the file, its type how the value is read, its
metadata (:func:`~shmd.config.schema.spec`) the bounds and checks; see
:mod:`shmd.config.schema`.  The writer's sources and the readers' sinks are
unions of dataclasses tagged by ``type:``; a new one is a dataclass here,
added to :data:`SourceConfig` or :data:`SinkConfig`, and its runtime class in
:mod:`shmd.daemons.sources` / :mod:`shmd.daemons.sinks` (their registries).
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from shmd.bus.layout import (
    MAX_CAPACITY,
    MAX_READERS,
    MAX_SLOT_SIZE,
    RECORD_HEADER_SIZE,
    topic_mask,
)
from shmd.bus.wait import WaitName, WaitStrategy
from shmd.config import checks
from shmd.config.checks import IdEntry
from shmd.config.schema import setting, spec, to_dict
from shmd.control.fields import NO_TOPICS, TopicMap
from shmd.control.frames import DEFAULT_MAX_MESSAGE

# A record header and at least one 8-byte word of payload.
MIN_SLOT_SIZE = RECORD_HEADER_SIZE + 8

PolicyName: TypeAlias = Literal["drop-oldest", "block"]
SocketType: TypeAlias = Literal["seqpacket", "stream"]
SourceFraming: TypeAlias = Literal["newline", "length"]
SinkFraming: TypeAlias = Literal["lines", "length"]
StartName: TypeAlias = Literal["latest", "oldest"]
Level: TypeAlias = Literal["debug", "info", "warning", "error"]
Target: TypeAlias = Literal["auto", "journal", "console", "json"]


def _seconds(default: float, *, positive: bool = False) -> Any:
    return setting(default, lo=0.0, hi=checks.MAX_SECONDS, lo_open=positive)


def _rate(default: float) -> Any:
    return setting(default, lo=0.0, hi=checks.MAX_RATE)


def _topic() -> Any:
    # An id 0..TOPIC_MAX or a name of segment.topics; read as the id.
    return setting(0, read=checks.read_topic)


@dataclass(frozen=True)
class SegmentConfig:
    name: str = setting("/shmd-bus", checks=(checks.segment_name,))
    capacity: int = setting(1024, lo=2, hi=MAX_CAPACITY, checks=(checks.power_of_two,))
    slot_size: int = setting(
        4096, lo=MIN_SLOT_SIZE, hi=MAX_SLOT_SIZE, checks=(checks.multiple_of_8, checks.fits_segment)
    )
    max_readers: int = setting(64, lo=1, hi=MAX_READERS)
    policy: PolicyName = "drop-oldest"
    block_timeout: float = _seconds(1.0, positive=True)
    unlink_on_exit: bool = True
    mutex_timeout: float = _seconds(0.5, positive=True)
    # Topic names to ids; fixed for the writer's lifetime (a reload refuses a change).
    topics: TopicMap = field(
        default=NO_TOPICS, metadata=spec(read=checks.read_topic_map, dump=checks.dump_topic_map)
    )

    @property
    def payload_max(self) -> int:
        """The largest record payload a slot holds."""
        return self.slot_size - RECORD_HEADER_SIZE


@dataclass(frozen=True)
class ControlConfig:
    socket: str = setting(
        "/run/shmd/control.sock", checks=(checks.absolute_path, checks.socket_path)
    )
    type: SocketType = "seqpacket"
    mode: int = setting(0o660, read=checks.read_mode, dump=checks.dump_mode)
    allowed_users: tuple[IdEntry, ...] = setting((), read=checks.read_ids)
    allowed_groups: tuple[IdEntry, ...] = setting(("shmd",), read=checks.read_ids)
    handshake_timeout: float = _seconds(2.0, positive=True)
    max_message: int = setting(DEFAULT_MAX_MESSAGE, lo=checks.MIN_MESSAGE, hi=checks.MAX_MESSAGE)
    # Resolved at load time from the two lists above; names that do not
    # resolve are left out (and reported in Config.warnings).
    allowed_uids: frozenset[int] = setting(frozenset(), in_file=False)
    allowed_gids: frozenset[int] = setting(frozenset(), in_file=False)

    def peer_allowed(self, uid: int, gids: Iterable[int]) -> bool:
        """Whether a peer with this uid and these groups may attach.

        root and the writer's own effective uid are always allowed.
        """
        if uid == 0 or uid == os.geteuid() or uid in self.allowed_uids:
            return True
        return any(g in self.allowed_gids for g in gids)

    def resolved(self, warnings: list[str] | None = None) -> ControlConfig:
        """A copy with the allowed names looked up; one warning per name that does not exist."""
        found: list[str] = [] if warnings is None else warnings
        return replace(
            self,
            allowed_uids=_resolve_ids(self.allowed_users, kind="user", warnings=found),
            allowed_gids=_resolve_ids(self.allowed_groups, kind="group", warnings=found),
        )


def _resolve_ids(
    entries: Iterable[IdEntry], *, kind: Literal["user", "group"], warnings: list[str]
) -> frozenset[int]:
    ids: set[int] = set()
    for entry in entries:
        if isinstance(entry, int):
            ids.add(entry)
            continue
        try:
            if kind == "user":
                ids.add(pwd.getpwnam(entry).pw_uid)
            else:
                ids.add(grp.getgrnam(entry).gr_gid)
        except KeyError:
            warnings.append(
                f"control.allowed_{kind}s: {kind} {entry!r} does not exist "
                f"(yet); it is ignored until a reload finds it"
            )
    return frozenset(ids)


@dataclass(frozen=True)
class TickerSourceConfig:
    rate: float = _rate(10.0)
    topic: int = _topic()
    type: Literal["ticker"] = "ticker"


@dataclass(frozen=True)
class FifoSourceConfig:
    path: str = field(metadata=spec(checks=(checks.absolute_path,)))
    framing: SourceFraming = "newline"
    topic: int = _topic()
    type: Literal["fifo"] = "fifo"


@dataclass(frozen=True)
class StdinSourceConfig:
    framing: SourceFraming = "newline"
    topic: int = _topic()
    type: Literal["stdin"] = "stdin"


@dataclass(frozen=True)
class PythonSourceConfig:
    callable: str = field(metadata=spec(checks=(checks.callable_spec,)))
    type: Literal["python"] = "python"
    # segment.topics, copied in at load time: the callable may publish by name.
    topic_names: TopicMap = field(default=NO_TOPICS, metadata=spec(in_file=False))


ZenohMode: TypeAlias = Literal["peer", "client"]


def _endpoints(read: Any) -> Any:
    return setting((), read=read)


@dataclass(frozen=True)
class ZenohSourceConfig:
    """``zenoh``: records from Zenoh samples (docs/BRIDGE.md)."""

    # The key expression to subscribe to; "" is "<segment name>/*", set at load time.
    key: str = setting("", checks=(checks.key_expression,))
    mode: ZenohMode = "peer"
    connect: tuple[str, ...] = _endpoints(checks.read_connect)
    listen: tuple[str, ...] = _endpoints(checks.read_listen)
    scouting: bool = setting(False, checks=(checks.zenoh_reachable,))
    type: Literal["zenoh"] = "zenoh"
    # segment.topics and segment.name, copied in at load time: a key's last
    # chunk names the topic; the accounting is kept under the segment's name.
    topic_names: TopicMap = field(default=NO_TOPICS, metadata=spec(in_file=False))
    segment: str = field(default="/shmd-bus", metadata=spec(in_file=False))


SourceConfig: TypeAlias = (
    TickerSourceConfig
    | FifoSourceConfig
    | StdinSourceConfig
    | PythonSourceConfig
    | ZenohSourceConfig
)


@dataclass(frozen=True)
class WriterConfig:
    source: SourceConfig = field(default_factory=TickerSourceConfig)
    shutdown_grace: float = _seconds(5.0)
    status_interval: float = _seconds(1.0, positive=True)
    reconnect_grace: float = _seconds(10.0)
    # The longest a durable reader's entry is kept after its process went
    # (a reader's durable_grace, or a client's durable=, is capped to it).
    max_durable_grace: float = _seconds(600.0)


@dataclass(frozen=True)
class JournalSinkConfig:
    summary_rate: float = _rate(1.0)
    type: Literal["journal"] = "journal"
    # segment.topics, copied in at load time: the summaries name their topic.
    topic_names: TopicMap = field(default=NO_TOPICS, metadata=spec(in_file=False))


@dataclass(frozen=True)
class FileSinkConfig:
    path: str = field(metadata=spec(checks=(checks.absolute_path,)))
    framing: SinkFraming = "lines"
    type: Literal["file"] = "file"


@dataclass(frozen=True)
class StdoutSinkConfig:
    framing: SinkFraming = "lines"
    type: Literal["stdout"] = "stdout"


@dataclass(frozen=True)
class ExecSinkConfig:
    command: tuple[str, ...] = field(metadata=spec(read=checks.read_argv))
    type: Literal["exec"] = "exec"


@dataclass(frozen=True)
class PythonSinkConfig:
    callable: str = field(metadata=spec(checks=(checks.callable_spec,)))
    type: Literal["python"] = "python"


@dataclass(frozen=True)
class ZenohSinkConfig:
    """``zenoh``: each record as a Zenoh sample on ``<prefix>/<topic>`` (docs/BRIDGE.md)."""

    # "" is the segment's name without its slash, set at load time.
    prefix: str = setting("", checks=(checks.key_prefix,))
    # Records of at most this many bytes go express (not batched); 0: none.
    express_max: int = setting(1024, lo=0, hi=MAX_SLOT_SIZE)
    # One sample per run of records of one topic taken at once (docs/BRIDGE.md).
    pack: bool = False
    mode: ZenohMode = "peer"
    connect: tuple[str, ...] = _endpoints(checks.read_connect)
    listen: tuple[str, ...] = _endpoints(checks.read_listen)
    scouting: bool = setting(False, checks=(checks.zenoh_reachable,))
    type: Literal["zenoh"] = "zenoh"
    # segment.policy, copied in at load time: block -> BLOCK, drop-oldest -> DROP.
    policy: PolicyName = field(default="drop-oldest", metadata=spec(in_file=False))


SinkConfig: TypeAlias = (
    JournalSinkConfig
    | FileSinkConfig
    | StdoutSinkConfig
    | ExecSinkConfig
    | PythonSinkConfig
    | ZenohSinkConfig
)


@dataclass(frozen=True)
class ReaderSettings:
    # "all", or the subscribed topic ids, sorted and unique.
    topics: Literal["all"] | tuple[int, ...] = setting("all", read=checks.read_topics)
    start: StartName = "latest"
    sink: SinkConfig = field(default_factory=JournalSinkConfig, metadata=spec(sorted_keys=True))
    stats_interval: float = _seconds(10.0, positive=True)
    reconnect_timeout: float = _seconds(10.0)
    # Durable: the writer keeps this reader's entry and cursor this many
    # seconds after its process went, for the next one to resume (0: not durable).
    durable_grace: float = _seconds(0.0)
    wait: WaitName = "sleep"
    # backoff only: seconds of spinning, then of yielding, before sleeping.
    backoff_spin: float = setting(50e-6, lo=0.0, hi=1.0)
    backoff_yield: float = setting(1e-3, lo=0.0, hi=1.0)

    @property
    def wait_strategy(self) -> WaitStrategy:
        """The wait strategy these settings name (shmd.bus.wait)."""
        return WaitStrategy.named(self.wait, spin=self.backoff_spin, yield_=self.backoff_yield)

    @property
    def topic_mask(self) -> int:
        """The u64 topic mask of the control protocol: bit t = topic t."""
        return topic_mask(self.topics)


@dataclass(frozen=True)
class ReaderConfig:
    defaults: ReaderSettings = field(default_factory=ReaderSettings)
    # (instance name, its settings with the defaults already merged in),
    # sorted by name; a tuple keeps the whole Config immutable and hashable.
    instances: tuple[tuple[str, ReaderSettings], ...] = setting(
        (), dump=lambda pairs: {name: to_dict(s) for name, s in pairs}
    )


@dataclass(frozen=True)
class LoggingConfig:
    level: Level = "info"
    target: Target = "auto"


@dataclass(frozen=True)
class Config:
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    control: ControlConfig = field(default_factory=lambda: ControlConfig().resolved())
    writer: WriterConfig = field(default_factory=WriterConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # The file these settings came from; None for the built-in defaults.
    source_path: str | None = field(default=None, compare=False, metadata=spec(in_file=False))
    # Non-fatal findings (e.g. a group name that does not exist yet), one
    # sentence each; the daemons log each as a config_warning event.
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata=spec(in_file=False))

    def topic_name(self, topic: int) -> str | None:
        """The name ``segment.topics`` gives topic id ``topic``, or None."""
        return self.segment.topics.name(topic)

    def reader_settings(self, instance: str) -> ReaderSettings:
        """The effective settings of reader ``instance`` (defaults if not listed)."""
        for name, settings in self.reader.instances:
            if name == instance:
                return settings
        return self.reader.defaults


def default_config() -> Config:
    """The built-in defaults (what an empty file gives)."""
    warnings: list[str] = []
    return Config(control=ControlConfig().resolved(warnings), warnings=tuple(warnings))
