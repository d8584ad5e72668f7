"""Loading the user's Python code named in the configuration (``package.module:callable``).

Shared by the ``python`` source and the ``python`` sink; each passes the
error it raises, so a failure reads as that source's or sink's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from shmd.errors import ShmdError


def load_callable(spec: str, error: type[ShmdError]) -> Callable[..., object]:
    """Import ``package.module:callable``; ``error`` with a clear message if that fails."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # any import-time error is the user's to see
        raise error(f"Failed to load {spec!r} since {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise error(f"Failed to use {spec!r} since it is not callable")
    return obj
