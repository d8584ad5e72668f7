"""iceoryx2 peer (Python bindings of eclipse-iceoryx/iceoryx2), event-driven.

A publish-subscribe service carries the records (``Slice[c_uint8]`` of the payload size,
static allocation); an event service wakes the readers, so they sleep in
``Listener.timed_wait`` instead of polling (bounded at 10 ms as a safety net against a
lost wake-up; such rescues are counted and reported as ``missed_wakeups``). Nothing is
dropped: safe overflow is off and the publisher's backpressure strategy is
``RetryUntilDelivered`` (send waits while a reader's buffer, sized to the case's depth,
is full). A second event service lets each reader announce itself; the writer re-checks
the subscriber count after every such wake until all readers are attached.

Two variants:

``iceoryx2`` (copying)
    The writer copies the whole record into the loaned sample; readers copy the payload
    out into ``bytes`` and release the sample at once.
``iceoryx2-zc`` (zero-copy)
    The writer fills only the 16-byte head and 8-byte tail of the loaned sample (the
    payload is taken to be produced in place); readers check the record in place through
    a memoryview and release the sample on the next receive.

Every file iceoryx2 creates carries the run's prefix (``harness.shm_prefix``) and lives in
the run's private directory or in ``/dev/shm/<prefix>*``, so cleanup removes exactly this
run's leftovers after a crash, and ``sweep_stale`` those of a harness that was killed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import (
    HEAD,
    SHM_DIR,
    TAIL,
    Buffer,
    Case,
    Reader,
    StreamImpl,
    Writer,
    shm_prefix,
)

MISSING: str | None
try:
    # iceoryx2 ships no type information: pyproject.toml's mypy overrides
    # take it as Any.
    import iceoryx2 as iox2

    MISSING = None
except ImportError as exc:  # optional: the impl reports itself unavailable
    MISSING = (
        f"iceoryx2 is not installed ({exc}; pip install 'iceoryx2>=0.10,<0.11', or the bench extra)"
    )


#: Longest a reader sleeps before it looks for samples without a wake-up.
SAFETY_NET_S = 0.01


@dataclass(frozen=True)
class IoxChannel:
    prefix: str
    root: str
    service: str
    readers: int
    depth: int
    payload: int
    zero_copy: bool


def _node(chan: IoxChannel) -> Any:
    config = iox2.config.default()
    config.global_cfg.prefix = iox2.FileName.new(chan.prefix)
    config.global_cfg.root_path = iox2.Path.new(chan.root + "/")
    return (
        iox2.NodeBuilder.new()
        .config(config)
        .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
        .create(iox2.ServiceType.Ipc)
    )


def _pubsub(node: Any, chan: IoxChannel) -> Any:
    return (
        node.service_builder(iox2.ServiceName.new(chan.service))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .max_publishers(1)
        .max_subscribers(chan.readers)
        .max_nodes(chan.readers + 1)
        .history_size(0)
        .subscriber_max_buffer_size(chan.depth)
        .enable_safe_overflow(False)
    )


def _event(node: Any, chan: IoxChannel, purpose: str) -> Any:
    return (
        node.service_builder(iox2.ServiceName.new(f"{chan.service}/{purpose}"))
        .event()
        .max_notifiers(chan.readers + 1)
        .max_listeners(chan.readers + 1)
        .max_nodes(chan.readers + 1)
    )


class _IoxWriter:
    def __init__(self, chan: IoxChannel) -> None:
        self._chan = chan
        self._node = _node(chan)
        self._service = _pubsub(self._node, chan).create()
        self._publisher = (
            self._service.publisher_builder()
            .initial_max_slice_len(chan.payload)
            .allocation_strategy(iox2.AllocationStrategy.Static)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self._wake = _event(self._node, chan, "data").create().notifier_builder().create()
        self._hello = _event(self._node, chan, "hello").create().listener_builder().create()
        self._source: bytearray | None = None
        self._source_view: Any = None
        self._source_addr = 0

    def wait_readers(self, deadline: float) -> None:
        while self._service.dynamic_config.number_of_subscribers < self._chan.readers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attached = self._service.dynamic_config.number_of_subscribers
                raise RuntimeError(
                    f"Failed to see {self._chan.readers} subscribers since only {attached} "
                    "attached before the deadline"
                )
            # Readers notify "hello" after creating their subscriber.
            self._hello.timed_wait(iox2.Duration.from_secs_f64(remaining))
        self._publisher.update_connections()

    def send(self, record: bytearray) -> None:
        if record is not self._source:
            # The harness reuses one bytearray per run: take its address once.
            self._source = record
            self._source_view = (ctypes.c_char * len(record)).from_buffer(record)
            self._source_addr = ctypes.addressof(self._source_view)
        payload = self._chan.payload
        sample = self._publisher.loan_slice_uninit(payload)
        dst = sample.payload_ptr
        if self._chan.zero_copy:
            ctypes.memmove(dst, self._source_addr, HEAD.size)
            ctypes.memmove(
                dst + payload - TAIL.size, self._source_addr + payload - TAIL.size, TAIL.size
            )
        else:
            ctypes.memmove(dst, self._source_addr, payload)
        sample.assume_init().send()
        self._wake.notify()

    def close(self) -> None:
        self._source_view = None
        for port in (self._hello, self._wake, self._publisher):
            port.delete()
        self._service = None
        self._node = None


class _IoxReader:
    def __init__(self, chan: IoxChannel) -> None:
        self._chan = chan
        self._node = _node(chan)
        self._service = _pubsub(self._node, chan).open()
        self._subscriber = self._service.subscriber_builder().buffer_size(chan.depth).create()
        self._wake = _event(self._node, chan, "data").open().listener_builder().create()
        hello = _event(self._node, chan, "hello").open().notifier_builder().create()
        hello.notify()
        hello.delete()
        self._held: Any = None
        self._view_type = ctypes.c_ubyte * chan.payload
        self._safety_net = iox2.Duration.from_secs_f64(SAFETY_NET_S)
        self._missed = 0

    def notes(self) -> dict[str, int]:
        """Wake-ups the event service missed (rescued by the bounded wait)."""
        return {"missed_wakeups": self._missed}

    def recv(self) -> Buffer:
        if self._held is not None:
            self._held.delete()
            self._held = None
        sample = self._subscriber.receive()
        while sample is None:
            # Not blocking_wait(): iceoryx2 0.10 occasionally loses a wake-up with several
            # readers under load (seen: a reader asleep in recvfrom on the event socket
            # with a full buffer, the publisher retrying on it forever). A bounded wait
            # keeps the run alive; every wait that ran out while a sample was waiting
            # is counted as a missed wake-up and shows up under "Notes".
            started = time.monotonic()
            woken = self._wake.timed_wait(self._safety_net)
            sample = self._subscriber.receive()
            if sample is not None and not woken and time.monotonic() - started >= SAFETY_NET_S:
                self._missed += 1
        size = sample.header.number_of_elements
        if self._chan.zero_copy and size == self._chan.payload:
            self._held = sample
            return memoryview(self._view_type.from_address(sample.payload_ptr))
        data = ctypes.string_at(sample.payload_ptr, size)
        sample.delete()
        return data

    def close(self) -> None:
        if self._held is not None:
            self._held.delete()
            self._held = None
        self._wake.delete()
        self._subscriber.delete()
        self._service = None
        self._node = None


class Iceoryx2Impl(StreamImpl):
    """iceoryx2 publish-subscribe + event services, copying or zero-copy."""

    def __init__(self, zero_copy: bool) -> None:
        self.zero_copy = zero_copy
        self.name = "iceoryx2-zc" if zero_copy else "iceoryx2"
        self.kind = "peer"

    def available(self) -> str | None:
        return MISSING

    def prepare(self, case: Case, workdir: str) -> IoxChannel:
        # iceoryx2's own directory tree goes straight into the run directory (short
        # paths: its event files are unix sockets, limited to 107 bytes).
        return IoxChannel(
            shm_prefix(workdir) + "_",
            workdir,
            "shmd-bench",
            case.readers,
            case.depth,
            case.payload,
            self.zero_copy,
        )

    def cleanup(self, channel: IoxChannel) -> None:
        # Clean exits leave the per-prefix global_mgmt file; SIGKILLed ports leave data
        # segments and configs. All carry this run's prefix; the rest of iceoryx2's files
        # go with the run directory.
        for path in glob.glob(os.path.join(SHM_DIR, glob.escape(channel.prefix) + "*")):
            os.unlink(path)

    def open_writer(self, channel: IoxChannel, case: Case) -> Writer:
        return _IoxWriter(channel)

    def open_reader(self, channel: IoxChannel, case: Case, index: int) -> Reader:
        return _IoxReader(channel)


IMPLS = [Iceoryx2Impl(zero_copy=False), Iceoryx2Impl(zero_copy=True)]
