"""Tests of shmd.daemons.zenohio: keys, the status file, and a zenoh config without the package."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmd.config import load_config
from shmd.control.fields import TopicMap
from shmd.daemons.zenohio import (
    first_line,
    read_status,
    status_path,
    topic_key,
    topic_of,
    zenoh_users,
)

CONFIG = """\
segment: {name: /zio-test, topics: {imu: 1}}
writer:
  source: {type: zenoh, listen: [tcp/10.231.0.2:7447]}
reader:
  instances:
    bridge:
      sink: {type: zenoh, connect: [tcp/10.231.0.2:7447]}
    plain: {}
"""
#: Runs a daemon or shmctl as if the zenoh package were not installed.
WITHOUT_ZENOH = (
    "import sys; sys.modules['zenoh'] = None; from {module} import main; sys.exit(main({argv!r}))"
)


def test_keys_name_the_topic_or_its_id() -> None:
    """A record's key is <prefix>/<topic name>, or the id of a topic without one."""
    names = TopicMap({"imu": 1})
    assert topic_key("site/a", 1, names) == "site/a/imu"
    assert topic_key("site/a", 5, names) == "site/a/5"


@pytest.mark.parametrize(
    ("key", "topic"),
    [("x/imu", 1), ("x/5", 5), ("x/1", None), ("x/64", None), ("x/cam", None), ("x/05x", None),
     ("imu", 1), ("x/y/imu", 1), ("x/", None)],
)  # fmt: skip
def test_a_key_maps_to_one_topic_or_none(key: str, topic: int | None) -> None:
    """The last chunk is a name, or the id of a topic without a name; anything else is none."""
    assert topic_of(key, TopicMap({"imu": 1})) == topic


def test_the_status_file_is_read_only_when_whole(tmp_path: Path) -> None:
    """read_status gives the JSON object beside the segment, None when missing or garbage."""
    segment = f"/zio-test-{tmp_path.name}"
    path = status_path(segment)
    assert path == Path("/dev/shm") / f"{segment[1:]}.bridge"
    try:
        assert read_status(segment) is None
        path.write_text("{not json")
        assert read_status(segment) is None
        path.write_text("[1]")
        assert read_status(segment) is None
        path.write_text(json.dumps({"origins": {}, "lost": 0}))
        assert read_status(segment) == {"origins": {}, "lost": 0}
    finally:
        path.unlink(missing_ok=True)


def test_only_the_sections_a_process_runs_need_zenoh(tmp_path: Path) -> None:
    """The writer needs it for its source, a reader for its own sink only, a check for any."""
    path = tmp_path / "shmd.yaml"
    path.write_text(CONFIG)
    cfg = load_config(str(path), env={})
    assert zenoh_users(cfg, "writer") == ["writer.source"]
    assert zenoh_users(cfg, "reader", "bridge") == ["reader.instances.bridge.sink"]
    assert zenoh_users(cfg, "reader", "plain") == []
    assert zenoh_users(cfg) == ["writer.source", "reader.instances.bridge.sink"]


def run_without_zenoh(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = WITHOUT_ZENOH.format(module=module, argv=argv)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_without_the_package_the_check_fails_with_one_line(tmp_path: Path) -> None:
    """check-config names the key and how to install zenoh, in one line, no traceback."""
    path = tmp_path / "shmd.yaml"
    path.write_text(CONFIG)
    done = run_without_zenoh("shmd.cli", ["check-config", str(path)])
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == (
        f"shmctl: error: {path}: writer.source: Failed to use type zenoh since the Python "
        "package zenoh is not installed; install it with: pip install 'shmd[zenoh]' "
        "(the eclipse-zenoh package)\n"
    )


@pytest.mark.parametrize(
    ("module", "extra", "key"),
    [
        ("shmd.daemons.writer", [], "writer.source"),
        ("shmd.daemons.reader", ["--instance", "bridge"], "reader.instances.bridge.sink"),
        ("shmd.daemons.reader", ["--instance", "plain", "--check-config"], "writer.source"),
    ],
)
def test_without_the_package_a_daemon_that_needs_it_exits_78(
    tmp_path: Path, module: str, extra: list[str], key: str
) -> None:
    """A daemon whose section names zenoh logs one config_error and exits 78 (no restart)."""
    path = tmp_path / "shmd.yaml"
    path.write_text(CONFIG)
    done = run_without_zenoh(module, ["--config", str(path), "--log-target", "json", *extra])
    assert done.returncode == 78, done.stderr
    [line] = done.stderr.splitlines()
    event = json.loads(line)
    assert (event["event"], event["key"]) == ("config_error", key)
    assert "pip install 'shmd[zenoh]'" in event["error"]


def test_without_the_package_a_reader_that_does_not_need_it_starts(tmp_path: Path) -> None:
    """Another reader of the same file is not stopped by a zenoh section it does not run."""
    path = tmp_path / "shmd.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        segment: {{name: /zio-test-{tmp_path.name}}}
        control: {{socket: {tmp_path / "none.sock"}, allowed_groups: []}}
        writer:
          source: {{type: zenoh, listen: [tcp/10.231.0.2:7447]}}
        reader:
          defaults: {{reconnect_timeout: 0}}
          instances:
            bridge:
              sink: {{type: zenoh, connect: [tcp/10.231.0.2:7447]}}
            plain: {{}}
        """)
    )
    done = run_without_zenoh(
        "shmd.daemons.reader",
        ["--config", str(path), "--log-target", "json", "--instance", "plain"],
    )
    # It got past the configuration: no writer to reach (exit 1), not exit 78.
    assert done.returncode == 1, done.stderr
    assert "config_error" not in done.stderr


def test_zenoh_errors_lose_their_rust_source_locations() -> None:
    """A ZError's text reads without the Rust file and line it was made at."""
    exc = RuntimeError(
        "Can not create a listener: [10.0.0.9:7447: Cannot assign (os error 99) at "
        "/root/.cargo/x/src/tcp.rs:61.] at /root/.cargo/y/src/unicast.rs:338.\nmore"
    )
    assert (
        first_line(exc) == "Can not create a listener: [10.0.0.9:7447: Cannot assign (os error 99)]"
    )
    assert first_line(RuntimeError("")) == "RuntimeError"
