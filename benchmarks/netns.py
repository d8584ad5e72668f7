"""Two network namespaces joined by a veth pair: two hosts on one machine, for the bridge.

The arrangement of tests/netns_bus.py (which the benchmarks may not import),
with its own addresses: namespace ``a`` at 10.232.0.1, ``b`` at 10.232.0.2,
both on a /24 of a veth pair, each with ``lo`` up.  Deleting the namespaces
takes the veth pair with them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence

ADDR_A, ADDR_B = "10.232.0.1", "10.232.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (no zenoh, not root, no ip(8)), or None."""
    if importlib.util.find_spec("zenoh") is None:
        return "the zenoh extra is not installed (pip install 'shmd[zenoh]')"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and ip(8)"
    probe = f"shmdb-probe-{uuid.uuid4().hex[:6]}"
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
        try:
            _link(names, links, made)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                f"Failed to make the network namespaces since ip {' '.join(exc.cmd[1:])} "
                f"said {exc.stderr.decode().strip()}"
            ) from None
        yield names[0], names[1]
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20)
        # A veth made before its ends moved into the namespaces stays in ours.
        subprocess.run(["ip", "link", "del", links[0]], check=False, capture_output=True)


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
