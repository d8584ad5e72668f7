"""What both daemons share: arguments, configuration, logging, signals, exits.

Exit statuses follow systemd.exec(5), so that unit states and restart
policies mean something: 0 clean, 1 failure (``Restart=on-failure`` brings
the daemon back), 77 not permitted, 78 configuration error (the units set
``RestartPreventExitStatus=78``: a broken file does not heal by restarting).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import NoReturn, TextIO

from structlog.typing import FilteringBoundLogger

from shmd._sys.proc import pid_alive
from shmd._sys.reactor import Reactor, SignalWakeup
from shmd.config import (
    DEFAULT_PATH,
    ENV_VAR,
    EXIT_CONFIG,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
)
from shmd.daemons import logs
from shmd.errors import ShmdError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOPERMISSION = 77
#: What both daemons act on: stop (SIGTERM, SIGINT) and reload (SIGHUP).
DAEMON_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
__all__ = [
    "DAEMON_SIGNALS",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_NOPERMISSION",
    "EXIT_OK",
    "EXIT_USAGE",
    "SignalDispatch",
    "pid_alive",
]


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every daemon has."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default: ${ENV_VAR}, else {DEFAULT_PATH}; "
        "built-in defaults when the default file is missing)",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective settings, exit",
    )
    p.add_argument(
        "--log-target",
        choices=logs.TARGETS,
        default=None,
        help="override logging.target (auto: journal under systemd, "
        "console on a terminal, else JSON lines)",
    )
    return p


def exit_on_config_error(err: ConfigError, *, role: str, instance: str | None = None) -> NoReturn:
    """Log ``err`` as one ``config_error`` event and exit with :data:`EXIT_CONFIG`.

    If logging is not configured yet (the usual case: its settings live in
    the file that failed) it is configured first with level info and target
    auto, so under systemd the line lands in the journal with its fields.
    """
    if not logs.is_configured():
        logs.configure_logging(role, level="info", target="auto", instance=instance)
    logs.get_logger().error(
        logs.CONFIG_ERROR, path=err.path, line=err.line, key=err.key, error=str(err)
    )
    raise SystemExit(EXIT_CONFIG)


def load_config_or_exit(
    path: str | os.PathLike[str] | None = None,
    *,
    role: str,
    instance: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """:func:`load_config`, turning a :class:`ConfigError` into exit 78 (the daemons' start)."""
    try:
        return load_config(path, env=env)
    except ConfigError as err:
        exit_on_config_error(err, role=role, instance=instance)


def load_or_exit(args: argparse.Namespace, role: str, instance: str | None = None) -> Config:
    """Load the configuration; on error log one ``config_error`` line and exit 78.

    A zenoh sink (of this reader ``instance``) or source (of the writer) on a
    machine without the optional package is such an error too.
    """
    cfg = load_config_or_exit(args.config, role=role, instance=instance)
    if args.check_config:
        role_of, instance_of = None, None  # --check-config checks every section
    else:
        role_of, instance_of = role, instance
    missing = zenoh_missing(cfg, role_of, instance_of)
    if missing is not None:
        exit_on_config_error(missing, role=role, instance=instance)
    return cfg


def zenoh_missing(cfg: Config, role: str | None, instance: str | None) -> ConfigError | None:
    """The error when ``cfg`` names zenoh for ``role`` but it is not installed, else None."""
    from shmd.daemons.zenohio import missing_zenoh  # noqa: PLC0415 - it imports zenoh

    found = missing_zenoh(cfg, role, instance)
    if found is None:
        return None
    key, message = found
    return ConfigError(message, path=cfg.source_path, key=key)


def check_config(cfg: Config, out: TextIO | None = None) -> int:
    """``--check-config``: print the effective settings as YAML.

    Raises :class:`ConfigError` when a zenoh sink or source is named on a
    machine without the package (one line saying how to install it).
    """
    import yaml  # noqa: PLC0415 - only this path prints YAML

    missing = zenoh_missing(cfg, None, None)
    if missing is not None:
        raise missing
    stream = sys.stdout if out is None else out
    where = cfg.source_path or "built-in defaults"
    print(f"# configuration OK: {where}", file=stream)
    for w in cfg.warnings:
        print(f"# warning: {w}", file=stream)
    yaml.safe_dump(config_to_dict(cfg), stream, sort_keys=False)
    return EXIT_OK


def setup_logging(
    cfg: Config, args: argparse.Namespace, role: str, instance: str | None = None
) -> FilteringBoundLogger:
    """Configure logging from the configuration (and ``--log-target``)."""
    target = args.log_target or cfg.logging.target
    logs.configure_logging(role, level=cfg.logging.level, target=target, instance=instance)
    log = logs.get_logger()
    path = cfg.source_path or "built-in defaults"
    # The fields docs/JOURNAL.md promises for these two events.
    log.info(
        logs.CONFIG_LOADED,
        path=path,
        segment=cfg.segment.name,
        socket=cfg.control.socket,
        policy=cfg.segment.policy,
    )
    for w in cfg.warnings:
        log.warning(logs.CONFIG_WARNING, path=path, warning=w)
    return log


def fail(
    log: FilteringBoundLogger,
    event: str,
    err: BaseException,
    status: int = EXIT_FAILURE,
    **fields: object,
) -> NoReturn:
    """Log a fatal error as one event (no traceback for a known error) and exit."""
    if isinstance(err, ShmdError | OSError):
        log.error(event, error=str(err), **fields)
    else:  # a bug: keep the traceback for the journal
        log.exception(event, error=str(err), **fields)
    raise SystemExit(status)


class SignalDispatch:
    """A daemon's signals, gunicorn's arbiter style: handlers only queue, the loop dispatches.

    The C-level handler only writes the signal's number to the
    :class:`~shmd._sys.reactor.SignalWakeup` pipe; on the loop, signal
    ``SIGNAME`` calls ``owner.handle_signame()``.  A signal the owner has no
    method for is logged as ``signal_ignored`` and otherwise ignored.
    """

    def __init__(
        self,
        reactor: Reactor,
        owner: object,
        log: FilteringBoundLogger,
        signals: Iterable[signal.Signals] = DAEMON_SIGNALS,
    ) -> None:
        self._owner = owner
        self._log = log
        self._wakeup = SignalWakeup(reactor, list(signals), self.dispatch)

    def dispatch(self, signum: signal.Signals) -> None:
        """Call the owner's ``handle_<name>`` for ``signum``, or log that there is none."""
        handler: Callable[[], None] | None = getattr(
            self._owner, f"handle_{signum.name.lower()}", None
        )
        if handler is None:
            self._log.warning(logs.SIGNAL_IGNORED, signal=signum.name)
            return
        handler()

    def close(self) -> None:
        """Restore the previous handlers; idempotent."""
        self._wakeup.close()
