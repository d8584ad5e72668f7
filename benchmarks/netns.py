"""Two network namespaces joined by a veth pair: two hosts on one machine, for the bridge.

The arrangement of tests/netns_bus.py (which uses this module's lock and check),
with its own addresses: namespace ``a`` at 10.232.0.1, ``b`` at 10.232.0.2,
both on a /24 of a veth pair, each with ``lo`` up.  Deleting the namespaces
takes the veth pair with them.  Set-up and tear-down hold the machine-wide
lock that tests/netns_bus.py holds for its own (:data:`LOCK`), so that the
``ip netns add``/``del`` of two runs never interleave, and each namespace is
checked to show its address to a process started in it before anything runs
there (#13: a run whose namespace had lost its address failed binding it).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence

ADDR_A, ADDR_B = "10.232.0.1", "10.232.0.2"
#: The lock file tests/netns_bus.py uses too: one set-up or tear-down at a time.
LOCK = "/run/shmd-tests-netns.lock"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def netns_lock() -> Iterator[None]:
    """Hold the machine-wide lock of namespace set-up and tear-down."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_address(ns: str, addr: str) -> None:
    """Raise unless a process started in ``ns`` (as the roles are) sees ``addr``."""
    out = subprocess.run(
        in_ns(ns, ["ip", "-4", "-o", "addr", "show"]),
        check=True,
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    if f" {addr}/" not in out:
        raise RuntimeError(
            f"Failed to set up namespace {ns} since a process in it sees no {addr}:\n{out}"
        )


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (no zenoh, not root, no ip(8)), or None."""
    if importlib.util.find_spec("zenoh") is None:
        return "the zenoh extra is not installed (pip install 'shmd[zenoh]')"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and ip(8)"
    probe = f"shmdb-probe-{uuid.uuid4().hex[:6]}"
    with netns_lock():
        try:
            ip("netns", "add", probe)
        except (OSError, subprocess.SubprocessError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            return f"this machine cannot make network namespaces ({err.decode().strip() or exc})"
        ip("netns", "del", probe)
    return None


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside namespace ``ns`` (``ip netns exec`` execs it: the pid is argv's)."""
    return ["ip", "netns", "exec", ns, *argv]


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    """Namespaces a and b joined by a veth pair; both deleted afterwards, even on failure."""
    tag = uuid.uuid4().hex[:6]
    names = (f"shmdb-{tag}-a", f"shmdb-{tag}-b")
    links = (f"bv{tag}a", f"bv{tag}b")
    made: list[str] = []
    try:
        with netns_lock():
            try:
                _link(names, links, made)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(
                    f"Failed to make the network namespaces since ip {' '.join(exc.cmd[1:])} "
                    f"said {exc.stderr.decode().strip()}"
                ) from None
            for ns, addr in zip(names, (ADDR_A, ADDR_B), strict=True):
                check_address(ns, addr)
        yield names[0], names[1]
    finally:
        with netns_lock():
            for ns in made:
                subprocess.run(
                    ["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20
                )
            # A veth made before its ends moved into the namespaces stays in ours.
            subprocess.run(
                ["ip", "link", "del", links[0]], check=False, capture_output=True, timeout=20
            )


def _link(names: tuple[str, str], links: tuple[str, str], made: list[str]) -> None:
    """Make the namespaces (each appended to ``made`` once it exists) and the veth pair."""
    for ns in names:
        ip("netns", "add", ns)
        made.append(ns)
    ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
    for ns, link, addr in zip(names, links, (ADDR_A, ADDR_B), strict=True):
        ip("link", "set", link, "netns", ns)
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
        ip("-n", ns, "link", "set", link, "up")
        ip("-n", ns, "link", "set", "lo", "up")
