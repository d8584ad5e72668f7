"""Fixtures shared by the library tests: segment names, child processes, buses.

Every fixture cleans up in ``finally`` order even when the test fails:
children are SIGKILLed and reaped by pid, publishers and subscribers closed,
and every segment name a test asked for is unlinked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Procs, attach, new_name

from shmd._sys import libc
from shmd.errors import SegmentNotFound
from shmd.layout import ALL_TOPICS
from shmd.publisher import Publisher
from shmd.subscriber import Subscriber


@pytest.fixture
def shm_names() -> Iterator[Callable[[], str]]:
    """A factory of unique ``/shmd-test-<uuid>`` names, each unlinked after the test."""
    made: list[str] = []

    def make() -> str:
        name = new_name()
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            libc.shm_unlink(name)
        except SegmentNotFound:
            pass  # the test unlinked it itself (or never created it)


@pytest.fixture
def shm_name(shm_names: Callable[[], str]) -> str:
    """One unique segment name, unlinked after the test."""
    return shm_names()


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Start children with ``procs.fork(fn)`` / ``procs.python(script)``; all reaped at the end."""
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


class Bus:
    """Publishers and in-process subscribers for one test, closed at its end."""

    def __init__(self, names: Callable[[], str]) -> None:
        self._names = names
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []

    def publisher(self, name: str | None = None, **kwargs: Any) -> Publisher:
        """``Publisher.create`` on a fresh test name (small geometry unless told)."""
        kwargs.setdefault("capacity", 8)
        kwargs.setdefault("slot_size", 64)
        kwargs.setdefault("max_readers", 8)
        pub = Publisher.create(name or self._names(), **kwargs)
        self.publishers.append(pub)
        return pub

    def subscriber(
        self, pub: Publisher, name: str = "r", *, topics: int = ALL_TOPICS,
        start: str | int = "latest", pid: int | None = None, **kwargs: Any,
    ) -> Subscriber:
        """Add a reader entry to ``pub`` and attach to it by fd, as a reader daemon would."""
        handle = pub.add_reader(name, os.getpid() if pid is None else pid, topics=topics,
                                start=start)
        sub = attach(pub, handle, **kwargs)
        self.subscribers.append(sub)
        return sub

    def close(self) -> None:
        """Close every subscriber, then every publisher (names are unlinked by shm_names)."""
        for sub in self.subscribers:
            sub.close()
        for pub in self.publishers:
            pub.close()


@pytest.fixture
def bus(shm_names: Callable[[], str]) -> Iterator[Bus]:
    """Make publishers and subscribers that are closed after the test."""
    b = Bus(shm_names)
    try:
        yield b
    finally:
        b.close()
