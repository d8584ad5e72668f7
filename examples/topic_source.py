"""A ``python:`` source for shm-writer that publishes by topic name.

In the writer's config::

    segment:
      topics: {ticks: 0, frames: 1}
    writer:
      source: {type: python, callable: "topic_source:run"}

(with this directory on the writer's ``PYTHONPATH``).  Publishes ``count``
records (``$TOPIC_SOURCE_COUNT``, default 100) alternating between the
``ticks`` and ``frames`` topics, then returns, and the writer shuts down
cleanly.  A name the bus does not have fails the source with one line.
"""

from __future__ import annotations

import os

from shmd.daemons.sources import SourceContext


def run(ctx: SourceContext) -> None:
    count = int(os.environ.get("TOPIC_SOURCE_COUNT", "100"))
    for i in range(count):
        if ctx.stopping.is_set():
            return
        topic = "ticks" if i % 2 == 0 else "frames"
        ctx.publish(f"{topic} {i}".encode(), topic)
