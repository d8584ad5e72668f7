"""A ``python:`` source for tests that runs another source once the test says go.

    source: {type: python, callable: "gate_source:run"}
    # $SHMD_TEST_FIFO: the FIFO; $SHMD_TEST_GATED: "module:function" to run

Blocks in ``open()`` until the test writes a line into the FIFO (after its
readers attached), then hands the context to the gated source.
"""

from __future__ import annotations

import importlib
import os

from shmd.daemons.sources import SourceContext


def run(ctx: SourceContext) -> None:
    with open(os.environ["SHMD_TEST_FIFO"]) as fifo:
        fifo.readline()
    module, _, name = os.environ["SHMD_TEST_GATED"].partition(":")
    getattr(importlib.import_module(module), name)(ctx)


def frames(ctx: SourceContext) -> None:
    """``$SHMD_TEST_FRAMES`` frames of 512 x 512 uint32 pixels, frame i all i, on topic 1."""
    for i in range(int(os.environ["SHMD_TEST_FRAMES"])):
        ctx.publish(i.to_bytes(4, "little") * (512 * 512), 1)
