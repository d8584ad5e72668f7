"""A ``python:`` sink for fault tests and the soak: it writes down every seq it is handed.

Configured per reader instance as ``callable: "testbed.soak_sink:r<instance>"`` (module
``__getattr__`` makes one recorder per name), it appends to
``$SHMD_SOAK_DIR/<instance>.log`` (default /var/lib/shmd-soak), one line per run
of consecutive seqs in a batch::

    S <pid>                                         the process started
    R <pid> <first> <last> <first_ts> <last_ts> <max_gap_ns> <bad>
    E <pid>                                         the sink was closed cleanly

``max_gap_ns`` is the largest commit-timestamp step between consecutive
records of the run (and from the previous run when it continues it), ``bad``
how many payloads failed their checksum (see soak_source).  Each line is one
``write(2)`` on an ``O_APPEND`` file, so a reader killed with SIGKILL leaves
every batch it handed over recorded, and nothing half-written.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Any

DIR = os.environ.get("SHMD_SOAK_DIR", "/var/lib/shmd-soak")


def intact(payload: bytes | memoryview) -> bool:
    """Whether a soak_source payload's CRC-32 prefix matches its body."""
    data = bytes(payload)
    return len(data) >= 4 and int.from_bytes(data[:4], "little") == zlib.crc32(data[4:])


class Recorder:
    """The sink of one reader instance."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.path = os.path.join(DIR, f"{instance}.log")
        self.fd = -1
        self.last: tuple[int, int] | None = None  # (seq, timestamp) of the last record seen

    def _write(self, text: str) -> None:
        if self.fd < 0:
            self.fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            os.write(self.fd, f"S {os.getpid()}\n".encode())
        os.write(self.fd, text.encode())

    def __call__(self, records: Sequence[tuple[int, int, int, Any]]) -> None:
        pid = os.getpid()
        lines = []
        first = prev_seq = prev_ts = -1
        first_ts = gap = bad = 0
        if self.last is not None:
            prev_seq, prev_ts = self.last
        for seq, ts, _topic, payload in records:
            if not intact(payload):
                bad += 1
            if first >= 0 and seq != prev_seq + 1:
                lines.append(f"R {pid} {first} {prev_seq} {first_ts} {prev_ts} {gap} {bad}\n")
                first, gap, bad = -1, 0, 0
            if first < 0:
                first, first_ts = seq, ts
                if seq == prev_seq + 1 and prev_ts >= 0:
                    gap = max(gap, ts - prev_ts)  # continues the previous batch
            else:
                gap = max(gap, ts - prev_ts)
            prev_seq, prev_ts = seq, ts
        if first >= 0:
            lines.append(f"R {pid} {first} {prev_seq} {first_ts} {prev_ts} {gap} {bad}\n")
            self.last = (prev_seq, prev_ts)
        self._write("".join(lines))

    def close(self) -> None:
        """Mark a clean end and close the file."""
        self._write(f"E {os.getpid()}\n")
        fd, self.fd = self.fd, -1
        os.close(fd)


_recorders: dict[str, Recorder] = {}


def __getattr__(name: str) -> Recorder:
    """``testbed.soak_sink:r<instance>`` is the recorder of that reader instance."""
    if not name.startswith("r") or not name[1:]:
        raise AttributeError(name)
    if name not in _recorders:
        _recorders[name] = Recorder(name[1:])
    return _recorders[name]
