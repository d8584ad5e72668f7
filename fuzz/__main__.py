"""``python -m fuzz TARGET [libFuzzer options and corpus directories]``, under atheris.

TARGET is ``header``, ``read``, ``frames`` or ``bridge`` (fuzz/fuzz_TARGET.py).  Only
this needs atheris (the ``fuzz`` extra); the targets' ``test_one_input``
functions import without it (tests/test_fuzz.py runs them over the corpus).
"""

from __future__ import annotations

import importlib
import sys

import atheris

TARGETS = ("header", "read", "frames", "bridge")


def main() -> None:
    """Instrument shmd and the target as they are imported, then hand libFuzzer the rest."""
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz {{{','.join(TARGETS)}}} [libFuzzer args]")
    target = sys.argv.pop(1)
    # Python coverage for shmd's modules (the compiled core is not instrumented:
    # its checks are found through the model the read target compares with).
    with atheris.instrument_imports(include=["shmd", "fuzz"]):
        module = importlib.import_module(f"fuzz.fuzz_{target}")
    atheris.Setup(sys.argv, module.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
