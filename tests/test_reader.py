"""Tests of shmd.daemons.reader: shm-reader as a real process against a real shm-writer."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_bus import (
    Bus,
    assert_contiguous,
    publish,
    read_lines,
    running_bus,
    tick_numbers,
    wait_until,
)

from shmd.bus.segment import Segment
from shmd.bus.wait import code_label
from shmd.config import load_config
from shmd.control import protocol
from shmd.control.frames import FRAME_HEADER, FRAME_MAGIC
from shmd.control.listener import connect
from shmd.daemons import logs
from shmd.daemons.reader import ReaderDaemon

SEQPACKET = socket.SOCK_SEQPACKET


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


def ticks(bus: Bus, instance: str) -> list[int]:
    return tick_numbers(read_lines(bus.out(instance)))


def ticks_reach(bus: Bus, instance: str, n: int) -> bool:
    numbers = ticks(bus, instance)
    return bool(numbers) and numbers[-1] >= n


def write_seq(bus: Bus) -> int:
    seg = Segment.open(name=bus.segment, control_writable=False)
    try:
        return seg.write_seq
    finally:
        seg.close()


def frame(body: bytes) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, 0, len(body), 0, 0) + body


# -- attaching ------------------------------------------------------------------------------------


def test_reader_attaches_and_both_sides_log_it(bus: Bus) -> None:
    """The reader logs attached and the writer reader_attached, with matching fields."""
    w = bus.writer()
    r = bus.file_reader("1")
    attached = r.wait_for("attached")
    on_writer = w.wait_for("reader_attached", reader="1")
    generation = w.find("listener_ready")[0]["generation"]
    assert attached["generation"] == on_writer["generation"] == generation
    assert attached["index"] == on_writer["index"] and attached["seq"] == on_writer["seq"]
    assert attached["writer_pid"] == w.pid and on_writer["pid"] == r.pid
    assert attached["capacity"] == 256 and attached["slot_size"] == 256
    assert attached["policy"] == "drop-oldest" and attached["instance"] == "1"
    assert attached["role"] == "reader" and on_writer["start"] == "latest"
    assert attached["wait"] == on_writer["wait"] == "sleep"
    wait_until(lambda: ticks_reach(bus, "1", attached["seq"] + 3), what="ticks")
    # start latest: the first record is the first published after attaching.
    assert ticks(bus, "1")[0] == attached["seq"] + 1
    w.terminate()
    assert r.wait_exit() == 0 and w.wait_exit() == 0


@pytest.mark.parametrize(("wait", "label"), [("spin", "spin"), ("backoff", "backoff(200us,2ms)")])
def test_a_reader_that_spins_or_backs_off_gets_every_tick_and_says_how_it_waits(
    bus: Bus, wait: str, label: str
) -> None:
    """reader.wait picks the strategy: both sides log it, shmctl status shows it, and the
    reader receives the ticks as a sleeping one does."""
    w = bus.writer()
    r = bus.file_reader("1", wait=wait, backoff_spin=0.0002, backoff_yield=0.002)
    attached = r.wait_for("attached")
    on_writer = w.wait_for("reader_attached", reader="1")
    assert attached["wait"] == label and on_writer["wait"] == wait
    with Segment.open(name=bus.segment) as seg:
        assert code_label(seg.entry(attached["index"]).wait) == wait
    wait_until(lambda: ticks_reach(bus, "1", attached["seq"] + 3), what="ticks")
    assert ticks(bus, "1")[:3] == [attached["seq"] + 1, attached["seq"] + 2, attached["seq"] + 3]
    w.terminate()
    assert r.wait_exit() == 0 and w.wait_exit() == 0


def test_reader_started_before_the_writer_waits_for_it(bus: Bus) -> None:
    """A reader started while no writer listens retries until the writer's socket appears."""
    bus.configure()
    # However long the writer takes to start on a loaded machine.
    r = bus.file_reader("early", wait_attached=False, reconnect_timeout=60.0)
    w = bus.writer()
    r.wait_for("attached")
    w.wait_for("reader_attached", reader="early")
    assert not r.find("writer_lost")
    w.terminate()
    assert r.wait_exit() == 0 and w.wait_exit() == 0


def test_reader_without_a_writer_gives_up_after_reconnect_timeout(bus: Bus) -> None:
    """With no writer within reader.reconnect_timeout the reader exits 1 saying why."""
    r = bus.file_reader("alone", wait_attached=False, reconnect_timeout=0.3)
    assert r.wait_exit() == 1
    lost = r.wait_for("writer_lost")
    assert lost["error"].startswith("Failed to connect to") and bus.socket in lost["error"]
    assert "does not exist" in lost["error"]
    assert r.wait_for("exiting")["status"] == 1
    assert "Traceback" not in r.stderr()


def test_start_oldest_gets_what_the_ring_still_holds(bus: Bus) -> None:
    """A reader with start: oldest first gets the records published before it attached."""
    bus.configure(writer={"source": {"rate": 0.0}})
    w = bus.writer()
    conn = connect(bus.socket, SEQPACKET, timeout=5)
    try:
        for i in range(30):
            publish(conn, 0, f"early {i}".encode())
        r = bus.file_reader("old", start="oldest")
        assert w.wait_for("reader_attached", reader="old")["start"] == "oldest"
        assert r.wait_for("attached")["seq"] == 0  # all 30 are still in the ring
        for i in range(10):
            publish(conn, 0, f"late {i}".encode())
    finally:
        conn.close()
    w.terminate()
    assert r.wait_exit() == 0 and w.wait_exit() == 0
    expected = [f"early {i}" for i in range(30)] + [f"late {i}" for i in range(10)]
    assert read_lines(bus.out("old")) == expected


def test_reader_gets_only_its_topics(bus: Bus) -> None:
    """A reader subscribed to topics [3] gets only topic-3 records; one with all topics gets all."""
    bus.configure(writer={"source": {"rate": 0.0}})
    w = bus.writer()
    some = bus.file_reader("some", topics=[3])
    every = bus.file_reader("every")
    assert w.wait_for("reader_attached", reader="some")["topics"] == f"{1 << 3:#x}"
    conn = connect(bus.socket, SEQPACKET, timeout=5)
    try:
        for i in range(30):
            publish(conn, 3 if i % 3 == 0 else 5, f"record {i}".encode())
    finally:
        conn.close()
    w.terminate()
    assert some.wait_exit() == 0 and every.wait_exit() == 0 and w.wait_exit() == 0
    assert read_lines(bus.out("some")) == [f"record {i}" for i in range(0, 30, 3)]
    assert read_lines(bus.out("every")) == [f"record {i}" for i in range(30)]


# -- leaving --------------------------------------------------------------------------------------


def test_reader_sigterm_drains_detaches_and_exits_0(bus: Bus) -> None:
    """SIGTERM makes a reader drain, detach (reader_detached on the writer) and exit 0."""
    # SIGHUP before it is logged as ignored and changes nothing; the writer and the other
    # reader carry on.
    w = bus.writer()
    r = bus.file_reader("1")
    other = bus.file_reader("2")
    mark = r.mark()
    r.send(signal.SIGHUP)
    r.wait_for("reload_ignored", since=mark)
    wait_until(lambda: ticks_reach(bus, "1", r.find("attached")[0]["seq"] + 5), what="ticks")
    r.terminate()
    assert r.wait_exit() == 0
    drained = r.wait_for("drained")
    assert drained["reason"] == "SIGTERM" and drained["lost"] == 0
    exiting = r.wait_for("exiting")
    assert exiting["status"] == 0 and exiting["reason"] == "SIGTERM"
    detached = w.wait_for("reader_detached", reader="1")
    assert detached["reason"] == "SIGTERM" and detached["seq"] == drained["seq"]
    assert detached["delivered"] == drained["delivered"]
    assert_contiguous(ticks(bus, "1"), "ticks")
    assert ticks(bus, "1")[-1] == drained["seq"]  # tick N has seq N-1: all up to the cursor
    assert other.proc.poll() is None and w.proc.poll() is None
    w.terminate()
    assert other.wait_exit() == 0 and w.wait_exit() == 0


def test_readers_exit_1_when_the_writer_is_killed(bus: Bus) -> None:
    """A SIGKILLed writer leaves its readers to log writer_lost and exit 1, having read it all."""
    w = bus.writer()
    readers = {name: bus.file_reader(name) for name in ("1", "2")}
    generation = w.find("listener_ready")[0]["generation"]
    wait_until(lambda: all(ticks_reach(bus, n, 10) for n in readers), what="ticks")
    w.kill()
    assert w.wait_exit() == -signal.SIGKILL
    for name, r in readers.items():
        assert r.wait_exit() == 1, r.stderr()
        lost = r.wait_for("writer_lost")
        assert lost["generation"] == generation and lost["writer_pid"] == w.pid
        assert r.wait_for("exiting")["status"] == 1
        assert not r.find("drained")
        numbers = ticks(bus, name)
        assert_contiguous(numbers, f"ticks of {name}")
        # Everything committed before the kill was still delivered: the final
        # drain after writer_lost (logged at the hang-up, with the cursor of
        # that moment) may deliver records that were committed but unread.
        exiting = r.wait_for("exiting")
        assert lost["seq"] <= exiting["seq"] == numbers[-1]
    # The dead writer could not unlink its segment (the fixture does).
    assert bus.segment_exists()


def test_evicted_reader_exits_1_and_the_others_lose_nothing(bus: Bus) -> None:
    """Under policy block a stopped reader is evicted (reader_lost) and exits 1 once resumed."""
    # 16 slots at 50/s and 0.5 s of patience: a reader must be stuck for 0.8 s
    # to be evicted, far longer than a busy machine delays the one that is not.
    bus.configure(
        segment={"capacity": 16, "policy": "block", "block_timeout": 0.5},
        writer={"source": {"rate": 50.0}},
    )
    w = bus.writer()
    stuck = bus.file_reader("stuck")
    fine = bus.file_reader("fine")
    stuck.send(signal.SIGSTOP)
    try:
        lost = w.wait_for("reader_lost", reader="stuck")
        assert lost["pid"] == stuck.pid
    finally:
        stuck.send(signal.SIGCONT)
    assert stuck.wait_exit() == 1
    exiting = stuck.wait_for("exiting")
    assert exiting["status"] == 1 and "evicted" in (
        exiting.get("reason", "") + exiting.get("error", "")
    ), exiting
    target = ticks(bus, "fine")[-1] + 20
    wait_until(lambda: ticks_reach(bus, "fine", target), what="ticks after the eviction")
    w.terminate()
    assert fine.wait_exit() == 0 and w.wait_exit() == 0
    numbers = ticks(bus, "fine")
    assert_contiguous(numbers, "ticks of the reader that kept up")
    assert fine.wait_for("drained")["lost"] == 0


# -- refusals -------------------------------------------------------------------------------------


def test_duplicate_instance_reader_is_refused_and_exits_1(bus: Bus) -> None:
    """A second shm-reader with an attached reader's instance name is refused and exits 1."""
    w = bus.writer()
    first = bus.file_reader("1")
    second = bus.reader("1", wait_attached=False, sink={"type": "journal", "summary_rate": 0})
    assert second.wait_exit() == 1
    refused = second.wait_for("refused")
    assert refused["code"] == "duplicate_instance" and "'1'" in refused["error"]
    assert second.wait_for("exiting")["status"] == 1
    assert w.wait_for("reader_refused", reader="1")["pid"] == second.pid
    start = ticks(bus, "1")[-1] if ticks(bus, "1") else 0
    wait_until(lambda: ticks_reach(bus, "1", start + 10), what="ticks for the first reader")
    w.terminate()
    assert first.wait_exit() == 0 and w.wait_exit() == 0
    assert_contiguous(ticks(bus, "1"), "ticks")


def test_refusal_with_the_hello_unread_still_reaches_the_reader(bus: Bus) -> None:
    """A Refuse(NOT_ALLOWED) sent before the writer read our Hello makes the reader exit 77."""
    # The listener here is the test's own: it refuses and closes with the Hello still unread,
    # which Linux reports to the reader as ECONNRESET ahead of the queued Refuse.
    listener = socket.socket(socket.AF_UNIX, SEQPACKET)
    listener.bind(bus.socket)
    listener.listen(1)
    listener.settimeout(10)
    try:
        r = bus.file_reader("x", wait_attached=False)
        conn, _ = listener.accept()
        with conn:
            ready, _, _ = select.select([conn], [], [], 10)
            assert ready, "no Hello within 10 s"
            refuse = protocol.Refuse(protocol.RefuseCode.NOT_ALLOWED, "uid 0 is not allowed")
            conn.send(frame(refuse.encode()))
        assert r.wait_exit() == 77, r.stderr()
    finally:
        listener.close()
    refused = r.wait_for("refused")
    assert refused["code"] == "not_allowed" and "uid 0 is not allowed" in refused["error"]
    assert r.wait_for("exiting")["status"] == 77


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


def test_reader_events_map_to_journal_fields(bus: Bus) -> None:
    """With target journal the reader's events carry SHMD_EVENT/ROLE/INSTANCE/GENERATION/SEQ."""
    # The reader runs its real loop in this process (signals need the main thread) against a
    # real shm-writer, which a helper thread stops.
    w = bus.writer()
    cfg = load_config(bus.reader_config("j"))
    journal = JournalCapture()
    assert (
        logs.configure_logging(
            "reader", level="info", target="journal", instance="j", sender=journal
        )
        == "journal"
    )
    daemon = ReaderDaemon(cfg, cfg.reader_settings("j"), "j", logs.get_logger())
    failures: list[BaseException] = []

    def stop_writer() -> None:
        try:
            journal.wait_for("attached")
        except BaseException as exc:
            failures.append(exc)
        finally:
            w.terminate()  # always: run() below returns once the writer is gone

    helper = threading.Thread(target=stop_writer, name="stop-writer")
    try:
        helper.start()
        status = daemon.run()
    finally:
        helper.join(30)
        daemon.close()
        logs.reset_logging()
    assert not failures, failures
    assert status == 0 and w.wait_exit() == 0
    generation = str(w.find("listener_ready")[0]["generation"])
    attached = journal.wait_for("attached")
    assert attached["SHMD_ROLE"] == "reader" and attached["SYSLOG_IDENTIFIER"] == "shm-reader"
    assert attached["SHMD_INSTANCE"] == "j" and attached["SHMD_GENERATION"] == generation
    assert attached["SHMD_SEQ"].isdigit() and attached["PRIORITY"] == "6"
    assert attached["SHMD_WRITER_PID"] == str(w.pid)
    inactive = journal.wait_for("writer_inactive")
    drained = journal.wait_for("drained")
    assert inactive["SHMD_GENERATION"] == generation and inactive["SHMD_INSTANCE"] == "j"
    cleared = w.wait_for("active_cleared")
    assert drained["SHMD_SEQ"] == inactive["SHMD_SEQ"] == str(cleared["seq"])
    assert w.wait_for("reader_detached", reader="j")["reason"] == "drained"


def test_a_killed_durable_reader_loses_nothing_and_counts_what_comes_twice(bus: Bus) -> None:
    """A durable shm-reader SIGKILLed mid-stream: its successor resumes; repeats are counted."""
    helpers = Path(__file__).parent / "helpers"
    fifo, out, die = bus.dir / "go.fifo", bus.dir / "sink.out", bus.dir / "die"
    os.mkfifo(fifo)
    die.write_text("150")
    bus.add_python_path(helpers)
    bus.env.update(
        SHMD_TEST_FIFO=str(fifo), SHMD_TEST_SINK_OUT=str(out), SHMD_TEST_DIE_FILE=str(die)
    )
    bus.configure(
        segment={"capacity": 64, "policy": "block", "block_timeout": 20.0},
        writer={"source": {"type": "python", "callable": "fifo_source:run"}},
    )
    w = bus.writer()
    sink = {"type": "python", "callable": "dying_sink:write"}
    first = bus.reader("1", sink=sink, durable_grace=30.0)
    count = 600
    with open(fifo, "w") as f:
        f.write(f"{count}\n")
    assert first.wait_exit() == -signal.SIGKILL
    dormant = w.wait_for("reader_dormant", reader="1")
    second = bus.reader("1", sink=sink, durable_grace=30.0)
    attached = w.wait_for("reader_attached", reader="1", pid=second.pid)
    assert int(attached["seq"]) == dormant["seq"]
    assert w.wait_exit() == 0
    assert second.wait_exit() == 0
    drained = second.wait_for("drained")
    lines = read_lines(out)
    wanted = [f"{i} {i % 3} {f'rec {i} topic {i % 3}'.encode().hex()}" for i in range(count)]
    twice = len(lines) - len(set(lines))
    assert sorted(set(lines), key=lambda s: int(s.split()[0])) == wanted
    assert twice > 0  # the killed one's last batch was written but not released
    assert drained["redelivered"] == twice == int(attached["redelivered"])
    assert drained["lost"] == 0
