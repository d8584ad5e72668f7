"""What the test suite and the benchmarks share; neither imports the other.

* :mod:`testbed.nsystemd`: a real systemd booted as PID 1 of private
  namespaces over a volatile overlay (the system tests and the soak);
* :mod:`testbed.soak`: the soak's faults, journal accounting and verdict
  (``python -m benchmarks.soak`` runs it for minutes, the system tests for 30 s);
* :mod:`testbed.soak_source` and :mod:`testbed.soak_sink`: the ``python:``
  source and sink the soak's units load.

Not part of the installed package: both sides import it from the checkout.
This ``__init__`` imports nothing, so a unit that loads ``testbed.soak_sink``
loads nothing else.
"""
