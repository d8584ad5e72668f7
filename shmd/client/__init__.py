"""Joining the bus from any program: :func:`connect` and :class:`Subscription`.

Layer 3, above ``shmd.bus`` and ``shmd.control``, below ``shmd.config``:
nothing here reads the configuration file, sets up logging or talks to
systemd.  The reader daemon (``shm-reader@NAME``) is built on it.

* :mod:`~shmd.client.handshake`: dial, Hello, Welcome, map the segment;
* :mod:`~shmd.client.subscription`: one reader's life on the bus, across
  writer restarts, with every way to read (iterator, batches, wait and
  read, fd and poll, asyncio).
"""

from shmd.client.handshake import DEFAULT_SOCKET, Options
from shmd.client.subscription import Subscription, connect, topic_mask

__all__ = ["DEFAULT_SOCKET", "Options", "Subscription", "connect", "topic_mask"]
