"""benchmarks.instructions: callgrind's count of instructions per hot-path call."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from benchmarks import instructions


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_small_count_prints_a_row_per_case(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cases counted with few records print one table row each, with a positive count,
    and leave no segment behind."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv("SHMD_INSTR_TAG", tag)
    assert instructions.main(["--records", "500", "--cases", "loop,publish"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    counts = {
        m.group(1): int(m.group(2).replace(",", ""))
        for m in (re.match(r"\| (\S+) \| ([\d,]+) \|", r) for r in rows)
        if m
    }
    assert set(counts) == {"loop", "publish"}
    assert 0 < counts["loop"] < counts["publish"]
    assert not list(Path("/dev/shm").glob(f"shmd-instr-{tag}-*"))  # each child unlinked its own


def test_an_unknown_case_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A case that does not exist exits 2 naming it."""
    assert instructions.main(["--cases", "nope"]) == 2
    assert "unknown case 'nope'" in capsys.readouterr().err
