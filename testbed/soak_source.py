"""A ``python:`` source for fault tests and the soak: steady records, bursts on request.

Configured as ``callable: "testbed.soak_source:steady_<rate>"`` (module ``__getattr__``
makes one source per rate, records per second), it publishes batches of
``BATCH`` records, each payload a CRC-32 (4 bytes, little-endian) of a body of
random length, so that a reader can tell an intact record from a torn one
(soak_sink checks it).

A burst is asked for from outside by writing a number N into
``$SHMD_SOAK_DIR/burst-<k>`` for k = 1, 2, ...: the source publishes N records
as fast as the bus takes them, renames the file to ``burst-<k>.done`` and
looks for ``burst-<k+1>`` (a restarted writer's source goes on from the first
k not done).

Every ``REPORT`` seconds, and when it stops, the source logs one
``soak_source`` event through the writer's logging (the journal under
systemd): ``published``, ``bursts``, and ``max_call_ms``, the longest a single
``publish_batch`` call took: how long the writer held its source up (block
policy waits, mutex waits, a reader being evicted).
"""

from __future__ import annotations

import os
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import structlog

DIR = os.environ.get("SHMD_SOAK_DIR", "/var/lib/shmd-soak")
BATCH = 8
REPORT = 2.0
BURST_BATCH = 64

log = structlog.get_logger("soak_source")


def payload(rng: random.Random) -> bytes:
    """A body of 12 to 180 random bytes behind its CRC-32."""
    body = rng.randbytes(rng.randrange(12, 181))
    return zlib.crc32(body).to_bytes(4, "little") + body


def make(rate: float) -> Callable[[Any], None]:
    """A source publishing about ``rate`` records a second in batches of BATCH."""

    def run(ctx: Any) -> None:
        rng = random.Random(os.getpid())
        period = BATCH / rate
        published = bursts = 0
        max_call = 0.0
        next_burst = 1
        while os.path.exists(os.path.join(DIR, f"burst-{next_burst}.done")):
            next_burst += 1
        next_report = time.monotonic() + REPORT
        deadline = time.monotonic()

        def publish(records: list[bytes]) -> None:
            nonlocal published, max_call
            t0 = time.monotonic()
            ctx.publish_batch(records)
            max_call = max(max_call, time.monotonic() - t0)
            published += len(records)

        def report(event: str = "soak_source") -> None:
            log.info(
                event, published=published, bursts=bursts, max_call_ms=round(max_call * 1000, 3)
            )

        while not ctx.stopping.is_set():
            publish([payload(rng) for _ in range(BATCH)])
            burst = os.path.join(DIR, f"burst-{next_burst}")
            try:
                with open(burst) as f:
                    count = int(f.read().strip() or 0)
            except (FileNotFoundError, ValueError):
                count = -1
            if count >= 0:
                for start in range(0, count, BURST_BATCH):
                    if ctx.stopping.is_set():
                        break
                    publish([payload(rng) for _ in range(min(BURST_BATCH, count - start))])
                else:
                    os.rename(burst, burst + ".done")
                    next_burst += 1
                    bursts += 1
            now = time.monotonic()
            if now >= next_report:
                report()
                next_report = now + REPORT
            deadline = max(deadline + period, now - 1.0)
            # The source's own pace, not a synchronisation: wait for the next
            # batch's time, or until the writer tells us to stop.
            ctx.stopping.wait(max(0.0, deadline - time.monotonic()))
        report()

    return run


def __getattr__(name: str) -> Callable[[Any], None]:
    """``testbed.soak_source:steady_<rate>`` publishes about <rate> records a second."""
    prefix = "steady_"
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        raise AttributeError(name)
    return make(float(name[len(prefix) :]))
