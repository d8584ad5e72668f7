"""shmd: a shared-memory broadcast bus for Linux.

One writer publishes fixed-size-slot records into a POSIX shared-memory
segment; any number of readers, each woken through its own eventfd, read
every record in order.  This package is the library the daemons
(``shm-writer``, ``shm-reader``) and ``shmctl`` are built on.

Its layers, each importing only those below it (tests/test_layers.py
checks): ``shmd._sys`` (libc, fds, epoll), ``shmd.bus`` (the segment, its
writer and readers), ``shmd.control`` (the control socket's framing and
messages), ``shmd.client`` (:func:`connect`: any program's subscription to a
running writer), ``shmd.config`` (the YAML file), ``shmd.daemons`` (``shm-writer``,
``shm-reader``, their sources, sinks and logging), and ``shmd.cli``
(``shmctl``) on top.  :mod:`shmd.errors` is below them all.
"""

from shmd.bus.layout import ALL_TOPICS, Geometry, Policy
from shmd.bus.publisher import Publisher, Reservation
from shmd.bus.subscriber import Record, Subscriber
from shmd.bus.wait import WaitStrategy
from shmd.client import Subscription, connect
from shmd.errors import BusUnavailable, ConnectError, NotAdmitted, ShmdError, WriterGone

__all__ = [
    "ALL_TOPICS",
    "BusUnavailable",
    "ConnectError",
    "Geometry",
    "NotAdmitted",
    "Policy",
    "Publisher",
    "Record",
    "Reservation",
    "ShmdError",
    "Subscriber",
    "Subscription",
    "WaitStrategy",
    "WriterGone",
    "connect",
]
__version__ = "0.1.0"
