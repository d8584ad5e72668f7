"""Instructions per call of the hot path, counted by callgrind (stable on a noisy machine).

    python -m benchmarks.instructions [--records N]

Each case runs twice under ``valgrind --tool=callgrind`` in a fresh
interpreter, with N and 2N loop turns; the difference of the two totals over
N is what one turn costs, start-up and teardown cancelling out.  A turn is
one Python ``for`` iteration around the calls named; the bare loop is
measured too, so its cost can be subtracted.  Instructions are not
nanoseconds (this machine's ``perf`` has no cycle counter), but they do not
move with the load of the machine, so they compare builds and changes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Case name -> what one loop turn does (64-byte payloads, one attached reader).
CASES = {
    "loop": "the bare loop (subtract it from the others)",
    "publish": "publish(64 B), one reader attached and awake (no wake-up to write)",
    "publish+read_batch(1)": "publish, then a copying read_batch(1)",
    "publish+read_into": "publish, then read_into(a reused buffer)",
}

_CHILD = r"""
import os, sys
from shmd import Publisher, Subscriber
from shmd._sys.fd import OwnedFd

n, case = int(sys.argv[1]), sys.argv[2]
tag = os.environ.get("SHMD_INSTR_TAG", "run")
pub = Publisher.create(f"/shmd-instr-{tag}-{os.getpid()}", capacity=1024, slot_size=128,
                       max_readers=2)
try:
    h = pub.add_reader("r", os.getpid())
    sub = Subscriber.attach(index=h.index, fd=pub.segment.fileno(),
                            eventfd=OwnedFd(os.dup(h.eventfd.fileno())), token=h.token)

    def run(n, case, publish=pub.publish, read_batch=sub.read_batch, read_into=sub.read_into):
        p, buf = b"x" * 64, bytearray(128)
        if case == "loop":
            for _ in range(n):
                pass
        elif case == "publish":
            for _ in range(n):
                publish(p)  # drop-oldest: laps the idle reader, which never sleeps
        elif case == "publish+read_batch(1)":
            for _ in range(n):
                publish(p)
                read_batch(1)
        else:
            for _ in range(n):
                publish(p)
                read_into(buf)

    run(n, case)
    sub.close()
finally:
    pub.unlink()  # the creator owns the name
    pub.close()
"""


def collected(case: str, n: int, workdir: Path) -> int:
    """Total instructions of one child run under callgrind."""
    script = workdir / "child.py"
    script.write_text(_CHILD)
    out = workdir / f"callgrind.{case}.{n}"
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(script),
            str(n),
            case,
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"Failed to count {case} since callgrind said: {proc.stderr[-500:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of instructions per loop turn for every case."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000, help="N (default 20000)")
    ap.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}"
    )
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"benchmarks.instructions: unknown case {unknown[0]!r}", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("benchmarks.instructions: valgrind is not installed", file=sys.stderr)
        return 1
    n = args.records
    print("| case | instructions per turn | what a turn does |")
    print("|---|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            what = CASES[case]
            per = (collected(case, 2 * n, Path(tmp)) - collected(case, n, Path(tmp))) / n
            print(f"| {case} | {per:,.0f} | {what} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
