"""The second peer for bench/train_throughput.py: a plain PyTorch loop on one device, no DeepSpeed.

The same model (pipeline.model.Transformer, its blocks prepared by `prepare_blocks`: attention
backend, activation checkpointing, compile), the same optimizer groups and schedule
(`build_optimizer`: torch AdamW, fused on a GPU), gradient clipping and accumulation as the
profile says, the same token windows as a one-rank run of the trainer.

Precision: weights, gradients and AdamW states stay fp32 (the master weights) and a bf16 profile
runs forward and backward under `torch.autocast(dtype=bfloat16)`, the usual way of mixed
precision in plain PyTorch. (DeepSpeed's bf16 keeps bf16 weights and gradients beside fp32
master weights and optimizer states: the same 16 bytes per parameter, split differently.) fp16
would need a loss scaler and is refused.

    python bench/plain_torch_loop.py --profile P --manifest M --steps N --out times.json

Writes {"step_times": [seconds per optimizer step], "peak_mem_gib": GiB or null, "sdpa_backend":
the scaled-dot-product-attention kernel that ran, "device": str} to --out. The kernel is read off
the operators torch's profiler records in one extra, untimed forward and backward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peer_args import peer_parser  # noqa: E402
from pipeline.config import Profile, load_profile  # noqa: E402
from pipeline.data import Manifest, micro_batch_positions, open_split  # noqa: E402
from pipeline.engines.blocks import prepare_blocks  # noqa: E402
from pipeline.model import Transformer  # noqa: E402
from pipeline.optim import build_optimizer  # noqa: E402

# The ATen operator each SDPA kernel runs as (forward), by backend name as in train.attention_backend.
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_attention_math": "math"}


def parse_args(argv=None) -> argparse.Namespace:
    return peer_parser(__doc__, "JSON profile (see ds_configs/); its deepspeed section is unused").parse_args(argv)


def autocast(profile: Profile, device: torch.device):
    precision = profile.train.precision
    if precision == "fp16":
        raise SystemExit(f"{profile.source}: train.precision: the plain loop runs fp32 or bf16 (got \"fp16\")")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build(profile: Profile, device: torch.device):
    torch.manual_seed(profile.train.seed)
    with device:  # initialised where it trains, as zero.Init does: no host copy of a large model
        model = Transformer(profile.model, seed=profile.train.seed, loss_chunk_tokens=profile.train.loss_chunk_tokens)
    prepare_blocks(enumerate(model.layers), profile.train)
    opt, sched = build_optimizer(model.named_parameters(), profile.train)
    return model, opt, sched


def forward_backward(model, batches, device, precision_ctx) -> torch.Tensor:
    total = torch.zeros((), device=device)
    for x, y in batches:
        with precision_ctx:  # the model's own loss (chunked as the profile says), as the engines compute it
            loss = model(torch.from_numpy(x).to(device, non_blocking=True),
                         torch.from_numpy(y).to(device, non_blocking=True)) / len(batches)
        loss.backward()
        total += loss.detach()
    return total


def train_step(model, opt, sched, batches, device, precision_ctx, grad_clip: float) -> float:
    loss = forward_backward(model, batches, device, precision_ctx)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # waits for the device, as the trainer's loss read does


def sdpa_backend_that_ran(model, batches, device, precision_ctx) -> str:
    """The SDPA kernel of one forward and backward, from the operators the profiler recorded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward(model, batches, device, precision_ctx)
    model.zero_grad(set_to_none=True)
    ran = {SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS}
    return "+".join(sorted(ran)) if ran else "unknown"


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = Manifest.load(args.manifest)
    profile = load_profile(args.profile, 1, [*args.overrides, f"data.manifest={args.manifest}"],
                           vocab_size=manifest.tokenizer.vocab_size)
    t = profile.train
    model, opt, sched = build(profile, device)
    precision_ctx = autocast(profile, device)
    samples = open_split(manifest, "train", profile.data.seq_len, profile.data.seed, profile.data.mixture)
    mb, accum, gbs = t.micro_batch_size, profile.grad_accum_steps, profile.global_batch_size

    def batches(step):
        return [samples.batch(micro_batch_positions(step * gbs, m, 0, mb, 1)) for m in range(accum)]

    times = []
    for step in range(args.steps):
        tic = time.perf_counter()
        train_step(model, opt, sched, batches(step), device, precision_ctx, t.grad_clip)
        times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    backend = sdpa_backend_that_ran(model, batches(args.steps), device, precision_ctx)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps({"step_times": times, "peak_mem_gib": peak, "sdpa_backend": backend,
                                          "device": name}))


if __name__ == "__main__":
    main()
