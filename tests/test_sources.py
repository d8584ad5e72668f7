"""Tests of shmd.daemons.sources: each source's records reach real readers through shm-writer."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from daemon_bus import (
    Bus,
    Daemon,
    assert_contiguous,
    read_frames,
    read_lines,
    running_bus,
    tick_numbers,
    wait_until,
)

from shmd._sys.reactor import Reactor
from shmd.config import FifoSourceConfig, SourceConfig
from shmd.daemons.sources import SOURCES, StreamSource

SLOT = 256
PAYLOAD_MAX = SLOT - 32  # the record header takes 32 bytes of each slot


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


def length_frames(payloads: Sequence[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(4, "little") + p for p in payloads)


def write_fifo(path: Path, data: bytes) -> None:
    """Be one FIFO producer: open, write, close (the writer holds the read end open)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def received(bus: Bus, instance: str, framing: str) -> list[bytes]:
    if framing == "length":
        return read_frames(bus.out(instance)) if bus.out(instance).exists() else []
    return [line.encode() for line in read_lines(bus.out(instance))]


def wait_received(bus: Bus, instance: str, framing: str, count: int) -> list[bytes]:
    wait_until(
        lambda: len(received(bus, instance, framing)) >= count,
        what=f"{count} records in {instance}'s file",
    )
    return received(bus, instance, framing)


def fifo_bus(bus: Bus, framing: str) -> tuple[Path, Daemon, Daemon]:
    """A writer with a FIFO source and one file reader with the matching framing."""
    fifo = bus.dir / "publish.fifo"
    # A FIFO read becomes one batch: the ring holds the biggest burst written here.
    bus.configure(
        segment={"capacity": 1024},
        writer={"source": {"type": "fifo", "path": str(fifo), "framing": framing}},
    )
    w = bus.writer()
    assert fifo.is_fifo()
    r = bus.file_reader("1", framing="length" if framing == "length" else "lines")
    return fifo, w, r


def stop(w: Daemon, *readers: Daemon) -> None:
    w.terminate()
    for r in readers:
        assert r.wait_exit() == 0, r.stderr()
    assert w.wait_exit() == 0, w.stderr()


# -- ticker ---------------------------------------------------------------------------------------


def test_ticker_publishes_numbered_timestamped_records_at_its_rate(bus: Bus) -> None:
    """The ticker publishes ``tick N <unix time>`` with N counting up, at writer.source.rate."""
    bus.configure(writer={"source": {"type": "ticker", "rate": 50.0, "topic": 9}})
    w = bus.writer()
    r = bus.file_reader("1", topics=[9])
    wait_until(lambda: len(read_lines(bus.out("1"))) >= 25, what="25 ticks")
    stop(w, r)
    lines = read_lines(bus.out("1"))
    assert_contiguous(tick_numbers(lines), "ticks")
    stamps = [float(line.split(" ")[2]) for line in lines]
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    assert all(g > 0 for g in gaps)
    assert 0.01 < gaps[len(gaps) // 2] < 0.04, gaps  # 50/s: 20 ms apart (give or take a load)


# -- FIFO -----------------------------------------------------------------------------------------


def test_fifo_newline_framing_delivers_every_line_in_order(bus: Bus) -> None:
    """Lines written into the FIFO by successive producers arrive as records, all and in order."""
    fifo, w, r = fifo_bus(bus, "newline")
    first = [f"first {i}".encode() for i in range(200)]
    second = [f"second {i} with spaces, ünïcode".encode() for i in range(50)]
    write_fifo(fifo, b"".join(p + b"\n" for p in first))
    write_fifo(fifo, b"".join(p + b"\n" for p in second) + b"\n")  # and one empty line
    expected = [*first, *second, b""]
    assert wait_received(bus, "1", "newline", len(expected)) == expected
    stop(w, r)
    assert received(bus, "1", "newline") == expected


def test_fifo_length_framing_delivers_binary_records_exactly(bus: Bus) -> None:
    """Length-prefixed frames (binary, empty, slot-sized) arrive byte for byte and in order."""
    fifo, w, r = fifo_bus(bus, "length")
    payloads = [bytes(range(256))[: i % (PAYLOAD_MAX + 1)] for i in range(300)]
    payloads += [b"", b"\n\n\0", b"x" * PAYLOAD_MAX]
    write_fifo(fifo, length_frames(payloads))
    assert wait_received(bus, "1", "length", len(payloads)) == payloads
    stop(w, r)
    assert read_frames(bus.out("1")) == payloads


@pytest.mark.parametrize("framing", ["newline", "length"])
def test_fifo_frame_larger_than_a_slot_is_refused_and_its_neighbours_arrive(
    bus: Bus, framing: str
) -> None:
    """A frame longer than a slot is dropped with frame_refused; the frames around it arrive."""
    fifo, w, r = fifo_bus(bus, framing)
    big = b"B" * (PAYLOAD_MAX + 1)
    huge = b"H" * 10_000  # spans several reads of the FIFO
    before, between, after = [b"before 1", b"before 2"], [b"between"], [b"after 1", b"after 2"]
    records = [*before, big, *between, huge, *after]
    data = length_frames(records) if framing == "length" else b"".join(p + b"\n" for p in records)
    write_fifo(fifo, data)
    expected = [*before, *between, *after]
    assert wait_received(bus, "1", framing, len(expected)) == expected
    refusals = [w.wait_for("frame_refused", source="fifo")]
    refusals += [w.wait_for("frame_refused", since=w.events.index(refusals[0]) + 1)]
    assert f"{PAYLOAD_MAX}" in refusals[0]["error"] and "dropped" in refusals[0]["error"]
    stop(w, r)
    assert received(bus, "1", framing) == expected


PRODUCER = textwrap.dedent("""
    import os, signal, sys
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, bytes.fromhex(sys.argv[2]))
    os.kill(os.getpid(), signal.SIGKILL)  # dies with the last frame half written
""")


class RecordingHost:
    """A SourceHost on a real reactor that keeps what the source publishes."""

    def __init__(self) -> None:
        self.reactor = Reactor()
        self.max_payload = 1024
        self.batches: list[list[bytes]] = []

    def publish_batch(self, payloads: Sequence[bytes | memoryview], topic: int) -> None:
        self.batches.append([bytes(p) for p in payloads])

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.reactor.call_later(delay, fn)

    def source_finished(self, reason: str) -> None:
        raise AssertionError(f"a FIFO source never finishes ({reason})")


def test_fifo_producer_arriving_while_the_source_reopens_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer that opens, writes and leaves just after the source saw EOF still delivers."""
    fifo = tmp_path / "in.fifo"
    host = RecordingHost()
    source = StreamSource(FifoSourceConfig(path=str(fifo)))
    source.start(host)
    try:
        assert source._deframer is not None
        reset = source._deframer.reset

        def second_producer_comes_and_goes() -> int:
            # The race, made to happen every time: the first producer's EOF
            # has been read and the source is about to swap read ends; the
            # old one is still open, so this producer's open succeeds.
            monkeypatch.setattr(source._deframer, "reset", reset)
            write_fifo(fifo, b"second\n")
            return reset()

        monkeypatch.setattr(source._deframer, "reset", second_producer_comes_and_goes)
        write_fifo(fifo, b"first\n")
        assert host.reactor.run_until(lambda: len(host.batches) == 2, timeout=10), host.batches
        assert host.batches == [[b"first"], [b"second"]]
    finally:
        source.close()
        host.reactor.close()


@pytest.mark.parametrize("framing", ["newline", "length"])
def test_fifo_producer_dying_mid_frame_loses_only_that_frame(bus: Bus, framing: str) -> None:
    """A producer killed mid-frame gives frame_truncated; the next one's frames arrive intact."""
    fifo, w, r = fifo_bus(bus, framing)
    whole = [b"whole 1", b"whole 2"]
    if framing == "length":
        data = length_frames(whole) + (100).to_bytes(4, "little") + b"only 12 byte"
    else:
        data = b"".join(p + b"\n" for p in whole) + b"no newline yet"
    producer = subprocess.run(
        [sys.executable, "-c", PRODUCER, str(fifo), data.hex()], check=False, timeout=10
    )
    assert producer.returncode == -signal.SIGKILL
    truncated = w.wait_for("frame_truncated", source="fifo")
    assert truncated["bytes"] == (16 if framing == "length" else 14)
    nxt = [b"next 1", b"next 2"]
    write_fifo(fifo, length_frames(nxt) if framing == "length" else b"next 1\nnext 2\n")
    assert wait_received(bus, "1", framing, 4) == [*whole, *nxt]
    stop(w, r)
    assert received(bus, "1", framing) == [*whole, *nxt]


def test_fifo_path_that_is_not_a_fifo_stops_the_writer_with_a_clear_error(bus: Bus) -> None:
    """A regular file at the FIFO path makes the writer exit 1 with one start_failed line."""
    path = bus.dir / "not-a-fifo"
    path.write_text("data")
    bus.configure(writer={"source": {"type": "fifo", "path": str(path)}})
    w = bus.writer(wait_ready=False)
    assert w.wait_exit() == 1
    failed = w.wait_for("start_failed")
    assert failed["error"] == (
        f"Failed to use {path} as the FIFO source since it exists and is not a FIFO"
    )
    assert "Traceback" not in w.stderr()
    assert not bus.segment_exists() and not os.path.lexists(bus.socket)


# -- stdin ----------------------------------------------------------------------------------------


def test_stdin_source_publishes_until_eof_then_shuts_down_cleanly(bus: Bus) -> None:
    """Lines on stdin become records; EOF (mid-frame) ends the source and the writer exits 0."""
    bus.configure(
        segment={"capacity": 1024}, writer={"source": {"type": "stdin", "framing": "newline"}}
    )
    # Our own pipe, whose read end (and open file description) we keep: the
    # writer must give it back blocking, as it found it.
    rfd, wfd = os.pipe()
    try:
        w = bus.writer(stdin=rfd)
        r = bus.file_reader("1")
        lines = [f"stdin {i}".encode() for i in range(500)]
        with os.fdopen(wfd, "wb") as pipe:
            wfd = -1
            pipe.write(b"".join(p + b"\n" for p in lines) + b"half a line")
        assert w.wait_exit() == 0, w.stderr()
        assert os.get_blocking(rfd), "the writer left stdin's file description non-blocking"
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    assert r.wait_exit() == 0, r.stderr()
    assert w.wait_for("frame_truncated", source="stdin")["bytes"] == len(b"half a line")
    assert w.wait_for("source_finished")["reason"] == "end of standard input"
    assert w.wait_for("active_cleared")["seq"] == len(lines)
    assert received(bus, "1", "newline") == lines
    assert not bus.segment_exists()


# -- python ---------------------------------------------------------------------------------------


PY_SOURCE = textwrap.dedent("""
    import os


    def _go():
        # Blocks until the test writes the record count into the FIFO.
        with open(os.environ["SHMD_TEST_GO"]) as f:
            return int(f.readline())


    def generator():
        for i in range(_go()):
            yield f"py {i}".encode()
        yield (3, b"topic three")


    def with_context(ctx):
        n = _go()
        ctx.publish_batch([f"batch {i}".encode() for i in range(n)])
        ctx.publish(b"single", topic=2)
        ctx.stopping.wait()


    def busy(ctx):
        # Publishes as fast as the ring lets it until the writer stops.
        _go()
        i = 0
        while not ctx.stopping.is_set():
            ctx.publish_batch([f"busy {j}".encode() for j in range(i, i + 10)])
            i += 10


    def named():
        for i in range(_go()):
            yield f"zero {i}".encode()
            yield ("ticks", f"tick {i}".encode())


    def named_context(ctx):
        for i in range(_go()):
            ctx.publish(f"tick {i}".encode(), "ticks")
            ctx.publish_batch([b"zero"], 0)
        ctx.publish(b"lost", "nope")


    def failing():
        n = _go()
        for i in range(n):
            yield f"ok {i}".encode()
        raise ValueError("boom")
""")


def python_bus(
    bus: Bus, spec: str, reader_topics: object = "all", **segment: object
) -> tuple[Path, Daemon, Daemon]:
    """A writer with a python: source from a module in the bus's directory, and a file reader."""
    (bus.dir / "shmd_test_source.py").write_text(PY_SOURCE)
    bus.add_python_path(bus.dir)
    go = bus.dir / "go.fifo"
    os.mkfifo(go)
    bus.env["SHMD_TEST_GO"] = str(go)
    bus.configure(
        segment={"capacity": 1024, **segment},
        writer={"source": {"type": "python", "callable": spec}},
    )
    w = bus.writer()
    r = bus.file_reader("1", topics=reader_topics)
    return go, w, r


def test_python_generator_source_publishes_everything_then_finishes(bus: Bus) -> None:
    """A generator's items become records (bytes or (topic, bytes)); its end shuts down cleanly."""
    go, w, r = python_bus(bus, "shmd_test_source:generator")
    go.write_text("700\n")
    assert w.wait_exit() == 0, w.stderr()
    assert r.wait_exit() == 0, r.stderr()
    assert w.wait_for("source_finished")["reason"] == "shmd_test_source:generator returned"
    expected = [f"py {i}" for i in range(700)] + ["topic three"]
    assert read_lines(bus.out("1")) == expected
    assert r.wait_for("drained")["seq"] == 701


def test_python_callable_with_context_publishes_until_stopped(bus: Bus) -> None:
    """A callable taking a context publishes through it and returns when SIGTERM sets stopping."""
    go, w, r = python_bus(bus, "shmd_test_source:with_context")
    go.write_text("300\n")
    expected = [f"batch {i}" for i in range(300)] + ["single"]
    wait_until(lambda: read_lines(bus.out("1")) == expected, what="301 records")
    stop(w, r)
    assert read_lines(bus.out("1")) == expected
    assert not w.find("source_failed")


def test_busy_python_source_at_shutdown_loses_nothing(bus: Bus) -> None:
    """SIGTERM while a source thread publishes at full speed: readers get all that was committed."""
    # Policy block, so that no record is overwritten; the check is that no record is committed
    # after the active flag cleared.
    go, w, r = python_bus(bus, "shmd_test_source:busy", policy="block", block_timeout=5.0)
    other = bus.file_reader("2")
    go.write_text("0\n")
    wait_until(lambda: len(read_lines(bus.out("2"))) >= 2000, what="2000 busy records")
    w.terminate()
    cleared = w.wait_for("active_cleared")
    for reader, name in ((r, "1"), (other, "2")):
        assert reader.wait_exit() == 0, reader.stderr()
        assert reader.wait_for("drained")["seq"] == cleared["seq"]
        numbers = [int(line.split(" ")[1]) for line in read_lines(bus.out(name))]
        assert_contiguous(numbers, f"records of reader {name}")
        assert numbers[-1] == cleared["seq"] - 1  # record "busy N" has seq N
    assert w.wait_exit() == 0


def test_python_source_that_raises_is_logged_and_the_writer_exits_1(bus: Bus) -> None:
    """A python source that raises logs source_failed; readers get what it published; exit 1."""
    go, w, r = python_bus(bus, "shmd_test_source:failing")
    go.write_text("50\n")
    assert w.wait_exit() == 1, w.stderr()
    assert r.wait_exit() == 0, r.stderr()
    failed = w.wait_for("source_failed")
    assert failed["error"] == "shmd_test_source:failing raised ValueError: boom"
    assert "Traceback" not in w.stderr()
    assert read_lines(bus.out("1")) == [f"ok {i}" for i in range(50)]
    assert not bus.segment_exists()


def test_python_source_publishes_by_topic_name(bus: Bus) -> None:
    """A generator's (name, bytes) items go to the named topic; a reader of that name gets them."""
    go, w, r = python_bus(
        bus, "shmd_test_source:named", reader_topics=["ticks"], topics={"ticks": 4}
    )
    go.write_text("40\n")
    assert w.wait_exit() == 0, w.stderr()
    assert r.wait_exit() == 0, r.stderr()
    assert read_lines(bus.out("1")) == [f"tick {i}" for i in range(40)]


def test_python_source_publishing_to_an_unknown_name_fails_saying_so(bus: Bus) -> None:
    """ctx.publish() by a name segment.topics lacks raises UnknownTopic: source_failed names it."""
    go, w, r = python_bus(
        bus, "shmd_test_source:named_context", reader_topics=["ticks"], topics={"ticks": 4}
    )
    go.write_text("30\n")
    assert w.wait_exit() == 1, w.stderr()
    assert r.wait_exit() == 0, r.stderr()
    failed = w.wait_for("source_failed")
    assert failed["error"] == (
        "shmd_test_source:named_context raised UnknownTopic: "
        "unknown topic 'nope' (this bus has: ticks)"
    )
    assert read_lines(bus.out("1")) == [f"tick {i}" for i in range(30)]


def test_python_source_that_cannot_be_imported_stops_the_writer(bus: Bus) -> None:
    """An unimportable python: callable makes the writer exit 1 with one clear start_failed line."""
    bus.configure(writer={"source": {"type": "python", "callable": "shmd_no_such_mod:fn"}})
    w = bus.writer(wait_ready=False)
    assert w.wait_exit() == 1
    failed = w.wait_for("start_failed")
    assert failed["error"].startswith(
        "Failed to load 'shmd_no_such_mod:fn' since ModuleNotFoundError:"
    )
    assert "Traceback" not in w.stderr()
    assert not bus.segment_exists() and not os.path.lexists(bus.socket)


def test_every_source_type_has_a_runtime_class() -> None:
    """SOURCES maps each SourceConfig dataclass (and nothing else) to what builds it."""
    assert set(SOURCES) == set(typing.get_args(SourceConfig))
