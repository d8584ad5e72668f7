"""Tests of shmd.config.reload: config_to_dict round trips; live and refused reload keys."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

from shmd.config import Config, config_to_dict, diff_reloadable, load_config


def write(tmp_path: Path, text: str, name: str = "shmd.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text), env={})


RICH = """
segment: {name: /shmd-test-rich, capacity: 64, slot_size: 256, policy: block,
          topics: {ticks: 9, frames: 2}}
control: {mode: "0640", allowed_users: [root, 1001], type: stream}
writer:
  source: {type: fifo, path: /run/shmd/in.fifo, framing: length, topic: 9}
reader:
  defaults: {topics: [1, frames], sink: {type: exec, command: [/bin/cat]}}
  instances:
    "1": {start: oldest}
    b: {sink: {type: file, path: /var/out, framing: length}}
logging: {level: warning, target: json}
"""


def test_config_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    """Dumping config_to_dict as YAML and loading it again yields an equal configuration."""
    cfg = load_text(tmp_path, RICH)
    dumped = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    again = load_config(write(tmp_path, dumped, "again.yaml"), env={})
    assert again == cfg
    assert config_to_dict(cfg)["control"]["mode"] == "0o640"
    assert json.dumps(config_to_dict(cfg))  # plain data, printable as JSON too


def test_diff_reloadable_separates_live_and_refused_keys(tmp_path: Path) -> None:
    """Live keys (level, allowed ids, ticker rate, status interval) are split from the rest."""
    old = load_text(tmp_path, "writer: {source: {rate: 1}}\n")
    new = load_config(
        write(
            tmp_path,
            """
        logging: {level: debug}
        control: {allowed_users: [12], allowed_groups: [], max_message: 4096}
        writer: {source: {rate: 50}, status_interval: 3}
        segment: {capacity: 8}
    """,
            "new.yaml",
        ),
        env={},
    )
    live, refused = diff_reloadable(old, new)
    assert live == (
        "control.allowed_groups",
        "control.allowed_users",
        "logging.level",
        "writer.source.rate",
        "writer.status_interval",
    )
    assert refused == ("control.max_message", "segment.capacity")
    assert diff_reloadable(old, old) == ((), ())


def test_diff_reloadable_refuses_a_source_type_change(tmp_path: Path) -> None:
    """Changing the source type (and so its rate) needs a restart."""
    old = load_text(tmp_path, "")
    new = load_config(write(tmp_path, "writer: {source: {type: stdin}}\n", "n.yaml"), env={})
    live, refused = diff_reloadable(old, new)
    assert live == ()
    assert "writer.source.type" in refused and "writer.source.rate" in refused


def test_diff_reloadable_names_reader_instance_keys(tmp_path: Path) -> None:
    """A new reader instance shows up as its own dotted keys among the refused changes."""
    old = load_text(tmp_path, "")
    new = load_config(
        write(tmp_path, "reader: {instances: {'5': {start: oldest}}}\n", "n.yaml"), env={}
    )
    live, refused = diff_reloadable(old, new)
    assert live == ()
    assert "reader.instances.5.start" in refused


def test_diff_reloadable_refuses_a_topic_map_change_as_one_key(tmp_path: Path) -> None:
    """Adding, renaming or renumbering topics is one refused key, segment.topics."""
    old = load_text(tmp_path, "segment: {topics: {ticks: 0}}\n")
    for i, changed in enumerate(["{ticks: 1}", "{tick: 0}", "{ticks: 0, frames: 1}", "{}"]):
        text = f"segment: {{topics: {changed}}}\n"
        new = load_config(write(tmp_path, text, f"n{i}.yaml"), env={})
        assert diff_reloadable(old, new) == ((), ("segment.topics",)), changed
