"""Zenoh peer: one publisher, one subscriber per reader, peers on this host.

Each role opens its own Zenoh session (peer mode, scouting off) in its own process: the
writer listens on a ``unixsock-stream`` endpoint in the run's private directory, the
readers connect to it. Nothing may be dropped, so the publisher is reliable with
``CongestionControl.BLOCK``, and each reader's subscriber hands samples to a
``FifoChannel`` of the case's depth, which blocks Zenoh's receiving thread (and so the
publisher) when the reader is behind. Zenoh's shared-memory transport is on: the writer
copies each record into a buffer of a ``ShmProvider`` pool (sized to the case's depth
per reader) and puts that, so a reader on this host maps the writer's buffer instead of
receiving the bytes over the socket; the pool's ``BlockOn(GarbageCollect())`` policy
waits when every buffer is still held. Readers return ``payload.to_bytes()`` (zenoh's
Python API has no view of a received payload). The writer counts the readers by their
liveliness tokens (declared after their subscribers), then waits for its publisher to
match.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import Buffer, Case, Reader, StreamImpl, Writer

MISSING: str | None
try:
    import zenoh
    import zenoh.shm

    MISSING = None
except ImportError as exc:  # optional: the impl reports itself unavailable
    MISSING = f"zenoh is not installed ({exc}; pip install 'shmd[zenoh]')"

KEY = "bench/records"
READY = "bench/readers"


@dataclass(frozen=True)
class ZenohChannel:
    endpoint: str
    readers: int
    depth: int
    payload: int


def _session(listen: list[str], connect: list[str]) -> Any:
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("listen/endpoints", json.dumps(listen))
    conf.insert_json5("connect/endpoints", json.dumps(connect))
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("scouting/gossip/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "true")
    return zenoh.open(conf)


class _ZenohWriter:
    def __init__(self, chan: ZenohChannel) -> None:
        self._chan = chan
        self._session = _session([chan.endpoint], [])
        self._pub = self._session.declare_publisher(
            KEY,
            congestion_control=zenoh.CongestionControl.BLOCK,
            reliability=zenoh.Reliability.RELIABLE,
        )
        self._ready: set[str] = set()
        self._cond = threading.Condition()
        self._tokens = self._session.liveliness().declare_subscriber(
            f"{READY}/*", self._on_token, history=True
        )
        pool = max(1, chan.depth) * max(1, chan.readers) * max(64, chan.payload) + (1 << 20)
        self._provider = zenoh.shm.ShmProvider.default_backend(pool)
        self._policy = zenoh.shm.BlockOn(zenoh.shm.GarbageCollect())

    def _on_token(self, sample: Any) -> None:
        with self._cond:
            if sample.kind == zenoh.SampleKind.PUT:
                self._ready.add(str(sample.key_expr))
            self._cond.notify_all()

    def wait_readers(self, deadline: float) -> None:
        with self._cond:
            while len(self._ready) < self._chan.readers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"Failed to see {self._chan.readers} readers since only "
                        f"{len(self._ready)} declared themselves before the deadline"
                    )
                self._cond.wait(remaining)
        while not self._pub.matching_status.matching:
            if time.monotonic() > deadline:
                raise RuntimeError("Failed to match the readers since no route appeared")
            time.sleep(0.001)  # Zenoh's matching status has no fd to wait on; bounded above

    def send(self, record: bytearray) -> None:
        buf = self._provider.alloc(len(record), self._policy)
        buf[:] = record
        self._pub.put(buf)

    def close(self) -> None:
        for entity in (self._tokens, self._pub):
            entity.undeclare()
        self._session.close()


class _ZenohReader:
    def __init__(self, chan: ZenohChannel, index: int) -> None:
        self._session = _session([], [chan.endpoint])
        self._sub = self._session.declare_subscriber(
            KEY, zenoh.handlers.FifoChannel(max(1, chan.depth))
        )
        self._token = self._session.liveliness().declare_token(f"{READY}/{index}")

    def recv(self) -> Buffer:
        data: bytes = self._sub.recv().payload.to_bytes()
        return data

    def close(self) -> None:
        for entity in (self._token, self._sub):
            entity.undeclare()
        self._session.close()


class ZenohImpl(StreamImpl):
    """eclipse-zenoh peers over a unix socket in the run's directory, shared memory on."""

    name = "zenoh"
    kind = "peer"

    def available(self) -> str | None:
        return MISSING

    def prepare(self, case: Case, workdir: str) -> ZenohChannel:
        endpoint = f"unixsock-stream/{workdir}/zenoh.sock"
        return ZenohChannel(endpoint, case.readers, case.depth, case.payload)

    def open_writer(self, channel: ZenohChannel, case: Case) -> Writer:
        return _ZenohWriter(channel)

    def open_reader(self, channel: ZenohChannel, case: Case, index: int) -> Reader:
        return _ZenohReader(channel, index)


IMPLS = [ZenohImpl()]
