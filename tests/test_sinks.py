"""Tests of shmd.daemons.sinks: each sink of a real shm-reader gets every record, in order."""

from __future__ import annotations

import itertools
import os
import subprocess
import textwrap
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
from structlog.testing import capture_logs

from shmd.bus.segment import Segment
from shmd.config import JournalSinkConfig, SinkConfig
from shmd.control.fields import TopicMap
from shmd.daemons.sinks import SINKS, JournalSink

PAYLOAD_MAX = 256 - 32


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


def fifo_writer(bus: Bus) -> tuple[Path, Daemon]:
    """A writer whose records come from a FIFO with length framing (exact bytes)."""
    fifo = bus.dir / "publish.fifo"
    # A FIFO read becomes one batch: the ring holds the biggest burst written here.
    bus.configure(
        segment={"capacity": 1024},
        writer={"source": {"type": "fifo", "path": str(fifo), "framing": "length"}},
    )
    return fifo, bus.writer()


def publish(fifo: Path, payloads: Sequence[bytes]) -> None:
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, b"".join(len(p).to_bytes(4, "little") + p for p in payloads))
    finally:
        os.close(fd)


def published(bus: Bus) -> int:
    """Records the writer has published so far (the segment's write_seq)."""
    seg = Segment.open(name=bus.segment, control_writable=False)
    try:
        return seg.write_seq
    finally:
        seg.close()


PAYLOADS = [f"record {i}".encode() for i in range(300)] + [b"", b"a\nb", bytes(range(200))]


def shutdown(w: Daemon, *readers: Daemon, status: int = 0) -> None:
    w.terminate()
    for r in readers:
        assert r.wait_exit() == status, r.stderr()
    assert w.wait_exit() == 0, w.stderr()


# -- journal (the `records` summary events) -------------------------------------------------------


def test_journal_sink_summarises_every_record(bus: Bus) -> None:
    """The journal sink's `records` events count every record once, seq ranges back to back."""
    fifo, w = fifo_writer(bus)
    r = bus.reader("j", sink={"type": "journal", "summary_rate": 1000.0})
    publish(fifo, PAYLOADS)
    wait_until(lambda: published(bus) == len(PAYLOADS), what="every record published")
    shutdown(w, r)
    check_summaries(r.find("records"), len(PAYLOADS))


def test_journal_sink_summarises_the_rest_when_it_stops(bus: Bus) -> None:
    """Records since the last `records` event get a final one when the reader stops."""
    fifo, w = fifo_writer(bus)
    # One summary per 1000 s: the first batch's, then only the final one.
    r = bus.reader("j", sink={"type": "journal", "summary_rate": 0.001})
    publish(fifo, PAYLOADS[:100])
    r.wait_for("records")
    publish(fifo, PAYLOADS[100:])
    wait_until(lambda: published(bus) == len(PAYLOADS), what="every record published")
    shutdown(w, r)
    summaries = r.find("records")
    assert len(summaries) == 2, summaries
    check_summaries(summaries, len(PAYLOADS))


def check_summaries(summaries: list[dict[str, Any]], total: int) -> None:
    assert sum(e["count"] for e in summaries) == total, summaries
    assert summaries[0]["first_seq"] == 0 and summaries[-1]["seq"] == total - 1
    for prev, nxt in itertools.pairwise(summaries):
        assert nxt["first_seq"] == prev["seq"] + 1
    for e in summaries:
        assert e["seq"] - e["first_seq"] + 1 == e["count"]
    # The preview: text when printable, hex otherwise (the last record is binary).
    assert summaries[-1]["payload"] == bytes(range(64)).hex() + "…"
    assert all(e["role"] == "reader" and e["instance"] == "j" for e in summaries)


def test_journal_sink_with_summary_rate_0_logs_no_records_events(bus: Bus) -> None:
    """summary_rate 0 means no `records` events at all; the reader still reads everything."""
    fifo, w = fifo_writer(bus)
    r = bus.reader("quiet", sink={"type": "journal", "summary_rate": 0.0})
    publish(fifo, PAYLOADS)
    wait_until(lambda: published(bus) == len(PAYLOADS), what="every record published")
    shutdown(w, r)
    assert not r.find("records")
    assert r.wait_for("drained")["delivered"] == len(PAYLOADS)


# -- file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["lines", "length"])
def test_file_sink_appends_every_record_in_order(bus: Bus, framing: str) -> None:
    """The file sink appends each record (a line, or a u32-length frame) after what was there."""
    fifo, w = fifo_writer(bus)
    out = bus.out("f")
    old = b"kept from before\n" if framing == "lines" else b"\x03\x00\x00\x00old"
    out.write_bytes(old)
    r = bus.file_reader("f", framing=framing)
    payloads = [p for p in PAYLOADS if b"\n" not in p] if framing == "lines" else PAYLOADS
    publish(fifo, payloads)
    if framing == "lines":

        def got() -> list[bytes]:
            return [
                line.encode("latin-1")
                for line in out.read_bytes()[len(old) :].decode("latin-1").split("\n")[:-1]
            ]
    else:

        def got() -> list[bytes]:
            return read_frames(out)[1:]

    wait_until(lambda: len(got()) >= len(payloads), what="every record in the file")
    shutdown(w, r)
    assert out.read_bytes().startswith(old)
    assert got() == payloads


def test_file_sink_that_cannot_open_its_file_exits_1_before_attaching(bus: Bus) -> None:
    """A file sink in a missing directory makes the reader exit 1 with a clear line, unattached."""
    w = bus.writer()
    path = bus.dir / "missing" / "out"
    r = bus.reader("bad", wait_attached=False, sink={"type": "file", "path": str(path)})
    assert r.wait_exit() == 1
    assert not r.find("attached") and not w.find("reader_attached")
    assert f"Failed to open {path} for the file sink since No such file or directory" in r.stderr()
    assert "Traceback" not in r.stderr()


# -- stdout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["lines", "length"])
def test_stdout_sink_writes_every_record(bus: Bus, framing: str) -> None:
    """The stdout sink writes each record to the reader's standard output."""
    fifo, w = fifo_writer(bus)
    r = bus.reader(
        "o", sink={"type": "stdout", "framing": framing}, popen={"stdout": subprocess.PIPE}
    )
    payloads = [p for p in PAYLOADS if b"\n" not in p] if framing == "lines" else PAYLOADS
    publish(fifo, payloads)
    w.terminate()
    assert r.proc.stdout is not None
    data = r.proc.stdout.read()  # until the reader exits and closes it
    assert r.wait_exit() == 0 and w.wait_exit() == 0
    if framing == "lines":
        assert data == b"".join(p + b"\n" for p in payloads)
    else:
        out = bus.dir / "stdout.bin"
        out.write_bytes(data)
        assert read_frames(out) == payloads


# -- exec -----------------------------------------------------------------------------------------


def test_exec_sink_pipes_every_record_to_the_child(bus: Bus) -> None:
    """The exec sink feeds each record as a line to the command's stdin, and waits for it."""
    fifo, w = fifo_writer(bus)
    out = bus.dir / "exec.out"
    r = bus.reader("e", sink={"type": "exec", "command": ["sh", "-c", f"cat > '{out}'"]})
    payloads = [p for p in PAYLOADS if b"\n" not in p]
    publish(fifo, payloads)
    wait_until(
        lambda: out.exists() and out.read_bytes().count(b"\n") >= len(payloads),
        what="every record through cat",
    )
    shutdown(w, r)
    assert out.read_bytes() == b"".join(p + b"\n" for p in payloads)
    assert not r.find("sink_child_failed")


def test_exec_sink_whose_child_fails_makes_the_reader_exit_1(bus: Bus) -> None:
    """When the exec child exits, the reader logs sink_failed, detaches and exits 1."""
    w = bus.writer()
    r = bus.reader("e", sink={"type": "exec", "command": ["sh", "-c", "exit 3"]})
    assert r.wait_exit() == 1, r.stderr()
    failed = r.wait_for("sink_failed")
    assert failed["error"] == "Failed to pipe records to 'sh' since it exited with status 3"
    exiting = r.wait_for("exiting")
    assert exiting["status"] == 1 and exiting["reason"] == "sink_failed"
    assert "Traceback" not in r.stderr()
    w.wait_for("reader_detached", reader="e", reason="sink failed")
    w.terminate()
    assert w.wait_exit() == 0


def test_exec_sink_with_a_missing_program_exits_1_before_attaching(bus: Bus) -> None:
    """An exec command that cannot start makes the reader exit 1 saying which and why."""
    bus.configure()
    missing = str(bus.dir / "no-such-program")
    r = bus.reader("e", wait_attached=False, sink={"type": "exec", "command": [missing]})
    assert r.wait_exit() == 1
    assert (
        f"Failed to start the exec sink '{missing}' since No such file or directory" in r.stderr()
    )
    assert "Traceback" not in r.stderr() and not r.find("attached")


# -- python ---------------------------------------------------------------------------------------


PY_SINK = textwrap.dedent("""
    import os


    class Sink:
        def __init__(self):
            self.out = open(os.environ["SHMD_TEST_SINK_OUT"], "a")

        def __call__(self, records):
            for seq, _ts, topic, payload in records:
                self.out.write(f"{seq} {topic} {bytes(payload).decode()}\\n")
            self.out.flush()

        def close(self):
            self.out.write("closed\\n")
            self.out.close()


    SINK = Sink()


    def failing(records):
        raise ValueError("nope")


    class BadClose:
        def __call__(self, records):
            pass

        def close(self):
            raise RuntimeError("cannot close")


    BAD_CLOSE = BadClose()
""")


def python_sink_reader(bus: Bus, spec: str) -> Daemon:
    (bus.dir / "shmd_test_sink.py").write_text(PY_SINK)
    bus.add_python_path(bus.dir)
    bus.env["SHMD_TEST_SINK_OUT"] = str(bus.out("py"))
    return bus.reader("py", sink={"type": "python", "callable": spec})


def test_python_sink_gets_every_record_and_is_closed(bus: Bus) -> None:
    """A python: sink callable gets every record (seq, topic, payload) in order, then close()."""
    bus.configure(writer={"source": {"type": "ticker", "rate": 200.0, "topic": 4}})
    w = bus.writer()
    r = python_sink_reader(bus, "shmd_test_sink:SINK")
    wait_until(lambda: len(read_lines(bus.out("py"))) >= 20, what="20 records")
    shutdown(w, r)
    lines = read_lines(bus.out("py"))
    assert lines[-1] == "closed"
    fields = [line.split(" ", 2) for line in lines[:-1]]
    seqs = [int(f[0]) for f in fields]
    assert_contiguous(seqs, "seqs")
    assert all(f[1] == "4" for f in fields)
    ticks = tick_numbers([f[2] for f in fields])
    assert ticks == [s + 1 for s in seqs]  # tick N is seq N-1
    assert seqs[-1] + 1 == r.wait_for("drained")["seq"]


def test_python_sink_that_raises_makes_the_reader_exit_1(bus: Bus) -> None:
    """A python: sink that raises is a sink failure: sink_failed naming it, exit 1."""
    w = bus.writer()
    r = python_sink_reader(bus, "shmd_test_sink:failing")
    assert r.wait_exit() == 1
    failed = r.wait_for("sink_failed")
    assert failed["error"] == (
        "Failed to hand records to shmd_test_sink:failing since it raised ValueError: nope"
    )
    assert r.wait_for("exiting")["reason"] == "sink_failed"
    w.terminate()
    assert w.wait_exit() == 0


def test_python_sink_whose_close_raises_is_reported_without_traceback(bus: Bus) -> None:
    """A python: sink whose close() raises gets a sink_failed warning, not a traceback."""
    w = bus.writer()
    r = python_sink_reader(bus, "shmd_test_sink:BAD_CLOSE")
    shutdown(w, r)
    failed = r.wait_for("sink_failed")
    assert failed["error"] == (
        "Failed to close shmd_test_sink:BAD_CLOSE since it raised RuntimeError: cannot close"
    )
    assert failed["level"] == "warning"
    assert "Traceback" not in r.stderr()


def test_journal_sink_summarises_the_first_batch_at_once_whatever_the_uptime() -> None:
    """The first batch gets its records line even when one period is longer than the uptime."""
    # One summary per ~32 years: longer than CLOCK_MONOTONIC has run on any
    # machine, so a sink that counted its period from time 0 would stay quiet.
    sink = JournalSink(JournalSinkConfig(summary_rate=1e-9))
    with capture_logs() as logs:
        sink.write([(0, 1, 2, b"first"), (1, 2, 2, b"second")])
        sink.write([(2, 3, 2, b"third")])
        sink.close()
    summaries = [e for e in logs if e["event"] == "records"]
    assert [(e["count"], e["first_seq"], e["seq"]) for e in summaries] == [(2, 0, 1), (1, 2, 2)]


def test_journal_sink_names_the_topic_where_segment_topics_does() -> None:
    """A records line carries topic_name beside topic when the topic map names it."""
    sink = JournalSink(JournalSinkConfig(topic_names=TopicMap({"ticks": 2})))
    with capture_logs() as logs:
        sink.write([(0, 1, 2, b"named")])
        sink.write([(1, 2, 7, b"unnamed")])
        sink.close()
    summaries = [e for e in logs if e["event"] == "records"]
    assert [(e["topic"], e.get("topic_name")) for e in summaries] == [(2, "ticks"), (7, None)]


def test_every_sink_type_has_a_runtime_class() -> None:
    """SINKS maps each SinkConfig dataclass (and nothing else) to what builds it."""
    assert set(SINKS) == set(typing.get_args(SinkConfig))
