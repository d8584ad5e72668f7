"""Fuzz the decoding of control frames and messages from a peer.

Input: ``mode u8`` then the bytes a peer sent.  mode bits 0-2 cut the bytes
into that many + 1 stream reads; bit 3 a small max_message (64) instead of
the default.  The bytes go through the three entry points a peer reaches:

* ``datagram_frame`` (one SOCK_SEQPACKET datagram, no fds),
* ``StreamFrames`` (SOCK_STREAM reads reassembled),
* ``protocol.decode`` of every frame body, with the fd count its header declares;

each must give frames/messages or raise WireError / ProtocolError, nothing
else.  A decoded message must encode back to its body, exactly
(``decode(b, n).encode() == b``: the protocol module's promise).

    python -m fuzz frames fuzz/corpus/frames -max_total_time=60
"""

from __future__ import annotations

from shmd.control import protocol
from shmd.control.frames import (
    DEFAULT_MAX_MESSAGE,
    FRAME_HEADER_SIZE,
    StreamFrames,
    WireError,
    datagram_frame,
    decode_frame_header,
)
from shmd.control.protocol import ProtocolError


def check_body(body: bytes, n_fds: int) -> None:
    """A body decodes to a message that encodes back to it, or raises ProtocolError."""
    try:
        msg = protocol.decode(body, n_fds)
    except ProtocolError as exc:
        assert str(exc).startswith("Failed to "), str(exc)
        return
    assert n_fds == type(msg).N_FDS
    assert msg.encode() == body, (msg, body)


def test_one_input(data: bytes) -> None:
    """One input: see the module docstring."""
    mode, raw = (data[0], data[1:]) if data else (0, b"")
    max_message = 64 if mode & 8 else DEFAULT_MAX_MESSAGE
    # A body as a bare message too (the connection decodes bodies it framed itself).
    check_body(raw, len(raw) % 4)
    # One datagram.
    try:
        frame = datagram_frame(raw, [], truncated=False, max_message=max_message)
    except WireError as exc:
        assert str(exc).startswith("Failed to "), str(exc)
    else:
        length, n_fds = decode_frame_header(raw, max_message)
        assert n_fds == 0 and frame.body == raw[FRAME_HEADER_SIZE:] and len(frame.body) == length
        check_body(frame.body, n_fds)
    # A stream, in reads of the input's choosing.
    parts = (mode & 7) + 1
    step = max(1, len(raw) // parts)
    stream = StreamFrames(max_message)
    taken = 0
    try:
        for i in range(0, max(len(raw), 1), step):
            stream.add(raw[i : i + step], [])
            for frame in stream.frames():
                header = raw[taken : taken + FRAME_HEADER_SIZE]
                length, n_fds = decode_frame_header(header, max_message)
                assert n_fds == 0, "a frame declaring fds got none, and was accepted"
                assert (
                    frame.body
                    == raw[taken + FRAME_HEADER_SIZE : taken + FRAME_HEADER_SIZE + length]
                )
                assert length <= max_message and not frame.fds
                taken += FRAME_HEADER_SIZE + length
                check_body(frame.body, n_fds)
    except WireError as exc:
        assert str(exc).startswith("Failed to "), str(exc)
        assert not stream.discard()
        return
    assert taken + stream.pending == len(raw), (taken, stream.pending, len(raw))
