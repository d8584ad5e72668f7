"""shmd.bus.wait: the reader wait strategies, their codes and labels."""

from __future__ import annotations

import math

import pytest

from shmd.bus.wait import WaitCode, WaitStrategy, code_label


def test_each_name_gives_its_strategy() -> None:
    """named() builds sleep, spin (forever) and backoff (with the given times)."""
    assert WaitStrategy.named("sleep") == WaitStrategy("sleep", 0.0, 0.0)
    assert WaitStrategy.named("spin") == WaitStrategy("spin", math.inf, 0.0)
    assert WaitStrategy.named("backoff", spin=1e-4, yield_=2e-3) == WaitStrategy(
        "backoff", 1e-4, 2e-3
    )


def test_an_unknown_name_is_refused_in_one_sentence() -> None:
    """A name that is not a strategy raises ValueError naming the three."""
    with pytest.raises(ValueError, match="'nap' is not sleep, spin or backoff"):
        WaitStrategy.named("nap")  # type: ignore[arg-type]


@pytest.mark.parametrize("times", [(-1.0, 0.0), (0.0, math.nan)])
def test_negative_or_nan_times_are_refused(times: tuple[float, float]) -> None:
    """A backoff with a negative or NaN time cannot be made."""
    with pytest.raises(ValueError, match="Failed to make a wait strategy"):
        WaitStrategy.backoff(*times)


def test_only_spin_never_sleeps() -> None:
    """sleep and backoff end in an epoll sleep (they need the eventfd); spin does not."""
    assert WaitStrategy.sleep().sleeps and WaitStrategy.backoff().sleeps
    assert not WaitStrategy.spin().sleeps


def test_labels_and_codes() -> None:
    """Labels read as the logs show them; codes round-trip through code_label."""
    assert WaitStrategy.sleep().label == "sleep"
    assert WaitStrategy.spin().label == "spin"
    assert WaitStrategy.backoff(50e-6, 1e-3).label == "backoff(50us,1ms)"
    assert WaitStrategy.backoff(2.0, 0.0).label == "backoff(2s,0us)"
    for s in (WaitStrategy.sleep(), WaitStrategy.spin(), WaitStrategy.backoff()):
        assert code_label(s.code) == s.name
    assert WaitStrategy.spin().code is WaitCode.SPIN
    assert code_label(7) == "?"
