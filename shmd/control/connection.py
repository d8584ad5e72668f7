"""One connected control socket: frames and the fds that travel with them, buffered both ways.

The middle of the connection layer: it moves opaque frame bodies (see
:mod:`shmd.control.frames` for the format) plus their fds over AF_UNIX
SOCK_SEQPACKET (one frame per datagram) or SOCK_STREAM (frames reassembled
from arbitrary chunks), so callers never need to know which one they hold.
Making and accepting connections is :mod:`shmd.control.listener`.

Ownership: every fd received is wrapped in an :class:`OwnedFd` the moment
``recvmsg`` returns, and every error path closes all fds of the datagram or
read that failed.  A :class:`Frame` owns its fds until the caller detaches or
closes them.
"""

from __future__ import annotations

import array
import errno
import math
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from shmd._sys.fd import OwnedFd, close_all
from shmd.control.frames import (
    DEFAULT_MAX_MESSAGE,
    FRAME_HEADER_SIZE,
    MAX_FDS,
    U32_MAX,
    Frame,
    PeerClosed,
    PeerStalled,
    StreamFrames,
    WireError,
    WireTimeout,
    check_type,
    close_frames,
    datagram_frame,
    encode_frame,
    type_name,
    why,
)

_FD_SIZE: Final = array.array("i").itemsize
_PEERCRED: Final = struct.Struct("3i")
_GID = struct.Struct("=I")
# socket.SO_PEERGROUPS is missing from Python's socket module; 59 on every Linux
# architecture (asm-generic/socket.h).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_STREAM_READ: Final = 65536


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
    """Wrap every fd of every SCM_RIGHTS message in an owner; nothing else may fail first."""
    owned: list[OwnedFd] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            # The kernel only ever writes whole ints; a ragged tail (none
            # seen in practice) would be cut cmsg padding, not an fd.
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            owned.extend(OwnedFd(fd) for fd in fds)
    return owned


@dataclass(slots=True)
class _Outgoing:
    data: bytes
    offset: int = 0
    fds: list[OwnedFd] = field(default_factory=list)


class Connection:
    """One connected control socket (SOCK_SEQPACKET or SOCK_STREAM), owned.

    The socket is always non-blocking underneath.  Clients use the blocking
    helpers :meth:`send` and :meth:`recv` (both wait with ``poll`` and a
    deadline).  An epoll loop registers :meth:`fileno` level-triggered for
    EPOLLIN (plus EPOLLOUT while :attr:`wants_write`) and calls
    :meth:`on_readable`, :meth:`queue` and :meth:`on_writable`.

    After a :class:`WireError` the stream cannot be trusted any more: close
    the connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_outgoing: int | None = None,
        max_fds: int = MAX_FDS,
        read_budget: int | None = None,
    ) -> None:
        if sock.family != socket.AF_UNIX:
            raise WireError(
                f"Failed to use a {sock.family!r} socket since only AF_UNIX is supported"
            )
        sock_type = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        check_type(sock_type)
        if not 0 <= max_message <= U32_MAX or not 0 < max_fds <= MAX_FDS:
            raise ValueError(
                f"Failed to create a connection since max_message {max_message} or "
                f"max_fds {max_fds} is out of range"
            )
        # A whole frame must always fit, or a half-sent stream frame could
        # never be completed.
        min_outgoing = FRAME_HEADER_SIZE + max_message
        if max_outgoing is None:
            max_outgoing = max(16 * min_outgoing, 1 << 20)
        if max_outgoing < min_outgoing:
            raise ValueError(
                f"Failed to create a connection since max_outgoing {max_outgoing} is "
                f"smaller than one frame ({min_outgoing} bytes)"
            )
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._type = sock_type
        self._max_message = max_message
        self._max_outgoing = max_outgoing
        self._max_fds = max_fds
        # Most bytes one on_readable() call reads, so that a flooding peer
        # cannot keep an epoll loop to itself (level-triggered epoll calls
        # again).
        self._read_budget = read_budget or max(4 * min_outgoing, 256 * 1024)
        self._stream = StreamFrames(max_message)
        self._ready: deque[Frame] = deque()
        self._eof: PeerClosed | None = None
        self._failed: WireError | None = None
        self._out: deque[_Outgoing] = deque()
        self._out_bytes = 0

    # -- basics -----------------------------------------------------------

    @property
    def sock_type(self) -> int:
        """socket.SOCK_SEQPACKET or socket.SOCK_STREAM."""
        return self._type

    @property
    def max_message(self) -> int:
        return self._max_message

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def wants_write(self) -> bool:
        """True while queued output waits for the socket to become writable."""
        return bool(self._out)

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    def fileno(self) -> int:
        return self._socket().fileno()

    def peer_credentials(self) -> tuple[int, int, int]:
        """Return the peer's (pid, uid, gid) from SO_PEERCRED."""
        # The kernel records these when the connection is made (connect() on
        # the client side, listen() on the listener's side), not per message:
        # a peer that exec()s or hands its socket on keeps the recorded pid.
        raw = self._socket().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
        return pid, uid, gid

    def peer_groups(self) -> tuple[int, ...]:
        """The peer's supplementary groups from SO_PEERGROUPS (Linux 4.13+).

        Like SO_PEERCRED, recorded at connect time.  Unlike reading
        /proc/<pid>/status it works when the peer's /proc entry is hidden
        (ProtectProc=invisible) and cannot race with pid reuse.
        """
        sock = self._socket()
        size = 64 * _GID.size
        while True:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
            except OSError as exc:
                if exc.errno == errno.ERANGE and size < (1 << 20):
                    size *= 16  # more groups than we asked room for
                    continue
                raise WireError(f"Failed to read the peer's groups since {why(exc)}") from None
            return tuple(g for (g,) in _GID.iter_unpack(raw[: len(raw) // _GID.size * _GID.size]))

    def close(self) -> None:
        """Close the socket and every fd still held; closing twice is harmless."""
        sock, self._sock = self._sock, None
        held: list[OwnedFd] = []
        while self._ready:
            held.extend(self._ready.popleft().fds)
        held.extend(self._stream.discard())
        while self._out:
            held.extend(self._out.popleft().fds)
        self._out_bytes = 0
        try:
            close_all(held)
        finally:
            if sock is not None:
                sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<Connection {type_name(self._type)} {state}>"

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise WireError("Failed to use the connection since it is closed")
        return self._sock

    # -- receiving --------------------------------------------------------

    def on_readable(self) -> list[Frame]:
        """Read what is available (bounded per call) and return the complete frames.

        Raises :class:`PeerClosed` on hang-up, but only once the frames that
        arrived before the hang-up have been returned.  Raises
        :class:`WireError` (closing every fd of the offending read) when the
        peer breaks the framing rules.
        """
        if self._failed is not None:
            raise WireError(
                f"Failed to read from the connection since it already failed: {self._failed}"
            )
        frames = list(self._ready)
        self._ready.clear()
        if self._eof is not None:
            if frames:
                return frames
            raise self._eof
        budget = self._read_budget
        try:
            while budget > 0:
                got = self._read_once(budget)
                if got < 0:
                    break
                budget -= max(got, FRAME_HEADER_SIZE)
                if self._type == socket.SOCK_STREAM:
                    frames.extend(self._stream.frames())
                elif self._ready:
                    frames.append(self._ready.popleft())
        except PeerClosed as exc:
            self._drop_partial()
            if frames:
                self._eof = exc
                return frames
            raise
        except BaseException as exc:
            self._drop_partial()
            close_frames(frames)
            if isinstance(exc, WireError):
                self._failed = exc
            raise
        return frames

    def recv(self, timeout: float | None = None) -> Frame:
        """Block (poll with a deadline) until one frame arrives and return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self._eof is not None:
                raise self._eof
            self._wait(select.POLLIN, deadline, timeout, "receive a frame")
            self._ready.extend(self.on_readable())
        return self._ready.popleft()

    def _read_once(self, budget: int) -> int:
        """Do one recvmsg; return the byte count, or -1 when it would block.

        On a stream it reads at most ``budget`` bytes; a datagram is always
        read whole.
        """
        sock = self._socket()
        bufsize = FRAME_HEADER_SIZE + self._max_message
        if self._type == socket.SOCK_STREAM:
            bufsize = max(1, min(_STREAM_READ, budget))
        try:
            data, ancdata, flags, _addr = sock.recvmsg(
                bufsize, socket.CMSG_LEN(self._max_fds * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return -1
        except ConnectionResetError:
            # Linux reports ECONNRESET when the peer closed with data of ours
            # still unread in its receive queue: for us that is a hang-up.
            raise PeerClosed(
                "Failed to receive a frame since the peer reset the connection"
            ) from None
        except OSError as exc:
            raise WireError(f"Failed to receive a frame since {why(exc)}") from None
        fds = _take_fds(ancdata)
        try:
            if flags & socket.MSG_CTRUNC:
                # The kernel installed only the fds that fitted and dropped
                # (closed) the rest itself; we close the ones we got.
                raise WireError(
                    f"Failed to receive a frame since the peer sent more than {self._max_fds} "
                    "fds with it"
                )
            if self._type == socket.SOCK_STREAM:
                if not data:
                    pending = self._stream.pending
                    raise PeerClosed(
                        "Failed to receive a frame since the peer closed the connection"
                        + (f" in the middle of a frame ({pending} bytes)" if pending else "")
                    )
                self._stream.add(data, fds)
            else:
                if not data and not fds:
                    # SOCK_SEQPACKET reads 0 bytes at EOF.  A zero-length datagram
                    # reads the same, but a frame is never shorter than its header,
                    # so only a broken peer could send one.
                    raise PeerClosed(
                        "Failed to receive a frame since the peer closed the connection"
                    )
                truncated = bool(flags & socket.MSG_TRUNC)
                self._ready.append(datagram_frame(data, fds, truncated, self._max_message))
        except BaseException:
            close_all(fds)
            raise
        return len(data)

    def _drop_partial(self) -> None:
        """Forget a half-received stream frame and close fds nobody claimed."""
        close_all(self._stream.discard())

    # -- sending ----------------------------------------------------------

    def queue(self, body: bytes, fds: Sequence[int] = ()) -> None:
        """Send a frame now if the socket takes it, else queue it (bounded).

        The caller keeps ownership of ``fds``: what must wait in the queue is
        duplicated first, so the caller may close its fds right away.
        Raises :class:`PeerStalled` when the queue would exceed its bound.
        """
        sock = self._socket()
        if len(fds) > self._max_fds:
            raise WireError(
                f"Failed to send a frame since it carries {len(fds)} fds, "
                f"the limit is {self._max_fds}"
            )
        frame = encode_frame(body, len(fds), self._max_message)
        sent = 0
        if not self._out:
            sent = self._send_raw(sock, frame, fds)
            if sent == len(frame):
                return
            sent = max(sent, 0)
        remaining = len(frame) - sent
        if self._out_bytes + remaining > self._max_outgoing:
            raise PeerStalled(
                f"Failed to queue a frame for the peer since {self._out_bytes} bytes are "
                f"already waiting (limit {self._max_outgoing}): the peer is not reading"
            )
        owned: list[OwnedFd] = []
        if sent == 0:
            try:
                for fd in fds:
                    owned.append(OwnedFd.dup(fd))
            except OSError as exc:
                close_all(owned)
                raise WireError(
                    f"Failed to queue a frame since duplicating its fds failed: {why(exc)}"
                ) from None
        # Stream only: a partial send already delivered the fds with the
        # first byte; the rest of the frame follows without them.
        self._out.append(_Outgoing(frame, sent, owned))
        self._out_bytes += remaining

    def on_writable(self) -> None:
        """Send as much queued output as the socket takes now."""
        sock = self._socket()
        while self._out:
            item = self._out[0]
            first = item.offset == 0
            fds = [fd.fileno() for fd in item.fds] if first else []
            sent = self._send_raw(sock, memoryview(item.data)[item.offset :], fds)
            if sent < 0:
                return
            if first:
                # The kernel holds its own references to in-flight fds.
                close_all(item.fds)
                item.fds.clear()
            item.offset += sent
            self._out_bytes -= sent
            if item.offset == len(item.data):
                self._out.popleft()

    def send(self, body: bytes, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        """Send one frame, blocking (poll with a deadline) until the kernel took all of it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.queue(body, fds)
        while self._out:
            self._wait(select.POLLOUT, deadline, timeout, "send a frame")
            self.on_writable()

    def _send_raw(self, sock: socket.socket, data: bytes | memoryview, fds: Sequence[int]) -> int:
        """One sendmsg; return bytes sent, or -1 when it would block."""
        ancdata: list[tuple[int, int, bytes]] = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            return sock.sendmsg([data], ancdata, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return -1
        except (BrokenPipeError, ConnectionResetError):
            raise PeerClosed("Failed to send since the peer closed the connection") from None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise WireError(
                    f"Failed to send a {len(data)}-byte frame since the kernel refused it as "
                    "too large (EMSGSIZE: the socket buffer is smaller; raise SO_SNDBUF or "
                    "lower max_message)"
                ) from None
            if exc.errno == errno.EBADF and fds:
                raise WireError("Failed to send a frame since one of its fds is not open") from None
            raise WireError(f"Failed to send a frame since {why(exc)}") from None

    def _wait(self, events: int, deadline: float | None, timeout: float | None, what: str) -> None:
        poller = select.poll()
        poller.register(self._socket(), events)
        while True:
            if deadline is None:
                ms = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireTimeout(
                        f"Failed to {what} since the peer did not respond within {timeout:g} s"
                    )
                ms = math.ceil(left * 1000)
            if poller.poll(ms):
                return
