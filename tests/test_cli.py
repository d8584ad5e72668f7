"""Tests of shmd.cli: ``shmctl`` as a real process against a real writer, readers and segment."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_bus import (
    BIN,
    DEFAULT_TIMEOUT,
    Bus,
    Daemon,
    program,
    read_frames,
    read_lines,
    running_bus,
    shm_path,
    wait_until,
)

from shmd.bus.layout import LAYOUT_VERSION, OFF_VERSION, Geometry, Policy
from shmd.bus.segment import Segment
from shmd.config import config_to_dict, load_config
from shmd.daemons.zenohio import status_path

REPO = Path(__file__).resolve().parent.parent
STATUS_KEYS = {
    "generation",
    "active",
    "writer_pid",
    "writer_alive",
    "capacity",
    "slot_size",
    "policy",
    "write_seq",
    "rate",
    "readers",
}
READER_KEYS = {"instance", "pid", "alive", "cursor", "lag", "delivered", "lost", "asleep"}
SUBCOMMANDS = ("status", "tail", "publish", "check-config", "demo")


# -- helpers ----------------------------------------------------------------------------------


def shmctl() -> list[str]:
    """The argv prefix that runs this environment's ``shmctl``."""
    script = BIN / "shmctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shmd.cli"]


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


@pytest.fixture
def quiet(bus: Bus) -> Bus:
    """A bus with a small ring (8 x 64 B) and no ticker: only ``shmctl publish`` publishes."""
    bus.configure(
        segment={"capacity": 8, "slot_size": 64},
        writer={"source": {"type": "ticker", "rate": 0.0}, "status_interval": 0.1},
    )
    return bus


def run(
    bus: Bus,
    *args: str,
    stdin: bytes | None = None,
    config: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``shmctl [--config <bus config>] ARGS`` to completion (killed on timeout)."""
    argv = [*shmctl(), *(["--config", str(bus.config_path)] if config else []), *args]
    # subprocess.run kills and reaps the child itself when the timeout expires.
    done = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        env=env or bus.env,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """Assert the run exited 0 and return its stdout."""
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 1 with one ``shmctl: error:`` line and no traceback; return the message."""
    assert done.returncode == 1, (
        f"{done.args} exited {done.returncode}, not 1:\n{done.stdout}\n{done.stderr}"
    )
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    assert lines[0].startswith("shmctl: error: "), lines[0]
    return lines[0].removeprefix("shmctl: error: ")


def status(bus: Bus) -> dict[str, Any]:
    """One ``shmctl status --json`` document."""
    doc: dict[str, Any] = json.loads(ok(run(bus, "status", "--json")))
    return doc


def wait_status(bus: Bus, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Run ``shmctl status --json`` until its document satisfies ``predicate``."""
    last: list[dict[str, Any]] = []

    def check() -> dict[str, Any] | None:
        st = status(bus)
        last[:] = [st]
        return st if predicate(st) else None

    try:
        result: dict[str, Any] = wait_until(check, what=what, interval=0.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {last}") from None
    return result


def rows(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The status document's reader rows by instance name."""
    return {r["instance"]: r for r in st["readers"]}


def publish(bus: Bus, *records: str, topic: int = 0) -> None:
    """``shmctl publish`` records given as arguments; must succeed."""
    ok(run(bus, "publish", "--topic", str(topic), *records))


def frame(payload: bytes) -> bytes:
    """A record in ``--framing length``: u32 little-endian length, then the bytes."""
    return len(payload).to_bytes(4, "little") + payload


class Stdout:
    """A background process's stdout, read by a thread into lines we wait on."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.proc.stdout is not None
        self.daemon = daemon
        self.lines: list[str] = []  # newline-terminated lines only, newline stripped
        self.tail = ""  # an unterminated last line at EOF (a write cut short)
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(
            target=self._read, daemon=True, name=f"stdout-{daemon.name}"
        )
        self._thread.start()

    def _read(self) -> None:
        stream = self.daemon.proc.stdout
        assert stream is not None
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace")
                with self._cond:
                    if line.endswith("\n"):
                        self.lines.append(line[:-1])
                    else:
                        self.tail = line
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # the pipe was closed under us by the cleanup
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait(
        self, predicate: Callable[[list[str]], bool], what: str, timeout: float = DEFAULT_TIMEOUT
    ) -> list[str]:
        """Block until ``predicate(lines)`` holds; the lines so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "its stdout closed" if self._eof else f"{timeout:g} s passed"
                    raise AssertionError(
                        f"{self.daemon.name} (pid {self.daemon.pid}): {what} did not happen "
                        f"before {why}; stdout: {self.lines[-20:]}; stderr:\n"
                        f"{self.daemon.stderr()}"
                    )
                self._cond.wait(left)
            return list(self.lines)

    def wait_eof(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Wait for the end of the stream; every complete line."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.daemon.name}'s stdout is still open"
        return list(self.lines)


def background(bus: Bus, name: str, *args: str) -> tuple[Daemon, Stdout]:
    """Start ``shmctl --config <bus config> ARGS`` in the background, stdout piped."""
    d = bus.spawn(
        name,
        [*shmctl(), "--config", str(bus.config_path), *args],
        stdout=subprocess.PIPE,
        cwd=str(REPO),
    )
    return d, Stdout(d)


def start_tail(bus: Bus, writer: Daemon, *args: str) -> tuple[Daemon, Stdout]:
    """Start ``shmctl tail ARGS``; return once the writer logged it attached."""
    tail, out = background(bus, "shmctl tail", "tail", *args)
    writer.wait_for("reader_attached", reader=f"shmctl-{tail.pid}")
    return tail, out


def proc_state(pid: int) -> str:
    """The process's state letter from /proc/<pid>/stat (R, S, T, Z, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def caught_signals(pid: int) -> int:
    """The mask of signals the process has handlers for (SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigCgt line for pid {pid}")


# -- status -----------------------------------------------------------------------------------


def test_status_json_lists_writer_and_every_reader(quiet: Bus) -> None:
    """status --json reports the writer, the ring and one correct row per attached reader."""
    bus = quiet
    writer = bus.writer()
    created = writer.wait_for("segment_created")
    r1, r2 = bus.file_reader("1"), bus.file_reader("2")
    publish(bus, "a", "b", "c")
    st = wait_status(
        bus,
        lambda s: (
            len(s["readers"]) == 2
            and all(r["delivered"] == 3 and r["asleep"] for r in s["readers"])
        ),
        "both readers delivering 3 records and going back to sleep",
    )
    assert st.keys() >= STATUS_KEYS
    assert st["segment"] == bus.segment
    assert st["generation"] == created["generation"]
    assert st["active"] is True
    assert st["writer_pid"] == writer.pid
    assert st["writer_alive"] is True
    assert (st["capacity"], st["slot_size"], st["policy"]) == (8, 64, "drop-oldest")
    assert st["write_seq"] == 3
    assert st["max_readers"] == 8
    by_name = rows(st)
    assert set(by_name) == {"1", "2"}
    for name, proc in (("1", r1), ("2", r2)):
        row = by_name[name]
        assert row.keys() >= READER_KEYS
        assert row["pid"] == proc.pid
        assert row["alive"] is True
        assert row["state"] == "attached"
        assert (row["cursor"], row["lag"], row["delivered"], row["lost"]) == (3, 0, 3, 0)
        assert row["topics"] == "all"
        # What status counts as delivered is what the reader's sink really got.
        assert read_lines(bus.out(name)) == ["a", "b", "c"]


def test_status_table_shows_writer_ring_and_reader_rows(quiet: Bus) -> None:
    """Plain status prints generation, writer pid and liveness, ring, policy, seq, rate and rows."""
    bus = quiet
    writer = bus.writer()
    generation = writer.wait_for("segment_created")["generation"]
    r1, r2 = bus.file_reader("1"), bus.file_reader("2")
    publish(bus, "x", "y")
    wait_status(
        bus,
        lambda s: len(s["readers"]) == 2 and all(r["delivered"] == 2 for r in s["readers"]),
        "both readers delivering 2 records",
    )
    text = ok(run(bus, "status"))
    assert "\x1b[" not in text, "colour codes on a pipe"
    assert re.search(rf"segment\s+{re.escape(bus.segment)}\s+generation {generation}\n", text)
    assert re.search(rf"writer\s+pid {writer.pid} running\s+active yes\n", text), text
    assert re.search(r"ring\s+8 slots x 64 B\s+policy drop-oldest", text), text
    assert re.search(r"published\s+2 records\s+\d+\.\d/s\n", text), text
    assert re.search(r"readers\s+2 of 8\n", text), text
    header = next(line for line in text.splitlines() if line.startswith("INSTANCE"))
    assert header.split() == [
        "INSTANCE",
        "PID",
        "ALIVE",
        "CURSOR",
        "LAG",
        "LAG_S",
        "DELIVERED",
        "LOST",
        "REDELIV",
        "ASLEEP",
        "WAIT",
        "TOPICS",
    ]
    table = {
        line.split()[0]: line.split()
        for line in text.splitlines()
        if line.split() and line.split()[0] in {"1", "2"}
    }
    assert set(table) == {"1", "2"}, text
    for name, proc in (("1", r1), ("2", r2)):
        (
            _instance,
            pid,
            alive,
            cursor,
            lag,
            _lag_s,
            delivered,
            lost,
            again,
            _asleep,
            wait,
            topics,
        ) = table[name]
        assert again == "0"
        assert wait == "sleep" and topics == "all"
        assert (pid, alive, cursor, lag, delivered, lost) == (
            str(proc.pid),
            "yes",
            "2",
            "0",
            "2",
            "0",
        )


def test_status_shows_the_writers_publish_rate(bus: Bus) -> None:
    """status reports the rate the writer measured while its ticker publishes."""
    bus.configure(writer={"source": {"type": "ticker", "rate": 50.0}, "status_interval": 0.1})
    bus.writer()
    st = wait_status(bus, lambda s: s["rate"] > 0, "a non-zero rate in the header")
    assert st["write_seq"] > 0
    # Bounded by what a 50/s ticker can reach (it skips rather than bursts after a stall).
    assert 0 < st["rate"] <= 200, st
    text = ok(run(bus, "status"))
    match = re.search(r"published\s+(\d+) records\s+(\d+\.\d)/s", text)
    assert match, text
    assert int(match[1]) > 0 and float(match[2]) > 0, text


def test_status_lag_grows_while_a_reader_is_stopped(quiet: Bus) -> None:
    """A SIGSTOPped reader's lag grows with every record published, and drains on SIGCONT."""
    bus = quiet
    bus.writer()
    reader = bus.file_reader("1")
    wait_status(
        bus, lambda s: rows(s).get("1", {}).get("asleep") is True, "reader 1 asleep in its loop"
    )
    reader.send(signal.SIGSTOP)
    try:
        wait_until(lambda: proc_state(reader.pid) == "T", what="reader 1 stopped")
        publish(bus, "1", "2", "3")
        first = rows(status(bus))["1"]
        assert (first["cursor"], first["lag"], first["delivered"]) == (0, 3, 0)
        publish(bus, "4", "5", "6", "7")
        second = rows(status(bus))["1"]
        assert (second["cursor"], second["lag"], second["delivered"]) == (0, 7, 0)
        assert second["lag_seconds"] > 0, second
        assert second["alive"] is True
    finally:
        reader.send(signal.SIGCONT)
    st = wait_status(bus, lambda s: rows(s)["1"]["lag"] == 0, "reader 1 catching up")
    row = rows(st)["1"]
    assert (row["cursor"], row["delivered"], row["lost"]) == (7, 7, 0)
    assert read_lines(bus.out("1")) == ["1", "2", "3", "4", "5", "6", "7"]


def test_status_counts_the_records_an_overrun_reader_lost(quiet: Bus) -> None:
    """A stopped reader overrun under drop-oldest shows lost records once it runs again."""
    bus = quiet
    bus.writer()
    reader = bus.file_reader("1")
    reader.send(signal.SIGSTOP)
    try:
        wait_until(lambda: proc_state(reader.pid) == "T", what="reader 1 stopped")
        # 12 records into an 8-slot ring: the 4 oldest are overwritten unread.
        ok(run(bus, "publish", stdin=b"".join(b"r%d\n" % i for i in range(12))))
        assert rows(status(bus))["1"]["lag"] == 12
    finally:
        reader.send(signal.SIGCONT)
    st = wait_status(bus, lambda s: rows(s)["1"]["lag"] == 0, "reader 1 catching up")
    row = rows(st)["1"]
    assert row["lost"] >= 4, row
    assert row["delivered"] + row["lost"] == 12, row
    assert len(read_lines(bus.out("1"))) == row["delivered"]


def test_status_watch_json_repeats_until_sigint(quiet: Bus) -> None:
    """status --watch 0.2 --json prints fresh documents until SIGINT, then exits 0."""
    bus = quiet
    bus.writer()
    watch, out = background(bus, "shmctl status --watch", "status", "--watch", "0.2", "--json")
    out.wait(lambda lines: len(lines) >= 1, "a first document")
    publish(bus, "seen")
    out.wait(
        lambda lines: any(json.loads(line)["write_seq"] == 1 for line in lines),
        "a document showing the published record",
    )
    lines = out.wait(lambda lines: len(lines) >= 3, "three documents")
    watch.send(signal.SIGINT)
    assert watch.wait_exit() == 0, watch.stderr()
    lines = out.wait_eof()
    docs = [json.loads(line) for line in lines]
    assert len(docs) >= 3
    assert all(d.keys() >= STATUS_KEYS and d["segment"] == bus.segment for d in docs)
    assert docs[0]["write_seq"] == 0 and docs[-1]["write_seq"] == 1
    assert "Traceback" not in watch.stderr()


def test_status_of_a_killed_writers_segment_says_not_running(quiet: Bus) -> None:
    """After the writer is SIGKILLed its stale segment still shows, with writer_alive false."""
    bus = quiet
    writer = bus.writer()
    generation = writer.wait_for("segment_created")["generation"]
    publish(bus, "before")
    writer.kill()
    assert writer.wait_exit() == -signal.SIGKILL
    assert bus.segment_exists(), "SIGKILL cannot unlink: the segment stays"
    st = status(bus)
    assert st["writer_pid"] == writer.pid
    assert st["writer_alive"] is False
    assert st["generation"] == generation
    assert st["write_seq"] == 1
    text = ok(run(bus, "status"))
    assert re.search(rf"writer\s+pid {writer.pid} NOT RUNNING", text), text


@pytest.mark.parametrize("how", ["config", "--segment"])
def test_status_of_a_missing_segment_fails_in_one_line(quiet: Bus, how: str) -> None:
    """status on a segment that does not exist prints one error line and exits 1."""
    bus = quiet
    args = ["status"] if how == "config" else ["status", "--segment", bus.segment]
    message = one_line_error(run(bus, *args, config=how == "config"))
    assert repr(bus.segment) in message and "does not exist" in message, message


def test_status_of_another_layout_version_fails_in_one_line(bus: Bus) -> None:
    """status on a segment of another layout version prints one error line and exits 1."""
    # A real segment made by this version, then its version field changed:
    # what a newer shmd would have left in /dev/shm.  The bus unlinks it.
    seg = Segment.create(bus.segment, Geometry(8, 64, 1), Policy.DROP_OLDEST)
    try:
        seg.control[OFF_VERSION : OFF_VERSION + 4] = (LAYOUT_VERSION + 1).to_bytes(4, "little")
    finally:
        seg.close()
    assert shm_path(bus.segment).exists()
    message = one_line_error(run(bus, "status", "--segment", bus.segment, config=False))
    assert f"layout version {LAYOUT_VERSION + 1}" in message, message


# -- tail -------------------------------------------------------------------------------------


def test_tail_prints_text_records_as_they_arrive_and_stops_on_sigint(quiet: Bus) -> None:
    """tail prints each record as a text line when it is published and exits 0 on SIGINT."""
    bus = quiet
    writer = bus.writer()
    tail, out = start_tail(bus, writer)
    publish(bus, "one", "two")
    out.wait(lambda lines: lines == ["one", "two"], "the first two records")
    publish(bus, "three")
    out.wait(lambda lines: lines == ["one", "two", "three"], "the third record")
    tail.send(signal.SIGINT)
    assert tail.wait_exit() == 0, tail.stderr()
    assert out.wait_eof() == ["one", "two", "three"]
    writer.wait_for("reader_detached", reader=f"shmctl-{tail.pid}", reason="SIGINT")
    assert "Traceback" not in tail.stderr()


def test_tail_hex_format_prints_seq_topic_and_hex_payload(quiet: Bus) -> None:
    """tail --format hex prints 'seq topic hexpayload' per record."""
    bus = quiet
    bus.writer()
    publish(bus, "hi", "yo", topic=3)
    out = ok(run(bus, "tail", "--from", "oldest", "-n", "2", "--format", "hex"))
    assert out.splitlines() == ["0 3 6869", "1 3 796f"]


def test_tail_json_format_prints_one_document_per_record(quiet: Bus) -> None:
    """tail --format json prints seq, timestamp_ns, topic and payload (base64 if not UTF-8)."""
    bus = quiet
    bus.writer()
    before = time.monotonic_ns()
    ok(
        run(
            bus,
            "publish",
            "--topic",
            "7",
            "--framing",
            "length",
            stdin=frame(b"text") + frame(b"\xff\x00bin"),
        )
    )
    after = time.monotonic_ns()
    out = ok(run(bus, "tail", "--from", "oldest", "-n", "2", "--format", "json"))
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 2
    assert {k: docs[0][k] for k in ("seq", "topic", "payload")} == {
        "seq": 0,
        "topic": 7,
        "payload": "text",
    }
    assert (docs[1]["seq"], docs[1]["topic"]) == (1, 7)
    assert "payload" not in docs[1]
    assert base64.b64decode(docs[1]["payload_base64"]) == b"\xff\x00bin"
    # The writer stamps CLOCK_MONOTONIC, the same clock as ours.
    assert before <= docs[0]["timestamp_ns"] <= docs[1]["timestamp_ns"] <= after


def test_tail_topic_option_prints_only_those_topics(quiet: Bus) -> None:
    """tail --topic prints only records of the chosen topics (repeatable)."""
    bus = quiet
    bus.writer()
    publish(bus, "a", topic=1)
    publish(bus, "b", topic=2)
    publish(bus, "c", topic=1)
    out = ok(run(bus, "tail", "--from", "oldest", "--topic", "1", "-n", "2", "--format", "json"))
    assert [(d["seq"], d["topic"], d["payload"]) for d in map(json.loads, out.splitlines())] == [
        (0, 1, "a"),
        (2, 1, "c"),
    ]
    out = ok(
        run(
            bus,
            "tail",
            "--from",
            "oldest",
            "--topic",
            "3",
            "--topic",
            "2",
            "-n",
            "1",
            "--format",
            "json",
        )
    )
    assert [(d["seq"], d["topic"], d["payload"]) for d in map(json.loads, out.splitlines())] == [
        (1, 2, "b")
    ]


def test_tail_and_publish_take_topic_names(quiet: Bus) -> None:
    """tail --topic and publish --topic take names of segment.topics as well as ids."""
    bus = quiet
    bus.configure(segment={"topics": {"ticks": 1, "frames": 2}})
    bus.writer()
    ok(run(bus, "publish", "--topic", "ticks", "a"))
    ok(run(bus, "publish", "--topic", "frames", "b"))
    ok(run(bus, "publish", "--topic", "3", "c"))
    ok(run(bus, "publish", "--topic", "ticks", "d"))
    out = ok(
        run(
            bus,
            *("tail", "--from", "oldest", "--topic", "ticks", "--topic", "3"),
            *("-n", "3", "--format", "json"),
        )
    )
    assert [(d["seq"], d["topic"], d["payload"]) for d in map(json.loads, out.splitlines())] == [
        (0, 1, "a"),
        (2, 3, "c"),
        (3, 1, "d"),
    ]


@pytest.mark.parametrize("command", ["tail", "publish"])
def test_an_unknown_topic_name_is_a_usage_error(quiet: Bus, command: str) -> None:
    """--topic with a name segment.topics lacks exits 2, its error line naming the known names."""
    bus = quiet
    bus.configure(segment={"topics": {"ticks": 1, "frames": 2}})
    done = run(bus, command, "--topic", "tick", *(["x"] if command == "publish" else []))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("usage: shmctl") and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "shmctl: error: --topic: unknown topic 'tick' (this bus has: frames, ticks)"
    )


def test_status_names_the_readers_topics(quiet: Bus) -> None:
    """status shows each reader's topics by name where segment.topics names them."""
    bus = quiet
    bus.configure(segment={"topics": {"ticks": 1, "frames": 2}})
    bus.writer()
    bus.file_reader("1", topics=["ticks", 5])
    st = wait_status(bus, lambda s: len(s["readers"]) == 1, "reader 1 attached")
    row = rows(st)["1"]
    assert (row["topics"], row["topic_names"]) == ([1, 5], ["ticks", "5"])
    assert st["topics"] == {"ticks": 1, "frames": 2}
    text = ok(run(bus, "status"))
    line = next(line for line in text.splitlines() if line.split()[:1] == ["1"])
    assert line.split()[-1] == "ticks,5", text


def test_tail_from_latest_skips_records_already_published(quiet: Bus) -> None:
    """tail --from latest (the default) prints only newer records; --from oldest the ring's."""
    bus = quiet
    writer = bus.writer()
    publish(bus, "old")
    tail, out = start_tail(bus, writer, "-n", "1")
    publish(bus, "new")
    assert tail.wait_exit() == 0, tail.stderr()
    assert out.wait_eof() == ["new"]
    assert ok(run(bus, "tail", "--from", "oldest", "-n", "2")).splitlines() == ["old", "new"]


def test_tail_n_exits_after_n_records(quiet: Bus) -> None:
    """tail -n N prints exactly N records and exits 0 although more are there."""
    bus = quiet
    writer = bus.writer()
    publish(bus, "r0", "r1", "r2", "r3", "r4")
    assert ok(run(bus, "tail", "--from", "oldest", "-n", "3")).splitlines() == ["r0", "r1", "r2"]
    detached = writer.wait_for("reader_detached", reason="limit")
    assert detached["delivered"] >= 3


def test_tail_ends_cleanly_when_the_writer_shuts_down(quiet: Bus) -> None:
    """tail exits 0 after the writer's SIGTERM shutdown, having printed everything."""
    bus = quiet
    writer = bus.writer()
    tail, out = start_tail(bus, writer)
    publish(bus, "last words")
    out.wait(lambda lines: lines == ["last words"], "the record")
    writer.terminate()
    assert tail.wait_exit() == 0, tail.stderr()
    assert writer.wait_exit() == 0, writer.stderr()
    assert out.wait_eof() == ["last words"]
    assert tail.stderr().strip() == "", tail.stderr()
    writer.wait_for("reader_detached", reader=f"shmctl-{tail.pid}", reason="drained")


@pytest.mark.parametrize("socket_state", ["missing", "refusing"])
def test_tail_without_a_listening_writer_fails_in_one_line(quiet: Bus, socket_state: str) -> None:
    """tail --timeout 0.5 on a missing or refusing socket prints one error line and exits 1."""
    bus = quiet
    if socket_state == "refusing":
        # A writer killed by SIGKILL leaves its socket file with no listener behind.
        writer = bus.writer()
        writer.kill()
        writer.wait_exit()
        assert Path(bus.socket).exists()
    started = time.monotonic()
    message = one_line_error(run(bus, "tail", "--timeout", "0.5"))
    assert time.monotonic() - started < 8, "the timeout was not honoured"
    assert bus.socket in message, message


# -- publish ----------------------------------------------------------------------------------


def test_publish_arguments_reach_a_reader_in_order_with_their_topic(quiet: Bus) -> None:
    """publish ARGS... sends one record per argument, in order, with --topic."""
    bus = quiet
    bus.writer()
    bus.file_reader("1")
    done = run(bus, "publish", "--topic", "5", "-v", "one", "two", "three")
    ok(done)
    assert "published 3 records, last seq 2" in done.stderr
    wait_until(
        lambda: read_lines(bus.out("1")) == ["one", "two", "three"],
        what="reader 1 writing the three records",
    )
    out = ok(run(bus, "tail", "--from", "oldest", "-n", "3", "--format", "json"))
    assert [(d["seq"], d["topic"], d["payload"]) for d in map(json.loads, out.splitlines())] == [
        (0, 5, "one"),
        (1, 5, "two"),
        (2, 5, "three"),
    ]


def test_publish_reads_newline_framed_stdin(quiet: Bus) -> None:
    """publish without arguments sends each stdin line as a record (last line unterminated)."""
    bus = quiet
    bus.writer()
    # Subscribed to topic 4 only: what arrives was published on topic 4.
    bus.file_reader("1", topics=[4])
    ok(run(bus, "publish", "--topic", "4", stdin=b"l1\nl2\n\nl4"))
    wait_until(
        lambda: read_lines(bus.out("1")) == ["l1", "l2", "", "l4"],
        what="reader 1 writing the four lines",
    )


def test_publish_reads_length_framed_stdin(quiet: Bus) -> None:
    """publish --framing length sends each u32-length-prefixed frame as one record."""
    bus = quiet
    bus.writer()
    bus.file_reader("1", framing="length", topics=[9])
    payloads = [b"with\nnewline", b"", b"\x00\xff" * 8]
    ok(
        run(
            bus,
            "publish",
            "--framing",
            "length",
            "--topic",
            "9",
            stdin=b"".join(map(frame, payloads)),
        )
    )
    wait_until(
        lambda: read_frames(bus.out("1")) == payloads, what="reader 1 writing the three frames"
    )


def test_publish_truncated_length_frame_fails_after_the_good_ones(quiet: Bus) -> None:
    """A frame cut short on stdin is a one-line error; the frames before it are published."""
    bus = quiet
    bus.writer()
    bus.file_reader("1")
    message = one_line_error(
        run(bus, "publish", "--framing", "length", stdin=frame(b"fine") + b"\x05\x00\x00\x00ab")
    )
    assert "5-byte frame" in message and "after 2 bytes" in message, message
    wait_until(lambda: read_lines(bus.out("1")) == ["fine"], what="reader 1 writing 'fine'")
    assert status(bus)["write_seq"] == 1


def test_publish_record_larger_than_a_slot_fails_naming_both_sizes(quiet: Bus) -> None:
    """A record bigger than a slot's payload is a one-line error naming both sizes."""
    bus = quiet
    writer = bus.writer()
    message = one_line_error(run(bus, "publish", "x" * 33))
    assert "33-byte record" in message and "at most 32 bytes" in message, message
    writer.wait_for("record_refused", topic=0)
    assert status(bus)["write_seq"] == 0


@pytest.mark.parametrize("writer_state", ["never started", "killed"])
def test_publish_without_a_writer_fails_in_one_line(quiet: Bus, writer_state: str) -> None:
    """publish with no writer behind the socket prints one error line and exits 1."""
    bus = quiet
    if writer_state == "killed":
        writer = bus.writer()
        writer.kill()
        writer.wait_exit()
    message = one_line_error(run(bus, "publish", "lost"))
    assert bus.socket in message, message


# -- check-config -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "--config", "SHMD_CONFIG"])
def test_check_config_prints_effective_settings_that_load_back(quiet: Bus, how: str) -> None:
    """check-config on a valid file exits 0 and prints YAML that loads as the same settings."""
    bus = quiet
    path = str(bus.config_path)
    if how == "argument":
        done = run(bus, "check-config", path, config=False)
    elif how == "--config":
        done = run(bus, "check-config")
    else:
        done = run(bus, "check-config", config=False, env={**bus.env, "SHMD_CONFIG": path})
    text = ok(done)
    assert text.startswith(f"# configuration OK: {path}\n"), text
    printed = yaml.safe_load(text)
    assert printed["segment"]["name"] == bus.segment
    assert printed["control"]["socket"] == bus.socket
    again = bus.write_yaml(bus.dir / "printed.yaml", printed)
    assert config_to_dict(load_config(again)) == config_to_dict(load_config(path))


def test_check_config_reports_a_mistake_as_the_daemons_do(bus: Bus) -> None:
    """check-config on an invalid file prints the daemons' file:line: key: reason and exits 1."""
    bad = bus.dir / "bad.yaml"
    bad.write_text("segment:\n  name: /shmd-test-never\n  capacity: 1000\n")
    message = one_line_error(run(bus, "check-config", str(bad), config=False))
    assert re.fullmatch(rf"{re.escape(str(bad))}:3: segment\.capacity: .+", message), message
    writer = bus.spawn(
        "shm-writer", [*program("shm-writer"), "--config", str(bad), "--check-config"]
    )
    assert writer.wait_exit() == 78
    assert writer.wait_for("config_error")["error"] == message


# -- help and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_has_examples(bus: Bus, command: str) -> None:
    """Every subcommand's --help exits 0 and shows an examples section."""
    text = ok(run(bus, command, "--help", config=False))
    assert text.startswith(f"usage: shmctl {command}"), text
    assert "\nexamples:\n  shmctl " + command in text, text


def test_top_level_help_lists_every_subcommand(bus: Bus) -> None:
    """shmctl --help exits 0 and names every subcommand."""
    text = ok(run(bus, "--help", config=False))
    for command in SUBCOMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\s", text, re.MULTILINE), (command, text)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["status", "--bogus"],
        ["status", "--watch", "soon"],
        ["tail", "--topic", "99"],
        ["tail", "--format", "xml"],
        ["publish", "--topic", "-1", "x"],
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_usage_errors_exit_2(bus: Bus, args: list[str]) -> None:
    """A usage mistake prints argparse's usage line and exits 2, without a traceback."""
    done = run(bus, *args, config=False)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("usage: shmctl"), done.stderr
    assert "shmctl" in done.stderr.splitlines()[-1] and "error:" in done.stderr
    assert "Traceback" not in done.stderr


# -- demo -------------------------------------------------------------------------------------


class Demo:
    """``shmctl [--config FILE] demo`` in its own session, its output collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # The demo's children are not ours to reap: it waits for them itself.
        # Anything of its process group still there afterwards is killed by pgid.
        self.proc = subprocess.Popen(
            [*shmctl(), *argv, "demo"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, pattern: str) -> re.Match[str]:
        """The first line matching pattern, waited for with a deadline."""
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        with self._cond:
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (
                    f"no line matching {pattern!r}; status {self.proc.poll()}; output:\n"
                    + self.text()
                )
                self._cond.wait(min(left, 0.5))

    def interrupt(self) -> int:
        """SIGINT the demo once its forwarders are in place; its exit status."""
        # The demo installs its SIGINT and SIGTERM forwarders together, SIGTERM
        # last; Python itself catches SIGINT from the start, so SigCgt's SIGTERM
        # bit is what says the forwarder is in place.
        wait_until(
            lambda: caught_signals(self.proc.pid) & (1 << (signal.SIGTERM - 1)),
            what="the demo installing its signal handlers",
        )
        os.kill(self.proc.pid, signal.SIGINT)
        status = self.proc.wait(timeout=15)
        self._pump.join(5)
        return status

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def close(self) -> None:
        # The demo is our unreaped child until wait() below, so its pid (= the
        # group id) cannot be reused while we signal the group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._pump.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def demos() -> Iterator[Callable[[list[str], dict[str, str]], Demo]]:
    """Start demos with ``demos(argv, env)``; each one's process group is gone afterwards."""
    started: list[Demo] = []

    def start(argv: list[str], env: dict[str, str]) -> Demo:
        started.append(Demo(argv, env))
        return started[-1]

    yield start
    for demo in started:
        demo.close()


def test_demo_runs_a_writer_and_two_readers_and_stops_all_on_sigint(
    quiet: Bus, demos: Callable[[list[str], dict[str, str]], Demo]
) -> None:
    """demo shows a writer's and two readers' logs; SIGINT to it stops them all with status 0."""
    bus = quiet
    demo = demos(["--config", str(quiet.config_path)], quiet.env)
    proc = demo.proc
    demo.wait_line(r"\blistener_ready\b.*role=writer")
    demo.wait_line(r"\battached\b.*\binstance=1\b")
    demo.wait_line(r"\battached\b.*\binstance=2\b")
    assert bus.segment_exists()
    assert demo.interrupt() == 0, demo.text()
    text = demo.text()
    assert re.search(r"\bactive_cleared\b.*reason=SIGTERM", text), text
    assert re.search(r"\bshutdown_complete\b.*role=writer", text), text
    for instance in ("1", "2"):
        assert re.search(rf"\bexiting\b.*\binstance={instance}\b.*status=0", text), text
    assert "Traceback" not in text
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the demo's process group is left
    assert not bus.segment_exists(), "the writer did not unlink the segment"
    assert not Path(bus.socket).exists(), "the writer did not remove its socket"


def test_demo_without_config_runs_its_own_bus_in_whole_lines(
    bus: Bus, demos: Callable[[list[str], dict[str, str]], Demo]
) -> None:
    """demo alone runs a bus of its own (no warnings, nothing left), each log line whole."""
    env = {k: v for k, v in bus.env.items() if k != "SHMD_CONFIG"}
    env["PYTHONUNBUFFERED"] = "1"  # each print() part is then a write(2) of its own
    demo = demos([], env)
    segment = demo.wait_line(r"\bsegment_created\b.*segment=(/shmd-demo-\d+)").group(1)
    socket_path = demo.wait_line(r"\blistener_ready\b.*socket=(\S+)").group(1)
    for instance in ("1", "2"):
        demo.wait_line(rf"\brecords\b.*\binstance={instance}\b")
    assert Path("/dev/shm" + segment).exists()
    assert demo.interrupt() == 0, demo.text()
    lines = demo.lines
    line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(info|warning) +\] [a-z_]+ +\S.*")
    assert lines and all(line.fullmatch(text) for text in lines), demo.text()
    assert not [text for text in lines if "config_warning" in text], demo.text()
    assert not Path("/dev/shm" + segment).exists()
    assert not Path(socket_path).exists()
    assert not Path(socket_path).parent.exists(), "the demo left its directory"


def test_status_shows_the_bridge_account_beside_the_segment(quiet: Bus) -> None:
    """A zenoh source's status file is the bridge section: counts, origins, a gone keeper named."""
    bus = quiet
    bus.writer()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    account = {
        "key": "site-a/*",
        "lost": 12,
        "refused": 3,
        "refused_by": {"attachment": 2, "key": 1},
        "pid": gone.pid,
        "origins": {
            "site-a": {"received": 148230, "lost": 12, "reordered": 1, "restarts": 1, "seq": 9}
        },
    }
    path = status_path(bus.segment)
    try:
        path.write_text(json.dumps(account))
        st = json.loads(run(bus, "status", "--json").stdout)
        assert st["bridge"] == account
        text = run(bus, "status").stdout
        assert (
            "bridge      zenoh site-a/*  lost 12  refused 3 (attachment 2, key 1)"
            f"  (kept by pid {gone.pid}, which is gone)"
        ) in text
        [row] = [line for line in text.splitlines() if line.startswith("site-a ")]
        assert row.split() == ["site-a", "148230", "12", "1", "1", "9"]
    finally:
        path.unlink(missing_ok=True)
    assert json.loads(run(bus, "status", "--json").stdout)["bridge"] is None
