"""Fault handling for long runs: skipped non-finite steps, loss spikes, and fault injection.

Non-finite steps: DeepSpeed's ZeRO optimizers (stage 1-3, and its bf16 optimizer) compute the
global gradient norm before applying an update and discard the update when that norm is inf
or NaN, counting it in `engine.skipped_steps`; weights and optimizer state stay as they were.
A NaN loss yields NaN gradients, so it is caught the same way. The trainer reads that counter,
logs each skip, and stops after `train.max_consecutive_skips` in a row.

Slow ranks: every `log_every` steps each rank's own time (reading its batch and host work, no
collective in it) and engine time (DeepSpeed's forward, backward and step, waiting for the others
in its collectives included) travel in the loop's one all-reduce; `Stragglers` names the rank
whose own time lags the median most, and warns when one rank stays above `train.straggler_lag`
(a fraction of the step time) for `train.straggler_intervals` log intervals in a row.

Fault injection (for tests and fire drills, off unless the variable or flag is set):
    PIPELINE_INJECT_NAN_STEPS=5,6        make the loss NaN in these optimizer steps (1-based)
    PIPELINE_KILL_DURING_SAVE_STEP=6     SIGKILL every rank after it wrote its part of the step-6
                                         checkpoint but before `latest` moves to it
    --inject-hang STEP:RANK              RANK sleeps for good while reading the batch of STEP
    --inject-slow RANK:SECONDS           RANK takes SECONDS longer to read every batch
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass, field


def _steps(var: str) -> frozenset[int]:
    text = os.environ.get(var, "").strip()
    return frozenset(int(s) for s in text.split(",") if s.strip()) if text else frozenset()


def _pair(text: str, flag: str, first: type, second: type) -> tuple:
    try:
        a, b = text.split(":")
        return first(a), second(b)
    except ValueError:
        raise ValueError(f"{flag}: expected {first.__name__.upper()}:{second.__name__.upper()}, got {text!r}") from None


@dataclass(frozen=True)
class FaultInjection:
    nan_steps: frozenset[int] = field(default_factory=frozenset)
    kill_during_save_steps: frozenset[int] = field(default_factory=frozenset)
    hang: tuple[int, int] | None = None  # (step, rank)
    slow: tuple[int, float] | None = None  # (rank, seconds)

    @classmethod
    def from_env(cls, hang: str | None = None, slow: str | None = None) -> "FaultInjection":
        """The variables above, and the --inject-hang / --inject-slow values."""
        return cls(_steps("PIPELINE_INJECT_NAN_STEPS"), _steps("PIPELINE_KILL_DURING_SAVE_STEP"),
                   _pair(hang, "--inject-hang", int, int) if hang else None,
                   _pair(slow, "--inject-slow", int, float) if slow else None)

    def maybe_die_in_save(self, step: int) -> None:
        if step in self.kill_during_save_steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_delay(self, step: int, rank: int) -> None:
        """Called while a rank reads the batch of `step`."""
        if self.hang == (step, rank):
            while True:
                time.sleep(3600)
        if self.slow and self.slow[0] == rank:
            time.sleep(self.slow[1])


class Stragglers:
    """The slowest rank of each logged step, by own time, and a warning for one that stays slow."""

    def __init__(self, lag: float, intervals: int):
        self.lag, self.intervals = lag, intervals
        self.suspect, self.count = None, 0

    def update(self, times: list[tuple[float, float]], step_s: float) -> tuple[dict, bool]:
        """`times`: (own, engine) seconds per rank; `step_s`: the step's wall time. Returns the
        metrics and whether the slowest rank has now been above the lag another `intervals` times in a row."""
        own = [t[0] for t in times]
        slowest = max(range(len(own)), key=own.__getitem__)
        lag_s = own[slowest] - statistics.median(own)
        values = {"perf/slowest_rank": slowest, "perf/slowest_rank_lag_s": lag_s,
                  "perf/own_time_max_s": own[slowest], "perf/engine_time_max_s": max(t[1] for t in times)}
        over = len(own) > 1 and lag_s > self.lag * step_s
        self.count = self.count + 1 if over and slowest == self.suspect else int(over)
        self.suspect = slowest if over else None
        return values, self.count > 0 and self.count % self.intervals == 0


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
