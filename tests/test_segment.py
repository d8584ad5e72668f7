"""shmd.bus.segment: creating, opening, mapping and tearing down shm segments."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable

import pytest
from helpers import ChildEnd, Procs, fd_targets, in_dev_shm, maps_lines

from shmd._sys import libc
from shmd._sys.fd import OwnedFd
from shmd.bus.layout import (
    LAYOUT_VERSION,
    MAGIC,
    OFF_VERSION,
    RU_STATE,
    Geometry,
    Policy,
    ReaderState,
)
from shmd.bus.segment import Segment
from shmd.errors import (
    MutexNotWritable,
    SegmentClosed,
    SegmentExists,
    SegmentLayoutError,
    SegmentNotFound,
)

GEOMETRY = Geometry(capacity=8, slot_size=64, max_readers=4)


def create(name: str, **kwargs: object) -> Segment:
    """A fresh segment with the small test geometry."""
    return Segment.create(name, GEOMETRY, Policy.DROP_OLDEST, **kwargs)  # type: ignore[arg-type]


def perms(lines: list[str]) -> dict[int, str]:
    """Map file offset -> permission string, from /proc/PID/maps lines."""
    return {int(line.split()[2], 16): line.split()[1] for line in lines}


# -- creating and mapping ---------------------------------------------------------------


def test_create_writes_a_valid_header_and_maps_two_parts(shm_name: str) -> None:
    """A created segment validates, and the creator maps control and ring read-write."""
    with create(shm_name, write_seq=1000) as seg:
        h = seg.header()
        assert (h.magic, h.version, h.writer_pid, h.active) == (
            MAGIC,
            LAYOUT_VERSION,
            os.getpid(),
            True,
        )
        assert seg.write_seq == seg.reserve_seq == 1000
        assert os.fstat(seg.fileno()).st_size == GEOMETRY.segment_size
        assert perms(maps_lines(shm_name)) == {0: "rw-s", GEOMETRY.ring_offset: "rw-s"}
        assert fcntl.fcntl(seg.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_create_applies_the_mode_despite_the_umask(shm_name: str) -> None:
    """The configured mode is what /dev/shm shows, whatever the process umask."""
    old = os.umask(0o077)
    try:
        with create(shm_name, mode=0o640):
            assert stat.S_IMODE(os.stat(f"/dev/shm{shm_name}").st_mode) == 0o640
    finally:
        os.umask(old)


def test_each_creation_gets_a_new_generation(shm_names: Callable[[], str]) -> None:
    """Two segments created one after the other never share a generation."""
    name = shm_names()
    with create(name) as first:
        gen = first.generation
    Segment.unlink_name(name)
    with create(name) as second:
        assert second.generation != gen


def test_create_on_an_existing_name_raises_and_leaves_it(shm_name: str) -> None:
    """Creating a name that exists raises SegmentExists and does not touch the existing segment."""
    with create(shm_name) as seg:
        seg.ring[0:4] = b"mine"
        with pytest.raises(SegmentExists, match="already exists"):
            create(shm_name)
        assert in_dev_shm(shm_name)
        with Segment.open(name=shm_name) as again:
            assert bytes(again.ring[0:4]) == b"mine"
            assert again.generation == seg.generation


def test_open_maps_the_ring_read_only(shm_name: str) -> None:
    """An opener's ring is PROT_READ: a Python store raises TypeError, the kernel shows r--s."""
    with create(shm_name), Segment.open(name=shm_name) as seg:
        assert seg.ring.readonly
        with pytest.raises(TypeError, match="cannot modify read-only memory"):
            seg.ring[0] = 1
        with pytest.raises(TypeError):
            seg.ring[0:4] = b"evil"
        mine = [line for line in maps_lines(shm_name) if "r--s" in line]
        assert perms(mine) == {GEOMETRY.ring_offset: "r--s"}


def test_control_mapped_read_only_cannot_lock(shm_name: str) -> None:
    """Locking through a read-only control mapping raises MutexNotWritable, not a SIGSEGV."""
    with create(shm_name), Segment.open(name=shm_name, control_writable=False) as ro:
        with pytest.raises(
            MutexNotWritable, match="shared mutex since it lives in memory mapped read-only"
        ):
            ro.lock(0.1)
        with pytest.raises(MutexNotWritable, match="shared semaphore"):
            ro.sem_post()
        assert ro.header().magic == MAGIC  # reading still works


def test_lock_unlock_and_owner(shm_name: str) -> None:
    """The segment's mutex locks, shows this process as owner, and unlocks."""
    with create(shm_name) as seg:
        assert seg.lock(0) is libc.LockResult.ACQUIRED
        assert seg.mutex_owner() == os.getpid()
        seg.unlock()
        assert seg.mutex_owner() == 0


def test_semaphore_through_the_segment(shm_name: str) -> None:
    """A post through one mapping is taken through another; drain forgets extra posts."""
    with create(shm_name) as seg, Segment.open(name=shm_name) as other:
        other.sem_post()
        assert seg.sem_wait(1.0)
        other.sem_post()
        other.sem_post()
        seg.sem_drain()
        assert not seg.sem_wait(0.01)


def test_info_lists_attached_entries_only(shm_name: str) -> None:
    """info() reports attached and evicted entries, never free ones."""
    with create(shm_name) as seg:
        for index, state in [
            (0, ReaderState.ATTACHED),
            (1, ReaderState.FREE),
            (2, ReaderState.EVICTED),
            (3, ReaderState.ATTACHED),
        ]:
            _, u0 = Segment.entry_words(index)
            seg.u[u0 + RU_STATE] = state
        assert [e.index for e in seg.info().readers] == [0, 2, 3]


# -- lifecycle: close, munmap, unlink --------------------------------------------------------


def test_close_unmaps_and_closes_but_keeps_the_name(shm_name: str) -> None:
    """close() removes this process's mappings and fd; the name and the data stay."""
    seg = create(shm_name)
    seg.ring[0:5] = b"hello"
    assert len(maps_lines(shm_name)) == 2
    seg.close()
    seg.close()  # idempotent
    assert seg.closed
    assert maps_lines(shm_name) == []
    assert f"/dev/shm{shm_name}" not in fd_targets()
    assert in_dev_shm(shm_name)
    with Segment.open(name=shm_name) as again:
        assert bytes(again.ring[0:5]) == b"hello"


def test_unlink_removes_the_name_but_not_the_mapping(shm_name: str) -> None:
    """After unlink, opening fails but this process's mapping still reads and writes the memory."""
    seg = create(shm_name)
    try:
        Segment.unlink_name(shm_name)
        assert not in_dev_shm(shm_name)
        with pytest.raises(SegmentNotFound, match="is the writer running"):
            Segment.open(name=shm_name)
        lines = maps_lines(shm_name)
        assert len(lines) == 2 and all(line.endswith("(deleted)") for line in lines)
        seg.ring[0:3] = b"abc"
        assert bytes(seg.ring[0:3]) == b"abc"
    finally:
        seg.close()
    # The last mapping and fd are gone: so is the memory, nothing maps it.
    assert maps_lines(shm_name) == []


def test_close_with_a_live_zero_copy_view_defers_munmap(shm_name: str) -> None:
    """close() with a view still held keeps the ring mapped until the view is dropped."""
    seg = create(shm_name)
    seg.ring[0:4] = b"live"
    view = seg.ring[0:4]
    seg.close()
    assert seg.closed
    assert perms(maps_lines(shm_name)) == {GEOMETRY.ring_offset: "rw-s"}
    assert bytes(view) == b"live"
    view.release()
    del view
    gc.collect()
    assert maps_lines(shm_name) == []


def test_another_process_keeps_reading_after_unlink_and_close(
    shm_name: str,
    procs: Procs,
) -> None:
    """A spawned process that opened the name shares the memory after unlink and our close."""
    seg = create(shm_name)
    try:
        seg.ring[0:6] = b"before"
        peek = procs.python("peek.py", shm_name, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out = procs.lines(peek, "peek")
        assert peek.stdin is not None
        assert out.expect("ready").split()[1] == str(seg.generation)

        def ask(cmd: str) -> str:
            assert peek.stdin is not None
            peek.stdin.write(cmd.encode() + b"\n")
            peek.stdin.flush()
            line = out.readline()
            assert line is not None
            return line

        assert bytes.fromhex(ask("ring 0 6")) == b"before"
        Segment.unlink_name(shm_name)
        assert not in_dev_shm(shm_name)
        seg.ring[0:6] = b"after!"  # written after the name is gone
        assert bytes.fromhex(ask("ring 0 6")) == b"after!"
    finally:
        seg.close()
    assert maps_lines(shm_name) == []
    assert ask("maps") == "2"  # the peer's two mappings keep the memory alive
    assert bytes.fromhex(ask("ring 0 6")) == b"after!"
    peek.stdin.write(b"quit\n")
    peek.stdin.close()
    assert peek.wait(timeout=20) == 0


def test_fork_child_writes_are_visible_to_the_parent(shm_name: str, procs: Procs) -> None:
    """A forked child shares the parent's mapping: its stores show up in the parent and back."""
    seg = create(shm_name)
    try:

        def body(ch: ChildEnd) -> None:
            seg.ring[0:5] = b"child"
            seg.q[Segment.HEARTBEAT_NS] = 4242
            ch.send("wrote")
            assert ch.recv() == "check"
            ch.send(bytes(seg.ring[8:14]).decode())

        child = procs.fork(body)
        child.expect("wrote")
        assert bytes(seg.ring[0:5]) == b"child"
        assert seg.header().heartbeat_ns == 4242
        seg.ring[8:14] = b"parent"
        child.tell("check")
        assert child.expect("parent") == "parent"
        assert child.wait() == 0
    finally:
        seg.close()


# -- opening: fds, validation, errors --------------------------------------------------------


def test_open_needs_exactly_one_of_name_and_fd(shm_name: str) -> None:
    """Passing both or neither of name and fd raises ValueError."""
    with create(shm_name) as seg:
        with pytest.raises(ValueError, match="exactly one of name or fd"):
            Segment.open()
        with pytest.raises(ValueError, match="exactly one of name or fd"):
            Segment.open(name=shm_name, fd=seg.fileno())


def test_open_by_int_fd_duplicates_it(shm_name: str) -> None:
    """An int fd is duplicated: closing the opened segment leaves the caller's fd open."""
    with create(shm_name) as seg:
        opened = Segment.open(fd=seg.fileno())
        assert opened.fileno() != seg.fileno()
        opened.close()
        os.fstat(seg.fileno())  # still open


def test_open_by_owned_fd_takes_it_over(shm_name: str) -> None:
    """An OwnedFd is taken over: closing the segment closes it."""
    with create(shm_name) as seg:
        owned = OwnedFd(os.dup(seg.fileno()))
        opened = Segment.open(fd=owned)
        assert opened.fileno() == owned.fileno()
        opened.close()
        assert owned.closed


def test_open_by_fd_of_a_pipe_is_refused() -> None:
    """An fd that is not a shm object raises SegmentLayoutError and is closed."""
    r, w = os.pipe()
    try:
        owned = OwnedFd(r)
        with pytest.raises(
            SegmentLayoutError,
            match=r"Failed to attach to fd \d+ since it is "
            r"not a shm object",
        ):
            Segment.open(fd=owned)
        assert owned.closed
    finally:
        os.close(w)


def test_closed_segment_raises_segment_closed(shm_name: str) -> None:
    """Using a closed segment's fd or mutex raises SegmentClosed."""
    seg = create(shm_name)
    seg.close()
    with pytest.raises(SegmentClosed):
        seg.fileno()
    with pytest.raises(SegmentClosed):
        seg.lock(0)


def _corrupt(name: str, what: str) -> None:
    seg = create(name)
    try:
        if what == "magic":
            seg.control[0:8] = b"NOTSHMD!"
        elif what == "version":
            seg.u[OFF_VERSION // 4] = LAYOUT_VERSION + 1
    finally:
        seg.close()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("magic", r"magic is b'NOTSHMD!', not b'SHMDBUS1' \(not an shmd segment\)"),
        (
            "version",
            rf"layout version {LAYOUT_VERSION + 1}, and this shmd reads version "
            rf"{LAYOUT_VERSION} \(upgrade or restart the other side\)",
        ),
    ],
)
def test_open_refuses_a_foreign_header(shm_name: str, what: str, message: str) -> None:
    """A wrong magic or layout version raises SegmentLayoutError naming it; nothing is mapped."""
    _corrupt(shm_name, what)
    before = os.stat(f"/dev/shm{shm_name}")
    with pytest.raises(SegmentLayoutError, match=message):
        Segment.open(name=shm_name)
    assert maps_lines(shm_name) == []
    assert f"/dev/shm{shm_name}" not in fd_targets()
    # Opening never unlinks, recreates nor resizes it.  (Only this object is
    # compared: other test runs on the machine create and remove theirs.)
    after = os.stat(f"/dev/shm{shm_name}")
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)


def test_open_refuses_an_object_too_small_for_the_header(shm_name: str) -> None:
    """A shm object smaller than the header raises SegmentLayoutError with both sizes."""
    fd = OwnedFd(libc.shm_open(shm_name, os.O_RDWR | os.O_CREAT | os.O_EXCL))
    with fd:
        os.ftruncate(fd.fileno(), 100)
    with pytest.raises(
        SegmentLayoutError,
        match=f"'{shm_name}' since it is 100 bytes, too small for the 256-byte header",
    ):
        Segment.open(name=shm_name)
    assert maps_lines(shm_name) == []


def test_open_refuses_a_header_claiming_more_than_the_object(shm_name: str) -> None:
    """A header claiming a bigger segment than the object is refused before mapping it."""
    create(shm_name).close()
    fd = OwnedFd(libc.shm_open(shm_name, os.O_RDWR))
    with fd:
        os.ftruncate(fd.fileno(), GEOMETRY.ring_offset)  # cut the ring off
    with pytest.raises(
        SegmentLayoutError,
        match=f"is {GEOMETRY.ring_offset} bytes but its header claims {GEOMETRY.segment_size}",
    ):
        Segment.open(name=shm_name)


def test_open_after_the_name_is_gone(shm_name: str) -> None:
    """Opening an unlinked name raises SegmentNotFound asking whether the writer runs."""
    create(shm_name).close()
    Segment.unlink_name(shm_name)
    with pytest.raises(
        SegmentNotFound,
        match=f"Failed to open shared-memory segment "
        rf"'{shm_name}' since no segment of that name "
        r"exists \(is the writer running\?\)",
    ):
        Segment.open(name=shm_name)
    assert not in_dev_shm(shm_name)


# -- posix_fallocate reservation ---------------------------------------------------------------

_FULL_SHM_PROBE = """
import json, os, sys
from shmd.errors import SegmentError
from shmd.bus.layout import Geometry, Policy
from shmd.bus.segment import Segment
try:
    Segment.create(sys.argv[1], Geometry(1024, 4096, 4), Policy.DROP_OLDEST)
except SegmentError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                      "left": os.listdir("/dev/shm")}))
else:
    print(json.dumps({"error": None}))
"""


def test_create_on_a_full_dev_shm_fails_at_once_and_leaves_nothing(
    shm_name: str,
    procs: Procs,
) -> None:
    """posix_fallocate makes a too-small /dev/shm a SegmentError at creation, with no leftover."""
    # The host's /dev/shm cannot be shrunk for a test, so the child gets a
    # private mount namespace with a 1 MiB tmpfs on /dev/shm.
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private 1 MiB /dev/shm")
    script = 'mount -t tmpfs -o size=1m shmd-test /dev/shm || exit 77; exec "$0" -c "$1" "$2"'
    proc = procs.spawn(
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            sys.executable,
            _FULL_SHM_PROBE,
            shm_name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=30)
    if proc.returncode == 77 or b"unshare failed" in err:
        pytest.skip(f"cannot mount a private tmpfs here: {err.decode().strip()}")
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["error"] == "SegmentError"
    assert result["message"] == (
        f"Failed to reserve {Geometry(1024, 4096, 4).segment_size} bytes for segment "
        f"{shm_name!r} since /dev/shm has no room for it"
    )
    assert result["left"] == []
    assert not in_dev_shm(shm_name)  # and the host's /dev/shm never saw it
