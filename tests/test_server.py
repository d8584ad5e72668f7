"""Tests of shmd.daemons.server's listener set-up; the server itself runs in tests/test_writer.py.

Every control-server behaviour (accept, handshake, Hello, Publish, Detach,
evictions) is tested end to end against a real shm-writer there.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from shmd.config import Config, load_config
from shmd.control.frames import WireError
from shmd.daemons.server import open_listener


def config(tmp_path: Path, sock: Path) -> Config:
    path = tmp_path / "shmd.yaml"
    path.write_text(f"control:\n  socket: {sock}\n")
    return load_config(path)


def test_open_listener_binds_in_a_directory_it_creates(tmp_path: Path) -> None:
    """Without socket activation the listener is bound here, its missing directory made first."""
    sock_path = tmp_path / "run" / "ctl.sock"
    sock, bound = open_listener(config(tmp_path, sock_path), None)
    try:
        assert bound == str(sock_path)
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        assert sock.type == socket.SOCK_SEQPACKET
    finally:
        sock.close()
        os.unlink(sock_path)


def test_open_listener_refuses_more_than_one_activated_fd_and_closes_them(tmp_path: Path) -> None:
    """Two fds named "control" are a unit file mistake: WireError, both closed."""
    fds = list(os.pipe2(os.O_CLOEXEC))
    with pytest.raises(WireError, match="passed 2 fds named 'control'"):
        open_listener(config(tmp_path, tmp_path / "ctl.sock"), fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
