"""Child program: a reader in a fresh process that attaches *by name*.

    python spawned_reader.py NAME SOCKFD

Receives its table entry and eventfd the way a reader daemon does, over
the inherited AF_UNIX socket SOCKFD: one message ``index token`` with the
eventfd attached (SCM_RIGHTS).  Then maps the segment by name, prints
``ready``, runs a ReaderLoop printing ``record SEQ TOPIC HEX`` per record,
and finally ``exit RESULT DELIVERED LOST``.
"""

from __future__ import annotations

import socket
import sys

import structlog

from shmd._sys.fd import OwnedFd
from shmd.bus.loop import ReaderLoop
from shmd.bus.subscriber import RawRecord, Subscriber


def main() -> int:
    """Attach, read until the writer deactivates, report."""
    # stdout carries the protocol; keep log lines out of it.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    name, sock_fd = sys.argv[1], int(sys.argv[2])
    with socket.socket(fileno=sock_fd) as sock:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 1)
    (efd,) = fds
    index, token = map(int, msg.split())
    sub = Subscriber.attach(index=index, name=name, eventfd=OwnedFd(efd), token=token)

    def on_records(batch: list[RawRecord]) -> None:
        for seq, _ts, topic, data in batch:
            print("record", seq, topic, bytes(data).hex(), flush=True)

    print("ready", flush=True)
    result = ReaderLoop(sub, on_records).run()
    print("exit", result.name, sub.delivered, sub.lost, flush=True)
    sub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
