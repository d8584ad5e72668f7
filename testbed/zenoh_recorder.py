"""A Zenoh peer that writes down every bridge stamp it receives, for the system tests.

``python3 -m testbed.zenoh_recorder LISTEN-ENDPOINT KEY-EXPR OUT``: opens a
peer session listening on LISTEN-ENDPOINT (no scouting, no shared memory,
as the bridge's own sessions), subscribes to KEY-EXPR and appends one line
per sample to OUT::

    <key> <generation> <seq> <session> <index> <bus_lost>

(``<key> bad <error>`` for a sample without a valid stamp).  Each line is one
``write(2)`` on an ``O_APPEND`` file.  Once subscribed it tells systemd
``READY=1`` (run it as a ``Type=notify`` unit), and on SIGTERM it
undeclares its subscriber, closes the session and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import zenoh

from shmd.daemons import sdnotify
from shmd.daemons.bridge import StampError, decode_stamp


def untyped(entity: object) -> Any:
    """The stubs leave undeclare() and close() untyped."""
    return entity


def line_of(sample: zenoh.Sample) -> str:
    """The line written down for one sample."""
    key = str(sample.key_expr)
    attachment = sample.attachment
    try:
        s = decode_stamp(attachment.to_bytes() if attachment is not None else None)
    except StampError as exc:
        return f"{key} bad {exc}\n"
    return f"{key} {s.generation} {s.seq} {s.session} {s.index} {s.bus_lost}\n"


def main(argv: list[str]) -> int:
    endpoint, key, out = argv[1], argv[2], argv[3]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # Blocked before Zenoh starts its threads, which inherit the mask: the
    # signal waits for sigwait() below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("listen/endpoints", json.dumps([endpoint]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("scouting/gossip/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "false")
    session = zenoh.open(conf)
    sub = session.declare_subscriber(key, lambda sample: os.write(fd, line_of(sample).encode()))
    sdnotify.ready()
    signal.sigwait({signal.SIGTERM})
    untyped(sub).undeclare()
    untyped(session).close()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
