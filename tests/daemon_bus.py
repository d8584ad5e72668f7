"""Run shm-writer and shm-reader as real processes and wait on what they log.

A :class:`Daemon` is one subprocess whose stderr (``logging.target: json``)
a thread parses line by line into event dicts; :meth:`Daemon.wait_for`
blocks on a condition variable until a matching event arrives, the process
ends, or the deadline passes.  A :class:`Bus` is one test's world: a private
directory, a unique ``/shmd-test-*`` segment name, a control socket path,
configuration files, and every process started through it.  The ``bus``
fixture kills (SIGKILL, by pid) and reaps whatever is still running and
removes the segment, the socket and the directory, also when the test fails.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from shmd.control import protocol
from shmd.control.connection import Connection

# Generous: a loaded machine makes these waits slow, not wrong; a passing test never waits it out.
DEFAULT_TIMEOUT = 20.0
BIN = Path(sys.executable).parent
# Environment a daemon must not inherit from the test run (it would change
# where it logs, where its socket comes from or which file it reads).
_SCRUB = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
    "SHMD_CONFIG",
    "SHMD_INSTANCE",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


def program(name: str) -> list[str]:
    """The argv prefix that runs ``shm-writer``/``shm-reader`` of this Python environment."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"shm-writer": "shmd.daemons.writer", "shm-reader": "shmd.daemons.reader"}[name]
    return [sys.executable, "-m", module]


def matches(event: Mapping[str, Any], name: str, fields: Mapping[str, Any]) -> bool:
    """Whether ``event`` is named ``name`` and has every field (a callable value is a test)."""
    if event.get("event") != name:
        return False
    for key, want in fields.items():
        if key not in event:
            return False
        if callable(want):
            if not want(event[key]):
                return False
        elif event[key] != want:
            return False
    return True


class Daemon:
    """One subprocess; its stderr lines become ``events`` (JSON) or stay in ``lines``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv, env=dict(env), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, cwd=cwd
        )
        self.events: list[dict[str, Any]] = []
        #: Every stderr line, JSON or not, in order (tracebacks land here).
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(
            target=self._read_stderr, name=f"stderr-{name}", daemon=True
        )
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                event: dict[str, Any] | None = None
                if line.startswith("{"):
                    try:
                        parsed = json.loads(line)
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict) and "event" in parsed:
                        event = parsed
                with self._cond:
                    self.lines.append(line)
                    if event is not None:
                        self.events.append(event)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    # -- looking at events -------------------------------------------------------

    def mark(self) -> int:
        """The number of events so far: pass it as ``since`` to wait for newer ones."""
        with self._cond:
            return len(self.events)

    def find(self, name: str, *, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Events so far named ``name`` with these fields."""
        with self._cond:
            return [e for e in self.events[since:] if matches(e, name, fields)]

    def names(self) -> list[str]:
        """The event names so far, in order."""
        with self._cond:
            return [str(e["event"]) for e in self.events]

    def stderr(self) -> str:
        """Everything on stderr so far."""
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(
        self, name: str, timeout: float = DEFAULT_TIMEOUT, *, since: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """Block until an event named ``name`` with these fields is logged; return it.

        Fails at once when the process's stderr closes without one (it
        exited), and when ``timeout`` seconds pass.  Plain asserts in this
        module are not rewritten by pytest, so every failure says what it is.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = since
            while True:
                for event in self.events[seen:]:
                    if matches(event, name, fields):
                        return event
                seen = len(self.events)
                if self._eof:
                    raise AssertionError(
                        f"{self.name} (pid {self.pid}) ended without logging {name} {fields}; "
                        f"status {self.proc.poll()}; stderr:\n{self.stderr_locked()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name} (pid {self.pid}) did not log {name} {fields} within "
                        f"{timeout:g} s; stderr:\n{self.stderr_locked()}"
                    )
                self._cond.wait(left)

    def stderr_locked(self) -> str:
        return "\n".join(self.lines[-60:])

    # -- signals and exit -----------------------------------------------------------

    def send(self, sig: int) -> None:
        """Send ``sig`` to the process by pid (never by name)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def terminate(self) -> None:
        self.send(signal.SIGTERM)

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to exit and its stderr to be read to the end; its status."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) did not exit within "
                f"{timeout:g} s; stderr:\n{self.stderr()}"
            ) from None
        self._thread.join(timeout)
        return status

    def reap(self) -> None:
        """Kill the process if it still runs, reap it, close its pipes."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._thread.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (mappings merge, anything else replaces).

    A source or sink of another ``type`` replaces the old one whole, as its
    keys would not fit.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        retyped = (
            key in ("source", "sink")
            and isinstance(value, Mapping)
            and isinstance(old, dict)
            and value.get("type", old.get("type")) != old.get("type")
        )
        if isinstance(value, Mapping) and isinstance(old, dict) and not retyped:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "the condition",
    interval: float = 0.01,
) -> Any:
    """Poll ``predicate`` until it returns something true, with a deadline; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        # A poll with a deadline (files have no readiness to wait on).
        time.sleep(interval)


def read_lines(path: Path) -> list[str]:
    """The lines of a sink's output file (empty when it does not exist yet)."""
    try:
        return path.read_bytes().decode().splitlines()
    except FileNotFoundError:
        return []


def read_frames(path: Path) -> list[bytes]:
    """The payloads of a length-framed file (u32 little-endian length, then the bytes)."""
    data = path.read_bytes()
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 4, f"a truncated length prefix at byte {pos} of {path}"
        n = int.from_bytes(data[pos : pos + 4], "little")
        assert len(data) - pos - 4 >= n, f"a truncated frame at byte {pos} of {path}"
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def tick_numbers(lines: Sequence[str]) -> list[int]:
    """The N of every ``tick N <time>`` line (the ticker source's records)."""
    out = []
    for line in lines:
        word, n, _ = line.split(" ")
        assert word == "tick", line
        out.append(int(n))
    return out


def assert_contiguous(numbers: Sequence[int], what: str = "records") -> None:
    """Every number from the first to the last, once, in order."""
    assert numbers, f"no {what} at all"
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if list(numbers) != expected:
        gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
        raise AssertionError(f"{what} are not contiguous: breaks at {gaps[:10]}")


def shm_path(segment: str) -> Path:
    """Where a POSIX shm name lives on Linux."""
    return Path("/dev/shm") / segment.lstrip("/")


class Bus:
    """One test's writer, readers, files, segment and socket."""

    def __init__(self) -> None:
        # Short, so that the socket path stays far below sun_path's 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="shmd-test-"))
        self.segment = f"/shmd-test-{uuid.uuid4().hex}"
        self.socket = str(self.dir / "ctl.sock")
        self.config_path = self.dir / "shmd.yaml"
        self.processes: list[Daemon] = []
        self.settings: dict[str, Any] = {
            "segment": {"name": self.segment, "capacity": 256, "slot_size": 256, "max_readers": 8},
            "control": {"socket": self.socket, "allowed_groups": [], "handshake_timeout": 2.0},
            "writer": {
                "source": {"type": "ticker", "rate": 100.0},
                "shutdown_grace": 5.0,
                "status_interval": 0.5,
            },
            "reader": {
                "defaults": {
                    "sink": {"type": "journal", "summary_rate": 0.0},
                    "stats_interval": 60.0,
                    "reconnect_timeout": 5.0,
                }
            },
            "logging": {"level": "info", "target": "json"},
        }
        self.env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        self.env["PYTHONUNBUFFERED"] = "1"

    # -- configuration -----------------------------------------------------------------

    def configure(self, **sections: Any) -> Path:
        """Merge ``sections`` into the settings and (re)write the writer's file."""
        self.settings = merge(self.settings, sections)
        return self.write_yaml(self.config_path, self.settings)

    def write_yaml(self, path: Path, data: Mapping[str, Any]) -> Path:
        # Never let a test's daemon near the real bus: its segment and socket
        # must be this test's own.
        if data["segment"]["name"] != self.segment or data["control"]["socket"] != self.socket:
            raise AssertionError(
                f"Failed to write {path} since it names another segment or "
                f"socket than this test's: {data['segment']}, {data['control']}"
            )
        # Written to a new file then renamed, so a daemon re-reading it on
        # SIGHUP never sees half a file.
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(yaml.safe_dump(dict(data), sort_keys=False))
        tmp.replace(path)
        return path

    def add_python_path(self, directory: Path) -> None:
        """Let daemons import modules from ``directory`` (python: sources and sinks)."""
        old = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = str(directory) + (os.pathsep + old if old else "")

    # -- processes ------------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Daemon:
        """Start any process, tracked for cleanup."""
        env = kwargs.pop("env", None) or self.env
        d = Daemon(name, argv, env=env, **kwargs)
        self.processes.append(d)
        return d

    def writer(
        self, *args: str, config: Path | None = None, wait_ready: bool = True, **kwargs: Any
    ) -> Daemon:
        """Start shm-writer on the bus's configuration; by default wait for listener_ready."""
        if config is None:
            config = self.config_path if self.config_path.exists() else self.configure()
        d = self.spawn(
            "shm-writer", [*program("shm-writer"), "--config", str(config), *args], **kwargs
        )
        if wait_ready:
            d.wait_for("listener_ready")
        return d

    def reader_config(self, instance: str, **settings: Any) -> Path:
        """A file with the bus's settings and ``settings`` merged into reader.defaults.

        A ``sink`` replaces the default sink whole.
        """
        sink = settings.pop("sink", None)
        data = merge(self.settings, {"reader": {"defaults": settings}})
        if sink is not None:
            data["reader"]["defaults"]["sink"] = dict(sink)
        return self.write_yaml(self.dir / f"reader-{instance}.yaml", data)

    def reader(
        self,
        instance: str,
        *args: str,
        wait_attached: bool = True,
        config: Path | None = None,
        popen: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> Daemon:
        """Start shm-reader --instance ``instance``; by default wait for ``attached``."""
        if config is None:
            config = self.reader_config(instance, **settings)
        d = self.spawn(
            f"shm-reader@{instance}",
            [*program("shm-reader"), "--config", str(config), "--instance", instance, *args],
            **(popen or {}),
        )
        if wait_attached:
            d.wait_for("attached")
        return d

    def file_reader(self, instance: str, framing: str = "lines", **settings: Any) -> Daemon:
        """A reader with a file sink at ``self.out(instance)``."""
        sink = {"type": "file", "path": str(self.out(instance)), "framing": framing}
        return self.reader(instance, sink=sink, **settings)

    def out(self, instance: str) -> Path:
        """The file sink path of reader ``instance``."""
        return self.dir / f"{instance}.out"

    def segment_exists(self) -> bool:
        return shm_path(self.segment).exists()

    # -- cleanup ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill and reap every process, unlink the segment and the socket, remove the dir."""
        errors: list[BaseException] = []
        for d in reversed(self.processes):
            try:
                d.reap()
            except BaseException as exc:  # keep cleaning up; report at the end
                errors.append(exc)
        for path in (shm_path(self.segment), Path(self.socket)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def running_bus() -> Iterator[Bus]:
    """A Bus whose processes, segment, socket and files are gone afterwards, failure or not."""
    b = Bus()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def bus() -> Iterator[Bus]:
    """The ``bus`` fixture (test modules wrap :func:`running_bus` the same way)."""
    with running_bus() as b:
        yield b


def wait_readable(fd: int, timeout: float, what: str) -> None:
    """Block until ``fd`` is readable, or fail after ``timeout`` seconds."""
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        raise AssertionError(f"{what} did not happen within {timeout:g} s")


def publish(conn: Connection, topic: int, payload: bytes) -> int:
    """Publish one record through the control socket (as shmctl publish does); its seq."""
    conn.send(protocol.Publish(topic=topic, payload=payload).encode(), timeout=5)
    with conn.recv(timeout=5) as answer:
        ack = protocol.decode(answer.body, len(answer.fds))
    assert isinstance(ack, protocol.PublishAck), ack
    return ack.seq
