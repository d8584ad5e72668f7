"""Printing and comparing: the settings as plain data, and what a reload (SIGHUP) applies live.

docs/CONFIGURATION.md's "reload" column is :data:`LIVE_KEYS` in prose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shmd.config.model import Config, TickerSourceConfig
from shmd.config.schema import to_dict

LIVE_KEYS = frozenset(
    {
        "logging.level",
        "control.allowed_users",
        "control.allowed_groups",
        "writer.source.rate",
        "writer.status_interval",
        "writer.max_durable_grace",
    }
)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective settings as plain data in the file's own schema.

    Dumped as YAML it loads back into an equal Config; reader instances are
    shown with the defaults merged in.
    """
    return to_dict(cfg)


#: Mappings compared whole: a change anywhere in them is one change of this key.
_WHOLE = frozenset({"segment.topics"})


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in _WHOLE:
            # An empty mapping (no reader instances) contributes no key.
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_reloadable(old: Config, new: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the changes from ``old`` to ``new`` into (live, refused) dotted keys.

    Live keys a running writer applies on reload; refused ones need a restart
    (reader.* keys: a restart of the readers concerned).  ``writer.source.rate``
    is live only while the source stays a ticker.
    """
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    both_tickers = isinstance(old.writer.source, TickerSourceConfig) and isinstance(
        new.writer.source, TickerSourceConfig
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
