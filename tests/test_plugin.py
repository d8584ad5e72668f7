"""Tests of shmd.daemons.plugin: loading a configured ``package.module:callable``."""

from __future__ import annotations

import os.path

import pytest

from shmd.daemons.plugin import load_callable
from shmd.daemons.sinks import SinkError
from shmd.daemons.sources import SourceError


def test_load_callable_imports_the_module_and_walks_the_attributes() -> None:
    """A dotted attribute path after the colon is followed."""
    assert load_callable("os:path.join", SourceError) is os.path.join


def test_load_callable_raises_the_callers_error() -> None:
    """A missing module or a non-callable raises the error class the caller passed."""
    with pytest.raises(SinkError, match=r"Failed to load 'shmd_no:f' since ModuleNotFoundError"):
        load_callable("shmd_no:f", SinkError)
    with pytest.raises(SourceError, match=r"Failed to use 'os:sep' since it is not callable"):
        load_callable("os:sep", SourceError)
