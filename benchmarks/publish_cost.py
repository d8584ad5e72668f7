"""The writer's CPU per ``publish()``, net of the loop around it, with real readers.

    python -m benchmarks.publish_cost [--quick] [--readers 1,4] [--payload 64]
                                      [--call publish|reserve] [--seconds 2] [--reps 5]

The throughput tables of ``benchmarks.run`` give the writer process's CPU per record,
which includes the harness's own send loop (two ``struct.pack_into`` stamps, a clock
read and the call: about 250 ns a record on its own). This measures ``publish()``
alone: one writer publishing the same 64-byte record in a bare ``for`` loop, with
``--readers`` reader processes attached that copy each record out (``read_into``) and
sleep in epoll on their eventfd when they have caught up, so the writer's wake decision
and its eventfd writes are real. The ring is ``drop-oldest`` so that publish never waits
for a reader: a wait is not the publish's cost (the readers are lapped when the writer
is faster; that does not matter here). ``--call reserve`` times the zero-copy path
instead: ``reserve(size)``, one slice assignment filling its buffer, ``commit()``.

Each repetition warms up (0.3 s; quick: 0.05 s), then times chunks of 100,000 calls
until ``--seconds`` have passed, and the bare loop for as many turns; the writer's
``process_time`` of the first minus the second, over the calls, is one value. Prints
the median and range over ``--reps`` in ns per call. ``--quick`` only proves it works.
Exit status 0, or 2 on a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog

from shmd import Publisher
from shmd.bus.layout import Policy

#: The checkout this module runs from (benchmarks/ is not installed).
CHECKOUT = Path(__file__).resolve().parents[1]
#: Calls per timed chunk (the clock is read between chunks only).
CHUNK = 100_000

_READER = r"""
import os, select, sys
from shmd.bus.subscriber import Subscriber
from shmd._sys.fd import OwnedFd

from benchmarks.harness import _die_with_parent

name, index, efd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_die_with_parent(int(sys.argv[4]))  # a killed benchmark must not leave its readers asleep
sub = Subscriber.attach(index=index, name=name, eventfd=OwnedFd(efd))
epoll = select.epoll(1)
epoll.register(efd, select.EPOLLIN)
buf = bytearray(4096)
os.write(1, b"r")
while True:  # until the parent ends this process (by its pid)
    if sub.read_into(buf) is not None:
        continue
    sleep = sub.prepare_sleep()
    if sleep != 0.0:
        epoll.poll(-1 if sleep is None else sleep)
"""


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_rep(
    readers: int, payload: int, seconds: float, warmup_s: float, call: str = "publish"
) -> float:
    """ns of the writer's CPU per call, net of the bare loop, for one repetition."""
    name = f"/shmd-bench-pubcost-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pub = Publisher.create(
        name,
        capacity=1024,
        slot_size=max(128, payload + 64),
        max_readers=readers,
        policy=Policy.DROP_OLDEST,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(readers):
            handle = pub.add_reader(f"cost{i}", os.getpid())
            efd = handle.eventfd.fileno()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _READER,
                    name,
                    str(handle.index),
                    str(efd),
                    str(os.getpid()),
                ],
                pass_fds=(efd,),
                cwd=CHECKOUT,  # where `benchmarks` imports from
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.read(1) != b"r":  # attached and about to read
                raise RuntimeError(f"Failed to start reader {i} since it exited early")
        send: Callable[[bytes], object] = pub.publish
        if call == "reserve":
            reserve = pub.reserve

            def send(record: bytes) -> object:
                r = reserve(len(record))
                r.buffer[:] = record
                return r.commit()

        return _timed(send, bytes(payload), seconds, warmup_s)
    finally:
        _stop(procs)
        pub.unlink()  # the creator owns the name
        pub.close()


def _timed(
    send: Callable[[bytes], object], record: bytes, seconds: float, warmup_s: float
) -> float:
    end = time.monotonic() + warmup_s
    while time.monotonic() < end:
        for _ in range(CHUNK):
            send(record)
    calls = 0
    cpu0 = time.process_time_ns()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(CHUNK):
            send(record)
        calls += CHUNK
    cpu_publish = time.process_time_ns() - cpu0
    cpu0 = time.process_time_ns()
    for _ in range(calls // CHUNK):
        for _ in range(CHUNK):
            pass
    cpu_loop = time.process_time_ns() - cpu0
    return (cpu_publish - cpu_loop) / calls


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print a Markdown table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.publish_cost",
        description="The writer's CPU per publish(), net of the loop, with real readers.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs that prove it works")
    parser.add_argument("--readers", default="1,4", help="reader counts (default 1,4)")
    parser.add_argument("--payload", type=int, default=64, help="record size (default 64)")
    parser.add_argument(
        "--call",
        choices=("publish", "reserve"),
        default="publish",
        help="publish(), or reserve()+fill+commit() (default publish)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds (default 2)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 5; quick 2)")
    try:
        args = parser.parse_args(argv)
        counts = [int(x) for x in args.readers.split(",") if x]
        if not counts or min(counts) < 1 or not 1 <= args.payload <= 1 << 20:
            raise ValueError
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ValueError:
        print("publish_cost: --readers takes counts >= 1, --payload 1..1048576", file=sys.stderr)
        return 2
    # The segment's lifecycle lines would interleave with the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    reps = args.reps or (2 if args.quick else 5)
    seconds = 0.1 if args.quick else args.seconds
    warmup_s = 0.05 if args.quick else 0.3
    what = "publish()" if args.call == "publish" else "reserve()+fill+commit()"
    print(f"| readers | payload | {what} ns of writer CPU, median (range) | reps |")
    print("|---:|---:|---:|---:|")
    for readers in counts:
        values = sorted(
            one_rep(readers, args.payload, seconds, warmup_s, args.call) for _ in range(reps)
        )
        median = values[len(values) // 2]
        print(
            f"| {readers} | {args.payload} B | {median:.0f} ({values[0]:.0f}-{values[-1]:.0f}) "
            f"| {reps} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
