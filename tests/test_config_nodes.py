"""Tests of shmd.config.nodes: broken YAML is a ConfigError with its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shmd.config import ConfigError, load_config


def error_for(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "shmd.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    return info.value


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("segment:\n  capacity: [1\n", 3),
        ("segment:\n\tcapacity: 4\n", 2),
        ("a: 1\n---\nb: 2\n", 2),
        ("x: !!python/object:os.system 1\n", 1),
        ('segment:\n  name: "unterminated\n', 3),
    ],
)
def test_yaml_syntax_errors_carry_their_line(tmp_path: Path, text: str, line: int) -> None:
    """Broken YAML (and unsafe tags, several documents) is a ConfigError with its line."""
    err = error_for(tmp_path, text)
    assert err.line == line, str(err)
    assert err.message.startswith("Failed to parse YAML since "), str(err)


def test_root_must_be_a_mapping(tmp_path: Path) -> None:
    """A file whose top level is not a mapping is rejected."""
    err = error_for(tmp_path, "- segment\n")
    assert "must be a mapping of sections (got a list)" in str(err)
