"""Training throughput of a profile: tokens/s, TFLOP/s per device and MFU.

    python bench/train_throughput.py --profile ds_configs/tiny_cpu.json --manifest runs/demo/prep/shards/manifest.json
    python bench/train_throughput.py --gpu-7b-layers 8      # on a GPU machine

On the CPU it runs our trainer (python -m pipeline.train) and, as the peer, the bare DeepSpeed
loop (bench/bare_deepspeed_loop.py: same model, DeepSpeed config and token windows, nothing
else) through the deepspeed launcher, and prints the ratio of their median step times
(target: ours ≤ 1.05× bare).

With --gpu-7b-layers K on a GPU it trains the LLaMA-7B layer shape (dim 4096, FFN 11008, 32
heads, seq 4096, bf16, activation checkpointing) with K layers on one GPU through our trainer
and prints MFU (FLOPs convention: pipeline/metrics.py flops_per_token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_profile  # noqa: E402
from pipeline.data import Manifest  # noqa: E402
from pipeline.metrics import flops_per_token  # noqa: E402

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
WARMUP = 3  # steps left out of the medians (allocation, JIT, first gloo connections)


def launch(args: list[str], nproc: int, env: dict) -> None:
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(29600 + os.getpid() % 300), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def ours(profile: str, manifest: str, steps: int, nproc: int, sets: list[str], env: dict) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"data.manifest={manifest}", f"train.steps={steps}", "train.eval_every=0",
                     "train.checkpoint_every=0", f"train.log_every={steps}", *sets]
        args = ["--module", "pipeline.train", "--profile", profile, "--out", tmp]
        for o in overrides:
            args += ["--set", o]
        launch(args, nproc, env)
        recs = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
        return [r["perf/step_time_s"] for r in recs]


def bare(profile: str, manifest: str, steps: int, nproc: int, sets: list[str], env: dict) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "times.json")
        args = ["bench/bare_deepspeed_loop.py", "--profile", profile, "--manifest", manifest, "--steps", str(steps),
                "--out", str(out)]
        for o in sets:
            args += ["--set", o]
        launch(args, nproc, env)
        return json.loads(out.read_text())["step_times"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="ds_configs/tiny_cpu.json")
    p.add_argument("--manifest", default="runs/demo/prep/shards/manifest.json", help="prepared data (make demo makes one)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2, help="processes (devices)")
    p.add_argument("--rounds", type=int, default=2, help="alternate ours/bare this many times")
    p.add_argument("--set", dest="sets", action="append", default=[], help="profile override, repeatable")
    p.add_argument("--gpu-7b-layers", type=int, default=0, metavar="K",
                   help="GPU mode: the LLaMA-7B layer shape with K layers on one GPU")
    args = p.parse_args()
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")

    if args.gpu_7b_layers:
        sets = ["model.n_layers=%d" % args.gpu_7b_layers, "model.vocab_size=32000", "data.seq_len=4096",
                "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.global_batch_tokens=auto",
                "train.global_batch_size=auto", "train.activation_checkpointing=true",
                "train.warmup_steps=1", *args.sets]
        times = ours("ds_configs/7b_zero3.json", args.manifest, args.steps, 1, sets, env)[WARMUP:]
        profile = load_profile(REPO / "ds_configs/7b_zero3.json", 1, [*sets, f"data.manifest={args.manifest}",
                               f"train.steps={args.steps}"], vocab_size=Manifest.load(args.manifest).tokenizer.vocab_size)
        from pipeline.metrics import detect_peak_flops

        kind, peak = detect_peak_flops()
        step = statistics.median(times)
        tok_s = profile.tokens_per_step / step
        flops = flops_per_token(profile.model, profile.data.seq_len) * tok_s
        m = profile.model
        print(f"LLaMA-7B layer shape: dim {m.dim}, FFN {m.ffn_dim}, {m.n_heads} heads, {m.n_layers} layers, "
              f"seq {profile.data.seq_len}, {profile.train.precision}, 1 × {kind}")
        print(f"  median step {step:.3f} s | {tok_s:,.0f} tokens/s | {flops / 1e12:.1f} TFLOP/s"
              + (f" | MFU {flops / peak:.1%}" if peak else ""))
        return

    env.setdefault("DS_ACCELERATOR", "cpu")
    # One thread per process: N processes on N cores, as the tests run; torch's default (all
    # cores in every process) oversubscribes and turns scheduling noise into the measurement.
    env.setdefault("OMP_NUM_THREADS", "1")
    profile = load_profile(REPO / args.profile, args.nproc, [*args.sets, f"data.manifest={args.manifest}"],
                           vocab_size=Manifest.load(args.manifest).tokenizer.vocab_size)
    ours_t, bare_t = [], []
    for r in range(args.rounds):
        ours_t += ours(args.profile, args.manifest, args.steps, args.nproc, args.sets, env)[WARMUP:]
        bare_t += bare(args.profile, args.manifest, args.steps, args.nproc, args.sets, env)[WARMUP:]
    fpt = flops_per_token(profile.model, profile.data.seq_len)
    print(f"profile {args.profile}: {profile.model.num_params() / 1e6:.2f}M parameters, {args.nproc} processes, "
          f"{profile.tokens_per_step} tokens/step, {args.rounds} rounds × {args.steps - WARMUP} timed steps")
    for name, times in (("ours (pipeline.train)", ours_t), ("bare DeepSpeed loop", bare_t)):
        step = statistics.median(times)
        tok_s = profile.tokens_per_step / step
        print(f"  {name:22s} median step {step * 1e3:8.1f} ms | {tok_s:10,.0f} tokens/s | "
              f"{fpt * tok_s / args.nproc / 1e12:.4f} TFLOP/s per process")
    ratio = statistics.median(ours_t) / statistics.median(bare_t)
    print(f"  ratio ours / bare step time: {ratio:.3f} (target ≤ 1.05)")


if __name__ == "__main__":
    main()
