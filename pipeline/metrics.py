"""Training metrics: FLOPs accounting and the writers (JSONL, TensorBoard, progress line)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from pipeline.model import ModelConfig

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    "h100-80gb": 989e12,  # H100 SXM
    "h100-pcie": 756e12,
    "h200": 989e12,
    "a100-80gb": 312e12,
    "a100-40gb": 312e12,
    "l40s": 362e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·d·T.

    6N: forward (2N) plus backward (4N) multiply-adds over the N weights that multiply
    activations: every projection and the output head (the input embedding is a lookup and the
    RMSNorm gains an element-wise scale, so their V·d and (2L + 1)·d parameters are excluded). 12·L·d·T: the attention scores and weighted sum, QKᵀ and AV, each
    2·T·d per token per layer forward, ×3 for forward+backward. No causal discount (the
    convention of PaLM's MFU and of most published MFU figures); activation recomputation is
    not counted, so MFU stays comparable with and without activation checkpointing.

    Document masking (train.document_masking) is not discounted either: T stays the window
    length, as for plain causal attention, although a token then attends only to its own
    document. So MFU and the planner's time compare across masking on and off at the same model
    work; the FLOPs the masked kernel really performs are fewer, by up to the attention share
    (12·L·d·T over the total: 14 % for 7B at 4096 tokens), when documents are shorter than the window.
    """
    n = cfg.num_params() - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.dim * seq_len


def detect_peak_flops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    return gpu_kind(torch.cuda.get_device_name())


def gpu_kind(device_name: str) -> tuple[str, float | None]:
    """(kind, dense bf16 peak FLOP/s or None) of a GPU by the name torch gives it."""
    name = device_name.lower()
    if "h200" in name:
        return "h200", PEAK_FLOPS["h200"]
    if "h100" in name:
        return ("h100-pcie", PEAK_FLOPS["h100-pcie"]) if "pcie" in name else ("h100-80gb", PEAK_FLOPS["h100-80gb"])
    if "a100" in name:
        return "a100-80gb", PEAK_FLOPS["a100-80gb"]
    if "l40s" in name:
        return "l40s", PEAK_FLOPS["l40s"]
    return name, None


class MetricsWriter:
    """Rank 0 writes metrics to `metrics.jsonl` and TensorBoard under `out_dir`; others write nothing.

    `metrics.jsonl` is strict JSON, one object per step: a non-finite value is written as null and
    its name listed under "nonfinite" (TensorBoard gets the NaN itself). A run resumed at step S
    first drops the records after S (steps logged after the checkpoint it resumes from, which it
    trains again), so every step appears once; TensorBoard purges them the same way."""

    def __init__(self, out_dir: str | Path, enabled: bool, resume_step: int = 0, wandb: WandbRun | None = None):
        self.enabled, self._wandb = enabled, wandb
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if path.exists():
            _keep_steps_up_to(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        nonfinite = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
        record = {"step": step, "time": time.time(), **{k: None if k in nonfinite else v for k, v in values.items()}}
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(step, values)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


WANDB_MISSING = "train.wandb is set but the wandb package is not installed: pip install wandb (or drop train.wandb)"


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


class WandbRun:
    """A Weights & Biases run on rank 0, with the same scalars as TensorBoard and the resolved
    profile as its config. Its id is the run's (OUT/checkpoints/run_id), so a resumed run
    continues the same W&B run; its charts use `step` as their x axis, so the steps a resume
    trains again are drawn at their own step. Files go to OUT/wandb/."""

    def __init__(self, settings, out_dir: Path, run_id: str, config: dict):
        import wandb

        self._run = wandb.init(project=settings.project, name=settings.name, mode=settings.mode, dir=str(out_dir),
                               id=run_id, resume="allow", config=config)
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict) -> None:
        self._run.log({"step": step, **{k: v for k, v in values.items() if isinstance(v, (int, float))}})

    def close(self) -> None:
        self._run.finish()


def _keep_steps_up_to(path: Path, last_step: int) -> None:
    """Rewrite `path` without the records of steps after `last_step` (temporary file, rename)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # the torn last line of a killed run
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
