"""Tests of shmd.daemons.writer: shm-writer as a real process on a real socket and segment."""

from __future__ import annotations

import datetime
import os
import select
import signal
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from daemon_bus import (
    Bus,
    assert_contiguous,
    program,
    read_lines,
    running_bus,
    tick_numbers,
    wait_until,
)

from shmd.bus.layout import ReaderState
from shmd.bus.segment import Segment
from shmd.bus.subscriber import Subscriber
from shmd.config import load_config
from shmd.control import protocol
from shmd.control.frames import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_MAGIC,
    PeerClosed,
    decode_frame_header,
)
from shmd.control.listener import connect
from shmd.daemons import logs
from shmd.daemons.writer import Writer

SEQPACKET = socket.SOCK_SEQPACKET


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


# -- helpers ------------------------------------------------------------------------------


def _connected(sock: socket.socket, path: str) -> bool:
    """Connect ``sock`` to ``path``; False while nothing listens there yet."""
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    return True


def activate_cmd(bus: Bus, listen: str, *extra: str) -> list[str]:
    """systemd-socket-activate running shm-writer on ``listen`` (systemd's own tool)."""
    return [
        "systemd-socket-activate",
        *extra,
        "-l",
        listen,
        "--fdname=control",
        "-E",
        f"SHMD_CONFIG={bus.config_path}",
        *program("shm-writer"),
    ]


def recv_message(sock: socket.socket, timeout: float = 5.0) -> protocol.Message | None:
    """One frame from a raw seqpacket socket, decoded; None when the writer hung up."""
    r, _, _ = select.select([sock], [], [], timeout)
    assert r, f"the writer did not answer within {timeout} s"
    data, anc, _flags, _ = sock.recvmsg(1 << 17, socket.CMSG_SPACE(64))
    if not data:
        return None
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) - len(raw) % 4]))
    for fd in fds:
        os.close(fd)
    length, n_fds = decode_frame_header(data, 1 << 17)
    return protocol.decode(data[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length], n_fds)


def raw_client(bus: Bus) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(bus.socket)
    except BaseException:
        s.close()
        raise
    return s


def frame(body: bytes, n_fds: int = 0) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, 0, len(body), n_fds, 0) + body


def ticks_reach(bus: Bus, instance: str, n: int) -> bool:
    numbers = tick_numbers(read_lines(bus.out(instance)))
    return bool(numbers) and numbers[-1] >= n


def write_seq(bus: Bus) -> int:
    seg = Segment.open(name=bus.segment, control_writable=False)
    try:
        return seg.write_seq
    finally:
        seg.close()


def keeps_receiving(bus: Bus, instance: str, more: int = 20, timeout: float = 10.0) -> None:
    """The reader's file keeps growing: ``more`` ticks past the last one it holds now."""
    numbers = tick_numbers(read_lines(bus.out(instance)))
    target = (numbers[-1] if numbers else 0) + more
    wait_until(
        lambda: ticks_reach(bus, instance, target), timeout, what=f"{instance} reaching {target}"
    )


def stop_and_check_all_ticks(
    bus: Bus,
    writer: Any,
    readers: dict[str, Any],
    *,
    only_ticks: bool = True,
    timeout: float = 10.0,
) -> None:
    """SIGTERM the writer; every reader exits 0 having received every tick since it attached."""
    # ``only_ticks``: the ticker published everything, so tick N has seq N-1.
    writer.terminate()
    cleared = writer.wait_for("active_cleared", timeout)
    for name, r in readers.items():
        assert r.wait_exit(timeout) == 0, r.stderr()
        drained = r.wait_for("drained")
        assert drained["seq"] == cleared["seq"], (name, drained, cleared)
        numbers = tick_numbers(read_lines(bus.out(name)))
        assert_contiguous(numbers, f"ticks of {name}")
        if only_ticks:  # nothing published before shutdown is missing at the end
            assert numbers[-1] == cleared["seq"], (name, numbers[-1], cleared)
    assert writer.wait_exit(timeout) == 0, writer.stderr()


# -- start-up: binding, activation ------------------------------------------------------------


def test_writer_binds_its_socket_replacing_a_stale_file(bus: Bus) -> None:
    """Started by hand, the writer replaces a stale socket file and unlinks its own on exit."""
    stale = socket.socket(socket.AF_UNIX, SEQPACKET)
    stale.bind(bus.socket)
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    with pytest.raises(ConnectionRefusedError):
        raw_client(bus)
    bus.configure(control={"mode": 0o640})
    w = bus.writer()
    ready = w.find("listener_ready")[0]
    assert ready["activated"] is False and ready["socket"] == bus.socket
    st = os.stat(bus.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    r = bus.file_reader("1")
    wait_until(lambda: ticks_reach(bus, "1", 3), what="ticks in the file")
    w.terminate()
    assert w.wait_exit() == 0
    assert r.wait_exit() == 0
    assert not os.path.lexists(bus.socket)
    assert not bus.segment_exists()


def test_writer_refuses_a_socket_another_process_listens_on(bus: Bus) -> None:
    """A live listener on the path makes the writer exit 1 with one start_failed line."""
    live = socket.socket(socket.AF_UNIX, SEQPACKET)
    live.bind(bus.socket)
    live.listen(1)
    try:
        w = bus.writer(wait_ready=False)
        assert w.wait_exit() == 1
        failed = w.wait_for("start_failed")
        assert "another process is listening" in failed["error"]
        assert bus.socket in failed["error"]
        assert "Traceback" not in w.stderr()
        assert os.path.exists(bus.socket)  # not ours: left alone
        assert not bus.segment_exists()
    finally:
        live.close()


def test_writer_under_systemd_socket_activate(bus: Bus) -> None:
    """Under systemd-socket-activate the writer serves on the inherited listener."""
    bus.configure()
    act = bus.spawn("systemd-socket-activate", activate_cmd(bus, bus.socket, "--seqpacket"))
    wait_until(lambda: os.path.exists(bus.socket), what="the activation socket")
    # The first connection is what starts the writer.
    r = bus.file_reader("1")
    ready = act.wait_for("listener_ready")
    assert ready["activated"] is True and ready["type"] == "seqpacket"
    act.wait_for("reader_attached", reader="1")
    wait_until(lambda: ticks_reach(bus, "1", 5), what="ticks in the file")
    stop_and_check_all_ticks(bus, act, {"1": r})
    assert not bus.segment_exists()
    # The listener was systemd's: the writer does not remove its file.
    assert os.path.exists(bus.socket)


@pytest.mark.parametrize("mismatch", ["path", "type"])
def test_socket_activation_mismatch_is_refused(bus: Bus, mismatch: str) -> None:
    """An inherited socket of another path or type is refused with a message naming both sockets."""
    bus.configure()
    if mismatch == "path":
        listen, extra, kind = str(bus.dir / "other.sock"), ["--seqpacket"], SEQPACKET
        have, want = f"'{listen}' (seqpacket)", f"'{bus.socket}' (seqpacket)"
    else:
        listen, extra, kind = bus.socket, [], socket.SOCK_STREAM
        have, want = f"'{bus.socket}' (stream)", f"'{bus.socket}' (seqpacket)"
    act = bus.spawn("systemd-socket-activate", activate_cmd(bus, listen, *extra))
    poke = socket.socket(socket.AF_UNIX, kind)
    try:
        # systemd-socket-activate binds (the path appears) before it listens:
        # a connect in between is refused.  The connect that succeeds is the
        # condition itself (and makes it exec the writer).
        wait_until(lambda: _connected(poke, listen), what="the activation socket listening")
        assert act.wait_exit() == 1
    finally:
        poke.close()
    failed = act.wait_for("start_failed")
    assert have in failed["error"] and want in failed["error"], failed["error"]
    assert "Traceback" not in act.stderr()
    assert not bus.segment_exists()


def test_stream_control_socket_serves_readers_too(bus: Bus) -> None:
    """With control.type stream readers attach the same way; a half-sent frame hurts nobody."""
    bus.configure(control={"type": "stream"})
    w = bus.writer()
    assert w.find("listener_ready")[0]["type"] == "stream"
    r = bus.file_reader("1")
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(bus.socket)
    half.send(frame(hello_body("half"))[:7])
    half.close()  # hangs up in the middle of its Hello
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(bus.socket)
    try:
        client.send(FRAME_HEADER.pack(0x1234, 0, 4, 0, 0) + b"abcd")
        r_, _, _ = select.select([client], [], [], 5)
        assert r_, "no answer to a bad frame on the stream socket"
        data = client.recv(4096)
        length, _ = decode_frame_header(data, 4096)
        refuse = protocol.decode(data[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length], 0)
        assert isinstance(refuse, protocol.Refuse) and "magic" in refuse.reason
    finally:
        client.close()
    keeps_receiving(bus, "1")
    stop_and_check_all_ticks(bus, w, {"1": r})
    assert not w.find("reader_attached", reader="half")


# -- the termination flow, lost readers ---------------------------------------------------------


def test_sigterm_stops_writer_and_every_reader_cleanly(bus: Bus) -> None:
    """SIGTERM clears the active flag; every reader drains, detaches and exits 0."""
    # The writer logs active_cleared, reader_detached for each and shutdown_complete; the
    # readers writer_inactive, drained and exiting.
    w = bus.writer()
    readers = {name: bus.file_reader(name) for name in ("1", "2", "3")}
    generation = w.find("listener_ready")[0]["generation"]
    for name, r in readers.items():
        attached = w.wait_for("reader_attached", reader=name)
        assert attached["pid"] == r.pid and attached["generation"] == generation
        assert isinstance(attached["seq"], int)
    wait_until(lambda: all(ticks_reach(bus, n, 10) for n in readers), what="ticks for all")
    stop_and_check_all_ticks(bus, w, readers)
    cleared = w.find("active_cleared")[0]
    assert cleared["readers"] == 3 and cleared["reason"] == "SIGTERM"
    for name, r in readers.items():
        inactive = r.wait_for("writer_inactive")
        assert inactive["generation"] == generation
        names = r.names()
        assert names.index("writer_inactive") < names.index("drained") < names.index("exiting")
        assert r.find("exiting")[0]["status"] == 0
        detached = w.find("reader_detached", reader=name)
        assert len(detached) == 1 and detached[0]["pid"] == r.pid
        assert detached[0]["reason"] == "drained" and detached[0]["lost"] == 0
    assert w.find("shutdown_complete", generation=generation)
    names = w.names()
    assert names.index("active_cleared") < names.index("shutdown_complete")
    assert max(i for i, n in enumerate(names) if n == "reader_detached") < names.index(
        "shutdown_complete"
    )
    assert not w.find("reader_lost")
    assert not bus.segment_exists()
    assert not os.path.lexists(bus.socket)


def test_sigkilled_reader_is_lost_and_its_entry_freed(bus: Bus) -> None:
    """A SIGKILLed reader is logged reader_lost, its entry freed; the others miss nothing."""
    w = bus.writer()
    victim = bus.file_reader("victim")
    survivor = bus.file_reader("survivor")
    index = w.wait_for("reader_attached", reader="victim")["index"]
    seg = Segment.open(name=bus.segment, control_writable=False)
    try:
        entry = seg.entry(index)
        assert entry.state == ReaderState.ATTACHED and entry.pid == victim.pid
        assert entry.name == "victim"
        wait_until(lambda: ticks_reach(bus, "victim", 5), what="ticks for the victim")
        victim.kill()
        assert victim.wait_exit() == -signal.SIGKILL
        lost = w.wait_for("reader_lost", reader="victim")
        assert lost["pid"] == victim.pid and lost["index"] == index
        assert seg.entry(index).state == ReaderState.FREE
        assert [e.name for e in seg.entries() if e.state == ReaderState.ATTACHED] == ["survivor"]
    finally:
        seg.close()
    keeps_receiving(bus, "survivor")
    stop_and_check_all_ticks(bus, w, {"survivor": survivor})


# -- SIGHUP ---------------------------------------------------------------------------------------


def tick_intervals(bus: Bus, instance: str) -> list[tuple[float, float]]:
    """(unix time of a tick, seconds since the previous tick) from the ticker's own stamps."""
    out = []
    prev: float | None = None
    for line in read_lines(bus.out(instance)):
        ts = float(line.split(" ")[2])
        if prev is not None:
            out.append((ts, ts - prev))
        prev = ts
    return out


def unix_time(event: dict[str, Any]) -> float:
    """An event's ISO UTC timestamp as unix time (the ticker stamps records with time.time())."""
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def test_sighup_applies_level_and_ticker_rate_live(bus: Bus) -> None:
    """SIGHUP after changing logging.level and the ticker rate logs reload and both take effect."""
    bus.configure(writer={"source": {"rate": 10.0}})
    w = bus.writer()
    r = bus.file_reader("1")
    start = w.wait_for("reader_attached")["seq"]
    wait_until(lambda: ticks_reach(bus, "1", start + 5), what="five ticks at 10/s")
    assert not w.find("reader_connected")  # a debug event: not logged at info
    mark = w.mark()
    bus.configure(writer={"source": {"rate": 500.0}}, logging={"level": "debug"})
    w.send(signal.SIGHUP)
    reload = w.wait_for("reload", since=mark)
    assert reload["applied"] == "logging.level,writer.source.rate"
    assert reload["refused"] == "none" and reload["path"] == str(bus.config_path)
    # 100 ticks in under 5 s cannot happen at 10/s.
    target = write_seq(bus) + 100
    wait_until(lambda: ticks_reach(bus, "1", target), timeout=5, what="100 ticks at 500/s")
    # The writer logs reload in the loop turn that applies the rate, before
    # any tick at the new rate: ticks before its stamp are at 10/s, the gaps
    # between ticks after it at 500/s.
    switched = unix_time(reload)
    intervals = tick_intervals(bus, "1")
    before = [dt for ts, dt in intervals if ts < switched]
    after = [dt for ts, dt in intervals if ts - dt > switched]
    # 10/s is 0.1 s apart, 500/s 2 ms: thresholds far from both, for a loaded machine.
    assert len(before) >= 4 and median(before) > 0.06, before
    assert len(after) >= 90 and median(after) < 0.04, after
    # The new level is live: a connection is now logged at debug.
    client = raw_client(bus)
    client.close()
    w.wait_for("reader_connected", since=mark)
    stop_and_check_all_ticks(bus, w, {"1": r})


def test_sighup_refuses_keys_that_need_a_restart(bus: Bus) -> None:
    """Changing segment.capacity is refused on SIGHUP (logged) and the writer keeps publishing."""
    bus.configure()
    w = bus.writer()
    r = bus.file_reader("1")
    mark = w.mark()
    bus.configure(segment={"capacity": 512})
    w.send(signal.SIGHUP)
    reload = w.wait_for("reload", since=mark)
    assert reload["applied"] == "none" and reload["refused"] == "segment.capacity"
    refused = w.wait_for("reload_refused", since=mark)
    assert refused["keys"] == "segment.capacity" and "restart" in refused["reason"]
    keeps_receiving(bus, "1")
    stop_and_check_all_ticks(bus, w, {"1": r})


def test_sighup_applies_only_the_live_keys_of_a_file_that_changes_both(bus: Bus) -> None:
    """A reload changing a live and a refused control key applies the first and keeps the second."""
    bus.configure(control={"handshake_timeout": 1.0})
    w = bus.writer()
    mark = w.mark()
    bus.configure(control={"handshake_timeout": 30.0, "allowed_users": [65534]})
    w.send(signal.SIGHUP)
    reload = w.wait_for("reload", since=mark)
    assert reload["applied"] == "control.allowed_users"
    assert reload["refused"] == "control.handshake_timeout"
    # The running handshake timeout is still 1 s: a silent peer hears so.
    client = raw_client(bus)
    try:
        answer = recv_message(client, timeout=10)
        assert isinstance(answer, protocol.Refuse) and answer.reason == "handshake timeout"
    finally:
        client.close()
    assert w.wait_for("reader_refused", since=mark)["reason"] == "no Hello within 1 s"
    # And the next reload still finds it different from what runs.
    mark = w.mark()
    w.send(signal.SIGHUP)
    reload = w.wait_for("reload", since=mark)
    assert reload["applied"] == "none" and reload["refused"] == "control.handshake_timeout"
    w.terminate()
    assert w.wait_exit() == 0


def test_sighup_with_a_broken_file_keeps_the_running_configuration(bus: Bus) -> None:
    """A broken file on SIGHUP logs config_error and the writer runs on with the old settings."""
    bus.configure()
    w = bus.writer()
    r = bus.file_reader("1")
    mark = w.mark()
    bus.config_path.write_text("segment:\n  capacity: 256\nwriter:\n  status_interval: -1\n")
    w.send(signal.SIGHUP)
    err = w.wait_for("config_error", since=mark)
    assert err["path"] == str(bus.config_path) and err["line"] == 4
    assert err["key"] == "writer.status_interval" and "running configuration kept" in err["action"]
    assert not w.find("reload", since=mark)
    keeps_receiving(bus, "1")
    # Fixed again, the next SIGHUP applies it.
    mark = w.mark()
    bus.configure(writer={"status_interval": 0.25})
    w.send(signal.SIGHUP)
    assert w.wait_for("reload", since=mark)["applied"] == "writer.status_interval"
    stop_and_check_all_ticks(bus, w, {"1": r})


# -- bad input on the control socket --------------------------------------------------------------


def hello_body(instance: str, version: int = protocol.PROTOCOL_VERSION) -> bytes:
    body = protocol.Hello(instance=instance, pid=os.getpid()).encode()
    return body[:2] + version.to_bytes(2, "little") + body[4:]


# name, datagram, fds to send with it, expected refuse code, words of the reason
BAD_MESSAGES: list[tuple[str, bytes, int, protocol.RefuseCode, str]] = [
    (
        "bad magic",
        FRAME_HEADER.pack(0x1234, 0, 4, 0, 0) + b"abcd",
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "magic is 0x1234",
    ),
    (
        "oversized",
        frame(b"x" * 2000),
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "2000 bytes, more than max_message 1024",
    ),
    (
        "truncated",
        FRAME_HEADER.pack(FRAME_MAGIC, 0, 100, 0, 0) + b"0123456789",
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "header says 100 body bytes but the datagram carries 10",
    ),
    (
        "short body",
        frame(b"\x01\x00"),
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "shorter than the 4-byte type/version prefix",
    ),
    (
        "wrong version",
        frame(hello_body("v5", version=5)),
        0,
        protocol.RefuseCode.VERSION,
        "protocol version 5 but this side speaks 4",
    ),
    (
        "unknown type",
        frame(b"\x63\x00\x04\x00"),
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "its type 99 is unknown",
    ),
    (
        "fds with a hello",
        frame(hello_body("fds"), 1),
        1,
        protocol.RefuseCode.BAD_MESSAGE,
        "came with it but a Hello carries exactly 0",
    ),
    (
        "bad instance name",
        frame(hello_body("x")[:-2] + b"/\x00"),  # the instance's byte, then no topic names
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "instance name '/' does not match",
    ),
    (
        "a writer's message",
        frame(protocol.PublishAck(seq=1).encode()),
        0,
        protocol.RefuseCode.BAD_MESSAGE,
        "a PublishAck is not for the writer",
    ),
]


def test_bad_control_messages_are_refused_and_logged_and_lose_nothing(bus: Bus) -> None:
    """Malformed, oversized, truncated, wrong-version or misplaced messages each get a Refuse."""
    # Each is logged as reader_refused with its code, and the attached reader keeps receiving
    # every record meanwhile.
    bus.configure(control={"max_message": 1024})
    w = bus.writer()
    r = bus.file_reader("1")
    for name, datagram, n_fds, code, words in BAD_MESSAGES:
        mark = w.mark()
        client = raw_client(bus)
        rfd, wfd = os.pipe()
        try:
            fds = [rfd] * n_fds
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{n_fds}i", *fds))]
            client.sendmsg([datagram], anc if n_fds else [])
            answer = recv_message(client)
            assert isinstance(answer, protocol.Refuse), (name, answer)
            assert answer.code == code and words in answer.reason, (name, answer)
            assert recv_message(client) is None, name  # and the writer hung up
        finally:
            client.close()
            os.close(rfd)
            os.close(wfd)
        refused = w.wait_for("reader_refused", since=mark)
        assert refused["code"] == code.name.lower(), (name, refused)
        assert refused["pid"] == os.getpid() and refused["uid"] == os.getuid()
        assert words in refused["error"], (name, refused)
    keeps_receiving(bus, "1")
    stop_and_check_all_ticks(bus, w, {"1": r})


def test_second_hello_on_an_attached_connection_is_refused(bus: Bus) -> None:
    """A reader connection that says Hello twice is refused and its entry freed, with the reason."""
    w = bus.writer()
    client = connect(bus.socket, SEQPACKET, timeout=5)
    try:
        client.send(hello_body("twice"), timeout=5)
        with client.recv(timeout=5) as welcome:
            assert isinstance(protocol.decode(welcome.body, len(welcome.fds)), protocol.Welcome)
        w.wait_for("reader_attached", reader="twice")
        client.send(hello_body("twice"), timeout=5)
        with client.recv(timeout=5) as answer:
            refuse = protocol.decode(answer.body, len(answer.fds))
        assert isinstance(refuse, protocol.Refuse)
        assert refuse.code == protocol.RefuseCode.BAD_MESSAGE and refuse.reason == "a second Hello"
        lost = w.wait_for("reader_lost", reader="twice")
        assert lost["reason"] == "a second Hello"
    finally:
        client.close()


def test_duplicate_instance_name_is_refused(bus: Bus) -> None:
    """A Hello naming an instance that is attached already gets Refuse DUPLICATE_INSTANCE."""
    w = bus.writer()
    r = bus.file_reader("1")
    client = connect(bus.socket, SEQPACKET, timeout=5)
    try:
        client.send(hello_body("1"), timeout=5)
        with client.recv(timeout=5) as answer:
            refuse = protocol.decode(answer.body, len(answer.fds))
        assert isinstance(refuse, protocol.Refuse)
        assert refuse.code == protocol.RefuseCode.DUPLICATE_INSTANCE and "'1'" in refuse.reason
    finally:
        client.close()
    refused = w.wait_for("reader_refused", reader="1")
    assert refused["code"] == "duplicate_instance" and refused["pid"] == os.getpid()
    keeps_receiving(bus, "1")
    stop_and_check_all_ticks(bus, w, {"1": r})


# -- topics by name ------------------------------------------------------------------------


TOPICS = {"ticks": 1, "frames": 2, "fx.eur": 5}


def test_a_hello_naming_an_unknown_topic_is_refused_and_logged(bus: Bus) -> None:
    """A Hello naming a topic segment.topics lacks gets Refuse UNKNOWN_TOPIC listing the names."""
    bus.configure(segment={"topics": TOPICS})
    w = bus.writer()
    client = connect(bus.socket, SEQPACKET, timeout=5)
    try:
        hello = protocol.Hello("named", pid=os.getpid(), topics=0, topic_names=("ticks", "foo"))
        client.send(hello.encode(), timeout=5)
        with client.recv(timeout=5) as answer:
            refuse = protocol.decode(answer.body, len(answer.fds))
    finally:
        client.close()
    assert isinstance(refuse, protocol.Refuse)
    assert refuse.code == protocol.RefuseCode.UNKNOWN_TOPIC
    assert refuse.reason == "unknown topic 'foo' (this bus has: frames, fx.eur, ticks)"
    refused = w.wait_for("reader_refused", reader="named")
    assert refused["code"] == "unknown_topic" and refused["reason"] == refuse.reason
    assert refused["pid"] == os.getpid() and refused["uid"] == os.getuid()
    assert w.find("reader_attached", reader="named") == []


def publish_on(bus: Bus, records: list[tuple[int, bytes]]) -> None:
    """Publish ``(topic, payload)`` records over the control socket, each acknowledged."""
    with connect(bus.socket, SEQPACKET, timeout=5) as conn:
        for topic, payload in records:
            conn.send(protocol.Publish(topic, payload).encode(), timeout=5)
            with conn.recv(timeout=5) as answer:
                ack = protocol.decode(answer.body, len(answer.fds))
            assert isinstance(ack, protocol.PublishAck), ack


def test_sighup_refuses_a_topic_map_change_and_keeps_the_old_names(bus: Bus) -> None:
    """A reload renaming a topic is refused (segment.topics); Hellos still resolve the old names."""
    bus.configure(segment={"topics": {"ticks": 1}})
    w = bus.writer()
    mark = w.mark()
    bus.settings["segment"]["topics"] = {"tocks": 1}  # replaced, not merged
    bus.configure()
    w.send(signal.SIGHUP)
    assert w.wait_for("reload", since=mark)["refused"] == "segment.topics"
    assert w.wait_for("reload_refused", since=mark)["keys"] == "segment.topics"
    with connect(bus.socket, SEQPACKET, timeout=5) as conn:
        hello = protocol.Hello("old", pid=os.getpid(), topics=0, topic_names=("tocks",))
        conn.send(hello.encode(), timeout=5)
        with conn.recv(timeout=5) as answer:
            refuse = protocol.decode(answer.body, len(answer.fds))
    assert isinstance(refuse, protocol.Refuse)
    assert refuse.reason == "unknown topic 'tocks' (this bus has: ticks)"


@pytest.mark.parametrize("mask", [0, 1 << 7], ids=["names only", "names and an id"])
def test_a_hello_naming_topics_receives_only_theirs(bus: Bus, mask: int) -> None:
    """A reader saying Hello with topic names gets the map in its Welcome and only those records."""
    bus.configure(segment={"topics": TOPICS}, writer={"source": {"rate": 0.0}})
    w = bus.writer()
    conn = connect(bus.socket, SEQPACKET, timeout=5)
    sub: Subscriber | None = None
    try:
        hello = protocol.Hello(
            "named",
            pid=os.getpid(),
            topics=mask,
            start=protocol.StartCode.OLDEST,
            topic_names=("frames", "fx.eur"),
        )
        conn.send(hello.encode(), timeout=5)
        answer = conn.recv(timeout=5)
        welcome = protocol.decode(answer.body, len(answer.fds))
        if not isinstance(welcome, protocol.Welcome):
            answer.close()
            raise AssertionError(f"the writer answered {welcome}")
        eventfd, segfd, lifeline = answer.fds  # ours now: the subscriber takes two
        lifeline.close()
        sub = Subscriber.attach(index=welcome.reader_index, fd=segfd, eventfd=eventfd)
        assert welcome.topics == TOPICS
        assert list(welcome.topics) == ["ticks", "frames", "fx.eur"]
        attached = w.wait_for("reader_attached", reader="named")
        want = (1 << 2) | (1 << 5) | mask
        assert attached["topics"] == f"{want:#x}" and attached["topic_names"] == "frames,fx.eur"
        sent = [(t, f"{t}:{i}".encode()) for i in range(10) for t in (0, 1, 2, 5, 7)]
        publish_on(bus, sent)
        expected = [(t, p) for t, p in sent if want >> t & 1]
        got: list[tuple[int, bytes]] = []

        def caught_up() -> bool:
            assert sub is not None
            got.extend((r.topic, bytes(r.payload)) for r in sub.read())
            return len(got) >= len(expected)

        wait_until(caught_up, 10.0, what="the named topics' records")
        assert got == expected
        assert sub.lost == 0
    finally:
        if sub is not None:
            sub.close()
        conn.close()
    w.wait_for("reader_lost", reader="named")


def test_silent_peer_is_refused_after_the_handshake_timeout(bus: Bus) -> None:
    """A peer that connects and says nothing is refused after control.handshake_timeout."""
    bus.configure(control={"handshake_timeout": 1.0})
    w = bus.writer()
    r = bus.file_reader("1")
    client = raw_client(bus)
    try:
        answer = recv_message(client)
        assert isinstance(answer, protocol.Refuse)
        assert answer.code == protocol.RefuseCode.BAD_MESSAGE
        assert answer.reason == "handshake timeout"
        assert recv_message(client) is None
    finally:
        client.close()
    refused = w.wait_for("reader_refused", pid=os.getpid())
    assert refused["code"] == "bad_message" and refused["reason"] == "no Hello within 1 s"
    keeps_receiving(bus, "1")
    stop_and_check_all_ticks(bus, w, {"1": r})


def test_flooding_peer_is_dropped_and_logged(bus: Bus) -> None:
    """A peer that floods Publish messages and never reads its acks is dropped and logged."""
    # The writer's loop stays fair meanwhile: the reader (topic 0 only) gets every tick.
    bus.configure(segment={"capacity": 1 << 16}, writer={"source": {"rate": 200.0}})
    w = bus.writer()
    r = bus.file_reader("1", topics=[0])
    flood = socket.socket(socket.AF_UNIX, SEQPACKET | socket.SOCK_CLOEXEC)
    # Some 40000 messages before the writer's 1 MiB of unsent acks is full:
    # generous deadlines, as a loaded machine makes this slow, not wrong.
    flood.settimeout(30)
    flood.connect(bus.socket)
    body = frame(protocol.Publish(topic=7, payload=b"flood").encode())
    sent = 0
    try:
        for sent in range(1, 1_000_000):  # noqa: B007 - counted for the messages below
            flood.send(body)
        raise AssertionError("the writer took a million messages without dropping the peer")
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped: what this test wants
    except TimeoutError:
        raise AssertionError(
            f"the writer stopped reading the flood after {sent} messages without dropping it"
        ) from None
    finally:
        flood.close()
    dropped = w.wait_for("reader_error", 30, pid=os.getpid())
    assert "the peer is not reading" in dropped["error"], dropped
    assert sent > 1000
    keeps_receiving(bus, "1", timeout=30)
    stop_and_check_all_ticks(bus, w, {"1": r}, only_ticks=False, timeout=30)


NOBODY = 65534


def attach_as_nobody(socket_path: str) -> str:
    """Fork; the child drops to uid/gid 65534, connects, says Hello; returns what it got."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            conn = connect(socket_path, SEQPACKET, timeout=5)
            try:
                conn.send(hello_body("nobody"), timeout=5)
            except PeerClosed:
                pass  # refused before our Hello arrived: the Refuse is still there to read
            try:
                answer = conn.recv(timeout=5)
            except PeerClosed:
                # Linux: the writer closed with our Hello unread, so our
                # first recv reports ECONNRESET (and clears it) although
                # the Refuse sits in our queue; the next recv returns it.
                answer = conn.recv(timeout=5)
            with answer:
                msg = protocol.decode(answer.body, len(answer.fds))
            if isinstance(msg, protocol.Refuse):
                report = f"refuse {msg.code.name} {msg.reason}"
            else:
                report = f"{type(msg).__name__}"
                conn.send(protocol.Detach(protocol.DetachCode.NORMAL, "done").encode(), timeout=5)
            conn.close()
            os.write(wfd, report.encode())
            status = 0
        except BaseException as exc:
            os.write(wfd, f"error {exc!r}".encode())
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        r, _, _ = select.select([rfd], [], [], 10)
        assert r, "the uid 65534 client did not report within 10 s"
        with os.fdopen(rfd, "rb") as pipe:
            report = pipe.read().decode()
    finally:
        _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, report
    return report


def test_peer_not_in_allowed_users_or_groups_is_refused(bus: Bus) -> None:
    """A peer of another uid is refused NOT_ALLOWED with its pid and uid logged, until allowed."""
    # control.allowed_users is live: after a SIGHUP adding uid 65534 the same client is
    # welcomed. The attached reader misses nothing meanwhile.
    os.chmod(bus.dir, 0o755)
    bus.configure(control={"mode": 0o666})
    w = bus.writer()
    r = bus.file_reader("1")
    report = attach_as_nobody(bus.socket)
    assert report == "refuse NOT_ALLOWED uid 65534 is not allowed to attach", report
    refused = w.wait_for("reader_refused", uid=NOBODY)
    assert refused["code"] == "not_allowed" and refused["gid"] == NOBODY
    assert isinstance(refused["pid"], int) and refused["pid"] not in (os.getpid(), 0)
    mark = w.mark()
    bus.configure(control={"allowed_users": [NOBODY]})
    w.send(signal.SIGHUP)
    assert w.wait_for("reload", since=mark)["applied"] == "control.allowed_users"
    assert attach_as_nobody(bus.socket) == "Welcome"
    assert w.wait_for("reader_attached", reader="nobody", since=mark)["uid"] == NOBODY
    assert w.wait_for("reader_detached", reader="nobody", since=mark)["reason"] == "done"
    keeps_receiving(bus, "1")
    stop_and_check_all_ticks(bus, w, {"1": r})


# -- journal fields, in-process -------------------------------------------------------------------


class JournalCapture:
    """A journal sender for logs.configure_logging: keeps entries, wakes waiters."""

    def __init__(self) -> None:
        self.entries: list[dict[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, fields: dict[str, str]) -> None:
        with self._cond:
            self.entries.append(dict(fields))
            self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = 10.0) -> dict[str, str]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(e["SHMD_EVENT"] == event for e in self.entries), timeout
            )
            assert ok, f"no {event} journal entry within {timeout} s: {self.entries}"
            return next(e for e in self.entries if e["SHMD_EVENT"] == event)

    def find(self, event: str) -> list[dict[str, str]]:
        with self._cond:
            return [e for e in self.entries if e["SHMD_EVENT"] == event]


def test_writer_events_map_to_journal_fields(bus: Bus) -> None:
    """With target journal the writer's events carry SHMD_EVENT/ROLE/READER/GENERATION/SEQ."""
    # The writer runs its real loop in this process (signals need the main thread); a real
    # shm-reader attaches, then SIGTERM to this process starts the termination flow.
    cfg = load_config(bus.configure(writer={"shutdown_grace": 3.0}))
    journal = JournalCapture()
    assert (
        logs.configure_logging("writer", level="info", target="journal", sender=journal)
        == "journal"
    )
    writer = Writer(cfg, logs.get_logger(), str(bus.config_path))
    failures: list[BaseException] = []
    readers: list[Any] = []

    def drive() -> None:
        # Every wait has a deadline and SIGTERM is always sent, so the loop
        # in the main thread always ends.
        try:
            journal.wait_for("listener_ready")
            readers.append(bus.file_reader("j"))
            journal.wait_for("reader_attached")
        except BaseException as exc:
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        writer.start()
        helper = threading.Thread(target=drive, name="drive-writer")
        helper.start()
        try:
            status = writer.run()
        finally:
            helper.join(30)  # before close(): SIGTERM must still find our handler
    finally:
        writer.close()
        logs.reset_logging()
    assert not failures, failures
    assert status == 0
    (reader,) = readers
    assert reader.wait_exit() == 0
    generation = journal.wait_for("listener_ready")["SHMD_GENERATION"]
    assert generation.isdigit()
    attached = journal.wait_for("reader_attached")
    assert attached["SHMD_ROLE"] == "writer" and attached["SYSLOG_IDENTIFIER"] == "shm-writer"
    assert attached["SHMD_READER"] == "j" and attached["SHMD_PID"] == str(reader.pid)
    assert attached["SHMD_GENERATION"] == generation and attached["SHMD_SEQ"].isdigit()
    assert attached["PRIORITY"] == "6" and attached["CODE_FUNC"] == "_on_hello"
    assert attached["MESSAGE"].startswith("reader_attached reader=j pid=")
    cleared = journal.wait_for("active_cleared")
    assert cleared["SHMD_REASON"] == "SIGTERM" and cleared["SHMD_GENERATION"] == generation
    detached = journal.wait_for("reader_detached")
    assert detached["SHMD_READER"] == "j" and detached["SHMD_SEQ"] == cleared["SHMD_SEQ"]
    created = journal.wait_for("segment_created")
    assert created["SHMD_SEGMENT"] == bus.segment and created["SHMD_GENERATION"] == generation
    assert not bus.segment_exists()
