"""Listening for, accepting and making control connections.

The top of the connection layer: binds the writer's listening socket (and
tells a stale socket file from a live listener), checks a listener systemd
passed in, accepts connections and connects to them.  Each connection is a
:class:`~shmd.control.connection.Connection`.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Final

from shmd.control.connection import Connection
from shmd.control.frames import (
    DEFAULT_MAX_MESSAGE,
    WireError,
    WireTimeout,
    check_type,
    type_name,
    why,
)

_TIMEVAL: Final = struct.Struct("@ll")


def _probe_live(path: str, sock_type: int) -> bool:
    """Return whether some process accepts connections on the socket file ``path``."""
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except FileNotFoundError:
        return False
    except BlockingIOError:
        # A non-blocking AF_UNIX connect fails with EAGAIN (not EINPROGRESS)
        # when the listener's backlog is full: somebody is listening.
        return True
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            # A listener of the other socket type: alive all the same.
            return True
        raise WireError(
            f"Failed to bind the control socket {path} since probing the socket file already "
            f"there failed: {why(exc)}"
        ) from None
    finally:
        probe.close()
    return True


def bind_listener(
    path: str, sock_type: int = socket.SOCK_SEQPACKET, mode: int = 0o660, *, backlog: int = 64
) -> socket.socket:
    """Bind and listen on ``path``, replacing a stale socket file left by a dead process.

    Refuses (WireError) when ``path`` is something other than a socket, or
    when another process is still listening there.  The socket file gets
    exactly ``mode``.
    """
    check_type(sock_type)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise WireError(f"Failed to bind the control socket {path} since {why(exc)}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise WireError(
                f"Failed to bind the control socket {path} since something that is not a "
                "socket is already there; remove it or choose another path"
            )
        # Connecting is the only way to tell a live listener from a stale
        # file.  (Two writers racing here could both see it stale; systemd
        # socket activation is the race-free way to run one.)
        if _probe_live(path, sock_type):
            raise WireError(
                f"Failed to bind the control socket {path} since another process is listening on it"
            )
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise WireError(
                f"Failed to remove the stale control socket {path} since {why(exc)}"
            ) from None
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    bound = False
    try:
        # Linux creates the socket file with the socket inode's mode minus
        # the umask, so setting the mode before bind() means the file is
        # never more open than asked; chmod() afterwards adds back what the
        # umask took away.
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        bound = True
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if bound:
            os.unlink(path)
        raise WireError(f"Failed to bind the control socket {path} since {why(exc)}") from None
    return sock


def connect(
    path: str,
    sock_type: int = socket.SOCK_SEQPACKET,
    timeout: float | None = None,
    *,
    max_message: int = DEFAULT_MAX_MESSAGE,
) -> Connection:
    """Connect to the control socket at ``path`` and return the connection."""
    check_type(sock_type)
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        if timeout is not None:
            # A blocking AF_UNIX connect waits for room in the listener's
            # backlog for at most SO_SNDTIMEO (Python's own timeout mode would
            # make a full backlog fail at once with EAGAIN).
            secs = max(timeout, 0.001)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                _TIMEVAL.pack(int(secs), int((secs % 1) * 1_000_000)),
            )
        sock.connect(path)
        if timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))
    except OSError as exc:
        sock.close()
        raise _connect_error(path, sock_type, exc, timeout) from None
    try:
        return Connection(sock, max_message=max_message)
    except BaseException:
        sock.close()
        raise


def _connect_error(path: str, sock_type: int, exc: OSError, timeout: float | None) -> WireError:
    prefix = f"Failed to connect to the control socket {path} since"
    if exc.errno == errno.ENOENT:
        return WireError(f"{prefix} it does not exist (is shm-writer.socket running?)")
    if exc.errno == errno.ECONNREFUSED:
        return WireError(f"{prefix} nothing is listening on it")
    if exc.errno == errno.EPROTOTYPE:
        return WireError(f"{prefix} it is not a {type_name(sock_type)} socket")
    if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT):
        return WireTimeout(f"{prefix} the listener did not accept within {timeout:g} s")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return WireError(f"{prefix} this user may not open it (permission denied)")
    return WireError(f"{prefix} {why(exc)}")


def accept(listener: socket.socket, *, max_message: int = DEFAULT_MAX_MESSAGE) -> Connection | None:
    """Accept one connection; None when a non-blocking listener has none pending."""
    try:
        # Python's accept() uses accept4(SOCK_CLOEXEC).
        sock, _addr = listener.accept()
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.ECONNABORTED:
            return None
        raise WireError(f"Failed to accept a control connection since {why(exc)}") from None
    try:
        return Connection(sock, max_message=max_message)
    except BaseException:
        sock.close()
        raise


def check_inherited_listener(sock: socket.socket, path: str, sock_type: int) -> None:
    """Check that a socket passed in by systemd is the listener the configuration names."""
    check_type(sock_type)
    try:
        family = sock.family
        name: str | bytes = sock.getsockname() if family == socket.AF_UNIX else ""
        actual_type = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise WireError(
            f"Failed to use the inherited control socket since inspecting it failed: {why(exc)}"
        ) from None
    if isinstance(name, bytes):
        # Abstract-namespace address: show it the way ss(8) does.
        name = "@" + name.lstrip(b"\0").decode(errors="replace")
    want = f"{path!r} ({type_name(sock_type)})"
    if family != socket.AF_UNIX:
        raise WireError(
            f"Failed to use the inherited control socket since it is a "
            f"{getattr(family, 'name', family)} socket "
            f"but the configuration says {want}"
        )
    if os.path.normpath(name or ".") != os.path.normpath(path) or actual_type != sock_type:
        have = (
            f"{name!r} ({type_name(actual_type)})"
            if name
            else f"unbound ({type_name(actual_type)})"
        )
        raise WireError(
            f"Failed to use the inherited control socket since it is {have} but the "
            f"configuration says {want}; make the socket unit's Listen line and "
            "control.socket/control.type agree"
        )
    if not listening:
        raise WireError(
            f"Failed to use the inherited control socket {path!r} since it is not listening"
        )
