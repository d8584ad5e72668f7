"""The soak from the command line: minutes of random faults under the real units.

    python -m benchmarks.soak [--seconds 600] [--policy block|drop-oldest|both]
                              [--seed N] [--readers 8] [--rate 1000] [--json FILE]
                              [--durable] [--block-timeout 1.0]

As root, from a checkout.  What it does and checks: :mod:`testbed.soak`
(docs/RELIABILITY.md has the figures).  Exit status 0 when every record was
accounted for, 1 otherwise, 2 when this machine cannot boot the namespaced
systemd.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.nsystemd import NamespacedSystemd, preflight
from testbed.soak import SoakResult, prepare, render, run_soak


def main(argv: Sequence[str] | None = None) -> int:
    """Boot the namespaced systemd, soak, print the table; 0 when all was accounted for."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--policy", choices=("block", "drop-oldest", "both"), default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--rate", type=int, default=1000, help="records/s of the source")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--durable", action="store_true", help="durable readers (durable_grace 60 s)"
    )
    parser.add_argument(
        "--block-timeout", type=float, default=1.0, help="segment.block_timeout, seconds"
    )
    args = parser.parse_args(argv)
    reason = preflight()
    if reason is not None:
        print(f"Failed to soak since {reason}", file=sys.stderr)
        return 2
    policies = ("block", "drop-oldest") if args.policy == "both" else (args.policy,)
    results = []

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with NamespacedSystemd() as ns:
        prepare(ns)
        for policy in policies:
            log(f"soak: policy {policy}, {args.seconds:g} s")
            res = run_soak(
                ns,
                policy=policy,
                seconds=args.seconds,
                seed=args.seed,
                readers=args.readers,
                rate=args.rate,
                durable=args.durable,
                block_timeout=args.block_timeout,
                log=log,
            )
            results.append(res)
            print(render(res), flush=True)
            print(flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([_as_dict(r) for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


def _as_dict(res: SoakResult) -> dict[str, Any]:
    return {
        "policy": res.policy,
        "seconds": res.seconds,
        "seed": res.seed,
        "durable": res.durable,
        "block_timeout": res.block_timeout,
        "published": res.published,
        "faults": dict(res.faults),
        "evictions": res.evictions,
        "max_call_ms": res.max_call_ms,
        "recovery_s": res.recovery_s,
        "peak_rss_kb": res.peak_rss_kb,
        "resources_start": res.resources_start,
        "resources_end": res.resources_end,
        "problems": res.problems,
        "ok": res.ok,
        "readers": [
            {
                k: getattr(v, k)
                for k in (
                    "instance",
                    "processes",
                    "delivered",
                    "duplicates",
                    "redelivered",
                    "torn",
                    "counted_lost",
                    "down_lost",
                    "unexpected_lost",
                    "accounting_errors",
                    "max_gap_ns",
                )
            }
            for v in res.verdicts
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
