"""Child program: a program on the bus through ``shmd.connect``, as a user writes one.

    python client.py SOCKET NAME TOPICS MODE OUT [START [DURABLE [DIE_AFTER]]]

TOPICS is ``all`` or comma-separated ids and names; MODE how it reads: ``iter``
(``for rec in sub``), ``batches``, ``wait`` (wait + read_batch), ``into``
(wait + read_into), ``poll`` (a selectors loop on fileno() + poll()) or
``async`` (``async for``).  Each record becomes a line ``SEQ TOPIC HEX`` in
OUT.  stderr gets one JSON line per event: ``connected`` (with the reader
index), ``done`` (delivered, lost, redelivered) at the clean end, or
``error`` (type, message) and exit status 1.  DURABLE (seconds, default 0)
makes it a durable reader; with DIE_AFTER it SIGKILLs itself once it has
written DIE_AFTER lines, at the end of what the library handed over as one
(a record; a batch in ``batches``; a list in ``poll``).
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import sys
from typing import IO, Any

import shmd
from shmd.errors import ShmdError


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


#: Lines written so far, and after how many to SIGKILL ourselves (0: never).
_count = {"lines": 0, "die_after": 0}


def line(out: IO[str], seq: int, topic: int, payload: object) -> None:
    out.write(f"{seq} {topic} {bytes(payload).hex()}\n")  # type: ignore[call-overload]  # bytes-like
    _count["lines"] += 1


def handled(out: IO[str]) -> None:
    """One unit the library handed over is handled: die here if asked to."""
    if _count["die_after"] and _count["lines"] >= _count["die_after"]:
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def read(sub: shmd.Subscription, mode: str, out: IO[str]) -> None:
    if mode == "iter":
        for rec in sub:
            line(out, rec.seq, rec.topic, rec.payload)
            handled(out)
    elif mode == "batches":
        for batch in sub.batches():
            for seq, _ts, topic, payload in batch:
                line(out, seq, topic, payload)
            handled(out)
    elif mode == "wait":
        while sub.wait():
            for seq, _ts, topic, payload in sub.read_batch():
                line(out, seq, topic, payload)
    elif mode == "into":
        buf = bytearray(4096)
        while sub.wait():
            while (got := sub.read_into(buf)) is not None:
                seq, _ts, topic, n = got
                line(out, seq, topic, buf[:n])
    elif mode == "poll":
        with selectors.DefaultSelector() as sel:
            sel.register(sub.fileno(), selectors.EVENT_READ)
            while (records := sub.poll()) is not None:
                for rec in records:
                    line(out, rec.seq, rec.topic, rec.payload)
                handled(out)
                if not records:
                    sel.select()
    elif mode == "async":

        async def consume() -> None:
            async for rec in sub:
                line(out, rec.seq, rec.topic, rec.payload)
                handled(out)

        asyncio.run(consume())
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def main() -> int:
    socket, name, topics, mode, out_path = sys.argv[1:6]
    start = sys.argv[6] if len(sys.argv) > 6 else "oldest"
    durable = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    _count["die_after"] = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    wanted: Any = (
        "all" if topics == "all" else [int(t) if t.isdigit() else t for t in topics.split(",")]
    )
    try:
        with shmd.connect(socket, name=name, topics=wanted, start=start, durable=durable) as sub:  # type: ignore[arg-type]  # a str from argv
            assert sub.welcome is not None
            emit(
                "connected",
                index=sub.welcome.reader_index,
                redeliver_until=sub.welcome.redeliver_until,
            )
            with open(out_path, "w", buffering=1) as out:
                read(sub, mode, out)
            emit("done", delivered=sub.delivered, lost=sub.lost, redelivered=sub.redelivered)
    except ShmdError as exc:
        emit("error", type=type(exc).__name__, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
