"""Tests for shmd.control.connection: framing and fd passing on real AF_UNIX sockets."""

from __future__ import annotations

import array
import itertools
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from helpers import is_open
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmd._sys.fd import OwnedFd
from shmd.control.connection import Connection
from shmd.control.frames import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_MAGIC,
    Frame,
    PeerClosed,
    PeerStalled,
    WireError,
    WireTimeout,
)

TYPES = [socket.SOCK_SEQPACKET, socket.SOCK_STREAM]
TYPE_IDS = ["seqpacket", "stream"]
DEADLINE = 10.0  # seconds: the longest any wait in these tests may take


# -- helpers ------------------------------------------------------------------


def open_fds() -> set[int]:
    """The fds open in this process right now (the listing's own fd excluded)."""
    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in fds if is_open(fd)}


def raw_header(
    length: int, n_fds: int, *, magic: int = FRAME_MAGIC, flags: int = 0, reserved: int = 0
) -> bytes:
    return FRAME_HEADER.pack(magic, flags, length, n_fds, reserved)


def raw_send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """One sendmsg on a raw socket, fds attached as one SCM_RIGHTS message."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    assert sent == len(data)


def wait_frames(conn: Connection, count: int, writer: Connection | None = None) -> list[Frame]:
    """Collect ``count`` frames from a non-blocking connection, polling with a deadline.

    With ``writer``, also flush that connection's queued output whenever its
    socket becomes writable.
    """
    frames: list[Frame] = []
    deadline = time.monotonic() + DEADLINE
    while len(frames) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(frames)} of {count} frames arrived in time")
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        if writer is not None and writer.wants_write:
            poller.register(writer.fileno(), select.POLLOUT)
        for fd, _events in poller.poll(left * 1000):
            if fd == conn.fileno():
                frames.extend(conn.on_readable())
            elif writer is not None:
                writer.on_writable()
    return frames


@pytest.fixture(params=TYPES, ids=TYPE_IDS)
def sock_type(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    return value


@pytest.fixture
def pair(sock_type: int) -> Iterator[tuple[Connection, Connection]]:
    """Two connected Connections of the parametrised type."""
    a, b = socket.socketpair(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    conns: list[Connection] = []
    try:
        conns.append(Connection(a))
        conns.append(Connection(b))
        yield conns[0], conns[1]
    finally:
        for conn in conns:
            conn.close()
        a.close()
        b.close()


@pytest.fixture
def raw_pair(sock_type: int) -> Iterator[tuple[socket.socket, Connection]]:
    """A raw socket (a misbehaving peer) connected to a Connection."""
    a, b = socket.socketpair(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    conn: Connection | None = None
    try:
        conn = Connection(b, max_message=1024, max_fds=4)
        yield a, conn
    finally:
        if conn is not None:
            conn.close()
        a.close()
        b.close()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    owners = [OwnedFd(r), OwnedFd(w)]
    try:
        yield r, w
    finally:
        for owner in owners:
            try:
                owner.close()
            except OSError:
                pass


def read_exactly(fd: int, size: int) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(DEADLINE * 1000), "nothing to read in time"
    return os.read(fd, size)


# -- round trips ----------------------------------------------------------------


def test_bodies_round_trip(pair: tuple[Connection, Connection]) -> None:
    """Empty, small and max_message-sized bodies arrive intact and as separate frames."""
    a, b = pair
    bodies = [b"", b"x", bytes(range(256)) * 3, os.urandom(a.max_message)]
    for body in bodies:
        a.send(body, timeout=DEADLINE)
    got = [b.recv(timeout=DEADLINE) for _ in bodies]
    assert [f.body for f in got] == bodies
    assert all(f.fds == () for f in got)
    assert b.on_readable() == []


def test_pipe_fd_arrives_and_is_usable(
    pair: tuple[Connection, Connection], pipe: tuple[int, int]
) -> None:
    """A pipe's write end sent through the socket can be written to by the receiver."""
    a, b = pair
    r, w = pipe
    a.send(b"take this", [w], timeout=DEADLINE)
    with b.recv(timeout=DEADLINE) as frame:
        assert frame.body == b"take this"
        assert len(frame.fds) == 1
        received = frame.fds[0].fileno()
        assert received != w
        assert not os.get_inheritable(received), "received fds must be close-on-exec"
        os.write(received, b"through the socket")
    assert read_exactly(r, 100) == b"through the socket"


def test_eventfd_arrives_and_signals_the_sender(pair: tuple[Connection, Connection]) -> None:
    """An eventfd sent with a frame wakes the sender's copy when the receiver writes it."""
    a, b = pair
    with OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)) as efd:
        r, w = os.pipe()
        with OwnedFd(r) as ro, OwnedFd(w) as wo:
            a.send(b"two", [efd.fileno(), wo.fileno()], timeout=DEADLINE)
            with b.recv(timeout=DEADLINE) as frame:
                assert len(frame.fds) == 2
                os.eventfd_write(frame.fds[0].fileno(), 5)
                os.write(frame.fds[1].fileno(), b"!")
            assert os.eventfd_read(efd.fileno()) == 5
            assert read_exactly(ro.fileno(), 1) == b"!"


# -- a misbehaving peer: errors close every fd ------------------------------------


@pytest.mark.parametrize(("declared", "attached"), [(1, 2), (2, 0), (0, 1), (2, 1)], ids=str)
def test_wrong_fd_count_is_detected_and_nothing_leaks(
    raw_pair: tuple[socket.socket, Connection], declared: int, attached: int
) -> None:
    """A frame whose fd count differs from n_fds raises WireError and closes every fd received."""
    raw, conn = raw_pair
    before = open_fds()
    pipes = [os.pipe() for _ in range(attached)]
    raw_send(raw, raw_header(3, declared) + b"abc", [w for _, w in pipes])
    for r, w in pipes:
        os.close(r)
        os.close(w)
    with pytest.raises(WireError, match=r"^Failed to receive a frame since .*(declare|fds)"):
        conn.recv(timeout=DEADLINE)
    assert open_fds() == before
    with pytest.raises(WireError, match="already failed"):
        conn.on_readable()


def test_more_fds_than_the_receiver_takes_is_an_error_without_leaks(
    raw_pair: tuple[socket.socket, Connection],
) -> None:
    """Fds beyond max_fds (MSG_CTRUNC) raise WireError and the fds that did arrive are closed."""
    raw, conn = raw_pair  # conn takes at most 4 fds
    before = open_fds()
    r, w = os.pipe()
    try:
        raw_send(raw, raw_header(0, 6), [w] * 6)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(WireError, match="more than 4 fds"):
        conn.recv(timeout=DEADLINE)
    assert open_fds() == before


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (raw_header(0, 1, magic=0x4453), "magic is 0x4453"),
        (raw_header(0, 1, flags=1), "flags are 0x0001"),
        (raw_header(0, 1, reserved=7), "reserved field is 0x0007"),
        (raw_header(1025, 1), "1025 bytes, more than max_message 1024"),
        (raw_header(0, 17), "declares 17 fds, the limit is 16"),
    ],
    ids=["magic", "flags", "reserved", "too-long", "too-many-fds"],
)
def test_bad_header_is_rejected_and_fds_closed(
    raw_pair: tuple[socket.socket, Connection], header: bytes, message: str
) -> None:
    """A wrong magic, flags, reserved, length or fd count raises WireError, leaking no fd."""
    raw, conn = raw_pair
    before = open_fds()
    r, w = os.pipe()
    try:
        # Only the header: an over-long body must be refused before it arrives.
        raw_send(raw, header, [w])
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(WireError, match=message):
        conn.recv(timeout=DEADLINE)
    assert open_fds() == before


def test_truncated_datagram_header_is_rejected() -> None:
    """A SOCK_SEQPACKET datagram shorter than the header raises WireError and closes its fds."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, Connection(b) as conn:
        before = open_fds()
        r, w = os.pipe()
        try:
            raw_send(a, b"SD\0\0\1", [w])
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(WireError, match=r"header is truncated \(5 of 12 bytes\)"):
            conn.recv(timeout=DEADLINE)
        assert open_fds() == before


@pytest.mark.parametrize(
    ("length", "body_size", "message"),
    [
        (10, 5, "header says 10 body bytes but the datagram carries 5"),
        (10, 200, "header says 10 body bytes but the datagram carries more"),
    ],
    ids=["short", "truncated-by-kernel"],
)
def test_datagram_length_must_match_header(length: int, body_size: int, message: str) -> None:
    """On SOCK_SEQPACKET the datagram must carry exactly the header's length (MSG_TRUNC caught)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, Connection(b, max_message=100) as conn:
        before = open_fds()
        r, w = os.pipe()
        try:
            raw_send(a, raw_header(length, 1) + bytes(body_size), [w])
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(WireError, match=message):
            conn.recv(timeout=DEADLINE)
        assert open_fds() == before


def test_send_refuses_bodies_over_max_message(pair: tuple[Connection, Connection]) -> None:
    """send() refuses a body longer than max_message and nothing reaches the peer."""
    a, b = pair
    with pytest.raises(WireError, match=r"more than max_message 65536"):
        a.send(bytes(a.max_message + 1))
    assert b.on_readable() == []
    assert not a.wants_write


def test_stream_fds_nobody_declared_are_closed() -> None:
    """On SOCK_STREAM, fds arriving with a frame declaring none are an error, and are closed."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, Connection(b) as conn:
        before = open_fds()
        r, w = os.pipe()
        try:
            raw_send(a, raw_header(2, 0) + b"ok", [w])
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(WireError, match="no frame declared"):
            conn.recv(timeout=DEADLINE)
        assert open_fds() == before


# -- stream reassembly ----------------------------------------------------------


def test_stream_reassembles_frames_sent_one_byte_at_a_time(pipe: tuple[int, int]) -> None:
    """Frames dribbled one byte per sendmsg from another thread arrive whole, fds included."""
    r, w = pipe
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bodies = [b"first", b"", b"third frame carries an fd", bytes(range(200))]
    stream = b""
    fd_at = -1
    for i, body in enumerate(bodies):
        if i == 2:
            fd_at = len(stream)
        stream += raw_header(len(body), 1 if i == 2 else 0) + body
    failure: list[BaseException] = []

    def dribble() -> None:
        try:
            for pos in range(len(stream)):
                raw_send(a, stream[pos : pos + 1], [w] if pos == fd_at else [])
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    sender = threading.Thread(target=dribble)
    with a, Connection(b) as conn:
        sender.start()
        try:
            frames = wait_frames(conn, len(bodies))
        finally:
            sender.join(DEADLINE)
        assert not sender.is_alive()
        assert not failure, failure
        try:
            assert [f.body for f in frames] == bodies
            assert [len(f.fds) for f in frames] == [0, 0, 1, 0]
            os.write(frames[2].fds[0].fileno(), b"dribbled")
            assert read_exactly(r, 100) == b"dribbled"
        finally:
            for frame in frames:
                frame.close()


@st.composite
def chunked_stream(draw: st.DrawFn) -> tuple[list[tuple[bytes, int]], list[int]]:
    """Frames (body, n_fds) and the cut points at which the stream is sent."""
    frames = draw(
        st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 3)), min_size=1, max_size=8)
    )
    total = sum(FRAME_HEADER_SIZE + len(body) for body, _ in frames)
    cuts = draw(st.lists(st.integers(1, max(total - 1, 1)), max_size=20))
    return frames, cuts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_stream())
def test_stream_reassembly_with_random_chunking(
    case: tuple[list[tuple[bytes, int]], list[int]],
) -> None:
    """Any chunking of a frame stream (fds sent with a frame's first byte) reassembles exactly."""
    frames, cuts = case
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes: list[tuple[int, int]] = []
    got: list[Frame] = []
    try:
        stream = b""
        fds_at: dict[int, list[int]] = {}
        for body, n_fds in frames:
            if n_fds:
                mine = [os.pipe() for _ in range(n_fds)]
                pipes.extend(mine)
                fds_at[len(stream)] = [w for _, w in mine]
            stream += raw_header(len(body), n_fds) + body
        # A frame's fds must go with the sendmsg that starts at its first byte.
        points = sorted({0, len(stream), *fds_at, *(c for c in cuts if c < len(stream))})
        with Connection(b) as conn:
            for start, end in itertools.pairwise(points):
                raw_send(a, stream[start:end], fds_at.get(start, []))
                got.extend(conn.on_readable())
            assert [(f.body, len(f.fds)) for f in got] == frames
            # Each received fd is the write end of the right pipe, in order.
            received = [fd for f in got for fd in f.fds]
            assert len(received) == len(pipes)
            for i, (fd, (r, _w)) in enumerate(zip(received, pipes, strict=True)):
                os.write(fd.fileno(), bytes([i]))
                assert os.read(r, 10) == bytes([i])
    finally:
        for frame in got:
            frame.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)
        a.close()
        b.close()


# -- hang-ups -------------------------------------------------------------------


def test_peer_closed_on_hang_up(pair: tuple[Connection, Connection]) -> None:
    """recv() raises PeerClosed (not WireError) when the peer hangs up."""
    a, b = pair
    a.close()
    with pytest.raises(PeerClosed):
        b.recv(timeout=DEADLINE)
    with pytest.raises(PeerClosed):
        b.on_readable()


def test_frames_sent_before_hang_up_arrive_first(pair: tuple[Connection, Connection]) -> None:
    """Frames that arrived before the hang-up are returned before PeerClosed is raised."""
    a, b = pair
    a.send(b"one", timeout=DEADLINE)
    a.send(b"two", timeout=DEADLINE)
    a.close()
    poller = select.poll()
    poller.register(b.fileno(), select.POLLIN)
    assert poller.poll(DEADLINE * 1000)
    frames = b.on_readable()
    assert [f.body for f in frames] == [b"one", b"two"]
    with pytest.raises(PeerClosed):
        b.on_readable()


def test_hang_up_mid_frame_is_peer_closed_and_closes_fds() -> None:
    """A stream peer hanging up halfway through a frame gives PeerClosed; its fds are closed."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with Connection(b) as conn:
        peer = a.fileno()
        before = open_fds()
        r, w = os.pipe()
        try:
            raw_send(a, raw_header(100, 1) + b"only part", [w])
        finally:
            os.close(r)
            os.close(w)
            a.close()
        with pytest.raises(PeerClosed, match="middle of a frame"):
            conn.recv(timeout=DEADLINE)
        assert open_fds() == before - {peer}


def test_peer_closing_with_unread_data_is_peer_closed(pair: tuple[Connection, Connection]) -> None:
    """ECONNRESET (the peer closed without reading what we sent) reads as PeerClosed."""
    a, b = pair
    a.send(b"never read", timeout=DEADLINE)
    b.close()
    with pytest.raises(PeerClosed):
        a.recv(timeout=DEADLINE)


@pytest.mark.parametrize("type_name", TYPE_IDS)
def test_send_to_closed_peer_raises_peer_closed_without_sigpipe(type_name: str) -> None:
    """Sending to a hung-up peer raises PeerClosed even with SIGPIPE at its default action."""
    # Only SOCK_STREAM would raise SIGPIPE without MSG_NOSIGNAL: Linux fails a
    # SOCK_SEQPACKET send to a closed peer with EPIPE but sends no signal.
    # The seqpacket case still checks that EPIPE reads as PeerClosed.
    script = textwrap.dedent(
        f"""
        import signal, socket, sys
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from shmd.control.connection import Connection
        from shmd.control.frames import SOCKET_TYPES, PeerClosed
        a, b = socket.socketpair(socket.AF_UNIX, SOCKET_TYPES[{type_name!r}])
        b.close()
        try:
            Connection(a).send(b"x", timeout=5)
        except PeerClosed:
            print("peer-closed")
            sys.exit(0)
        sys.exit(3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "peer-closed"


def test_on_readable_reads_a_bounded_amount_per_call(sock_type: int) -> None:
    """One on_readable() call stops after its read budget; the next calls return the rest."""
    a, b = socket.socketpair(socket.AF_UNIX, sock_type)
    with Connection(a) as writer, Connection(b, read_budget=3000) as reader:
        for i in range(10):
            writer.send(i.to_bytes(4, "little") + bytes(996), timeout=DEADLINE)
        first = reader.on_readable()
        assert 1 <= len(first) < 10
        rest = wait_frames(reader, 10 - len(first))
        got = [int.from_bytes(f.body[:4], "little") for f in first + rest]
        assert got == list(range(10))


def test_recv_times_out_with_nothing_sent(pair: tuple[Connection, Connection]) -> None:
    """recv() with a timeout raises WireTimeout when no frame arrives before the deadline."""
    _a, b = pair
    start = time.monotonic()
    with pytest.raises(WireTimeout, match=r"^Failed to receive a frame since .* within 0.05 s"):
        b.recv(timeout=0.05)
    assert time.monotonic() - start >= 0.05


# -- non-blocking output ----------------------------------------------------------


def test_queue_is_bounded_and_drains_in_order_with_fds(
    sock_type: int, pipe: tuple[int, int]
) -> None:
    """Output to a non-reading peer queues up to a bound (then PeerStalled) and drains in order."""
    r, w = pipe
    a, b = socket.socketpair(socket.AF_UNIX, sock_type)
    frame_size = FRAME_HEADER_SIZE + 1000
    writer = Connection(a, max_message=1000, max_outgoing=frame_size * 8)
    reader = Connection(b, max_message=1000)
    got: list[Frame] = []
    try:
        before = open_fds()
        sent = 0
        with_fd = -1
        while not writer.wants_write:
            writer.queue(sent.to_bytes(4, "little") + bytes(996))
            sent += 1
            assert sent < 100_000, "the kernel never pushed back"
        # Queued from now on: a frame with an fd the caller closes right away.
        dup = os.dup(w)
        writer.queue(sent.to_bytes(4, "little") + bytes(996), [dup])
        os.close(dup)
        with_fd = sent
        sent += 1
        with pytest.raises(PeerStalled, match=r"the peer is not reading"):
            while True:
                writer.queue(sent.to_bytes(4, "little") + bytes(996))
                sent += 1
        assert writer.queued_bytes <= frame_size * 8
        got = wait_frames(reader, sent, writer)
        assert [int.from_bytes(f.body[:4], "little") for f in got] == list(range(sent))
        assert [len(f.fds) for f in got] == [1 if i == with_fd else 0 for i in range(sent)]
        os.write(got[with_fd].fds[0].fileno(), b"kept alive")
        assert read_exactly(r, 100) == b"kept alive"
        assert not writer.wants_write
        assert writer.queued_bytes == 0
        for frame in got:
            frame.close()
        got = []
        assert open_fds() == before
    finally:
        for frame in got:
            frame.close()
        writer.close()
        reader.close()


def test_on_writable_reports_peer_closed(sock_type: int) -> None:
    """Queued output for a peer that then hangs up raises PeerClosed from on_writable."""
    a, b = socket.socketpair(socket.AF_UNIX, sock_type)
    with Connection(a, max_message=1000) as writer:
        try:
            while not writer.wants_write:
                writer.queue(bytes(1000))
        finally:
            b.close()
        with pytest.raises(PeerClosed):
            writer.on_writable()


def test_close_releases_queued_fds(sock_type: int) -> None:
    """Closing a connection closes the duplicated fds still waiting in its output queue."""
    a, b = socket.socketpair(socket.AF_UNIX, sock_type)
    with b:
        writer = Connection(a, max_message=1000)
        own_socket = writer.fileno()
        before = open_fds()
        r, w = os.pipe()
        try:
            while not writer.wants_write:
                writer.queue(bytes(1000))
            writer.queue(b"x", [w])
        finally:
            os.close(r)
            os.close(w)
        assert len(open_fds() - before) == 1, "the queued frame holds one duplicated fd"
        writer.close()
        writer.close()
        assert open_fds() == before - {own_socket}
