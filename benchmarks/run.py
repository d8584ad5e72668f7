"""The one entry point of the comparative benchmark.

    python -m benchmarks.run [--quick] [--peers zmq,unix,...] [--readers 1,4]
                             [--payloads 64,4096,1048576] [--seconds 2] [--out DIR]

Full mode (the default) measures steady state: every throughput case warms up for one
ring lap and 0.3 s (not timed, every record checked), then times at least ``--seconds``
and at least 20 ring laps. ``--quick`` only proves the benchmark works (a lap of warm-up
and a few thousand timed records); its numbers are not for comparison.

Prints the Markdown tables to stdout (progress to stderr) and writes ``results.md``,
``results.json`` and ``scale.svg`` into ``--out``. Exit status: 0 when every run was valid,
1 when any run was invalid (a reader saw a wrong record) or failed, 2 on a usage error,
130 when interrupted (partial results are still written).  It runs from a checkout
(``benchmarks/`` is not part of the installed package).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import (
    FULL_SECONDS,
    FULL_WARMUP_S,
    MIN_PAYLOAD,
    Case,
    Impl,
    ImplInfo,
    Kind,
    LatencyCase,
    Report,
    RunRecord,
    ThroughputCase,
    applicable,
    default_records,
    pin_cpus,
    queue_depth,
    render_markdown,
    render_svg,
    run_plan,
    scale_charts,
    sweep_stale,
)

# (module, column name and kind shown while the module cannot be imported). Adding an
# impl = one module exposing IMPLS plus one line here.
PEER_MODULES: tuple[tuple[str, str, Kind], ...] = (
    ("benchmarks.peers.zmq_ipc", "zmq-ipc", "peer"),
    ("benchmarks.peers.iceoryx2_peer", "iceoryx2", "peer"),
    ("benchmarks.peers.zenoh_peer", "zenoh", "peer"),
    ("benchmarks.peers.unix_sock", "unix", "peer"),
    ("benchmarks.peers.mp_queue", "mp-queue", "peer"),
    ("benchmarks.peers.floor", "floor", "floor"),
    ("benchmarks.peers.shmd_peer", "shmd", "shmd"),
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SCALE_READERS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SCALE_IMPLS = "shmd,floor-shm-eventfd"
PARTS = ("throughput", "latency", "scale")


def load_impls(
    modules: Sequence[tuple[str, str, Kind]] | None = None,
) -> tuple[list[Impl], list[ImplInfo]]:
    """Import every impl module (default PEER_MODULES); a failing import becomes a skip line."""
    impls: list[Impl] = []
    missing: list[ImplInfo] = []
    for module, name, kind in PEER_MODULES if modules is None else modules:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            if exc.name == module:
                why = f"{module.replace('.', '/')}.py does not exist yet"
            else:
                why = f"Failed to import {module} since {exc}"
            missing.append(ImplInfo(name, kind, why))
            continue
        impls.extend(mod.IMPLS)
    return impls, missing


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs one or more positive integers")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Compare shmd with the IPC a Python user would otherwise pick for one "
        "producer and many local consumers. Every run uses fresh processes; "
        "repetitions are interleaved across implementations.",
        epilog="examples:\n"
        "  python -m benchmarks.run --quick\n"
        "  python -m benchmarks.run --peers zmq,iceoryx2,shmd --readers 1,4\n"
        "  python -m benchmarks.run --quick --only latency --out /tmp/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short runs that only prove the benchmark works, 3 repetitions "
        "(default: full, steady state, 5)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"full mode: timed seconds per throughput run at least (default {FULL_SECONDS:g}; "
        "and at least 20 ring laps)",
    )
    p.add_argument(
        "--peers",
        type=_name_list,
        default=None,
        help="implementations to run, by name or name prefix, e.g. "
        "zmq,iceoryx2,unix,mp-queue,floor,shmd (default: all)",
    )
    p.add_argument(
        "--readers",
        type=_int_list,
        default=[1, 4],
        help="reader counts of the throughput table (default 1,4)",
    )
    p.add_argument(
        "--payloads",
        type=_int_list,
        default=[64, 4096, 1048576],
        help="record sizes in bytes (default 64,4096,1048576)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for results.md, results.json, scale.svg (default: benchmarks/results)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3 quick, 5 full)")
    p.add_argument(
        "--records",
        type=int,
        default=None,
        help="timed records per throughput run at least (default: quick by payload, "
        "full 20 ring laps; see PERFORMANCE.md)",
    )
    p.add_argument(
        "--latency-rate",
        type=int,
        default=1000,
        help="records/s of the latency case (default 1000)",
    )
    p.add_argument(
        "--latency-count",
        type=int,
        default=None,
        help="records per latency run (default 1000 quick, 10000 full)",
    )
    p.add_argument(
        "--scale-readers",
        type=_int_list,
        default=list(SCALE_READERS),
        help="reader counts of the scale series (default 1,2,4,8,16,32,64)",
    )
    p.add_argument(
        "--scale-payload", type=int, default=64, help="record size of the scale series (default 64)"
    )
    p.add_argument(
        "--scale-impls",
        type=_name_list,
        default=_name_list(DEFAULT_SCALE_IMPLS),
        help=f"implementations of the scale series (default {DEFAULT_SCALE_IMPLS})",
    )
    p.add_argument(
        "--only",
        type=_name_list,
        default=list(PARTS),
        help="parts to run: throughput,latency,scale (default all)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before a run is killed (default 120 quick, 600 full)",
    )
    p.add_argument("--list", action="store_true", help="list implementations and exit")
    return p


def _matches(selector: str, name: str) -> bool:
    """A selector names an implementation or a prefix of names ("unix", "floor")."""
    return name.startswith(selector)


def _select(selectors: Sequence[str], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Names matched by any selector, and the selectors matching nothing."""
    chosen = [n for n in names if any(_matches(s, n) for s in selectors)]
    unknown = [s for s in selectors if not any(_matches(s, n) for n in names)]
    return chosen, unknown


def _host() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A mistake in the arguments; the message is printed without a traceback."""


def _check_args(args: argparse.Namespace) -> None:
    bad_parts = [p for p in args.only if p not in PARTS]
    if bad_parts:
        raise UsageError(
            f"Failed to choose parts since {', '.join(bad_parts)} is not one of {', '.join(PARTS)}"
        )
    too_small = [p for p in [*args.payloads, args.scale_payload] if p < MIN_PAYLOAD]
    if too_small:
        raise UsageError(
            f"Failed to use payload {too_small[0]} since every record needs at "
            f"least {MIN_PAYLOAD} bytes (seq and send time at the head, seq at "
            "the tail)"
        )


def _choose_impls(selectors: list[str] | None) -> tuple[list[ImplInfo], list[Impl]]:
    """The selected impls' infos (with skip reasons) and the usable ones."""
    impls, missing = load_impls()
    names = [i.name for i in impls] + [m.name for m in missing]
    selected, unknown = _select(selectors, names) if selectors else (names, [])
    if unknown:
        raise UsageError(
            f"Failed to select {', '.join(unknown)} since no implementation is "
            f"called that; known: {', '.join(names)}"
        )
    infos: list[ImplInfo] = []
    usable: list[Impl] = []
    for impl in impls:
        if impl.name in selected:
            reason = impl.available()
            infos.append(
                ImplInfo(impl.name, impl.kind, reason, bool(getattr(impl, "zero_copy", False)))
            )
            if reason is None:
                usable.append(impl)
    return infos + [m for m in missing if m.name in selected], usable


def _plan(
    args: argparse.Namespace, usable: Sequence[Impl]
) -> tuple[list[Case], list[tuple[Case, Impl]], dict[str, object]]:
    """Cases in table order, (case, impl) pairs in run order, and the effective settings."""
    quick: bool = args.quick
    seconds = 0.0 if quick else (FULL_SECONDS if args.seconds is None else args.seconds)
    warmup_s = 0.0 if quick else FULL_WARMUP_S
    latency_count = args.latency_count or (1000 if quick else 10_000)
    cases: list[Case] = []
    plan: list[tuple[Case, Impl]] = []
    if "throughput" in args.only:
        for payload in args.payloads:
            for readers in args.readers:
                records = args.records or default_records(payload, quick)
                case = ThroughputCase(
                    readers, payload, records, queue_depth(payload), "throughput", seconds, warmup_s
                )
                cases.append(case)
                plan += [(case, impl) for impl in usable]
    if "latency" in args.only:
        # The configured rate for everyone; rate 0 (back-to-back) only fits ping-pong floors.
        # With two CPUs to spare the paced case runs once more with the writer and
        # the reader pinned apart, as they would be on a machine with idle cores.
        # Each sends a warm-up of a tenth more records first (at least 50), not counted.
        warm = max(50, latency_count // 10)
        sent = latency_count + warm
        lcases = [
            LatencyCase(args.latency_rate, sent, warmup=warm),
            LatencyCase(0, sent, warmup=warm),
        ]
        if pin_cpus() is not None:
            lcases.append(LatencyCase(args.latency_rate, sent, pinned=True, warmup=warm))
        for lcase in lcases:
            cases.append(lcase)
            plan += [(lcase, impl) for impl in usable]
    scale_names, _ = _select(args.scale_impls, [i.name for i in usable])
    if "scale" in args.only:
        payload = args.scale_payload
        for readers in args.scale_readers:
            records = args.records or max(1, default_records(payload, quick) // 2)
            case = ThroughputCase(
                readers, payload, records, queue_depth(payload), "scale", seconds / 2, warmup_s
            )
            cases.append(case)
            plan += [(case, impl) for impl in usable if impl.name in scale_names]
    config: dict[str, object] = {
        "quick": quick,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "readers": args.readers,
        "payloads": args.payloads,
        "latency_rate_hz": args.latency_rate,
        "latency_count": latency_count,
        "scale_readers": args.scale_readers,
        "scale_payload": args.scale_payload,
        "scale_impls": scale_names,
        "parts": args.only,
    }
    return cases, plan, config


def _write(out: Path, report: Report, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8"
    )
    if any(isinstance(c, ThroughputCase) and c.series == "scale" for c in report.cases):
        (out / "scale.svg").write_text(render_svg(scale_charts(report)), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage or the help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _check_args(args)
        infos, usable = _choose_impls(args.peers)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(exc, file=sys.stderr)
        return 2
    if args.list:
        for info in infos:
            state = f"skipped: {info.skipped}" if info.skipped else "ok"
            print(f"{info.name:24} {info.kind:6} {state}")
        return 0
    for info in infos:
        if info.skipped:
            _progress(f"skip {info.name}: {info.skipped}")
    for path in sweep_stale():
        _progress(f"removed {path} (left by a run that was killed)")

    reps = args.reps or (3 if args.quick else 5)
    timeout = args.timeout or (120.0 if args.quick else 600.0)
    cases, plan, config = _plan(args, usable)
    config |= {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "reps": reps,
        "timeout_s": timeout,
    }
    not_applicable: dict[tuple[str, str], str] = {}
    todo = applicable(plan, not_applicable)
    host = _host()
    runs: list[RunRecord] = []
    interrupted = False
    _progress(f"{len(todo)} (case, implementation) pairs x {reps} repetitions")
    try:
        run_plan(todo, reps, timeout, runs, _progress)
    except KeyboardInterrupt:
        interrupted = True
        _progress("interrupted: writing the runs that finished")
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = Report(host, config, infos, cases, runs, not_applicable)
    markdown = render_markdown(report)
    if interrupted:
        markdown += "\n**Interrupted: incomplete results.**\n"
    _write(args.out, report, markdown)
    print(markdown)
    for r in report.failed():
        first = r.detail.strip().splitlines()[0] if r.detail.strip() else ""
        _progress(f"{r.status.upper()}: {r.case_key} | {r.impl} | rep {r.rep + 1}: {first}")
    _progress(f"results in {args.out}")
    if interrupted:
        return 130
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
