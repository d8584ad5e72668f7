"""The processes of ``python -m benchmarks.bridge``: what sends, what receives, what it measures.

Every record's payload starts with a 24-byte header, ``<qqq``: the sender's
``CLOCK_MONOTONIC`` (ns) when it built the record (one clock for every
network namespace of the machine), the record's index in its case, and its
phase: ``PROBE`` (sent until the receiver answers: the route exists),
``WARM`` (warm-up, not measured), ``TIMED``, and one ``END``.  The rest is
zeros up to the case's payload size.

A sender reads commands, one a line, from a FIFO: ``probe SIZE``, ``case
NAME SIZE RATE WARM_S TIMED_S`` (RATE records per second, 0 for as fast as
the path takes them, under back-pressure), ``quit``.  Senders:

* :func:`source`, a ``python:`` source of the sending bus's writer
  (``SHMD_BENCH_CONTROL`` names the FIFO): the bridge path;
* ``python -m benchmarks.bridge_roles zenoh-send FIFO ENDPOINT``: a plain
  Zenoh publisher dialling ENDPOINT, as the bridge's sink does (peer, no
  scouting, no shared memory, ``BLOCK``, express up to 1024 bytes).

Receivers print JSON lines on stderr (``event``: ``ready``, ``probe`` once,
``result`` per case with ``case``, ``received`` (timed records), ``sent``
(every record of the case before its END), ``seconds``, ``rate``, ``p50_us``,
``p99_us``, ``error``; ``bus-recv`` adds the p50 of each part of a record's
latency, ``to_commit_p50_us`` (sent to committed on the receiving bus) and
``from_commit_p50_us`` (committed to received)):

* ``bus-recv SOCKET``: a program on the receiving bus (``shmd.connect``);
* ``zenoh-recv ENDPOINT``: a plain Zenoh subscriber listening on ENDPOINT.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

HEADER = struct.Struct("<qqq")
PROBE, WARM, TIMED, END = -1, 0, 1, 2
BATCH = 64
EXPRESS_MAX = 1024  # the zenoh sink's default express_max


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


def record(size: int, index: int, phase: int) -> bytes:
    return HEADER.pack(time.monotonic_ns(), index, phase) + bytes(size - HEADER.size)


# -- sending ---------------------------------------------------------------------------------


def run_case(
    send: Callable[[Sequence[bytes]], None], size: int, rate: float, warm: float, timed: float
) -> None:
    """Send one case: WARM records for ``warm`` s, TIMED for ``timed`` s, then END."""
    index = 0
    now = time.monotonic()
    for phase, until in ((WARM, now + warm), (TIMED, now + warm + timed)):
        due = time.monotonic()
        while (now := time.monotonic()) < until:
            if rate > 0:
                if now < due:
                    time.sleep(due - now)  # pacing the sender, not synchronisation
                send([record(size, index, phase)])
                index += 1
                due += 1.0 / rate
            else:
                send([record(size, index + k, phase) for k in range(BATCH)])
                index += BATCH
    send([record(size, index, END)])


def serve(commands: IO[bytes], send: Callable[[Sequence[bytes]], None]) -> None:
    """Obey the command lines until ``quit`` or the end of the FIFO."""
    for raw in commands:
        words = raw.decode().split()
        if not words or words[0] == "quit":
            return
        if words[0] == "probe":
            send([record(int(words[1]), -1, PROBE)])
        elif words[0] == "case":
            _name, size, rate, warm, timed = words[1:]
            run_case(send, int(size), float(rate), float(warm), float(timed))


def source(ctx: Any) -> None:
    """The sending bus's ``python:`` source: the commands of ``$SHMD_BENCH_CONTROL``."""
    with open(os.environ["SHMD_BENCH_CONTROL"], "rb") as commands:
        serve(commands, lambda payloads: ctx.publish_batch(list(payloads)))


def zenoh_config(listen: Sequence[str], connect: Sequence[str]) -> Any:
    """A session as the bridge's (shmd.daemons.zenohio.session_config): peer, no scouting,
    no shared memory."""
    import zenoh  # noqa: PLC0415 - the optional extra, only in the roles that use it

    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("listen/endpoints", json.dumps(list(listen)))
    conf.insert_json5("connect/endpoints", json.dumps(list(connect)))
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("scouting/gossip/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "false")
    return conf


def zenoh_send(fifo: str, endpoint: str) -> None:
    import zenoh  # noqa: PLC0415

    session: Any = zenoh.open(zenoh_config([], [endpoint]))
    block = zenoh.CongestionControl.BLOCK
    pubs = {
        express: session.declare_publisher("bench/plain", congestion_control=block, express=express)
        for express in (False, True)
    }

    def send(payloads: Sequence[bytes]) -> None:
        for p in payloads:
            pubs[len(p) <= EXPRESS_MAX].put(p)

    emit("ready")
    try:
        with open(fifo, "rb") as commands:
            serve(commands, send)
    finally:
        for pub in pubs.values():
            pub.undeclare()
        session.close()


# -- receiving -------------------------------------------------------------------------------


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    if not sorted_ns:
        return float("nan")
    rank = max(1, -(-len(sorted_ns) * q // 100))
    return sorted_ns[int(rank) - 1] / 1000


class Collector:
    """One receiver's account of the current case: order, timing, latencies."""

    def __init__(self) -> None:
        self.case = 0
        self.probed = False
        self._reset()

    def _reset(self) -> None:
        self.expected = 0
        self.error: str | None = None
        self.first_ns = self.last_ns = 0
        self.latencies: list[int] = []
        self.to_commit: list[int] = []  # sent -> committed on the receiving bus (bus-recv)

    def feed(
        self, payloads: Iterable[bytes | memoryview], now_ns: int, committed: Iterable[int] = ()
    ) -> None:
        """Take records received at ``now_ns``; ``committed``: each one's commit (monotonic ns)."""
        commits = iter(committed)
        for payload in payloads:
            committed_ns = next(commits, None)
            sent_ns, index, phase = HEADER.unpack_from(payload)
            if phase == PROBE:
                if not self.probed:
                    self.probed = True
                    emit("probe")
                continue
            if index != self.expected and self.error is None:
                self.error = f"record {index} arrived where {self.expected} was due"
            self.expected = index + 1
            if phase == TIMED:
                if not self.latencies:
                    self.first_ns = now_ns
                self.last_ns = now_ns
                self.latencies.append(now_ns - sent_ns)
                if committed_ns is not None:
                    self.to_commit.append(committed_ns - sent_ns)
            elif phase == END:
                self._report(index)

    def _report(self, sent: int) -> None:
        lat = sorted(self.latencies)
        seconds = (self.last_ns - self.first_ns) / 1e9
        hops: dict[str, float] = {}
        if self.to_commit:
            # p50 of each hop apart (the medians of the two parts need not add
            # up to the median of the whole).
            after = sorted(t - c for t, c in zip(self.latencies, self.to_commit, strict=True))
            hops = {
                "to_commit_p50_us": percentile(sorted(self.to_commit), 50),
                "from_commit_p50_us": percentile(after, 50),
            }
        emit(
            "result",
            case=self.case,
            received=len(lat),
            sent=sent,
            seconds=seconds,
            rate=(len(lat) - 1) / seconds if seconds > 0 else 0.0,
            p50_us=percentile(lat, 50),
            p99_us=percentile(lat, 99),
            error=self.error if lat else self.error or "no timed record arrived",
            **hops,
        )
        self.case += 1
        self._reset()


def bus_recv(socket: str) -> None:
    import shmd  # noqa: PLC0415

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    collector = Collector()
    # A record's timestamp is its writer's CLOCK_MONOTONIC at publish: the
    # senders' clock too (one for every namespace of the machine).
    with shmd.connect(socket, name="bench", start="latest") as sub:
        emit("ready")
        for batch in sub.batches():
            now = time.monotonic_ns()
            collector.feed((r[3] for r in batch), now, [r[1] for r in batch])


def zenoh_recv(endpoint: str) -> None:
    import zenoh  # noqa: PLC0415

    # Blocked before Zenoh starts its threads, which inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    collector = Collector()
    lock = threading.Lock()

    def on_sample(sample: Any) -> None:
        now = time.monotonic_ns()
        with lock:
            collector.feed((sample.payload.to_bytes(),), now)

    session: Any = zenoh.open(zenoh_config([endpoint], []))
    sub: Any = session.declare_subscriber("bench/plain", on_sample)
    emit("ready")
    signal.sigwait({signal.SIGTERM})
    sub.undeclare()
    session.close()


def main(argv: list[str]) -> int:
    role, args = argv[1], argv[2:]
    if role == "zenoh-send":
        zenoh_send(*args)
    elif role == "zenoh-recv":
        zenoh_recv(*args)
    elif role == "bus-recv":
        bus_recv(*args)
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
