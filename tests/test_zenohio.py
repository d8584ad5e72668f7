"""Tests of shmd.daemons.zenohio: one bus bridged to another across two network namespaces.

Each test makes its own two hosts: network namespaces ``a`` and ``b`` joined
by a veth pair with addresses the test assigns (10.231.0.1 and 10.231.0.2,
inside the namespaces only), a bus in each (its own segment, socket and
writer, started with tests/daemon_bus.py inside its namespace), a reader on
``a`` with a zenoh sink dialling ``b``, and on ``b`` a writer whose zenoh
source listens there.  Teardown kills every process by pid, then deletes the
namespaces (which takes the veth pair with them) and the status file.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon_bus import Bus, Daemon, read_lines, tick_numbers, wait_until

from shmd.cli import render_status
from shmd.daemons.bridge import Stamp
from shmd.daemons.zenohio import read_status, status_path, topic_key, topic_of

_WHY_NOT = Path(sys.prefix) / "zenoh-unavailable"  # pip's reason, kept by packaging/dev
pytest.importorskip(
    "zenoh",
    reason="the zenoh extra is not installed"
    + (f" (pip said: {_WHY_NOT.read_text().strip()})" if _WHY_NOT.is_file() else ""),
)
if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("network namespaces need root and ip(8)", allow_module_level=True)

ADDR_A, ADDR_B = "10.231.0.1", "10.231.0.2"
ENDPOINT = f"tcp/{ADDR_B}:7447"
HELPERS = Path(__file__).resolve().parent / "helpers"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class NsBus(Bus):
    """A Bus whose every process runs in network namespace ``netns``."""

    def __init__(self, netns: str) -> None:
        super().__init__()
        self.netns = netns

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Daemon:
        # ip netns exec execs the program itself: the pid is the daemon's.
        return super().spawn(name, ["ip", "netns", "exec", self.netns, *argv], **kwargs)

    @property
    def prefix(self) -> str:
        """The zenoh sink's default key prefix on this bus."""
        return self.segment.lstrip("/")


@pytest.fixture
def hosts() -> Iterator[tuple[NsBus, NsBus]]:
    """Two namespaces joined by a veth pair, a bus in each; all gone afterwards."""
    tag = uuid.uuid4().hex[:6]
    names = (f"shmdz-{tag}-a", f"shmdz-{tag}-b")
    links = (f"zv{tag}a", f"zv{tag}b")
    made: list[str] = []
    buses: list[NsBus] = []
    try:
        for ns in names:
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for ns, link, addr in zip(names, links, (ADDR_A, ADDR_B), strict=True):
            ip("link", "set", link, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            ip("-n", ns, "link", "set", link, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        buses = [NsBus(ns) for ns in names]
        yield buses[0], buses[1]
    finally:
        for b in buses:
            b.close()
            status_path(b.segment).unlink(missing_ok=True)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def write_fifo(path: Path, lines: Sequence[str]) -> None:
    """Be one FIFO producer: open, write the lines, close."""
    fd = os.open(path, os.O_WRONLY)
    try:
        data = "".join(f"{line}\n" for line in lines).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def receiver(b: NsBus, policy: str, a: NsBus) -> tuple[Daemon, Daemon]:
    """Bus b: a writer with a zenoh source of a's keys on ADDR_B, and a file reader ``out``."""
    src = {"type": "zenoh", "listen": [ENDPOINT], "key": f"{a.prefix}/*"}
    b.configure(segment={"policy": policy, "topics": {"tick": 0}}, writer={"source": src})
    writer = b.writer()
    writer.wait_for("bridge_open", direction="in")
    return writer, b.file_reader("out")


def sender(a: NsBus, policy: str, source: dict[str, Any], **segment: Any) -> Daemon:
    """Bus a: a writer with ``source``; returns it (the bridge reader is started apart)."""
    a.configure(segment={"policy": policy, "topics": {"tick": 0}, **segment}, writer={"source": source})
    return a.writer()


def bridge(a: NsBus, instance: str = "bridge") -> Daemon:
    """A reader on bus a with a zenoh sink dialling ADDR_B."""
    sink = {"type": "zenoh", "connect": [ENDPOINT]}
    return a.reader(instance, sink=sink, stats_interval=0.5)


def warm_up(fifo: Path, b_writer: Daemon) -> list[str]:
    """Publish ``w<k>`` records on a until b's source has joined the stream; the lines sent."""
    sent: list[str] = []
    for k in itertools.count():
        sent.append(f"w{k}")
        write_fifo(fifo, [sent[-1]])
        try:
            b_writer.wait_for("bridge_joined", timeout=0.5)
            return sent
        except AssertionError:
            if k >= 60:
                raise


def flush_tail(fifo: Path, b: NsBus, sent: list[str]) -> None:
    """Publish ``e<k>`` records until one reaches b's file, so no loss hides at the tail."""
    for k in itertools.count():
        sent.append(f"e{k}")
        write_fifo(fifo, [sent[-1]])
        try:
            wait_until(lambda: any(x.startswith("e") for x in read_lines(b.out("out"))), 1.0)
            return
        except AssertionError:
            if k >= 60:
                raise


def missing_between(sent: Sequence[str], got: Sequence[str]) -> int:
    """How many of ``sent`` between the first and last of ``got`` never arrived.

    Fails unless ``got`` is ``sent`` with some left out, in order, each once.
    """
    where = {line: i for i, line in enumerate(sent)}
    positions = [where[line] for line in got]
    assert positions == sorted(set(positions)), "records arrived out of order or twice"
    return positions[-1] - positions[0] + 1 - len(positions)


def status(b: NsBus) -> dict[str, Any]:
    st = read_status(b.segment)
    assert st is not None, f"no status file at {status_path(b.segment)}"
    return st


def origin(b: NsBus, a: NsBus) -> dict[str, Any]:
    """b's accounting of the records from a's bridge ({} before the first)."""
    st = read_status(b.segment) or {}
    found: dict[str, Any] = st.get("origins", {}).get(a.prefix, {})
    return found


# -- unit: keys ---------------------------------------------------------------------------


def test_keys_name_the_topic_or_its_id() -> None:
    """A record's key is <prefix>/<topic name>, or the id of a topic without one."""
    from shmd.control.fields import TopicMap

    names = TopicMap({"imu": 1})
    assert topic_key("site/a", 1, names) == "site/a/imu"
    assert topic_key("site/a", 5, names) == "site/a/5"
    assert [topic_of(k, names) for k in ("x/imu", "x/5", "x/1", "x/64", "x/cam", "x/05x")] == [
        1,
        5,
        None,
        None,
        None,
        None,
    ]


# -- two hosts -----------------------------------------------------------------------------


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
    assert reader.find("bridge_closed", direction="out", sent=len(got))
    b_writer.terminate()
    assert b_writer.wait_exit(10) == 0
    a_writer.terminate()
    assert a_writer.wait_exit(10) == 0


def test_loss_on_a_slow_link_is_counted_exactly_under_drop_oldest(
    hosts: tuple[NsBus, NsBus],
) -> None:
    """Through a throttled link under drop-oldest, b counts exactly the records it never got."""
    a, b = hosts
    link = f"zv{a.netns.split('-')[1]}a"
    subprocess.run(
        ["ip", "netns", "exec", a.netns, "tc", "qdisc", "add", "dev", link, "root", "tbf",
         "rate", "2mbit", "burst", "16kb", "latency", "200ms"],
        check=True,
        timeout=20,
    )  # fmt: skip
    b_writer, _ = receiver(b, "block", a)
    fifo = a.dir / "in.fifo"
    sender(a, "drop-oldest", {"type": "fifo", "path": str(fifo)}, capacity=16)
    bridge(a)
    sent = warm_up(fifo, b_writer)
    data = [f"d{i:05d}-" + "y" * 150 for i in range(4000)]
    write_fifo(fifo, data)
    sent += data
    flush_tail(fifo, b, sent)
    got = read_lines(b.out("out"))
    missing = missing_between(sent, got)
    assert missing > 0, "the throttled link lost nothing: the test proved nothing"

    def counted() -> bool:
        o = origin(b, a)
        return bool(o.get("received") == len(got) and o.get("lost") == missing)

    wait_until(counted, 10, f"b's status counting {missing} lost")
    logged = lambda: sum(e["count"] for e in b_writer.find("bridge_lost"))  # noqa: E731
    wait_until(lambda: logged() == missing, 10, f"bridge_lost events adding up to {missing}")
    assert all(e["origin"] == a.prefix and e["exact"] for e in b_writer.find("bridge_lost"))
    shown = subprocess.run(
        [sys.executable, "-m", "shmd.cli", "status", "--segment", b.segment, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    )
    assert json.loads(shown.stdout)["bridge"]["lost"] == missing


def test_a_killed_bridge_restarts_and_what_it_missed_is_counted(
    hosts: tuple[NsBus, NsBus],
) -> None:
    """SIGKILL of the sending bridge mid-stream: its successor resumes, the gap is counted."""
    a, b = hosts
    b_writer, _ = receiver(b, "drop-oldest", a)
    sender(a, "drop-oldest", {"type": "ticker", "rate": 200.0})
    first = bridge(a)
    out = b.out("out")
    wait_until(lambda: len(read_lines(out)) >= 100, 20, "100 ticks on b")
    first.kill()
    first.wait_exit()
    at_kill = len(read_lines(out))
    second = bridge(a)
    b_writer.wait_for("bridge_peer_restarted", origin=a.prefix)
    wait_until(lambda: len(read_lines(out)) >= at_kill + 100, 20, "100 more ticks on b")
    second.terminate()
    assert second.wait_exit(10) == 0

    def settled() -> bool:
        return bool(origin(b, a).get("received") == len(read_lines(out)))

    wait_until(settled, 10, "b's status and file agreeing")
    ticks = tick_numbers(read_lines(out))
    gaps = sum(y - x - 1 for x, y in itertools.pairwise(ticks))
    assert ticks == sorted(set(ticks))
    o = origin(b, a)
    assert o["restarts"] == 1
    assert gaps > 0 and o["lost"] == gaps
    [event] = b_writer.find("bridge_peer_restarted")
    assert event["exact"] is True and 0 < event["missed"] <= gaps


def test_garbage_from_zenoh_is_counted_and_never_published(hosts: tuple[NsBus, NsBus]) -> None:
    """Bad attachments, unmapped keys, oversize payloads and deletes are refused, not fatal."""
    a, b = hosts
    b.configure(
        segment={"policy": "block", "topics": {"good": 1, "other": 2}},
        writer={"source": {"type": "zenoh", "key": "ext/*", "listen": [ENDPOINT]}},
    )
    b_writer = b.writer()
    b.file_reader("out", topics=["good"])
    b.file_reader("else", topics="all")
    index = itertools.count()

    def put(key: str, payload: bytes, attachment: bytes | None) -> dict[str, Any]:
        hexed = attachment.hex() if attachment is not None else None
        return {"key": key, "payload": payload.hex(), "attachment": hexed, "kind": "put"}

    def stamped(key: str, payload: bytes) -> dict[str, Any]:
        i = next(index)
        return put(key, payload, Stamp(1, 10 + i, 0, 77, i, 0).encode())

    spec = [
        stamped("ext/good", b"first"),
        put("ext/good", b"no attachment", None),
        put("ext/good", b"short attachment", b"SHZ\x01"),
        put("ext/good", b"foreign attachment", b"x" * 56),
        stamped("ext/nosuch", b"unknown name"),
        stamped("ext/99", b"no such id"),
        stamped("ext/1", b"named topics go by name"),
        stamped("ext/good", b"z" * 300),
        {"key": "ext/good", "payload": "", "attachment": None, "kind": "delete"},
        stamped("ext/good", b"last"),
    ]
    peer = a.spawn(
        "zenoh-peer",
        [sys.executable, str(HELPERS / "zenoh_peer.py"), ENDPOINT, json.dumps(spec)],
        stdout=subprocess.PIPE,
    )
    assert peer.wait_exit(30) == 0, peer.stderr()
    wait_until(lambda: read_lines(b.out("out")) == ["first", "last"], 20, "the good records")

    def refused() -> dict[str, int]:
        return dict(status(b)["refused_by"])

    expected = {"attachment": 3, "key": 3, "oversize": 1, "delete": 1}
    wait_until(lambda: refused() == expected, 10, f"refusals {expected}")
    assert read_lines(b.out("else")) == ["first", "last"]  # nothing in another topic
    st = status(b)
    assert (st["refused"], st["lost"]) == (8, 0)
    reasons = {e["reason"] for e in b_writer.find("bridge_refused")}
    assert reasons == set(expected)
    assert b_writer.proc.poll() is None
    text = render_status({**_empty_status(), "bridge": st}, colour=False)
    assert "bridge      zenoh ext/*  lost 0  refused 8" in text
    b_writer.send(signal.SIGTERM)
    assert b_writer.wait_exit(10) == 0


def _empty_status() -> dict[str, Any]:
    """A segment_status() document with no readers (for render_status)."""
    return {
        "segment": "/x",
        "generation": 1,
        "writer_alive": True,
        "writer_pid": 1,
        "active": True,
        "capacity": 2,
        "slot_size": 64,
        "policy": "block",
        "size": 4096,
        "write_seq": 0,
        "rate": 0.0,
        "readers": [],
        "max_readers": 1,
    }
