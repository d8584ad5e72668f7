"""Tests of shmd._sys.fd: one owner per raw fd, on real pipes and socketpairs."""

from __future__ import annotations

import gc
import os
import socket
import warnings
from collections.abc import Iterator

import pytest
from helpers import is_open

from shmd._sys.fd import OwnedFd, close_all


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A real pipe; whichever end is still open after the test is closed."""
    r, w = os.pipe()
    ino = os.fstat(r).st_ino
    yield r, w
    for fd in (r, w):
        # Only if the number still is this pipe: once an owner closed it,
        # the number may belong to another open of this process.
        try:
            if os.fstat(fd).st_ino == ino:
                os.close(fd)
        except OSError:
            pass  # closed, and not reused


def test_owner_closes_its_fd_once_and_reads_closed(pipe: tuple[int, int]) -> None:
    """close() closes the fd, sets closed, and a second close() does nothing."""
    r, w = pipe
    owner = OwnedFd(r)
    assert owner.fileno() == r and not owner.closed
    owner.close()
    assert owner.closed and not is_open(r)
    # The number may now belong to another open: a second close must not touch it.
    other_r, other_w = os.pipe()
    try:
        owner.close()
        assert is_open(other_r) and is_open(other_w)
    finally:
        os.close(other_r)
        os.close(other_w)
    assert repr(owner) == "OwnedFd(closed)"
    assert is_open(w)


def test_fileno_after_close_raises(pipe: tuple[int, int]) -> None:
    """A closed owner refuses to hand out its old number."""
    owner = OwnedFd(pipe[0])
    owner.close()
    with pytest.raises(ValueError, match="already closed or detached"):
        owner.fileno()


def test_detach_hands_the_fd_over_and_close_leaves_it_alone(pipe: tuple[int, int]) -> None:
    """After detach() the caller owns the fd: the owner's close() does not close it."""
    r, w = pipe
    owner = OwnedFd(r)
    assert owner.detach() == r
    assert owner.closed
    owner.close()
    assert is_open(r)
    os.write(w, b"x")
    assert os.read(r, 1) == b"x"  # still the same pipe
    with pytest.raises(ValueError):
        owner.detach()


def test_context_manager_closes_on_exit_and_on_error(pipe: tuple[int, int]) -> None:
    """``with OwnedFd(fd)`` closes the fd when the block ends, by an exception too."""
    r, w = pipe
    with OwnedFd(r) as owner:
        assert owner.fileno() == r
    assert not is_open(r)
    with pytest.raises(RuntimeError), OwnedFd(w):
        raise RuntimeError("inside")
    assert not is_open(w)


def test_dup_owns_a_close_on_exec_copy_and_leaves_the_original() -> None:
    """dup() owns a new, non-inheritable fd of the same socket; the original stays open."""
    a, b = socket.socketpair()
    with a, b:
        with OwnedFd.dup(a.fileno()) as copy:
            assert copy.fileno() != a.fileno()
            assert not os.get_inheritable(copy.fileno())
            os.write(copy.fileno(), b"ping")
            assert b.recv(4) == b"ping"
        a.sendall(b"pong")  # the original survives the copy's close
        assert b.recv(4) == b"pong"


def test_negative_fd_is_refused() -> None:
    """An owner of -1 (a failed open's return) cannot be made."""
    with pytest.raises(ValueError, match="Failed to own fd -1 since it is negative"):
        OwnedFd(-1)


def test_a_dropped_owner_warns_and_closes_its_fd() -> None:
    """An owner garbage-collected while open closes the fd with a ResourceWarning."""
    r, w = os.pipe()
    os.close(w)
    owner = OwnedFd(r)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del owner
        gc.collect()
    assert [str(c.message) for c in caught] == [f"unclosed OwnedFd({r})"]
    assert all(c.category is ResourceWarning for c in caught)
    assert not is_open(r)


def test_a_closed_or_detached_owner_drops_silently(pipe: tuple[int, int]) -> None:
    """Dropping an owner that no longer owns an fd warns about nothing."""
    r, w = pipe
    closed, detached = OwnedFd(r), OwnedFd(w)
    closed.close()
    fd = detached.detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del closed, detached
        gc.collect()
    assert caught == []
    assert is_open(fd)


def test_close_all_closes_every_owner_and_raises_the_first_error(
    pipe: tuple[int, int],
) -> None:
    """close_all() closes every owner even when one close fails, then raises that error."""
    r, w = pipe
    # An owner of an fd that someone else already closed: its close(2) fails
    # with EBADF (and it still marks itself closed first).
    stale = OwnedFd(r)
    os.close(r)
    good = OwnedFd(w)
    with pytest.raises(OSError) as info:
        close_all([stale, good])
    assert info.value.errno == 9  # EBADF
    assert stale.closed and good.closed
    assert not is_open(w)
