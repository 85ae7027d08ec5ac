"""The one back-off of every loop that retries a connection or a statement. Pure: `rand` is
passed in (exponential growth, jittered between half and one and a half of the step)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """`next()` gives the delay before the next try and doubles the step up to `cap`;
    `reset()` after a success."""

    first: float
    cap: float
    rand: Callable[[], float] = field(default=random.random, repr=False)
    step: float = field(init=False)

    def __post_init__(self) -> None:
        self.step = self.first

    def next(self) -> float:
        """The delay before the next try (jittered), and a longer step for the one after."""
        delay = self.step * (0.5 + self.rand())
        self.step = min(self.step * 2, self.cap)
        return delay

    def peek(self) -> float:
        """The current step, without jitter or growth (for log lines)."""
        return self.step

    def reset(self) -> None:
        """A success: start over from the first step."""
        self.step = self.first
