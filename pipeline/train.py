"""Pretrain a LLaMA model with DeepSpeed.

Run through the DeepSpeed launcher, one process per device:

    deepspeed --num_gpus 8 --module pipeline.train --profile ds_configs/7b_zero3.json --out runs/7b
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module pipeline.train --profile ds_configs/tiny_cpu.json --out runs/tiny

Writes under --out: `profile.json` (the fully resolved profile), `checkpoints/` (DeepSpeed
checkpoints, `latest` naming the newest complete one), `metrics.jsonl` and `tensorboard/`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import torch

from pipeline.checkpoint import CheckpointError, Checkpoints
from pipeline.config import ProfileError, apply_overrides, parse_profile, read_profile_json, resolve
from pipeline.data import Manifest, ManifestError, micro_batch_positions, open_split
from pipeline.distributed import all_reduce_sum, barrier, init_distributed, world_size
from pipeline.faults import FaultInjection, LossSpikeDetector, SkipTracker
from pipeline.metrics import MetricsWriter, detect_peak_flops, flops_per_token
from pipeline.model import ModelConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="JSON profile (see ds_configs/)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics, resolved profile")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="'auto': continue from the newest complete checkpoint in OUT/checkpoints if any; "
                        "'none': start fresh (refused if checkpoints exist); or a tag such as global_step100")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from these weights (a directory written by python -m pipeline.import_hf) instead of "
                        "a random init; ignored when resuming from a checkpoint")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def all_ranks_mean_and_any(value: float, flag: bool) -> tuple[float, bool]:
    """The mean of `value` over ranks and whether any rank raised `flag`, in one all-reduce
    (one collective per step is all the loop adds to DeepSpeed's own)."""
    total, raised = all_reduce_sum([value, 1.0 if flag else 0.0])
    return total / world_size(), raised > 0


def all_ranks_mean(value: float) -> float:
    return all_ranks_mean_and_any(value, False)[0]


def load_init_weights(path: str, model: ModelConfig) -> dict:
    from pipeline.hf import load_init_dir

    cfg, state = load_init_dir(path)
    shape = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "vocab_size")
    diff = [f"{k} {getattr(cfg, k)} ≠ {getattr(model, k)}" for k in shape if getattr(cfg, k) != getattr(model, k)]
    if diff:
        raise ValueError(f"the imported model does not match the profile's model: {', '.join(diff)}")
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    # Validate everything that can be checked from files before any process group starts, so a
    # bad profile fails fast on every rank with the same one-line reasons.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        raw = parse_profile(apply_overrides(read_profile_json(args.profile), args.overrides), args.profile)
        manifest = Manifest.load(raw.data.manifest)
        profile = resolve(raw, args.profile, world, vocab_size=manifest.tokenizer.vocab_size)
        if profile.model.vocab_size < manifest.tokenizer.vocab_size:
            raise ProfileError(f"{args.profile}: model.vocab_size={profile.model.vocab_size} is smaller than the "
                               f"tokenizer's {manifest.tokenizer.vocab_size} ({manifest.tokenizer.model_path})")
    except (ProfileError, ManifestError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.preflight import run_preflight

    # `python -m pipeline.preflight`'s checks, from files only, so every rank reaches its verdict
    # before any process group exists; rank 0 and each node's first rank report (a node can miss a mount).
    failures = run_preflight(profile, raw.data.manifest, args.out, world)
    if failures:
        if rank == 0 or args.local_rank == 0:
            for line in failures:
                print(f"preflight (rank {rank}): {line}", file=sys.stderr)
        return 2
    init_distributed()

    out = Path(args.out)
    ckpts = Checkpoints(out / "checkpoints", profile.train.keep_last)
    profile_dict = profile.resolved_dict()
    profile_dict["data"]["manifest"] = str(Path(raw.data.manifest).resolve())
    if rank == 0:
        ckpts.root.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(profile_dict, indent=2) + "\n")
    ckpts.run_id  # collective: every rank learns the run's id before the first save

    t = profile.train
    tag = ckpts.latest() if args.resume == "auto" else (None if args.resume == "none" else args.resume)
    if args.resume == "none" and ckpts.latest():
        if rank == 0:
            print(f"error: {ckpts.root} already holds checkpoints; use --resume auto or another --out", file=sys.stderr)
        return 2
    topology = {"data_parallel_size": profile.data_parallel_size, "pipeline_stages": profile.topology.pipeline_stages}
    load_tag = None
    if tag:
        try:
            load_tag, universal = ckpts.prepare_resume(tag, topology)
        except CheckpointError as e:
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            return 2
        if universal:
            profile = profile.model_copy(update={"deepspeed": {**profile.deepspeed, "checkpoint": {"load_universal": True}}})

    init_state = None
    if args.init_from and not load_tag and (rank == 0 or profile.topology.engine == "pipeline"):
        try:
            init_state = load_init_weights(args.init_from, profile.model)
        except (OSError, KeyError, ValueError) as e:
            print(f"error: --init-from {args.init_from}: {e}", file=sys.stderr)
            return 2  # the other ranks fail at their next collective; the launcher reports this rank

    torch.manual_seed(t.seed)  # identical initial weights on every rank, and across engines
    from pipeline.engines import build_engine

    engine = build_engine(profile, init_state)
    del init_state
    if args.init_from and not load_tag and rank == 0:
        print(f"initialised from {args.init_from}", flush=True)
    train_samples = open_split(manifest, "train", profile.data.seq_len, profile.data.seed, profile.data.mixture)
    val_shards = manifest.split_shards("validation")
    # Opened only for a run that evaluates: a validation split shorter than one sample stops no other run.
    val_samples = (open_split(manifest, "validation", profile.data.seq_len, profile.data.seed)
                   if val_shards and t.eval_every else None)

    start_step = 0
    if load_tag:
        try:
            start_step = ckpts.load(engine, load_tag)
        except CheckpointError as e:  # this rank's files; the launcher stops the other ranks
            print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
            return 2
        if rank == 0:
            print(f"resumed from {ckpts.root / load_tag} at step {start_step}", flush=True)

    mb, dp, accum, gbs = t.micro_batch_size, profile.data_parallel_size, profile.grad_accum_steps, profile.global_batch_size
    dp_rank = engine.dp_rank
    fpt = flops_per_token(profile.model, profile.data.seq_len)
    device_kind, peak = detect_peak_flops()
    metrics = MetricsWriter(out, enabled=rank == 0)
    preempt = Preemption()
    faults = FaultInjection.from_env()
    skips = SkipTracker(t.max_consecutive_skips, already_skipped=engine.skipped_steps)
    spikes = LossSpikeDetector()
    if rank == 0:
        print(f"training {profile.model.num_params() / 1e6:.2f}M parameters | engine {profile.topology.engine} | "
              f"world {world} (data-parallel {dp}) | batch {gbs} × {profile.data.seq_len} tokens | "
              f"steps {start_step}→{t.steps} | {train_samples.num_samples} train samples", flush=True)

    def micro_batches(samples, step):
        return [samples.batch(micro_batch_positions(step, m, dp_rank, mb, dp, gbs)) for m in range(accum)]

    tic = time.perf_counter()
    step = start_step
    while step < t.steps:
        local = engine.train_step(micro_batches(train_samples, step), poison=step + 1 in faults.nan_steps)
        loss, stop = all_ranks_mean_and_any(local, preempt.requested)
        step += 1
        skipped = skips.update(engine.skipped_steps)
        spike = spikes.update(loss)
        elapsed = time.perf_counter() - tic
        tic = time.perf_counter()
        tokens_per_s = profile.tokens_per_step / elapsed
        tflops_per_dev = fpt * tokens_per_s / world / 1e12
        values = {"train/loss": loss, "train/lr": engine.lr, "perf/tokens_per_s": tokens_per_s,
                  "perf/tflops_per_device": tflops_per_dev, "perf/step_time_s": elapsed,
                  "data/consumed_samples": step * gbs, "train/skipped_steps": skips.total,
                  "train/loss_spikes": spikes.spikes}
        if engine.grad_norm is not None:
            values["train/grad_norm"] = engine.grad_norm
        if peak:
            values["perf/mfu"] = tflops_per_dev * 1e12 / peak
        if torch.cuda.is_available():
            values["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            values["mem/rss_gb"] = psutil.Process().memory_info().rss / 2**30
        if val_samples is not None and t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            losses = [engine.eval_loss(micro_batches(val_samples, b)) for b in range(t.eval_batches)]
            values["val/loss"] = all_ranks_mean(sum(losses) / len(losses))
        metrics.log(step, values)
        if rank == 0 and skipped:
            print(f"step {step}: skipped (non-finite loss or gradient norm; loss {loss}); "
                  f"{skips.consecutive} in a row, {skips.total} in total", flush=True)
        if rank == 0 and spike:
            print(f"step {step}: loss spike {loss:.4f} (spike #{spikes.spikes})", flush=True)
        if rank == 0 and (step % t.log_every == 0 or step == t.steps or step == start_step + 1):
            line = (f"step {step}/{t.steps} | loss {loss:.4f} | lr {engine.lr:.2e} | "
                    f"gnorm {values.get('train/grad_norm', float('nan')):.3f} | {tokens_per_s:,.0f} tok/s | "
                    f"{tflops_per_dev:.3f} TFLOP/s/{device_kind}")
            if "perf/mfu" in values:
                line += f" | MFU {values['perf/mfu']:.1%}"
            if "val/loss" in values:
                line += f" | val {values['val/loss']:.4f}"
            print(line, flush=True)
        if stop or skips.exhausted or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
            # After skipped steps the weights are still those from before the trouble.
            meta = {"consumed_samples": step * gbs, "world_size": world, **topology}
            saved = ckpts.save(engine, step, meta, profile_dict, faults)
            if rank == 0:
                print(f"checkpoint {ckpts.root / saved}", flush=True)
        if skips.exhausted:
            if rank == 0:
                print(f"error: {skips.consecutive} consecutive steps had a non-finite loss or gradient norm "
                      f"(train.max_consecutive_skips={t.max_consecutive_skips}); stopped at step {step}. The weights "
                      f"in {ckpts.root / ckpts.latest()} are those from before step {step - skips.consecutive + 1}; "
                      "lower train.lr or inspect the data, then resume with --resume auto", file=sys.stderr, flush=True)
            metrics.close()
            return 3
        if stop:
            if rank == 0:
                print(f"preempted: stopped after step {step}; resume with --resume auto", flush=True)
            break
    metrics.close()
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
