"""The control path: the AF_UNIX connection between a reader and the writer.

Layer 2, above ``shmd._sys``.  The connection layer moves frames and passes
fds (SCM_RIGHTS): :mod:`~shmd.control.frames` (the frame format),
:mod:`~shmd.control.connection` (one connected socket, buffered both ways)
and :mod:`~shmd.control.listener` (binding, accepting, connecting).  The
protocol layer says what the messages mean (Hello, Welcome, Refuse, Detach,
Publish): :mod:`~shmd.control.protocol`, built from the checked fields of
:mod:`~shmd.control.fields`.  Nothing here maps a segment.
"""
