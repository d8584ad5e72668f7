"""Tests of shmd.daemons.sdnotify against a real notify socket and real inherited fds."""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from shmd.daemons import sdnotify

REPO = Path(__file__).resolve().parent.parent
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass
class Datagram:
    text: str
    fds: list[int] = field(default_factory=list)
    pid: int | None = None

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


class NotifyReceiver:
    """Plays systemd's side: a bound AF_UNIX datagram socket named by NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shmd-test-")
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        # Ask the kernel to attach the sender's credentials, as systemd does.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[Datagram] = []

    def recv(self, timeout: float = 10.0) -> Datagram:
        self.sock.settimeout(timeout)
        data, ancdata, flags, _ = self.sock.recvmsg(
            4096, socket.CMSG_SPACE(16 * 4) + socket.CMSG_SPACE(UCRED.size), socket.MSG_CMSG_CLOEXEC
        )
        msg = Datagram(data.decode())
        self.received.append(msg)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                msg.fds.extend(fds)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                msg.pid = UCRED.unpack(payload[: UCRED.size])[0]
        assert not flags & socket.MSG_CTRUNC
        return msg

    def assert_empty(self) -> None:
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096, socket.MSG_DONTWAIT)

    def close(self) -> None:
        for msg in self.received:
            msg.close_fds()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    rx = NotifyReceiver()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", rx.path)
        yield rx
    finally:
        rx.close()


def test_everything_is_a_noop_without_notify_socket(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without NOTIFY_SOCKET every call returns False and nothing is sent anywhere."""
    monkeypatch.delenv("NOTIFY_SOCKET")
    r, w = os.pipe()
    try:
        assert sdnotify.ready("up") is False
        assert sdnotify.status("x") is False
        assert sdnotify.watchdog() is False
        assert sdnotify.stopping() is False
        assert sdnotify.reloading() is False
        assert sdnotify.store_fds("segment", [r]) is False
        assert sdnotify.remove_fds("segment") is False
    finally:
        os.close(r)
        os.close(w)
    receiver.assert_empty()


def test_ready_sends_ready_and_status_from_this_process(receiver: NotifyReceiver) -> None:
    """ready() sends READY=1 with STATUS= and the kernel vouches it came from our pid."""
    assert sdnotify.ready("serving 3 readers") is True
    msg = receiver.recv()
    assert msg.text == "READY=1\nSTATUS=serving 3 readers"
    assert msg.pid == os.getpid()
    assert sdnotify.ready() is True
    assert receiver.recv().text == "READY=1"


def test_status_is_kept_on_one_line(receiver: NotifyReceiver) -> None:
    """A status text with newlines is flattened so it cannot inject assignments."""
    assert sdnotify.status("line one\nREADY=1")
    assert receiver.recv().text == "STATUS=line one READY=1"


def test_watchdog_and_stopping(receiver: NotifyReceiver) -> None:
    """watchdog() sends WATCHDOG=1 and stopping() STOPPING=1."""
    assert sdnotify.watchdog() and sdnotify.stopping()
    assert [receiver.recv().text, receiver.recv().text] == ["WATCHDOG=1", "STOPPING=1"]


def test_reloading_carries_the_monotonic_time(receiver: NotifyReceiver) -> None:
    """reloading() sends RELOADING=1 and MONOTONIC_USEC= taken while it ran."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.recv().text.split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


def test_notify_rejects_malformed_assignments(receiver: NotifyReceiver) -> None:
    """notify() refuses lines that are not a single VAR=value."""
    with pytest.raises(ValueError, match="Failed to notify the service manager since"):
        sdnotify.notify("READY=1\nSTATUS=x")
    with pytest.raises(ValueError):
        sdnotify.notify("READY")
    receiver.assert_empty()


def test_store_fds_passes_working_descriptors(receiver: NotifyReceiver) -> None:
    """store_fds() sends FDSTORE=1/FDNAME= with the fds by SCM_RIGHTS, and they work."""
    r, w = os.pipe()
    try:
        assert sdnotify.store_fds("segment", [r, w])
        msg = receiver.recv()
        assert msg.text == "FDSTORE=1\nFDNAME=segment"
        assert len(msg.fds) == 2
        got_r, got_w = msg.fds
        assert os.fstat(got_r).st_ino == os.fstat(r).st_ino
        os.write(got_w, b"through the store")
        assert os.read(r, 100) == b"through the store"
    finally:
        os.close(r)
        os.close(w)


def test_store_fds_without_polling(receiver: NotifyReceiver) -> None:
    """store_fds(poll=False) adds FDPOLL=0."""
    r, w = os.pipe()
    try:
        assert sdnotify.store_fds("eventfd-1", [r], poll=False)
        msg = receiver.recv()
        assert msg.text == "FDSTORE=1\nFDNAME=eventfd-1\nFDPOLL=0" and len(msg.fds) == 1
    finally:
        os.close(r)
        os.close(w)


def test_remove_fds(receiver: NotifyReceiver) -> None:
    """remove_fds() sends FDSTOREREMOVE=1 with the name and no fds."""
    assert sdnotify.remove_fds("segment")
    msg = receiver.recv()
    assert msg.text == "FDSTOREREMOVE=1\nFDNAME=segment" and msg.fds == []


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", "x" * 256, "é"])
def test_invalid_fd_names_are_refused(receiver: NotifyReceiver, name: str) -> None:
    """FDNAME must be 1-255 printable ASCII characters without ':'."""
    with pytest.raises(ValueError, match="Failed to name stored fds since"):
        sdnotify.remove_fds(name)
    receiver.assert_empty()


def test_store_fds_needs_fds(receiver: NotifyReceiver) -> None:
    """Storing an empty list of fds is refused rather than sent."""
    with pytest.raises(ValueError, match="none were given"):
        sdnotify.store_fds("segment", [])


def test_send_failure_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET that points nowhere gives False and an sd_notify_failed event."""
    workdir = tempfile.mkdtemp(prefix="shmd-test-")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(workdir, "gone.sock"))
        with capture_logs() as captured:
            assert sdnotify.watchdog() is False
        assert len(captured) == 1
        assert captured[0]["event"] == "sd_notify_failed"
        assert captured[0]["log_level"] == "warning"
        assert captured[0]["state"] == "WATCHDOG=1"
        assert captured[0]["error"]
    finally:
        shutil.rmtree(workdir)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "{me}"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """watchdog_interval() follows sd_watchdog_enabled: positive usec, and our pid if named."""
    env = {k: v.replace("{me}", str(os.getpid())) for k, v in env.items()}
    assert sdnotify.watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an env argument the process environment is read."""
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 20.0


# ---------------------------------------------------------------------------
# listen_fds: a child process that inherits fds at 3.. like systemd hands them
# ---------------------------------------------------------------------------

# Moves the passed fds to 3, 4, ... (via fds >= 100 so none is clobbered),
# sets LISTEN_* for its own pid and execs the probe: exec keeps the pid, so
# LISTEN_PID is right, exactly as systemd prepares a service.
_BOOT = r"""
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
env = dict(os.environ, LISTEN_FDS=str(len(fds)))
env["LISTEN_PID"] = str(os.getpid()) if sys.argv[3] == "self" else sys.argv[3]
if sys.argv[2] != "-":
    env["LISTEN_FDNAMES"] = sys.argv[2]
os.execve(sys.executable, [sys.executable, "-c", sys.argv[4]], env)
"""

_PROBE = r"""
import fcntl, json, os
from shmd.daemons import sdnotify
groups = sdnotify.listen_fds()
info = {fd: [os.fstat(fd).st_ino, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)]
        for fds in groups.values() for fd in fds}
print(json.dumps({"groups": groups, "info": info,
                  "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
"""


def _run_activated(fds: list[int], names: str, pid: str = "self") -> dict[str, object]:
    child = subprocess.run(
        [sys.executable, "-c", _BOOT, ",".join(map(str, fds)), names, pid, _PROBE],
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=str(REPO),
    )
    assert child.returncode == 0, child.stderr
    result: dict[str, object] = json.loads(child.stdout)
    return result


@pytest.fixture
def four_fds() -> Iterator[list[int]]:
    """A listening seqpacket socket and three pipe ends, closed afterwards."""
    workdir = tempfile.mkdtemp(prefix="shmd-test-")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe(), os.pipe(), os.pipe()]
    try:
        listener.bind(os.path.join(workdir, "control.sock"))
        listener.listen()
        yield [listener.fileno(), pipes[0][0], pipes[1][0], pipes[2][0]]
    finally:
        listener.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)
        shutil.rmtree(workdir)


def test_listen_fds_groups_inherited_fds_by_name(four_fds: list[int]) -> None:
    """Fds from LISTEN_FDS start at 3, group by LISTEN_FDNAMES, and are the very same files."""
    result = _run_activated(four_fds, "control:store:store:")
    assert result["groups"] == {"control": [3], "store": [4, 5], "unknown": [6]}
    info = result["info"]
    assert isinstance(info, dict)
    for i, fd in enumerate(four_fds):
        inode, cloexec = info[str(3 + i)]
        assert inode == os.fstat(fd).st_ino
        assert cloexec, "libsystemd sets close-on-exec on passed fds"
    assert result["env_left"] == []


def test_listen_fds_without_names_are_unknown(four_fds: list[int]) -> None:
    """Without LISTEN_FDNAMES every passed fd is listed under 'unknown'."""
    result = _run_activated(four_fds[:2], "-")
    assert result["groups"] == {"unknown": [3, 4]}


def test_listen_fds_for_another_pid_are_ignored(four_fds: list[int]) -> None:
    """LISTEN_PID naming another process means the fds are not ours: nothing is returned."""
    result = _run_activated(four_fds[:1], "control", pid="1")
    assert result["groups"] == {}


def test_listen_fds_in_this_process_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without LISTEN_FDS nothing was passed and the result is empty."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert sdnotify.listen_fds() == {}
