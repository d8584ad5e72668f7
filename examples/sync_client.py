"""A program on the bus: print every record of some topics until the bus stops.

    python examples/sync_client.py [--socket PATH] [--topic NAME_OR_ID ...] [--name NAME]

Topics are names from the writer's ``segment.topics`` or ids 0..63 (all
topics without ``--topic``).  Ends when the writer stops (``systemctl stop
shm-writer``), after every record was printed; survives a writer restart.
"""

from __future__ import annotations

import argparse
import sys

import shmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/run/shmd/control.sock")
    parser.add_argument("--topic", action="append", default=[], help="a name or an id")
    parser.add_argument("--name", default=None, help="this reader's name (default client-PID)")
    args = parser.parse_args(argv)
    topics = [int(t) if t.isdigit() else t for t in args.topic] or "all"
    try:
        with shmd.connect(args.socket, name=args.name, topics=topics) as sub:
            for rec in sub:
                topic = sub.topic_name(rec.topic) or rec.topic
                print(rec.seq, topic, bytes(rec.payload).decode(errors="replace"), flush=True)
            print(f"# {sub.delivered} delivered, {sub.lost} lost", flush=True)
    except shmd.ShmdError as exc:  # one line, no traceback: the message says what to do
        print(f"sync_client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
