"""The one back-off of every retrying loop: doubles up to its cap, jittered, resets."""

from __future__ import annotations

from pgnotify_worker.core.backoff import Backoff


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_success() -> None:
    backoff = Backoff(0.1, 0.5, rand=lambda: 0.5)  # 0.5 + 0.5 = no jitter
    assert [round(backoff.next(), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1


def test_backoff_jitter_spreads_between_half_and_one_and_a_half_of_the_step() -> None:
    assert Backoff(1.0, 10.0, rand=lambda: 0.0).next() == 0.5
    assert Backoff(1.0, 10.0, rand=lambda: 0.999).next() < 1.5
