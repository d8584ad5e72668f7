"""The writer's fd store: what it keeps with systemd, and what it starts from.

The fd store (FileDescriptorStoreMax= in the unit) holds, by name:
``segment`` (the shm fd), ``lifeline-r``/``lifeline-w`` (the lifeline pipe)
and ``reader-<index>`` (each attached reader's eventfd, named by
:func:`reader_name`).  It survives ``systemctl restart`` and a crash followed
by ``Restart=on-failure``; ``systemctl stop`` releases it (systemd 252),
which hangs up the lifeline and tells readers the bus is gone.  At start
systemd hands the stored fds back, with the socket-activated listener
(``control``), through LISTEN_FDS/LISTEN_FDNAMES: :func:`inherited` sorts
them, and :func:`recover` turns them into the writer's segment (adopted or
new), its lifeline and the readers it waits for (:class:`RestoredReaders`).

Every call to sd_notify here is a no-op without NOTIFY_SOCKET (not run by
systemd), so the writer runs the same code either way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

from shmd._sys.fd import OwnedFd
from shmd.bus.layout import Geometry, Policy
from shmd.bus.publisher import Eviction, Publisher, ReaderHandle
from shmd.bus.segment import Segment
from shmd.config import Config
from shmd.daemons import logs, sdnotify
from shmd.errors import ShmdError

#: The socket-activated listener (FileDescriptorName= in shm-writer.socket).
CONTROL = "control"
SEGMENT = "segment"
LIFELINE_R = "lifeline-r"
LIFELINE_W = "lifeline-w"
_READER = "reader-"
#: The segment's file mode: the writer's group (shmd) may read it, so that
#: operators in that group can run `shmctl status`; readers need no access
#: at all (they get the fd over the socket).
SEGMENT_MODE = 0o640


def reader_name(index: int) -> str:
    """The fd store's name for the eventfd of the reader at table ``index``."""
    return f"{_READER}{index}"


def reader_index(name: str) -> int | None:
    """The table index a :func:`reader_name` names; None for a malformed one."""
    suffix = name[len(_READER) :]
    return int(suffix) if name.startswith(_READER) and suffix.isdigit() else None


@dataclass
class Inherited:
    """The fds systemd passed at start, sorted by name; whoever takes one owns it."""

    #: The listener's fds (raw: the socket object takes them), None without activation.
    control: list[int] | None = None
    segment: list[OwnedFd] = field(default_factory=list)
    lifeline_r: list[OwnedFd] = field(default_factory=list)
    lifeline_w: list[OwnedFd] = field(default_factory=list)
    #: The stored eventfds by ``reader-…`` name.
    readers: dict[str, list[OwnedFd]] = field(default_factory=dict)


def inherited(fds: Mapping[str, list[int]] | None = None) -> Inherited:
    """Sort LISTEN_FDNAMES' fds (:func:`sdnotify.listen_fds` unless given); others are closed.

    The listener may come unnamed (``systemd-socket-activate`` without
    ``--fdname``, or FileDescriptorName= missing): "unknown" then.
    """
    grouped = dict(sdnotify.listen_fds() if fds is None else fds)
    control = grouped.pop(CONTROL, None) or grouped.pop(sdnotify.UNKNOWN_FDNAME, None)
    owned = {name: [OwnedFd(fd) for fd in group] for name, group in grouped.items()}
    found = Inherited(
        control=control,
        segment=owned.pop(SEGMENT, []),
        lifeline_r=owned.pop(LIFELINE_R, []),
        lifeline_w=owned.pop(LIFELINE_W, []),
        readers={name: owned.pop(name) for name in list(owned) if name.startswith(_READER)},
    )
    for group in owned.values():
        for f in group:
            f.close()
    return found


def keep(name: str, fd: int) -> None:
    """Store ``fd`` as the one fd named ``name`` (replacing what was stored under it).

    systemd keeps a duplicate: the caller still owns ``fd``.
    """
    sdnotify.remove_fds(name)
    sdnotify.store_fds(name, [fd])


def keep_reader(index: int, eventfd: OwnedFd) -> None:
    """Store a newly attached reader's eventfd (nothing stale may stay under its name)."""
    keep(reader_name(index), eventfd.fileno())


def forget_reader(index: int) -> None:
    """Drop a reader's stored eventfd: a later reader at that index stores its own."""
    sdnotify.remove_fds(reader_name(index))


@dataclass
class Recovered:
    """What the writer starts with: its segment, lifeline and the readers it waits for."""

    pub: Publisher
    lifeline_r: OwnedFd
    lifeline_w: OwnedFd
    #: Readers of the adopted segment, waiting for them to reconnect.
    restored: dict[int, ReaderHandle]
    #: Stored eventfds of readers of a stored segment that could not be
    #: adopted: woken once the writer listens (:func:`wake_orphans`), they
    #: reconnect and start over (generation_changed).
    orphans: list[OwnedFd]
    #: The socket-activated listener's fds, if any.
    control: list[int] | None


def recover(cfg: Config, log: FilteringBoundLogger, found: Inherited | None = None) -> Recovered:
    """Adopt the segment systemd kept for us across a restart, or create a new one.

    Then store what the next restart needs: the segment, the lifeline and
    the restored readers' eventfds.
    """
    found = inherited() if found is None else found
    pub = _adopt(cfg, log, found.segment)
    lifeline_r, lifeline_w = _lifeline(found)
    restored: dict[int, ReaderHandle] = {}
    orphans: list[OwnedFd] = []
    if pub is None:
        seg = cfg.segment
        pub = Publisher.create(
            seg.name,
            capacity=seg.capacity,
            slot_size=seg.slot_size,
            max_readers=seg.max_readers,
            policy=Policy.parse(seg.policy),
            block_timeout=seg.block_timeout,
            mutex_timeout=seg.mutex_timeout,
            mode=SEGMENT_MODE,
        )
        for fds in found.readers.values():
            orphans += fds[:1]
            for f in fds[1:]:
                f.close()
    else:
        restored = _restore_readers(pub, found.readers)
    found.readers = {}
    keep(SEGMENT, pub.segment.fileno())
    keep(LIFELINE_R, lifeline_r.fileno())
    keep(LIFELINE_W, lifeline_w.fileno())
    for index, handle in restored.items():
        keep_reader(index, handle.eventfd)
    return Recovered(pub, lifeline_r, lifeline_w, restored, orphans, found.control)


def _lifeline(found: Inherited) -> tuple[OwnedFd, OwnedFd]:
    """The stored lifeline pipe, or a new one unless exactly one of each end was stored.

    The stored lifeline is kept even with a new generation: the readers
    holding its read end wait for us (and we wake them), they must not see
    it hang up and leave.
    """
    r, w = found.lifeline_r, found.lifeline_w
    found.lifeline_r, found.lifeline_w = [], []
    if len(r) == 1 and len(w) == 1:
        return r[0], w[0]
    for f in (*r, *w):
        f.close()
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    return OwnedFd(rfd), OwnedFd(wfd)


def _adopt(cfg: Config, log: FilteringBoundLogger, segment_fds: list[OwnedFd]) -> Publisher | None:
    """The stored segment as a Publisher, or None (nothing stored, or unusable)."""
    if not segment_fds:
        return None
    for extra in segment_fds[1:]:
        extra.close()
    seg = cfg.segment
    try:
        # A look first: a segment the configuration no longer describes
        # is not adopted (nor copied) at all.
        with Segment.open(fd=segment_fds[0].fileno()) as stored:
            mismatch = _config_mismatch(cfg, log, stored.geometry, Policy(stored.header().policy))
            if mismatch:
                # Tells its waiting readers that a successor is up (see
                # ReaderDaemon._await_writer); they also get a wake-up.
                stored.u[Segment.WRITER_PID] = os.getpid()
        if mismatch:
            segment_fds[0].close()
            return None
        return Publisher.adopt(
            seg.name,
            segment_fds[0],
            block_timeout=seg.block_timeout,
            mutex_timeout=seg.mutex_timeout,
            mode=SEGMENT_MODE,
        )
    except (ShmdError, OSError) as exc:
        log.error(
            logs.SEGMENT_INVALID,
            segment=seg.name,
            error=str(exc),
            action="starting a new generation; readers start over",
        )
        segment_fds[0].close()
        return None


def _config_mismatch(cfg: Config, log: FilteringBoundLogger, g: Geometry, policy: Policy) -> bool:
    """A stored segment whose geometry the configuration changed is not reused."""
    seg = cfg.segment
    want = (seg.capacity, seg.slot_size, seg.max_readers, Policy.parse(seg.policy))
    have = (g.capacity, g.slot_size, g.max_readers, policy)
    if want == have:
        return False
    log.warning(
        logs.SEGMENT_INVALID,
        segment=seg.name,
        error=f"the stored segment has capacity, slot size, max_readers, policy "
        f"{have} but the configuration says {want}",
        action="starting a new generation; readers start over",
    )
    return True


def _restore_readers(pub: Publisher, stored: dict[str, list[OwnedFd]]) -> dict[int, ReaderHandle]:
    """Re-own the adopted segment's attached entries with their stored eventfds."""
    restored: dict[int, ReaderHandle] = {}
    for name, fds in stored.items():
        index = reader_index(name)
        if index is None or len(fds) != 1:
            for f in fds:
                f.close()
            continue
        handle = pub.restore_reader(index, fds[0])
        if handle is not None:
            restored[index] = handle
    pub.free_unclaimed()
    return restored


def wake_orphans(orphans: list[OwnedFd], generation: int, log: FilteringBoundLogger) -> None:
    """Wake (and close) the eventfds of the readers of the segment we could not adopt.

    They reconnect asking to resume in the old generation, and start over
    in the new one.
    """
    for efd in orphans:
        try:
            os.write(efd.fileno(), (1).to_bytes(8, "little"))
        except OSError:
            pass  # a full counter wakes the reader just as well
        finally:
            efd.close()
    log.info(
        logs.READERS_WOKEN,
        generation=generation,
        readers=len(orphans),
        reason="the stored segment could not be adopted; they start over",
    )


class RestoredReaders:
    """The adopted segment's readers, held for them until they reconnect or the grace ends.

    Each keeps its table entry and stored eventfd; the control server
    hands the entry back to the reader's resuming Hello (:meth:`claim`).
    """

    def __init__(
        self,
        pub: Publisher,
        handles: dict[int, ReaderHandle],
        lock: threading.Lock,
        log: FilteringBoundLogger,
    ) -> None:
        self.pub = pub
        self.handles = handles
        self._lock = lock
        self._log = log

    def __bool__(self) -> bool:
        return bool(self.handles)

    def names(self) -> list[str]:
        """The readers still awaited."""
        return [h.name for h in self.handles.values()]

    def claim(self, name: str, pid: int, resume: bool, cursor: int) -> ReaderHandle | None:
        """The entry of reader ``name`` resuming at ``cursor``, None when none is held for it.

        A new process of a reader we were waiting for (not ``resume``) frees
        the old one's entry: it must not hold the ring up until the grace ends.
        """
        handle = next((h for h in self.handles.values() if h.name == name), None)
        if handle is None:
            return None
        if not resume:
            self.forget(handle.index, "a new process of the reader attached")
            return None
        # A reader of the segment we adopted: same entry, same eventfd.
        del self.handles[handle.index]
        with self._lock:
            self.pub.resume_reader(handle.index, pid, cursor)
        return handle

    def pop_durable(self, name: str) -> ReaderHandle | None:
        """The held entry of durable reader ``name``, for a new process of it; None if none."""
        handle = next((h for h in self.handles.values() if h.name == name), None)
        if handle is None or not self.pub.segment.entry(handle.index).durable_ms:
            return None
        del self.handles[handle.index]
        return handle

    def expire(self, grace: float, keep: Callable[[ReaderHandle, str], bool]) -> None:
        """The grace is over: the readers that did not reconnect within it are gone.

        ``keep`` may keep one instead (a durable reader's entry: True).
        """
        why = f"did not reconnect within {grace:g} s of the writer's restart"
        for index in list(self.handles):
            if keep(self.handles[index], why):
                del self.handles[index]
            else:
                self.forget(index, why)

    def forget(self, index: int, reason: str) -> None:
        """Free a restored reader's entry and stored eventfd; log it as lost."""
        handle = self.handles.pop(index)
        with self._lock:
            entry = self.pub.remove_reader(index)
        forget_reader(index)
        self._log.warning(
            logs.READER_LOST,
            reader=handle.name,
            pid=handle.pid,
            index=index,
            generation=self.pub.generation,
            seq=entry.cursor if entry else None,
            reason=reason,
        )

    def evicted(self, ev: Eviction) -> None:
        """The publisher evicted ``ev`` (policy block); log it if it was one of ours."""
        if self.handles.pop(ev.index, None) is not None:
            self._log.warning(
                logs.READER_LOST,
                reader=ev.name,
                pid=ev.pid,
                index=ev.index,
                generation=self.pub.generation,
                seq=ev.cursor,
                lag=ev.write_seq - ev.cursor,
                reason="evicted before it reconnected: it held the ring up under policy block",
            )
