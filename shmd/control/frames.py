"""The control socket's frames: the header format, its limits, and cutting frames out of bytes.

Bottom of the connection layer (:mod:`shmd.control.connection` moves frames
over a socket, :mod:`shmd.control.listener` makes the sockets).  This module
does no I/O: it turns bodies into frame bytes, checks headers, and reassembles
a byte stream into frames, each with the fds that travelled with it.  It knows
nothing about what the bodies mean (that is :mod:`shmd.control.protocol`).

Frame = 12-byte little-endian header, then ``length`` body bytes::

    magic u16 (0x5344, "SD")  flags u16 (0)  length u32  n_fds u16  reserved u16 (0)

``n_fds`` fds travel with the frame as one SCM_RIGHTS message attached to the
``sendmsg`` call that carries the frame's first byte.  The format is the same
on SOCK_SEQPACKET (one frame per datagram) and SOCK_STREAM (frames
reassembled from arbitrary chunks).  See docs/PROTOCOL.md ("Control
protocol") for the byte-level description.

The errors of the whole connection layer live here too, at its bottom.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from shmd._sys.fd import OwnedFd, close_all
from shmd.errors import ShmdError

FRAME_MAGIC: Final = 0x5344
FRAME_HEADER: Final = struct.Struct("<HHIHH")
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size
# Matches the configuration default control.max_message.
DEFAULT_MAX_MESSAGE: Final = 65536
# Most fds a frame may carry.  The protocol needs 2; the kernel's own limit
# (SCM_MAX_FD) is 253.
MAX_FDS: Final = 16
U32_MAX: Final = 0xFFFF_FFFF

SOCKET_TYPES: Final[dict[str, int]] = {
    "seqpacket": socket.SOCK_SEQPACKET,
    "stream": socket.SOCK_STREAM,
}
_TYPE_NAMES: Final[dict[int, str]] = {v: k for k, v in SOCKET_TYPES.items()}


class ChannelError(ShmdError):
    """Base of everything the connection layer raises on purpose."""


class WireError(ChannelError):
    """The peer broke the framing rules, or a socket operation failed."""


class WireTimeout(WireError):
    """A blocking helper's deadline passed before the operation completed."""


class PeerStalled(WireError):
    """The outgoing queue is full: the peer is not reading."""


class PeerClosed(ChannelError):
    """The peer hung up (EOF, ECONNRESET or EPIPE): the normal end of a connection."""


def why(exc: OSError) -> str:
    """The human part of an OSError (some, like "AF_UNIX path too long", have no strerror)."""
    return exc.strerror or str(exc)


def type_name(sock_type: int) -> str:
    """Return the configuration spelling of a socket type ("seqpacket", "stream")."""
    return _TYPE_NAMES.get(sock_type, f"type {sock_type}")


def check_type(sock_type: int) -> None:
    """Refuse (WireError) a socket type other than SOCK_SEQPACKET and SOCK_STREAM."""
    if sock_type not in _TYPE_NAMES:
        raise WireError(
            f"Failed to use socket type {sock_type} since only SOCK_SEQPACKET and "
            "SOCK_STREAM are supported"
        )


@dataclass(frozen=True, slots=True)
class Frame:
    """One received frame: its body and the fds that travelled with it (owned).

    The frame owns its fds until the caller detaches or closes them.
    """

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


def close_frames(frames: list[Frame]) -> None:
    """Close every fd of every frame, even when one close fails (first error re-raised)."""
    close_all(fd for frame in frames for fd in frame.fds)


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
    return FRAME_HEADER.pack(FRAME_MAGIC, 0, len(body), n_fds, 0) + bytes(body)


def decode_frame_header(header: bytes | bytearray, max_message: int) -> tuple[int, int]:
    """Check a 12-byte frame header; return (body length, n_fds)."""
    if len(header) < FRAME_HEADER_SIZE:
        raise WireError(
            f"Failed to receive a frame since its header is truncated "
            f"({len(header)} of {FRAME_HEADER_SIZE} bytes)"
        )
    magic, flags, length, n_fds, reserved = FRAME_HEADER.unpack_from(header)
    if magic != FRAME_MAGIC:
        raise WireError(
            f"Failed to receive a frame since its magic is 0x{magic:04x}, "
            f"not 0x{FRAME_MAGIC:04x} (is the peer speaking the shmd control protocol?)"
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


def datagram_frame(data: bytes, fds: list[OwnedFd], truncated: bool, max_message: int) -> Frame:
    """The frame one SOCK_SEQPACKET datagram carries, checked against its header.

    ``truncated`` is MSG_TRUNC: the datagram was longer than the read.  The
    fds become the frame's only on success; on an error the caller still
    owns (and closes) them.
    """
    length, n_fds = decode_frame_header(data, max_message)
    if truncated or len(data) - FRAME_HEADER_SIZE != length:
        more = "more" if truncated else f"{len(data) - FRAME_HEADER_SIZE}"
        raise WireError(
            f"Failed to receive a frame since its header says {length} body bytes "
            f"but the datagram carries {more}"
        )
    if len(fds) != n_fds:
        raise WireError(
            f"Failed to receive a frame since it declares {n_fds} fds "
            f"but {len(fds)} arrived with it"
        )
    return Frame(bytes(data[FRAME_HEADER_SIZE:]), tuple(fds))


@dataclass(slots=True)
class _FdBatch:
    """Fds from one stream read, with the stream offsets [start, end) that read covered."""

    start: int
    end: int
    fds: list[OwnedFd]


class StreamFrames:
    """Reassembles frames from the reads of a SOCK_STREAM socket, each with its fds.

    Owns the bytes and fds of reads no complete frame has claimed yet.
    """

    __slots__ = ("_fds", "_max_message", "_pos", "_rx")

    def __init__(self, max_message: int) -> None:
        self._max_message = max_message
        self._rx = bytearray()
        self._pos = 0  # stream offset of self._rx[0]
        self._fds: deque[_FdBatch] = deque()

    @property
    def pending(self) -> int:
        """Bytes of a frame that has not arrived whole yet."""
        return len(self._rx)

    def add(self, data: bytes, fds: list[OwnedFd]) -> None:
        """Take one read's bytes and the fds that came with it (owned from now on)."""
        start = self._pos + len(self._rx)
        self._rx += data
        if fds:
            self._fds.append(_FdBatch(start, start + len(data), fds))

    def frames(self) -> list[Frame]:
        """Cut complete frames out of the buffer and give each its fds.

        Linux delivers the fds of a sendmsg() with the read that returns that
        call's first byte, and stops a read right after it (it never glues
        the following data on); earlier data can be glued in front.  So the
        fds of a frame arrive with the read whose range [start, end) contains
        the frame's first byte, and fds whose read range holds no frame start
        were never declared by any frame.
        """
        frames: list[Frame] = []
        try:
            while len(self._rx) >= FRAME_HEADER_SIZE:
                length, n_fds = decode_frame_header(self._rx, self._max_message)
                end = FRAME_HEADER_SIZE + length
                if len(self._rx) < end:
                    break
                fds = self._claim_fds(self._pos, n_fds)
                frames.append(Frame(bytes(self._rx[FRAME_HEADER_SIZE:end]), fds))
                del self._rx[:end]
                self._pos += end
            # The first unparsed byte starts the only frame still incomplete;
            # any fds held must belong to it.
            self._orphans_before(self._pos + 1)
            if len(self._fds) > 1 or (self._fds and self._fds[0].start > self._pos):
                raise WireError(
                    "Failed to receive a frame since fds arrived that no frame declared"
                )
        except BaseException:
            close_frames(frames)
            raise
        return frames

    def discard(self) -> list[OwnedFd]:
        """Forget a half-received frame; return the fds nobody claimed, for the caller to close."""
        held: list[OwnedFd] = []
        while self._fds:
            held.extend(self._fds.popleft().fds)
        self._pos += len(self._rx)
        self._rx.clear()
        return held

    def _orphans_before(self, pos: int) -> None:
        if self._fds and self._fds[0].end < pos:
            raise WireError(
                f"Failed to receive a frame since {len(self._fds[0].fds)} fds arrived "
                "that no frame declared"
            )

    def _claim_fds(self, frame_pos: int, n_fds: int) -> tuple[OwnedFd, ...]:
        self._orphans_before(frame_pos + 1)
        if n_fds == 0:
            return ()
        batch = self._fds[0] if self._fds else None
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
        self._fds.popleft()
        return tuple(batch.fds)
