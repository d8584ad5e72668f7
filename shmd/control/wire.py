"""Connection layer of the shmd control socket: frames and fd passing.

This module knows nothing about what messages mean (that is
:mod:`shmd.control.protocol`); it moves opaque frame bodies plus the fds that travel
with them, over AF_UNIX SOCK_SEQPACKET (one frame per datagram) or
SOCK_STREAM (frames reassembled from arbitrary chunks).  The frame format is
the same on both, so callers never need to know which one they hold.

Frame = 12-byte little-endian header, then ``length`` body bytes::

    magic u16 (0x5344, "SD")  flags u16 (0)  length u32  n_fds u16  reserved u16 (0)

``n_fds`` fds travel with the frame as one SCM_RIGHTS message attached to the
``sendmsg`` call that carries the frame's first byte.  See
docs/PROTOCOL.md ("Control protocol") for the byte-level description.

Ownership: every fd received is wrapped in an :class:`OwnedFd` the moment
``recvmsg`` returns, and every error path closes all fds of the datagram or
read that failed.  A :class:`Frame` owns its fds until the caller detaches or
closes them.
"""

from __future__ import annotations

import array
import errno
import math
import os
import select
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from shmd._sys.fd import OwnedFd, close_all
from shmd.errors import ShmdError

MAGIC: Final = 0x5344
HEADER: Final = struct.Struct("<HHIHH")
HEADER_SIZE: Final = HEADER.size
# Matches the configuration default control.max_message.
DEFAULT_MAX_MESSAGE: Final = 65536
# Most fds a frame may carry.  The protocol needs 2; the kernel's own limit
# (SCM_MAX_FD) is 253.
MAX_FDS: Final = 16
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF

SOCKET_TYPES: Final[dict[str, int]] = {
    "seqpacket": socket.SOCK_SEQPACKET,
    "stream": socket.SOCK_STREAM,
}
_TYPE_NAMES: Final[dict[int, str]] = {v: k for k, v in SOCKET_TYPES.items()}

_FD_SIZE: Final = array.array("i").itemsize
_PEERCRED: Final = struct.Struct("3i")
_GID = struct.Struct("=I")
# socket.SO_PEERGROUPS is missing from Python's socket module; 59 on every Linux
# architecture (asm-generic/socket.h).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_STREAM_READ: Final = 65536
_TIMEVAL: Final = struct.Struct("@ll")


class ChannelError(ShmdError):
    """Base of everything this module raises on purpose."""


class WireError(ChannelError):
    """The peer broke the framing rules, or a socket operation failed."""


class WireTimeout(WireError):
    """A blocking helper's deadline passed before the operation completed."""


class PeerStalled(WireError):
    """The outgoing queue is full: the peer is not reading."""


class PeerClosed(ChannelError):
    """The peer hung up (EOF, ECONNRESET or EPIPE): the normal end of a connection."""


def _why(exc: OSError) -> str:
    """The human part of an OSError (some, like "AF_UNIX path too long", have no strerror)."""
    return exc.strerror or str(exc)


def type_name(sock_type: int) -> str:
    """Return the configuration spelling of a socket type ("seqpacket", "stream")."""
    return _TYPE_NAMES.get(sock_type, f"type {sock_type}")


def _check_type(sock_type: int) -> None:
    if sock_type not in _TYPE_NAMES:
        raise WireError(
            f"Failed to use socket type {sock_type} since only SOCK_SEQPACKET and "
            "SOCK_STREAM are supported"
        )


@dataclass(frozen=True, slots=True)
class Frame:
    """One received frame: its body and the fds that travelled with it (owned)."""

    body: bytes
    fds: tuple[OwnedFd, ...] = ()

    def close(self) -> None:
        close_all(self.fds)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def encode_frame(body: bytes, n_fds: int, max_message: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """Return header + body for a frame carrying ``n_fds`` fds."""
    if len(body) > max_message:
        raise WireError(
            f"Failed to send a frame since its body is {len(body)} bytes, "
            f"more than max_message {max_message}"
        )
    if not 0 <= n_fds <= MAX_FDS:
        raise WireError(
            f"Failed to send a frame since it carries {n_fds} fds, the limit is {MAX_FDS}"
        )
    return HEADER.pack(MAGIC, 0, len(body), n_fds, 0) + bytes(body)


def decode_header(header: bytes | bytearray, max_message: int) -> tuple[int, int]:
    """Check a 12-byte frame header; return (body length, n_fds)."""
    if len(header) < HEADER_SIZE:
        raise WireError(
            f"Failed to receive a frame since its header is truncated "
            f"({len(header)} of {HEADER_SIZE} bytes)"
        )
    magic, flags, length, n_fds, reserved = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise WireError(
            f"Failed to receive a frame since its magic is 0x{magic:04x}, not 0x{MAGIC:04x} "
            "(is the peer speaking the shmd control protocol?)"
        )
    if flags != 0:
        raise WireError(f"Failed to receive a frame since its flags are 0x{flags:04x}, not 0")
    if reserved != 0:
        raise WireError(
            f"Failed to receive a frame since its reserved field is 0x{reserved:04x}, not 0"
        )
    if length > max_message:
        raise WireError(
            f"Failed to receive a frame since its body is {length} bytes, "
            f"more than max_message {max_message}"
        )
    if n_fds > MAX_FDS:
        raise WireError(
            f"Failed to receive a frame since it declares {n_fds} fds, the limit is {MAX_FDS}"
        )
    return length, n_fds


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
class _FdBatch:
    """Fds from one stream read, with the stream offsets [start, end) that read covered."""

    start: int
    end: int
    fds: list[OwnedFd]


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
        _check_type(sock_type)
        if not 0 <= max_message <= U32_MAX or not 0 < max_fds <= MAX_FDS:
            raise ValueError(
                f"Failed to create a connection since max_message {max_message} or "
                f"max_fds {max_fds} is out of range"
            )
        # A whole frame must always fit, or a half-sent stream frame could
        # never be completed.
        min_outgoing = HEADER_SIZE + max_message
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
        self._rx = bytearray()
        self._rx_pos = 0  # stream offset of self._rx[0]
        self._rx_fds: deque[_FdBatch] = deque()
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
                raise WireError(f"Failed to read the peer's groups since {_why(exc)}") from None
            return tuple(g for (g,) in _GID.iter_unpack(raw[: len(raw) // _GID.size * _GID.size]))

    def close(self) -> None:
        """Close the socket and every fd still held; closing twice is harmless."""
        sock, self._sock = self._sock, None
        held: list[OwnedFd] = []
        while self._ready:
            held.extend(self._ready.popleft().fds)
        while self._rx_fds:
            held.extend(self._rx_fds.popleft().fds)
        while self._out:
            held.extend(self._out.popleft().fds)
        self._out_bytes = 0
        self._rx.clear()
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
                budget -= max(got, HEADER_SIZE)
                if self._type == socket.SOCK_STREAM:
                    frames.extend(self._parse_stream())
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
            for frame in frames:
                frame.close()
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
        bufsize = HEADER_SIZE + self._max_message
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
            raise WireError(f"Failed to receive a frame since {_why(exc)}") from None
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
                self._add_stream_bytes(data, fds)
            else:
                self._ready.append(self._datagram_frame(data, fds, flags))
        except BaseException:
            close_all(fds)
            raise
        return len(data)

    def _datagram_frame(self, data: bytes, fds: list[OwnedFd], flags: int) -> Frame:
        if not data and not fds:
            # SOCK_SEQPACKET reads 0 bytes at EOF.  A zero-length datagram
            # reads the same, but a frame is never shorter than its header,
            # so only a broken peer could send one.
            raise PeerClosed("Failed to receive a frame since the peer closed the connection")
        length, n_fds = decode_header(data, self._max_message)
        if flags & socket.MSG_TRUNC or len(data) - HEADER_SIZE != length:
            more = "more" if flags & socket.MSG_TRUNC else f"{len(data) - HEADER_SIZE}"
            raise WireError(
                f"Failed to receive a frame since its header says {length} body bytes "
                f"but the datagram carries {more}"
            )
        if len(fds) != n_fds:
            raise WireError(
                f"Failed to receive a frame since it declares {n_fds} fds "
                f"but {len(fds)} arrived with it"
            )
        return Frame(bytes(data[HEADER_SIZE:]), tuple(fds))

    def _add_stream_bytes(self, data: bytes, fds: list[OwnedFd]) -> None:
        if not data:
            raise PeerClosed(
                "Failed to receive a frame since the peer closed the connection"
                + (f" in the middle of a frame ({len(self._rx)} bytes)" if self._rx else "")
            )
        start = self._rx_pos + len(self._rx)
        self._rx += data
        if fds:
            self._rx_fds.append(_FdBatch(start, start + len(data), fds))

    def _parse_stream(self) -> list[Frame]:
        """Cut complete frames out of the stream buffer and give each its fds.

        Linux delivers the fds of a sendmsg() with the read that returns that
        call's first byte, and stops a read right after it (it never glues
        the following data on); earlier data can be glued in front.  So the
        fds of a frame arrive with the read whose range [start, end) contains
        the frame's first byte, and fds whose read range holds no frame start
        were never declared by any frame.
        """
        frames: list[Frame] = []
        try:
            while len(self._rx) >= HEADER_SIZE:
                length, n_fds = decode_header(self._rx, self._max_message)
                if len(self._rx) < HEADER_SIZE + length:
                    break
                fds = self._claim_fds(self._rx_pos, n_fds)
                frames.append(Frame(bytes(self._rx[HEADER_SIZE : HEADER_SIZE + length]), fds))
                del self._rx[: HEADER_SIZE + length]
                self._rx_pos += HEADER_SIZE + length
            # The first unparsed byte starts the only frame still incomplete;
            # any fds held must belong to it.
            self._orphans_before(self._rx_pos + 1)
            if len(self._rx_fds) > 1 or (self._rx_fds and self._rx_fds[0].start > self._rx_pos):
                raise WireError(
                    "Failed to receive a frame since fds arrived that no frame declared"
                )
        except BaseException:
            for frame in frames:
                frame.close()
            raise
        return frames

    def _orphans_before(self, pos: int) -> None:
        if self._rx_fds and self._rx_fds[0].end < pos:
            raise WireError(
                f"Failed to receive a frame since {len(self._rx_fds[0].fds)} fds arrived "
                "that no frame declared"
            )

    def _claim_fds(self, frame_pos: int, n_fds: int) -> tuple[OwnedFd, ...]:
        self._orphans_before(frame_pos + 1)
        if n_fds == 0:
            return ()
        batch = self._rx_fds[0] if self._rx_fds else None
        if batch is None or batch.start > frame_pos:
            raise WireError(
                f"Failed to receive a frame since it declares {n_fds} fds "
                "but none arrived with its first byte"
            )
        if len(batch.fds) != n_fds:
            raise WireError(
                f"Failed to receive a frame since it declares {n_fds} fds "
                f"but {len(batch.fds)} arrived with it"
            )
        self._rx_fds.popleft()
        return tuple(batch.fds)

    def _drop_partial(self) -> None:
        """Forget a half-received stream frame and close fds nobody claimed."""
        held: list[OwnedFd] = []
        while self._rx_fds:
            held.extend(self._rx_fds.popleft().fds)
        self._rx_pos += len(self._rx)
        self._rx.clear()
        close_all(held)

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
                    f"Failed to queue a frame since duplicating its fds failed: {_why(exc)}"
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
            raise WireError(f"Failed to send a frame since {_why(exc)}") from None

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


# -- listener helpers -------------------------------------------------------


def _probe_live(path: str, sock_type: int) -> bool:
    """Return whether some process accepts connections on the socket file ``path``."""
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except FileNotFoundError:
        return False
    except BlockingIOError:
        # A non-blocking AF_UNIX connect fails with EAGAIN (not EINPROGRESS)
        # when the listener's backlog is full: somebody is listening.
        return True
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            # A listener of the other socket type: alive all the same.
            return True
        raise WireError(
            f"Failed to bind the control socket {path} since probing the socket file already "
            f"there failed: {_why(exc)}"
        ) from None
    finally:
        probe.close()
    return True


def bind_listener(
    path: str, sock_type: int = socket.SOCK_SEQPACKET, mode: int = 0o660, *, backlog: int = 64
) -> socket.socket:
    """Bind and listen on ``path``, replacing a stale socket file left by a dead process.

    Refuses (WireError) when ``path`` is something other than a socket, or
    when another process is still listening there.  The socket file gets
    exactly ``mode``.
    """
    _check_type(sock_type)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise WireError(f"Failed to bind the control socket {path} since {_why(exc)}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise WireError(
                f"Failed to bind the control socket {path} since something that is not a "
                "socket is already there; remove it or choose another path"
            )
        # Connecting is the only way to tell a live listener from a stale
        # file.  (Two writers racing here could both see it stale; systemd
        # socket activation is the race-free way to run one.)
        if _probe_live(path, sock_type):
            raise WireError(
                f"Failed to bind the control socket {path} since another process is listening on it"
            )
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise WireError(
                f"Failed to remove the stale control socket {path} since {_why(exc)}"
            ) from None
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    bound = False
    try:
        # Linux creates the socket file with the socket inode's mode minus
        # the umask, so setting the mode before bind() means the file is
        # never more open than asked; chmod() afterwards adds back what the
        # umask took away.
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        bound = True
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if bound:
            os.unlink(path)
        raise WireError(f"Failed to bind the control socket {path} since {_why(exc)}") from None
    return sock


def connect(
    path: str,
    sock_type: int = socket.SOCK_SEQPACKET,
    timeout: float | None = None,
    *,
    max_message: int = DEFAULT_MAX_MESSAGE,
) -> Connection:
    """Connect to the control socket at ``path`` and return the connection."""
    _check_type(sock_type)
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        if timeout is not None:
            # A blocking AF_UNIX connect waits for room in the listener's
            # backlog for at most SO_SNDTIMEO (Python's own timeout mode would
            # make a full backlog fail at once with EAGAIN).
            secs = max(timeout, 0.001)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                _TIMEVAL.pack(int(secs), int((secs % 1) * 1_000_000)),
            )
        sock.connect(path)
        if timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))
    except OSError as exc:
        sock.close()
        raise _connect_error(path, sock_type, exc, timeout) from None
    try:
        return Connection(sock, max_message=max_message)
    except BaseException:
        sock.close()
        raise


def _connect_error(path: str, sock_type: int, exc: OSError, timeout: float | None) -> WireError:
    prefix = f"Failed to connect to the control socket {path} since"
    if exc.errno == errno.ENOENT:
        return WireError(f"{prefix} it does not exist (is shm-writer.socket running?)")
    if exc.errno == errno.ECONNREFUSED:
        return WireError(f"{prefix} nothing is listening on it")
    if exc.errno == errno.EPROTOTYPE:
        return WireError(f"{prefix} it is not a {type_name(sock_type)} socket")
    if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT):
        return WireTimeout(f"{prefix} the listener did not accept within {timeout:g} s")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return WireError(f"{prefix} this user may not open it (permission denied)")
    return WireError(f"{prefix} {_why(exc)}")


def accept(listener: socket.socket, *, max_message: int = DEFAULT_MAX_MESSAGE) -> Connection | None:
    """Accept one connection; None when a non-blocking listener has none pending."""
    try:
        # Python's accept() uses accept4(SOCK_CLOEXEC).
        sock, _addr = listener.accept()
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.ECONNABORTED:
            return None
        raise WireError(f"Failed to accept a control connection since {_why(exc)}") from None
    try:
        return Connection(sock, max_message=max_message)
    except BaseException:
        sock.close()
        raise


def check_inherited_listener(sock: socket.socket, path: str, sock_type: int) -> None:
    """Check that a socket passed in by systemd is the listener the configuration names."""
    _check_type(sock_type)
    try:
        family = sock.family
        name: str | bytes = sock.getsockname() if family == socket.AF_UNIX else ""
        actual_type = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise WireError(
            f"Failed to use the inherited control socket since inspecting it failed: {_why(exc)}"
        ) from None
    if isinstance(name, bytes):
        # Abstract-namespace address: show it the way ss(8) does.
        name = "@" + name.lstrip(b"\0").decode(errors="replace")
    want = f"{path!r} ({type_name(sock_type)})"
    if family != socket.AF_UNIX:
        raise WireError(
            f"Failed to use the inherited control socket since it is a "
            f"{getattr(family, 'name', family)} socket "
            f"but the configuration says {want}"
        )
    if os.path.normpath(name or ".") != os.path.normpath(path) or actual_type != sock_type:
        have = (
            f"{name!r} ({type_name(actual_type)})"
            if name
            else f"unbound ({type_name(actual_type)})"
        )
        raise WireError(
            f"Failed to use the inherited control socket since it is {have} but the "
            f"configuration says {want}; make the socket unit's Listen line and "
            "control.socket/control.type agree"
        )
    if not listening:
        raise WireError(
            f"Failed to use the inherited control socket {path!r} since it is not listening"
        )
