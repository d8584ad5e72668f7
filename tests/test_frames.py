"""Tests for shmd.control.frames: the Frame, the header, and cutting frames out of bytes."""

from __future__ import annotations

import os

import pytest
from helpers import is_open

from shmd._sys.fd import OwnedFd, close_all
from shmd.control.frames import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_MAGIC,
    Frame,
    StreamFrames,
    WireError,
    datagram_frame,
    decode_frame_header,
    encode_frame,
)

# (OwnedFd itself: tests/test_fd.py)


def test_closing_a_frame_closes_its_fds() -> None:
    """Leaving a Frame's with-block closes every fd it carries."""
    r, w = os.pipe()
    frame = Frame(b"x", (OwnedFd(r), OwnedFd(w)))
    with frame:
        assert is_open(r) and is_open(w)
    assert not is_open(r) and not is_open(w)
    assert all(fd.closed for fd in frame.fds)


# -- reassembling a stream (over real sockets: tests/test_connection.py) ---------


def frame_bytes(body: bytes, n_fds: int = 0) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, 0, len(body), n_fds, 0) + body


def test_stream_frames_cut_frames_and_give_fds_to_the_frame_they_arrived_with() -> None:
    """Bytes fed in any chunks come out as frames; a read's fds go to the frame starting in it."""
    r, w = os.pipe()
    stream = StreamFrames(1024)
    data = frame_bytes(b"first") + frame_bytes(b"second", 2)
    cut = len(frame_bytes(b"first"))
    stream.add(data[: cut - 3], [])
    assert stream.frames() == []
    assert stream.pending == cut - 3
    stream.add(data[cut - 3 : cut], [])
    stream.add(data[cut : cut + 1], [OwnedFd(r), OwnedFd(w)])
    first = stream.frames()
    assert [f.body for f in first] == [b"first"]
    stream.add(data[cut + 1 :], [])
    (second,) = stream.frames()
    with second:
        assert second.body == b"second"
        assert [fd.fileno() for fd in second.fds] == [r, w]
    assert stream.pending == 0 and stream.discard() == []
    assert not is_open(r) and not is_open(w)


def test_stream_frames_refuse_fds_no_frame_declared() -> None:
    """Fds with a read that starts no frame are an error; discard() hands them back to close."""
    r, w = os.pipe()
    stream = StreamFrames(1024)
    stream.add(frame_bytes(b"x"), [OwnedFd(r), OwnedFd(w)])
    with pytest.raises(WireError, match="fds"):
        stream.frames()
    close_all(stream.discard())
    assert not is_open(r) and not is_open(w)


@pytest.mark.parametrize(
    ("data", "truncated", "message"),
    [
        (frame_bytes(b"abc")[:-1], False, "says 3 body bytes but the datagram carries 2"),
        (frame_bytes(b"abc"), True, "says 3 body bytes but the datagram carries more"),
        (frame_bytes(b"abc", 1), False, "declares 1 fds but 0 arrived"),
        (b"\x44\x53", False, "header is truncated"),
    ],
)
def test_datagram_frame_checks_the_datagram_against_its_header(
    data: bytes, truncated: bool, message: str
) -> None:
    """A datagram is exactly one frame: its length and fd count must match the header."""
    with pytest.raises(WireError, match=message):
        datagram_frame(data, [], truncated, 1024)


def test_frame_header_round_trips() -> None:
    """encode_frame's header is what decode_frame_header reads back."""
    data = encode_frame(b"body", 2)
    assert len(data) == FRAME_HEADER_SIZE + 4
    assert decode_frame_header(data, 1024) == (4, 2)
