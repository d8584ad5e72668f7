"""Tests of shmd.daemons.attach: the reader's handshake steps, on real socket pairs.

The whole attach (dial, Hello, Welcome, mapping) runs against a real
shm-writer in tests/test_reader.py; here the writer's side is played by
hand to reach the answers a running writer gives rarely.
"""

from __future__ import annotations

import os
import socket

import pytest

from shmd._sys.fd import OwnedFd
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import Frame
from shmd.daemons import attach, logs
from shmd.daemons.process import EXIT_FAILURE, EXIT_NOPERMISSION


def test_a_refuse_for_credentials_exits_77_with_its_code() -> None:
    """answer() turns Refuse(NOT_ALLOWED) into ReaderExit 77 "refused" with the code and reason."""
    refuse = protocol.Refuse(protocol.RefuseCode.NOT_ALLOWED, "uid 5 is not allowed to attach")
    with pytest.raises(attach.ReaderExit) as info:
        attach.answer(Frame(refuse.encode()))
    exc = info.value
    assert (exc.status, exc.event, exc.fields) == (
        EXIT_NOPERMISSION,
        "refused",
        {"code": "not_allowed"},
    )
    assert "uid 5 is not allowed" in str(exc)


def test_an_answer_other_than_welcome_exits_1() -> None:
    """A message that is neither Welcome nor Refuse is refused (exit 1), naming what came."""
    with pytest.raises(attach.ReaderExit) as info:
        attach.answer(Frame(protocol.PublishAck(seq=3).encode()))
    assert info.value.status == EXIT_FAILURE and "PublishAck" in str(info.value)


def test_an_undecodable_answer_raises_and_closes_its_fds() -> None:
    """A frame that does not decode raises ProtocolError; the fds that came with it are closed."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    with pytest.raises(protocol.ProtocolError):
        attach.answer(Frame(protocol.PublishAck(seq=3).encode(), (OwnedFd(r),)))
    with pytest.raises(OSError):
        os.fstat(r)


def test_exchange_hello_reads_the_refuse_of_a_writer_that_closed() -> None:
    """A Refuse queued before the writer closed is still read as the answer."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader, writer = Connection(a), Connection(b)
    try:
        refuse = protocol.Refuse(protocol.RefuseCode.SHUTTING_DOWN, "shutting down")
        writer.send(refuse.encode(), timeout=5)
        writer.close()
        hello = protocol.Hello(instance="t", pid=os.getpid())
        with attach.exchange_hello(reader, hello, timeout=5) as frame:
            assert protocol.decode(frame.body, len(frame.fds)) == refuse
    finally:
        reader.close()
        writer.close()


def test_exchange_hello_with_a_silent_close_is_writer_lost() -> None:
    """A writer that closes without any answer ends the handshake as writer_lost."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = Connection(a)
    b.close()
    try:
        with pytest.raises(attach.ReaderExit) as info:
            attach.exchange_hello(reader, protocol.Hello(instance="t", pid=os.getpid()), timeout=5)
        assert (info.value.status, info.value.event) == (EXIT_FAILURE, logs.WRITER_LOST)
    finally:
        reader.close()


def test_hang_up_returns_once_the_writer_closed() -> None:
    """hang_up() reads (and drops) what is left, then closes our end once the writer closed."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader, writer = Connection(a), Connection(b)
    try:
        writer.send(protocol.Detach(protocol.DetachCode.NORMAL, "bye").encode(), timeout=5)
        writer.close()
        attach.hang_up(reader, timeout=5)
        assert reader.closed
        attach.hang_up(reader, timeout=5)  # closed already: nothing to do
    finally:
        reader.close()
        writer.close()
