"""Comparative benchmark framework: cases, process orchestration, statistics, tables, plot.

The question the benchmark answers: for one producer and many local consumers on this
machine, how does shmd compare with what a Python user would otherwise pick (ZeroMQ,
iceoryx2, AF_UNIX sockets, ``multiprocessing.Queue``), and how far is everything from the
floor (what eventfd and shared memory cost on their own)?

Terms
-----
*impl*
    One column of the result tables: a peer (``kind="peer"``), a floor (``kind="floor"``,
    never counted as the best peer) or shmd (``kind="shmd"``). An impl satisfies the
    :class:`Impl` protocol below.
*case*
    One cell row: :class:`ThroughputCase` (N readers, fixed payload; a warm-up of one
    ring lap and ``warmup_s``, not timed, then a timed part of at least ``records``
    records and ``seconds``; the ``series`` is ``"throughput"`` for the main table or
    ``"scale"`` for the readers 1..64 series that is plotted) or :class:`LatencyCase`
    (one reader, 64 B records paced at ``rate_hz``; ``rate_hz == 0`` means back-to-back
    ping-pong, for floors).
*run*
    One impl executing one case once, in fresh processes started by :func:`run_roles`.
    Repetitions are interleaved: rep 0 runs case 1 on A, B, C, then case 2 on A, B, C ...;
    rep 1 starts over. Tables report medians and the min-max spread over repetitions.

Record format (:func:`stamp` / :func:`check`)
---------------------------------------------
Every record is exactly ``case.payload`` bytes: ``<seq u64><send time u64>`` at the
start and ``<seq u64>`` again in the last eight bytes (little endian; the send time is
CLOCK_MONOTONIC ns taken right before the send call). Every reader checks every record's
length, head seq and tail seq against the count it expects, so a dropped, duplicated,
reordered, truncated or torn record makes the run *invalid*: it is reported loudly, its
numbers are never used, and ``benchmarks.run.main`` returns 1.

In throughput runs the send time's bit 62 (:data:`STEADY`) marks the first timed
record and bit 63 (:data:`LAST`) the last record of the run (a CLOCK_MONOTONIC stamp
never reaches them): readers stop at LAST and time from the arrival of STEADY, and a
reader that saw the timed part start elsewhere than the writer makes the run invalid.

Process model
-------------
Every process is a ``multiprocessing`` *spawn* child (same for every impl; spawn because
``multiprocessing.Queue`` can only be handed to children that way). Control travels over
one pipe per child, never over sleeps::

    parent                     writer role                  reader role (xN)
    start writer  ──────────►  open transport, ctl.bound()
    wait "bound"
    start readers ─────────────────────────────────────────► connect, ctl.ready()
                               wait_readers(); ctl.ready()
    wait all "ready"
    send "go"     ──────────►  ctl.wait_go(); send records   receive + check records
                               ctl.sent(); ctl.wait_close()  return ReaderStats
    wait "sent" + reader results
    send "close"  ──────────►  measure CPU, close, return WriterStats
    join every child by pid; on any failure, timeout or Ctrl-C kill and join every child
    started so far, then the impl's cleanup() removes sockets, segments and files.

Children ask the kernel for SIGKILL when the harness dies (PR_SET_PDEATHSIG), and the next
``benchmarks.run`` removes the run directories and segments of harnesses that are gone
(:func:`sweep_stale`).

The writer's CPU time is taken when every reader has finished, so background threads
(ZeroMQ's I/O thread, the ``multiprocessing.Queue`` feeder) are charged to the writer.

Adding an impl (the shmd adapter contract)
------------------------------------------
Adding shmd is one file: ``benchmarks/peers/shmd_peer.py`` (``benchmarks.run`` already
lists that module in ``PEER_MODULES`` and prints a skip line while it does not exist).
The module must:

1. import cleanly without optional dependencies and expose ``IMPLS: list[Impl]``;
2. give its impl ``name = "shmd"`` and ``kind = "shmd"`` (the ``shmd / best peer`` ratio
   columns are computed for every ``kind == "shmd"`` impl against the best ``"peer"``);
3. be picklable (a module-level class; instances travel to the spawned children).

The easy way is to subclass :class:`StreamImpl` and provide only the transport:

``prepare(case, workdir) -> channel``  (parent, before any process starts)
    Create whatever the roles share and return it; it is pickled into every child, so
    use plain data, :class:`PassFd` for file descriptors and paths under ``workdir``
    (a fresh private directory removed after the run). Name shared memory segments
    ``/dev/shm/<shm_prefix(workdir)>...`` so that :func:`sweep_stale` can remove them
    should the whole harness be SIGKILLed. Size per-reader buffering to ``case.depth``
    records, as every peer does.
``cleanup(channel)``  (parent, always, even after a crash or timeout)
    Remove what ``prepare`` or the (possibly SIGKILLed) children created: shm segments,
    socket paths, fds.
``open_writer(channel, case) -> Writer``  (writer process)
    ``wait_readers(deadline)`` returns once ``case.readers`` readers are attached (raise
    ``RuntimeError("Failed to ... since ...")`` at the ``time.monotonic()`` deadline);
    ``send(record)`` publishes one record (a ``bytearray`` that is reused for the next
    record, so copy it or publish synchronously) and must never drop it — block when a
    reader is behind; ``close()``.
``open_reader(channel, case, index) -> Reader``  (reader process ``index``)
    ``recv()`` blocks until the next record and returns it as a bytes-like object that
    stays valid until the next ``recv()``; ``close()``.
``supports(case) -> str | None``
    ``None`` or the reason a case does not apply (shown as ``n/a``).

The scale series (readers 1, 2, 4, ..., 64; records/s per reader and publish cost) runs for
the impls named by ``--scale-impls`` (default ``shmd,floor-shm-eventfd``) and is plotted
into ``scale.svg``. An impl that needs full control (its own roles, e.g. a daemon) can
implement :class:`Impl` directly and use :func:`run_roles` with its own role functions;
see ``benchmarks/peers/floor.py`` (the ping-pong floor) for an example.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import statistics
import struct
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import reduction
from pathlib import Path
from typing import Any, Literal, Protocol
from xml.sax.saxutils import escape

Kind = Literal["peer", "floor", "shmd"]
Series = Literal["throughput", "scale"]
Status = Literal["ok", "invalid", "error"]
Buffer = bytes | bytearray | memoryview

HEAD = struct.Struct("<QQ")
TAIL = struct.Struct("<Q")
MIN_PAYLOAD = HEAD.size + TAIL.size

KIB = 1024
MIB = 1024 * KIB


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class ThroughputCase:
    """N readers each receive every record of ``payload`` bytes: a warm-up, then the timed part.

    The warm-up (not timed, every record checked as usual) is at least one ring lap
    (``depth`` records) and at least ``warmup_s`` seconds; the timed part is at least
    ``records`` records and at least ``seconds`` seconds. The writer decides where each
    ends by the same rule for every impl and marks the records (:data:`STEADY`, :data:`LAST`).
    """

    readers: int
    payload: int
    #: Timed records at least (full mode: 20 ring laps).
    records: int
    depth: int
    series: Series = "throughput"
    #: Timed seconds at least (0: ``records`` alone decides; quick mode).
    seconds: float = 0.0
    #: Warm-up seconds at least, besides the one ring lap.
    warmup_s: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.series} readers={self.readers} payload={self.payload}"

    @property
    def label(self) -> str:
        return f"{self.readers} reader{'s' if self.readers > 1 else ''}, {fmt_size(self.payload)}"


@dataclass(frozen=True)
class LatencyCase:
    """One reader; ``count`` records of ``payload`` bytes sent at ``rate_hz`` (0: ping-pong).

    The first ``warmup`` of them are the warm-up, the same for every implementation:
    sent, received and checked like the rest, their latency not counted.
    """

    rate_hz: int
    count: int
    payload: int = 64
    depth: int = 1024
    readers: int = 1
    #: Writer and reader each pinned to a CPU of their own (sched_setaffinity),
    #: as on a machine with cores to spare; otherwise the scheduler places them.
    pinned: bool = False
    warmup: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup < self.count:
            raise ValueError(
                f"Failed to plan a latency case since its warm-up of {self.warmup} records "
                f"leaves none of its {self.count} to measure"
            )

    @property
    def key(self) -> str:
        pin = " pinned" if self.pinned else ""
        return f"latency rate={self.rate_hz} payload={self.payload}{pin}"

    @property
    def label(self) -> str:
        pace = "back-to-back ping-pong" if self.rate_hz == 0 else f"{self.rate_hz} records/s"
        pin = ", writer and reader pinned to separate CPUs" if self.pinned else ""
        return f"one-way latency, {pace}, {fmt_size(self.payload)}, 1 reader{pin}"


Case = ThroughputCase | LatencyCase


def queue_depth(payload: int) -> int:
    """Records every transport may buffer per reader: 8 MiB worth, clamped to 8..1024."""
    return max(8, min(1024, (8 * MIB) // payload))


def default_records(payload: int, quick: bool) -> int:
    """Timed records per throughput run at least.

    Quick mode (it only proves the benchmark works): a byte budget per reader of 64 MiB,
    clamped to 100-20,000 records. Full mode: 20 ring laps (``20 * queue_depth``), and
    the run goes on until its duration target (``--seconds``) too.
    """
    if quick:
        return max(100, min(20_000, (64 * MIB) // payload))
    return FULL_LAPS * queue_depth(payload)


#: Full mode: the timed part is at least this many ring laps ...
FULL_LAPS = 20
#: ... and at least this many seconds (``--seconds``),
FULL_SECONDS = 2.0
#: after a warm-up of one ring lap and at least this many seconds.
FULL_WARMUP_S = 0.3

#: Flags in the send-time field of a throughput record (CLOCK_MONOTONIC ns stays far below
#: 2^62): the first timed record (the warm-up is over) and the last record of the run.
STEADY = 1 << 62
LAST = 1 << 63
TIME_MASK = STEADY - 1


def steady_plan(case: ThroughputCase) -> tuple[int, int, int, int]:
    """(warm-up records, warm-up ns, timed records, timed ns): each part's minimums."""
    return (
        max(1, case.depth),
        int(case.warmup_s * 1e9),
        max(1, case.records),
        int(case.seconds * 1e9),
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class WriterStats:
    """What the writer role measured (times are CLOCK_MONOTONIC ns).

    Throughput runs: ``records`` counts every record sent, warm-up included; the first
    ``warmup_records`` were the warm-up; ``t_start_ns`` is the send stamp of the first
    timed record, and ``cpu_ns`` and ``calls`` (publish/send calls) cover the timed part.
    """

    records: int
    t_start_ns: int
    t_end_ns: int
    cpu_ns: int
    peak_rss_kib: int
    warmup_records: int = 0
    calls: int = 0


@dataclass(frozen=True)
class ReaderStats:
    """What one reader role measured; ``ok`` is False on the first bad record."""

    index: int
    ok: bool
    error: str
    records: int
    bytes: int
    t_first_ns: int
    t_last_ns: int
    cpu_ns: int
    peak_rss_kib: int
    latencies_ns: list[int] = field(default_factory=list)
    # Counters a transport wants in the report (Reader.notes()), e.g. missed wake-ups.
    notes: dict[str, int] = field(default_factory=dict)
    # Throughput runs: records before the first timed one (the warm-up as this reader saw
    # it) and that record's send stamp; t_first_ns is when it arrived, t_last_ns when the
    # last did, and cpu_ns is counted from its arrival.
    warmup_records: int = 0
    steady_stamp_ns: int = 0


@dataclass(frozen=True)
class CaseResult:
    """One run's raw outcome."""

    writer: WriterStats
    readers: list[ReaderStats]


class CaseFailed(Exception):
    """A run could not complete (crash, timeout, protocol error); message says why."""


# --------------------------------------------------------------------------- impl protocol


class Impl(Protocol):
    """One column of the tables; see the module docstring for the contract."""

    name: str
    kind: Kind

    def available(self) -> str | None:
        """None if usable here, else why not (printed as a skip line)."""
        ...

    def supports(self, case: Case) -> str | None:
        """None if the case applies, else why not (shown as n/a)."""
        ...

    def run(self, case: Case, timeout: float) -> CaseResult:
        """Run the case once in fresh processes; raise CaseFailed when it cannot finish."""
        ...


class Writer(Protocol):
    """Writer side of a stream transport, living in the writer process."""

    def wait_readers(self, deadline: float) -> None: ...

    def send(self, record: bytearray) -> None: ...

    def close(self) -> None: ...


class Reader(Protocol):
    """Reader side of a stream transport, living in one reader process.

    A reader may also define ``notes() -> dict[str, int]``: counters (e.g. wake-ups its
    transport missed) that are summed over readers and listed under "Notes".
    """

    def recv(self) -> Buffer: ...

    def close(self) -> None: ...


class StreamImpl(ABC):
    """An impl defined by its transport; the harness owns the measuring loops."""

    name: str = ""
    kind: Kind = "peer"

    def available(self) -> str | None:
        return None

    def supports(self, case: Case) -> str | None:
        if isinstance(case, LatencyCase) and case.rate_hz == 0:
            return "back-to-back latency is measured for ping-pong floors only"
        return None

    def prepare(self, case: Case, workdir: str) -> Any:
        """Parent side: create what the roles share; returns the picklable channel."""
        return None

    def cleanup(self, channel: Any) -> None:  # noqa: B027 - optional hook, empty by default
        """Parent side: remove what prepare() and the children created, even after a crash."""

    @abstractmethod
    def open_writer(self, channel: Any, case: Case) -> Writer: ...

    @abstractmethod
    def open_reader(self, channel: Any, case: Case, index: int) -> Reader: ...

    def run(self, case: Case, timeout: float) -> CaseResult:
        rundir = RunDir()
        try:
            channel = self.prepare(case, rundir.path)
            try:
                readers = [
                    Role(stream_reader_role, (self, channel, case, i)) for i in range(case.readers)
                ]
                return run_roles(Role(stream_writer_role, (self, channel, case)), readers, timeout)
            finally:
                self.cleanup(channel)
        finally:
            rundir.close()


class PassFd:
    """A file descriptor owned by this object that can be handed to a spawned role.

    Pickling only works while multiprocessing is spawning a child: the spawn popen then
    passes the fd through ``pass_fds`` and the child sees the *same number*, so the
    rebuilt object simply owns that number in the child.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __reduce__(self) -> tuple[Callable[[Any], PassFd], tuple[Any]]:
        # reduction.DupFd() during spawning registers the fd with the popen object
        # (popen_spawn_posix.duplicate_for_child) and returns a handle whose detach()
        # yields the same fd number inside the child.
        return (_rebuild_passfd, (reduction.DupFd(self.fd),))


def _rebuild_passfd(handle: Any) -> PassFd:
    return PassFd(int(handle.detach()))


# --------------------------------------------------------------------------- run files

# Every run works in <tmp>/shmd-bench-<random>/ and names its shared memory
# /dev/shm/shmdb<random>* (shm_prefix). While the run lasts, the harness process holds an
# flock on the directory's lock file; the kernel drops it when the process dies, even by
# SIGKILL, so sweep_stale() can tell a killed run's leftovers from a live run's files
# (also across PID namespaces, where a pid check would lie).
SHM_DIR = Path("/dev/shm")
_RUN_DIR_PREFIX = "shmd-bench-"
_LOCK_NAME = "owner.lock"


class RunDir:
    """A private directory for one run, flock-ed by this process until close()."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX)
        self._lock = -1
        try:
            # Locked under a temporary name and renamed into place (same inode, lock
            # kept), so a sweeper never finds an unlocked lock file of a live run.
            tmp = os.path.join(self.path, _LOCK_NAME + ".new")
            self._lock = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            os.rename(tmp, os.path.join(self.path, _LOCK_NAME))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        fd, self._lock = self._lock, -1
        if fd >= 0:
            os.close(fd)


def shm_prefix(workdir: str) -> str:
    """Name prefix for this run's /dev/shm files: ``shmdb<random part of workdir>``."""
    return "shmdb" + os.path.basename(workdir)[len(_RUN_DIR_PREFIX) :]


def sweep_stale() -> list[str]:
    """Remove run directories, and their shm files, whose harness process has died."""
    removed: list[str] = []
    for path in Path(tempfile.gettempdir()).glob(_RUN_DIR_PREFIX + "*"):
        try:
            fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # not a run directory, or one still being set up
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its harness is alive
            for shm in SHM_DIR.glob(glob.escape(shm_prefix(str(path))) + "*"):
                shm.unlink(missing_ok=True)
                removed.append(str(shm))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------- records


def stamp(record: bytearray, seq: int, tail: int) -> None:
    """Write seq + send time at the head and seq at ``tail`` (= len(record) - 8)."""
    HEAD.pack_into(record, 0, seq, time.monotonic_ns())
    TAIL.pack_into(record, tail, seq)


def check(record: Buffer, seq: int, payload: int) -> str:
    """Empty string if ``record`` is record ``seq`` intact, else what is wrong with it."""
    size = len(record)
    if size != payload:
        return f"record {seq} has {size} bytes instead of {payload}"
    head = HEAD.unpack_from(record, 0)[0]
    tail = TAIL.unpack_from(record, payload - TAIL.size)[0]
    if head != seq or tail != seq:
        return f"expected record {seq} but got head seq {head}, tail seq {tail}"
    return ""


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Role:
    """A module-level function run in a fresh process as ``target(ctl, *args)``."""

    target: Callable[..., Any]
    args: tuple[Any, ...]


class RoleControl:
    """The child's end of its control pipe: barrier and handshake messages."""

    def __init__(self, conn: multiprocessing.connection.Connection, deadline: float) -> None:
        self._conn = conn
        self.deadline = deadline
        self.result_sent = False

    def bound(self) -> None:
        """Writer only: the transport exists, readers may start connecting."""
        self._conn.send(("bound", None))

    def ready(self) -> None:
        """Ready to receive (reader) or every reader is attached (writer)."""
        self._conn.send(("ready", None))

    def sent(self) -> None:
        """Writer only: the last record was handed to the transport."""
        self._conn.send(("sent", None))

    def result(self, value: Any) -> None:
        """Send the role's result now (e.g. before closing the transport)."""
        self._conn.send(("result", value))
        self.result_sent = True

    def wait_go(self) -> None:
        """Writer only: block until the parent starts the measurement."""
        self._wait_for("go")

    def wait_close(self) -> None:
        """Writer only: block until every reader has its results."""
        self._wait_for("close")

    def _wait_for(self, word: str) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not self._conn.poll(remaining):
            raise RuntimeError(f"Failed to receive {word!r} since the parent sent nothing in time")
        got = self._conn.recv()
        if got != word:
            raise RuntimeError(f"Failed to receive {word!r} since the parent sent {got!r}")


def vm_hwm_kib() -> int:
    """Peak resident set size of this process (VmHWM), in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this role when the harness process dies."""
    # Without this, a harness killed by SIGKILL (a timeout in a caller) leaves its roles
    # blocked forever in recv(). PR_SET_PDEATHSIG fires when the *thread* that started
    # this process exits: run_roles starts and reaps its children from one thread.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"Failed to set PR_SET_PDEATHSIG since {os.strerror(err)}")
    if os.getppid() != parent:
        # The harness died before prctl() took effect: no signal will come.
        os._exit(1)


def pin_cpus() -> tuple[int, int] | None:
    """(writer CPU, reader CPU) for pinned cases: two CPUs we may run on, or None."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


#: Whether the run in progress pins its roles (set by run_one, read by run_roles).
_pinning = [False]


def _role_main(  # noqa: PLR0917 - multiprocessing passes a target its args positionally
    conn: multiprocessing.connection.Connection,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    deadline: float,
    parent: int,
    cpu: int | None = None,
) -> None:
    """Entry point of every spawned role process."""
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        _die_with_parent(parent)
        ctl = RoleControl(conn, deadline)
        result = target(ctl, *args)
        if not ctl.result_sent:
            conn.send(("result", result))
    except BaseException:  # the parent reports whatever ended the role, Ctrl-C included
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class _Child:
    """One spawned role process and the parent's end of its control pipe."""

    def __init__(
        self,
        ctx: Any,
        label: str,
        role: Role,
        deadline: float,
        cpu: int | None = None,
    ) -> None:
        self.label = label
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_role_main,
            args=(child_conn, role.target, role.args, deadline, os.getpid(), cpu),
            name=f"shmd-bench-{label}",
            daemon=True,
        )
        try:
            self.proc.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child_conn.close()

    def send(self, word: str) -> None:
        self.conn.send(word)

    def reap(self) -> None:
        """Kill the process by pid if it still runs, wait for it and close the pipe."""
        if self.proc.pid is not None:
            if self.proc.exitcode is None:
                self.proc.kill()
            self.proc.join()
            self.proc.close()
        self.conn.close()


def _invalid_already_sent(children: Iterable[_Child]) -> tuple[str, ReaderStats] | None:
    """An invalid ReaderStats some child has already written to its pipe, if any."""
    for child in children:
        try:
            while child.conn.poll():
                kind, payload = child.conn.recv()
                if kind == "result" and isinstance(payload, ReaderStats) and not payload.ok:
                    return child.label, payload
        except EOFError:
            continue
    return None


_NOTHING = object()


def _take(child: _Child, expected: str) -> tuple[str, Any]:
    """(failure, payload) for the child's next message; payload _NOTHING if none is there."""
    if child.conn.poll():
        try:
            kind, payload = child.conn.recv()
        except EOFError:
            child.proc.join()
            return (
                f"Failed to run {child.label} since it exited with code {child.proc.exitcode}"
            ), _NOTHING
        if kind == "error":
            last = str(payload).strip().splitlines()[-1]
            return f"Failed to run {child.label} since it raised {last}\n{payload}", _NOTHING
        if kind != expected:
            return (
                f"Failed to run {child.label} since it sent {kind!r} instead of {expected!r}"
            ), _NOTHING
        return "", payload
    if child.proc.exitcode is not None:
        return (
            f"Failed to run {child.label} since it exited with code "
            f"{child.proc.exitcode} before sending {expected!r}"
        ), _NOTHING
    return "", _NOTHING


def _gather(
    children: Sequence[_Child], expect: Mapping[str, str], deadline: float
) -> dict[str, Any]:
    """Wait until every child sent the message ``expect[label]``; returns label -> payload.

    Stops early at the first invalid ReaderStats (the caller then kills the rest). A
    child that raised, died or stayed silent past the deadline raises CaseFailed, unless
    a reader had already reported a bad record: readers send their verdict before they
    close the transport, so a writer tripping over that close (ECONNRESET, EPIPE) can
    only report after it, and the invalid run is what gets reported.
    """
    pending = {child.label: child for child in children}
    got: dict[str, Any] = {}
    while pending:
        for label, child in list(pending.items()):
            failure, payload = _take(child, expect[label])
            if failure:
                invalid = _invalid_already_sent(c for c in pending.values() if c is not child)
                if invalid is not None:
                    got[invalid[0]] = invalid[1]
                    return got
                raise CaseFailed(failure)
            if payload is not _NOTHING:
                got[label] = payload
                del pending[label]
                if isinstance(payload, ReaderStats) and not payload.ok:
                    return got
        if not pending:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waiting = ", ".join(f"{label} (no {expect[label]!r})" for label in sorted(pending))
            raise CaseFailed(
                f"Failed to finish the run since {waiting} sent nothing before the case timeout"
            )
        waitables: list[Any] = [c.conn for c in pending.values()]
        waitables += [c.proc.sentinel for c in pending.values()]
        multiprocessing.connection.wait(waitables, timeout=remaining)
    return got


def run_roles(writer: Role, readers: Sequence[Role], timeout: float) -> CaseResult:
    """Run one writer and N readers in fresh spawned processes behind a start barrier.

    Roles return WriterStats / ReaderStats. The result of an invalid run holds the readers'
    stats gathered so far and a zeroed writer. Every process started here is killed (if
    still running) and joined by pid before this returns or raises, KeyboardInterrupt
    included.
    """
    ctx = multiprocessing.get_context("spawn")
    deadline = time.monotonic() + timeout
    children: list[_Child] = []
    cpus = pin_cpus() if _pinning[0] else None
    if _pinning[0] and cpus is None:
        raise CaseFailed("Failed to pin the roles since fewer than 2 CPUs are available")
    writer_cpu, reader_cpu = cpus if cpus is not None else (None, None)
    try:
        w = _Child(ctx, "writer", writer, deadline, writer_cpu)
        children.append(w)
        _gather([w], {"writer": "bound"}, deadline)
        for i, role in enumerate(readers):
            children.append(_Child(ctx, f"reader{i}", role, deadline, reader_cpu))
        _gather(children, dict.fromkeys((c.label for c in children), "ready"), deadline)
        w.send("go")
        reader_children = children[1:]
        expect = {c.label: "result" for c in reader_children} | {"writer": "sent"}
        got = _gather(children, expect, deadline)
        stats: list[ReaderStats] = [got[c.label] for c in reader_children if c.label in got]
        if len(stats) < len(reader_children) or not all(s.ok for s in stats):
            return CaseResult(writer=WriterStats(0, 0, 0, 0, 0), readers=stats)
        w.send("close")
        wstats: WriterStats = _gather([w], {"writer": "result"}, deadline)["writer"]
        for child in children:
            child.proc.join(max(0.0, deadline - time.monotonic()))
            if child.proc.exitcode is None:
                raise CaseFailed(f"Failed to stop {child.label} since it outlived the case timeout")
        return CaseResult(writer=wstats, readers=stats)
    finally:
        for child in children:
            child.reap()


# --------------------------------------------------------------------------- stream roles


def stream_writer_role(ctl: RoleControl, impl: StreamImpl, channel: Any, case: Case) -> WriterStats:
    """Writer process of a StreamImpl run."""
    writer = impl.open_writer(channel, case)
    try:
        ctl.bound()
        writer.wait_readers(ctl.deadline)
        ctl.ready()
        ctl.wait_go()
        if isinstance(case, LatencyCase):
            cpu0 = time.process_time_ns()
            t_start, t_end = send_paced(writer.send, case.payload, case.count, case.rate_hz)
            sent = Sent(0, case.count, case.count, t_start, t_end, cpu0)
        else:
            sent = send_steady(writer.send, case)
        ctl.sent()
        # Charge background threads (I/O threads, feeders) until every reader is done.
        ctl.wait_close()
        cpu = time.process_time_ns() - sent.cpu_start
    finally:
        writer.close()
    return sent.stats(cpu)


@dataclass(frozen=True)
class Sent:
    """What a writer loop did: warm-up records, all records, timed calls, timed part."""

    warmup: int
    records: int
    calls: int
    t_start: int
    t_end: int
    #: process_time_ns() when the timed part began.
    cpu_start: int

    def stats(self, cpu_ns: int) -> WriterStats:
        return WriterStats(
            self.records,
            self.t_start,
            self.t_end,
            cpu_ns,
            vm_hwm_kib(),
            self.warmup,
            self.calls,
        )


def send_steady(send: Callable[[bytearray], object], case: ThroughputCase) -> Sent:
    """Every throughput writer's loop: warm-up, then the timed part, one record per send.

    One record buffer, stamped in place right before each send (shmd's per-record writer
    calls it with ``Publisher.publish``). The warm-up ends at the first record after one
    ring lap and ``warmup_s``; that record carries :data:`STEADY` and its stamp is
    ``t_start``. The timed part ends with the first record after ``records`` timed
    records and ``seconds``, which carries :data:`LAST`.
    """
    payload = case.payload
    record = bytearray(payload)
    tail = payload - TAIL.size
    pack_head, pack_tail, now = HEAD.pack_into, TAIL.pack_into, time.monotonic_ns
    warm_n, warm_ns, timed_n, timed_ns = steady_plan(case)
    seq = 0
    warm_end = now() + warm_ns
    while True:
        t = now()
        if seq >= warm_n and t >= warm_end:
            break
        pack_head(record, 0, seq, t)
        pack_tail(record, tail, seq)
        send(record)
        seq += 1
    warmup = seq
    last_from = warmup + timed_n - 1
    cpu0 = time.process_time_ns()
    t = t_start = now()
    end = t_start + timed_ns
    flags = STEADY
    while True:
        if seq >= last_from and t >= end:
            flags |= LAST
        pack_head(record, 0, seq, t | flags)
        pack_tail(record, tail, seq)
        send(record)
        seq += 1
        if flags >= LAST:
            break
        flags = 0
        t = now()
    return Sent(warmup, seq, seq - warmup, t_start, now(), cpu0)


def send_paced(
    send: Callable[[bytearray], object], payload: int, records: int, rate_hz: int
) -> tuple[int, int]:
    """Send ``records`` stamped records at ``rate_hz``: every latency writer's loop.

    One record buffer, stamped in place right before each send, the same for
    every implementation (shmd's writer calls it with ``Publisher.publish``).
    """
    record = bytearray(payload)
    tail = payload - TAIL.size
    pack_head, pack_tail, now = HEAD.pack_into, TAIL.pack_into, time.monotonic_ns
    period = 1e9 / rate_hz
    t_start = now()
    for seq in range(records):
        # Pacing, not synchronisation: this only holds the send rate near rate_hz. The
        # latency sample starts at the stamp below, so a late wake-up here is not counted.
        delay = t_start + seq * period - now()
        if delay > 0:
            time.sleep(delay / 1e9)
        pack_head(record, 0, seq, now())
        pack_tail(record, tail, seq)
        send(record)
    return t_start, now()


def stream_reader_role(
    ctl: RoleControl, impl: StreamImpl, channel: Any, case: Case, index: int
) -> ReaderStats:
    """Reader process of a StreamImpl run: receives and checks every record."""
    reader = impl.open_reader(channel, case, index)
    try:
        ctl.ready()
        cpu0 = time.process_time_ns()
        if isinstance(case, LatencyCase):
            error, records, t_first, t_last, latencies = receive_latency(
                reader.recv, case.count, case.payload
            )
            warmup, steady_stamp = 0, 0
        else:
            error, records, t_first, t_last, warmup, steady_stamp, cpu0 = receive_steady(
                reader.recv, case.payload
            )
            latencies = []
        cpu = time.process_time_ns() - cpu0
        stats = ReaderStats(
            index=index,
            ok=not error,
            error=f"reader {index}: {error}" if error else "",
            records=records,
            bytes=records * case.payload,
            t_first_ns=t_first,
            t_last_ns=t_last,
            cpu_ns=cpu,
            peak_rss_kib=vm_hwm_kib(),
            latencies_ns=latencies,
            notes=dict(getattr(reader, "notes", dict)()),
            warmup_records=warmup,
            steady_stamp_ns=steady_stamp,
        )
        # The verdict goes out before the transport closes (see _gather).
        ctl.result(stats)
    finally:
        reader.close()
    return stats


Received = tuple[str, int, int, int, list[int]]  # error, good records, t_first, t_last, latencies
# error, good records, t_first (timed part), t_last, warm-up records, steady stamp, cpu0
Steady = tuple[str, int, int, int, int, int, int]


def receive_steady(recv: Callable[[], Buffer], payload: int) -> Steady:
    """Receive and check records up to the one marked LAST; the timed part starts at STEADY.

    Warm-up records are checked like any other. Stops at the first bad record.
    """
    unpack_head, unpack_tail, now = HEAD.unpack_from, TAIL.unpack_from, time.monotonic_ns
    cpu_now = time.process_time_ns
    tail = payload - TAIL.size
    seq = t_first = warmup = steady_stamp = 0
    cpu0 = cpu_now()
    while True:
        record = recv()
        if len(record) != payload:
            return check(record, seq, payload), seq, t_first, now(), warmup, steady_stamp, cpu0
        head, sent = unpack_head(record, 0)
        if head != seq or unpack_tail(record, tail)[0] != seq:
            return check(record, seq, payload), seq, t_first, now(), warmup, steady_stamp, cpu0
        seq += 1
        if sent >= STEADY:
            if sent & STEADY:
                t_first, cpu0 = now(), cpu_now()
                warmup, steady_stamp = seq - 1, sent & TIME_MASK
            if sent >= LAST:
                return "", seq, t_first, now(), warmup, steady_stamp, cpu0


def receive_latency(recv: Callable[[], Buffer], records: int, payload: int) -> Received:
    """Receive and check ``records`` records; one-way latency = receive time - send stamp."""
    unpack_head, unpack_tail, now = HEAD.unpack_from, TAIL.unpack_from, time.monotonic_ns
    tail = payload - TAIL.size
    latencies = [0] * records
    t_first = 0
    for seq in range(records):
        record = recv()
        t = now()
        if seq == 0:
            t_first = t
        if len(record) != payload or unpack_tail(record, tail)[0] != seq:
            return check(record, seq, payload), seq, t_first, t, latencies[:seq]
        head_seq, sent = unpack_head(record, 0)
        if head_seq != seq:
            return check(record, seq, payload), seq, t_first, t, latencies[:seq]
        latencies[seq] = t - sent
    return "", records, t_first, now(), latencies


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """One number a run yields, how to print it and which direction is better."""

    key: str
    title: str
    higher_is_better: bool
    fmt: Callable[[float], str]


def si(value: float) -> str:
    """Three significant digits with a k/M/G suffix."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_size(size: int) -> str:
    """64 -> '64 B', 4096 -> '4 KiB', 1048576 -> '1 MiB'."""
    for factor, unit in ((MIB, "MiB"), (KIB, "KiB")):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def num(value: float) -> str:
    """Three significant digits without exponent notation: 0.123, 12.3, 1234."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _us(ns: float) -> str:
    return num(ns / 1000)


THROUGHPUT_METRICS = (
    Metric("rec_per_s", "Records/s per reader (slowest reader)", True, si),
    Metric("mib_per_s", "MiB/s per reader (slowest reader)", True, num),
    Metric("writer_cpu_ns", "Publish cost: writer CPU ns per record", False, si),
    Metric("writer_wall_ns", "Writer wall ns per send (includes waiting for readers)", False, si),
    Metric("reader_cpu_ns", "Reader CPU ns per record (median reader)", False, si),
    Metric("writer_rss_mib", "Writer peak RSS (MiB)", False, num),
    Metric("reader_rss_mib", "Reader peak RSS (MiB, largest reader)", False, num),
)
LATENCY_METRICS = (
    Metric("p50_ns", "p50 (µs)", False, _us),
    Metric("p99_ns", "p99 (µs)", False, _us),
    Metric("p999_ns", "p99.9 (µs)", False, _us),
    Metric("max_ns", "max (µs)", False, _us),
)
SCALE_METRICS = (THROUGHPUT_METRICS[0], THROUGHPUT_METRICS[2])


def percentile(samples: Sequence[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    ordered = sorted(samples)
    # round(): 99.9 / 100 * 1000 is 999.0000000000001 in binary floating point.
    rank = max(1, math.ceil(round(q / 100 * len(ordered), 6)))
    return float(ordered[rank - 1])


def validate(case: Case, result: CaseResult) -> str:
    """Empty if every reader got every record intact, else what went wrong."""
    problems = [r.error for r in result.readers if not r.ok]
    if problems:
        return "; ".join(problems)
    w = result.writer
    expected = case.count if isinstance(case, LatencyCase) else w.records
    if len(result.readers) != case.readers:
        return f"{len(result.readers)} of {case.readers} readers reported"
    short = [r for r in result.readers if r.records != expected]
    if short:
        return f"reader {short[0].index} got {short[0].records} of {expected} records"
    if isinstance(case, ThroughputCase):
        warm_n, _, timed_n, _ = steady_plan(case)
        if w.warmup_records < warm_n or w.records - w.warmup_records < timed_n:
            return (
                f"the writer sent {w.warmup_records} warm-up and "
                f"{w.records - w.warmup_records} timed records, fewer than the case's "
                f"{warm_n} and {timed_n}"
            )
        for r in result.readers:
            if (r.warmup_records, r.steady_stamp_ns) != (w.warmup_records, w.t_start_ns):
                return (
                    f"reader {r.index} saw the timed part start at record {r.warmup_records} "
                    f"(stamp {r.steady_stamp_ns}), the writer at {w.warmup_records} "
                    f"(stamp {w.t_start_ns})"
                )
    return ""


def metrics_for(case: Case, result: CaseResult) -> dict[str, float]:
    """Numbers of one valid run."""
    w, readers = result.writer, result.readers
    rss = {
        "writer_rss_mib": w.peak_rss_kib / KIB,
        "reader_rss_mib": max(r.peak_rss_kib for r in readers) / KIB,
    }
    # Transport counters (Reader.notes), summed over readers.
    rss |= {
        f"note_{k}": float(sum(r.notes.get(k, 0) for r in readers))
        for k in sorted({k for r in readers for k in r.notes})
    }
    if isinstance(case, LatencyCase):
        # The warm-up's samples go: the first records of every implementation.
        samples = [ns for r in readers for ns in r.latencies_ns[case.warmup :]]
        return {
            "p50_ns": percentile(samples, 50),
            "p99_ns": percentile(samples, 99),
            "p999_ns": percentile(samples, 99.9),
            "max_ns": float(max(samples)),
            **rss,
        }
    # Only the timed part counts: from the arrival of the first timed record to the
    # arrival of the last one, at each reader; the run's rate is its slowest reader's.
    timed = w.records - w.warmup_records
    span = max(max(1, r.t_last_ns - r.t_first_ns) for r in readers)
    rate = min(timed / (max(1, r.t_last_ns - r.t_first_ns) / 1e9) for r in readers)
    return {
        "rec_per_s": rate,
        "mib_per_s": rate * case.payload / MIB,
        "writer_cpu_ns": w.cpu_ns / timed,
        "writer_wall_ns": (w.t_end_ns - w.t_start_ns) / timed,
        "reader_cpu_ns": statistics.median(r.cpu_ns for r in readers) / timed,
        "warmup_records": float(w.warmup_records),
        "timed_records": float(timed),
        "timed_s": span / 1e9,
        "records_per_call": timed / w.calls if w.calls else 0.0,
        **rss,
    }


@dataclass(frozen=True)
class Spread:
    """Median and spread of one metric over repetitions."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Spread(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ordered))


# --------------------------------------------------------------------------- running a plan


@dataclass(frozen=True)
class RunRecord:
    """One run's verdict and numbers."""

    case_key: str
    impl: str
    rep: int
    status: Status
    detail: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class ImplInfo:
    name: str
    kind: Kind
    skipped: str | None
    #: Readers take views instead of copies (an impl's optional ``zero_copy``
    #: attribute): a copying shmd is compared only with copying peers.
    zero_copy: bool = False


def run_one(impl: Impl, case: Case, rep: int, timeout: float) -> RunRecord:
    """Run once and judge: ok, invalid (bad records: loud) or error (could not finish)."""
    # Every impl starts its processes through run_roles: it reads the pinning
    # from here, so that no impl has to know about it.
    _pinning[0] = isinstance(case, LatencyCase) and case.pinned
    try:
        result = impl.run(case, timeout)
    except CaseFailed as exc:
        return RunRecord(case.key, impl.name, rep, "error", str(exc), {})
    except Exception as exc:  # one broken impl must not stop the others
        detail = f"Failed to run {impl.name} since {exc!r}\n{traceback.format_exc()}"
        return RunRecord(case.key, impl.name, rep, "error", detail, {})
    finally:
        _pinning[0] = False
    problem = validate(case, result)
    if problem:
        return RunRecord(case.key, impl.name, rep, "invalid", problem, {})
    return RunRecord(case.key, impl.name, rep, "ok", "", metrics_for(case, result))


def applicable(
    plan: Sequence[tuple[Case, Impl]], not_applicable: dict[tuple[str, str], str]
) -> list[tuple[Case, Impl]]:
    """The pairs whose impl supports the case; records the others' reasons."""
    todo: list[tuple[Case, Impl]] = []
    for case, impl in plan:
        reason = impl.supports(case)
        if reason is None:
            todo.append((case, impl))
        else:
            not_applicable[(case.key, impl.name)] = reason
    return todo


def run_plan(
    todo: Sequence[tuple[Case, Impl]],
    reps: int,
    timeout: float,
    runs: list[RunRecord],
    progress: Callable[[str], None],
) -> None:
    """Run every (case, impl) pair ``reps`` times, interleaved, appending to ``runs``.

    Order: for each rep, for each case, every impl in turn (A, B, C, A, B, C, ...).
    ``runs`` keeps what finished if this is interrupted.
    """
    total = reps * len(todo)
    done = 0
    for rep in range(reps):
        for case, impl in todo:
            record = run_one(impl, case, rep, timeout)
            runs.append(record)
            done += 1
            progress(
                f"[{done}/{total}] {case.label} | {impl.name} | rep {rep + 1}: "
                f"{_progress_note(record)}"
            )


def _progress_note(record: RunRecord) -> str:
    if record.status == "invalid":
        return f"INVALID RUN: {record.detail}"
    if record.status == "error":
        return "ERROR: " + record.detail.splitlines()[0]
    m = record.metrics
    if "rec_per_s" in m:
        return (
            f"{si(m['rec_per_s'])} rec/s per reader, writer {si(m['writer_cpu_ns'])} CPU ns/record"
        )
    return f"p50 {_us(m['p50_ns'])} µs, p99 {_us(m['p99_ns'])} µs"


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything one benchmark invocation produced."""

    host: dict[str, Any]
    config: dict[str, Any]
    impls: list[ImplInfo]
    cases: list[Case]
    runs: list[RunRecord]
    not_applicable: dict[tuple[str, str], str]

    def runs_for(self, case_key: str, impl: str) -> list[RunRecord]:
        return [r for r in self.runs if r.case_key == case_key and r.impl == impl]

    def spread_of(self, case_key: str, impl: str, metric: str) -> Spread | None:
        runs = self.runs_for(case_key, impl)
        if not runs or any(r.status == "invalid" for r in runs):
            return None
        values = [r.metrics[metric] for r in runs if r.status == "ok" and metric in r.metrics]
        return spread(values) if values else None

    def summary(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for case in self.cases:
            metrics = LATENCY_METRICS if isinstance(case, LatencyCase) else THROUGHPUT_METRICS
            for impl in self.impls:
                for metric in metrics:
                    s = self.spread_of(case.key, impl.name, metric.key)
                    if s is not None:
                        rows.append(
                            {"case": case.key, "impl": impl.name, "metric": metric.key, **asdict(s)}
                        )
        return rows

    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status != "ok"]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "host": self.host,
            "config": self.config,
            "impls": [asdict(i) for i in self.impls],
            "cases": [{"kind": type(c).__name__, "key": c.key, **asdict(c)} for c in self.cases],
            "runs": [asdict(r) for r in self.runs],
            "not_applicable": [
                {"case": k[0], "impl": k[1], "reason": v} for k, v in self.not_applicable.items()
            ],
            "summary": self.summary(),
        }


def _cell(report: Report, case_key: str, impl: str, metric: Metric) -> str:
    runs = report.runs_for(case_key, impl)
    if not runs:
        return "n/a" if (case_key, impl) in report.not_applicable else "—"
    if any(r.status == "invalid" for r in runs):
        return "**INVALID**"
    if all(r.status != "ok" for r in runs):
        return "**ERROR**"
    s = report.spread_of(case_key, impl, metric.key)
    if s is None:
        return "—"
    text = metric.fmt(s.median)
    if s.n > 1:
        text += f" ({metric.fmt(s.low)}-{metric.fmt(s.high)})"
    failed = sum(r.status != "ok" for r in runs)
    if failed:
        text += f" **[{failed} failed]**"
    return text


def _ratio(report: Report, case_key: str, shmd: str, metric: Metric) -> str:
    mine = report.spread_of(case_key, shmd, metric.key)
    # The rule: a copying reader against the copying peers (at 1 MiB,
    # iceoryx2 copying is its counterpart), a zero-copy one against all.
    copying = not next((i.zero_copy for i in report.impls if i.name == shmd), False)
    peers = [
        (s.median, i.name)
        for i in report.impls
        if i.kind == "peer"
        and not (copying and i.zero_copy)
        and (s := report.spread_of(case_key, i.name, metric.key)) is not None
    ]
    if mine is None or not peers:
        return "—"
    best, best_name = max(peers) if metric.higher_is_better else min(peers)
    if best == 0:
        return "—"
    return f"{mine.median / best:.2f}x vs {best_name}"


def _table(
    report: Report, title: str, rows: Sequence[tuple[str, str, Metric]], first: str = "case"
) -> list[str]:
    """Markdown table: one row per (label, case key, metric), one column per impl."""
    keys = {key for _, key, _ in rows}
    columns = [
        i
        for i in report.impls
        if any(report.runs_for(k, i.name) for k in keys) or (i.kind == "shmd" and not i.skipped)
    ]
    shmds = [i.name for i in report.impls if i.kind == "shmd"] or ["shmd"]
    if not columns:
        return []
    head = [first] + [f"{i.name} ({i.kind})" if i.kind != "peer" else i.name for i in columns]
    head += [f"{s} / best peer" for s in shmds]
    out = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, metric in rows:
        cells = [label] + [_cell(report, key, i.name, metric) for i in columns]
        cells += [_ratio(report, key, s, metric) for s in shmds]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def _notes(report: Report) -> list[tuple[tuple[str, str, str], float]]:
    """Non-zero ``note_*`` metrics, totalled per (case, impl, counter)."""
    totals: dict[tuple[str, str, str], float] = {}
    for r in report.runs:
        for k, v in r.metrics.items():
            if k.startswith("note_") and v:
                key = (r.case_key, r.impl, k[len("note_") :])
                totals[key] = totals.get(key, 0.0) + v
    return sorted(totals.items())


def render_markdown(report: Report) -> str:
    """The human-readable report (also printed to stdout)."""
    host, cfg = report.host, report.config
    lines = [
        "# shmd comparative benchmark",
        "",
        f"Host: {host.get('cpus')} CPUs, Linux {host.get('kernel')}, Python {host.get('python')}; "
        f"load average {host.get('loadavg_start')} at start, {host.get('loadavg_end')} at end.",
        _mode_line(cfg),
        *_variant_lines(report),
        "Cells: median over repetitions (min-max). Ratio columns: shmd median / best peer "
        "median (floors are not peers; a copying shmd is compared with copying peers only, "
        "a zero-copy one with all); above 1 is better for rates, below 1 for costs. "
        "Methodology: docs/PERFORMANCE.md.",
        "",
    ]
    skipped = [i for i in report.impls if i.skipped]
    if skipped:
        lines += ["Skipped:", ""]
        lines += [f"- {i.name}: {i.skipped}" for i in skipped]
        lines.append("")
    throughput = [
        c for c in report.cases if isinstance(c, ThroughputCase) and c.series == "throughput"
    ]
    if throughput:
        lines += ["## Throughput", ""]
        for metric in THROUGHPUT_METRICS:
            direction = "higher" if metric.higher_is_better else "lower"
            lines += _table(
                report,
                f"{metric.title} — {direction} is better",
                [(c.label, c.key, metric) for c in throughput],
            )
    latency = [c for c in report.cases if isinstance(c, LatencyCase)]
    if latency:
        lines += ["## Latency", ""]
        for case in latency:
            lines += _table(
                report,
                f"{case.label} — lower is better",
                [(m.title, case.key, m) for m in LATENCY_METRICS],
                "percentile",
            )
    scale = [c for c in report.cases if isinstance(c, ThroughputCase) and c.series == "scale"]
    if scale:
        lines += ["## Scale (plotted in scale.svg)", ""]
        for metric in SCALE_METRICS:
            direction = "higher" if metric.higher_is_better else "lower"
            lines += _table(
                report,
                f"{metric.title} — {direction} is better",
                [(c.label, c.key, metric) for c in scale],
            )
    return "\n".join(lines + _appendix(report))


def _mode_line(cfg: Mapping[str, Any]) -> str:
    reps = (
        f"{cfg.get('reps')} repetitions interleaved across implementations, "
        "fresh processes per run."
    )
    if cfg.get("quick"):
        return (
            "Mode: **QUICK** (short runs of milliseconds where start-up costs dominate: "
            "they only prove that the benchmark works; do not compare these numbers), " + reps
        )
    return (
        f"Mode: **FULL** (steady state: every throughput run warms up for one ring lap and "
        f"at least {cfg.get('warmup_s', 0):g} s, not timed, then times at least "
        f"{cfg.get('seconds', 0):g} s and at least 20 ring laps), " + reps
    )


def _variant_lines(report: Report) -> list[str]:
    """What the shmd columns are, for the shmd variants in the report."""
    names = {i.name for i in report.impls if i.kind == "shmd" and not i.skipped}
    said = {
        "shmd": "`shmd`: one publish() per record, as every peer sends (the headline)",
        "shmd-batch": "`shmd-batch`: the batched writer (publish_batch / reserve_batch); "
        "no peer batches",
        "shmd-zc": "`shmd-zc`: one reserve() per record, zero-copy readers",
        "shmd-spin": "`shmd-spin`: readers busy-poll (WaitStrategy.spin()), no peer's reader "
        "spins; run only where readers + writer <= the CPUs",
        "shmd-into": "`shmd-into`: readers copy each record into one reused buffer "
        "(read_into), as the unix-seqpacket readers recv_into theirs",
    }
    lines = [said[n] for n in said if n in names]
    return ["shmd columns: " + "; ".join(lines) + "."] if lines else []


def _steady_table(report: Report) -> list[str]:
    """Per throughput case and impl: warm-up records, timed records and seconds (medians)."""
    cases = [c for c in report.cases if isinstance(c, ThroughputCase)]
    impls = [i for i in report.impls if any(report.runs_for(c.key, i.name) for c in cases)]
    if not cases or not impls:
        return []
    out = [
        "## Warm-up and timed part (medians over repetitions)",
        "",
        "Each cell: warm-up records (not timed) + timed records in timed seconds (slowest "
        "reader); the last column: records per publish/send call in the timed part.",
        "",
        "| case | " + " | ".join(i.name for i in impls) + " |",
        "|" + "---|" * (len(impls) + 1),
    ]
    for c in cases:
        cells = [c.label]
        for i in impls:
            w = report.spread_of(c.key, i.name, "warmup_records")
            n = report.spread_of(c.key, i.name, "timed_records")
            t = report.spread_of(c.key, i.name, "timed_s")
            cells.append(
                "—"
                if w is None or n is None or t is None
                else f"{si(w.median)} + {si(n.median)} in {t.median:.2f} s"
            )
        out.append("| " + " | ".join(cells) + " |")
    calls = []
    for i in impls:
        per = [
            s.median
            for c in cases
            if (s := report.spread_of(c.key, i.name, "records_per_call")) is not None
        ]
        if per:
            calls.append(
                f"{i.name} {min(per):g}-{max(per):g}"
                if min(per) != max(per)
                else f"{i.name} {per[0]:g}"
            )
    if calls:
        out += ["", "Records per publish/send call: " + ", ".join(calls) + "."]
    return [*out, ""]


def _appendix(report: Report) -> list[str]:
    """Notes, failed runs and not-applicable reasons, after the tables."""
    lines: list[str] = _steady_table(report)
    notes = _notes(report)
    if notes:
        lines += ["## Notes (transport counters, summed over readers and repetitions)", ""]
        lines += [f"- {impl}, {key}: {name} = {total:g}" for (key, impl, name), total in notes]
        lines.append("")
    failed = report.failed()
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            first = r.detail.strip().splitlines()[0] if r.detail.strip() else ""
            where = f"{r.case_key} | {r.impl} | rep {r.rep + 1}"
            lines.append(f"- **{r.status.upper()}** {where}: {first}")
        lines.append("")
    reasons: dict[str, list[str]] = {}
    for (_, impl), why in report.not_applicable.items():
        if impl not in reasons.setdefault(why, []):
            reasons[why].append(impl)
    if reasons:
        lines += ["## Not applicable (n/a)", ""]
        lines += [f"- {', '.join(impls)}: {why}" for why, impls in reasons.items()]
        lines.append("")
    return lines


# --------------------------------------------------------------------------- SVG plot


@dataclass(frozen=True)
class Chart:
    """One line chart: series name -> (x, y) points."""

    title: str
    x_label: str
    y_label: str
    series: Mapping[str, Sequence[tuple[float, float]]]
    log_x: bool = True
    y_fmt: Callable[[float], str] = si


PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _chart_body(chart: Chart, width: int, height: int) -> list[str]:
    left, right, top, bottom = 80, 170, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" '
        f'font-weight="bold">{escape(chart.title)}</text>'
    ]
    points = {name: sorted(pts) for name, pts in chart.series.items() if pts}
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return out
    xs = sorted({x for pts in points.values() for x, _ in pts})
    log_x = chart.log_x and xs[0] > 0

    def fx(x: float) -> float:
        lo, hi = (math.log2(xs[0]), math.log2(xs[-1])) if log_x else (xs[0], xs[-1])
        v = math.log2(x) if log_x else x
        return left + (plot_w / 2 if hi == lo else (v - lo) / (hi - lo) * plot_w)

    y_max = _nice_ceiling(max(y for pts in points.values() for _, y in pts) * 1.05)

    def fy(y: float) -> float:
        return top + plot_h - y / y_max * plot_h

    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>'
    )
    for i in range(6):
        y = y_max * i / 5
        out.append(
            f'<line x1="{left}" y1="{fy(y):.1f}" x2="{left + plot_w}" y2="{fy(y):.1f}" '
            'stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{fy(y) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{escape(chart.y_fmt(y))}</text>'
        )
    for x in xs:
        out.append(
            f'<text x="{fx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{x:g}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle" '
        f'font-size="12">{escape(chart.x_label)}</text>'
    )
    out.append(
        f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {top + plot_h / 2})">{escape(chart.y_label)}</text>'
    )
    for n, (name, pts) in enumerate(points.items()):
        color = PALETTE[n % len(PALETTE)]
        coords = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
        out.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" '
            f'points="{coords}"><title>{escape(name)}</title></polyline>'
        )
        for x, y in pts:
            out.append(
                f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{color}">'
                f"<title>{escape(name)}: {x:g} → {escape(chart.y_fmt(y))}</title></circle>"
            )
        ly = top + 14 + 18 * n
        out.append(
            f'<line x1="{left + plot_w + 12}" y1="{ly - 4}" x2="{left + plot_w + 32}" '
            f'y2="{ly - 4}" stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + plot_w + 38}" y="{ly}" font-size="12">{escape(name)}</text>')
    return out


def render_svg(charts: Sequence[Chart], width: int = 760, height: int = 360) -> str:
    """A standalone SVG document with the charts stacked vertically."""
    total = height * max(1, len(charts))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" '
        f'viewBox="0 0 {width} {total}" font-family="sans-serif">',
        f'<rect width="{width}" height="{total}" fill="white"/>',
    ]
    for i, chart in enumerate(charts):
        out.append(f'<g transform="translate(0 {i * height})">')
        out += _chart_body(chart, width, height)
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def scale_charts(report: Report) -> list[Chart]:
    """Records/s per reader and publish cost against the number of readers."""
    scale = [c for c in report.cases if isinstance(c, ThroughputCase) and c.series == "scale"]
    charts = []
    for metric, y_label in (
        (SCALE_METRICS[0], "records/s per reader"),
        (SCALE_METRICS[1], "writer CPU ns per record"),
    ):
        series: dict[str, list[tuple[float, float]]] = {}
        for impl in report.impls:
            pts = [
                (float(c.readers), s.median)
                for c in scale
                if (s := report.spread_of(c.key, impl.name, metric.key)) is not None
            ]
            if pts:
                series[impl.name] = pts
        payloads = sorted({c.payload for c in scale})
        size = ", ".join(fmt_size(p) for p in payloads)
        charts.append(
            Chart(f"{metric.title} vs readers ({size} records)", "readers", y_label, series)
        )
    return charts


def unique(items: Iterable[str]) -> list[str]:
    """Items in first-seen order without repeats."""
    return list(dict.fromkeys(items))
