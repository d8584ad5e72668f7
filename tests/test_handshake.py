"""Tests of shmd.client.handshake: a client's handshake steps, on real sockets.

The whole attach (dial, Hello, Welcome, mapping) runs against a real
shm-writer in tests/test_subscription.py and tests/test_reader.py; here the
writer's side is played by hand to reach the answers a running writer gives
rarely.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from shmd._sys.fd import OwnedFd
from shmd.client import handshake
from shmd.client.handshake import Options
from shmd.control import protocol
from shmd.control.connection import Connection
from shmd.control.frames import Frame
from shmd.control.listener import connect
from shmd.errors import BusUnavailable, ConnectError, NotAdmitted, Refused


def test_a_refuse_for_credentials_is_not_admitted_with_who_is() -> None:
    """answer() turns Refuse(NOT_ALLOWED) into NotAdmitted, with the reason and who is admitted."""
    refuse = protocol.Refuse(protocol.RefuseCode.NOT_ALLOWED, "uid 5 is not allowed to attach")
    with pytest.raises(NotAdmitted) as info:
        handshake.answer(Frame(refuse.encode()), "/run/x.sock")
    message = str(info.value)
    assert "uid 5 is not allowed" in message and "control.allowed_groups" in message


def test_another_refuse_is_refused_with_its_code() -> None:
    """Refuse(DUPLICATE_INSTANCE) becomes Refused, its code in lower case."""
    refuse = protocol.Refuse(protocol.RefuseCode.DUPLICATE_INSTANCE, "reader 'a' is attached")
    with pytest.raises(Refused) as info:
        handshake.answer(Frame(refuse.encode()), "/run/x.sock")
    assert info.value.code == "duplicate_instance" and "'a'" in str(info.value)


def test_an_answer_other_than_welcome_is_a_connect_error() -> None:
    """A message that is neither Welcome nor Refuse is a ConnectError naming what came."""
    with pytest.raises(ConnectError) as info:
        handshake.answer(Frame(protocol.PublishAck(seq=3).encode()), "/run/x.sock")
    assert "PublishAck" in str(info.value)


def test_an_undecodable_answer_raises_and_closes_its_fds() -> None:
    """A frame that does not decode raises ProtocolError; the fds that came with it are closed."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    with pytest.raises(protocol.ProtocolError):
        handshake.answer(Frame(protocol.PublishAck(seq=3).encode(), (OwnedFd(r),)), "/x")
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
        with handshake.exchange_hello(reader, hello, timeout=5) as frame:
            assert protocol.decode(frame.body, len(frame.fds)) == refuse
    finally:
        reader.close()
        writer.close()


def test_exchange_hello_with_a_silent_close_is_bus_unavailable() -> None:
    """A writer that closes without any answer ends the handshake with BusUnavailable."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = Connection(a)
    b.close()
    try:
        with pytest.raises(BusUnavailable, match="closed the connection during the handshake"):
            handshake.exchange_hello(
                reader, protocol.Hello(instance="t", pid=os.getpid()), timeout=5
            )
    finally:
        reader.close()


def test_hang_up_returns_once_the_writer_closed() -> None:
    """hang_up() reads (and drops) what is left, then closes our end once the writer closed."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader, writer = Connection(a), Connection(b)
    try:
        writer.send(protocol.Detach(protocol.DetachCode.NORMAL, "bye").encode(), timeout=5)
        writer.close()
        handshake.hang_up(reader, timeout=5)
        assert reader.closed
        handshake.hang_up(reader, timeout=5)  # closed already: nothing to do
    finally:
        reader.close()
        writer.close()


def test_dial_a_missing_socket_gives_up_at_the_deadline(tmp_path: Path) -> None:
    """A socket that never appears is BusUnavailable after the timeout, saying what to start."""
    opts = Options(socket=str(tmp_path / "none.sock"), timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable) as info:
        handshake.dial(opts, time.monotonic() + opts.timeout)
    assert time.monotonic() - t0 >= 0.1
    assert "does not exist (is shm-writer.socket running?)" in str(info.value)
    assert "tried for 0.2 s" in str(info.value)


def test_dial_retries_until_a_listener_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dial() keeps trying while nothing listens, and connects once a listener binds."""
    path = str(tmp_path / "late.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bound = threading.Event()

    def bind_later() -> None:
        # The dial must have failed at least once: wait until it has tried.
        assert tried.wait(5)
        server.bind(path)
        server.listen(1)
        bound.set()

    tried = threading.Event()
    opts = Options(socket=path, timeout=5)

    def counting_connect(
        path: str, sock_type: int, timeout: float | None = None, *, max_message: int
    ) -> Connection:
        try:
            return connect(path, sock_type, timeout, max_message=max_message)
        finally:
            tried.set()

    monkeypatch.setattr("shmd.client.handshake.connect", counting_connect)
    thread = threading.Thread(target=bind_later)
    thread.start()
    try:
        conn = handshake.dial(opts, time.monotonic() + 5)
        conn.close()
        assert bound.is_set()
    finally:
        thread.join()
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
@pytest.mark.parametrize("dir_mode", [0o755, 0o700])
def test_dial_a_socket_this_user_may_not_open_is_not_admitted(dir_mode: int) -> None:
    """EACCES is NotAdmitted naming the socket's owner, group and mode (or the path)."""
    # Not tmp_path: pytest's base directory is mode 700, which uid 65534
    # could not traverse.
    where = tempfile.mkdtemp(prefix="shmd-test-")
    os.chmod(where, dir_mode)
    path = os.path.join(where, "closed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    os.chmod(path, 0o600)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                handshake.dial(Options(socket=path, timeout=1), time.monotonic() + 1)
            except NotAdmitted as exc:
                os.write(w, str(exc).encode())
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            message = f.read().decode()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0, message
        if dir_mode == 0o755:
            assert "may not open it (owned by root:root, mode 0600): run it as a member" in message
        else:
            assert "may not open it (permission denied on the way to it)" in message
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        listener.close()
        shutil.rmtree(where)


def test_options_reject_what_no_writer_would_take() -> None:
    """A bad name, start or timeout is a one-line ValueError at construction."""
    with pytest.raises(ValueError, match="instance name"):
        Options(name="no spaces")
    with pytest.raises(ValueError, match='start must be "latest" or "oldest"'):
        Options(start="newest")
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        Options(timeout=-1)
