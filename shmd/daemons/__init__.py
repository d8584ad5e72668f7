"""``shm-writer`` and ``shm-reader``: the bus, the control path and the
configuration put to work under systemd.

Layer 4, the top but for ``shmd.cli``: :mod:`~shmd.daemons.writer` (with
its control server, :mod:`~shmd.daemons.server`, and fd store,
:mod:`~shmd.daemons.fdstore`) and :mod:`~shmd.daemons.reader` (a
:class:`shmd.client.Subscription` with a sink), with what they share at start-up,
on signals and at exit (:mod:`~shmd.daemons.process`), where records come from and go to
(:mod:`~shmd.daemons.sources`, :mod:`~shmd.daemons.sinks`), the journal
(:mod:`~shmd.daemons.logs`) and sd_notify (:mod:`~shmd.daemons.sdnotify`).
"""
