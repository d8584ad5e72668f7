"""Tests of examples/: each example program against a real shm-writer.

The writer's source is gated (tests/helpers/gate_source.py): it starts
publishing once the example reports that it is attached, so nothing races.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_bus import Bus, Daemon, publish, read_lines, running_bus, wait_until

from shmd.control.listener import connect as dial

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


def gated_writer(bus: Bus, gated: str, **segment: object) -> tuple[Daemon, Path]:
    """A writer running source ``gated`` once a line is written into the returned FIFO."""
    fifo = bus.dir / "go.fifo"
    os.mkfifo(fifo)
    bus.env.update(SHMD_TEST_FIFO=str(fifo), SHMD_TEST_GATED=gated)
    bus.add_python_path(HELPERS)
    bus.add_python_path(EXAMPLES)
    bus.configure(
        segment={"policy": "block", **segment},
        writer={"source": {"type": "python", "callable": "gate_source:run"}},
    )
    return bus.writer(), fifo


def example(bus: Bus, name: str, *args: str) -> tuple[Daemon, Path]:
    """examples/``name`` as a process of its own, its stdout in a file."""
    out = bus.dir / f"{name}.out"
    with open(out, "wb") as f:
        d = bus.spawn(
            name,
            [sys.executable, str(EXAMPLES / name), "--socket", bus.socket, *args],
            stdout=f,
        )
    return d, out


def go(fifo: Path) -> None:
    with open(fifo, "w") as f:
        f.write("go\n")


def test_topic_source_and_sync_client_by_name(bus: Bus) -> None:
    """sync_client --topic frames prints exactly topic_source's frames records, named, in order."""
    bus.env["TOPIC_SOURCE_COUNT"] = "60"
    w, fifo = gated_writer(bus, "topic_source:run", topics={"ticks": 0, "frames": 1}, capacity=16)
    c, out = example(bus, "sync_client.py", "--topic", "frames", "--name", "viewer")
    w.wait_for("reader_attached", reader="viewer")
    go(fifo)
    assert w.wait_exit() == 0
    assert c.wait_exit() == 0, c.stderr()
    lines = read_lines(out)
    assert lines == [f"{i} frames frames {i}" for i in range(1, 60, 2)] + ["# 30 delivered, 0 lost"]


def test_async_client_keeps_its_heartbeat_while_idle_and_handles_records(bus: Bus) -> None:
    """async_client beats while the bus is idle, prints each published record, ends with the bus."""
    bus.configure(writer={"source": {"type": "ticker", "rate": 0.0}})
    w = bus.writer()
    c, out = example(bus, "async_client.py")
    w.wait_for("reader_attached")
    wait_until(
        lambda: sum(x.startswith("# heartbeat") for x in read_lines(out)) >= 3,
        what="three heartbeats with no records",
    )
    with dial(bus.socket, timeout=5) as conn:
        seqs = [publish(conn, 4, f"msg {i}".encode()) for i in range(5)]
    wait_until(lambda: f"{seqs[-1]} 4 msg 4" in read_lines(out), what="the last record printed")
    beats = sum(x.startswith("# heartbeat") for x in read_lines(out))
    wait_until(
        lambda: sum(x.startswith("# heartbeat") for x in read_lines(out)) > beats,
        what="a heartbeat after the records",
    )
    w.terminate()
    assert w.wait_exit() == 0
    assert c.wait_exit() == 0, c.stderr()
    lines = [x for x in read_lines(out) if not x.startswith("# heartbeat")]
    assert lines == [f"{s} 4 msg {i}" for i, s in enumerate(seqs)] + ["# 5 delivered, 0 lost"]


def test_numpy_frames_reads_1_mib_frames_without_a_copy(bus: Bus) -> None:
    """numpy_frames gets 20 frames of 512 x 512 uint32 (frame i all i) and their mean and max."""
    bus.env["SHMD_TEST_FRAMES"] = "20"
    w, fifo = gated_writer(bus, "gate_source:frames", capacity=4, slot_size=(1 << 20) + 64)
    c, out = example(bus, "numpy_frames.py", "--topic", "1", "--shape", "512x512")
    w.wait_for("reader_attached")
    go(fifo)
    assert w.wait_exit() == 0
    assert c.wait_exit() == 0, c.stderr()
    assert read_lines(out) == [f"{i} {i:.1f} {i}" for i in range(20)] + ["# 20 delivered, 0 lost"]
