"""Tests of shmd.config.load (through load_config): the file, located errors, merging, ids."""

from __future__ import annotations

import dataclasses
import grp
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from shmd.config import (
    Config,
    ConfigError,
    ExecSinkConfig,
    FifoSourceConfig,
    FileSinkConfig,
    JournalSinkConfig,
    PythonSinkConfig,
    PythonSourceConfig,
    StdinSourceConfig,
    StdoutSinkConfig,
    TickerSourceConfig,
    ZenohSinkConfig,
    ZenohSourceConfig,
    config_to_dict,
    default_config,
    load_config,
)
from shmd.config import load as cfgload
from shmd.daemons import logs

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "shmd.yaml"
CONFIG_DOC = REPO / "docs" / "CONFIGURATION.md"


def write(tmp_path: Path, text: str, name: str = "shmd.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text), env={})


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


# ---------------------------------------------------------------------------
# Where the configuration comes from
# ---------------------------------------------------------------------------


def test_empty_file_gives_the_builtin_defaults(tmp_path: Path) -> None:
    """An empty file yields exactly default_config(), remembering the file it read."""
    cfg = load_text(tmp_path, "")
    assert cfg == default_config()
    assert cfg.source_path == str(tmp_path / "shmd.yaml")
    assert cfg.segment.capacity == 1024 and cfg.control.mode == 0o660


def test_comment_only_file_and_null_sections_give_defaults(tmp_path: Path) -> None:
    """A file of comments, or sections left empty (null), yields the defaults."""
    assert load_text(tmp_path, "# nothing here\n") == default_config()
    assert (
        load_text(tmp_path, "segment:\ncontrol:\nwriter:\nreader:\nlogging:\n") == default_config()
    )


def test_missing_keys_keep_their_defaults(tmp_path: Path) -> None:
    """Keys not given keep their defaults while the given ones apply."""
    cfg = load_text(
        tmp_path,
        """
        segment:
          capacity: 8
        logging: {level: debug}
    """,
    )
    assert cfg.segment.capacity == 8
    assert cfg.segment.slot_size == 4096
    assert cfg.logging.level == "debug" and cfg.logging.target == "auto"
    assert cfg.writer == default_config().writer


def test_missing_default_path_gives_builtin_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config or SHMD_CONFIG a missing default file means the built-in defaults."""
    monkeypatch.setattr(cfgload, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    cfg = load_config(env={})
    assert cfg == default_config()
    assert cfg.source_path is None


def test_existing_default_path_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config or SHMD_CONFIG the default path is read when it exists."""
    path = write(tmp_path, "segment: {max_readers: 3}\n")
    monkeypatch.setattr(cfgload, "DEFAULT_PATH", path)
    cfg = load_config(env={})
    assert cfg.segment.max_readers == 3 and cfg.source_path == path


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    """A file named by --config or SHMD_CONFIG that does not exist is a ConfigError."""
    missing = str(tmp_path / "nope.yaml")
    calls: list[Callable[[], object]] = [
        lambda: load_config(missing, env={}),
        lambda: load_config(env={"SHMD_CONFIG": missing}),
    ]
    for call in calls:
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.path == missing
        assert str(info.value) == (
            f"{missing}: Failed to read the configuration since the file does not exist"
        )


def test_env_var_selects_the_file_and_path_argument_wins(tmp_path: Path) -> None:
    """SHMD_CONFIG picks the file unless a path argument is given, which wins."""
    from_env = write(tmp_path, "segment: {capacity: 16}\n", "env.yaml")
    from_arg = write(tmp_path, "segment: {capacity: 32}\n", "arg.yaml")
    assert load_config(env={"SHMD_CONFIG": from_env}).segment.capacity == 16
    assert load_config(from_arg, env={"SHMD_CONFIG": from_env}).segment.capacity == 32
    assert load_config(Path(from_arg), env={}).source_path == from_arg


def test_env_var_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an env argument, SHMD_CONFIG is read from os.environ."""
    path = write(tmp_path, "segment: {capacity: 64}\n")
    monkeypatch.setenv("SHMD_CONFIG", path)
    assert load_config().segment.capacity == 64


def test_directory_is_an_error(tmp_path: Path) -> None:
    """Naming a directory is a ConfigError saying so."""
    with pytest.raises(ConfigError, match="since it is a directory"):
        load_config(str(tmp_path), env={})


def test_non_utf8_file_is_an_error_with_its_line(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError naming the line of the bad byte."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"segment:\n  name: /caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.line == 2
    assert "not valid UTF-8" in str(info.value)


def _load_as_nobody(path: str) -> str:
    """Fork, drop to uid/gid 65534, load ``path``; return the ConfigError text."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                load_config(path, env={})
                os.write(wfd, b"loaded without error")
            except ConfigError as exc:
                os.write(wfd, str(exc).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as reader:
            text = reader.read().decode()
    finally:
        _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    return text


def test_unreadable_file_is_an_error_saying_so() -> None:
    """A file the daemon's user may not read is a ConfigError saying permission was denied."""
    workdir = tempfile.mkdtemp(prefix="shmd-test-")
    try:
        os.chmod(workdir, 0o755)
        path = os.path.join(workdir, "shmd.yaml")
        with open(path, "w") as f:
            f.write("segment: {}\n")
        os.chmod(path, 0o600)
        if os.geteuid() != 0:
            os.chmod(path, 0)
            with pytest.raises(ConfigError) as info:
                load_config(path, env={})
            assert "permission denied" in str(info.value)
            return
        # root reads anything: ask a forked child that became nobody instead
        # (a fork, not an exec: the interpreter may live where nobody cannot go).
        assert _load_as_nobody(path) == (
            f"{path}: Failed to read the configuration since uid 65534 may not read it "
            f"(permission denied)"
        )
    finally:
        shutil.rmtree(workdir)


# ---------------------------------------------------------------------------
# The shipped example
# ---------------------------------------------------------------------------


def _flat_keys(data: object, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return {prefix}
    keys: set[str] = set()
    for k, v in data.items():
        keys |= _flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def test_shipped_example_spells_out_every_default() -> None:
    """config/shmd.yaml loads, sets every key, and matches the defaults except its example."""
    cfg = load_config(str(SHIPPED), env={})
    shipped = yaml.safe_load(SHIPPED.read_text())
    every = config_to_dict(default_config())
    every["reader"].pop("instances")
    missing = _flat_keys(every) - _flat_keys(shipped)
    assert not missing, f"config/shmd.yaml does not show {sorted(missing)}"
    assert dataclasses.replace(cfg.reader, instances=()) == default_config().reader
    assert (cfg.segment, cfg.control, cfg.writer, cfg.logging) == (
        default_config().segment,
        default_config().control,
        default_config().writer,
        default_config().logging,
    )
    assert cfg.reader_settings("1").topics == (0, 1)


def test_every_line_of_the_shipped_example_is_commented_nearby() -> None:
    """Every key line of config/shmd.yaml belongs to a paragraph that carries a comment."""
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        start = i
        while start > 0 and lines[start - 1].strip():
            start -= 1
        paragraph = lines[start : i + 1]
        assert any("#" in p for p in paragraph), f"line {i + 1} has no comment: {line!r}"


def test_configuration_doc_names_every_key_and_its_example_loads(tmp_path: Path) -> None:
    """docs/CONFIGURATION.md has a table row for every key and its YAML example is valid."""
    text = CONFIG_DOC.read_text()
    every = config_to_dict(default_config())
    every["reader"].pop("instances")
    leaves = {key.rsplit(".", 1)[-1] for key in _flat_keys(every)}
    for leaf in leaves:
        assert f"`{leaf}`" in text, f"docs/CONFIGURATION.md does not describe {leaf}"
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = load_text(tmp_path, example)
    assert cfg.reader_settings("archive").sink == FileSinkConfig(
        path="/var/lib/shmd/archive.bin", framing="length"
    )


# ---------------------------------------------------------------------------
# Validation: located, precise errors
# ---------------------------------------------------------------------------


def test_error_message_names_file_line_and_key(tmp_path: Path) -> None:
    """A bad value reads '<file>:<line>: <dotted key>: <reason> (got <value>)'."""
    path = write(
        tmp_path,
        """\
        # comment
        segment:
          name: /x
          slot_size: 1001
    """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.path, err.line, err.key) == (path, 4, "segment.slot_size")
    assert str(err) == f"{path}:4: segment.slot_size: must be a multiple of 8 (got 1001)"


BAD = [
    # (yaml, line, key, fragment of the reason)
    (
        "segment:\n  capacity: true\n",
        2,
        "segment.capacity",
        "must be an integer (got boolean true)",
    ),
    ("segment:\n  capacity: 1000\n", 2, "segment.capacity", "must be a power of two (got 1000)"),
    ("segment:\n  capacity: 1\n", 2, "segment.capacity", "between 2 and 16777216 (got 1)"),
    ("segment:\n  capacity: 33554432\n", 2, "segment.capacity", "between 2 and 16777216"),
    ("segment:\n  slot_size: 32\n", 2, "segment.slot_size", "between 40 and 1073741824"),
    (
        "segment:\n  capacity: 16777216\n  slot_size: 4096\n",
        3,
        "segment.slot_size",
        "capacity * slot_size must be at most 16 GiB",
    ),
    (
        'segment:\n  capacity: 2\n  slot_size: "4096"\n',
        3,
        "segment.slot_size",
        "must be an integer (got string '4096')",
    ),
    ("segment:\n  name: shmd-bus\n", 2, "segment.name", "one slash followed by a name"),
    ("segment:\n  name: /a/b\n", 2, "segment.name", "one slash followed by a name"),
    ("segment:\n  name: /\n", 2, "segment.name", "one slash followed by a name"),
    (f"segment:\n  name: /{'x' * 255}\n", 2, "segment.name", "at most 255 bytes"),
    ("segment:\n  max_readers: 0\n", 2, "segment.max_readers", "between 1 and 1024"),
    ("segment:\n  max_readers: 1025\n", 2, "segment.max_readers", "between 1 and 1024"),
    (
        "segment:\n  policy: newest\n",
        2,
        "segment.policy",
        "must be one of drop-oldest | block (got string 'newest')",
    ),
    (
        "segment:\n  block_timeout: 0\n",
        2,
        "segment.block_timeout",
        "must be greater than 0 (got 0)",
    ),
    ("segment:\n  mutex_timeout: -1\n", 2, "segment.mutex_timeout", "greater than 0"),
    ("segment:\n  mutex_timeout: .nan\n", 2, "segment.mutex_timeout", "finite number"),
    ("segment:\n  block_timeout: .inf\n", 2, "segment.block_timeout", "finite number"),
    ("segment:\n  block_timeout: 90000\n", 2, "segment.block_timeout", "between 0 and 86400"),
    (
        "segment:\n  unlink_on_exit: 1\n",
        2,
        "segment.unlink_on_exit",
        "must be true or false (got integer 1)",
    ),
    ("segment:\n  sizee: 3\n", 2, "segment.sizee", "unknown key"),
    ("segment: [1, 2]\n", 1, "segment", "must be a mapping (got a list)"),
    ("control:\n  socket: run/shmd.sock\n", 2, "control.socket", "must be an absolute path"),
    (f"control:\n  socket: /{'s' * 107}\n", 2, "control.socket", "shorter than 108 bytes"),
    ("control:\n  type: dgram\n", 2, "control.type", "seqpacket | stream"),
    ("control:\n  mode: 660\n", 2, "control.mode", "write it in octal like 0o660"),
    ("control:\n  mode: rw-rw----\n", 2, "control.mode", "octal permission mode"),
    ("control:\n  mode: true\n", 2, "control.mode", "octal permission mode"),
    (
        "control:\n  allowed_groups: shmd\n",
        2,
        "control.allowed_groups",
        "must be a list of names or numeric ids",
    ),
    (
        "control:\n  allowed_users:\n    - alice\n    - yes\n",
        4,
        "control.allowed_users[1]",
        "must be a name or a numeric id (got boolean true)",
    ),
    ("control:\n  allowed_users: [-1]\n", 2, "control.allowed_users[0]", "between 0 and"),
    (
        'control:\n  allowed_users: ["a b"]\n',
        2,
        "control.allowed_users[0]",
        "not a valid user or group name",
    ),
    ("control:\n  handshake_timeout: 0\n", 2, "control.handshake_timeout", "greater than 0"),
    ("control:\n  max_message: 100\n", 2, "control.max_message", "between 1024 and"),
    (
        "writer:\n  source:\n    type: socket\n",
        3,
        "writer.source.type",
        "ticker | fifo | stdin | python",
    ),
    (
        "writer:\n  source:\n    type: fifo\n    rate: 3\n    path: /run/f\n",
        4,
        "writer.source.rate",
        "unknown key for source type fifo",
    ),
    ("writer:\n  source:\n    type: fifo\n", 2, "writer.source", "path is required here"),
    (
        "writer:\n  source:\n    type: fifo\n    path: /run/f\n    framing: lines\n",
        5,
        "writer.source.framing",
        "newline | length",
    ),
    (
        "writer:\n  source:\n    type: python\n    callable: mod.func\n",
        4,
        "writer.source.callable",
        "'package.module:function'",
    ),
    ("writer:\n  source:\n    rate: -1\n", 3, "writer.source.rate", "between 0 and"),
    ("writer:\n  source:\n    topic: 64\n", 3, "writer.source.topic", "between 0 and 63"),
    ("writer:\n  status_interval: 0\n", 2, "writer.status_interval", "greater than 0"),
    (
        "segment:\n  topics: {ticks: 1}\nwriter:\n  source:\n    topic: tick\n",
        5,
        "writer.source.topic",
        "unknown topic 'tick' (segment.topics names: ticks)",
    ),
    (
        "writer:\n  source:\n    topic: ticks\n",
        3,
        "writer.source.topic",
        "unknown topic 'ticks' (segment.topics names: none (segment.topics is empty))",
    ),
    (
        "writer:\n  source:\n    topic: [1]\n",
        3,
        "writer.source.topic",
        "must be a topic id 0..63 or a name of segment.topics (got a list)",
    ),
    (
        "segment:\n  topics: {ticks: 1, frames: 2}\n"
        "reader:\n  defaults:\n    topics: [ticks, fx]\n",
        5,
        "reader.defaults.topics[1]",
        "unknown topic 'fx' (segment.topics names: frames, ticks)",
    ),
    (
        "segment:\n  topics: {ticks: 1}\nreader:\n  instances:\n    a: {topics: [1, ticks]}\n",
        5,
        "reader.instances.a.topics[1]",
        "topic 1 is listed twice ('ticks' is topic 1)",
    ),
    (
        "segment:\n  topics:\n    ticks: 1\n    frames: 1\n",
        4,
        "segment.topics.frames",
        "topic id 1 is given to 'ticks' already",
    ),
    (
        "segment:\n  topics:\n    Ticks: 1\n",
        3,
        "segment.topics.Ticks",
        "topic name 'Ticks' must be",
    ),
    ("segment:\n  topics:\n    '7': 1\n", 3, "segment.topics.7", "topic name '7' must be"),
    (
        "segment:\n  topics:\n    ticks: 64\n",
        3,
        "segment.topics.ticks",
        "topic id 0..63 (got integer 64)",
    ),
    ("segment:\n  topics:\n    ticks: one\n", 3, "segment.topics.ticks", "(got string 'one')"),
    ("segment:\n  topics: [ticks]\n", 2, "segment.topics", "must be a mapping of topic names"),
    (
        "segment:\n  topics: {"
        + ", ".join(f"t{i:02}{'x' * 29}: {i}" for i in range(64))
        + "}\ncontrol:\n  max_message: 2048\n",
        2,
        "segment.topics",
        "the Welcome carrying these 64 names is 2315 bytes, more than control.max_message 2048",
    ),
    ("writer:\n  shutdown_grace: -0.5\n", 2, "writer.shutdown_grace", "between 0 and"),
    (
        "reader:\n  defaults:\n    topics: [0, 0]\n",
        3,
        "reader.defaults.topics[1]",
        "topic 0 is listed twice",
    ),
    (
        "reader:\n  defaults:\n    topics: []\n",
        3,
        "reader.defaults.topics",
        "non-empty list of topic ids",
    ),
    (
        "reader:\n  defaults:\n    topics: some\n",
        3,
        "reader.defaults.topics",
        'must be "all" or a non-empty list',
    ),
    (
        "reader:\n  defaults:\n    topics: [1, 99]\n",
        3,
        "reader.defaults.topics[1]",
        "must be a topic id 0..63 (got integer 99)",
    ),
    ("reader:\n  defaults:\n    start: middle\n", 3, "reader.defaults.start", "latest | oldest"),
    ("reader:\n  defaults:\n    wait: nap\n", 3, "reader.defaults.wait", "sleep | spin | backoff"),
    (
        "reader:\n  instances:\n    '1': {wait: backoff, backoff_spin: 2}\n",
        3,
        "reader.instances.1.backoff_spin",
        "1",
    ),
    (
        "reader:\n  defaults:\n    sink:\n      type: exec\n      command: []\n",
        5,
        "reader.defaults.sink.command",
        "non-empty list of strings",
    ),
    (
        "reader:\n  defaults:\n    sink:\n      type: exec\n      command: [ls, 3]\n",
        5,
        "reader.defaults.sink.command[1]",
        "must be a string (got integer 3)",
    ),
    (
        "reader:\n  defaults:\n    sink:\n      type: file\n      path: out.bin\n",
        5,
        "reader.defaults.sink.path",
        "absolute path",
    ),
    (
        "reader:\n  defaults:\n    sink:\n      type: stdout\n      summary_rate: 2\n",
        5,
        "reader.defaults.sink.summary_rate",
        "unknown key for sink type stdout",
    ),
    (
        "reader:\n  defaults:\n    stats_interval: 0\n",
        3,
        "reader.defaults.stats_interval",
        "greater than 0",
    ),
    (
        "reader:\n  instances:\n    a/b: {}\n",
        3,
        "reader.instances.a/b",
        "instance name 'a/b' must be",
    ),
    ("reader:\n  instances: [1]\n", 2, "reader.instances", "must be a mapping of instance"),
    (
        "reader:\n  instances:\n    x:\n      topics: [7, 70]\n",
        4,
        "reader.instances.x.topics[1]",
        "topic id 0..63",
    ),
    ("reader:\n  default: {}\n", 2, "reader.default", "did you mean 'defaults'?"),
    ("logging:\n  level: verbose\n", 2, "logging.level", "debug | info | warning | error"),
    ("logging:\n  target: syslog\n", 2, "logging.target", "auto | journal | console | json"),
    (
        "logging:\n  level: info\n  level: debug\n",
        3,
        "logging.level",
        "duplicate key (first given on line 2)",
    ),
    ("segmnt: {}\n", 1, "segmnt", "did you mean 'segment'?"),
    ("segment: {capacity: 4}\nsegment: {capacity: 8}\n", 2, "segment", "duplicate key"),
    ("base: &b {level: info}\nlogging:\n  <<: *b\n", 3, "logging", "merge keys"),
    ("? [a, b]\n: 1\n", 1, None, "a key must be a plain string"),
    (
        "reader:\n  defaults:\n    sink: {type: zenoh}\n",
        3,
        "reader.defaults.sink",
        "needs connect or listen endpoints since scouting is off",
    ),
    (
        "reader:\n  defaults:\n    sink:\n"
        "      {type: zenoh, mode: client, listen: [tcp/10.1.0.1:7447]}\n",
        4,
        "reader.defaults.sink.mode",
        "client mode needs connect endpoints",
    ),
    (
        "writer:\n  source:\n    type: zenoh\n    connect: [tcp/10.1.0.1]\n",
        4,
        "writer.source.connect[0]",
        "must be tcp/HOST:PORT with a port 1..65535",
    ),
    (
        "writer:\n  source:\n    type: zenoh\n    connect: [http://x]\n",
        4,
        "writer.source.connect[0]",
        "must be a Zenoh endpoint",
    ),
    (
        "writer:\n  source:\n    type: zenoh\n    listen: [tcp/10.1.0.1:1, tcp/10.1.0.1:1]\n",
        4,
        "writer.source.listen[1]",
        "is listed twice",
    ),
    (
        "writer:\n  source:\n    type: zenoh\n    listen: [tcp/10.1.0.1:1]\n    key: a//b\n",
        5,
        "writer.source.key",
        "must be a Zenoh key expression",
    ),
    (
        "writer:\n  source:\n    type: zenoh\n    listen: [tcp/10.1.0.1:1]\n    key: '**'\n",
        5,
        "writer.source.key",
        "must not be '**' alone",
    ),
    (
        "reader:\n  defaults:\n    sink:\n      type: zenoh\n      prefix: a/*\n"
        "      listen: [tcp/10.1.0.1:1]\n",
        5,
        "reader.defaults.sink.prefix",
        "without wildcards",
    ),
    (
        "reader:\n  defaults:\n    sink:\n      type: zenoh\n      scouting: yes please\n",
        5,
        "reader.defaults.sink.scouting",
        "must be true or false",
    ),
    (
        "reader:\n  defaults:\n    sink: {type: zenoh, mode: router, listen: [tcp/10.1.0.1:1]}\n",
        3,
        "reader.defaults.sink.mode",
        "peer | client",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"), BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)]
)
def test_invalid_values_are_rejected_with_their_location(
    tmp_path: Path, text: str, line: int, key: str | None, fragment: str
) -> None:
    """Each impossible value is a ConfigError at the key's line naming its dotted path."""
    err = error_for(tmp_path, text)
    assert (err.line, err.key) == (line, key), str(err)
    assert fragment in err.message, str(err)
    assert str(err).startswith(f"{tmp_path / 'shmd.yaml'}:{line}: ")


@pytest.mark.parametrize("written", ["0o660", "0660", '"0660"', "'0o660'", "432"])
def test_socket_mode_accepts_octal_spellings(tmp_path: Path, written: str) -> None:
    """control.mode accepts 0o660, 0660, "0660" and the decimal 432 alike."""
    assert load_text(tmp_path, f"control:\n  mode: {written}\n").control.mode == 0o660


def test_floats_accept_integers(tmp_path: Path) -> None:
    """A whole number is accepted where seconds or rates are expected."""
    cfg = load_text(tmp_path, "segment: {block_timeout: 2}\nwriter: {source: {rate: 0}}\n")
    assert cfg.segment.block_timeout == 2.0 and isinstance(cfg.segment.block_timeout, float)
    assert cfg.writer.source == TickerSourceConfig(rate=0.0)


def test_config_is_frozen() -> None:
    """The configuration objects cannot be modified after loading."""
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.segment.capacity = 2  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Sources, sinks, reader instances
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", TickerSourceConfig()),
        ("{rate: 2.5, topic: 3}", TickerSourceConfig(rate=2.5, topic=3)),
        ("{type: fifo, path: /run/shmd/p.fifo}", FifoSourceConfig(path="/run/shmd/p.fifo")),
        (
            "{type: fifo, path: /p, framing: length, topic: 63}",
            FifoSourceConfig(path="/p", framing="length", topic=63),
        ),
        ("{type: stdin, framing: length}", StdinSourceConfig(framing="length")),
        (
            "{type: python, callable: 'pkg.mod:make.source'}",
            PythonSourceConfig(callable="pkg.mod:make.source"),
        ),
        (
            "{type: zenoh, listen: [tcp/10.1.0.1:7447]}",
            ZenohSourceConfig(key="shmd-bus/*", listen=("tcp/10.1.0.1:7447",)),
        ),
        (
            "{type: zenoh, key: 'site/**', mode: client, connect: [tcp/10.1.0.1:7447]}",
            ZenohSourceConfig(key="site/**", mode="client", connect=("tcp/10.1.0.1:7447",)),
        ),
        (
            "{type: zenoh, key: a/*/b, scouting: true}",
            ZenohSourceConfig(key="a/*/b", scouting=True),
        ),
    ],
)
def test_every_source_form_parses(tmp_path: Path, text: str, expected: object) -> None:
    """Each writer.source form gives its typed dataclass with defaults filled in."""
    assert load_text(tmp_path, f"writer:\n  source: {text}\n").writer.source == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{type: journal, summary_rate: 0}", JournalSinkConfig(summary_rate=0.0)),
        ("{type: file, path: /var/lib/shmd/out}", FileSinkConfig(path="/var/lib/shmd/out")),
        ("{type: stdout, framing: length}", StdoutSinkConfig(framing="length")),
        ("{type: exec, command: [/usr/bin/wc, -c]}", ExecSinkConfig(command=("/usr/bin/wc", "-c"))),
        ("{type: python, callable: 'a:b'}", PythonSinkConfig(callable="a:b")),
        (
            "{type: zenoh, connect: [tcp/10.1.0.1:7447, 'tcp/[fd00::1]:7447']}",
            ZenohSinkConfig(prefix="shmd-bus", connect=("tcp/10.1.0.1:7447", "tcp/[fd00::1]:7447")),
        ),
        (
            "{type: zenoh, prefix: site/a, express_max: 0, pack: true, listen: [tcp/0.0.0.0:0]}",
            ZenohSinkConfig(prefix="site/a", express_max=0, pack=True, listen=("tcp/0.0.0.0:0",)),
        ),
    ],
)
def test_every_sink_form_parses(tmp_path: Path, text: str, expected: object) -> None:
    """Each reader sink form gives its typed dataclass with defaults filled in."""
    cfg = load_text(tmp_path, f"reader:\n  defaults:\n    sink: {text}\n")
    assert cfg.reader.defaults.sink == expected


def test_instances_deep_merge_over_defaults(tmp_path: Path) -> None:
    """Instance overrides merge over reader.defaults; a same-type sink merges key by key."""
    cfg = load_text(
        tmp_path,
        """
        reader:
          defaults:
            topics: [1, 2]
            start: oldest
            sink: {type: file, path: /var/a, framing: length}
          instances:
            "1": {topics: [5]}
            2:
              sink: {path: /var/b}
            three:
              sink: {type: stdout}
            four:
    """,
    )
    one = cfg.reader_settings("1")
    assert one.topics == (5,) and one.start == "oldest"
    assert one.sink == FileSinkConfig(path="/var/a", framing="length")
    two = cfg.reader_settings("2")
    assert two.topics == (1, 2) and two.sink == FileSinkConfig(path="/var/b", framing="length")
    assert cfg.reader_settings("three").sink == StdoutSinkConfig()
    assert cfg.reader_settings("four") == cfg.reader.defaults
    assert cfg.reader_settings("not-listed") == cfg.reader.defaults
    assert [name for name, _ in cfg.reader.instances] == ["1", "2", "four", "three"]


def test_error_in_merged_instance_points_at_the_override(tmp_path: Path) -> None:
    """A key that is valid in the defaults but wrong in an instance is reported at the instance."""
    err = error_for(
        tmp_path,
        """\
        reader:
          defaults:
            sink: {type: journal, summary_rate: 1}
          instances:
            "7":
              sink:
                type: file
                summary_rate: 1
    """,
    )
    assert (err.key, err.line) == ("reader.instances.7.sink.summary_rate", 8), str(err)
    assert "unknown key for sink type file" in err.message


def test_instance_with_a_different_sink_type_drops_the_default_sink_keys(tmp_path: Path) -> None:
    """A sink of another type replaces the default sink whole instead of merging its keys."""
    cfg = load_text(
        tmp_path,
        """
        reader:
          defaults:
            sink: {type: journal, summary_rate: 5}
          instances:
            x: {sink: {type: file, path: /tmp/x}}
    """,
    )
    assert cfg.reader_settings("x").sink == FileSinkConfig(path="/tmp/x")


def test_topic_mask_follows_topics(tmp_path: Path) -> None:
    """ReaderSettings.topic_mask has bit t set for each subscribed topic t (all 64 for all)."""
    cfg = load_text(tmp_path, "reader:\n  instances:\n    a: {topics: [0, 3, 63]}\n")
    assert cfg.reader_settings("a").topic_mask == (1 << 0) | (1 << 3) | (1 << 63)
    assert cfg.reader.defaults.topic_mask == (1 << 64) - 1


# ---------------------------------------------------------------------------
# Users and groups
# ---------------------------------------------------------------------------


def test_topics_may_be_named_and_settings_hold_ids(tmp_path: Path) -> None:
    """Names of segment.topics and ids are accepted alike wherever a topic is; settings hold ids."""
    cfg = load_text(
        tmp_path,
        """
        segment:
          topics: {ticks: 3, frames: 1, fx.eur-usd_2: 63}
        writer:
          source: {type: fifo, path: /run/f, topic: frames}
        reader:
          defaults: {topics: [ticks, 0]}
          instances:
            a: {topics: [fx.eur-usd_2, frames, 5]}
            b: {topics: all}
        """,
    )
    assert cfg.segment.topics == {"frames": 1, "ticks": 3, "fx.eur-usd_2": 63}
    assert list(cfg.segment.topics) == ["frames", "ticks", "fx.eur-usd_2"]
    assert cfg.writer.source == FifoSourceConfig(path="/run/f", topic=1)
    assert cfg.reader.defaults.topics == (0, 3)
    assert cfg.reader_settings("a").topics == (1, 5, 63)
    assert cfg.reader_settings("b").topics == "all"
    assert (cfg.topic_name(3), cfg.topic_name(0)) == ("ticks", None)
    assert cfg.segment.topics.label(63) == "fx.eur-usd_2"
    # The journal sink's summaries name their topics: the map travels with it.
    sink = cfg.reader_settings("a").sink
    assert isinstance(sink, JournalSinkConfig) and sink.topic_names == cfg.segment.topics
    assert config_to_dict(cfg)["segment"]["topics"] == {"frames": 1, "ticks": 3, "fx.eur-usd_2": 63}


def test_a_python_source_gets_the_topic_names(tmp_path: Path) -> None:
    """A python source's settings carry segment.topics, so its callable may publish by name."""
    cfg = load_text(
        tmp_path,
        "segment: {topics: {ticks: 2}}\nwriter: {source: {type: python, callable: 'm:f'}}\n",
    )
    assert isinstance(cfg.writer.source, PythonSourceConfig)
    assert cfg.writer.source.topic_names == {"ticks": 2}
    assert default_config().segment.topics == {}


def test_allowed_ids_resolve_and_unknown_names_only_warn(tmp_path: Path) -> None:
    """Names resolve to ids, numbers pass through, and an unknown group is a warning."""
    missing = "shmd-test-no-such-group"
    cfg = load_text(
        tmp_path,
        f"""
        control:
          allowed_users: [root, 1234, "4321"]
          allowed_groups: [root, {missing}, 77]
    """,
    )
    assert cfg.control.allowed_users == ("root", 1234, 4321)
    assert cfg.control.allowed_uids == frozenset({0, 1234, 4321})
    assert cfg.control.allowed_gids == frozenset({grp.getgrnam("root").gr_gid, 77})
    assert any(missing in w for w in cfg.warnings)


def test_peer_allowed_rules(tmp_path: Path) -> None:
    """root, the writer's own uid, listed uids and members of listed groups may attach."""
    cfg = load_text(tmp_path, "control:\n  allowed_users: [5000]\n  allowed_groups: [6000]\n")
    ctl = cfg.control
    assert ctl.peer_allowed(0, [])
    assert ctl.peer_allowed(os.geteuid(), [])
    assert ctl.peer_allowed(5000, [1])
    assert ctl.peer_allowed(7000, [1, 6000])
    assert not ctl.peer_allowed(7000, [1, 2])


# ---------------------------------------------------------------------------
# Loading logs nothing (the daemons' exit path: tests/test_process.py)
# ---------------------------------------------------------------------------


def test_structlog_is_left_alone_by_loading(tmp_path: Path, clean_logging: None) -> None:
    """Loading a configuration (even with warnings) logs nothing by itself."""
    with capture_logs() as captured:
        cfg = load_text(tmp_path, "control: {allowed_groups: [shmd-test-nogroup]}\n")
    assert cfg.warnings and captured == []
    assert not logs.is_configured()
