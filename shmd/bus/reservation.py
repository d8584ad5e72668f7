"""A reservation of slots the caller fills in place: the publisher's zero-copy path.

:meth:`Publisher.reserve` (one slot) and :meth:`Publisher.reserve_batch`
hand out a :class:`Reservation`, the compiled core's own type
(shmd/_sys/_writer.c): reserving and committing are per record, so neither
costs a Python frame.  What it is, to its user:

- ``buffers`` holds one writable payload buffer per slot, in seq order;
  ``buffer`` is the first, the only one of ``reserve``.  They are views
  into the ring itself: whatever is written there is the record.
- ``commit(length=None)`` publishes every slot with its first ``length``
  bytes (default: all of them), returns the last seq, and releases the
  buffers, so nothing can write into a published record through them.  It
  fails (ValueError) once committed or abandoned, when another record was
  published after the reservation was made, or when the publisher was
  closed; and (BufferError, nothing committed) while something still
  exports a buffer, such as a numpy array made over it.
- ``abandon()`` gives the slots back unpublished: the next publish reuses
  them.  ``reserve_seq`` stays up (:func:`shmd.bus.adopt.take_over` says
  why): the caller may have written into a slot a lagging reader was copying.
- As a context manager it gives ``buffer``, commits every slot whole on a
  clean exit, and abandons on an exception.
"""

from __future__ import annotations

from shmd._sys._core import Reservation

__all__ = ["Reservation"]
