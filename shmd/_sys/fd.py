"""Owner objects for raw file descriptors.

Every raw fd in shmd has exactly one owner.  The owner sets its field to -1
*before* calling close(2): if close raises (EINTR, EIO), the number may
already be reused by another open in this process, and closing it a second
time would close somebody else's file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from types import TracebackType
from typing import Self


class OwnedFd:
    """The single owner of one raw fd; closing sets the field to -1 first."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"Failed to own fd {fd} since it is negative")
        self._fd = fd

    @classmethod
    def dup(cls, fd: int) -> OwnedFd:
        """Own a close-on-exec duplicate of ``fd`` (the caller keeps ``fd``)."""
        # os.dup() makes the copy non-inheritable (F_DUPFD_CLOEXEC) since 3.4.
        return cls(os.dup(fd))

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Failed to use the fd since it is already closed or detached")
        return self._fd

    def detach(self) -> int:
        """Give up ownership: the caller now owns (and must close) the raw fd."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd; closing twice is harmless."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped owner would leak its fd: close it, loudly, like io does.
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})" if self._fd >= 0 else "OwnedFd(closed)"


def close_all(fds: Iterable[OwnedFd]) -> None:
    """Close every owner in ``fds``, even when one close fails (first error re-raised)."""
    first: OSError | None = None
    for fd in fds:
        try:
            fd.close()
        except OSError as exc:
            first = first or exc
    if first is not None:
        raise first
