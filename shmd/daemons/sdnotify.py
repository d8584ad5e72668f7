"""sd_notify(3) and sd_listen_fds(3) for shmd's daemons, as small typed calls.

A thin layer over python-systemd's ``systemd.daemon.notify`` (which wraps
``sd_pid_notify_with_fds``) and ``listen_fds_with_names``.  Every notify call
is a no-op returning False when ``NOTIFY_SOCKET`` is unset (not started by
systemd, or ``Type=`` without notification), so the daemons call them
unconditionally.  A failure to send (the manager went away, the socket is
gone) is logged as ``sd_notify_failed`` and returns False: losing a status
line must not take the daemon down.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence

import structlog
import systemd.daemon

from shmd.daemons.logs import SD_NOTIFY_FAILED

__all__ = [
    "listen_fds",
    "notify",
    "ready",
    "reloading",
    "remove_fds",
    "status",
    "stopping",
    "store_fds",
    "watchdog",
    "watchdog_interval",
]

# sd_notify(3), FDNAME=: at most 255 characters of printable ASCII without
# ':' (LISTEN_FDNAMES joins the names with colons).
_FDNAME_RE = re.compile(r"[\x20-\x39\x3b-\x7e]{1,255}")
UNKNOWN_FDNAME = "unknown"


def notify(*assignments: str, fds: Sequence[int] = ()) -> bool:
    """Send ``VAR=value`` lines (and ``fds`` by SCM_RIGHTS) to the service manager.

    Returns True when the message was sent, False when there is no manager to
    tell (``NOTIFY_SOCKET`` unset) or sending failed (logged).
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    for line in assignments:
        if "\n" in line or "=" not in line:
            raise ValueError(
                f"Failed to notify the service manager since {line!r} is not one VAR=value line"
            )
    state = "\n".join(assignments)
    try:
        if fds:
            return bool(systemd.daemon.notify(state, fds=list(fds)))
        # python-systemd 235 takes len() of fds: None (its own default) fails.
        return bool(systemd.daemon.notify(state))
    except OSError as exc:
        structlog.get_logger().warning(
            SD_NOTIFY_FAILED, state=state.split("\n", 1)[0], error=exc.strerror or str(exc)
        )
        return False


def _one_line(text: str) -> str:
    # The protocol is newline-separated: a newline in STATUS= would start a
    # new (bogus) assignment.
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """READY=1: start-up finished (Type=notify units leave "activating")."""
    extra = () if status_text is None else (f"STATUS={_one_line(status_text)}",)
    return notify("READY=1", *extra)


def status(text: str) -> bool:
    """STATUS=: the one line ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """WATCHDOG=1: keep-alive ping for WatchdogSec=."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """RELOADING=1 with MONOTONIC_USEC= (required by Type=notify-reload, systemd 253+).

    systemd 252 ignores MONOTONIC_USEC; it is harmless there.  Send
    :func:`ready` when the reload is done.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds (ping at least twice per it), or None if off.

    Same rules as sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive
    integer and WATCHDOG_PID, when set, must be this process.
    """
    environ = os.environ if env is None else env
    usec_text = environ.get("WATCHDOG_USEC", "")
    pid_text = environ.get("WATCHDOG_PID", "")
    if not usec_text.isdigit() or int(usec_text) <= 0:
        return None
    if pid_text and (not pid_text.isdigit() or int(pid_text) != os.getpid()):
        return None
    return int(usec_text) / 1_000_000


def _check_fdname(name: str) -> None:
    if not _FDNAME_RE.fullmatch(name):
        raise ValueError(
            f"Failed to name stored fds since {name!r} is not 1-255 printable "
            f"ASCII characters without ':'"
        )


def store_fds(name: str, fds: Sequence[int], *, poll: bool = True) -> bool:
    """FDSTORE=1 with FDNAME=: hand ``fds`` to the manager to keep across a restart.

    The manager gets duplicates; the caller still owns (and closes) its fds.
    With ``poll=False`` (FDPOLL=0) the manager does not drop them on
    POLLHUP/POLLERR.  Needs FileDescriptorStoreMax= in the unit.
    """
    _check_fdname(name)
    if not fds:
        raise ValueError(f"Failed to store fds named {name!r} since none were given")
    extra = () if poll else ("FDPOLL=0",)
    return notify("FDSTORE=1", f"FDNAME={name}", *extra, fds=fds)


def remove_fds(name: str) -> bool:
    """FDSTOREREMOVE=1 with FDNAME=: drop every stored fd of that name."""
    _check_fdname(name)
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """The fds passed by socket activation or the fd store, grouped by name.

    Fds without a name (no FileDescriptorName=/FDNAME=) are under "unknown".
    They start at 3, and libsystemd sets close-on-exec on them.  With
    ``unset_environment`` LISTEN_* are removed so children do not see them.
    """
    grouped: dict[str, list[int]] = {}
    named: dict[int, str] = systemd.daemon.listen_fds_with_names(unset_environment)
    if unset_environment:
        # libsystemd unsetenv()s LISTEN_* in the C environment only; Python's
        # os.environ is a copy taken at start-up and would still hand them to
        # every subprocess we spawn (which would then take our fds for its own).
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    for fd in sorted(named):
        grouped.setdefault(named[fd] or UNKNOWN_FDNAME, []).append(fd)
    return grouped
