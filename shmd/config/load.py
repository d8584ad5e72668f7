"""Loading: which file, reading it, and the sections the schema alone cannot build.

Reader instances are merged over ``reader.defaults`` here, and the allowed
user and group names resolved; every other section is
:func:`shmd.config.schema.parse` of its dataclass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace

from shmd.config.errors import ConfigError
from shmd.config.model import (
    Config,
    ControlConfig,
    JournalSinkConfig,
    LoggingConfig,
    PythonSourceConfig,
    ReaderConfig,
    ReaderSettings,
    SegmentConfig,
    WriterConfig,
    ZenohSinkConfig,
    ZenohSourceConfig,
    default_config,
)
from shmd.config.nodes import Builder, Node, describe, parse_yaml
from shmd.config.schema import Map, field_of, file_fields, parse, union_tag
from shmd.control.fields import INSTANCE_PATTERN
from shmd.control.frames import FRAME_HEADER_SIZE
from shmd.control.protocol import WELCOME_FIXED_SIZE

DEFAULT_PATH = "/etc/shmd/shmd.yaml"
ENV_VAR = "SHMD_CONFIG"

# The reader instance names the control protocol accepts (shm-reader@NAME).
_INSTANCE_RE = re.compile(INSTANCE_PATTERN)


def _keys(cls: type) -> list[str]:
    return [f.name for f in file_fields(cls)]


def _sink_type(b: Builder, node: Node | None) -> str:
    assert node is not None
    f, tp = field_of(ReaderSettings, "sink")
    return union_tag(b, f, tp, node, node.key)


def _merge_settings(b: Builder, defaults: Node | None, override: Node) -> Node:
    """Deep-merge one instance's overrides over reader.defaults.

    Every key replaces the default's value, except ``sink``: a sink of the same
    type (or without ``type``) is merged key by key, a sink of another type
    replaces the default's whole (its keys would not fit the other type).
    """
    base = Map(b, defaults, "reader.defaults", _keys(ReaderSettings)).items
    over = Map(b, override, override.key, _keys(ReaderSettings)).items
    merged = dict(base)
    for name, n in over.items():
        old = base.get(name)
        if (
            name == "sink"
            and old is not None
            and isinstance(old.value, dict)
            and isinstance(n.value, dict)
            and ("type" not in n.value or _sink_type(b, old) == _sink_type(b, n))
        ):
            merged[name] = Node({**old.value, **n.value}, n.key, n.line)
        else:
            merged[name] = n
    return Node(merged, override.key, override.line)


def _reader(b: Builder, node: Node | None) -> ReaderConfig:
    m = Map(b, node, "reader", _keys(ReaderConfig))
    defaults_node = m.node("defaults")
    defaults = parse(b, ReaderSettings, defaults_node, "reader.defaults")
    instances_node = m.node("instances")
    pairs: list[tuple[str, ReaderSettings]] = []
    if instances_node is not None and instances_node.value is not None:
        if not isinstance(instances_node.value, dict):
            b.fail(
                f"must be a mapping of instance name to settings (got {describe(instances_node)})",
                instances_node.line,
                instances_node.key,
            )
        for name, given in instances_node.value.items():
            if not _INSTANCE_RE.fullmatch(name):
                b.fail(
                    f"instance name {name!r} must be 1-31 characters of A-Z a-z 0-9 _ . : @ -",
                    given.line,
                    given.key,
                )
            override = Node({}, given.key, given.line) if given.value is None else given
            merged = _merge_settings(b, defaults_node, override)
            pairs.append((name, parse(b, ReaderSettings, merged, given.key)))
    return ReaderConfig(defaults=defaults, instances=tuple(sorted(pairs)))


def _named(settings: ReaderSettings, segment: SegmentConfig) -> ReaderSettings:
    """The settings with a journal sink given the topic names its summaries show.

    A zenoh sink gets the bus's policy and, without a prefix, the segment's name.
    """
    sink = settings.sink
    if isinstance(sink, ZenohSinkConfig):
        prefix = sink.prefix or segment.name.lstrip("/")
        return replace(settings, sink=replace(sink, prefix=prefix, policy=segment.policy))
    if not isinstance(sink, JournalSinkConfig) or not segment.topics:
        return settings
    return replace(settings, sink=replace(sink, topic_names=segment.topics))


def _with_names(readers: ReaderConfig, segment: SegmentConfig) -> ReaderConfig:
    return ReaderConfig(
        defaults=_named(readers.defaults, segment),
        instances=tuple((name, _named(s, segment)) for name, s in readers.instances),
    )


def _writer_named(writer: WriterConfig, segment: SegmentConfig) -> WriterConfig:
    """The settings with a python or zenoh source given the topic names it may publish by.

    A zenoh source also gets the segment's name, and without a key ``<name>/*``.
    """
    source = writer.source
    topics = segment.topics
    if isinstance(source, ZenohSourceConfig):
        key = source.key or segment.name.lstrip("/") + "/*"
        chosen = replace(source, key=key, topic_names=topics, segment=segment.name)
        return replace(writer, source=chosen)
    if not isinstance(source, PythonSourceConfig) or not topics:
        return writer
    return replace(writer, source=replace(source, topic_names=topics))


def _check_welcome_fits(b: Builder, segment_node: Node | None, cfg: Config) -> None:
    """The Welcome carries segment.topics: it must fit in one control.max_message frame."""
    topics = cfg.segment.topics
    size = FRAME_HEADER_SIZE + WELCOME_FIXED_SIZE + sum(3 + len(n) for n in topics)
    if size <= cfg.control.max_message:
        return
    assert segment_node is not None and isinstance(segment_node.value, dict)
    at = segment_node.value["topics"]
    b.fail(
        f"the Welcome carrying these {len(topics)} names is {size} bytes, more than "
        f"control.max_message {cfg.control.max_message}; raise control.max_message "
        "or use shorter names",
        at.line,
        at.key,
    )


def _build(tree: Node, path: str) -> Config:
    b = Builder(None, path)
    m = Map(b, tree, "", _keys(Config))
    warnings: list[str] = []
    # The segment first: its topic names are what the later sections' topics may use.
    segment = parse(b, SegmentConfig, m.node("segment"), "segment")
    cfg = Config(
        segment=segment,
        control=parse(b, ControlConfig, m.node("control"), "control").resolved(warnings),
        writer=_writer_named(parse(b, WriterConfig, m.node("writer"), "writer"), segment),
        reader=_with_names(_reader(b, m.node("reader")), segment),
        logging=parse(b, LoggingConfig, m.node("logging"), "logging"),
        source_path=path,
        warnings=tuple(warnings),
    )
    _check_welcome_fits(b, m.node("segment"), cfg)
    return cfg


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        if isinstance(exc, PermissionError):
            why = f"uid {os.geteuid()} may not read it (permission denied)"
        elif isinstance(exc, IsADirectoryError):
            why = "it is a directory"
        elif isinstance(exc, FileNotFoundError):
            why = "the file does not exist"
        else:
            why = str(exc.strerror or exc)
        raise ConfigError(f"Failed to read the configuration since {why}", path=path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            "Failed to read the configuration since it is not valid UTF-8", path=path, line=line
        ) from None


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Load and validate the configuration.

    ``path`` (``--config``) wins, then ``$SHMD_CONFIG``, then
    :data:`DEFAULT_PATH`; only the default path may be missing, which gives
    :func:`default_config`.  Raises :class:`ConfigError` for every problem.
    """
    environ = os.environ if env is None else env
    explicit = os.fspath(path) if path is not None else (environ.get(ENV_VAR) or None)
    chosen = explicit if explicit is not None else DEFAULT_PATH
    if explicit is None and not os.path.lexists(chosen):
        return default_config()
    text = _read(chosen)
    return _build(parse_yaml(text, chosen), chosen)
