"""Shared test machinery: child processes, line channels, polling with a deadline.

Importable as ``helpers`` from the test modules (pytest puts ``tests/`` on
``sys.path`` for the rootdir conftest).  The scripts next to this file are
child programs run by path with ``sys.executable``.

Nothing here sleeps in place of synchronising: a child says what it did
over a pipe, a wait is a poll(2) with a deadline, and :func:`wait_until`
polls *shared state* until a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shmd._sys.fd import OwnedFd
from shmd.bus.layout import ALL_TOPICS, OFF_MUTEX
from shmd.bus.loop import ReaderLoop
from shmd.bus.publisher import Publisher, ReaderHandle
from shmd.bus.segment import Segment
from shmd.bus.subscriber import RawRecord, Record, Subscriber
from shmd.bus.wait import WaitStrategy

HERE = Path(__file__).resolve().parent
DEV_SHM = Path("/dev/shm")
#: Every segment name a test makes contains this (and a uuid).
NAME_TAG = "shmd-test"
#: The longest any single wait in a test may take before the test fails.
DEADLINE = 20.0


def new_name() -> str:
    """A fresh segment name, unique and recognisable as a test's."""
    return f"/{NAME_TAG}-{uuid.uuid4().hex}"


def in_dev_shm(name: str) -> bool:
    """Whether ``name`` is listed in /dev/shm right now."""
    return name.lstrip("/") in os.listdir(DEV_SHM)


def maps_lines(name: str, pid: int | str = "self") -> list[str]:
    """Lines of /proc/PID/maps that map the shm object ``name``."""
    path = f"/dev/shm/{name.lstrip('/')}"
    with open(f"/proc/{pid}/maps") as f:
        return [line.rstrip("\n") for line in f if path in line]


def is_open(fd: int) -> bool:
    """Whether fd is an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def fd_targets(pid: int | str = "self") -> list[str]:
    """What every open fd of a process points at."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # the fd listdir itself used, closed already
            pass
    return out


def eventfd_count(fd: int) -> int:
    """Read an eventfd without blocking: its counter, or 0 when it is zero.

    Reading resets the counter, so only call this on an eventfd whose
    wake-ups the test itself wants to observe.
    """
    os.set_blocking(fd, False)
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def wait_until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` (which reads real shared state) until true or the deadline.

    Used for state another process sets in the segment (an asleep flag, a
    cursor): there is no fd to wait on for a store into shared memory.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


class LineReader:
    """Lines from an fd, each read with a deadline (poll(2), never a bare sleep)."""

    def __init__(self, fd: OwnedFd, who: str) -> None:
        self.fd = fd
        self.who = who
        self._buf = b""

    def readline(self, timeout: float = DEADLINE) -> str | None:
        """The next line without its newline; None at EOF; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd.fileno(), select.POLLIN)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise AssertionError(f"{self.who} said nothing for {timeout}s")
            chunk = os.read(self.fd.fileno(), 65536)
            if not chunk:
                if self._buf:
                    rest, self._buf = self._buf, b""
                    return rest.decode()
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        """The next line, which must start with ``prefix``."""
        line = self.readline(timeout)
        if line is None:
            raise AssertionError(f"{self.who} closed its pipe before saying {prefix!r}")
        if not line.startswith(prefix):
            raise AssertionError(f"{self.who} said {line!r}, expected {prefix!r}")
        return line


class ChildEnd:
    """The child's side of a channel: ``send`` lines up, ``recv`` lines down."""

    def __init__(self, up: OwnedFd, down: OwnedFd) -> None:
        self._up = up
        self._down = LineReader(down, "the test process")

    def send(self, line: str) -> None:
        """Tell the test something (one line)."""
        os.write(self._up.fileno(), line.encode() + b"\n")

    def recv(self, timeout: float = DEADLINE) -> str | None:
        """The test's next line (None if it went away)."""
        return self._down.readline(timeout)


class Child:
    """A forked child: its pid, a line channel to it, and a reaper with a deadline."""

    def __init__(self, pid: int, up: OwnedFd, down: OwnedFd) -> None:
        self.pid = pid
        self.lines = LineReader(up, f"child {pid}")
        self._down = down
        self.status: int | None = None

    def expect(self, prefix: str, timeout: float = DEADLINE) -> str:
        """The child's next line, which must start with ``prefix``."""
        return self.lines.expect(prefix, timeout)

    def tell(self, line: str) -> None:
        """Send the child one line."""
        os.write(self._down.fileno(), line.encode() + b"\n")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child (by pid)."""
        os.kill(self.pid, sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        """Reap the child; its exit code, or minus the signal that killed it."""
        if self.status is None:
            pidfd = OwnedFd(os.pidfd_open(self.pid))
            try:
                poller = select.poll()
                poller.register(pidfd.fileno(), select.POLLIN)
                if not poller.poll(timeout * 1000):
                    raise AssertionError(f"child {self.pid} did not exit within {timeout}s")
            finally:
                pidfd.close()
            _, self.status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(self.status)

    def kill(self) -> int:
        """SIGKILL (works on a stopped child too) and reap."""
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - it is our unreaped child
                pass
        return self.wait()

    def close(self) -> None:
        """Close the test's ends of the channel."""
        self.lines.fd.close()
        self._down.close()


class Procs:
    """Starts child processes for one test and kills and reaps all of them at the end."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.readers: list[LineReader] = []

    def fork(self, target: Callable[[ChildEnd], object]) -> Child:
        """Run ``target(channel)`` in a forked child; its exit code is 0 unless it raises.

        The child leaves with ``os._exit``: it never runs the parent's
        finalizers, atexit hooks or pytest's teardown.
        """
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, coverage cannot see it
            code = 0
            try:
                os.close(up_r)
                os.close(down_w)
                target(ChildEnd(OwnedFd(up_w), OwnedFd(down_r)))
            except BaseException:
                traceback.print_exc()
                code = 70
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(up_w)
        os.close(down_r)
        child = Child(pid, OwnedFd(up_r), OwnedFd(down_w))
        self.children.append(child)
        return child

    def spawn(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a fresh program (exec, not fork); killed and reaped at the end."""
        proc = subprocess.Popen(args, **kwargs)
        self.popens.append(proc)
        return proc

    def lines(self, proc: subprocess.Popen[bytes], who: str) -> LineReader:
        """A deadline-aware line reader on a child's stdout (it owns a dup, closed at the end)."""
        assert proc.stdout is not None
        reader = LineReader(OwnedFd(os.dup(proc.stdout.fileno())), who)
        self.readers.append(reader)
        return reader

    def python(self, script: str, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Run one of the helper scripts next to this file with this interpreter."""
        return self.spawn([sys.executable, str(HERE / script), *args], **kwargs)

    def cleanup(self) -> None:
        """Kill (SIGKILL, by pid) and reap every child still there; close channels."""
        for child in self.children:
            try:
                child.kill()
            finally:
                child.close()
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for reader in self.readers:
            reader.fd.close()


def drain(sub: Subscriber, limit: int = 4096, *, copy: bool = True) -> list[Record]:
    """Read until the subscriber's cursor reaches the committed end of the ring."""
    out: list[Record] = []
    while True:
        out += sub.read(limit, copy=copy)
        if sub.cursor >= sub.segment.write_seq:
            return out


def attach(pub: Publisher, handle: ReaderHandle, **kwargs: Any) -> Subscriber:
    """A subscriber for ``handle`` the way a reader daemon gets one: the segment fd
    and a duplicate of its eventfd (what SCM_RIGHTS would deliver)."""
    return Subscriber.attach(
        index=handle.index,
        fd=pub.segment.fileno(),
        eventfd=OwnedFd(os.dup(handle.eventfd.fileno())),
        token=handle.token,
        **kwargs,
    )


class Bus:
    """Publishers and in-process subscribers for one test, closed at its end."""

    def __init__(self, names: Callable[[], str]) -> None:
        self._names = names
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []

    def publisher(self, name: str | None = None, **kwargs: Any) -> Publisher:
        """``Publisher.create`` on a fresh test name (small geometry unless told)."""
        kwargs.setdefault("capacity", 8)
        kwargs.setdefault("slot_size", 64)
        kwargs.setdefault("max_readers", 8)
        pub = Publisher.create(name or self._names(), **kwargs)
        self.publishers.append(pub)
        return pub

    def subscriber(
        self,
        pub: Publisher,
        name: str = "r",
        *,
        topics: int = ALL_TOPICS,
        start: str | int = "latest",
        pid: int | None = None,
        **kwargs: Any,
    ) -> Subscriber:
        """Add a reader entry to ``pub`` and attach to it by fd, as a reader daemon would."""
        handle = pub.add_reader(
            name, os.getpid() if pid is None else pid, topics=topics, start=start
        )
        sub = attach(pub, handle, **kwargs)
        self.subscribers.append(sub)
        return sub

    def close(self) -> None:
        """Close every subscriber, then every publisher (names are unlinked by shm_names)."""
        for sub in self.subscribers:
            sub.close()
        for pub in self.publishers:
            pub.close()


def mutex_free(seg: Segment) -> bool:
    """Whether nobody holds the segment's mutex (glibc's futex word is 0)."""
    return bytes(seg.control[OFF_MUTEX : OFF_MUTEX + 4]) == b"\0\0\0\0"


def asleep_and_unlocked(pub: Publisher, index: int) -> Callable[[], bool]:
    """A predicate: reader ``index`` announced its sleep and let go of the mutex.

    (Only then is it safe to SIGSTOP it, or to count on it being woken:
    it is on its way into epoll and holds nothing the writer needs.)
    """
    return lambda: pub.segment.entry(index).asleep and mutex_free(pub.segment)


def loop_reader(
    pub: Publisher, index: int, wait: WaitStrategy | None = None
) -> Callable[[ChildEnd], None]:
    """A child body: run a ReaderLoop on entry ``index``, report every record, then how it ended.

    Lines: ``ready``; ``record SEQ TOPIC HEX`` per record; ``exit RESULT DELIVERED LOST``.
    """
    handle = pub.readers[index]

    def body(ch: ChildEnd) -> None:
        sub = attach(pub, handle, wait=wait)

        def on_records(batch: list[RawRecord]) -> None:
            for seq, _ts, topic, data in batch:
                ch.send(f"record {seq} {topic} {bytes(data).hex()}")

        ch.send("ready")
        result = ReaderLoop(sub, on_records).run()
        ch.send(f"exit {result.name} {sub.delivered} {sub.lost}")

    return body
