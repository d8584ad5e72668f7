"""Tests of shmd.client.subscription: programs on the bus through shmd.connect().

Against a real shm-writer process, with clients in this process and in
processes of their own (tests/helpers/client.py).  The writer restarting
under a client (the fd store) is in tests/system; the reader daemon, built
on the same class, has its own tests in tests/test_reader.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_bus import Bus, Daemon, publish, read_lines, running_bus

import shmd
from shmd.control.listener import connect as dial
from shmd.errors import BusUnavailable, Refused

HELPERS = Path(__file__).parent / "helpers"
CLIENT = str(HELPERS / "client.py")


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


def fifo_writer(bus: Bus, **segment: object) -> tuple[Daemon, Path]:
    """A writer whose source publishes on demand: write ``N\\n`` into the FIFO it returns."""
    fifo = bus.dir / "go.fifo"
    os.mkfifo(fifo)
    bus.env["SHMD_TEST_FIFO"] = str(fifo)
    bus.add_python_path(HELPERS)
    bus.configure(
        segment={"capacity": 64, "policy": "block", **segment},
        writer={"source": {"type": "python", "callable": "fifo_source:run"}},
    )
    return bus.writer(), fifo


def go(fifo: Path, count: int) -> None:
    """Let the FIFO source publish ``count`` records (0..count-1, topics 0, 1, 2 in turn)."""
    with open(fifo, "w") as f:
        f.write(f"{count}\n")


def expected(count: int, topics: set[int]) -> list[str]:
    """The lines tests/helpers/client.py writes for those of the FIFO source's records."""
    return [
        f"{i} {i % 3} {f'rec {i} topic {i % 3}'.encode().hex()}"
        for i in range(count)
        if i % 3 in topics
    ]


def client(bus: Bus, name: str, topics: str = "all", mode: str = "iter") -> Daemon:
    """tests/helpers/client.py in a process of its own, once it reports connected."""
    out = bus.dir / f"{name}.out"
    d = bus.spawn(
        f"client-{name}", [sys.executable, CLIENT, bus.socket, name, topics, mode, str(out)]
    )
    d.wait_for("connected")
    return d


def quiet_writer(bus: Bus) -> Daemon:
    """A writer whose ticker does not tick: records come only from publish()."""
    bus.configure(writer={"source": {"type": "ticker", "rate": 0.0}})
    return bus.writer()


# -- clients in processes of their own --------------------------------------------------------


@pytest.mark.parametrize("mode", ["iter", "batches", "wait", "into", "poll", "async"])
def test_clients_get_every_record_of_their_topics_in_order(bus: Bus, mode: str) -> None:
    """Clients of all topics, topic 1, and topics 0 and 2 each get exactly theirs, in order."""
    w, fifo = fifo_writer(bus)
    wanted = {"all": {0, 1, 2}, "1": {1}, "0,2": {0, 2}}
    clients = {t: client(bus, f"c{i}", t, mode) for i, t in enumerate(wanted)}
    count = 500  # several laps of the 64-slot ring, under block
    go(fifo, count)
    assert w.wait_exit() == 0
    for topics, c in clients.items():
        assert c.wait_exit() == 0, c.stderr()
        done = c.wait_for("done")
        assert done["lost"] == 0
        got = read_lines(bus.dir / f"{c.name.removeprefix('client-')}.out")
        assert got == expected(count, wanted[topics]), f"topics {topics}"
        assert done["delivered"] == len(got)


def test_clients_subscribed_by_name_get_only_those_topics(bus: Bus) -> None:
    """A client of topics "one" and 2 (by name and id) gets exactly topics 1 and 2."""
    w, fifo = fifo_writer(bus, topics={"zero": 0, "one": 1, "two": 2})
    c = client(bus, "named", "one,2")
    go(fifo, 90)
    assert w.wait_exit() == 0
    assert c.wait_exit() == 0, c.stderr()
    assert read_lines(bus.dir / "named.out") == expected(90, {1, 2})


def test_a_client_sees_the_names_and_an_unknown_name_is_refused(bus: Bus) -> None:
    """The Welcome's map names the topics; a name the bus lacks is Refused(unknown_topic)."""
    bus.configure(
        segment={"topics": {"ticks": 0, "frames": 5}},
        writer={"source": {"type": "ticker", "rate": 0.0}},
    )
    w = bus.writer()
    with shmd.connect(bus.socket, name="n", topics=["frames"]) as sub:
        assert dict(sub.topics) == {"ticks": 0, "frames": 5}
        assert sub.topic_name(5) == "frames" and sub.topic_name(1) is None
    with pytest.raises(Refused) as info:
        shmd.connect(bus.socket, name="m", topics=["ticks", "tick"])
    assert info.value.code == "unknown_topic"
    assert "unknown topic 'tick' (this bus has: frames, ticks)" in str(info.value)
    assert w.wait_for("reader_refused", code="unknown_topic")


def test_a_killed_client_is_freed_and_64_clients_leave_the_writer_as_it_was(bus: Bus) -> None:
    """A SIGKILLed client is freed (reader_lost); 64 clients in turn leave no fd or mapping."""
    w = quiet_writer(bus)
    c = client(bus, "doomed")
    c.kill()
    assert c.wait_exit() == -signal.SIGKILL
    w.wait_for("reader_lost", reader="doomed")

    def census() -> tuple[int, list[str]]:
        # Mappings of files (segments, eventfds, libraries), not anonymous
        # ones: the allocator grows and shrinks those as it likes.
        fds = len(os.listdir(f"/proc/{w.pid}/fd"))
        rows = Path(f"/proc/{w.pid}/maps").read_text().splitlines()
        files = sorted(row.split(None, 5)[5] for row in rows if len(row.split(None, 5)) == 6)
        return fds, [f for f in files if not f.startswith("[")]

    before = census()
    for i in range(64):
        with shmd.connect(bus.socket, name=f"turn-{i}", timeout=5) as sub:
            assert sub.welcome is not None
        w.wait_for("reader_detached", reader=f"turn-{i}")
    # The writer handles each detach before it logs it: its fds are closed by then.
    assert census() == before


def durable_client(
    bus: Bus, name: str, mode: str, out: str, *, die_after: int = 0, grace: float = 30.0
) -> Daemon:
    """tests/helpers/client.py as durable reader ``name`` writing ``out``, once connected."""
    argv = [sys.executable, CLIENT, bus.socket, name, "all", mode, str(bus.dir / out)]
    d = bus.spawn(f"client-{out}", [*argv, "oldest", str(grace), str(die_after)])
    d.wait_for("connected")
    return d


@pytest.mark.parametrize("mode", ["iter", "batches", "poll", "async"])
def test_a_killed_durable_client_resumes_at_its_cursor_and_counts_what_comes_twice(
    bus: Bus, mode: str
) -> None:
    """Under block a SIGKILLed durable client's successor loses nothing; its repeats are counted."""
    w, fifo = fifo_writer(bus, block_timeout=20.0)
    first = durable_client(bus, "dur", mode, "a.out", die_after=150)
    count = 600  # the writer blocks on the dead reader's cursor, ring laps before and after
    go(fifo, count)
    assert first.wait_exit() == -signal.SIGKILL
    w.wait_for("reader_dormant", reader="dur")
    second = durable_client(bus, "dur", mode, "b.out")
    attached = w.wait_for("reader_attached", reader="dur", pid=second.pid)
    assert w.wait_exit() == 0
    assert second.wait_exit() == 0, second.stderr()
    done = second.wait_for("done")
    a, b = read_lines(bus.dir / "a.out"), read_lines(bus.dir / "b.out")
    assert len(a) >= 150
    everything = expected(count, {0, 1, 2})
    assert a == everything[: len(a)]
    # The successor starts at the first record its predecessor had not
    # finished with, and goes on to the end without a gap.
    start = everything.index(b[0])
    assert start <= len(a)
    assert b == everything[start:]
    twice = len(set(a) & set(b))
    assert twice > 0
    assert done["redelivered"] == twice
    assert int(attached["redelivered"]) == twice
    assert done["lost"] == 0


def test_a_durable_reader_that_does_not_come_back_is_freed_after_its_grace(bus: Bus) -> None:
    """A dormant durable entry is freed (reader_lost) when its grace ends without a successor."""
    w = quiet_writer(bus)
    c = durable_client(bus, "brief", "iter", "c.out", grace=0.5)
    c.kill()
    assert c.wait_exit() == -signal.SIGKILL
    w.wait_for("reader_dormant", reader="brief")
    lost = w.wait_for("reader_lost", reader="brief")
    assert "within 0.5 s" in lost["reason"]
    # The entry is free again: a client of the same name starts afresh.
    with shmd.connect(bus.socket, name="brief", timeout=5) as sub:
        assert sub.welcome is not None and not sub.welcome.resumed


def test_a_dormant_durable_reader_is_evicted_under_block_after_block_timeout(bus: Bus) -> None:
    """Under block the writer waits block_timeout for a dormant reader, then evicts it."""
    w, fifo = fifo_writer(bus, block_timeout=0.5)
    c = durable_client(bus, "gone", "iter", "d.out", die_after=1)
    go(fifo, 200)
    assert c.wait_exit() == -signal.SIGKILL
    w.wait_for("reader_dormant", reader="gone")
    w.wait_for("reader_evicted", reader="gone")
    lost = w.wait_for("reader_lost", reader="gone")
    assert "evicted while dormant" in lost["reason"]
    assert w.wait_exit() == 0


def test_a_durable_client_that_closes_suspends_and_a_plain_one_of_its_name_frees_it(
    bus: Bus,
) -> None:
    """close() of a durable client keeps its entry; a non-durable client of that name frees it."""
    w = quiet_writer(bus)
    with dial(bus.socket, timeout=5) as conn:
        with shmd.connect(bus.socket, name="dur", durable=30) as sub:
            assert sub.welcome is not None and not sub.welcome.resumed
            publish(conn, 0, b"one")
            assert [r.payload for r in itertools.islice(sub, 1)] == [b"one"]
        w.wait_for("reader_dormant", reader="dur", reason="it suspended")
        publish(conn, 0, b"two")
        mark = len(w.events)
        with shmd.connect(bus.socket, name="dur", durable=30) as sub:
            assert sub.welcome is not None and sub.welcome.resumed
            assert [r.payload for r in itertools.islice(sub, 1)] == [b"two"]
            assert sub.redelivered == 0
        w.wait_for("reader_dormant", reader="dur", since=mark)
    with shmd.connect(bus.socket, name="dur") as sub:
        assert sub.welcome is not None and not sub.welcome.resumed
    w.wait_for("reader_lost", reader="dur")


# -- a client in this process --------------------------------------------------------------------


def test_iteration_ends_cleanly_when_the_writer_stops_with_everything_delivered(bus: Bus) -> None:
    """for rec in sub ends after SIGTERM to the writer, having got every committed record."""
    w = quiet_writer(bus)
    with dial(bus.socket, timeout=5) as conn, shmd.connect(bus.socket, name="it") as sub:
        seqs = [publish(conn, 5, f"r{i}".encode()) for i in range(20)]
        got = []
        for rec in sub:
            got.append((rec.seq, rec.topic, bytes(rec.payload)))
            if len(got) == 20:
                w.terminate()
        assert got == [(s, 5, f"r{i}".encode()) for i, s in enumerate(seqs)]
        assert sub.ended and sub.delivered == 20 and sub.lost == 0
        assert sub.stop_reason == "writer_stopped"
    assert w.wait_exit() == 0
    w.wait_for("reader_detached", reader="it")


def test_wait_returns_true_for_records_and_on_timeout(bus: Bus) -> None:
    """wait(timeout) is True at once when records are there, and True after the timeout without."""
    quiet_writer(bus)
    with dial(bus.socket, timeout=5) as conn, shmd.connect(bus.socket, name="w") as sub:
        t0 = time.monotonic()
        assert sub.wait(0.05) is True
        assert time.monotonic() - t0 >= 0.04
        assert sub.read_batch() == []
        seq = publish(conn, 0, b"x")
        assert sub.wait(5.0) is True
        ((got_seq, _ts, topic, payload),) = sub.read_batch()
        assert (got_seq, topic, bytes(payload)) == (seq, 0, b"x")
        assert sub.lag == 0 and sub.cursor == seq + 1


def test_stop_ends_the_iteration_after_what_was_committed(bus: Bus) -> None:
    """stop() mid-stream delivers what was committed when asked, detaches, ends the iteration."""
    w = quiet_writer(bus)
    with dial(bus.socket, timeout=5) as conn, shmd.connect(bus.socket, name="s") as sub:
        for i in range(10):
            publish(conn, 0, b"%d" % i)
        got = []
        for rec in sub:
            got.append(rec.seq)
            if len(got) == 3:
                sub.stop("enough")
        assert len(got) == 10 and sub.stop_reason == "enough"
    w.wait_for("reader_detached", reader="s")


def test_an_asyncio_client_keeps_other_tasks_running_while_it_waits(bus: Bus) -> None:
    """While no records come a 10 ms ticker task keeps its period; a record is handled promptly."""
    quiet_writer(bus)

    async def scenario() -> tuple[float, float]:
        with dial(bus.socket, timeout=5) as conn, shmd.connect(bus.socket, name="a") as sub:
            got: asyncio.Queue[tuple[float, int]] = asyncio.Queue()

            async def consume() -> None:
                async for rec in sub:
                    await got.put((time.monotonic(), rec.seq))

            ticks: list[float] = []

            async def ticker() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)

            tasks = [asyncio.create_task(consume()), asyncio.create_task(ticker())]
            try:
                while len(ticks) < 50:  # half a second with nothing on the bus
                    await asyncio.sleep(0.01)
                assert got.empty()
                worst_gap = max(b - a for a, b in itertools.pairwise(ticks))
                sent = time.monotonic()
                seq = await asyncio.to_thread(publish, conn, 0, b"hello")
                handled, got_seq = await asyncio.wait_for(got.get(), 5.0)
                assert got_seq == seq
                return worst_gap, handled - sent
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    worst_gap, latency = asyncio.run(scenario())
    # Bounds far above what a loaded 2-core machine shows (a few ms): the
    # point is that the consumer never blocks the loop while it waits.
    assert worst_gap < 0.5, worst_gap
    assert latency < 2.0, latency


def test_fileno_is_readable_only_when_poll_has_work(bus: Bus) -> None:
    """After poll() returns [] the fd is quiet; a publish makes it readable, poll() returns it."""
    quiet_writer(bus)
    with dial(bus.socket, timeout=5) as conn, shmd.connect(bus.socket, name="p") as sub:
        assert sub.poll() == []
        assert select.select([sub.fileno()], [], [], 0.05)[0] == []
        seq = publish(conn, 2, b"ping")
        assert select.select([sub.fileno()], [], [], 5.0)[0] == [sub.fileno()]
        (rec,) = sub.poll() or []
        assert (rec.seq, rec.topic, bytes(rec.payload)) == (seq, 2, b"ping")
        assert sub.poll() == []
        assert select.select([sub.fileno()], [], [], 0.05)[0] == []


# -- errors a user meets -------------------------------------------------------------------------


def test_no_writer_is_bus_unavailable_after_the_timeout(bus: Bus) -> None:
    """connect() to a socket nobody creates fails after ``timeout`` with what to start."""
    with pytest.raises(BusUnavailable, match=r"is shm-writer.socket running\?"):
        shmd.connect(bus.socket, timeout=0.3)


def test_a_name_in_use_is_refused(bus: Bus) -> None:
    """A second client of an attached client's name is Refused(duplicate_instance)."""
    quiet_writer(bus)
    with shmd.connect(bus.socket, name="twin"), pytest.raises(Refused) as info:
        shmd.connect(bus.socket, name="twin")
    assert info.value.code == "duplicate_instance"


@pytest.fixture
def world_readable_shmd() -> Iterator[Path]:
    """A copy of the shmd package any user can import (the checkout may be in a mode-700 home)."""
    where = Path(tempfile.mkdtemp(prefix="shmd-pkg-"))
    try:
        shutil.copytree(
            Path(shmd.__file__).parent, where / "shmd", ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in [where, *where.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield where
    finally:
        shutil.rmtree(where)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
@pytest.mark.parametrize("socket_mode", [0o666, 0o660])
def test_a_user_the_writer_does_not_admit_gets_not_admitted(
    bus: Bus, socket_mode: int, world_readable_shmd: Path
) -> None:
    """uid 65534: refused by the writer (logged) on an open socket, or by the socket's mode."""
    os.chmod(bus.dir, 0o755)
    bus.configure(
        control={"mode": f"0{socket_mode:o}"}, writer={"source": {"type": "ticker", "rate": 0.0}}
    )
    w = bus.writer()
    code = (
        "import shmd, sys\n"
        "try:\n"
        f"    shmd.connect({bus.socket!r}, timeout=2)\n"
        "except shmd.NotAdmitted as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    # The system interpreter (the venv's may lie in a directory uid 65534
    # cannot read), with Debian's pyyaml and structlog and the copy above.
    python = os.path.realpath(sys.executable)
    c = bus.spawn(
        "nobody",
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", code],
        stdout=subprocess.PIPE,
        env={**bus.env, "PYTHONPATH": str(world_readable_shmd)},
        cwd="/",
    )
    assert c.wait_exit() == 3, c.stderr()
    assert c.proc.stdout is not None
    message = c.proc.stdout.read().decode()
    if socket_mode == 0o666:
        assert "the writer refused: uid 65534 is not allowed to attach" in message
        assert w.wait_for("reader_refused", code="not_allowed")["uid"] == 65534
    else:
        assert "may not open it (owned by root:" in message and "mode 0660" in message


def test_names_and_topics_are_checked_before_dialling(bus: Bus) -> None:
    """A bad name or topic id fails at once with one line, before any socket is touched."""
    with pytest.raises(ValueError, match="instance name"):
        shmd.connect(bus.socket, name="has space")
    with pytest.raises(shmd.ShmdError, match=r"64 is not a topic id 0\.\.63"):
        shmd.connect(bus.socket, topics=[1, 64])


def test_a_segment_is_never_unlinked_by_a_client(bus: Bus) -> None:
    """Closing a client leaves the writer's segment in place (the creator owns it)."""
    quiet_writer(bus)
    shmd.connect(bus.socket, name="x").close()
    assert bus.segment_exists()
