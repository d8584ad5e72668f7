"""shmd's configuration: one YAML file, validated into frozen dataclasses.

The file is optional: an empty file, a missing section or a missing key gives
the built-in default.  Where the file comes from, in order: the ``path``
argument (``--config``), the ``SHMD_CONFIG`` environment variable, then
:data:`DEFAULT_PATH`.  Only the default path may be missing (then the built-in
defaults apply); a file named explicitly must exist.

Every mistake in the file is a :class:`ConfigError` naming the file, the
1-based line of the offending key and its dotted key path, e.g.::

    /etc/shmd/shmd.yaml:12: segment.slot_size: must be a multiple of 8 (got 1001)

The daemons turn it into one log line and exit status :data:`EXIT_CONFIG`
(78, ``EX_CONFIG``) through :func:`shmd.daemons.process.load_config_or_exit`
/ :func:`~shmd.daemons.process.exit_on_config_error`: this module never
logs or exits, and a user mistake never shows a traceback.

docs/CONFIGURATION.md lists every key, its type, default and whether a reload
(SIGHUP) applies it live; :func:`diff_reloadable` is that table in code.
"""

from __future__ import annotations

import difflib
import grp
import math
import os
import pwd
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeAlias, cast

import yaml

from shmd.errors import ShmdError

__all__ = [
    "DEFAULT_PATH",
    "ENV_VAR",
    "EXIT_CONFIG",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ExecSink",
    "FifoSource",
    "FileSink",
    "JournalSink",
    "LoggingConfig",
    "PythonSink",
    "PythonSource",
    "ReaderConfig",
    "ReaderSettings",
    "SegmentConfig",
    "Sink",
    "Source",
    "StdinSource",
    "StdoutSink",
    "TickerSource",
    "WriterConfig",
    "config_to_dict",
    "default_config",
    "diff_reloadable",
    "load_config",
]

DEFAULT_PATH = "/etc/shmd/shmd.yaml"
ENV_VAR = "SHMD_CONFIG"
# sysexits.h EX_CONFIG: systemd shows it as "status=78/CONFIG".
EXIT_CONFIG = 78

RECORD_HEADER_SIZE = 32
MAX_TOPIC = 63
ALL_TOPICS_MASK = (1 << (MAX_TOPIC + 1)) - 1
MIN_SLOT_SIZE = RECORD_HEADER_SIZE + 8
MAX_SLOT_SIZE = 1 << 30
MAX_CAPACITY = 1 << 24
MAX_SEGMENT_BYTES = 16 << 30
MAX_READERS = 1024
# POSIX shm names: NAME_MAX (255) bytes including the leading slash.
MAX_SEGMENT_NAME = 255
# sizeof(sockaddr_un.sun_path) is 108 and the path needs its terminating NUL.
SUN_PATH_MAX = 108
MIN_MESSAGE = 1024
MAX_MESSAGE = 64 << 20
# No timeout or interval beyond a day: a larger number is almost certainly
# milliseconds typed as seconds, and it keeps poll()'s millisecond int small.
MAX_SECONDS = 86400.0
MAX_RATE = 1_000_000.0
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel
# The reader instance names the control protocol accepts (shm-reader@NAME).
INSTANCE_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,31}")
CALLABLE_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
)

Policy: TypeAlias = Literal["drop-oldest", "block"]
SocketType: TypeAlias = Literal["seqpacket", "stream"]
SourceFraming: TypeAlias = Literal["newline", "length"]
SinkFraming: TypeAlias = Literal["lines", "length"]
Start: TypeAlias = Literal["latest", "oldest"]
Level: TypeAlias = Literal["debug", "info", "warning", "error"]
Target: TypeAlias = Literal["auto", "journal", "console", "json"]
IdEntry: TypeAlias = str | int


class ConfigError(ShmdError):
    """A configuration mistake, located as precisely as the YAML allows.

    ``path`` is the file (None for built-in defaults), ``line`` the 1-based
    line of the offending key (None when unknown), ``key`` its dotted path
    (None for file-level problems) and ``message`` the bare reason.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path or "<configuration>"
        if self.line is not None:
            where += f":{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


# --------------------------------------------------------------------------
# The typed configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentConfig:
    name: str = "/shmd-bus"
    capacity: int = 1024
    slot_size: int = 4096
    max_readers: int = 64
    policy: Policy = "drop-oldest"
    block_timeout: float = 1.0
    unlink_on_exit: bool = True
    mutex_timeout: float = 0.5

    @property
    def payload_max(self) -> int:
        """The largest record payload a slot holds."""
        return self.slot_size - RECORD_HEADER_SIZE


@dataclass(frozen=True)
class ControlConfig:
    socket: str = "/run/shmd/control.sock"
    type: SocketType = "seqpacket"
    mode: int = 0o660
    allowed_users: tuple[IdEntry, ...] = ()
    allowed_groups: tuple[IdEntry, ...] = ("shmd",)
    handshake_timeout: float = 2.0
    max_message: int = 65536
    # Resolved at load time from the two lists above; names that do not
    # resolve are left out (and reported in Config.warnings).
    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()

    def peer_allowed(self, uid: int, gids: Iterable[int]) -> bool:
        """Whether a peer with this uid and these groups may attach.

        root and the writer's own effective uid are always allowed.
        """
        if uid == 0 or uid == os.geteuid() or uid in self.allowed_uids:
            return True
        return any(g in self.allowed_gids for g in gids)


@dataclass(frozen=True)
class TickerSource:
    rate: float = 10.0
    topic: int = 0
    type: Literal["ticker"] = "ticker"


@dataclass(frozen=True)
class FifoSource:
    path: str
    framing: SourceFraming = "newline"
    topic: int = 0
    type: Literal["fifo"] = "fifo"


@dataclass(frozen=True)
class StdinSource:
    framing: SourceFraming = "newline"
    topic: int = 0
    type: Literal["stdin"] = "stdin"


@dataclass(frozen=True)
class PythonSource:
    callable: str
    type: Literal["python"] = "python"


Source: TypeAlias = TickerSource | FifoSource | StdinSource | PythonSource


@dataclass(frozen=True)
class WriterConfig:
    source: Source = field(default_factory=TickerSource)
    shutdown_grace: float = 5.0
    status_interval: float = 1.0
    reconnect_grace: float = 10.0


@dataclass(frozen=True)
class JournalSink:
    summary_rate: float = 1.0
    type: Literal["journal"] = "journal"


@dataclass(frozen=True)
class FileSink:
    path: str
    framing: SinkFraming = "lines"
    type: Literal["file"] = "file"


@dataclass(frozen=True)
class StdoutSink:
    framing: SinkFraming = "lines"
    type: Literal["stdout"] = "stdout"


@dataclass(frozen=True)
class ExecSink:
    command: tuple[str, ...]
    type: Literal["exec"] = "exec"


@dataclass(frozen=True)
class PythonSink:
    callable: str
    type: Literal["python"] = "python"


Sink: TypeAlias = JournalSink | FileSink | StdoutSink | ExecSink | PythonSink


@dataclass(frozen=True)
class ReaderSettings:
    # "all", or the subscribed topic ids, sorted and unique.
    topics: Literal["all"] | tuple[int, ...] = "all"
    start: Start = "latest"
    sink: Sink = field(default_factory=JournalSink)
    stats_interval: float = 10.0
    reconnect_timeout: float = 10.0

    @property
    def topic_mask(self) -> int:
        """The u64 topic mask of the control protocol: bit t = topic t."""
        if self.topics == "all":
            return ALL_TOPICS_MASK
        mask = 0
        for t in self.topics:
            mask |= 1 << t
        return mask


@dataclass(frozen=True)
class ReaderConfig:
    defaults: ReaderSettings = field(default_factory=ReaderSettings)
    # (instance name, its settings with the defaults already merged in),
    # sorted by name; a tuple keeps the whole Config immutable and hashable.
    instances: tuple[tuple[str, ReaderSettings], ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    level: Level = "info"
    target: Target = "auto"


@dataclass(frozen=True)
class Config:
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    control: ControlConfig = field(default_factory=lambda: _resolved_control(ControlConfig()))
    writer: WriterConfig = field(default_factory=WriterConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # The file these settings came from; None for the built-in defaults.
    source_path: str | None = field(default=None, compare=False)
    # Non-fatal findings (e.g. a group name that does not exist yet), one
    # sentence each; the daemons log each as a config_warning event.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def reader_settings(self, instance: str) -> ReaderSettings:
        """The effective settings of reader ``instance`` (defaults if not listed)."""
        for name, settings in self.reader.instances:
            if name == instance:
                return settings
        return self.reader.defaults


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


def _resolved_control(control: ControlConfig, warnings: list[str] | None = None) -> ControlConfig:
    sink: list[str] = [] if warnings is None else warnings
    uids = _resolve_ids(control.allowed_users, kind="user", warnings=sink)
    gids = _resolve_ids(control.allowed_groups, kind="group", warnings=sink)
    return ControlConfig(
        socket=control.socket,
        type=control.type,
        mode=control.mode,
        allowed_users=control.allowed_users,
        allowed_groups=control.allowed_groups,
        handshake_timeout=control.handshake_timeout,
        max_message=control.max_message,
        allowed_uids=uids,
        allowed_gids=gids,
    )


def default_config() -> Config:
    """The built-in defaults (what an empty file gives)."""
    warnings: list[str] = []
    control = _resolved_control(ControlConfig(), warnings)
    return Config(control=control, warnings=tuple(warnings))


# --------------------------------------------------------------------------
# Reading YAML with line numbers
# --------------------------------------------------------------------------


@dataclass
class _Node:
    """A YAML value with the dotted key path and 1-based line it came from."""

    value: Any  # dict[str, _Node] | list[_Node] | a constructed scalar
    key: str
    line: int


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


def _describe(value: Any) -> str:
    """How a wrong value reads in an error message: 'boolean true', 'a list'..."""
    if isinstance(value, _Node):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    shapes: tuple[tuple[type, str], ...] = ((dict, "a mapping"), (list, "a list"))
    for shape, text in shapes:
        if isinstance(value, shape):
            return text
    scalars: tuple[tuple[type, str], ...] = ((str, "string"), (int, "integer"), (float, "number"))
    for scalar, text in scalars:
        if isinstance(value, scalar):
            return f"{text} {value!r}"
    return f"{type(value).__name__} {value!r}"


class _Builder:
    """Builds the _Node tree (needs the loader) and raises located errors."""

    def __init__(self, loader: yaml.SafeLoader | None, path: str) -> None:
        self.loader = loader
        self.path = path
        # ids of the YAML nodes already turned into _Nodes: an alias hands
        # the composer's node for its anchor out again (see tree()).
        self._seen: set[int] = set()

    def construct(self, node: yaml.Node) -> Any:
        assert self.loader is not None  # only tree() calls this, with a loader
        return self.loader.construct_object(node, deep=True)

    def fail(self, message: str, line: int | None, key: str | None) -> NoReturn:
        raise ConfigError(message, path=self.path, line=line, key=key)

    def tree(self, node: yaml.Node, key: str, line: int) -> _Node:
        # The composer shares an anchored node with every alias of it, so
        # nine levels of nine aliases compose in microseconds and would
        # expand here into 9**9 nodes (a "billion laughs").  No setting
        # needs an alias: refuse the first one.
        if id(node) in self._seen:
            self.fail(
                "YAML anchors and aliases (& and *) are not supported; write the value out",
                line,
                key or None,
            )
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                self.fail(f"unsupported YAML tag {node.tag}", line, key or None)
            items: dict[str, _Node] = {}
            for knode, vnode in node.value:
                kline = knode.start_mark.line + 1
                if knode.tag == _MERGE_TAG:
                    self.fail(
                        "YAML merge keys (<<) are not supported; shared reader "
                        "settings belong in reader.defaults",
                        kline,
                        key or None,
                    )
                if not isinstance(knode, yaml.ScalarNode):
                    self.fail("a key must be a plain string", kline, key or None)
                raw = self.construct(knode)
                if isinstance(raw, bool) or not isinstance(raw, str | int):
                    self.fail(
                        f"a key must be a plain string (got {_describe(raw)})", kline, key or None
                    )
                name = str(raw)
                child = f"{key}.{name}" if key else name
                if name in items:
                    self.fail(
                        f"duplicate key (first given on line {items[name].line})", kline, child
                    )
                items[name] = self.tree(vnode, child, kline)
            return _Node(items, key, line)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self.fail(f"unsupported YAML tag {node.tag}", line, key or None)
            return _Node(
                [
                    self.tree(item, f"{key}[{i}]", item.start_mark.line + 1)
                    for i, item in enumerate(node.value)
                ],
                key,
                line,
            )
        return _Node(self.construct(node), key, line)


def _parse_yaml(text: str, path: str) -> _Node:
    loader: yaml.SafeLoader | None = None
    try:
        # The constructor already scans the text for characters YAML forbids.
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
        if root is None:
            return _Node({}, "", 1)
        tree = _Builder(loader, path).tree(root, "", root.start_mark.line + 1)
    except RecursionError:
        # PyYAML's composer and tree() recurse once per nesting level.
        raise ConfigError(
            "Failed to parse YAML since it is nested deeper than Python's "
            "recursion limit (a configuration needs a few levels)",
            path=path,
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text[: max(0, exc.position)].count("\n") + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            f"Failed to parse YAML since it contains the character "
            f"U+{char:04X}, which YAML does not allow",
            path=path,
            line=line,
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            f"Failed to parse YAML since {problem}",
            path=path,
            line=None if mark is None else mark.line + 1,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Failed to parse YAML since {exc}", path=path) from None
    finally:
        if loader is not None:
            loader.dispose()
    if tree.value is None:
        return _Node({}, "", tree.line)
    if not isinstance(tree.value, dict):
        raise ConfigError(
            f"the file must be a mapping of sections (got {_describe(tree)})",
            path=path,
            line=tree.line,
        )
    return tree


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class _Map:
    """One mapping of the file, read key by key with type checks."""

    def __init__(
        self,
        b: _Builder,
        node: _Node | None,
        key: str,
        allowed: Iterable[str],
        *,
        context: str = "",
    ) -> None:
        self.b = b
        self.key = key
        self.line = node.line if node is not None else None
        items: dict[str, _Node]
        if node is None or node.value is None:
            items = {}
        elif isinstance(node.value, dict):
            items = node.value
        else:
            b.fail(f"must be a mapping (got {_describe(node)})", node.line, key)
        allowed = list(allowed)
        for name, child in items.items():
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else ""
                b.fail(
                    f"unknown key{context} (known keys: {', '.join(allowed)}){also}",
                    child.line,
                    child.key,
                )
        self.items = items

    def node(self, name: str) -> _Node | None:
        return self.items.get(name)

    def has(self, name: str) -> bool:
        return name in self.items

    def _bad(self, n: _Node, message: str) -> NoReturn:
        self.b.fail(message, n.line, n.key)

    def int_(self, name: str, default: int, lo: int, hi: int) -> int:
        n = self.items.get(name)
        if n is None:
            return default
        v = n.value
        if isinstance(v, bool) or not isinstance(v, int):
            self._bad(n, f"must be an integer (got {_describe(v)})")
        if not lo <= v <= hi:
            self._bad(n, f"must be between {lo} and {hi} (got {v})")
        return v

    def float_(
        self,
        name: str,
        default: float,
        *,
        lo: float,
        hi: float = MAX_SECONDS,
        lo_open: bool = False,
    ) -> float:
        n = self.items.get(name)
        if n is None:
            return default
        v = n.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            self._bad(n, f"must be a number (got {_describe(v)})")
        f = float(v)
        if not math.isfinite(f):
            self._bad(n, f"must be a finite number (got {v})")
        if lo_open and f <= lo:
            self._bad(n, f"must be greater than {lo:g} (got {v})")
        if f < lo or f > hi:
            self._bad(n, f"must be between {lo:g} and {hi:g} (got {v})")
        return f

    def bool_(self, name: str, default: bool) -> bool:
        n = self.items.get(name)
        if n is None:
            return default
        if not isinstance(n.value, bool):
            self._bad(n, f"must be true or false (got {_describe(n)})")
        return n.value

    def str_(self, name: str, default: str | None) -> str:
        n = self.items.get(name)
        if n is None:
            if default is None:
                self.b.fail(f"{name} is required here", self.line, self.key or None)
            return default
        if not isinstance(n.value, str):
            self._bad(n, f"must be a string (got {_describe(n)})")
        if not n.value or "\0" in n.value:
            self._bad(n, f"must be a non-empty string without NUL bytes (got {n.value!r})")
        return n.value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        n = self.items.get(name)
        if n is None:
            return default
        if not isinstance(n.value, str) or n.value not in choices:
            self._bad(n, f"must be one of {' | '.join(choices)} (got {_describe(n)})")
        return n.value

    def abs_path(self, name: str, default: str | None) -> str:
        value = self.str_(name, default)
        if not value.startswith("/"):
            n = self.items[name]
            self._bad(n, f"must be an absolute path (got {value!r})")
        return value

    def callable_(self, name: str) -> str:
        value = self.str_(name, None)
        if not CALLABLE_RE.fullmatch(value):
            self._bad(self.items[name], f"must look like 'package.module:function' (got {value!r})")
        return value


def _segment(b: _Builder, node: _Node | None) -> SegmentConfig:
    d = SegmentConfig()
    m = _Map(
        b,
        node,
        "segment",
        [
            "name",
            "capacity",
            "slot_size",
            "max_readers",
            "policy",
            "block_timeout",
            "unlink_on_exit",
            "mutex_timeout",
        ],
    )
    name = m.str_("name", d.name)
    if m.has("name"):
        n = m.items["name"]
        if not name.startswith("/") or "/" in name[1:] or len(name) < 2:
            m._bad(n, f"must be one slash followed by a name without slashes (got {name!r})")
        if len(name.encode()) > MAX_SEGMENT_NAME:
            m._bad(n, f"must be at most {MAX_SEGMENT_NAME} bytes long (got {len(name.encode())})")
    capacity = m.int_("capacity", d.capacity, 2, MAX_CAPACITY)
    if capacity & (capacity - 1):
        m._bad(m.items["capacity"], f"must be a power of two (got {capacity})")
    slot_size = m.int_("slot_size", d.slot_size, MIN_SLOT_SIZE, MAX_SLOT_SIZE)
    if slot_size % 8:
        m._bad(m.items["slot_size"], f"must be a multiple of 8 (got {slot_size})")
    if capacity * slot_size > MAX_SEGMENT_BYTES:
        culprit = m.node("slot_size") or m.node("capacity")
        assert culprit is not None  # the defaults alone stay far below the limit
        m._bad(
            culprit,
            f"capacity * slot_size must be at most 16 GiB "
            f"(got {capacity} * {slot_size} = {capacity * slot_size} bytes)",
        )
    return SegmentConfig(
        name=name,
        capacity=capacity,
        slot_size=slot_size,
        max_readers=m.int_("max_readers", d.max_readers, 1, MAX_READERS),
        policy=cast(Policy, m.choice("policy", d.policy, ("drop-oldest", "block"))),
        block_timeout=m.float_("block_timeout", d.block_timeout, lo=0.0, lo_open=True),
        unlink_on_exit=m.bool_("unlink_on_exit", d.unlink_on_exit),
        mutex_timeout=m.float_("mutex_timeout", d.mutex_timeout, lo=0.0, lo_open=True),
    )


_OCTAL_RE = re.compile(r"0o?([0-7]{1,4})")


def _mode(m: _Map, default: int) -> int:
    n = m.node("mode")
    if n is None:
        return default
    v = n.value
    octal = _OCTAL_RE.fullmatch(v.strip()) if isinstance(v, str) else None
    if octal is not None:
        mode = int(octal.group(1), 8)
    elif isinstance(v, int) and not isinstance(v, bool):
        mode = v
    else:
        m._bad(n, f'must be an octal permission mode like 0o660 or "0660" (got {_describe(v)})')
    if not 0 <= mode <= 0o777:
        # YAML reads 660 (no leading zero) as decimal 660 = 0o1224.
        m._bad(
            n,
            f"must be a permission mode between 0 and 0o777; write it in octal "
            f'like 0o660 or "0660" (got {v!r} = {oct(mode) if mode >= 0 else mode})',
        )
    return mode


def _id_list(m: _Map, name: str, default: tuple[IdEntry, ...]) -> tuple[IdEntry, ...]:
    n = m.node(name)
    if n is None or n.value is None:
        return default if n is None else ()
    if not isinstance(n.value, list):
        m._bad(n, f"must be a list of names or numeric ids (got {_describe(n)})")
    out: list[IdEntry] = []
    for item in n.value:
        v = item.value
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, str | int):
            m._bad(item, f"must be a name or a numeric id (got {_describe(v)})")
        if isinstance(v, int) and not 0 <= v <= MAX_ID:
            m._bad(item, f"must be between 0 and {MAX_ID} (got {v})")
        if isinstance(v, str) and (not v or any(c in v for c in ":\n\0 ")):
            m._bad(item, f"is not a valid user or group name (got {v!r})")
        if v not in out:
            out.append(v)
    return tuple(out)


def _control(b: _Builder, node: _Node | None, warnings: list[str]) -> ControlConfig:
    d = ControlConfig()
    m = _Map(
        b,
        node,
        "control",
        [
            "socket",
            "type",
            "mode",
            "allowed_users",
            "allowed_groups",
            "handshake_timeout",
            "max_message",
        ],
    )
    socket_path = m.abs_path("socket", d.socket)
    if len(socket_path.encode()) >= SUN_PATH_MAX:
        m._bad(
            m.items["socket"],
            f"must be shorter than {SUN_PATH_MAX} bytes, the size of "
            f"sockaddr_un.sun_path (got {len(socket_path.encode())})",
        )
    control = ControlConfig(
        socket=socket_path,
        type=cast(SocketType, m.choice("type", d.type, ("seqpacket", "stream"))),
        mode=_mode(m, d.mode),
        allowed_users=_id_list(m, "allowed_users", d.allowed_users),
        allowed_groups=_id_list(m, "allowed_groups", d.allowed_groups),
        handshake_timeout=m.float_("handshake_timeout", d.handshake_timeout, lo=0.0, lo_open=True),
        max_message=m.int_("max_message", d.max_message, MIN_MESSAGE, MAX_MESSAGE),
    )
    return _resolved_control(control, warnings)


def _topic(m: _Map, default: int) -> int:
    return m.int_("topic", default, 0, MAX_TOPIC)


_SOURCE_KEYS: dict[str, list[str]] = {
    "ticker": ["type", "rate", "topic"],
    "fifo": ["type", "path", "framing", "topic"],
    "stdin": ["type", "framing", "topic"],
    "python": ["type", "callable"],
}


def _source(b: _Builder, node: _Node | None) -> Source:
    kind = _Map(
        b, node, "writer.source", ["type", "rate", "topic", "path", "framing", "callable"]
    ).choice("type", "ticker", tuple(_SOURCE_KEYS))
    m = _Map(b, node, "writer.source", _SOURCE_KEYS[kind], context=f" for source type {kind}")
    framing = ("newline", "length")
    if kind == "ticker":
        d = TickerSource()
        return TickerSource(
            rate=m.float_("rate", d.rate, lo=0.0, hi=MAX_RATE), topic=_topic(m, d.topic)
        )
    if kind == "fifo":
        return FifoSource(
            path=m.abs_path("path", None),
            framing=cast(SourceFraming, m.choice("framing", "newline", framing)),
            topic=_topic(m, 0),
        )
    if kind == "stdin":
        return StdinSource(
            framing=cast(SourceFraming, m.choice("framing", "newline", framing)), topic=_topic(m, 0)
        )
    return PythonSource(callable=m.callable_("callable"))


def _writer(b: _Builder, node: _Node | None) -> WriterConfig:
    d = WriterConfig()
    m = _Map(b, node, "writer", ["source", "shutdown_grace", "status_interval", "reconnect_grace"])
    return WriterConfig(
        source=_source(b, m.node("source")),
        shutdown_grace=m.float_("shutdown_grace", d.shutdown_grace, lo=0.0),
        status_interval=m.float_("status_interval", d.status_interval, lo=0.0, lo_open=True),
        reconnect_grace=m.float_("reconnect_grace", d.reconnect_grace, lo=0.0),
    )


_SINK_KEYS: dict[str, list[str]] = {
    "journal": ["type", "summary_rate"],
    "file": ["type", "path", "framing"],
    "stdout": ["type", "framing"],
    "exec": ["type", "command"],
    "python": ["type", "callable"],
}
_SETTINGS_KEYS = ["topics", "start", "sink", "stats_interval", "reconnect_timeout"]


def _sink_type(b: _Builder, node: _Node | None, key: str) -> str:
    return _Map(b, node, key, sorted({k for ks in _SINK_KEYS.values() for k in ks})).choice(
        "type", "journal", tuple(_SINK_KEYS)
    )


def _sink(b: _Builder, node: _Node | None, key: str) -> Sink:
    kind = _sink_type(b, node, key)
    m = _Map(b, node, key, _SINK_KEYS[kind], context=f" for sink type {kind}")
    framing = ("lines", "length")
    if kind == "journal":
        return JournalSink(
            summary_rate=m.float_("summary_rate", JournalSink().summary_rate, lo=0.0, hi=MAX_RATE)
        )
    if kind == "file":
        return FileSink(
            path=m.abs_path("path", None),
            framing=cast(SinkFraming, m.choice("framing", "lines", framing)),
        )
    if kind == "stdout":
        return StdoutSink(framing=cast(SinkFraming, m.choice("framing", "lines", framing)))
    if kind == "exec":
        n = m.node("command")
        if n is None:
            b.fail("command is required here", m.line, key)
        if not isinstance(n.value, list) or not n.value:
            m._bad(n, f"must be a non-empty list of strings, the argv (got {_describe(n)})")
        argv: list[str] = []
        for item in n.value:
            if not isinstance(item.value, str) or "\0" in item.value:
                m._bad(item, f"must be a string (got {_describe(item)})")
            argv.append(item.value)
        if not argv[0]:
            m._bad(n.value[0], "the program name must not be empty")
        return ExecSink(command=tuple(argv))
    return PythonSink(callable=m.callable_("callable"))


def _topics(m: _Map) -> Literal["all"] | tuple[int, ...]:
    n = m.node("topics")
    if n is None or n.value == "all":
        return "all"
    if not isinstance(n.value, list) or not n.value:
        m._bad(
            n, f'must be "all" or a non-empty list of topic ids 0..{MAX_TOPIC} (got {_describe(n)})'
        )
    seen: set[int] = set()
    for item in n.value:
        v = item.value
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOPIC:
            m._bad(item, f"must be a topic id 0..{MAX_TOPIC} (got {_describe(v)})")
        if v in seen:
            m._bad(item, f"topic {v} is listed twice")
        seen.add(v)
    return tuple(sorted(seen))


def _settings(b: _Builder, node: _Node | None, key: str) -> ReaderSettings:
    d = ReaderSettings()
    m = _Map(b, node, key, _SETTINGS_KEYS)
    return ReaderSettings(
        topics=_topics(m),
        start=cast(Start, m.choice("start", d.start, ("latest", "oldest"))),
        sink=_sink(b, m.node("sink"), f"{key}.sink"),
        stats_interval=m.float_("stats_interval", d.stats_interval, lo=0.0, lo_open=True),
        reconnect_timeout=m.float_("reconnect_timeout", d.reconnect_timeout, lo=0.0),
    )


def _merge_settings(b: _Builder, defaults: _Node | None, override: _Node) -> _Node:
    """Deep-merge one instance's overrides over reader.defaults.

    Every key replaces the default's value, except ``sink``: a sink of the same
    type (or without ``type``) is merged key by key, a sink of another type
    replaces the default's whole (its keys would not fit the other type).
    """
    base = _Map(b, defaults, "reader.defaults", _SETTINGS_KEYS).items
    over = _Map(b, override, override.key, _SETTINGS_KEYS).items
    merged = dict(base)
    for name, n in over.items():
        old = base.get(name)
        if (
            name == "sink"
            and old is not None
            and isinstance(old.value, dict)
            and isinstance(n.value, dict)
            and ("type" not in n.value or _sink_type(b, old, old.key) == _sink_type(b, n, n.key))
        ):
            merged[name] = _Node({**old.value, **n.value}, n.key, n.line)
        else:
            merged[name] = n
    return _Node(merged, override.key, override.line)


def _reader(b: _Builder, node: _Node | None) -> ReaderConfig:
    m = _Map(b, node, "reader", ["defaults", "instances"])
    defaults_node = m.node("defaults")
    defaults = _settings(b, defaults_node, "reader.defaults")
    instances_node = m.node("instances")
    pairs: list[tuple[str, ReaderSettings]] = []
    if instances_node is not None and instances_node.value is not None:
        if not isinstance(instances_node.value, dict):
            b.fail(
                f"must be a mapping of instance name to settings (got {_describe(instances_node)})",
                instances_node.line,
                instances_node.key,
            )
        for name, given in instances_node.value.items():
            if not INSTANCE_RE.fullmatch(name):
                b.fail(
                    f"instance name {name!r} must be 1-31 characters of A-Z a-z 0-9 _ . : @ -",
                    given.line,
                    given.key,
                )
            override = _Node({}, given.key, given.line) if given.value is None else given
            merged = _merge_settings(b, defaults_node, override)
            pairs.append((name, _settings(b, merged, given.key)))
    return ReaderConfig(defaults=defaults, instances=tuple(sorted(pairs)))


def _logging(b: _Builder, node: _Node | None) -> LoggingConfig:
    d = LoggingConfig()
    m = _Map(b, node, "logging", ["level", "target"])
    return LoggingConfig(
        level=cast(Level, m.choice("level", d.level, ("debug", "info", "warning", "error"))),
        target=cast(Target, m.choice("target", d.target, ("auto", "journal", "console", "json"))),
    )


def _build(tree: _Node, path: str) -> Config:
    b = _Builder(None, path)
    m = _Map(b, tree, "", ["segment", "control", "writer", "reader", "logging"])
    warnings: list[str] = []
    return Config(
        segment=_segment(b, m.node("segment")),
        control=_control(b, m.node("control"), warnings),
        writer=_writer(b, m.node("writer")),
        reader=_reader(b, m.node("reader")),
        logging=_logging(b, m.node("logging")),
        source_path=path,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        raise ConfigError(
            f"Failed to read the configuration since uid {os.geteuid()} may "
            f"not read it (permission denied)",
            path=path,
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            "Failed to read the configuration since it is a directory", path=path
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            "Failed to read the configuration since the file does not exist", path=path
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"Failed to read the configuration since {exc.strerror or exc}", path=path
        ) from None
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
    return _build(_parse_yaml(text, chosen), chosen)


# --------------------------------------------------------------------------
# Printing and comparing
# --------------------------------------------------------------------------


def _source_dict(s: Source) -> dict[str, Any]:
    if isinstance(s, TickerSource):
        return {"type": s.type, "rate": s.rate, "topic": s.topic}
    if isinstance(s, FifoSource):
        return {"type": s.type, "path": s.path, "framing": s.framing, "topic": s.topic}
    if isinstance(s, StdinSource):
        return {"type": s.type, "framing": s.framing, "topic": s.topic}
    return {"type": s.type, "callable": s.callable}


def _sink_dict(s: Sink) -> dict[str, Any]:
    if isinstance(s, JournalSink):
        return {"type": s.type, "summary_rate": s.summary_rate}
    if isinstance(s, FileSink):
        return {"type": s.type, "path": s.path, "framing": s.framing}
    if isinstance(s, StdoutSink):
        return {"type": s.type, "framing": s.framing}
    if isinstance(s, ExecSink):
        return {"type": s.type, "command": list(s.command)}
    return {"type": s.type, "callable": s.callable}


def _settings_dict(s: ReaderSettings) -> dict[str, Any]:
    return {
        "topics": s.topics if s.topics == "all" else list(s.topics),
        "start": s.start,
        "sink": _sink_dict(s.sink),
        "stats_interval": s.stats_interval,
        "reconnect_timeout": s.reconnect_timeout,
    }


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective settings as plain data in the file's own schema.

    Dumped as YAML it loads back into an equal Config; reader instances are
    shown with the defaults merged in.
    """
    seg, ctl, wr, lg = cfg.segment, cfg.control, cfg.writer, cfg.logging
    return {
        "segment": {
            "name": seg.name,
            "capacity": seg.capacity,
            "slot_size": seg.slot_size,
            "max_readers": seg.max_readers,
            "policy": seg.policy,
            "block_timeout": seg.block_timeout,
            "unlink_on_exit": seg.unlink_on_exit,
            "mutex_timeout": seg.mutex_timeout,
        },
        "control": {
            "socket": ctl.socket,
            "type": ctl.type,
            "mode": f"0o{ctl.mode:o}",
            "allowed_users": list(ctl.allowed_users),
            "allowed_groups": list(ctl.allowed_groups),
            "handshake_timeout": ctl.handshake_timeout,
            "max_message": ctl.max_message,
        },
        "writer": {
            "source": _source_dict(wr.source),
            "shutdown_grace": wr.shutdown_grace,
            "status_interval": wr.status_interval,
            "reconnect_grace": wr.reconnect_grace,
        },
        "reader": {
            "defaults": _settings_dict(cfg.reader.defaults),
            "instances": {name: _settings_dict(s) for name, s in cfg.reader.instances},
        },
        "logging": {"level": lg.level, "target": lg.target},
    }


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            # An empty mapping (no reader instances) contributes no key.
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


LIVE_KEYS = frozenset(
    {
        "logging.level",
        "control.allowed_users",
        "control.allowed_groups",
        "writer.source.rate",
        "writer.status_interval",
    }
)


def diff_reloadable(old: Config, new: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the changes from ``old`` to ``new`` into (live, refused) dotted keys.

    Live keys a running writer applies on reload; refused ones need a restart
    (reader.* keys: a restart of the readers concerned).  ``writer.source.rate``
    is live only while the source stays a ticker.
    """
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    both_tickers = isinstance(old.writer.source, TickerSource) and isinstance(
        new.writer.source, TickerSource
    )
    live: list[str] = []
    refused: list[str] = []
    missing = object()
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, missing) == b.get(key, missing):
            continue
        if key in LIVE_KEYS and (key != "writer.source.rate" or both_tickers):
            live.append(key)
        else:
            refused.append(key)
    return tuple(live), tuple(refused)
