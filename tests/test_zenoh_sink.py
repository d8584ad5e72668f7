"""Tests of shmd.daemons.zenoh_sink: a reader's records as Zenoh samples, to a bus on another host.

Real processes on two hosts of the test's own (tests/netns_bus.py: network
namespaces joined by a veth pair, a bus in each); the receiving side is the
zenoh source (tests/test_zenoh_source.py tests its accounting).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_bus import read_lines, wait_until
from netns_bus import (
    NsBus,
    bridge,
    missing_between,
    origin,
    receiver,
    sender,
    status,
    two_hosts,
    warm_up,
    write_fifo,
)

from shmd.bus.layout import RawRecord
from shmd.config import ZenohSinkConfig
from shmd.control.fields import TopicMap
from shmd.daemons.bridge import Packed, Stamp, decode
from shmd.daemons.zenoh_sink import PACK_BYTES, PACK_RECORDS, ZenohSink


@pytest.fixture
def hosts() -> Iterator[tuple[NsBus, NsBus]]:
    with two_hosts() as pair:
        yield pair


@pytest.mark.parametrize("pack", [False, True], ids=["per-record", "packed"])
def test_every_record_arrives_in_order_under_block(hosts: tuple[NsBus, NsBus], pack: bool) -> None:
    """Under block every record published on a reaches b's reader, in order, none lost."""
    a, b = hosts
    b_writer, _ = receiver(b, "block", a)
    fifo = a.dir / "in.fifo"
    a_writer = sender(a, "block", {"type": "fifo", "path": str(fifo)})
    reader = bridge(a, pack=pack)
    sent = warm_up(fifo, b_writer)
    data = [f"d{i:05d}-" + "x" * 40 for i in range(3000)]
    write_fifo(fifo, data)
    sent += data
    wait_until(lambda: read_lines(b.out("out"))[-1:] == data[-1:], 60, "the last record on b")
    got = read_lines(b.out("out"))
    assert got[-len(data) :] == data
    assert missing_between(sent, got) == 0
    wait_until(lambda: origin(b, a).get("received") == len(got), 10, "the status")
    st = status(b)
    assert (st["lost"], st["refused"]) == (0, 0)
    assert b_writer.find("bridge_lost") == []
    # Stopped, both bridges undeclare and close: Zenoh's threads keep neither alive.
    reader.terminate()
    assert reader.wait_exit(10) == 0
    [sent_line] = reader.find("bridge_sent", sent=len(got))
    # Packed, a burst of 3,000 records goes in far fewer samples; else one each.
    if pack:
        assert sent_line["samples"] < len(data) // 10
    else:
        assert sent_line["samples"] == len(got)
    b_writer.terminate()
    assert b_writer.wait_exit(10) == 0
    a_writer.terminate()
    assert a_writer.wait_exit(10) == 0


def test_ready_comes_once_the_session_is_open_and_the_bus_attached(
    hosts: tuple[NsBus, NsBus],
) -> None:
    """READY=1 follows bridge_sending and attached; a session that cannot open is no READY."""
    a, b = hosts
    receiver(b, "block", a)
    sender(a, "block", {"type": "ticker", "rate": 50.0})
    notify_dir = Path(tempfile.mkdtemp(prefix="shmd-test-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        path = str(notify_dir / "notify.sock")
        sock.bind(path)  # a path: it reaches across network namespaces
        sock.settimeout(20)
        a.env["NOTIFY_SOCKET"] = path
        good = bridge(a, wait_attached=False)
        first = sock.recv(4096).decode()
        assert "READY=1" in first
        good.wait_for("attached")  # logged before READY; read from its stderr since
        names = good.names()
        assert names.index("bridge_sending") < names.index("attached")
        # An endpoint that is no address of this host: the session never opens.
        bad_sink = {"type": "zenoh", "listen": ["tcp/10.231.9.9:7447"]}
        bad = a.reader("broken", sink=bad_sink, wait_attached=False)
        failed = bad.wait_for("sink_failed")
        assert "Failed to open the Zenoh session" in failed["error"]
        assert bad.wait_exit() == 1
        assert "attached" not in bad.names()
        sock.setblocking(False)
        rest: list[str] = []
        while True:
            try:
                rest.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
        # The good bridge said READY once; the broken one never did.
        assert not [m for m in rest if "READY=1" in m]
        assert all("Traceback" not in line for line in bad.lines)
    finally:
        sock.close()
        for f in notify_dir.iterdir():
            f.unlink()
        os.rmdir(notify_dir)


class View:
    """A subscription's state as the sink reads it (shmd.daemons.sinks.BusView)."""

    topics = TopicMap({"imu": 1, "cam": 2})
    generation = 4
    lost = 0


def test_a_packing_sink_cuts_its_runs_at_topic_express_and_count(tmp_path: Path) -> None:
    """Packed, each run of one topic and one side of express_max up to PACK_RECORDS is a sample."""
    zenoh = pytest.importorskip("zenoh", reason="the zenoh extra is not installed")
    endpoint = f"unixsock-stream/{tmp_path}/z.sock"
    sink = ZenohSink(ZenohSinkConfig(prefix="p", pack=True, express_max=8, listen=(endpoint,)))
    sink.bind(View(), all_topics=True)
    conf = zenoh.Config()
    conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    got: list[tuple[str, bytes, Packed | Stamp]] = []
    done = threading.Event()
    total = 0

    def on_sample(s: Any) -> None:
        data = s.payload.to_bytes()
        got.append((str(s.key_expr), data, decode(s.attachment.to_bytes(), len(data))))
        if sum(len(p.entries) if isinstance(p, Packed) else 1 for _, _, p in got) >= total:
            done.set()

    records: list[RawRecord] = []
    # Cut at topic, at express_max, at PACK_RECORDS, at PACK_BYTES (48 KiB: four
    # records of 10,000 bytes and their table fit), and a record above it alone.
    runs = [(1, 4, 3), (2, 4, 2), (2, 20, 2), (1, 4, PACK_RECORDS + 5)]
    runs += [(2, 10_000, 6), (2, 60_000, 1), (2, 10_000, 1)]
    for topic, size, n in runs:
        records += [(100 + len(records), 7, topic, b"%0*d" % (size, i)) for i in range(n)]
    total = len(records)
    session = zenoh.open(conf)
    try:
        sub = session.declare_subscriber("p/*", on_sample)
        deadline = time.monotonic() + 20
        probe: Any = sink.session.declare_publisher("p/probe")
        while not probe.matching_status.matching:
            assert time.monotonic() < deadline, "no route to the subscriber"
            time.sleep(0.01)
        probe.undeclare()
        sink.write(records)
        assert done.wait(20), f"{len(got)} samples arrived"
        sub.undeclare()
    finally:
        session.close()
        sink.close()
    keys = [(key, len(p.entries)) for key, _, p in got if isinstance(p, Packed)]
    assert keys == [
        ("p/imu", 3),
        ("p/cam", 2),
        ("p/cam", 2),
        ("p/imu", PACK_RECORDS),
        ("p/imu", 5),
        ("p/cam", 4),
        ("p/cam", 2),
        ("p/cam", 1),
        ("p/cam", 1),
    ]
    assert PACK_BYTES == 48 * 1024
    assert sink.samples == len(keys) and sink.stamps.index == total
    unpacked = []
    for _, data, p in got:
        assert isinstance(p, Packed)
        at = 0
        for stamp, (_, _, size) in zip(p.stamps(), p.entries, strict=True):
            unpacked.append((stamp.seq, stamp.timestamp_ns, data[at : at + size]))
            at += size
    assert unpacked == [(seq, ts, payload) for seq, ts, _, payload in records]
