"""AdamW with LLaMA's recipe: decay on weights only, linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch

from pipeline.config import TrainSection


def no_decay(name: str) -> bool:
    """Norm gains and biases are not decayed (LLaMA, following GPT-3). Decided by name because
    ZeRO-3 partitions parameters into 1-D shards, so `p.ndim` cannot tell a norm from a matrix."""
    return name.endswith(("norm.weight", ".bias")) or name.endswith("norm")


def param_groups(named_params, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in named_params:
        if p.requires_grad:
            (plain if no_decay(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if step >= decay_steps:  # the cosine ends at decay_steps; flat at the floor after it
        return min_ratio
    progress = (step - warmup) / (decay_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_offloaded(ds_config: dict) -> bool:
    """Whether the DeepSpeed config keeps optimizer states in host memory or on NVMe (ZeRO-Offload)."""
    device = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_optimizer(named_params, t: TrainSection, offload: bool = False
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the decay / no-decay groups with the warmup-cosine schedule. With the optimizer
    offloaded to the CPU the step runs there, so DeepSpeed's vectorised CPU Adam (AdamW mode) is
    used: several times faster than torch's, and what DeepSpeed requires for offload."""
    groups = param_groups(list(named_params), t.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                               adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=torch.cuda.is_available())
    decay_steps = t.steps if t.decay_steps == "auto" else t.decay_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup_steps, decay_steps, t.min_lr_ratio))
    return opt, sched
