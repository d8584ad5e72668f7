"""The bus itself: one segment in shared memory, its writer and its readers.

Layer 1, above ``shmd._sys``: nothing here knows about sockets, configuration
files, logging set-up or systemd.

* :mod:`~shmd.bus.layout`: the segment's bytes (header, reader table, slots);
* :mod:`~shmd.bus.ring`: ring arithmetic and record encoding (pure);
* :mod:`~shmd.bus.segment`: one mapped segment: fd, mappings, mutex, semaphore;
* :mod:`~shmd.bus.publisher` and :mod:`~shmd.bus.subscriber`: the writer's
  and a reader's side;
* :mod:`~shmd.bus.loop`: a reader's drain/sleep/wake loop, on epoll or asyncio.
"""
