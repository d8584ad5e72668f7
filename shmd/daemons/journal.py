"""One structlog event as one journal entry: field names, values, the readable MESSAGE.

Pure functions but for :func:`send_to_journal`, which hands the fields to
journald's native socket through libsystemd.  :mod:`shmd.daemons.logs`
configures structlog to end in :class:`JournalLogger` for the ``journal``
target; docs/JOURNAL.md lists the fields a user can query.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import systemd.journal

# role -> SYSLOG_IDENTIFIER (the program name a user greps for)
ROLES: Mapping[str, str] = {"writer": "shm-writer", "reader": "shm-reader", "ctl": "shmctl"}
# syslog(3) priorities for PRIORITY=
_PRIORITY: Mapping[str, int] = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
# Keys that journal_fields maps to journald's own fields rather than SHMD_*.
_META_KEYS = frozenset(
    {"event", "level", "role", "timestamp", "exception", "code_file", "code_line", "code_func"}
)
# journald: field names of A-Z, 0-9 and _, at most 64 characters.
_FIELD_BAD = re.compile(r"[^A-Z0-9_]")
_FIELD_MAX = 64
_PREFIX = "SHMD_"

#: Delivers one entry's fields (:func:`send_to_journal`, or any callable in tests).
JournalSender = Callable[[dict[str, str]], None]


def journal_field_name(key: str) -> str:
    """``generation`` -> ``SHMD_GENERATION``; anything outside A-Z 0-9 _ becomes ``_``."""
    name = _PREFIX + _FIELD_BAD.sub("_", key.upper())
    return name[:_FIELD_MAX]


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def render_message(event_dict: Mapping[str, Any]) -> str:
    """The human line: ``event key=value ...`` (values with spaces are quoted)."""
    parts = [str(event_dict.get("event", ""))]
    for key, value in event_dict.items():
        if key in _META_KEYS:
            continue
        text = _text(value)
        if not text or _NEEDS_QUOTES.search(text):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    message = " ".join(parts)
    exception = event_dict.get("exception")
    if exception:
        message += "\n" + str(exception)
    return message


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The journal entry for one event: every field name valid for journald, every value str."""
    level = str(event_dict.get("level", "info"))
    role = str(event_dict.get("role", ""))
    fields: dict[str, str] = {
        "MESSAGE": render_message(event_dict),
        "PRIORITY": str(_PRIORITY.get(level, _PRIORITY["info"])),
        "SYSLOG_IDENTIFIER": ROLES.get(role, "shmd"),
        "SHMD_EVENT": str(event_dict.get("event", "")),
        "SHMD_ROLE": role,
    }
    for key, journal_key in (
        ("code_file", "CODE_FILE"),
        ("code_line", "CODE_LINE"),
        ("code_func", "CODE_FUNC"),
    ):
        if key in event_dict:
            fields[journal_key] = _text(event_dict[key])
    if event_dict.get("exception"):
        fields["SHMD_EXCEPTION"] = str(event_dict["exception"])
    for key, value in event_dict.items():
        if key in _META_KEYS:
            continue
        name = journal_field_name(key)
        # Two keys that sanitise alike ("a-b", "a_b") keep both values.
        suffix = 2
        base = name
        while name in fields:
            tail = f"_{suffix}"
            name = base[: _FIELD_MAX - len(tail)] + tail
            suffix += 1
        fields[name] = _text(value)
    return fields


def send_to_journal(fields: dict[str, str]) -> None:
    """Deliver one entry to journald through its native socket (libsystemd)."""
    try:
        systemd.journal.sendv(*(f"{k}={v}" for k, v in fields.items()))
    except OSError as exc:
        # libsystemd itself swallows ENOENT (no journald at all: the entry is
        # dropped silently, hence "auto" only picks the journal when systemd
        # gave us a journal stream).  Any other failure (a socket of the wrong
        # type, EMSGSIZE...) is raised and lands here: say so on stderr.
        print(
            f"Failed to send a log entry to the journal since {exc.strerror or exc}: "
            f"{fields.get('MESSAGE', '')}",
            file=sys.stderr,
            flush=True,
        )


class JournalLogger:
    """structlog's wrapped logger for the journal target: hands fields to a sender."""

    def __init__(self, sender: JournalSender) -> None:
        self.sender = sender

    def msg(self, **fields: str) -> None:
        self.sender(fields)

    debug = info = warning = warn = error = err = critical = fatal = exception = failure = log = msg
