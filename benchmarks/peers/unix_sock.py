"""AF_UNIX peers: one connection per reader, SOCK_SEQPACKET or SOCK_STREAM.

The writer listens on a path in the run's private directory, accepts one connection per
reader and sends every record on every connection with a blocking send, so a slow reader
holds the writer back (nothing is dropped). Stream readers read fixed-size records through
a buffered reader; seqpacket readers receive one record per recv_into.
"""

from __future__ import annotations

import io
import os
import socket
import time
from dataclasses import dataclass
from typing import Literal

from benchmarks.harness import Buffer, Case, Reader, StreamImpl, Writer
from shmd.control.frames import SOCKET_TYPES

Flavour = Literal["seqpacket", "stream"]


def _seqpacket_sndbuf(payload: int) -> int:
    # AF_UNIX datagram-style sockets reject a message larger than the sender's sk_sndbuf
    # (minus overhead) with EMSGSIZE. SO_SNDBUF is clamped to net.core.wmem_max and then
    # doubled by the kernel, so 1 MiB records need wmem_max >= ~520 KiB.
    return 2 * payload + 64 * 1024


@dataclass(frozen=True)
class UnixChannel:
    path: str
    flavour: Flavour
    readers: int
    payload: int


class _UnixWriter:
    def __init__(self, chan: UnixChannel) -> None:
        self._chan = chan
        listener = socket.socket(socket.AF_UNIX, SOCKET_TYPES[chan.flavour])
        self._listener: socket.socket | None = listener
        listener.bind(chan.path)
        listener.listen(chan.readers)
        self._conns: list[socket.socket] = []

    def wait_readers(self, deadline: float) -> None:
        assert self._listener is not None
        while len(self._conns) < self._chan.readers:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                self._listener.settimeout(remaining)
                conn, _ = self._listener.accept()
            except TimeoutError:
                # The same words as the harness's own deadline: on a loaded
                # machine spawned readers may not even have connected yet.
                raise RuntimeError(
                    f"Failed to accept {self._chan.readers} readers since only "
                    f"{len(self._conns)} connected before the case timeout"
                ) from None
            conn.settimeout(None)
            if self._chan.flavour == "seqpacket":
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, _seqpacket_sndbuf(self._chan.payload)
                )
            self._conns.append(conn)
        self._listener.close()
        self._listener = None
        os.unlink(self._chan.path)
        self._sends = [c.sendall if self._chan.flavour == "stream" else c.send for c in self._conns]

    def send(self, record: bytearray) -> None:
        for send in self._sends:
            send(record)

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class _SeqpacketReader:
    def __init__(self, chan: UnixChannel) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _seqpacket_sndbuf(chan.payload))
        self._sock.connect(chan.path)
        # One spare byte so an oversized record shows up as a wrong length, not a silent
        # truncation.
        self._buf = bytearray(chan.payload + 1)
        self._view = memoryview(self._buf)

    def recv(self) -> Buffer:
        n = self._sock.recv_into(self._buf)
        return self._view[:n]

    def close(self) -> None:
        self._view.release()
        self._sock.close()


class _StreamReader:
    def __init__(self, chan: UnixChannel) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(chan.path)
        raw = socket.SocketIO(self._sock, "rb")
        self._file = io.BufferedReader(raw, buffer_size=max(64 * 1024, chan.payload))
        self._buf = bytearray(chan.payload)
        self._view = memoryview(self._buf)
        self._payload = chan.payload

    def recv(self) -> Buffer:
        got = self._file.readinto(self._buf)
        while got < self._payload:
            more = self._file.readinto(self._view[got:])
            if not more:
                return self._view[:got]
            got += more
        return self._view

    def close(self) -> None:
        self._view.release()
        self._file.close()
        self._sock.close()


class UnixSocketImpl(StreamImpl):
    """One AF_UNIX connection per reader."""

    def __init__(self, flavour: Flavour) -> None:
        self.flavour: Flavour = flavour
        self.name = f"unix-{flavour}"
        self.kind = "peer"

    def supports(self, case: Case) -> str | None:
        if self.flavour == "seqpacket":
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                wanted = _seqpacket_sndbuf(case.payload)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wanted)
                granted = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            if granted < case.payload + 4096:
                return (
                    f"a {case.payload} B seqpacket record exceeds the send buffer the kernel "
                    f"grants ({granted} B; raise net.core.wmem_max)"
                )
        return super().supports(case)

    def prepare(self, case: Case, workdir: str) -> UnixChannel:
        return UnixChannel(
            os.path.join(workdir, "writer.sock"), self.flavour, case.readers, case.payload
        )

    def cleanup(self, channel: UnixChannel) -> None:
        # The writer unlinks its path once every reader is connected; after a crash the
        # run's private directory (and the path in it) is removed by the harness.
        pass

    def open_writer(self, channel: UnixChannel, case: Case) -> Writer:
        return _UnixWriter(channel)

    def open_reader(self, channel: UnixChannel, case: Case, index: int) -> Reader:
        if channel.flavour == "seqpacket":
            return _SeqpacketReader(channel)
        return _StreamReader(channel)


IMPLS = [UnixSocketImpl("seqpacket"), UnixSocketImpl("stream")]
