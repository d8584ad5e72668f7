"""fuzz/: each target's test_one_input over its committed corpus, without atheris."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuzz import fuzz_bridge, fuzz_frames, fuzz_header, fuzz_read

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"
TARGETS: dict[str, Callable[[bytes], None]] = {
    "header": fuzz_header.test_one_input,
    "read": fuzz_read.test_one_input,
    "frames": fuzz_frames.test_one_input,
    "bridge": fuzz_bridge.test_one_input,
}


@pytest.fixture(scope="module", autouse=True)
def _close_targets() -> Iterator[None]:
    """The targets' per-process memfd and segments are closed after this module."""
    yield
    fuzz_header.close()
    fuzz_read.close()


def _inputs() -> list[tuple[str, Path]]:
    return [(t, f) for t in TARGETS for f in sorted((CORPUS / t).iterdir())]


def test_every_target_has_a_corpus() -> None:
    """Each target has at least five committed inputs (so the cases below are not empty)."""
    for target in TARGETS:
        assert len(list((CORPUS / target).iterdir())) >= 5, target


@pytest.mark.parametrize(("target", "path"), _inputs(), ids=[f"{t}/{f.name}" for t, f in _inputs()])
def test_corpus_input_holds_the_targets_promises(target: str, path: Path) -> None:
    """The input gives a valid result or the documented error, as the target checks."""
    TARGETS[target](path.read_bytes())


def test_the_read_model_sees_the_corrupt_and_the_valid_inputs() -> None:
    """The read target's model calls a seq mismatch corrupt and delivers eight valid records."""
    seg_case = fuzz_read.decode((CORPUS / "read" / "seq-mismatch").read_bytes())
    seg = fuzz_read._segment(seg_case.which)
    fuzz_read._write(seg, seg_case)
    with pytest.raises(fuzz_read.Corrupt) as exc:
        fuzz_read.expected(seg, seg_case, 0, seg_case.limit, seg_case.copy)
    assert exc.value.seq == 1
    good = fuzz_read.decode((CORPUS / "read" / "valid-records-copy").read_bytes())
    fuzz_read._write(seg, good)
    rows, end, lost = fuzz_read.expected(seg, good, 0, good.limit, good.copy)
    assert [r[0] for r in rows] == list(range(8)) and (end, lost) == (8, 0)


#: Seconds each target is fuzzed for in the suite (coverage-guided, under atheris).
FUZZ_SECONDS = 10


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_bounded_fuzzing_run_finds_nothing(target: str, tmp_path: Path) -> None:
    """atheris fuzzes the target for FUZZ_SECONDS from a copy of its corpus: it ends
    without a crash or a broken promise, having run many inputs."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (the fuzz extra; packaging/dev setup installs it)")
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / target, corpus)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            target,
            str(corpus),
            f"-max_total_time={FUZZ_SECONDS}",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    done = re.search(r"Done (\d+) runs in", proc.stderr)
    assert done is not None, tail
    assert int(done.group(1)) >= 1000, tail
    assert not list(tmp_path.glob("crash-*")), tail
