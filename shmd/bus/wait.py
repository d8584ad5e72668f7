"""How a reader waits for records: sleep in epoll, spin, or back off from one to the other.

``sleep``
    Announce the sleep (docs/PROTOCOL.md, "Sleeping") and block in
    ``epoll_wait`` on the eventfd: no CPU while idle; the writer writes the
    eventfd, and the wake-up takes the kernel's scheduling latency.
``spin``
    Busy-poll ``write_seq`` and ``active`` (the compiled core's
    ``Reader.spin``: loads and a pause instruction, no syscall), never
    announcing a sleep, so the writer never writes this reader's eventfd.
    One core at 100% while idle, in exchange for the shortest wake-up.
``backoff``
    Spin for ``spin`` seconds, then poll with ``sched_yield()`` between
    looks for ``yield_`` seconds, then sleep as ``sleep`` does (Aeron's
    BackoffIdleStrategy): a reader busy with a stream keeps spinning
    between records; one that goes idle gives its core back.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

WaitName: TypeAlias = Literal["sleep", "spin", "backoff"]

#: How long a backoff spins, and then yields, before it sleeps (seconds).
DEFAULT_BACKOFF_SPIN = 50e-6
DEFAULT_BACKOFF_YIELD = 1e-3


class WaitCode(enum.IntEnum):
    """A strategy as it travels in the Hello and sits in the reader-table entry."""

    SLEEP = 0
    SPIN = 1
    BACKOFF = 2


@dataclass(frozen=True, slots=True)
class WaitStrategy:
    """A reader's wait strategy; build one with :meth:`sleep`, :meth:`spin` or :meth:`backoff`."""

    name: WaitName = "sleep"
    #: Seconds of busy-polling before the next phase (inf for ``spin``).
    spin_seconds: float = 0.0
    #: Seconds of polling with sched_yield() before sleeping (``backoff``).
    yield_seconds: float = 0.0

    def __post_init__(self) -> None:
        for what, v in (("spin", self.spin_seconds), ("yield", self.yield_seconds)):
            if math.isnan(v) or v < 0:
                raise ValueError(f"Failed to make a wait strategy since its {what} time is {v}")

    @classmethod
    def sleep(cls) -> WaitStrategy:
        """Block in epoll on the eventfd (the default)."""
        return cls("sleep")

    @classmethod
    def spin(cls) -> WaitStrategy:
        """Busy-poll the commit counter; no syscall, no eventfd write."""
        return cls("spin", math.inf)

    @classmethod
    def backoff(
        cls, spin: float = DEFAULT_BACKOFF_SPIN, yield_: float = DEFAULT_BACKOFF_YIELD
    ) -> WaitStrategy:
        """Spin ``spin`` seconds, then yield ``yield_`` seconds, then sleep."""
        return cls("backoff", spin, yield_)

    @classmethod
    def named(
        cls,
        name: WaitName,
        *,
        spin: float = DEFAULT_BACKOFF_SPIN,
        yield_: float = DEFAULT_BACKOFF_YIELD,
    ) -> WaitStrategy:
        """The strategy a configuration names (``spin``/``yield_`` matter for backoff only)."""
        if name == "sleep":
            return cls.sleep()
        if name == "spin":
            return cls.spin()
        if name == "backoff":
            return cls.backoff(spin, yield_)
        raise ValueError(
            f"Failed to pick a wait strategy since {name!r} is not sleep, spin or backoff"
        )

    @property
    def code(self) -> WaitCode:
        """The code for the Hello and the reader-table entry."""
        return WaitCode[self.name.upper()]

    @property
    def sleeps(self) -> bool:
        """Whether the strategy ends in an epoll sleep (needs the eventfd)."""
        return self.name != "spin"

    @property
    def label(self) -> str:
        """As logs and ``shmctl status`` show it: ``sleep``, ``spin``, ``backoff(50us,1ms)``."""
        if self.name != "backoff":
            return self.name
        return f"backoff({_duration(self.spin_seconds)},{_duration(self.yield_seconds)})"


def _duration(s: float) -> str:
    if s >= 1:
        return f"{s:g}s"
    if s >= 1e-3:
        return f"{s * 1e3:g}ms"
    return f"{s * 1e6:g}us"


def code_label(code: int) -> str:
    """A reader-table entry's wait code as a word (``?`` for a code this shmd does not know)."""
    try:
        return WaitCode(code).name.lower()
    except ValueError:
        return "?"
