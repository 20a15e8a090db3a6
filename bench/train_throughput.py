"""Training throughput of our trainer against peers doing the same work: step time, tokens/s,
TFLOP/s per device, MFU, and their ratios.

    python bench/train_throughput.py --profile ds_configs/tiny_cpu.json --manifest runs/demo/prep/shards/manifest.json
    python bench/train_throughput.py --gpu-7b-layers 8 --json gpu.json       # on a GPU machine
    python bench/train_throughput.py --gpu-7b-layers 8 --dry-run             # the plan, anywhere

CPU mode (the default) runs, through the deepspeed launcher on --nproc processes (one thread
each), our trainer (python -m pipeline.train) and the bare DeepSpeed loop
(bench/bare_deepspeed_loop.py: the same model, block preparation, optimizer, DeepSpeed config,
topology and token windows, and nothing else), alternating --rounds times, and prints the ratio
of their median step times (target: ours ≤ 1.05× bare). Both engines: ZeRO-3 and pipeline.

GPU mode (--gpu-7b-layers K) trains the LLaMA-7B layer shape (dim 4096, FFN 11008, 32 heads,
seq 4096, vocabulary 32000, bf16, K layers, activation checkpointing unless
--no-activation-checkpointing, flash attention, the loss in chunks of --loss-chunk-tokens) on one GPU, from ds_configs/7b_zero3.json, three
ways in one invocation: ours through the deepspeed launcher, the bare DeepSpeed loop, and a plain
PyTorch loop (bench/plain_torch_loop.py: fp32 master weights with bf16 autocast, fused torch
AdamW, no DeepSpeed). Without --manifest it prepares data from the built-in demo corpus once
(runs/bench/prep; the model's vocabulary may exceed the tokenizer's). No run writes a
checkpoint (`train.final_checkpoint=false`): a benchmark measures, and at the 7B layer shape a
checkpoint would be ~14 bytes per parameter of disk and time.

Figures are medians over the steps after the first 3 (allocation, JIT, first connections).
FLOPs convention: pipeline/metrics.py flops_per_token; peak FLOP/s: detect_peak_flops.
Measured figures and their commands: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import Profile, ProfileError, load_profile  # noqa: E402
from pipeline.data import Manifest, ManifestError  # noqa: E402
from pipeline.metrics import detect_peak_flops, flops_per_token  # noqa: E402

# The deepspeed launcher, run by this interpreter (its console script may sit off PATH, beside the
# packages of another environment, as in the GPU check's venv).
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
WARMUP = 3  # steps left out of the medians (allocation, JIT, first gloo/NCCL connections)
GPU_PROFILE = "ds_configs/7b_zero3.json"
DEMO_PREP = REPO / "runs/bench/prep"


@dataclass
class Run:
    """One measured program: its command, the profile overrides it applies, and how to read its
    step times and peak memory back."""

    name: str  # "ours" | "bare_deepspeed" | "plain_pytorch"
    label: str
    cmd: list[str]
    nproc: int
    overrides: list[str]
    read: Callable[[], dict]
    engine_note: str = ""  # what the run does instead of the profile's engine, if anything


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_flags(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def deepspeed_cmd(nproc: int, *args: str) -> list[str]:
    return [*DEEPSPEED, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            *args]


def run_overrides(steps: int, sets: list[str]) -> list[str]:
    """What every run's profile gets: no evaluation and no checkpoint, one progress line at the
    end; the peers ignore what their loop lacks."""
    return [f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0", "train.final_checkpoint=false",
            f"train.log_every={steps}", *sets]


def read_times(path: Path) -> Callable[[], dict]:
    return lambda: json.loads(path.read_text())


def read_ours(out: Path) -> Callable[[], dict]:
    def read() -> dict:
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        peaks = [r["mem/max_allocated_gb"] for r in recs if "mem/max_allocated_gb" in r]
        return {"step_times": [r["perf/step_time_s"] for r in recs], "peak_mem_gib": max(peaks) if peaks else None}
    return read


def ours(profile: str, manifest: str, nproc: int, overrides: list[str], work: Path) -> Run:
    out = work / "ours"
    cmd = deepspeed_cmd(nproc, "--module", "pipeline.train", "--profile", profile, "--out", str(out),
                        *set_flags([f"data.manifest={manifest}", *overrides]))
    return Run("ours", "ours (pipeline.train)", cmd, nproc, overrides, read_ours(out))


def bare(profile: str, manifest: str, steps: int, nproc: int, overrides: list[str], work: Path) -> Run:
    out = work / "bare.json"
    cmd = deepspeed_cmd(nproc, "bench/bare_deepspeed_loop.py", "--profile", profile, "--manifest", manifest,
                        "--steps", str(steps), "--out", str(out), *set_flags(overrides))
    return Run("bare_deepspeed", "bare DeepSpeed loop", cmd, nproc, overrides, read_times(out))


def plain(profile: str, manifest: str, steps: int, overrides: list[str], work: Path) -> Run:
    out = work / "plain.json"
    cmd = [sys.executable, "bench/plain_torch_loop.py", "--profile", profile, "--manifest", manifest,
           "--steps", str(steps), "--out", str(out), *set_flags(overrides)]
    return Run("plain_pytorch", "plain PyTorch loop", cmd, 1, overrides, read_times(out),
               "none (no DeepSpeed: fp32 master weights, bf16 autocast for a bf16 profile, torch AdamW fused on a GPU)")


def execute(run: Run, env: dict) -> dict:
    proc = subprocess.run(run.cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{run.name} failed: {shlex.join(run.cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run.read()


@dataclass
class Figures:
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None
    peak_mem_gib: float | None


def figures(step_times: list[float], peak_mem: float | None, profile: Profile, nproc: int,
            peak_flops: float | None) -> Figures:
    step = statistics.median(step_times)
    tok_s = profile.tokens_per_step / step
    tflops = flops_per_token(profile.model, profile.data.seq_len) * tok_s / nproc / 1e12
    return Figures(step, tok_s, tflops, tflops * 1e12 / peak_flops if peak_flops else None, peak_mem)


def print_figures(label: str, f: Figures) -> None:
    line = (f"  {label:22s} median step {f.step_time_s * 1e3:9.1f} ms | {f.tokens_per_s:10,.0f} tokens/s | "
            f"{f.tflops_per_device:.4f} TFLOP/s per device")
    if f.mfu is not None:
        line += f" | MFU {f.mfu:.1%}"
    if f.peak_mem_gib is not None:
        line += f" | peak {f.peak_mem_gib:.1f} GiB"
    print(line, flush=True)


def print_plan(runs: list[Run], profile_path: str, env: dict, vocab_size: int | None, note: str = "") -> None:
    """Each run's command and its resolved profile (a bad override fails here as it would in the run)."""
    for run in runs:
        p = load_profile(REPO / profile_path, run.nproc, run.overrides, vocab_size=vocab_size)
        t, m = p.train, p.model
        print(f"{run.name}: {shlex.join(run.cmd)}")
        print(f"  resolved: engine {run.engine_note or p.topology.engine}, {run.nproc} process(es), "
              f"{m.n_layers} layers, dim {m.dim}, FFN {m.ffn_dim}, {m.n_heads} heads, vocab {m.vocab_size}, seq {p.data.seq_len} "
              f"(max {m.max_seq_len}), micro-batch {t.micro_batch_size} × accumulation {p.grad_accum_steps}, "
              f"{t.precision}, activation checkpointing {t.activation_checkpointing}, attention "
              f"{t.attention_backend}, loss chunk {t.loss_chunk_tokens}, compile {t.compile}, {t.steps} steps, "
              f"final checkpoint {t.final_checkpoint}")
    if note:
        print(note)
    pinned = [f"{k}={env[k]}" for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS") if k in env]
    if pinned:
        print(f"environment: {' '.join(pinned)}")


def measure(make_runs: Callable[[Path], list[Run]], rounds: int, env: dict, work_root: str) -> dict[str, dict]:
    """Every run once per round, in turn, the order reversed every other round (so slow drifts of
    a shared machine hit all alike); step times after WARMUP pooled over the rounds, peak memory
    the highest."""
    outputs: dict[str, dict] = {}
    for r in range(rounds):
        work = Path(work_root, f"round{r}")  # a fresh --out per round: the trainer would resume otherwise
        work.mkdir(parents=True)
        runs = make_runs(work)
        for run in runs[::-1] if r % 2 else runs:
            out = execute(run, env)
            acc = outputs.setdefault(run.name, {"label": run.label, "step_times": [], "round_medians": [],
                                                "peak_mem_gib": None})
            acc["step_times"] += out["step_times"][WARMUP:]
            acc["round_medians"].append(statistics.median(out["step_times"][WARMUP:]))
            if out.get("peak_mem_gib") is not None:
                acc["peak_mem_gib"] = max(acc["peak_mem_gib"] or 0.0, out["peak_mem_gib"])
            if "sdpa_backend" in out:
                acc["sdpa_backend"] = out["sdpa_backend"]
        shutil.rmtree(work)
    return outputs


def gpu_overrides(layers: int, micro_batch: int, activation_checkpointing: bool, extra: list[str],
                  loss_chunk_tokens: int) -> list[str]:
    """The LLaMA-7B layer shape on ds_configs/7b_zero3.json: K of its layers, seq 4096 (so
    max_seq_len 4096 too), a 32000-token vocabulary whatever the tokenizer's, one micro-batch per
    step, the loss in chunks (what a 7B run uses: the fp32 logits of 4 × 4096 tokens are 2 GiB)."""
    return [f"model.n_layers={layers}", "model.vocab_size=32000", "model.max_seq_len=4096", "data.seq_len=4096",
            f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1", "train.global_batch_tokens=auto",
            "train.global_batch_size=auto", f"train.activation_checkpointing={str(activation_checkpointing).lower()}",
            "train.attention_backend=flash", f"train.loss_chunk_tokens={loss_chunk_tokens}", "train.warmup_steps=1",
            *extra]


def prepare_demo_manifest(env: dict) -> str:
    """Token shards from ~20 MB of the built-in demo corpus, made once; enough 4097-token windows
    for a benchmark (the order wraps around when a run needs more)."""
    manifest = DEMO_PREP / "shards/manifest.json"
    if manifest.exists():
        return str(manifest)
    config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
    config["sources"][0]["max_bytes"] = 20_000_000
    config["tokenizer"]["sample_bytes"] = 5_000_000
    DEMO_PREP.parent.mkdir(parents=True, exist_ok=True)
    cfg = DEMO_PREP.parent / "prep.json"
    cfg.write_text(json.dumps(config))
    print(f"preparing data from the demo corpus into {DEMO_PREP} ...", flush=True)
    cmd = [sys.executable, "-m", "data_prep", "run", "--config", str(cfg), "--out", str(DEMO_PREP)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"data prep failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return str(manifest)


def gpu_runs(args, manifest: str) -> Callable[[Path], list[Run]]:
    overrides = run_overrides(args.steps, gpu_overrides(args.gpu_7b_layers, args.micro_batch,
                                                        args.activation_checkpointing, args.sets,
                                                        args.loss_chunk_tokens))
    return lambda work: [ours(GPU_PROFILE, manifest, 1, overrides, work),
                         bare(GPU_PROFILE, manifest, args.steps, 1, overrides, work),
                         plain(GPU_PROFILE, manifest, args.steps, overrides, work)]


def sdpa_backend(profile: Profile, probed: str) -> str:
    """What ran: the plain loop's profiler reading (the same model, prepared the same way, on the
    same shapes); with one kernel forced, a run that could not use it would have failed."""
    if probed == "unknown" and profile.train.attention_backend != "default":
        return profile.train.attention_backend
    return probed


def gpu_mode(args, env: dict) -> None:
    manifest = args.manifest or str(DEMO_PREP / "shards/manifest.json")
    make_runs = gpu_runs(args, manifest)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        if args.dry_run:
            note = "" if args.manifest or Path(manifest).exists() else f"data: prepared from the demo corpus first ({manifest})"
            print_plan(make_runs(Path(tmp)), GPU_PROFILE, env, None, note)
            return
        if not args.manifest:
            prepare_demo_manifest(env)
        outputs = measure(make_runs, args.rounds or 1, env, tmp)
    profile = load_profile(REPO / GPU_PROFILE, 1, make_runs(Path(tmp))[0].overrides)
    report_gpu(args, profile, outputs)


def report_gpu(args, profile: Profile, outputs: dict[str, dict]) -> None:
    import torch

    kind, peak = detect_peak_flops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    m, t = profile.model, profile.train
    backend = sdpa_backend(profile, outputs["plain_pytorch"]["sdpa_backend"])
    print(f"LLaMA-7B layer shape: dim {m.dim}, FFN {m.ffn_dim}, {m.n_heads} heads, {m.n_layers} layers, "
          f"seq {profile.data.seq_len}, micro-batch {t.micro_batch_size}, {t.precision}, activation checkpointing "
          f"{t.activation_checkpointing}, SDPA {backend}, 1 × {device} ({kind})")
    figs = {}
    for name, out in outputs.items():
        figs[name] = figures(out["step_times"], out["peak_mem_gib"], profile, 1, peak)
        print_figures(out["label"], figs[name])
    for peer in ("bare_deepspeed", "plain_pytorch"):
        print(f"  ratio ours / {peer} step time: {figs['ours'].step_time_s / figs[peer].step_time_s:.3f}")
    if args.json:
        shape = {"dim": m.dim, "ffn_dim": m.ffn_dim, "n_heads": m.n_heads, "n_layers": m.n_layers,
                 "seq_len": profile.data.seq_len, "micro_batch_size": t.micro_batch_size, "precision": t.precision}
        results = [{"name": name, **vars(f)} for name, f in figs.items()]
        Path(args.json).write_text(json.dumps({"device": device, "shape": shape, "results": results,
                                               "sdpa_backend": backend}, indent=2) + "\n")


def cpu_mode(args, env: dict) -> None:
    env.setdefault("DS_ACCELERATOR", "cpu")
    # One thread per process: N processes on N cores, as the tests run; torch's default (all
    # cores in every process) oversubscribes and turns scheduling noise into the measurement.
    env.setdefault("OMP_NUM_THREADS", "1")
    manifest = args.manifest or "runs/demo/prep/shards/manifest.json"
    vocab = Manifest.load(manifest).tokenizer.vocab_size
    overrides = run_overrides(args.steps, args.sets)

    def make_runs(work: Path) -> list[Run]:
        return [ours(args.profile, manifest, args.nproc, overrides, work),
                bare(args.profile, manifest, args.steps, args.nproc, overrides, work)]

    rounds = args.rounds or 2
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        if args.dry_run:
            print_plan(make_runs(Path(tmp)), args.profile, env, vocab)
            return
        outputs = measure(make_runs, rounds, env, tmp)
    profile = load_profile(REPO / args.profile, args.nproc, overrides, vocab_size=vocab)
    print(f"profile {args.profile} {' '.join(args.sets)}: {profile.model.num_params() / 1e6:.2f}M parameters, "
          f"engine {profile.topology.engine}, {args.nproc} processes, {profile.tokens_per_step} tokens/step, "
          f"{rounds} rounds × {args.steps - WARMUP} timed steps")
    figs = {name: figures(out["step_times"], None, profile, args.nproc, None) for name, out in outputs.items()}
    for name, f in figs.items():
        print_figures(outputs[name]["label"], f)
    per_round = [o / b for o, b in zip(outputs["ours"]["round_medians"], outputs["bare_deepspeed"]["round_medians"])]
    print(f"  ratio ours / bare step time: {figs['ours'].step_time_s / figs['bare_deepspeed'].step_time_s:.3f} "
          f"(target ≤ 1.05; per round {', '.join(f'{r:.3f}' for r in per_round)})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="ds_configs/tiny_cpu.json", help="CPU mode: the profile to measure")
    p.add_argument("--manifest", help="prepared data (CPU default: runs/demo/prep/shards/manifest.json, which "
                   "make demo makes; GPU default: prepared from the demo corpus into runs/bench/prep)")
    p.add_argument("--steps", type=int, default=30, help="steps per run, the first 3 untimed")
    p.add_argument("--nproc", type=int, default=2, help="CPU mode: processes (devices)")
    p.add_argument("--rounds", type=int, help="alternate the runs this many times (default: 2 on the CPU, 1 on a GPU)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="profile override for every run, repeatable")
    p.add_argument("--gpu-7b-layers", type=int, default=0, metavar="K",
                   help="GPU mode: the LLaMA-7B layer shape with K layers on one GPU, three ways")
    p.add_argument("--micro-batch", type=int, default=1, metavar="M", help="GPU mode: sequences per micro-batch")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU mode: recompute every block's activations in the backward pass")
    p.add_argument("--loss-chunk-tokens", type=int, default=4096, metavar="N",
                   help="GPU mode: cross-entropy N tokens at a time (train.loss_chunk_tokens; 0: all at once)")
    p.add_argument("--json", metavar="FILE", help="GPU mode: write the results as JSON (schema in docs/benchmarks.md)")
    p.add_argument("--work", help="directory for the runs' outputs (default: a temporary directory)")
    p.add_argument("--dry-run", action="store_true", help="resolve every run's profile and print the plan; launch nothing")
    args = p.parse_args(argv)
    if args.json and not args.gpu_7b_layers:
        p.error("--json is written in GPU mode (--gpu-7b-layers K)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")
    try:
        (gpu_mode if args.gpu_7b_layers else cpu_mode)(args, env)
    except (ProfileError, ManifestError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
