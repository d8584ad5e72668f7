"""Peer implementations for the comparative benchmark.

Each module exposes ``IMPLS: list[benchmarks.harness.Impl]`` and imports optional
packages lazily, so that a missing package shows up as a skip reason from
``available()`` instead of an ImportError. ``benchmarks.run.PEER_MODULES`` lists them.
"""
