"""Two hosts for the bridge tests: network namespaces joined by a veth pair, a bus in each.

:func:`two_hosts` makes namespaces ``a`` and ``b`` joined by a veth pair with
addresses it assigns (10.231.0.1 and 10.231.0.2, inside the namespaces
only), and a :class:`NsBus` in each (its own segment, socket and processes,
tests/daemon_bus.py's, each started inside its namespace).  Afterwards it
kills every process by pid, then deletes the namespaces (which takes the
veth pair with them) and the source's status files.  The helpers start the
usual arrangement: on ``a`` a writer and a reader with a zenoh sink dialling
``b``; on ``b`` a writer whose zenoh source listens there, and a file reader.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon_bus import Bus, Daemon, read_lines, wait_until

# Set-up and tear-down under the machine-wide lock benchmarks/netns.py holds
# for its own namespaces, and its check that a namespace's processes see its
# address: seen once in about 150 runs with another run beside it, a writer in
# b failed to bind b's address (EADDRNOTAVAIL) because that run's early
# benchmark test deleted every namespace made while it ran (fixed there).
from benchmarks.netns import check_address, netns_lock
from shmd.daemons.zenohio import read_status, status_path

ADDR_A, ADDR_B = "10.231.0.1", "10.231.0.2"
ENDPOINT = f"tcp/{ADDR_B}:7447"
HELPERS = Path(__file__).resolve().parent / "helpers"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class NsBus(Bus):
    """A Bus whose every process runs in network namespace ``netns``."""

    def __init__(self, netns: str) -> None:
        super().__init__()
        self.netns = netns

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Daemon:
        # ip netns exec execs the program itself: the pid is the daemon's.
        return super().spawn(name, ["ip", "netns", "exec", self.netns, *argv], **kwargs)

    @property
    def prefix(self) -> str:
        """The zenoh sink's default key prefix on this bus."""
        return self.segment.lstrip("/")


def skip_unless_possible() -> None:
    """Skip without the zenoh extra (with pip's reason), root or ip(8)."""
    why_not = Path(sys.prefix) / "zenoh-unavailable"  # kept by packaging/dev
    pytest.importorskip(
        "zenoh",
        reason="the zenoh extra is not installed"
        + (f" (pip said: {why_not.read_text().strip()})" if why_not.is_file() else ""),
    )
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and ip(8)")


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[NsBus, NsBus]]:
    """Two namespaces joined by a veth pair, a bus in each; all gone afterwards."""
    skip_unless_possible()
    tag = uuid.uuid4().hex[:6]
    names = (f"shmdz-{tag}-a", f"shmdz-{tag}-b")
    links = (f"zv{tag}a", f"zv{tag}b")
    made: list[str] = []
    buses: list[NsBus] = []
    try:
        with netns_lock():
            for ns in names:
                ip("netns", "add", ns)
                made.append(ns)
            ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
            for ns, link, addr in zip(names, links, (ADDR_A, ADDR_B), strict=True):
                ip("link", "set", link, "netns", ns)
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
                ip("-n", ns, "link", "set", link, "up")
                ip("-n", ns, "link", "set", "lo", "up")
            for ns, addr in zip(names, (ADDR_A, ADDR_B), strict=True):
                check_address(ns, addr)
        buses = [NsBus(ns) for ns in names]
        yield buses[0], buses[1]
    finally:
        for b in buses:
            b.close()
            status_path(b.segment).unlink(missing_ok=True)
        with netns_lock():
            for ns in made:
                subprocess.run(
                    ["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20
                )


def write_fifo(path: Path, lines: Sequence[str]) -> None:
    """Be one FIFO producer: open, write the lines, close."""
    fd = os.open(path, os.O_WRONLY)
    try:
        data = "".join(f"{line}\n" for line in lines).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def receiver(b: NsBus, policy: str, a: NsBus, **segment: Any) -> tuple[Daemon, Daemon]:
    """Bus b: a writer with a zenoh source of a's keys on ADDR_B, and a file reader ``out``."""
    src = {"type": "zenoh", "listen": [ENDPOINT], "key": f"{a.prefix}/*"}
    seg = {"policy": policy, "topics": {"tick": 0}, **segment}
    b.configure(segment=seg, writer={"source": src})
    writer = b.writer()
    writer.wait_for("bridge_receiving")
    return writer, b.file_reader("out")


def sender(a: NsBus, policy: str, source: dict[str, Any], **segment: Any) -> Daemon:
    """Bus a: a writer with ``source``; returns it (the bridge reader is started apart)."""
    seg = {"policy": policy, "topics": {"tick": 0}, **segment}
    a.configure(segment=seg, writer={"source": source})
    return a.writer()


def bridge(a: NsBus, instance: str = "bridge", *, pack: bool = False, **settings: Any) -> Daemon:
    """A reader on bus a with a zenoh sink dialling ADDR_B (waits for ``attached``)."""
    sink = {"type": "zenoh", "connect": [ENDPOINT], "pack": pack}
    return a.reader(instance, sink=sink, stats_interval=0.5, **settings)


def warm_up(fifo: Path, b_writer: Daemon) -> list[str]:
    """Publish ``w<k>`` records on a until b's source has joined the stream; the lines sent.

    Records before the Zenoh route exists go nowhere; the first that arrives
    starts b's account of a (``bridge_joined``).
    """
    sent: list[str] = []
    for k in range(120):
        sent.append(f"w{k}")
        write_fifo(fifo, [sent[-1]])
        if b_writer.find("bridge_joined"):
            return sent
        try:
            b_writer.wait_for("bridge_joined", timeout=0.25)
            return sent
        except AssertionError:
            continue
    raise AssertionError(f"b's source never joined a's stream: {b_writer.stderr()}")


def flush_tail(fifo: Path, b: NsBus, sent: list[str]) -> None:
    """Publish ``e<k>`` records until one reaches b's file, so no loss hides at the tail."""
    for k in range(60):
        sent.append(f"e{k}")
        write_fifo(fifo, [sent[-1]])
        try:
            wait_until(lambda: any(x.startswith("e") for x in read_lines(b.out("out"))), 1.0)
            return
        except AssertionError:
            continue
    raise AssertionError("no record after the data reached b")


def missing_between(sent: Sequence[str], got: Sequence[str]) -> int:
    """How many of ``sent`` between the first and last of ``got`` never arrived.

    Fails unless ``got`` is ``sent`` with some left out, in order, each once.
    """
    where = {line: i for i, line in enumerate(sent)}
    positions = [where[line] for line in got]
    assert positions == sorted(set(positions)), "records arrived out of order or twice"
    return positions[-1] - positions[0] + 1 - len(positions)


def status(b: NsBus) -> dict[str, Any]:
    st = read_status(b.segment)
    assert st is not None, f"no status file at {status_path(b.segment)}"
    return st


def origin(b: NsBus, a: NsBus) -> dict[str, Any]:
    """b's accounting of the records from a's bridge ({} before the first)."""
    st = read_status(b.segment) or {}
    found: dict[str, Any] = st.get("origins", {}).get(a.prefix, {})
    return found
