"""The control path: the AF_UNIX connection between a reader and the writer.

Layer 2, above ``shmd._sys``: :mod:`~shmd.control.wire` frames messages and
passes fds (SCM_RIGHTS); :mod:`~shmd.control.protocol` says what the
messages mean (Hello, Welcome, Refuse, Detach, Publish).  Nothing here maps
a segment.
"""
