"""The GPU check's plan: what each step costs on the GPU at hand, the order the steps run in, and
which of them the time budget and the machine's memory and disk let run.

Order: what a step proves per second of GPU time, first.
  c  ZeRO-3 in bf16 over NCCL with the flash kernel on a 1B model, and the measured peak memory
     against the planner's: the most of the 7B path proved in the fewest seconds (~1 minute).
  a  the life of a run: train, checkpoint, resume, export with its logit check, generate with
     transformers (~2 minutes of interpreter and launcher start-ups on a tiny model).
  b  the headline figure, MFU on the LLaMA-7B layer shape against the bare DeepSpeed loop and plain
     PyTorch: three launches of a 1-2B model (~3 minutes).
  e  document masking: FlexAttention's block-mask kernel against causal SDPA at the 7B attention
     shape, and a tiny run trained with it (~2 minutes, mostly compiling).
  d  llama-7b itself with the optimizer in host memory, checkpoint and export: ~150 GiB of host
     memory, ~90 GiB of disk and ~10 minutes; on a machine that has them, with --budget-s to match.

Costs are estimates from the figures below (start-ups measured on the CPU machine and scaled,
compute at ASSUMED_MFU of the GPU's datasheet peak, checkpoints at SAVE_BYTES_PER_S). The report
puts each step's wall time beside its estimate, so that a run on the GPU corrects them.
A step runs only if its estimate fits in what is left of the budget; it then gets as its hard
limit what is left less the estimates of the steps after it that are still planned (at least
its own estimate), so an overrunning step takes its own margin, not the next step's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.config import Profile
from pipeline.metrics import flops_per_token

ORDER = ("c", "a", "b", "e", "d")
# Seconds, on a 16-core GPU machine. An interpreter importing torch, transformers or DeepSpeed and
# making its CUDA context; the deepspeed launcher is three of them in a row (runner, launch, rank)
# and NCCL's first connections.
PYTHON_START_S = 12.0
LAUNCH_START_S = 30.0
FIRST_STEP_S = 5.0  # allocator growth, kernel selection, the first collectives
STEP_FLOOR_S = 0.1  # a small model's step is bound by kernel launches and ZeRO-3's hooks, not FLOPs
ASSUMED_MFU = 0.35
INIT_S_PER_BILLION = 6.0  # building and initialising the weights, per billion parameters
SAVE_BYTES_PER_S = 1e9  # checkpoint writes and reads, fsync included
CHECKPOINT_BYTES_PER_PARAM = 16  # fp32 master weights and Adam's two moments, plus the 16-bit weights
HOST_ADAM_BYTES_PER_S = 10e9  # DeepSpeed's CPU Adam over offloaded optimizer states
JIT_BUILD_S = 90.0  # DeepSpeed compiling an op (CPU Adam for offload) with nvcc/ninja on first use
UNKNOWN_PEAK_FLOPS = 300e12  # a GPU the datasheet table lacks: about an A100's bf16 peak


@dataclass(frozen=True)
class Cost:
    """One command of a step and the seconds it is expected to take."""

    name: str
    seconds: float


def train_cost(name: str, profile: Profile, steps: int, gpus: int, peak_flops: float, saves: int = 0,
               loads: int = 0, launcher: bool = True) -> Cost:
    """A training command: start-up, weights, steps at ASSUMED_MFU (activation recomputation is a
    third more forward-and-backward work), checkpoint writes and reads."""
    t, params = profile.train, profile.model.num_params()
    work = profile.tokens_per_step * flops_per_token(profile.model, profile.data.seq_len)
    if t.activation_checkpointing:
        work *= 4 / 3
    step_s = max(STEP_FLOOR_S, work / (gpus * peak_flops * ASSUMED_MFU))
    checkpoint_s = (saves + loads) * (2.0 + params * CHECKPOINT_BYTES_PER_PARAM / SAVE_BYTES_PER_S)
    seconds = ((LAUNCH_START_S if launcher else PYTHON_START_S) + params / 1e9 * INIT_S_PER_BILLION + FIRST_STEP_S
               + steps * step_s + checkpoint_s)
    return Cost(name, seconds)


def offload_cost(profile: Profile, steps: int) -> float:
    """What optimizer states in host memory add: the CPU Adam op's build, and per step a pass of
    CPU Adam over 16 bytes per parameter."""
    return JIT_BUILD_S + steps * profile.model.num_params() * 16 / HOST_ADAM_BYTES_PER_S


@dataclass
class Planned:
    """A step in the plan: its costs, what stops it (profile problems, machine shortages), and the
    decision."""

    step: str
    title: str
    measures: str
    costs: list[Cost]
    problems: list[str] = field(default_factory=list)  # the step is wrong: it fails
    shortages: list[str] = field(default_factory=list)  # this machine lacks memory or disk: skipped
    decision: str = "run"  # "run" | "skip"
    reason: str = ""

    @property
    def estimate_s(self) -> float:
        return sum(c.seconds for c in self.costs)


@dataclass
class Plan:
    budget_s: float
    gpu: str
    steps: list[Planned]

    def decide(self) -> None:
        """Skip what the machine cannot hold, then, in order, what no longer fits the budget."""
        left = self.budget_s
        for s in self.steps:
            if s.shortages:
                s.decision, s.reason = "skip", "; ".join(s.shortages)
            elif s.estimate_s > left:
                s.decision, s.reason = "skip", budget_reason(s.estimate_s, left, self.budget_s)
            elif not s.problems:
                left -= s.estimate_s

    def planned_s(self) -> float:
        return sum(s.estimate_s for s in self.steps if s.decision == "run" and not s.problems)

    def limit(self, step: str, left_s: float) -> float | None:
        """The hard limit of `step` with `left_s` seconds of the budget left, or None if it no
        longer fits."""
        i = next(i for i, s in enumerate(self.steps) if s.step == step)
        own = self.steps[i].estimate_s
        if own > left_s:
            return None
        later = sum(s.estimate_s for s in self.steps[i + 1:] if s.decision == "run" and not s.problems)
        return min(left_s, max(own, left_s - later))

    def table(self) -> str:
        lines = [f"plan for {self.gpu}, budget {self.budget_s:.0f} s (steps in order of what they prove per second):"]
        for s in self.steps:
            what = "run" if s.decision == "run" else f"skip: {s.reason}"
            if s.problems:
                what = "FAIL: " + "; ".join(s.problems)
            lines.append(f"  {s.step}  ~{math.ceil(s.estimate_s):4d} s  {s.title}: {what}")
            lines.append(f"         measures: {s.measures}")
        lines.append(f"  planned: ~{math.ceil(self.planned_s())} s of {self.budget_s:.0f} s")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"budget_s": self.budget_s, "gpu": self.gpu, "planned_s": self.planned_s(),
                "steps": [{"step": s.step, "title": s.title, "measures": s.measures, "estimate_s": s.estimate_s,
                           "decision": s.decision, "reason": s.reason, "problems": s.problems,
                           "costs": {c.name: c.seconds for c in s.costs}} for s in self.steps]}


def budget_reason(needed: float, left: float, budget: float) -> str:
    return f"needs ~{math.ceil(needed)} s, {max(0, math.floor(left))} s of the {budget:.0f} s budget left"
