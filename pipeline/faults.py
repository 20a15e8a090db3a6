"""Fault handling for long runs: skipped non-finite steps, loss spikes, and fault injection.

Non-finite steps: DeepSpeed's ZeRO optimizers (stage 1-3, and its bf16 optimizer) compute the
global gradient norm before applying an update and discard the update when that norm is inf
or NaN, counting it in `engine.skipped_steps`; weights and optimizer state stay as they were.
A NaN loss yields NaN gradients, so it is caught the same way. The trainer reads that counter,
logs each skip, and stops after `train.max_consecutive_skips` in a row.

Fault injection (for tests and fire drills, off unless the variable is set):
    PIPELINE_INJECT_NAN_STEPS=5,6        make the loss NaN in these optimizer steps (1-based)
    PIPELINE_KILL_DURING_SAVE_STEP=6     SIGKILL every rank after it wrote its part of the step-6
                                         checkpoint but before `latest` moves to it
"""

from __future__ import annotations

import math
import os
import signal
from collections import deque
from dataclasses import dataclass, field


def _steps(var: str) -> frozenset[int]:
    text = os.environ.get(var, "").strip()
    return frozenset(int(s) for s in text.split(",") if s.strip()) if text else frozenset()


@dataclass(frozen=True)
class FaultInjection:
    nan_steps: frozenset[int] = field(default_factory=frozenset)
    kill_during_save_steps: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_env(cls) -> "FaultInjection":
        return cls(_steps("PIPELINE_INJECT_NAN_STEPS"), _steps("PIPELINE_KILL_DURING_SAVE_STEP"))

    def maybe_die_in_save(self, step: int) -> None:
        if step in self.kill_during_save_steps:
            os.kill(os.getpid(), signal.SIGKILL)


class LossSpikeDetector:
    """Flags a loss more than `sigmas` standard deviations above the mean of the last `window`
    finite losses (and at least `min_ratio` times that mean), once the window is full."""

    def __init__(self, window: int = 50, sigmas: float = 6.0, min_ratio: float = 1.1):
        self.window, self.sigmas, self.min_ratio = window, sigmas, min_ratio
        self._recent: deque[float] = deque(maxlen=window)
        self.spikes = 0

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = False
        if len(self._recent) == self.window:
            mean = sum(self._recent) / self.window
            std = math.sqrt(sum((x - mean) ** 2 for x in self._recent) / self.window)
            spike = loss > mean + self.sigmas * std and loss > self.min_ratio * mean
        if spike:
            self.spikes += 1
        else:  # a spike is kept out of the baseline it is judged against
            self._recent.append(loss)
        return spike


class SkipTracker:
    """Counts optimizer steps the engine discarded, and consecutive runs of them."""

    def __init__(self, limit: int, already_skipped: int = 0):
        self.limit = limit
        self.total = 0
        self.consecutive = 0
        self._last_engine_count = already_skipped

    def update(self, engine_skipped_steps: int) -> bool:
        """True when this step was skipped."""
        skipped = engine_skipped_steps > self._last_engine_count
        self._last_engine_count = engine_skipped_steps
        if skipped:
            self.total += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        return skipped

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.limit
