"""A ``python:`` source for tests: waits for a count on a FIFO, then publishes that many.

    source: {type: python, callable: "fifo_source:run"}   # $SHMD_TEST_FIFO names the FIFO

Blocks in ``open()`` until the test writes ``N\\n`` into the FIFO, then
publishes records 0..N-1 round-robin on topics 0, 1 and 2, each payload
``rec <i> topic <t>``, and returns: the writer then shuts down cleanly.  The
FIFO is the synchronisation: the test writes the count once its readers are
attached.
"""

from __future__ import annotations

import os

from shmd.daemons.sources import SourceContext

TOPICS = (0, 1, 2)


def run(ctx: SourceContext) -> None:
    with open(os.environ["SHMD_TEST_FIFO"]) as fifo:
        count = int(fifo.readline())
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        ctx.publish(f"rec {i} topic {topic}".encode(), topic)
