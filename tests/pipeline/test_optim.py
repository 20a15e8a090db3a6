"""The learning-rate schedule and the weight-decay groups, each against an independent statement
of what they should be (the training tests' plain-PyTorch reference reuses build_optimizer, so a
bug here would show on both sides there)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TrainSection
from pipeline.model import ModelConfig, Transformer
from pipeline.optim import build_optimizer, param_groups


def closed_form(step: int, peak: float, warmup: int, decay: int, floor: float) -> float:
    """LLaMA's schedule for 0-based optimizer step `step`: linear warmup reaching the peak at step
    warmup - 1, then half a cosine from the peak down to floor · peak at step `decay`, flat after."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay:
        return peak * floor
    return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) / 2)


@pytest.mark.parametrize("warmup, decay, steps", [(10, 100, 100), (0, 50, 80), (5, 5, 20)])
def test_schedule_follows_the_closed_form_step_by_step(warmup, decay, steps):
    t = TrainSection(micro_batch_size=1, steps=steps, lr=3e-4, warmup_steps=warmup, decay_steps=decay, min_lr_ratio=0.1)
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt, sched = build_optimizer([("w", w)], t)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])  # the rate this optimizer step uses
        opt.step()
        sched.step()
    want = [closed_form(s, 3e-4, warmup, decay, 0.1) for s in range(steps)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)
    # Landmarks, so a wrong closed form above cannot hide a wrong schedule.
    if warmup:
        assert seen[0] == pytest.approx(3e-4 / warmup) and seen[warmup - 1] == pytest.approx(3e-4)
    assert seen[-1] == pytest.approx(3e-5 if steps > decay else closed_form(steps - 1, 3e-4, warmup, decay, 0.1))


def test_weight_decay_applies_to_matrices_and_embeddings_not_to_norm_gains():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=100, max_seq_len=16)
    model = Transformer(cfg, seed=0)
    decay, plain = param_groups(model.named_parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    want_plain = {"norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")}
    want_decay = ({"tok_embeddings.weight", "output.weight"} |
                  {f"layers.{i}.{m}.weight" for i in range(2)
                   for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")})
    assert {names[id(p)] for p in plain["params"]} == want_plain
    assert {names[id(p)] for p in decay["params"]} == want_decay
