"""Child program: a program on the bus through ``shmd.connect``, as a user writes one.

    python client.py SOCKET NAME TOPICS MODE OUT [START]

TOPICS is ``all`` or comma-separated ids and names; MODE how it reads: ``iter``
(``for rec in sub``), ``batches``, ``wait`` (wait + read_batch), ``into``
(wait + read_into), ``poll`` (a selectors loop on fileno() + poll()) or
``async`` (``async for``).  Each record becomes a line ``SEQ TOPIC HEX`` in
OUT.  stderr gets one JSON line per event: ``connected`` (with the reader
index), ``done`` (delivered, lost) at the clean end, or ``error`` (type,
message) and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import sys
from typing import IO, Any

import shmd
from shmd.errors import ShmdError


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


def line(out: IO[str], seq: int, topic: int, payload: object) -> None:
    out.write(f"{seq} {topic} {bytes(payload).hex()}\n")  # type: ignore[call-overload]  # bytes-like


def read(sub: shmd.Subscription, mode: str, out: IO[str]) -> None:
    if mode == "iter":
        for rec in sub:
            line(out, rec.seq, rec.topic, rec.payload)
    elif mode == "batches":
        for batch in sub.batches():
            for seq, _ts, topic, payload in batch:
                line(out, seq, topic, payload)
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
                if not records:
                    sel.select()
    elif mode == "async":

        async def consume() -> None:
            async for rec in sub:
                line(out, rec.seq, rec.topic, rec.payload)

        asyncio.run(consume())
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def main() -> int:
    socket, name, topics, mode, out_path = sys.argv[1:6]
    start = sys.argv[6] if len(sys.argv) > 6 else "oldest"
    wanted: Any = (
        "all" if topics == "all" else [int(t) if t.isdigit() else t for t in topics.split(",")]
    )
    try:
        with shmd.connect(socket, name=name, topics=wanted, start=start) as sub:  # type: ignore[arg-type]  # a str from argv
            assert sub.welcome is not None
            emit("connected", index=sub.welcome.reader_index)
            with open(out_path, "w", buffering=1) as out:
                read(sub, mode, out)
            emit("done", delivered=sub.delivered, lost=sub.lost)
    except ShmdError as exc:
        emit("error", type=type(exc).__name__, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
