"""A ``python:`` sink for tests that dies on cue: a reader process killed mid-stream.

    sink: {type: python, callable: "dying_sink:write"}

Appends each record as a line ``SEQ TOPIC HEX`` to ``$SHMD_TEST_SINK_OUT``
(one ``write()`` per batch).  If the file ``$SHMD_TEST_DIE_FILE`` exists and
holds N, the sink removes it and SIGKILLs its own process right after the
batch that brings its lines to N or more: the batch is written, the
library has not been told it is done with it.
"""

from __future__ import annotations

import os
import signal

from shmd.bus.layout import RawRecord

#: Records written by this process.
_written = {"records": 0}


def write(records: list[RawRecord]) -> None:
    text = "".join(f"{seq} {topic} {bytes(payload).hex()}\n" for seq, _, topic, payload in records)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = os.open(os.environ["SHMD_TEST_SINK_OUT"], flags, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    _written["records"] += len(records)
    die = os.environ.get("SHMD_TEST_DIE_FILE", "")
    try:
        with open(die) as f:
            after = int(f.read())
    except (FileNotFoundError, ValueError):
        return
    if _written["records"] >= after:
        os.unlink(die)
        os.kill(os.getpid(), signal.SIGKILL)
