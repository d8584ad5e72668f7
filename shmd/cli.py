"""``shmctl``: see and drive a running bus from the shell.

Subcommands: ``status`` (reads the live segment without disturbing it, like
AeronStat reads Aeron's counters), ``tail`` (attaches as a reader through
the control socket), ``publish`` (Publish messages over the control
socket), ``check-config`` and ``demo``.  The benchmark is not part of the
installed package: ``python -m benchmarks.run`` from a checkout runs it.

Exit statuses: 0 success, 1 failure (one ``shmctl: error: ...`` line, never
a traceback), 2 usage errors (argparse's convention).

Under 600 lines, kept whole on purpose: each subcommand is one
short section (its command function beside what only it uses) and the
parser names them all; split into modules, following one command would
mean hopping between files for no layer boundary.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

from shmd.bus.layout import (
    ALL_TOPICS,
    REC_PAYLOAD,
    REC_SEQ,
    REC_TIMESTAMP,
    REC_TOPIC,
    Policy,
    RawRecord,
    ReaderState,
)
from shmd.bus.ring import slot_of
from shmd.bus.segment import Segment
from shmd.bus.wait import code_label
from shmd.config import Config, ConfigError, ReaderSettings, load_config
from shmd.control import protocol
from shmd.control.fields import TopicMap
from shmd.control.frames import SOCKET_TYPES, ChannelError, WireError
from shmd.control.listener import connect
from shmd.daemons import logs
from shmd.daemons.process import EXIT_FAILURE, EXIT_OK, check_config, pid_alive
from shmd.errors import SegmentNotFound, ShmdError, TopicError

EXAMPLES = {
    "status": """examples:
  shmctl status                      # the bus named in /etc/shmd/shmd.yaml
  shmctl status --segment /shmd-bus --json | jq .readers
  shmctl status --watch 1            # redraw every second, like top""",
    "tail": """examples:
  shmctl tail                        # new records as text, until Ctrl-C
  shmctl tail --from oldest -n 10    # the 10 oldest records still in the ring
  shmctl tail --topic 3 --format json
  shmctl tail --topic ticks          # by name (segment.topics)""",
    "publish": """examples:
  shmctl publish hello world         # two records, topic 0
  printf 'a\\nb\\n' | shmctl publish --topic 2
  shmctl publish --topic ticks 42    # by name (segment.topics)
  producer | shmctl publish --framing length""",
    "check-config": """examples:
  shmctl check-config                # /etc/shmd/shmd.yaml (or $SHMD_CONFIG)
  shmctl check-config ./shmd.yaml""",
    "demo": """examples:
  shmctl demo                        # a writer and readers 1 and 2; Ctrl-C stops all
  shmctl demo --readers 4            # four readers
  shmctl --config ./shmd.yaml demo   # your configuration instead of the demo's""",
}


class CliError(Exception):
    """A one-line error for the user; exit status 1."""


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(getattr(args, "config", None))
    except ConfigError as err:
        raise CliError(str(err)) from None


def _use_colour(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


# -- status -------------------------------------------------------------------------


def _topic_labels(mask: int, topics: TopicMap) -> str | list[str]:
    """A reader's topics as ``shmctl status`` shows them: "all", else names or ids."""
    if mask == ALL_TOPICS:
        return "all"
    return [topics.label(t) for t in range(64) if mask >> t & 1]


def segment_status(seg: Segment, topics: TopicMap | None = None) -> dict[str, Any]:
    """Everything ``shmctl status`` shows, as plain data (the ``--json`` document).

    ``topics`` (the configuration's ``segment.topics``) names the readers'
    topics in ``topic_names``.
    """
    names = TopicMap() if topics is None else topics
    h = seg.header()
    g = seg.geometry
    now = time.monotonic_ns()
    readers = []
    for e in seg.entries():
        if e.state == ReaderState.FREE:
            continue
        lag = max(0, h.write_seq - e.cursor)
        lag_seconds = 0.0
        if lag:
            # Age of the oldest record the reader has not read, if still in the ring.
            oldest = max(e.cursor, h.write_seq - g.capacity)
            off = slot_of(oldest, g.capacity) * g.slot_size
            seq = int.from_bytes(seg.ring[off : off + 8], "little")
            ts = int.from_bytes(seg.ring[off + 8 : off + 16], "little")
            if seq == oldest and 0 < ts <= now:
                lag_seconds = (now - ts) / 1e9
        readers.append(
            {
                "index": e.index,
                "instance": e.name,
                "pid": e.pid,
                "alive": pid_alive(e.pid),
                "state": e.state.name.lower(),
                "cursor": e.cursor,
                "lag": lag,
                "lag_seconds": round(lag_seconds, 6),
                "delivered": e.delivered,
                "lost": e.lost,
                "asleep": e.asleep,
                "wait": code_label(e.wait),
                "topics": "all"
                if e.topics == ALL_TOPICS
                else [t for t in range(64) if e.topics >> t & 1],
                "topic_names": _topic_labels(e.topics, names),
                "idle_seconds": round(max(0, now - e.last_active_ns) / 1e9, 3),
                "durable": e.durable_ms / 1000,
                "redelivered": e.redelivered,
            }
        )
    return {
        "segment": seg.name,
        "generation": h.generation,
        "active": h.active,
        "writer_pid": h.writer_pid,
        "writer_alive": pid_alive(h.writer_pid),
        "capacity": h.capacity,
        "slot_size": h.slot_size,
        "policy": Policy(h.policy).label,
        "write_seq": h.write_seq,
        "rate": seg.rate,
        "bytes_published": h.bytes_published,
        "max_readers": h.max_readers,
        "size": g.segment_size,
        "created": h.created_ns / 1e9,
        "heartbeat_age": round((now - h.heartbeat_ns) / 1e9, 3) if h.heartbeat_ns else None,
        "topics": dict(names),
        "readers": readers,
        "bridge": bridge_status(seg.name or ""),
    }


def bridge_status(segment: str) -> dict[str, Any] | None:
    """The zenoh source's accounting of this bus (docs/BRIDGE.md), None without one."""
    from shmd.daemons.zenohio import read_status  # noqa: PLC0415 - the bridge is optional

    st = read_status(segment)
    if st is None or not isinstance(st.get("origins"), dict):
        return None
    return st


def _bridge_lines(b: dict[str, Any], c: Callable[[str, str], str]) -> list[str]:
    lost = c(str(b.get("lost", 0)), "33") if b.get("lost") else "0"
    refused = c(str(b.get("refused", 0)), "33") if b.get("refused") else "0"
    by = b.get("refused_by") or {}
    why = f" ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))})" if by else ""
    pid = b.get("pid")
    gone = isinstance(pid, int) and not pid_alive(pid)
    stale = c(f"  (kept by pid {pid}, which is gone)", "33") if gone else ""
    lines = [
        "",
        f"bridge      zenoh {b.get('key', '?')}  lost {lost}  refused {refused}{why}{stale}",
    ]
    head = f"{'ORIGIN':<24} {'RECEIVED':>12} {'LOST':>10} {'REORDERED':>9} {'RESTARTS':>8} SEQ"
    lines.append(c(head, "1"))
    for name, o in sorted(b["origins"].items()):
        if not isinstance(o, dict):
            continue
        olost = c(str(o.get("lost", 0)), "33") if o.get("lost") else "0"
        lines.append(
            f"{name:<24} {o.get('received', 0):>12} {olost:>10} {o.get('reordered', 0):>9} "
            f"{o.get('restarts', 0):>8} {o.get('seq', 0)}"
        )
    return lines


def _topics_text(reader: dict[str, Any]) -> str:
    names = reader.get("topic_names", reader["topics"])
    return names if isinstance(names, str) else ",".join(str(n) for n in names)


def render_status(st: dict[str, Any], colour: bool) -> str:
    """The human-readable status table."""

    def c(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if colour else text

    writer = c("running", "32") if st["writer_alive"] else c("NOT RUNNING (stale segment)", "31")
    active = c("yes", "32") if st["active"] else c("no (shutting down or shut down)", "33")
    lines = [
        f"segment     {st['segment']}  generation {st['generation']}",
        f"writer      pid {st['writer_pid']} {writer}   active {active}",
        f"ring        {st['capacity']} slots x {st['slot_size']} B  policy {st['policy']}  "
        f"{st['size'] / 2**20:.1f} MiB",
        f"published   {st['write_seq']} records  {st['rate']:.1f}/s",
        f"readers     {len(st['readers'])} of {st['max_readers']}",
    ]
    if st["readers"]:
        head = (
            f"{'INSTANCE':<16} {'PID':>7} {'ALIVE':>5} {'CURSOR':>12} {'LAG':>8} "
            f"{'LAG_S':>8} {'DELIVERED':>12} {'LOST':>10} {'REDELIV':>8} {'ASLEEP':>6} "
            f"{'WAIT':>7} TOPICS"
        )
        lines += ["", c(head, "1")]
        for r in st["readers"]:
            if r["state"] == "dormant":  # a durable reader between processes
                alive = c("dormant", "33")
            else:
                alive = "yes" if r["alive"] else c("no", "31")
            lost = c(str(r["lost"]), "33") if r["lost"] else "0"
            lines.append(
                f"{r['instance']:<16} {r['pid']:>7} {alive:>5} {r['cursor']:>12} {r['lag']:>8} "
                f"{r['lag_seconds']:>8.3f} {r['delivered']:>12} {lost:>10} {r['redelivered']:>8} "
                f"{'yes' if r['asleep'] else 'no':>6} {r['wait']:>7} {_topics_text(r)}"
            )
    if st.get("bridge"):
        lines += _bridge_lines(st["bridge"], c)
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    if args.segment:
        # The configuration only names the topics here: a file that does not
        # load (or is not this bus's) shows ids.
        try:
            topics = load_config(getattr(args, "config", None)).segment.topics
        except ConfigError:
            topics = TopicMap()
        name = args.segment
    else:
        cfg = _config(args)
        name, topics = cfg.segment.name, cfg.segment.topics
    try:
        seg = Segment.open(name=name, control_writable=False)
    except SegmentNotFound:
        raise CliError(
            f"Failed to read segment {name!r} since it does not exist "
            "(is shm-writer running? see: systemctl status shm-writer)"
        ) from None
    colour = _use_colour(sys.stdout)
    try:
        while True:
            st = segment_status(seg, topics)
            if args.json:
                print(json.dumps(st), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(render_status(st, colour), flush=True)
                if args.watch and not sys.stdout.isatty():
                    print()
            if not args.watch:
                return EXIT_OK
            time.sleep(args.watch)  # the refresh period of a display, not synchronisation
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        seg.close()


# -- tail ---------------------------------------------------------------------------


class PrintSink:
    """``shmctl tail``'s sink: records to stdout as text, hex or JSON lines."""

    def __init__(self, fmt: str, limit: int | None, out: TextIO) -> None:
        self.fmt = fmt
        self.limit = limit
        self.count = 0
        self.out = out
        self.on_limit: Any = None

    def write(self, records: list[RawRecord]) -> None:
        out = self.out
        for r in records:
            if self.limit is not None and self.count >= self.limit:
                break
            seq, topic, payload = r[REC_SEQ], r[REC_TOPIC], bytes(r[REC_PAYLOAD])
            if self.fmt == "json":
                doc: dict[str, Any] = {"seq": seq, "timestamp_ns": r[REC_TIMESTAMP], "topic": topic}
                try:
                    doc["payload"] = payload.decode("utf-8")
                except UnicodeDecodeError:
                    doc["payload_base64"] = base64.b64encode(payload).decode()
                out.write(json.dumps(doc) + "\n")
            elif self.fmt == "hex":
                out.write(f"{seq} {topic} {payload.hex()}\n")
            else:
                out.write(payload.decode("utf-8", "replace") + "\n")
            self.count += 1
        out.flush()
        if self.limit is not None and self.count >= self.limit and self.on_limit:
            self.on_limit()

    def close(self) -> None:
        self.out.flush()


def cmd_tail(args: argparse.Namespace) -> int:
    from shmd.daemons.reader import ReaderDaemon, ReaderExit  # noqa: PLC0415 - tail only

    cfg = _config(args)
    logs.configure_logging("ctl", level="warning", target="console")
    base = cfg.reader.defaults
    topics: Any = "all" if not args.topic else tuple(sorted(set(args.topic_ids)))
    settings = ReaderSettings(
        topics=topics,
        start=args.start,
        sink=base.sink,
        stats_interval=3600.0,
        reconnect_timeout=args.timeout,
    )
    sink = PrintSink(args.format, args.n, sys.stdout)
    instance = args.instance or f"shmctl-{os.getpid()}"
    daemon = ReaderDaemon(cfg, settings, instance, logs.get_logger(), sink=sink)

    def stop() -> None:
        daemon.stop("limit")

    sink.on_limit = stop
    try:
        daemon.run()
    except ReaderExit as exc:
        if exc.event == logs.EXITING and daemon.stop_reason == "writer_lost":
            raise CliError("the writer went away without shutting down") from None
        raise CliError(str(exc)) from None
    except BrokenPipeError:  # `shmctl tail | head`
        return EXIT_OK
    finally:
        daemon.close()
    return EXIT_OK


# -- publish ------------------------------------------------------------------------


def _stdin_payloads(framing: str) -> Any:
    stream = sys.stdin.buffer
    if framing == "length":
        while True:
            head = stream.read(4)
            if not head:
                return
            if len(head) < 4:
                raise CliError(
                    "Failed to read a frame since standard input ended inside "
                    "its 4-byte length prefix"
                )
            n = int.from_bytes(head, "little")
            body = stream.read(n)
            if len(body) < n:
                raise CliError(
                    f"Failed to read a {n}-byte frame since standard input ended "
                    f"after {len(body)} bytes"
                )
            yield body
    else:
        for line in stream:
            yield line[:-1] if line.endswith(b"\n") else line


def cmd_publish(args: argparse.Namespace) -> int:
    cfg = _config(args)
    ctl = cfg.control
    try:
        conn = connect(
            ctl.socket,
            SOCKET_TYPES[ctl.type],
            timeout=ctl.handshake_timeout,
            max_message=ctl.max_message,
        )
    except WireError as exc:
        raise CliError(str(exc)) from None
    payloads = (a.encode() for a in args.records) if args.records else _stdin_payloads(args.framing)
    sent = 0
    last_seq = None
    started = time.monotonic()
    progress = sys.stderr.isatty()
    next_progress = started + 1.0
    try:
        with conn:
            for payload in payloads:
                conn.send(
                    protocol.Publish(topic=args.topic_ids[0], payload=payload).encode(),
                    timeout=ctl.handshake_timeout,
                )
                frame = conn.recv(timeout=ctl.handshake_timeout)
                with frame:
                    msg = protocol.decode(frame.body, len(frame.fds))
                if isinstance(msg, protocol.Refuse):
                    raise CliError(f"the writer refused record {sent + 1}: {msg.reason}")
                if not isinstance(msg, protocol.PublishAck):
                    raise CliError(f"the writer answered with a {type(msg).__name__}")
                sent += 1
                last_seq = msg.seq
                if progress and time.monotonic() >= next_progress:
                    print(f"\rpublished {sent} records", end="", file=sys.stderr, flush=True)
                    next_progress += 1.0
    except (ChannelError, protocol.ProtocolError) as exc:
        raise CliError(f"after {sent} records: {exc}") from None
    if progress and time.monotonic() - started >= 1.0:
        print(file=sys.stderr)
    if args.verbose:
        print(f"published {sent} records, last seq {last_seq}", file=sys.stderr)
    return EXIT_OK


# -- check-config, demo ----------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    try:
        return check_config(cfg)
    except ConfigError as err:  # a zenoh sink or source without the package
        raise CliError(str(err)) from None


#: What ``shmctl demo`` runs without ``--config``: a bus of its own, apart
#: from any installed one (segment and socket named after the demo's pid),
#: admitting only the user running it (root and the writer's own user are
#: always admitted, so no group is named), fed by a ticker of 2 records/s.
def demo_config(socket: str, pid: int) -> dict[str, Any]:
    """The demo's configuration document (what its YAML file says)."""
    return {
        "segment": {"name": f"/shmd-demo-{pid}", "capacity": 1024, "slot_size": 4096},
        "control": {"socket": socket, "allowed_users": [], "allowed_groups": []},
        "writer": {"source": {"type": "ticker", "rate": 2.0}},
        "reader": {"defaults": {"start": "latest"}},
        "logging": {"level": "info", "target": "console"},
    }


def cmd_demo(args: argparse.Namespace) -> int:
    """A writer and readers in the foreground, logs on the terminal."""
    if args.config:
        return _run_demo(args.config, args.readers)
    with tempfile.TemporaryDirectory(prefix="shmd-demo-") as tmp:
        path = Path(tmp) / "demo.yaml"
        path.write_text(
            "# shmctl demo's own bus; see demo_config in shmd/cli.py\n"
            + yaml.safe_dump(
                demo_config(str(Path(tmp) / "control.sock"), os.getpid()), sort_keys=False
            )
        )
        return _run_demo(str(path), args.readers)


def _run_demo(config: str, readers_wanted: int) -> int:
    exe = Path(sys.executable)
    base = [str(exe), "-m"]
    extra = ["--config", config]
    target = ["--log-target", "console"]
    writer = subprocess.Popen([*base, "shmd.daemons.writer", *extra, *target])
    readers = [
        subprocess.Popen([*base, "shmd.daemons.reader", "--instance", str(i), *extra, *target])
        for i in range(1, readers_wanted + 1)
    ]
    procs = [writer, *readers]

    def forward(signum: int, frame: object) -> None:
        # Ctrl-C reaches every process of the terminal's foreground group by
        # itself; a signal sent to this pid alone is passed on to the writer,
        # whose shutdown makes the readers drain and exit.
        if writer.poll() is None:
            writer.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    statuses = [p.wait() for p in procs]
    return EXIT_OK if all(s == 0 for s in statuses) else EXIT_FAILURE


# -- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """shmctl's parser (also used to test every subcommand's --help)."""
    p = argparse.ArgumentParser(
        prog="shmctl",
        description="See and drive a running shmd bus.",
        epilog="Every subcommand has --help with examples.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $SHMD_CONFIG, else /etc/shmd/shmd.yaml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    s = add("status", "show the live segment: writer, ring, and one row per reader")
    s.add_argument("--segment", metavar="NAME", help="segment name (default: from the config)")
    s.add_argument("--json", action="store_true", help="one JSON document (per refresh)")
    s.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        nargs="?",
        const=1.0,
        help="redraw every SECONDS (default 1) until Ctrl-C",
    )

    t = add("tail", "attach as a reader and print records as they arrive")
    t.add_argument("--format", choices=("text", "hex", "json"), default="text")
    t.add_argument(
        "--topic",
        action="append",
        metavar="TOPIC",
        help="only this topic, an id 0..63 or a name of segment.topics (repeatable; default: all)",
    )
    t.add_argument("--from", dest="start", choices=("latest", "oldest"), default="latest")
    t.add_argument("-n", type=int, metavar="N", help="exit after N records")
    t.add_argument("--instance", help="reader instance name (default: shmctl-<pid>)")
    t.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the writer's socket (default 5)",
    )

    pb = add("publish", "publish records from arguments or standard input")
    pb.add_argument("records", nargs="*", help="payloads (default: read standard input)")
    pb.add_argument(
        "--topic",
        default="0",
        metavar="TOPIC",
        help="topic id 0..63 or a name of segment.topics (default 0)",
    )
    pb.add_argument(
        "--framing",
        choices=("newline", "length"),
        default="newline",
        help="standard input framing: lines, or u32 little-endian length prefixes",
    )
    pb.add_argument("-v", "--verbose", action="store_true", help="report the count and last seq")

    c = add("check-config", "validate a configuration file and print the effective settings")
    c.add_argument("file", nargs="?", help="the file (default: as --config)")

    d = add(
        "demo",
        "a writer and readers of a bus of their own in the foreground, "
        "logs on the terminal (--config: your configuration's bus instead)",
    )
    d.add_argument("--readers", type=int, default=2, help="how many readers (default 2)")
    return p


def _topic_ids(args: argparse.Namespace) -> list[int]:
    """``--topic``'s values as ids: ids as given, names through the config's segment.topics."""
    given: list[str] = args.topic if isinstance(args.topic, list) else [args.topic]
    numbers = [t for t in given if t.lstrip("+-").isdigit() and t.isascii()]
    for t in numbers:
        if not 0 <= int(t) <= 63:
            raise TopicError(f"must be between 0 and 63 (got {t})")
    # Ids need no configuration; names are looked up in its segment.topics.
    topics = TopicMap() if len(numbers) == len(given) else _config(args).segment.topics
    return [int(t) if t in numbers else topics.resolve(t) for t in given]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shmctl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-config" and args.file:
        args.config = args.file
    if args.command in ("tail", "publish") and args.topic is not None:
        try:
            args.topic_ids = _topic_ids(args)
        except CliError as exc:
            print(f"shmctl: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except TopicError as exc:
            parser.error(f"--topic: {exc}")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "status": cmd_status,
        "tail": cmd_tail,
        "publish": cmd_publish,
        "check-config": cmd_check_config,
        "demo": cmd_demo,
    }
    try:
        return commands[args.command](args)
    except (CliError, ShmdError) as exc:
        print(f"shmctl: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shmctl ... | head`: the reader of our output left; that is not an
        # error.  Point stdout at /dev/null so the interpreter's final flush
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
