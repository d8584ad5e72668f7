"""Tests of shmd.config.schema: keys, choices, tags and dumps come from the dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import pytest

from shmd.bus import layout
from shmd.config import (
    ConfigError,
    SegmentConfig,
    SinkConfig,
    SourceConfig,
    TickerSourceConfig,
    WriterConfig,
    config_to_dict,
    default_config,
)
from shmd.config.nodes import Builder, Node
from shmd.config.schema import file_fields, members, parse, setting, spec, tag, to_dict


@dataclass(frozen=True)
class Demo:
    name: str = dataclasses.field(metadata=spec())
    count: int = setting(3, lo=1, hi=5)
    mode: Literal["a", "b"] = "a"


def node(value: dict[str, object]) -> Node:
    return Node({k: Node(v, k, i + 2) for i, (k, v) in enumerate(value.items())}, "", 1)


def test_a_dataclass_alone_defines_keys_bounds_choices_and_required_fields() -> None:
    """Any dataclass parses: fields are the keys, a Literal the choices, metadata the bounds."""
    b = Builder(None, "demo.yaml")
    assert parse(b, Demo, node({"name": "x"}), "") == Demo(name="x")
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": "x", "count": 9}, "count: must be between 1 and 5 (got 9)"),
        ({"name": "x", "mode": "c"}, "mode: must be one of a | b (got string 'c')"),
        ({"count": 2}, "demo.yaml:1: name is required here"),
        ({"name": "x", "cuont": 2}, "(known keys: name, count, mode); did you mean 'count'?"),
    ]
    for given, text in cases:
        with pytest.raises(ConfigError) as info:
            parse(b, Demo, node(given), "")
        assert text in str(info.value)


def test_tagged_unions_take_their_type_names_from_the_dataclasses() -> None:
    """The type: names are the members' Literal defaults; a tagged dataclass dumps type first."""
    sources = ["ticker", "fifo", "stdin", "python", "zenoh"]
    assert [tag(c) for c in members(SourceConfig)] == sources
    sinks = ["journal", "file", "stdout", "exec", "python", "zenoh"]
    assert [tag(c) for c in members(SinkConfig)] == sinks
    assert [f.name for f in file_fields(TickerSourceConfig)] == ["type", "rate", "topic"]
    assert list(to_dict(TickerSourceConfig())) == ["type", "rate", "topic"]
    assert tag(WriterConfig) is None


def test_config_to_dict_has_the_keys_of_the_file_fields() -> None:
    """Fields marked not in the file (source_path, warnings, resolved ids) are not dumped."""
    data = config_to_dict(default_config())
    assert list(data) == ["segment", "control", "writer", "reader", "logging"]
    assert "allowed_uids" not in data["control"] and "allowed_gids" not in data["control"]


def test_limits_are_the_layouts() -> None:
    """The segment's bounds are bus.layout's constants, not copies."""
    meta = {f.name: f.metadata for f in dataclasses.fields(SegmentConfig)}
    assert meta["capacity"]["hi"] == layout.MAX_CAPACITY
    assert meta["slot_size"]["lo"] == layout.RECORD_HEADER_SIZE + 8
    assert meta["slot_size"]["hi"] == layout.MAX_SLOT_SIZE
    assert meta["max_readers"]["hi"] == layout.MAX_READERS
    assert typing.get_args(typing.get_type_hints(SegmentConfig)["policy"]) == tuple(
        p.label for p in layout.Policy
    )
