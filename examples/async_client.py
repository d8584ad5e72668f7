"""An asyncio program on the bus: records are handled while other tasks keep running.

    python examples/async_client.py [--socket PATH] [--topic NAME_OR_ID ...]

A heartbeat task prints ``# heartbeat N`` every 0.2 s whether records come
or not; ``async for rec in sub`` waits on the subscription's fd with
``loop.add_reader``, so it never blocks the loop.  Ends when the bus stops.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import shmd


async def heartbeat() -> None:
    n = 0
    while True:
        print(f"# heartbeat {n}", flush=True)
        n += 1
        await asyncio.sleep(0.2)


async def consume(sub: shmd.Subscription) -> None:
    async for rec in sub:
        print(rec.seq, rec.topic, bytes(rec.payload).decode(errors="replace"), flush=True)


async def run(socket: str, topics: list[int | str]) -> None:
    with shmd.connect(socket, topics=topics or "all") as sub:
        beat = asyncio.create_task(heartbeat())
        try:
            await consume(sub)
        finally:
            beat.cancel()
        print(f"# {sub.delivered} delivered, {sub.lost} lost", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/run/shmd/control.sock")
    parser.add_argument("--topic", action="append", default=[], help="a name or an id")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.socket, [int(t) if t.isdigit() else t for t in args.topic]))
    except shmd.ShmdError as exc:
        print(f"async_client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
