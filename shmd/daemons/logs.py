"""Structured logging for shmd: structlog, rendered for journald, a console or JSON lines.

Every daemon calls :func:`configure_logging` once its configuration is loaded
and logs named events (the :data:`EVENTS` contract, documented with their
fields in docs/JOURNAL.md) with key/value context::

    log = get_logger()
    log.info(READER_ATTACHED, reader="1", pid=123, generation=7)

Targets:

* ``journal``: each event becomes one journal entry whose fields are the event
  dict's keys upper-cased with a ``SHMD_`` prefix (``generation`` ->
  ``SHMD_GENERATION``, the event name -> ``SHMD_EVENT``), plus ``SHMD_ROLE``,
  ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``
  and a readable ``MESSAGE`` ("reader_attached reader=1 pid=123 generation=7").
  :mod:`shmd.daemons.journal` computes the fields; a *sender* callable
  delivers them (:func:`send_to_journal` by default, any callable in tests).
* ``console``: structlog's ConsoleRenderer on stderr, coloured on a tty only.
* ``json``: one JSON object per line on stderr.
* ``auto``: journal when stderr is the stream journald gave us
  (``JOURNAL_STREAM`` matches stderr's ``st_dev:st_ino``), else console on a
  tty, else json.

Only structlog APIs present in 22.3 (Debian 12) are used.  The level is
enforced by a processor, not by structlog's filtering wrapper class, so
:func:`set_level` changes it for every logger at once, including loggers
already bound (a reload applies ``logging.level`` live).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from shmd.daemons.journal import (
    ROLES,
    JournalLogger,
    JournalSender,
    journal_field_name,
    journal_fields,
    render_message,
    send_to_journal,
)

__all__ = [
    "EVENTS",
    "LEVELS",
    "READER_EVENTS",
    "ROLES",
    "WRITER_EVENTS",
    "JournalLogger",
    "JournalSender",
    "configure_logging",
    "get_logger",
    "is_configured",
    "journal_field_name",
    "journal_fields",
    "render_message",
    "reset_logging",
    "resolve_target",
    "send_to_journal",
    "set_level",
]

# --------------------------------------------------------------------------
# The event contract (docs/JOURNAL.md describes each one and its fields;
# tests/test_logs.py checks that every event name logged in shmd/ is here
# and documented, with the fields the code logs)
# --------------------------------------------------------------------------

# either daemon (in both WRITER_EVENTS and READER_EVENTS)
CONFIG_LOADED = "config_loaded"
CONFIG_WARNING = "config_warning"
CONFIG_ERROR = "config_error"
# writer (shm-writer, and shmd.Publisher / the sources inside it)
SEGMENT_CREATED = "segment_created"
SEGMENT_ADOPTED = "segment_adopted"
SEGMENT_STALE = "segment_stale"
SEGMENT_INVALID = "segment_invalid"
SEGMENT_UNLINKED = "segment_unlinked"
LISTENER_READY = "listener_ready"
READERS_RESTORED = "readers_restored"
READERS_WOKEN = "readers_woken"
READER_CONNECTED = "reader_connected"
READER_REFUSED = "reader_refused"
READER_ATTACHED = "reader_attached"
READER_DETACHED = "reader_detached"
READER_LOST = "reader_lost"
READER_DORMANT = "reader_dormant"
READER_ERROR = "reader_error"
READER_EVICTED = "reader_evicted"
EVENTFD_TAMPERED = "eventfd_tampered"
OVERRUN = "overrun"
RECORD_REFUSED = "record_refused"
PUBLISHER_DONE = "publisher_done"
ACCEPT_FAILED = "accept_failed"
SOURCE_FINISHED = "source_finished"
SOURCE_FAILED = "source_failed"
FRAME_REFUSED = "frame_refused"
FRAME_TRUNCATED = "frame_truncated"
MUTEX_STALLED = "mutex_stalled"
MUTEX_RECOVERED = "mutex_recovered"
RELOAD = "reload"
RELOAD_REFUSED = "reload_refused"
ACTIVE_CLEARED = "active_cleared"
SHUTDOWN_GRACE_EXPIRED = "shutdown_grace_expired"
SHUTDOWN_FORCED = "shutdown_forced"
SHUTDOWN_COMPLETE = "shutdown_complete"
START_FAILED = "start_failed"
CRASHED = "crashed"
# reader (shm-reader@N, and shmctl tail, and the sinks inside them)
ATTACHED = "attached"
REFUSED = "refused"
GENERATION_CHANGED = "generation_changed"
STATS = "stats"
RECORDS = "records"
WRITER_DETACH = "writer_detach"
WRITER_INACTIVE = "writer_inactive"
DRAINED = "drained"
WRITER_LOST = "writer_lost"
AWAITING_WRITER = "awaiting_writer"
RESUME_FAILED = "resume_failed"
RELOAD_IGNORED = "reload_ignored"
SINK_FAILED = "sink_failed"
SINK_CHILD_FAILED = "sink_child_failed"
EXITING = "exiting"
# the zenoh sink (a reader) and source (the writer): docs/BRIDGE.md
BRIDGE_SENDING = "bridge_sending"
BRIDGE_SENT = "bridge_sent"
BRIDGE_RECEIVING = "bridge_receiving"
BRIDGE_RECEIVED = "bridge_received"
BRIDGE_JOINED = "bridge_joined"
BRIDGE_PEER_RESTARTED = "bridge_peer_restarted"
BRIDGE_GENERATION_CHANGED = "bridge_generation_changed"
BRIDGE_LOST = "bridge_lost"
BRIDGE_REFUSED = "bridge_refused"
BRIDGE_STATUS_FAILED = "bridge_status_failed"
BRIDGE_DRAIN_STUCK = "bridge_drain_stuck"
# either role (shmd.Publisher and shmd.Subscriber, sd_notify in both daemons)
MUTEX_OWNER_DIED = "mutex_owner_died"
SD_NOTIFY_FAILED = "sd_notify_failed"
SIGNAL_IGNORED = "signal_ignored"

WRITER_EVENTS = frozenset(
    {
        CONFIG_LOADED,
        CONFIG_WARNING,
        CONFIG_ERROR,
        SEGMENT_CREATED,
        SEGMENT_ADOPTED,
        SEGMENT_STALE,
        SEGMENT_INVALID,
        SEGMENT_UNLINKED,
        LISTENER_READY,
        READERS_RESTORED,
        READERS_WOKEN,
        READER_CONNECTED,
        READER_REFUSED,
        READER_ATTACHED,
        READER_DETACHED,
        READER_LOST,
        READER_DORMANT,
        READER_ERROR,
        READER_EVICTED,
        EVENTFD_TAMPERED,
        OVERRUN,
        RECORD_REFUSED,
        PUBLISHER_DONE,
        ACCEPT_FAILED,
        SOURCE_FINISHED,
        SOURCE_FAILED,
        FRAME_REFUSED,
        FRAME_TRUNCATED,
        MUTEX_STALLED,
        MUTEX_RECOVERED,
        RELOAD,
        RELOAD_REFUSED,
        ACTIVE_CLEARED,
        SHUTDOWN_GRACE_EXPIRED,
        SHUTDOWN_FORCED,
        SHUTDOWN_COMPLETE,
        START_FAILED,
        CRASHED,
        BRIDGE_RECEIVING,
        BRIDGE_RECEIVED,
        BRIDGE_JOINED,
        BRIDGE_PEER_RESTARTED,
        BRIDGE_GENERATION_CHANGED,
        BRIDGE_LOST,
        BRIDGE_REFUSED,
        BRIDGE_STATUS_FAILED,
        BRIDGE_DRAIN_STUCK,
    }
)
READER_EVENTS = frozenset(
    {
        CONFIG_LOADED,
        CONFIG_WARNING,
        CONFIG_ERROR,
        ATTACHED,
        REFUSED,
        GENERATION_CHANGED,
        STATS,
        RECORDS,
        WRITER_DETACH,
        WRITER_INACTIVE,
        DRAINED,
        WRITER_LOST,
        AWAITING_WRITER,
        RESUME_FAILED,
        RELOAD_IGNORED,
        SINK_FAILED,
        SINK_CHILD_FAILED,
        EXITING,
        BRIDGE_SENDING,
        BRIDGE_SENT,
    }
)
COMMON_EVENTS = frozenset({MUTEX_OWNER_DIED, SD_NOTIFY_FAILED, SIGNAL_IGNORED})
EVENTS = WRITER_EVENTS | READER_EVENTS | COMMON_EVENTS

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
TARGETS = ("auto", "journal", "console", "json")
# Log method name -> level name; anything unlisted (msg, log...) counts as info.
_METHOD_LEVEL: Mapping[str, str] = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "err": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
    "failure": "error",
}


class _State:
    configured = False
    min_level = logging.INFO


_state = _State()


# --------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------


def _filter_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    if LEVELS[_METHOD_LEVEL.get(method_name, "info")] < _state.min_level:
        raise structlog.DropEvent
    return event_dict


def _add_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict["level"] = _METHOD_LEVEL.get(method_name, "info")
    return event_dict


def _static(role: str, instance: str | None) -> Processor:
    def add(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("role", role)
        if instance is not None:
            event_dict.setdefault("instance", instance)
        return event_dict

    return add


_SKIP_MODULES = ("structlog", __name__)


def _add_code_location(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # The caller is the first frame outside structlog and this module; a
    # cheap walk (no source lines read, unlike inspect.stack()).
    frame = sys._getframe(1)
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).startswith(
        _SKIP_MODULES
    ):
        frame = frame.f_back
    event_dict["code_file"] = frame.f_code.co_filename
    event_dict["code_line"] = frame.f_lineno
    event_dict["code_func"] = frame.f_code.co_name
    return event_dict


def _render_journal(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> dict[str, str]:
    # A dict returned by the last processor becomes the logger method's
    # keyword arguments: JournalLogger.msg(**fields).
    return journal_fields(event_dict)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def resolve_target(
    target: str, *, stream: TextIO | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Turn ``auto`` into journal, console or json for ``stream`` (default stderr)."""
    if target not in TARGETS:
        raise ValueError(
            f"Failed to choose a log target since {target!r} is not one of {', '.join(TARGETS)}"
        )
    if target != "auto":
        return target
    out = sys.stderr if stream is None else stream
    environ = os.environ if env is None else env
    journal_stream = environ.get("JOURNAL_STREAM", "")
    try:
        fd = out.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        fd = -1
    if journal_stream and fd >= 0:
        dev, _, ino = journal_stream.partition(":")
        try:
            st = os.fstat(fd)
            # systemd.exec(5): JOURNAL_STREAM is "device:inode" of the stream
            # journald handed us; if stderr was redirected since, it no longer
            # matches and we must not log to the journal twice.
            if (st.st_dev, st.st_ino) == (int(dev), int(ino)):
                return "journal"
        except (OSError, ValueError):
            pass
    return "console" if out.isatty() else "json"


def configure_logging(
    role: str,
    *,
    level: str,
    target: str,
    instance: str | None = None,
    stream: TextIO | None = None,
    sender: JournalSender | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Configure structlog for this process and return the target actually used.

    ``role`` is writer, reader or ctl; ``instance`` the reader's instance name
    (bound to every event as ``instance``).  ``stream`` (console/json, default
    stderr), ``sender`` (journal, default :func:`send_to_journal`) and ``env``
    (for ``auto``) exist so tests can watch the output.
    """
    if role not in ROLES:
        raise ValueError(
            f"Failed to configure logging since role {role!r} is not one of {', '.join(ROLES)}"
        )
    chosen = resolve_target(target, stream=stream, env=env)
    set_level(level)
    out = sys.stderr if stream is None else stream
    head: list[Processor] = [
        _filter_level,
        structlog.contextvars.merge_contextvars,
        _static(role, instance),
        _add_level,
    ]
    # Console and json lines go out with WriteLogger, which writes the line
    # and its newline in one write() and flushes: PrintLogger's print()
    # writes them separately, and under PYTHONUNBUFFERED each is a write(2)
    # of its own, so processes sharing a terminal or pipe (shmctl demo)
    # interleave mid-line.
    factory: Callable[..., WrappedLogger]
    processors: list[Processor]
    if chosen == "journal":
        journal_logger = JournalLogger(sender or send_to_journal)
        processors = [
            *head,
            _add_code_location,
            structlog.processors.format_exc_info,
            _render_journal,
        ]

        def factory(*args: Any) -> WrappedLogger:
            return journal_logger

    elif chosen == "console":
        processors = [
            *head,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=out.isatty()),
        ]
        factory = structlog.WriteLoggerFactory(file=out)
    else:
        processors = [
            *head,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
        factory = structlog.WriteLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        # Level filtering happens in _filter_level so set_level() reaches
        # loggers that are already bound; this wrapper lets everything pass.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        context_class=dict,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _state.configured = True
    return chosen


def set_level(level: str) -> None:
    """Change the minimum level of every logger at once (live reload)."""
    if level not in LEVELS:
        raise ValueError(
            f"Failed to set the log level since {level!r} is not one of {', '.join(LEVELS)}"
        )
    _state.min_level = LEVELS[level]


def is_configured() -> bool:
    """Whether :func:`configure_logging` ran in this process."""
    return _state.configured


def get_logger(**bind: Any) -> FilteringBoundLogger:
    """A structlog logger with ``bind`` as its context."""
    logger: FilteringBoundLogger = structlog.get_logger().bind(**bind)
    return logger


def reset_logging() -> None:
    """Forget the configuration: structlog back to its own defaults (for tests)."""
    structlog.reset_defaults()
    _state.configured = False
    _state.min_level = logging.INFO
