"""Tests of shmd.daemons.zenoh_source: Zenoh samples into the bus, every record accounted.

Real processes on two hosts of the test's own (tests/netns_bus.py: network
namespaces joined by a veth pair, a bus in each): a's bridge (the zenoh
sink) sends, b's writer (the zenoh source) receives and counts.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemon_bus import read_lines, tick_numbers, wait_until
from netns_bus import (
    ENDPOINT,
    HELPERS,
    NsBus,
    bridge,
    flush_tail,
    missing_between,
    origin,
    receiver,
    sender,
    status,
    two_hosts,
    warm_up,
    write_fifo,
)

from shmd._sys.reactor import Reactor
from shmd.cli import render_status
from shmd.config import ZenohSourceConfig
from shmd.control.fields import TopicMap
from shmd.daemons.bridge import Stamp, StampCounter
from shmd.daemons.zenoh_source import MAX_ORIGINS, ZenohSource
from shmd.daemons.zenohio import read_status, status_path


@pytest.fixture
def hosts() -> Iterator[tuple[NsBus, NsBus]]:
    with two_hosts() as pair:
        yield pair


@pytest.mark.parametrize("pack", [False, True], ids=["per-record", "packed"])
def test_loss_on_a_slow_link_is_counted_exactly_under_drop_oldest(
    hosts: tuple[NsBus, NsBus], pack: bool
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
    bridge(a, pack=pack)
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

    def logged() -> int:
        return sum(int(e["count"]) for e in b_writer.find("bridge_lost"))

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


def test_a_restarted_receiver_resumes_its_account(hosts: tuple[NsBus, NsBus]) -> None:
    """b's writer stopped and started again reads its account back: a's records meanwhile count."""
    a, b = hosts
    # A ring of 20 s of ticks: the restarted file reader starts at its oldest
    # record, so it has every record the restarted writer published.
    b_writer, b_out = receiver(b, "drop-oldest", a, capacity=4096)
    sender(a, "drop-oldest", {"type": "ticker", "rate": 200.0})
    sending = bridge(a)
    out = b.out("out")
    wait_until(lambda: len(read_lines(out)) >= 50, 20, "50 ticks on b")
    b_writer.terminate()
    assert b_writer.wait_exit(10) == 0
    assert b_out.wait_exit(10) == 0  # drained what b's writer published, then left
    before = len(read_lines(out))
    again = b.writer()
    again.wait_for("bridge_receiving", resumed=1)
    b.file_reader("out", start="oldest")
    wait_until(lambda: len(read_lines(out)) >= before + 50, 20, "50 more ticks on b")
    sending.terminate()
    assert sending.wait_exit(10) == 0
    wait_until(lambda: origin(b, a).get("received") == len(read_lines(out)), 10, "b settled")
    ticks = tick_numbers(read_lines(out))
    gaps = sum(y - x - 1 for x, y in itertools.pairwise(ticks))
    assert ticks == sorted(set(ticks))
    o = origin(b, a)
    assert gaps > 0 and o["lost"] == gaps
    assert o["restarts"] == 0


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
    # The status file can be ahead of the log lines we have read: wait for each.
    for reason in expected:
        b_writer.wait_for("bridge_refused", reason=reason)
    assert {e["reason"] for e in b_writer.find("bridge_refused")} == set(expected)
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


class LocalHost:
    """The writer's side of a source, in this process: what it publishes, by topic."""

    max_payload = 224

    def __init__(self) -> None:
        self.reactor = Reactor()
        self.published: list[tuple[int, bytes]] = []

        self.calls: list[tuple[int, int]] = []  # (topic, records) per publish_batch

    def publish_batch(self, payloads: Sequence[bytes | memoryview], topic: int) -> None:
        self.calls.append((topic, len(payloads)))
        self.published.extend((topic, bytes(p)) for p in payloads)  # copied, as the writer does

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.reactor.call_later(delay, fn)

    def source_finished(self, reason: str) -> None:
        raise AssertionError(f"a zenoh source never finishes ({reason})")


def _sender_config(zenoh: Any, endpoint: str) -> Any:
    """A Zenoh peer's config that dials only ``endpoint``: no scouting, no shared memory."""
    conf = zenoh.Config()
    conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "false")
    return conf


def test_a_peer_spraying_origins_is_refused_past_the_cap(tmp_path: Path) -> None:
    """Stamped samples from more than MAX_ORIGINS origins: the rest refused, the account bounded."""
    zenoh = pytest.importorskip("zenoh", reason="the zenoh extra is not installed")
    endpoint = f"unixsock-stream/{tmp_path}/z.sock"
    segment = f"/shmd-test-{uuid.uuid4().hex}"
    cfg = ZenohSourceConfig(
        key="ext/**", listen=(endpoint,), topic_names=TopicMap({"good": 1}), segment=segment
    )
    host = LocalHost()
    source = ZenohSource(cfg)
    conf = _sender_config(zenoh, endpoint)
    sprayer: Any = None
    try:
        source.start(host)
        sprayer = zenoh.open(conf)
        total = MAX_ORIGINS + 44
        block = zenoh.CongestionControl.BLOCK
        pubs = [
            sprayer.declare_publisher(f"ext/o{i}/good", congestion_control=block)
            for i in range(total)
        ]
        deadline = time.monotonic() + 20
        while not all(p.matching_status.matching for p in pubs[-1:]):
            assert time.monotonic() < deadline, "no route to the source"
            host.reactor.poll(0.01)
        for i, pub in enumerate(pubs):
            pub.put(b"r%d" % i, attachment=Stamp(1, 5, 0, 9, 0, 0).encode())
        deadline = time.monotonic() + 20
        while len(host.published) + source.ledger.refused < total:
            assert time.monotonic() < deadline, f"{len(host.published)} published"
            host.reactor.poll(0.05)
        assert len(host.published) == MAX_ORIGINS
        assert {topic for topic, _ in host.published} == {1}
        assert source.refused_by == {"origin": total - MAX_ORIGINS}
        assert len(source.ledger.origins) == MAX_ORIGINS
    finally:
        if sprayer is not None:
            sprayer.close()
        source.close()
        host.reactor.close()
    try:
        st = read_status(segment)
        assert st is not None and st["refused_by"] == {"origin": 44}
    finally:
        status_path(segment).unlink(missing_ok=True)


@contextmanager
def local_source(
    tmp_path: Path, topics: dict[str, int], keys: Sequence[str]
) -> Iterator[tuple[LocalHost, ZenohSource, dict[str, Any]]]:
    """A zenoh source of ``ext/**`` in this process, and a peer's BLOCK publishers routed to it."""
    zenoh = pytest.importorskip("zenoh", reason="the zenoh extra is not installed")
    endpoint = f"unixsock-stream/{tmp_path}/z.sock"
    segment = f"/shmd-test-{uuid.uuid4().hex}"
    cfg = ZenohSourceConfig(
        key="ext/**", listen=(endpoint,), topic_names=TopicMap(topics), segment=segment
    )
    host = LocalHost()
    source = ZenohSource(cfg)
    sender_session: Any = None
    try:
        source.start(host)
        sender_session = zenoh.open(_sender_config(zenoh, endpoint))
        block = zenoh.CongestionControl.BLOCK
        pubs = {k: sender_session.declare_publisher(k, congestion_control=block) for k in keys}
        deadline = time.monotonic() + 20
        while not all(p.matching_status.matching for p in pubs.values()):
            assert time.monotonic() < deadline, "no route to the source"
            host.reactor.poll(0.01)
        yield host, source, pubs
    finally:
        if sender_session is not None:
            sender_session.close()
        source.close()
        host.reactor.close()
        status_path(segment).unlink(missing_ok=True)


def wait_taken(host: LocalHost, source: ZenohSource, samples: int) -> None:
    """Until ``samples`` records are published or refused (the writer's loop turning)."""
    deadline = time.monotonic() + 20
    while len(host.published) + source.ledger.refused < samples:
        assert time.monotonic() < deadline, f"{len(host.published)} published"
        host.reactor.poll(0.05)


def test_interleaved_topics_and_garbage_are_published_in_arrival_order(tmp_path: Path) -> None:
    """Runs of two topics with refused samples between them reach the bus in the order sent."""
    topics = {"good": 1, "other": 2}
    with local_source(tmp_path, topics, ["ext/a/good", "ext/a/other"]) as (host, source, pubs):
        expected: list[tuple[int, bytes]] = []
        garbage = 0
        for i in range(2000):
            name, topic = ("good", 1) if (i // 7) % 2 == 0 else ("other", 2)
            if i % 50 == 49:  # no attachment: refused, and no gap in the account
                pubs[f"ext/a/{name}"].put(b"junk")
                garbage += 1
            payload = b"r%d" % i
            pubs[f"ext/a/{name}"].put(payload, attachment=Stamp(1, i + 1, 0, 9, i, 0).encode())
            expected.append((topic, payload))
        wait_taken(host, source, len(expected) + garbage)
        assert host.published == expected
        assert sum(n for _, n in host.calls) == len(expected)
        assert source.refused_by == {"attachment": garbage}
        assert source.ledger.lost == 0


def test_packed_samples_are_unpacked_accounted_and_refused_record_by_record(
    tmp_path: Path,
) -> None:
    """Packs, a broken pack and plain samples: each record published, refused or counted alone."""
    stamps = StampCounter(9, all_topics=True)

    def pack(payloads: list[bytes]) -> tuple[bytes, bytes]:
        first = stamps.index + 1  # seq = index + 1, as the plain sample below
        entries = [(first + i, 0, len(p)) for i, p in enumerate(payloads)]
        return b"".join(payloads), stamps.next_pack(1, entries, 0)

    keys = ["ext/a/good", "ext/a/other", "ext/a/nosuch"]
    with local_source(tmp_path, {"good": 1, "other": 2}, keys) as (host, source, pubs):
        payload, attachment = pack([b"r0", b"r1", b"r2", b"r3", b"r4"])
        pubs["ext/a/good"].put(payload, attachment=attachment)
        pubs["ext/a/good"].put(payload + b"!", attachment=attachment)  # lengths do not add up
        for name, records in [
            ("nosuch", [b"r5", b"r6", b"r7"]),
            ("good", [b"r8", b"z" * 300, b"r10"]),
            ("other", [b"r11", b"r12"]),
        ]:
            payload, attachment = pack(records)
            pubs[f"ext/a/{name}"].put(payload, attachment=attachment)
        index = stamps.index
        pubs["ext/a/good"].put(b"r13", attachment=Stamp(1, index + 1, 0, 9, index, 0).encode())
        expected = [(1, b"r%d" % i) for i in (0, 1, 2, 3, 4, 8, 10)]
        expected += [(2, b"r11"), (2, b"r12"), (1, b"r13")]
        wait_taken(host, source, len(expected) + 5)
        assert host.published == expected
        assert source.refused_by == {"attachment": 1, "key": 3, "oversize": 1}
        assert source.ledger.lost == 0
        assert source.ledger.origins["ext/a"].received == 14


def test_packs_out_of_order_are_accounted_record_by_record(tmp_path: Path) -> None:
    """A pack after a gap, one repeating a seq, then one in order: losses counted, bus in order."""

    def put(pub: Any, index: int, records: list[tuple[int, bytes]]) -> None:
        stamps = StampCounter(9, all_topics=True)
        stamps.index = index
        entries = [(seq, 0, len(p)) for seq, p in records]
        pub.put(b"".join(p for _, p in records), attachment=stamps.next_pack(1, entries, 0))

    with local_source(tmp_path, {"good": 1}, ["ext/a/good"]) as (host, source, pubs):
        good = pubs["ext/a/good"]
        put(good, 0, [(1, b"a1"), (2, b"a2")])  # joins
        put(good, 2, [(3, b"a3"), (4, b"a4")])  # in order: accounted at once
        put(good, 6, [(7, b"a7"), (8, b"a8")])  # indexes 4 and 5 lost on the way
        put(good, 8, [(9, b"a9"), (9, b"a9 again"), (10, b"a10")])  # a repeated seq
        put(good, 11, [(11, b"a11"), (12, b"a12")])
        expected = [b"a1", b"a2", b"a3", b"a4", b"a7", b"a8", b"a9", b"a10", b"a11", b"a12"]
        wait_taken(host, source, len(expected))  # the last pack's records are published
        assert host.published == [(1, p) for p in expected]
        o = source.ledger.origins["ext/a"]
        assert (o.lost, o.reordered, o.received) == (2, 1, 10)
        assert source.refused_by == {}
