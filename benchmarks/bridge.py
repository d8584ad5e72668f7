"""The bridge against plain Zenoh, between two network namespaces: records/s and latency.

    python -m benchmarks.bridge [--quick] [--seconds 5] [--payloads 64,4096] [--pack]

Two namespaces joined by a veth pair (:mod:`benchmarks.netns`) stand in for
two hosts, and two paths run between them at once, over TCP on the veth:

* **bridge**: in ``a``, a writer whose ``python:`` source sends the records
  (:func:`benchmarks.bridge_roles.source`) and a reader with a zenoh sink
  (the bridge) dialling ``b``; in ``b``, a writer whose zenoh source listens,
  and a program on that bus (``shmd.connect``) that receives them.  Both
  buses under ``block``: nothing may be lost.  With ``--pack`` the sink
  packs each run of records it takes at once into one sample (``pack:
  true``, docs/BRIDGE.md); the report says which.
* **zenoh**: a plain Zenoh publisher in ``a`` and subscriber in ``b``, from
  Python, with the bridge's session settings (peer, no scouting, no shared
  memory, ``BLOCK``, express up to 1024 bytes).

Each path first sends probes until its receiver answers (the route exists).
Then, per payload size, each case runs on one path and then on the other,
with the same warm-up (not measured; every record still checked in order):
**throughput** sends as fast as the path takes records for ``--seconds``;
**latency** sends 1000 records a second (500 in quick mode) and takes the
one-way latency of each (the receiver's ``CLOCK_MONOTONIC`` minus the one
the sender stamped into the payload: one clock for the whole machine).
Each throughput case also takes every process's CPU time on its path (user
and system, all threads, from ``/proc/<pid>/stat``) over the whole case,
warm-up included, divided by the records sent: where a record's cost goes.
``--quick`` only proves the benchmark works (0.5 s cases); its numbers are
not for comparison.  Prints a Markdown table with the ratios bridge / zenoh;
exit status 0 when every case was valid (every record once, in order), 1
otherwise or when the machine cannot run it (not root, no zenoh), 2 on a
usage error.  Needs root (``ip netns``); runs from a checkout.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.daemons import Daemon
from benchmarks.netns import ADDR_B, in_ns, two_namespaces, unavailable

REPO = Path(__file__).resolve().parents[1]
PATHS = ("bridge", "zenoh")
BRIDGE_PORT, PLAIN_PORT = 7447, 7448
TIMEOUT = 60.0


@dataclass(frozen=True)
class Plan:
    payloads: tuple[int, ...]
    warm: float
    timed: float
    latency_rate: float


@dataclass
class Lane:
    """One path's sender FIFO (a write end), receiver, and its processes by role."""

    control: int
    receiver: Daemon
    procs: dict[str, Daemon]
    cases: int = 0


def cpu_seconds(pid: int) -> float:
    """The user + system CPU time of every thread of ``pid`` so far, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command(lane: Lane, line: str) -> None:
    os.write(lane.control, f"{line}\n".encode())


def probe(lane: Lane, name: str, size: int) -> None:
    """Send probes until the receiver answers one (the route exists), with a deadline."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        command(lane, f"probe {size}")
        try:
            lane.receiver.wait_for("probe", timeout=0.25)
            return
        except RuntimeError:
            if lane.receiver.proc.poll() is not None:
                break
    raise RuntimeError(f"Failed to reach the {name} receiver since no probe arrived")


def run_case(lane: Lane, size: int, rate: float, plan: Plan) -> dict[str, Any]:
    case = lane.cases
    lane.cases += 1
    before = {role: cpu_seconds(d.proc.pid) for role, d in lane.procs.items()}
    command(lane, f"case {case} {size} {rate} {plan.warm} {plan.timed}")
    budget = TIMEOUT + 4 * (plan.warm + plan.timed)
    found: dict[str, Any] = lane.receiver.wait_for(
        "result", timeout=budget, where=lambda e: e.get("case") == case
    )
    records = found["sent"] + 1  # and the END record
    found["cpu_us"] = {
        role: (cpu_seconds(d.proc.pid) - before[role]) * 1e6 / records
        for role, d in lane.procs.items()
    }
    return found


def _bus_config(
    tmp: Path, segment: str, source: dict[str, Any], sink: dict[str, Any] | None
) -> Path:
    cfg = {
        "segment": {
            "name": segment,
            "capacity": 1024,
            "slot_size": 8192,
            "policy": "block",
            "block_timeout": 30.0,
            "topics": {"bench": 0},
        },
        "control": {"socket": str(tmp / f"{segment.strip('/')}.sock"), "allowed_groups": []},
        "writer": {"source": source, "shutdown_grace": 10.0},
        "reader": {
            "defaults": {"stats_interval": 3600.0},
            "instances": {"bridge": {"sink": sink}} if sink else {},
        },
        "logging": {"target": "json", "level": "info"},
    }
    path = tmp / f"{segment.strip('/')}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextmanager
def arrangement(ns_a: str, ns_b: str, tmp: Path, *, pack: bool) -> Iterator[dict[str, Lane]]:
    """Both paths up and probed; every process stopped (by pid) and segment unlinked after."""
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    tag = uuid.uuid4().hex[:10]
    seg_a, seg_b = f"/shmd-bench-a-{tag}", f"/shmd-bench-b-{tag}"
    print(f"bridge bench: namespaces {ns_a} {ns_b} segments {seg_a} {seg_b}", file=sys.stderr)
    procs: list[Daemon] = []
    fds: list[int] = []

    def start(ns: str, argv: Sequence[str], extra: dict[str, str] | None = None) -> Daemon:
        d = Daemon(in_ns(ns, argv), {**env, **(extra or {})})
        procs.append(d)
        return d

    def fifo(name: str) -> tuple[str, int]:
        where = tmp / name
        os.mkfifo(where)
        fds.append(os.open(where, os.O_RDWR))  # never blocks; the sender opens to read
        return str(where), fds[-1]

    try:
        # The bridge: b's writer and receiver first, then a's writer and bridge.
        endpoint = f"tcp/{ADDR_B}:{BRIDGE_PORT}"
        src = {"type": "zenoh", "listen": [endpoint], "key": f"{seg_a.strip('/')}/*"}
        cfg_b = _bus_config(tmp, seg_b, src, None)
        writer_b = start(ns_b, [py, "-m", "shmd.daemons.writer", "--config", str(cfg_b)])
        writer_b.wait_for("bridge_receiving", TIMEOUT)
        bus_recv = start(
            ns_b,
            [
                py,
                "-m",
                "benchmarks.bridge_roles",
                "bus-recv",
                str(tmp / f"{seg_b.strip('/')}.sock"),
            ],
        )
        bus_recv.wait_for("ready", TIMEOUT)
        control_path, control = fifo("bridge.fifo")
        source = {"type": "python", "callable": "benchmarks.bridge_roles:source"}
        sink = {"type": "zenoh", "connect": [endpoint], "pack": pack}
        cfg_a = _bus_config(tmp, seg_a, source, sink)
        bench_env = {"SHMD_BENCH_CONTROL": control_path}
        writer_a = start(ns_a, [py, "-m", "shmd.daemons.writer", "--config", str(cfg_a)], bench_env)
        writer_a.wait_for("listener_ready", TIMEOUT)
        sink_a = start(
            ns_a, [py, "-m", "shmd.daemons.reader", "--config", str(cfg_a), "--instance", "bridge"]
        )
        sink_a.wait_for("attached", TIMEOUT)
        # Plain Zenoh.
        plain = f"tcp/{ADDR_B}:{PLAIN_PORT}"
        zenoh_recv = start(ns_b, [py, "-m", "benchmarks.bridge_roles", "zenoh-recv", plain])
        zenoh_recv.wait_for("ready", TIMEOUT)
        plain_path, plain_control = fifo("zenoh.fifo")
        zenoh_send = start(
            ns_a, [py, "-m", "benchmarks.bridge_roles", "zenoh-send", plain_path, plain]
        )
        zenoh_send.wait_for("ready", TIMEOUT)
        bridge_procs = {
            "a writer (sends)": writer_a,
            "a reader (zenoh sink)": sink_a,
            "b writer (zenoh source)": writer_b,
            "b reader (receives)": bus_recv,
        }
        plain_procs = {"a publisher (sends)": zenoh_send, "b subscriber (receives)": zenoh_recv}
        paths = {
            "bridge": Lane(control, bus_recv, bridge_procs),
            "zenoh": Lane(plain_control, zenoh_recv, plain_procs),
        }
        for name, path in paths.items():
            probe(path, name, 64)
        yield paths
        for path in paths.values():
            command(path, "quit")
    finally:
        for d in reversed(procs):
            d.stop()
        for fd in fds:
            os.close(fd)
        for seg in (seg_a, seg_b):
            for leftover in (f"/dev/shm{seg}", f"/dev/shm{seg}.bridge"):
                Path(leftover).unlink(missing_ok=True)


def measure(plan: Plan, *, pack: bool) -> list[dict[str, Any]]:
    """Every case on both paths, interleaved; one row per case and path."""
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shmd-bridge-")))
        ns_a, ns_b = stack.enter_context(two_namespaces())
        paths = stack.enter_context(arrangement(ns_a, ns_b, tmp, pack=pack))
        for size in plan.payloads:
            for kind, rate in (("throughput", 0.0), ("latency", plan.latency_rate)):
                for name in PATHS:
                    print(f"bridge bench: {name} {kind} {size} B", file=sys.stderr, flush=True)
                    got = run_case(paths[name], size, rate, plan)
                    rows.append({"path": name, "kind": kind, "payload": size, **got})
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and math.isfinite(a) and math.isfinite(b) else "n/a"


def table(rows: Sequence[dict[str, Any]], *, pack: bool) -> str:
    """The Markdown table: per payload, each path's records/s and p50/p99, and the ratios."""
    cell = {(r["path"], r["kind"], r["payload"]): r for r in rows}
    sink = "packed (pack: true)" if pack else "one Zenoh sample per record (pack: false)"
    out = [
        f"The bridge's sink: {sink}.",
        "",
        "| payload | bridge records/s | zenoh records/s | throughput ratio "
        "| bridge p50 / p99 | zenoh p50 / p99 | latency ratio p50 / p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sorted({r["payload"] for r in rows}):
        bt, zt = cell[("bridge", "throughput", size)], cell[("zenoh", "throughput", size)]
        bl, zl = cell[("bridge", "latency", size)], cell[("zenoh", "latency", size)]
        lat = f"{bl['p50_us']:.0f} / {bl['p99_us']:.0f} µs"
        plain_lat = f"{zl['p50_us']:.0f} / {zl['p99_us']:.0f} µs"
        ratios = f"{_ratio(bl['p50_us'], zl['p50_us'])} / {_ratio(bl['p99_us'], zl['p99_us'])}"
        out.append(
            f"| {size} B | {bt['rate']:,.0f} | {zt['rate']:,.0f} "
            f"| {_ratio(bt['rate'], zt['rate'])} | {lat} | {plain_lat} | {ratios} |"
        )
    bad = [r for r in rows if r["error"]]
    out += [
        "",
        "Ratios are bridge / zenoh: throughput above 1 is the bridge faster, latency above 1 "
        "the bridge slower.",
        "",
        "The bridge's latency in two parts, p50 of each: sent to committed on b's bus "
        "(a's bus, the sink, Zenoh, the source), and committed to received (b's bus):",
        "",
        "| payload | sent to b's commit | b's commit to received |",
        "|---:|---:|---:|",
    ]
    for r in rows:
        if r["path"] == "bridge" and r["kind"] == "latency" and "to_commit_p50_us" in r:
            out.append(
                f"| {r['payload']} B | {r['to_commit_p50_us']:.0f} µs "
                f"| {r['from_commit_p50_us']:.0f} µs |"
            )
    out += [
        "",
        "CPU µs per record in the throughput cases, by process (all threads, the whole case):",
        "",
        "| payload | path | process | CPU µs / record |",
        "|---:|---|---|---:|",
    ]
    for r in rows:
        if r["kind"] != "throughput":
            continue
        for role, us in [*r["cpu_us"].items(), ("total", sum(r["cpu_us"].values()))]:
            out.append(f"| {r['payload']} B | {r['path']} | {role} | {us:.2f} |")
    out += [f"INVALID: {r['path']} {r['kind']} {r['payload']} B: {r['error']}" for r in bad]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bridge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="prove it works (short cases)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per case (5)")
    p.add_argument("--payloads", default="64,4096", help="payload sizes in bytes (64,4096)")
    p.add_argument("--pack", action="store_true", help="the bridge's sink packs runs of records")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        payloads = tuple(int(x) for x in args.payloads.split(","))
    except ValueError:
        parser.error(f"--payloads {args.payloads!r}: not a list of sizes")
    if any(not 24 <= size <= 8000 for size in payloads):
        parser.error("--payloads: each size must be 24 to 8000 bytes")
    if not args.seconds > 0:
        parser.error("--seconds must be more than 0")
    why = unavailable()
    if why is not None:
        print(f"python -m benchmarks.bridge: Failed to run since {why}", file=sys.stderr)
        return 1
    if args.quick:
        plan = Plan(payloads, warm=0.2, timed=0.5, latency_rate=500.0)
    else:
        plan = Plan(payloads, warm=1.0, timed=args.seconds, latency_rate=1000.0)
    try:
        rows = measure(plan, pack=args.pack)
    except RuntimeError as exc:
        print(f"python -m benchmarks.bridge: {exc}", file=sys.stderr)
        return 1
    print(table(rows, pack=args.pack), end="")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
