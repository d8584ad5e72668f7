"""The comparative benchmark works and its output is correct (speed is never asserted).

Runs use real spawned processes, real sockets, eventfds, memfds and iceoryx2 segments. The
fault-injecting impls below live in this module because the spawned roles unpickle them by
module name; they run in child processes only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, cast

import pytest

from shmd import Publisher

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # benchmarks/ is not installed: it is imported from the checkout (and the spawned
    # roles inherit this sys.path).
    sys.path.insert(0, str(REPO))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    MIB,
    Buffer,
    Case,
    CaseResult,
    Chart,
    ImplInfo,
    Kind,
    LatencyCase,
    Metric,
    PassFd,
    Reader,
    ReaderStats,
    Report,
    RunDir,
    RunRecord,
    StreamImpl,
    ThroughputCase,
    Writer,
    WriterStats,
    _role_main,
    check,
    default_records,
    metrics_for,
    percentile,
    pin_cpus,
    queue_depth,
    render_markdown,
    render_svg,
    run_one,
    shm_prefix,
    si,
    spread,
    stamp,
    sweep_stale,
    validate,
)
from benchmarks.peers import (  # noqa: E402
    floor,
    iceoryx2_peer,
    mp_queue,
    shmd_peer,
    unix_sock,
    zenoh_peer,
    zmq_ipc,
)

ALL_IMPLS = [
    *zmq_ipc.IMPLS,
    *iceoryx2_peer.IMPLS,
    *zenoh_peer.IMPLS,
    *unix_sock.IMPLS,
    *mp_queue.IMPLS,
    *floor.IMPLS,
]
SHM_DIR = Path("/dev/shm")


# --------------------------------------------------------------------------- helpers


def _spawned_children() -> set[int]:
    """Live (or unreaped) multiprocessing spawn children of this test process."""
    me, kids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"spawn_main" in cmdline:
            kids.add(int(entry))
    return kids


@pytest.fixture
def clean_run(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Runs get a private temp dir; asserts no role process, run file or fd is left behind.

    Yields that temp dir. Every RunDir made in this process is recorded, so its
    /dev/shm/<shm_prefix>* files can be checked even while other processes run benchmarks.
    """
    private = tmp_path_factory.mktemp("runs")
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    made: list[str] = []
    create = RunDir.__init__

    def recording_init(self: RunDir) -> None:
        create(self)
        made.append(self.path)

    monkeypatch.setattr(RunDir, "__init__", recording_init)
    # The first spawn starts multiprocessing's resource tracker, whose pipe this process
    # then keeps for good: start it before counting fds.
    resource_tracker.ensure_running()
    fds = set(os.listdir("/proc/self/fd"))
    assert not _spawned_children()
    yield private
    assert not _spawned_children()
    assert list(private.iterdir()) == []
    assert [p for d in made for p in SHM_DIR.glob(shm_prefix(d) + "*")] == []
    assert set(os.listdir("/proc/self/fd")) - fds == set()


# --------------------------------------------------------------------------- fault injection


class _FaultyWriter:
    """Sends through a real unix seqpacket writer but damages record 5."""

    def __init__(self, inner: Writer, fault: str) -> None:
        self._inner, self._fault, self._seq = inner, fault, 0

    def wait_readers(self, deadline: float) -> None:
        self._inner.wait_readers(deadline)

    def send(self, record: bytearray) -> None:
        seq, self._seq = self._seq, self._seq + 1
        if seq != 5:
            self._inner.send(record)
        elif self._fault == "duplicate":
            self._inner.send(record)
            self._inner.send(record)
        elif self._fault == "tail":
            torn = bytearray(record)
            torn[-1] ^= 0xFF
            self._inner.send(torn)
        elif self._fault == "short":
            self._inner.send(record[:-1])
        # "drop": record 5 is never sent

    def close(self) -> None:
        self._inner.close()


class FaultyImpl(unix_sock.UnixSocketImpl):
    """unix-seqpacket with one damaged record: drop, duplicate, tail or short."""

    def __init__(self, fault: str) -> None:
        super().__init__("seqpacket")
        self.fault = fault
        self.name = f"faulty-{fault}"

    def open_writer(self, channel: Any, case: Case) -> Writer:
        return _FaultyWriter(super().open_writer(channel, case), self.fault)


class _HangingReader:
    """Attached like a real reader, then never returns a record."""

    def __init__(self, inner: Reader) -> None:
        self._inner = inner

    def recv(self) -> Buffer:
        # Blocks forever on purpose: the harness must kill this process at the deadline.
        select.select([], [], [])
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._inner.close()


class HangingUnix(unix_sock.UnixSocketImpl):
    """unix-stream whose readers connect and then hang."""

    def __init__(self) -> None:
        super().__init__("stream")
        self.name = "hanging-unix"

    def open_reader(self, channel: Any, case: Case, index: int) -> Reader:
        return _HangingReader(super().open_reader(channel, case, index))


class HangingIceoryx2(iceoryx2_peer.Iceoryx2Impl):
    """iceoryx2 whose readers subscribe (segments exist) and then hang."""

    def __init__(self) -> None:
        super().__init__(zero_copy=False)
        self.name = "hanging-iceoryx2"

    def open_reader(self, channel: Any, case: Case, index: int) -> Reader:
        return _HangingReader(super().open_reader(channel, case, index))


class HangingShm(floor.ShmEventfd):
    """The shm + eventfd floor whose readers map the ring and then hang."""

    name = "hanging-shm"

    def open_reader(self, channel: Any, case: Case, index: int) -> Reader:
        return _HangingReader(super().open_reader(channel, case, index))


class _CountingReader:
    """A real unix-stream reader that also reports how often recv() was called."""

    def __init__(self, inner: Reader) -> None:
        self._inner, self._calls = inner, 0

    def recv(self) -> Buffer:
        self._calls += 1
        return self._inner.recv()

    def notes(self) -> dict[str, int]:
        return {"recv_calls": self._calls}

    def close(self) -> None:
        self._inner.close()


class CountingUnix(unix_sock.UnixSocketImpl):
    """unix-stream whose readers report a transport counter."""

    def __init__(self) -> None:
        super().__init__("stream")
        self.name = "counting-unix"

    def open_reader(self, channel: Any, case: Case, index: int) -> Reader:
        return _CountingReader(super().open_reader(channel, case, index))


class CrashingImpl(StreamImpl):
    """A reader that fails while attaching."""

    name = "crashing"

    def open_writer(self, channel: Any, case: Case) -> Writer:
        return unix_sock.UnixSocketImpl("stream").open_writer(channel, case)

    def open_reader(self, channel: Any, case: Case, index: int) -> Reader:
        raise RuntimeError("Failed to attach since the test said so")

    def prepare(self, case: Case, workdir: str) -> Any:
        return unix_sock.UnixSocketImpl("stream").prepare(case, workdir)


class UnavailableImpl(floor.ShmEventfd):
    """Stands for a peer whose optional package is missing."""

    name = "unavailable"

    def available(self) -> str | None:
        return "frobnicate is not installed (pip install frobnicate)"


IMPLS = [FaultyImpl("drop"), UnavailableImpl(), *floor.IMPLS]


# --------------------------------------------------------------------------- real peers


def skip_if_unavailable(impl: Any) -> None:
    """Skip with the peer's reason, and pip's when packaging/dev could not install it."""
    reason = impl.available()
    if not reason:
        return
    # packaging/dev installs the bench and zenoh extras; where pip could not, it kept why.
    extra = "zenoh" if impl.name == "zenoh" else "bench"
    why_not = Path(sys.prefix) / f"{extra}-unavailable"
    if why_not.is_file():
        pip_said = why_not.read_text().strip()
        reason += f" (packaging/dev could not install the {extra} extra: {pip_said})"
    pytest.skip(reason)


@pytest.mark.parametrize("impl", ALL_IMPLS, ids=lambda i: i.name)
@pytest.mark.parametrize("payload,records", [(64, 400), (MIB, 12)], ids=["64B", "1MiB"])
def test_every_peer_delivers_every_record_intact(
    impl: Any, payload: int, records: int, clean_run: Path
) -> None:
    """Each available peer moves every record to two readers, checked, and cleans up."""
    skip_if_unavailable(impl)
    case = ThroughputCase(2, payload, records, queue_depth(payload))
    if impl.supports(case):
        pytest.skip(impl.supports(case))
    record = run_one(impl, case, 0, timeout=60)
    assert record.status == "ok", record.detail
    m = record.metrics
    assert m["rec_per_s"] > 0 and m["writer_cpu_ns"] > 0 and m["reader_rss_mib"] > 1
    assert m["mib_per_s"] == pytest.approx(m["rec_per_s"] * payload / MIB)


@pytest.mark.parametrize("impl", ALL_IMPLS, ids=lambda i: i.name)
def test_every_peer_measures_one_way_latency(impl: Any, clean_run: Path) -> None:
    """Each available peer yields ordered latency percentiles from a paced 1 kHz run (warmed up)."""
    skip_if_unavailable(impl)
    record = run_one(impl, LatencyCase(rate_hz=1000, count=60, warmup=10), 0, timeout=60)
    assert record.status == "ok", record.detail
    m = record.metrics
    assert 0 < m["p50_ns"] <= m["p99_ns"] <= m["p999_ns"] <= m["max_ns"]
    # A one-way sample can not be longer than the whole run took.
    assert m["max_ns"] < 60e9


def test_epoll_floor_reads_a_record_sent_between_its_look_and_its_drain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record sent between the epoll floor reader's look and its drain is read, not slept on."""
    impl = floor.ShmEventfdEpoll()
    case = LatencyCase(rate_hz=1000, count=1)
    chan = impl.prepare(case, str(tmp_path))

    def side(c: floor.ShmChannel) -> floor.ShmChannel:  # each end closes its own fds
        return replace(
            c,
            memfd=PassFd(os.dup(c.memfd.fd)),
            wake=[PassFd(os.dup(f.fd)) for f in c.wake],
            credit=[PassFd(os.dup(f.fd)) for f in c.credit],
        )

    writer, reader = impl.open_writer(side(chan), case), impl.open_reader(side(chan), case, 0)
    impl.cleanup(chan)
    record = bytearray(range(64))
    real_read = os.eventfd_read

    def racing_read(fd: int) -> int:
        monkeypatch.setattr(os, "eventfd_read", real_read)
        writer.send(record)  # after the reader's look at the count, before its drain
        return real_read(fd)

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the reader slept through a record it had drained the wake-up of")

    monkeypatch.setattr(os, "eventfd_read", racing_read)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 10.0)  # a guard against hanging, not a wait
    try:
        got = bytes(reader.recv())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        reader.close()
        writer.close()
    assert got == bytes(record)


@pytest.mark.parametrize(
    "impl,case",
    [
        (floor.EventfdPingPong(), LatencyCase(rate_hz=0, count=500)),
        # 50 us apart: records land while the reader is awake and while it goes to sleep.
        (floor.ShmEventfdEpoll(), LatencyCase(rate_hz=20_000, count=4000)),
    ],
    ids=["pingpong-back-to-back", "shm-epoll-20k"],
)
def test_latency_only_floors_decline_throughput_and_deliver_their_latency_case(
    impl: Any, case: LatencyCase, clean_run: Path
) -> None:
    """A latency-only floor declines throughput cases and gets every record of its own case."""
    assert impl.supports(ThroughputCase(1, 64, 10, 8)) is not None
    record = run_one(impl, case, 0, timeout=60)
    assert record.status == "ok", record.detail
    assert record.metrics["p50_ns"] > 0


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "fault,expected",
    [
        ("drop", "expected record 5 but got head seq 6"),
        ("duplicate", "expected record 6 but got head seq 5"),
        ("tail", "expected record 5 but got head seq 5, tail seq"),
        ("short", "record 5 has 4095 bytes instead of 4096"),
    ],
)
def test_a_damaged_record_makes_the_run_invalid(fault: str, expected: str, clean_run: Path) -> None:
    """A dropped, duplicated, torn or truncated record is caught by the reader's check."""
    case = ThroughputCase(2, 4096, 50, queue_depth(4096))
    record = run_one(FaultyImpl(fault), case, 0, timeout=60)
    assert record.status == "invalid"
    assert expected in record.detail, record.detail
    assert record.metrics == {}


@pytest.mark.parametrize(
    "impl", [HangingUnix(), HangingIceoryx2(), HangingShm()], ids=lambda i: i.name
)
def test_a_hung_run_is_killed_at_the_deadline_and_cleaned_up(impl: Any, clean_run: Path) -> None:
    """A reader that never returns makes the run fail at its timeout, with nothing left over."""
    skip_if_unavailable(impl)
    started = time.monotonic()
    record = run_one(impl, ThroughputCase(2, 64, 100, 8), 0, timeout=3)
    elapsed = time.monotonic() - started
    assert record.status == "error"
    assert "before the case timeout" in record.detail, record.detail
    assert 3 <= elapsed < 30


def _state_and_ppid(pid: int) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    got = _state_and_ppid(pid)
    return got is not None and got[0] != "Z"


def _children_of(pid: int) -> set[int]:
    """Running children of ``pid``."""
    return {
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and _running(int(e)) and (_state_and_ppid(int(e)) or ("", 0))[1] == pid
    }


def _poll(condition: Any, seconds: float, what: str) -> None:
    """Poll ``condition()`` until it is true or fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Failed to see {what} within {seconds} s")
        # Polling /proc with a deadline: there is no event to wait on for another
        # process's children appearing or dying.
        select.select([], [], [], 0.05)


def test_a_killed_harness_takes_its_roles_along_and_is_swept_later(clean_run: Path) -> None:
    """SIGKILLing the harness kills its role processes, and sweep_stale removes its files."""
    script = (
        "import sys; sys.path[:0] = sys.argv[1:3]\n"
        "from test_benchmarks import HangingIceoryx2, HangingUnix, iceoryx2_peer\n"
        "from benchmarks.harness import ThroughputCase, run_one\n"
        "impl = HangingUnix() if iceoryx2_peer.MISSING else HangingIceoryx2()\n"
        "if __name__ == '__main__':\n"
        "    run_one(impl, ThroughputCase(2, 64, 100, 8), 0, timeout=120)\n"
    )
    paths = [str(REPO), str(Path(__file__).parent)]
    env = {**os.environ, "TMPDIR": str(clean_run)}
    harness = subprocess.Popen([sys.executable, "-c", script, *paths], env=env)
    try:
        _poll(lambda: len(_children_of(harness.pid)) >= 3, 60, "writer and readers start")
        roles = _children_of(harness.pid)
        [rundir] = list(clean_run.iterdir())
        shm = set(SHM_DIR.glob(shm_prefix(str(rundir)) + "*"))
        assert shm or iceoryx2_peer.MISSING, "iceoryx2 creates its segments before 'ready'"
        harness.kill()
        harness.wait()
        _poll(lambda: not any(_running(p) for p in roles), 30, "the orphaned roles die")
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
    assert rundir.exists(), "a SIGKILLed harness cannot clean up after itself"
    removed = set(sweep_stale())
    assert {str(rundir)} | {str(p) for p in shm} <= removed
    assert not rundir.exists()
    assert not any(p.exists() for p in shm)


def test_reader_notes_are_summed_into_the_run_and_listed(clean_run: Path) -> None:
    """Counters from Reader.notes() become note_* metrics and a Notes line in the report."""
    case = ThroughputCase(3, 64, 40, 8)
    record = run_one(CountingUnix(), case, 0, timeout=60)
    assert record.status == "ok", record.detail
    # 40 timed records after a warm-up of one lap (depth 8), at each of 3 readers.
    assert record.metrics["note_recv_calls"] == 3 * (40 + 8)
    report = Report(
        {},
        {"reps": 1},
        [ImplInfo("counting-unix", "peer", None)],
        [case],
        [record, replace(record, rep=1)],
        {},
    )
    assert "- counting-unix, throughput readers=3 payload=64: recv_calls = 288" in render_markdown(
        report
    )


def test_a_crashing_role_is_reported_with_its_error(clean_run: Path) -> None:
    """An exception inside a role ends the run as an error that quotes it."""
    record = run_one(CrashingImpl(), ThroughputCase(1, 64, 10, 8), 0, timeout=30)
    assert record.status == "error"
    assert "reader0" in record.detail
    assert "Failed to attach since the test said so" in record.detail


# --------------------------------------------------------------------------- run.main end to end


def test_quick_run_writes_consistent_tables_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_run: Path
) -> None:
    """main() runs interleaved repetitions and writes matching Markdown, JSON and SVG."""
    argv = [
        "--quick",
        "--peers",
        "unix-stream,floor,shmd-zc",
        "--readers",
        "1,2",
        "--payloads",
        "64",
        "--reps",
        "2",
        "--records",
        "300",
        "--latency-count",
        "100",
        "--scale-readers",
        "1,2",
        "--scale-impls",
        "floor-shm-eventfd",
        "--out",
        str(tmp_path),
    ]
    assert bench_run.main(argv) == 0
    out = capsys.readouterr()
    markdown = (tmp_path / "results.md").read_text()
    assert out.out.strip() == markdown.strip()
    data = json.loads((tmp_path / "results.json").read_text())

    runs = data["runs"]
    assert {r["status"] for r in runs} == {"ok"}
    # 2 throughput cases x (unix-stream, shm floor, shmd-zc) + 1 kHz latency x 4 impls
    # (unix-stream, both shm floors, the ping-pong; shmd-zc measures no latency) + the
    # ping-pong back-to-back + 2 scale cases x shm floor = 13 pairs, and 4 more with the
    # 1 kHz case pinned (2 CPUs or more); twice.
    pinned = pin_cpus() is not None
    pairs = 13 + (4 if pinned else 0)
    assert len(runs) == 2 * pairs
    assert any("pinned" in r["case_key"] for r in runs) is pinned
    # Interleaved: the first rep of every pair runs before any second rep.
    assert [r["rep"] for r in runs] == [0] * pairs + [1] * pairs
    first = [(r["case_key"], r["impl"]) for r in runs[:pairs]]
    assert first == [(r["case_key"], r["impl"]) for r in runs[pairs:]]
    assert first[:2] == [
        ("throughput readers=1 payload=64", "unix-stream"),
        ("throughput readers=1 payload=64", "floor-shm-eventfd"),
    ]

    # The summary medians are the medians of the runs.
    summary = {(s["case"], s["impl"], s["metric"]): s for s in data["summary"]}
    key = ("throughput readers=2 payload=64", "unix-stream", "rec_per_s")
    values = sorted(
        r["metrics"]["rec_per_s"] for r in runs if (r["case_key"], r["impl"]) == key[:2]
    )
    assert summary[key]["median"] == pytest.approx(sum(values) / 2)
    assert summary[key]["low"] == values[0] and summary[key]["high"] == values[1]
    # ... and the table shows them.
    assert f"{si(summary[key]['median'])} ({si(values[0])}-{si(values[1])})" in markdown

    skipped = {i["name"]: i["skipped"] for i in data["impls"]}
    assert skipped["unix-stream"] is None
    assert skipped["shmd-zc"] is None
    assert "| shmd-zc / best peer |" in markdown
    assert "## Latency" in markdown and "## Scale" in markdown
    assert "| p99.9 (µs) |" in markdown

    svg = ET.parse(tmp_path / "scale.svg").getroot()
    lines = svg.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2  # one series (the shm floor) in each of the two charts
    assert all(len(line.get("points", "").split()) == 2 for line in lines)


def test_the_documented_command_runs_from_the_checkout(tmp_path: Path) -> None:
    """``python -m benchmarks.run`` from the checkout measures and writes its results."""
    # The cheapest real run: the eventfd ping-pong floor (no optional packages), latency
    # only, 50 records, one repetition; a few seconds.  --timeout makes the benchmark kill
    # a stuck run itself (its children die with it) well before subprocess.run would.
    peer = "floor-eventfd-pingpong"
    argv = [
        "--quick",
        "--only",
        "latency",
        "--peers",
        peer,
        "--latency-count",
        "50",
        "--reps",
        "1",
        "--timeout",
        "30",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert peer in done.stdout and "Latency" in done.stdout, done.stdout
    report = (tmp_path / "results.md").read_text()
    assert "## Latency" in report and peer in report, report
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [(i["name"], i["kind"], i["skipped"]) for i in doc["impls"]] == [(peer, "floor", None)]
    cases = doc["cases"]
    # --latency-count records are measured, after a warm-up of 50 more.
    assert {(c["kind"], c["count"] - c["warmup"], c["warmup"]) for c in cases} == {
        ("LatencyCase", 50, 50)
    }, cases
    assert 0 in {c["rate_hz"] for c in cases}, "no back-to-back ping-pong case"
    runs = {r["case_key"]: r for r in doc["runs"]}
    assert len(doc["runs"]) == len(runs) == len(cases), doc["runs"]
    for case in cases:
        r = runs[case["key"]]
        assert (r["impl"], r["status"]) == (peer, "ok"), r
        assert 0 < r["metrics"]["p50_ns"] <= r["metrics"]["max_ns"], r["metrics"]


def test_an_invalid_run_is_loud_and_fails_main(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    clean_run: Path,
) -> None:
    """A run with a bad record shows INVALID in the table and on stderr, and main returns 1."""
    monkeypatch.setattr(bench_run, "PEER_MODULES", ((__name__, "faulty", "peer"),))
    argv = [
        "--quick",
        "--peers",
        "faulty-drop",
        "--readers",
        "1",
        "--payloads",
        "64",
        "--reps",
        "1",
        "--records",
        "50",
        "--only",
        "throughput",
        "--out",
        str(tmp_path),
    ]
    assert bench_run.main(argv) == 1
    out = capsys.readouterr()
    assert "**INVALID**" in out.out
    assert "## Failed runs" in out.out
    assert "INVALID: throughput readers=1 payload=64 | faulty-drop | rep 1" in out.err
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in data["runs"]] == ["invalid"]


def test_a_missing_peer_is_skipped_with_its_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    clean_run: Path,
) -> None:
    """An uninstalled package or an absent module is a printed skip, not a failure."""
    monkeypatch.setattr(
        bench_run,
        "PEER_MODULES",
        ((__name__, "test", "peer"), ("benchmarks.peers.not_there", "ghost", "shmd")),
    )
    assert bench_run.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "unavailable" in listing and "skipped: frobnicate is not installed" in listing
    assert "ghost" in listing and "benchmarks/peers/not_there.py does not exist yet" in listing

    argv = [
        "--quick",
        "--peers",
        "unavailable,ghost,floor-eventfd",
        "--reps",
        "1",
        "--latency-count",
        "50",
        "--only",
        "latency",
        "--out",
        str(tmp_path),
    ]
    assert bench_run.main(argv) == 0
    out = capsys.readouterr()
    assert "skip unavailable: frobnicate is not installed" in out.err
    assert "- unavailable: frobnicate is not installed" in out.out
    assert "- ghost: benchmarks/peers/not_there.py does not exist yet" in out.out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--payloads", "8"], "Failed to use payload 8 since every record needs at least 24"),
        (["--peers", "nope"], "Failed to select nope since no implementation is called that"),
        (["--only", "speed"], "Failed to choose parts since speed is not one of"),
        (["--readers", "0"], "needs one or more positive integers"),
    ],
)
def test_usage_mistakes_exit_2_without_a_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong argument prints one explanation and the usage, and main returns 2."""
    assert bench_run.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints the usage with examples and returns 0."""
    assert bench_run.main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out


# --------------------------------------------------------------------------- pure parts


def test_check_names_each_kind_of_damage() -> None:
    """check() accepts an intact record and says what is wrong with a damaged one."""
    record = bytearray(64)
    stamp(record, 7, 56)
    assert check(record, 7, 64) == ""
    assert check(record[:63], 7, 64) == "record 7 has 63 bytes instead of 64"
    assert check(record, 8, 64) == "expected record 8 but got head seq 7, tail seq 7"
    record[56] = 9
    assert check(record, 7, 64) == "expected record 7 but got head seq 7, tail seq 9"


def test_percentile_is_nearest_rank_and_spread_brackets_the_median() -> None:
    """percentile() uses nearest rank; spread() reports median, extremes and quartiles."""
    samples = list(range(1000, 0, -1))
    assert percentile(samples, 50) == 500
    assert percentile(samples, 99.9) == 999
    assert percentile(samples, 100) == 1000
    s = spread([3.0, 1.0, 10.0, 2.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.low <= s.q1 <= s.median <= s.q3 <= s.high
    one = spread([5.0])
    assert (one.median, one.low, one.high, one.q1, one.q3) == (5.0,) * 5


def _report(values: dict[str, list[float]], kinds: dict[str, str]) -> Report:
    case = ThroughputCase(1, 64, 10, 8)
    runs = [
        RunRecord(case.key, impl, rep, "ok", "", {"rec_per_s": v, "writer_cpu_ns": 1e6 / v})
        for impl, vs in values.items()
        for rep, v in enumerate(vs)
    ]
    impls = [ImplInfo(name, cast(Kind, kind), None) for name, kind in kinds.items()]
    return Report({}, {"quick": True, "reps": 2}, impls, [case], runs, {})


def test_ratio_is_shmd_over_the_best_peer_never_a_floor() -> None:
    """The ratio column divides shmd's median by the best peer's, ignoring floors."""
    report = _report(
        {"a": [100, 120], "b": [200, 220], "f": [5000, 5000], "shmd": [300, 330]},
        {"a": "peer", "b": "peer", "f": "floor", "shmd": "shmd"},
    )
    markdown = render_markdown(report)
    rate_row = next(
        line for line in markdown.splitlines() if line.startswith("| 1 reader") and "315" in line
    )
    # shmd 315 / b 210 for records/s (higher is better) ...
    assert rate_row.endswith("| 1.50x vs b |"), rate_row
    cost_rows = [line for line in markdown.splitlines() if line.startswith("| 1 reader")]
    # ... and for CPU per record (lower is better) the best peer is again b: 1e6/315 / (1e6/210).
    assert any(row.endswith("| 0.67x vs b |") for row in cost_rows), cost_rows
    assert "f (floor)" in markdown


@pytest.mark.skipif(pin_cpus() is None, reason="pinning needs two CPUs")
def test_a_pinned_role_runs_on_its_cpu_only() -> None:
    """A role started with a CPU runs pinned to it (a forked child runs the real entry point)."""
    cpus = pin_cpus()
    assert cpus is not None
    parent_end, child_end = multiprocessing.Pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _role_main(
                child_end,
                lambda ctl: sorted(os.sched_getaffinity(0)),
                (),
                time.monotonic() + 30,
                os.getppid(),
                cpus[1],
            )
        finally:
            os._exit(0)
    try:
        child_end.close()
        assert parent_end.poll(30)
        assert parent_end.recv() == ("result", [cpus[1]])
    finally:
        os.waitpid(pid, 0)
        parent_end.close()


def test_a_copying_shmd_is_compared_with_copying_peers_only() -> None:
    """A copying shmd's ratio ignores zero-copy peers; a zero-copy shmd's counts them."""
    case = ThroughputCase(1, 1 << 20, 10, 8)
    values = {"cp": 100.0, "zc": 1000.0, "shmd": 150.0, "shmd-zc": 1200.0}
    runs = [
        RunRecord(case.key, impl, 0, "ok", "", {"rec_per_s": v, "writer_cpu_ns": 1e6 / v})
        for impl, v in values.items()
    ]
    impls = [
        ImplInfo("cp", "peer", None),
        ImplInfo("zc", "peer", None, zero_copy=True),
        ImplInfo("shmd", "shmd", None),
        ImplInfo("shmd-zc", "shmd", None, zero_copy=True),
    ]
    markdown = render_markdown(Report({}, {"quick": True, "reps": 1}, impls, [case], runs, {}))
    rate_row = next(line for line in markdown.splitlines() if line.startswith("| 1 reader"))
    assert rate_row.endswith("| 1.50x vs cp | 1.20x vs zc |"), rate_row


def test_an_invalid_repetition_hides_the_cells_numbers() -> None:
    """One invalid repetition turns the whole cell into INVALID and lists the run."""
    report = _report({"a": [100, 120]}, {"a": "peer"})
    case = report.cases[0]
    report.runs.append(RunRecord(case.key, "a", 2, "invalid", "reader 0: expected record 3", {}))
    markdown = render_markdown(report)
    assert "| 1 reader, 64 B | **INVALID** |" in markdown
    assert (
        "- **INVALID** throughput readers=1 payload=64 | a | rep 3: reader 0: expected" in markdown
    )


def test_svg_chart_draws_each_series_and_survives_no_data() -> None:
    """render_svg() is well-formed SVG with one polyline per non-empty series."""
    chart = Chart(
        "t <&>",
        "readers",
        "records/s",
        {"shmd": [(1, 100.0), (2, 90.0), (64, 10.0)], "floor": [(1, 200.0)], "empty": []},
    )
    root = ET.fromstring(render_svg([chart, Chart("nothing", "x", "y", {})]))
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f".//{ns}polyline")
    assert [len(line.get("points", "").split()) for line in lines] == [3, 1]
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "t <&>" in texts and "no data" in texts and "64" in texts


def test_default_sizes_stay_within_their_bounds() -> None:
    """Record counts and queue depths are clamped for tiny and huge payloads."""
    assert default_records(64, quick=True) == 20_000
    assert default_records(MIB, quick=True) == 100
    assert default_records(MIB, quick=False) == 20 * 8  # 20 laps of the 8-record ring
    assert default_records(64, quick=False) == 20 * 1024
    assert queue_depth(64) == 1024 and queue_depth(MIB) == 8


def test_metric_formatting_is_compact() -> None:
    """Cells print three significant digits with k/M suffixes."""
    assert [si(x) for x in (999.0, 1234.0, 2.5e6)] == ["999", "1.23k", "2.5M"]
    assert Metric("x", "x", True, si).fmt(12345.0) == "12.3k"


# --------------------------------------------------------------------------- steady state


_EVERY_IMPL: list[Any] = [*ALL_IMPLS, *shmd_peer.IMPLS]
THROUGHPUT_IMPLS = [i for i in _EVERY_IMPL if i.supports(ThroughputCase(1, 64, 10, 8)) is None]


@pytest.mark.parametrize("impl", THROUGHPUT_IMPLS, ids=lambda i: i.name)
def test_every_impl_gets_the_same_warm_up_and_only_the_timed_part_is_timed(
    impl: Any, clean_run: Path
) -> None:
    """Every impl's readers check one ring lap of warm-up; the numbers cover only what follows."""
    skip_if_unavailable(impl)
    case = ThroughputCase(2, 64, 30, 8)
    if impl.supports(case):  # spinning readers: only as many as the CPUs allow
        case = replace(case, readers=1)
    result: CaseResult = impl.run(case, 60)
    assert validate(case, result) == ""
    w = result.writer
    # The same warm-up for everyone: exactly one lap of the 8-record ring (no warm-up
    # seconds in this case), then at least the 30 timed records.
    assert w.warmup_records == 8
    timed = w.records - w.warmup_records
    assert timed >= 30
    for r in result.readers:
        # Every reader saw every record, warm-up included, and agrees with the writer
        # where the timed part starts (record 8, carrying the writer's stamp t_start).
        assert (r.records, r.warmup_records, r.steady_stamp_ns) == (w.records, 8, w.t_start_ns)
        assert w.t_start_ns <= r.t_first_ns <= r.t_last_ns
    m = metrics_for(case, result)
    assert (m["warmup_records"], m["timed_records"]) == (8, timed)
    slowest = max(r.t_last_ns - r.t_first_ns for r in result.readers)
    assert m["rec_per_s"] == pytest.approx(timed / (slowest / 1e9))
    assert m["timed_s"] == pytest.approx(slowest / 1e9)


def test_a_reader_that_disagrees_where_the_timed_part_starts_makes_the_run_invalid() -> None:
    """validate() rejects a run whose reader saw the warm-up end elsewhere than the writer."""
    case = ThroughputCase(1, 64, 10, 8)
    writer = WriterStats(18, 1000, 2000, 5, 1, warmup_records=8, calls=10)

    def reader(warmup: int, stamp: int) -> ReaderStats:
        return ReaderStats(0, True, "", 18, 18 * 64, 1500, 1900, 5, 1, [], {}, warmup, stamp)

    assert validate(case, CaseResult(writer, [reader(8, 1000)])) == ""
    assert "reader 0 saw the timed part start at record 7" in validate(
        case, CaseResult(writer, [reader(7, 1000)])
    )
    assert "(stamp 999)" in validate(case, CaseResult(writer, [reader(8, 999)]))
    short = replace(writer, warmup_records=7, records=17)
    assert "fewer than the case's 8 and 10" in validate(
        case, CaseResult(short, [replace(reader(7, 1000), records=17)])
    )


def test_full_mode_cases_run_for_seconds_and_laps_after_a_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full mode asks every throughput case for --seconds and 20 laps after 0.3 s of warm-up."""
    args = bench_run.build_parser().parse_args(["--seconds", "3", "--only", "throughput"])
    cases, _, config = bench_run._plan(args, [])
    full = [c for c in cases if isinstance(c, ThroughputCase)]
    assert len(full) == len(cases) == 6
    assert {(c.seconds, c.warmup_s) for c in full} == {(3.0, 0.3)}
    assert all(c.records == 20 * c.depth for c in full)
    quick = bench_run.build_parser().parse_args(["--quick", "--only", "throughput"])
    qcases, _, qconfig = bench_run._plan(quick, [])
    assert {(c.seconds, c.warmup_s) for c in qcases if isinstance(c, ThroughputCase)} == {
        (0.0, 0.0)
    }
    report = Report({}, {**qconfig, "reps": 1}, [], qcases, [], {})
    assert "Mode: **QUICK**" in render_markdown(report)
    assert "Mode: **FULL**" in render_markdown(replace(report, config={**config, "reps": 1}))


@dataclass(frozen=True)
class CountedWriterStats(WriterStats):
    """WriterStats plus how often the writer called each publishing method."""

    counts: dict[str, int] = field(default_factory=dict)


PUBLISHING = ("publish", "publish_batch", "reserve", "reserve_batch")


def counting_writer_role(ctl: Any, chan: Any, case: Case, variant: Any) -> WriterStats:
    """shmd_peer.writer_role with every publishing method of its Publisher counted."""
    counts = dict.fromkeys(PUBLISHING, 0)
    real_create = Publisher.create

    def create(*args: Any, **kwargs: Any) -> Any:
        pub = real_create(*args, **kwargs)
        for name in PUBLISHING:
            inner = getattr(pub, name)

            def counted(*a: Any, _inner: Any = inner, _name: str = name, **k: Any) -> Any:
                counts[_name] += 1
                return _inner(*a, **k)

            setattr(pub, name, counted)
        return pub

    # This runs in the spawned writer process only.
    Publisher.create = create  # type: ignore[method-assign]
    stats = shmd_peer.writer_role(ctl, chan, case, variant)
    return CountedWriterStats(
        **{k: getattr(stats, k) for k in WriterStats.__dataclass_fields__}, counts=counts
    )


class CountingShmd(shmd_peer.ShmdImpl):
    """A shmd variant whose writer counts its publishing calls."""

    writer_target = staticmethod(counting_writer_role)


@pytest.mark.parametrize("payload", [64, 4096], ids=["64B", "4KiB"])
def test_the_shmd_writer_publishes_one_record_per_call_and_the_batch_one_does_not(
    payload: int, clean_run: Path
) -> None:
    """shmd calls publish() once per record (as the peers send); shmd-batch batches."""
    case = ThroughputCase(1, payload, 300, 16)
    one = CountingShmd("record").run(case, 60)
    assert validate(case, one) == ""
    counts = cast(Any, one.writer).counts
    assert counts == {
        "publish": one.writer.records,
        "publish_batch": 0,
        "reserve": 0,
        "reserve_batch": 0,
    }
    assert metrics_for(case, one)["records_per_call"] == 1

    batched = CountingShmd("batch").run(case, 60)
    assert validate(case, batched) == ""
    counts = cast(Any, batched.writer).counts
    method = "publish_batch" if payload < shmd_peer.RESERVE_FROM else "reserve_batch"
    assert counts["publish"] == counts["reserve"] == 0
    # Batches of half the 16-slot ring: two for the warm-up (one lap), then the timed
    # 300 records in 37 whole batches and one of the 4 left.
    w = batched.writer
    assert (w.warmup_records, w.records, w.calls) == (16, 316, 38)
    assert counts[method] == 2 + 38
    assert metrics_for(case, batched)["records_per_call"] == pytest.approx(300 / 38)


def test_a_latency_warm_up_must_leave_records_to_measure() -> None:
    """A LatencyCase whose warm-up takes every record is refused with a sentence."""
    with pytest.raises(ValueError, match="warm-up of 10 records leaves none of its 10"):
        LatencyCase(rate_hz=1000, count=10, warmup=10)


def _netns_names() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("pack", [False, True], ids=["per-record", "packed"])
def test_the_bridge_benchmark_quick_mode_measures_both_paths_and_cleans_up(pack: bool) -> None:
    """``python -m benchmarks.bridge --quick`` measures the bridge and plain Zenoh between
    two network namespaces, prints both payloads' ratios, and leaves none of its
    namespaces, processes or segments behind."""
    from benchmarks.netns import unavailable  # noqa: PLC0415 - only where it is tested

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bridge", "--quick", *(["--pack"] if pack else [])],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its daemons share its process group
    )
    out, err = "", ""
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        # The names it made (other jobs on this machine make namespaces and segments too).
        made = re.search(r"namespaces (\S+) (\S+) segments (\S+) (\S+)", err)
        names = made.groups() if made else ()
        leaked = set(names[:2]) & _netns_names()
        for ns in leaked:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert proc.returncode == 0, err
    assert made is not None, err
    assert ("The bridge's sink: packed" in out) == pack, out
    cells = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in out.splitlines()
        if line.startswith("| ") and " B |" in line
    ]
    rows = [c for c in cells if len(c) == 7]
    assert [r[0] for r in rows] == ["64 B", "4096 B"], out
    for row in rows:
        assert float(row[3]) > 0, row  # throughput ratio
        assert all(float(x) > 0 for x in row[6].split(" / ")), row  # latency ratios
    # The CPU table: every process of each path, and a positive total per case.
    cpu = {(c[0], c[1], c[2]): float(c[3]) for c in cells if len(c) == 4}
    for size in ("64 B", "4096 B"):
        for path, procs in (("bridge", 4), ("zenoh", 2)):
            mine = {k: v for k, v in cpu.items() if k[:2] == (size, path)}
            assert len(mine) == procs + 1 and mine[(size, path, "total")] > 0, out
            assert all(v >= 0 for v in mine.values()), out
    # The bridge's latency in two parts: both payloads, each part a positive time.
    parts = [c for c in cells if len(c) == 3]
    assert [p[0] for p in parts] == ["64 B", "4096 B"], out
    assert all(float(x.removesuffix(" µs")) > 0 for p in parts for x in p[1:]), out
    assert "INVALID" not in out
    assert not leaked, leaked
    for segment in names[2:]:
        for path in (f"/dev/shm{segment}", f"/dev/shm{segment}.bridge"):
            assert not os.path.exists(path), path
    done = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, check=False)
    assert done.stdout == b"", "processes of the benchmark outlived it"


def test_the_bridge_receiver_splits_latency_at_the_commit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Given commit times, a case's result has the p50 of sent-to-commit and commit-to-received."""
    from benchmarks.bridge_roles import END, HEADER, TIMED, Collector  # noqa: PLC0415

    c = Collector()
    for i, (sent, committed, received) in enumerate([(0, 100, 130), (1000, 1300, 1310)]):
        c.feed([HEADER.pack(sent, i, TIMED)], received, [committed])
    c.feed([HEADER.pack(2000, 2, END)], 2100, [2050])
    result = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert (result["received"], result["error"]) == (2, None)
    assert (result["p50_us"], result["p99_us"]) == (0.13, 0.31)
    assert (result["to_commit_p50_us"], result["from_commit_p50_us"]) == (0.1, 0.01)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--payloads", "64,big"], "not a list of sizes"),
        (["--payloads", "16"], "24 to 8000 bytes"),
        (["--seconds", "0"], "--seconds must be more than 0"),
    ],
)
def test_bridge_benchmark_usage_mistakes_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong argument to benchmarks.bridge prints one explanation and exits 2."""
    from benchmarks import bridge  # noqa: PLC0415 - only where it is tested

    with pytest.raises(SystemExit) as exit_:
        bridge.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("call", ["publish", "reserve"])
def test_publish_cost_quick_mode_prints_a_positive_cost_per_reader_count_and_cleans_up(
    call: str,
) -> None:
    """``python -m benchmarks.publish_cost --quick`` prints one row of positive ns per
    reader count, for either call, and leaves neither its readers nor its segments behind."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.publish_cost",
            "--quick",
            "--readers",
            "1,2",
            "--call",
            call,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its readers share its process group
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert f"| {call}()" in out, out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if " B |" in line]
    assert [r[0].strip() for r in rows] == ["1", "2"], out
    for row in rows:
        assert float(row[2].split()[0]) > 0, row
    assert not [
        p for p in os.listdir("/dev/shm") if p.startswith(f"shmd-bench-pubcost-{proc.pid}-")
    ]
    done = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, check=False)
    assert done.stdout == b"", "reader processes outlived the benchmark"


@pytest.mark.parametrize("argv", [["--readers", "0"], ["--readers", "x"], ["--payload", "0"]])
def test_publish_cost_usage_mistakes_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong argument to benchmarks.publish_cost prints one line and exits 2."""
    from benchmarks import publish_cost  # noqa: PLC0415 - only where it is tested

    assert publish_cost.main(argv) == 2
    err = capsys.readouterr().err
    assert "--readers" in err and "Traceback" not in err


def test_the_copy_ceiling_builds_warning_free_and_moves_every_record(tmp_path: Path) -> None:
    """benchmarks/copy_ceiling.c compiles with -Wall -Wextra -Werror, runs a short ring and
    prints its rate, and refuses a zero slot count with one line and status 2."""
    exe = tmp_path / "copy_ceiling"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pthread",
            "-o",
            str(exe),
            str(REPO / "benchmarks" / "copy_ceiling.c"),
        ],
        check=True,
    )
    ok = subprocess.run([exe, "4", "100", "4096"], capture_output=True, text=True, check=True)
    assert re.fullmatch(
        r"slots=4 payload=4096 records=100: \d+ records/s \(\S+ us each\)\n", ok.stdout
    )
    bad = subprocess.run([exe, "0"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_a_killed_publish_cost_takes_its_readers_along() -> None:
    """SIGKILLing ``benchmarks.publish_cost`` mid-run kills its reader processes too."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.publish_cost", "--readers", "2", "--reps", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    readers: set[int] = set()
    try:
        _poll(lambda: len(_children_of(proc.pid)) >= 2, 60, "both readers start")
        readers = _children_of(proc.pid)
        proc.kill()
        proc.wait()
        _poll(lambda: not any(_running(p) for p in readers), 30, "the orphaned readers die")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in readers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        # Its segment stays (a SIGKILLed creator cannot unlink); removed by its pid's name.
        for leftover in SHM_DIR.glob(f"shmd-bench-pubcost-{proc.pid}-*"):
            leftover.unlink()
