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

The package's modules, each using only those before it: ``errors``
(:class:`ConfigError`), ``yaml`` (the line-keeping YAML tree), ``schema``
(reading and dumping any section from its dataclass), ``checks`` (the
configuration's own limits and special values), ``model`` (the dataclasses),
``load`` (the file, merging reader instances) and ``reload`` (printing and
comparing).
"""

from shmd.config.errors import EXIT_CONFIG, ConfigError
from shmd.config.load import DEFAULT_PATH, ENV_VAR, load_config
from shmd.config.model import (
    Config,
    ControlConfig,
    ExecSinkConfig,
    FifoSourceConfig,
    FileSinkConfig,
    JournalSinkConfig,
    LoggingConfig,
    PythonSinkConfig,
    PythonSourceConfig,
    ReaderConfig,
    ReaderSettings,
    SegmentConfig,
    SinkConfig,
    SourceConfig,
    StdinSourceConfig,
    StdoutSinkConfig,
    TickerSourceConfig,
    WriterConfig,
    ZenohSinkConfig,
    ZenohSourceConfig,
    default_config,
)
from shmd.config.reload import config_to_dict, diff_reloadable

__all__ = [
    "DEFAULT_PATH",
    "ENV_VAR",
    "EXIT_CONFIG",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ExecSinkConfig",
    "FifoSourceConfig",
    "FileSinkConfig",
    "JournalSinkConfig",
    "LoggingConfig",
    "PythonSinkConfig",
    "PythonSourceConfig",
    "ReaderConfig",
    "ReaderSettings",
    "SegmentConfig",
    "SinkConfig",
    "SourceConfig",
    "StdinSourceConfig",
    "StdoutSinkConfig",
    "TickerSourceConfig",
    "WriterConfig",
    "ZenohSinkConfig",
    "ZenohSourceConfig",
    "config_to_dict",
    "default_config",
    "diff_reloadable",
    "load_config",
]
