"""Every exception shmd raises on purpose.

Messages read "Failed to X since Y" and name the values involved, so that a
user can act on them without reading code.  Daemons and the CLI catch
:class:`ShmdError` at the top and print its message: a user mistake never
produces a traceback.
"""

from __future__ import annotations


class ShmdError(Exception):
    """Base class of every error shmd raises on purpose."""


class SysCallError(ShmdError, OSError):
    """A libc call failed with an errno that no more specific class covers."""

    def __init__(self, errno: int, message: str) -> None:
        OSError.__init__(self, errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SegmentError(ShmdError):
    """The shared-memory segment cannot be created, opened or used."""


class SegmentNotFound(SegmentError):
    """No segment of that name exists (the writer is not running, or it unlinked it)."""


class SegmentExists(SegmentError):
    """A segment of that name already exists and creating it exclusively failed."""


class SegmentLayoutError(SegmentError):
    """An existing segment's header is not one this version can read."""


class GeometryError(ShmdError, ValueError):
    """Capacity, slot size or reader count are impossible."""


class PayloadTooLarge(ShmdError, ValueError):
    """A record does not fit into one slot."""


class TopicError(ShmdError, ValueError):
    """A topic id outside 0..63."""


class UnknownTopic(TopicError):
    """A topic name the bus's topic map (``segment.topics``) does not hold.

    ``name`` is the name asked for, ``known`` the names the map holds.
    """

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        self.name = name
        self.known = known
        has = f"this bus has: {', '.join(known)}" if known else "this bus names no topics"
        super().__init__(f"unknown topic {name!r} ({has})")


class MutexError(ShmdError):
    """The shared mutex cannot be used."""


class MutexNotWritable(MutexError):
    """The mutex lives in memory mapped read-only; locking it would crash."""


class MutexUnrecoverable(MutexError):
    """The mutex was left inconsistent by a dead owner and can never be locked again."""


class ReaderTableFull(ShmdError):
    """Every entry of the reader table is taken."""


class ReaderEvicted(ShmdError):
    """The writer evicted this reader (it held the bus up under the block policy)."""


class WriterGone(ShmdError):
    """The writer of a segment is no longer running (and, for a client, none came back)."""


class ConnectError(ShmdError):
    """A client could not join the bus (:func:`shmd.connect`)."""


class BusUnavailable(ConnectError):
    """No writer answered on the control socket: it does not exist, or nothing listens."""


class NotAdmitted(ConnectError):
    """This user may not join the bus: the socket's permissions, or the writer's admission."""


class Refused(ConnectError):
    """The writer refused the Hello for another reason (a name in use, a full table, ...)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        #: The Refuse's code, lower case (``duplicate_instance``, ``table_full``, ...).
        self.code = code


class SegmentClosed(ShmdError, ValueError):
    """An operation on a publisher or subscriber that was already closed."""
