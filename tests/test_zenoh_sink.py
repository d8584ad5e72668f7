"""Tests of shmd.daemons.zenoh_sink: a reader's records as Zenoh samples, to a bus on another host.

Real processes on two hosts of the test's own (tests/netns_bus.py: network
namespaces joined by a veth pair, a bus in each); the receiving side is the
zenoh source (tests/test_zenoh_source.py tests its accounting).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def hosts() -> Iterator[tuple[NsBus, NsBus]]:
    with two_hosts() as pair:
        yield pair


def test_every_record_arrives_in_order_under_block(hosts: tuple[NsBus, NsBus]) -> None:
    """Under block every record published on a reaches b's reader, in order, none lost."""
    a, b = hosts
    b_writer, _ = receiver(b, "block", a)
    fifo = a.dir / "in.fifo"
    a_writer = sender(a, "block", {"type": "fifo", "path": str(fifo)})
    reader = bridge(a)
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
    assert reader.find("bridge_sent", sent=len(got))
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
