"""Camera-sized frames straight from the ring into numpy, without a copy.

    python examples/numpy_frames.py [--socket PATH] [--topic NAME_OR_ID] [--shape 512x512]

Each record is one frame of uint32 pixels.  ``read_batch(copy=False,
hold=True)`` hands out views into the ring; ``numpy.frombuffer`` makes an
array of a view without copying; ``release()`` gives the slots back.  The
rule (docs/CLIENT.md, "Zero-copy records"): under the ``block`` policy the
writer cannot reuse a held slot, and a slot stays held while any array (or
view) of its record lives, even past ``release()``: an array always reads its
own frame, and a kept one holds the writer up (for longer than
``block_timeout``, the writer evicts the reader).  Under ``drop-oldest``
the writer does not wait for anyone: ``sub.still_valid(seq)`` after using
the array tells whether it was intact.  Prints one line per frame (seq,
mean, max) until the bus stops.
"""

from __future__ import annotations

import argparse
import sys

import numpy

import shmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/run/shmd/control.sock")
    parser.add_argument("--topic", default=None, help="a name or an id (default: all)")
    parser.add_argument("--shape", default="512x512", help="HEIGHTxWIDTH of uint32 pixels")
    args = parser.parse_args(argv)
    height, width = (int(n) for n in args.shape.split("x"))
    topic = args.topic if args.topic is None or not args.topic.isdigit() else int(args.topic)
    try:
        with shmd.connect(args.socket, topics=topic if topic is not None else "all") as sub:
            while sub.wait():
                for seq, _ts, _topic, view in sub.read_batch(copy=False, hold=True):
                    frame = numpy.frombuffer(view, dtype=numpy.uint32).reshape(height, width)
                    mean, peak = float(frame.mean()), int(frame.max())
                    intact = sub.still_valid(seq)
                    del frame  # done with it: its slot can go at the release
                    if intact:
                        print(seq, f"{mean:.1f}", peak, flush=True)
                    else:
                        print(seq, "overwritten while read", flush=True)
                sub.release()
            print(f"# {sub.delivered} delivered, {sub.lost} lost", flush=True)
    except shmd.ShmdError as exc:
        print(f"numpy_frames: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
