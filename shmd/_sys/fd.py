"""Owner objects for raw file descriptors.

Every raw fd in shmd has exactly one owner.  The owner sets its field to -1
*before* calling close(2): if close raises (EINTR, EIO), the number may
already be reused by another open in this process, and closing it a second
time would close somebody else's file.
"""

from __future__ import annotations

import os
from types import TracebackType


class OwnedFd:
    """Owns one file descriptor until :meth:`close` or :meth:`detach`."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"Failed to own file descriptor {fd} since it is negative")
        self._fd = fd

    def fileno(self) -> int:
        """The fd; ValueError once closed or detached."""
        if self._fd < 0:
            raise ValueError("Failed to use file descriptor since it was already closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once closed or detached."""
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership and return the fd; the caller now owns it."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd; idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A leak is a bug, but leaking the fd for the process's lifetime is
        # worse than closing it late.
        if self._fd >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"
