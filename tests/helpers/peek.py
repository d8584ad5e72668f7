"""Child program: attach to a segment *by name* (a fresh process, not a fork) and peek.

    python peek.py NAME

Maps the segment read-only (no mutex needed: it never locks), prints
``ready <generation> <write_seq>``, then answers one line per command read
from stdin:

    ring OFF LEN    -> hex of ring[OFF:OFF+LEN]
    seq             -> write_seq
    maps            -> how many of its own mappings show the segment
    quit            -> unmap and exit 0
"""

from __future__ import annotations

import sys

import structlog

from shmd.bus.segment import Segment


def main() -> int:
    """Serve commands until ``quit`` or EOF."""
    # stdout carries the protocol; keep log lines out of it.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    name = sys.argv[1]
    seg = Segment.open(name=name, control_writable=False, ring_writable=False)
    print("ready", seg.generation, seg.write_seq, flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "ring":
            off, length = int(args[0]), int(args[1])
            print(bytes(seg.ring[off : off + length]).hex(), flush=True)
        elif cmd == "seq":
            print(seg.write_seq, flush=True)
        elif cmd == "maps":
            with open("/proc/self/maps") as f:
                print(sum(name.lstrip("/") in m for m in f), flush=True)
        elif cmd == "quit":
            break
    seg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
