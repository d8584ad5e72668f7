"""Facts about other processes."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists in our pid namespace.

    kill(pid, 0) checks without signalling: ESRCH means gone, EPERM means it
    exists but belongs to someone else.  (A pid can be reused; callers use
    this for stale-state decisions that a reused pid only delays.)
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
