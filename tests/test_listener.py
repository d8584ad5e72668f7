"""Tests for shmd.control.listener: binding, accepting, connecting, peer credentials."""

from __future__ import annotations

import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

import pytest

from shmd.control.connection import Connection
from shmd.control.frames import PeerClosed, WireError, WireTimeout
from shmd.control.listener import accept, bind_listener, check_inherited_listener, connect

TYPES = [socket.SOCK_SEQPACKET, socket.SOCK_STREAM]
TYPE_IDS = ["seqpacket", "stream"]
DEADLINE = 10.0  # seconds: the longest any wait in these tests may take


# -- helpers ------------------------------------------------------------------


@pytest.fixture(params=TYPES, ids=TYPE_IDS)
def sock_type(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    return value


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short private directory for socket files (sun_path is 108 bytes)."""
    path = tempfile.mkdtemp(prefix="shmd-test-listener-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- accepted and connected sockets ---------------------------------------------


def test_connection_sockets_are_cloexec(sockdir: str, sock_type: int) -> None:
    """Listener, client and accepted sockets are all close-on-exec."""
    path = os.path.join(sockdir, "c.sock")
    listener = bind_listener(path, sock_type)
    try:
        client = connect(path, sock_type, timeout=DEADLINE)
        server = accept(listener)
        try:
            assert server is not None
            for fd in (listener.fileno(), client.fileno(), server.fileno()):
                assert not os.get_inheritable(fd)
        finally:
            client.close()
            if server is not None:
                server.close()
    finally:
        listener.close()


# -- credentials and listeners ----------------------------------------------------


def test_peer_credentials_are_the_child_process(sockdir: str, sock_type: int) -> None:
    """peer_credentials() of an accepted connection is the connecting child's pid, uid, gid."""
    path = os.path.join(sockdir, "c.sock")
    listener = bind_listener(path, sock_type)
    listener.setblocking(False)
    script = textwrap.dedent(
        f"""
        import socket, sys
        s = socket.socket(socket.AF_UNIX, {sock_type})
        s.connect({path!r})
        print("connected", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    conn: Connection | None = None
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        assert poller.poll(DEADLINE * 1000)
        conn = accept(listener)
        assert conn is not None
        assert conn.peer_credentials() == (proc.pid, os.getuid(), os.getgid())
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="setting supplementary groups needs root")
def test_peer_groups_are_the_child_supplementary_groups(sockdir: str) -> None:
    """peer_groups() returns the groups the connecting child had when it connected."""
    path = os.path.join(sockdir, "g.sock")
    listener = bind_listener(path, socket.SOCK_SEQPACKET)
    listener.setblocking(False)
    script = textwrap.dedent(
        f"""
        import os, socket, sys
        os.setgroups([4242, 4343])
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({path!r})
        print("connected", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    conn: Connection | None = None
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        assert poller.poll(DEADLINE * 1000)
        conn = accept(listener)
        assert conn is not None
        assert sorted(conn.peer_groups()) == [4242, 4343]
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_accept_returns_none_when_nothing_is_pending(sockdir: str) -> None:
    """accept() on a non-blocking listener with no pending connection returns None."""
    listener = bind_listener(os.path.join(sockdir, "c.sock"))
    with listener:
        listener.setblocking(False)
        assert accept(listener) is None


def _stale_socket(path: str, sock_type: int) -> None:
    s = socket.socket(socket.AF_UNIX, sock_type)
    s.bind(path)
    s.listen(1)
    s.close()  # the file stays behind, with nobody listening
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_bind_listener_replaces_a_stale_socket_file(sockdir: str, sock_type: int) -> None:
    """bind_listener removes a socket file nobody listens on and then accepts connections."""
    path = os.path.join(sockdir, "c.sock")
    _stale_socket(path, sock_type)
    with pytest.raises(WireError, match="nothing is listening"):
        connect(path, sock_type)
    listener = bind_listener(path, sock_type)
    try:
        with connect(path, sock_type, timeout=DEADLINE) as client:
            server = accept(listener)
            assert server is not None
            with server:
                client.send(b"hi", timeout=DEADLINE)
                assert server.recv(timeout=DEADLINE).body == b"hi"
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_bind_listener_never_removes_something_else(sockdir: str, kind: str) -> None:
    """bind_listener refuses a path holding a file, directory or symlink, and leaves it alone."""
    path = os.path.join(sockdir, "c.sock")
    if kind == "file":
        with open(path, "w") as f:
            f.write("keep me")
    elif kind == "directory":
        os.mkdir(path)
    else:
        other = os.path.join(sockdir, "elsewhere.sock")
        _stale_socket(other, socket.SOCK_SEQPACKET)
        os.symlink(other, path)
    with pytest.raises(WireError, match=r"^Failed to bind .* since something that is not a socket"):
        bind_listener(path)
    if kind == "file":
        with open(path) as f:
            assert f.read() == "keep me"
    elif kind == "directory":
        assert os.path.isdir(path)
    else:
        assert os.path.islink(path)


@pytest.mark.parametrize("other_type", TYPES, ids=TYPE_IDS)
def test_bind_listener_does_not_steal_a_live_listener(
    sockdir: str, sock_type: int, other_type: int
) -> None:
    """bind_listener refuses a path someone listens on (either type); that one keeps working."""
    path = os.path.join(sockdir, "c.sock")
    live = bind_listener(path, other_type)
    accepted: list[Connection] = []
    try:
        with pytest.raises(WireError, match="another process is listening on it"):
            bind_listener(path, sock_type)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with connect(path, other_type, timeout=DEADLINE) as client:
            client.send(b"alive", timeout=DEADLINE)
            live.setblocking(False)
            # The probe's own connection may be pending too: find the client's.
            while (conn := accept(live)) is not None:
                accepted.append(conn)
            bodies: list[bytes | None] = []
            for conn in accepted:
                try:
                    bodies.append(conn.recv(timeout=DEADLINE).body)
                except PeerClosed:
                    bodies.append(None)
            assert bodies.count(b"alive") == 1
    finally:
        for conn in accepted:
            conn.close()
        live.close()


def test_bind_listener_sets_the_mode_despite_the_umask(sockdir: str) -> None:
    """The socket file gets exactly the requested mode, whatever the umask."""
    old = os.umask(0o077)
    try:
        with bind_listener(os.path.join(sockdir, "a.sock"), mode=0o660):
            pass
        with bind_listener(os.path.join(sockdir, "b.sock"), mode=0o600):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(sockdir, "a.sock")).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.join(sockdir, "b.sock")).st_mode) == 0o600


def test_connect_errors_say_what_is_wrong(sockdir: str) -> None:
    """connect() explains a missing socket, one of the other type, and a full backlog (timeout)."""
    path = os.path.join(sockdir, "c.sock")
    with pytest.raises(WireError, match=r"^Failed to connect .* since it does not exist"):
        connect(path)
    listener = bind_listener(path, socket.SOCK_SEQPACKET, backlog=0)
    try:
        with pytest.raises(WireError, match="it is not a stream socket"):
            connect(path, socket.SOCK_STREAM)
        with connect(path, timeout=DEADLINE):
            # Backlog 0 holds one pending connection; the next one waits.
            start = time.monotonic()
            with pytest.raises(WireTimeout, match=r"did not accept within 0\.2 s"):
                connect(path, timeout=0.2)
            assert time.monotonic() - start >= 0.19
    finally:
        listener.close()


def test_check_inherited_listener_accepts_the_configured_socket(
    sockdir: str, sock_type: int
) -> None:
    """An inherited listener bound to the configured path with the configured type passes."""
    path = os.path.join(sockdir, "c.sock")
    with bind_listener(path, sock_type) as listener:
        inherited = socket.socket(fileno=os.dup(listener.fileno()))
        with inherited:
            check_inherited_listener(inherited, path, sock_type)


def test_check_inherited_listener_mismatch_names_both(sockdir: str) -> None:
    """A mismatch in path or type raises WireError naming the actual and the configured socket."""
    path = os.path.join(sockdir, "c.sock")
    other = os.path.join(sockdir, "other.sock")
    with bind_listener(path, socket.SOCK_STREAM) as listener:
        inherited = socket.socket(fileno=os.dup(listener.fileno()))
        with inherited:
            with pytest.raises(WireError) as exc:
                check_inherited_listener(inherited, other, socket.SOCK_STREAM)
            assert f"{path!r} (stream)" in str(exc.value)
            assert f"{other!r} (stream)" in str(exc.value)
            with pytest.raises(WireError) as exc:
                check_inherited_listener(inherited, path, socket.SOCK_SEQPACKET)
            assert f"it is {path!r} (stream)" in str(exc.value)
            assert f"configuration says {path!r} (seqpacket)" in str(exc.value)


def test_check_inherited_listener_rejects_a_socket_not_listening(sockdir: str) -> None:
    """A bound socket that is not listening is refused."""
    path = os.path.join(sockdir, "c.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(path)
        with pytest.raises(WireError, match="not listening"):
            check_inherited_listener(sock, path, socket.SOCK_SEQPACKET)
