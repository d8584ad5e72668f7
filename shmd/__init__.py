"""shmd: a shared-memory broadcast bus for Linux.

One writer publishes fixed-size-slot records into a POSIX shared-memory
segment; any number of readers, each woken through its own eventfd, read
every record in order.  This package is the library the daemons
(``shm-writer``, ``shm-reader``) and ``shmctl`` are built on.
"""

from shmd.errors import ShmdError
from shmd.layout import ALL_TOPICS, Geometry, Policy
from shmd.publisher import Publisher, Reservation
from shmd.subscriber import Record, Subscriber

__all__ = [
    "ALL_TOPICS",
    "Geometry",
    "Policy",
    "Publisher",
    "Record",
    "Reservation",
    "ShmdError",
    "Subscriber",
]
__version__ = "0.1.0"
