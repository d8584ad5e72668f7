"""Fixtures shared by the library tests: segment names, child processes, buses.

Every fixture cleans up in ``finally`` order even when the test fails:
children are SIGKILLed and reaped by pid, publishers and subscribers closed,
and every segment name a test asked for is unlinked.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Iterator

import pytest
from helpers import Bus, Procs, new_name
from hypothesis import settings

from shmd._sys import libc
from shmd.daemons import logs
from shmd.errors import SegmentNotFound

# Property tests check arithmetic, not speed: on a loaded machine a slow
# example must not turn into a DeadlineExceeded/Flaky failure.
settings.register_profile("shmd", deadline=None)
settings.load_profile("shmd")


def pytest_configure(config: pytest.Config) -> None:
    """Give the tests' children the default dispositions of SIGINT, SIGQUIT and SIGHUP.

    A shell without job control starts a background command (``packaging/dev
    stress ... &``, ``nohup``) with SIGINT and SIGQUIT ignored, nohup adds
    SIGHUP, and an ignored signal stays ignored across fork and exec -- Python
    even keeps SIGINT ignored instead of installing KeyboardInterrupt.  A test
    that stops ``shmctl status --watch`` with SIGINT then waits for nothing
    (seen: the first stress run launched that way).  Handlers reset on exec,
    ignores do not, so resetting them here is enough for every child.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def collect_leaks() -> Iterator[None]:
    """Collect garbage after each test, so a leaked fd held in a reference cycle warns
    (and, by pyproject's filterwarnings, fails) in the test that leaked it."""
    yield
    gc.collect()


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """Logging as structlog's defaults again after the test (configure_logging is global)."""
    try:
        yield
    finally:
        logs.reset_logging()


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


@pytest.fixture
def bus(shm_names: Callable[[], str]) -> Iterator[Bus]:
    """Make publishers and subscribers that are closed after the test."""
    b = Bus(shm_names)
    try:
        yield b
    finally:
        b.close()
