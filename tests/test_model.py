"""model/bus.pml: SPIN verifies the publish/read/sleep protocol and finds the broken variants."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "model" / "bus.pml"

pytestmark = pytest.mark.skipif(
    shutil.which("spin") is None, reason="spin (Debian's package spin) is not installed"
)


@dataclass
class PanResult:
    """What one exhaustive pan run reported."""

    errors: int
    states: int
    output: str


def verify(tmp_path: Path, *defines: str) -> PanResult:
    """Generate, compile and run the verifier for the model with `defines`."""
    model = tmp_path / "bus.pml"
    shutil.copyfile(MODEL, model)
    flags = [f"-D{d}" for d in defines]
    subprocess.run(["spin", "-a", *flags, model.name], cwd=tmp_path, check=True, timeout=60)
    subprocess.run(
        ["gcc", "-O2", "-w", "-DSAFETY", "-o", "pan", "pan.c"],
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    # -m: a depth bound far above the model's longest path (about 370), so
    # that reaching it means the model changed; pan says so if it does.
    run = subprocess.run(
        ["./pan", "-m20000"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    out = run.stdout + run.stderr
    errors = re.search(r"errors: (\d+)", out)
    states = re.search(r"(\d+) states, stored", out)
    assert errors is not None and states is not None, out
    return PanResult(int(errors.group(1)), int(states.group(1)), out)


@pytest.mark.parametrize("policy", ["POLICY_DROP", "POLICY_BLOCK"])
def test_the_protocol_verifies_with_no_error(tmp_path: Path, policy: str) -> None:
    """The correct model's whole state space has no failed assertion and no invalid end state."""
    r = verify(tmp_path, policy)
    assert r.errors == 0, r.output
    assert "Full statespace search for:" in r.output, r.output
    assert "assertion violations\t+" in r.output and "invalid end states\t+" in r.output, r.output
    assert "max search depth too small" not in r.output, r.output
    assert "search not completed" not in r.output, r.output
    assert r.states > 1_000_000, r.output


@pytest.mark.parametrize(
    ("defines", "violated"),
    [
        (("POLICY_DROP", "BROKEN_NO_RECHECK"), "assertion violated"),
        (("POLICY_BLOCK", "BROKEN_NO_RECHECK"), "assertion violated"),
        (("POLICY_DROP", "BROKEN_NO_RESERVE_RECHECK"), "assertion violated (val[(s-start)]==s)"),
    ],
)
def test_spin_finds_the_broken_variants(
    tmp_path: Path, defines: tuple[str, ...], violated: str
) -> None:
    """Without [S4]'s re-check a reader sleeps through a wake-up; without [R4]'s it tears."""
    r = verify(tmp_path, *defines)
    assert r.errors >= 1, r.output
    assert violated in r.output, r.output
    assert (tmp_path / "bus.pml.trail").exists(), r.output
