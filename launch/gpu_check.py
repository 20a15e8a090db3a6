"""Prove the GPU path and measure it on a machine with one or more NVIDIA GPUs (`make gpu-check`).

    python launch/gpu_check.py [--out runs/gpu-check] [--steps a,b,c,d] [--dry-run]

  a  the demo path on the GPU: data prep → ZeRO-3 bf16 training over NCCL through the deepspeed
     launcher → checkpoint → resume → export --verify → generate with transformers; the pipeline
     engine (2 stages, bf16) when there are 2 GPUs or more
  b  the LLaMA-7B layer shape (dim 4096, FFN 11008, 32 heads, seq 4096, bf16) through
     bench/train_throughput.py: tokens/s, TFLOP/s and MFU of ours, a bare DeepSpeed loop and
     plain PyTorch
  c  llama-1b, ZeRO-3 bf16, a few steps: measured peak GPU memory beside pipeline.plan's prediction
  d  llama-7b, ZeRO-3 with the optimizer states in host memory, a few steps: finite loss,
     checkpoint, export, load with transformers; skipped, saying why, where the planner finds
     too little GPU or host memory or the preflight too little disk

Every step records pass, fail or skipped, its figures and its wall time, and on failure the end of
the failing command's output; a failed step does not stop the next. Results go to OUT/report.md
and OUT/report.json, each command's output to OUT/logs/. Exit status 1 if a step failed.

--dry-run needs no GPU: it prepares the data (or takes --manifest) and passes the profile of every
run of the chosen steps through the planner and the preflight, for --gpus GPUs of kind --plan-gpu.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# This process only plans and reports. Its DeepSpeed (the planner's estimator) stays off the GPU:
# a CUDA context here would hold memory the measured runs then lack. The commands get "cuda".
os.environ["DS_ACCELERATOR"] = "cpu"

from launch.gpu_report import StepResult, failed, write_report  # noqa: E402
from pipeline.config import Profile, ProfileError, load_profile  # noqa: E402
from pipeline.plan import GPU_MEMORY, HEADROOM, GiB, memory  # noqa: E402
from pipeline.preflight import run_preflight  # noqa: E402

TITLES = {"a": "demo path on the GPU", "b": "LLaMA-7B layer shape throughput", "c": "llama-1b memory against the plan",
          "d": "llama-7b with optimizer offload"}
# The `deepspeed` launcher (its console script calls this main), run by this interpreter: in the
# GPU venv the script may sit beside the machine's own packages, off PATH.
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
# A slice of the demo corpus: enough tokens for every step (samples repeat by epoch anyway), and
# data prep done in about a minute instead of several. A tenth of the documents for validation:
# the demo's 2 % of a slice can be a single short document, shorter than one sample.
PREP_MAX_BYTES, PREP_TOKENIZER_BYTES, PREP_VALIDATION = 20_000_000, 4_000_000, 0.1
DEMO_STEPS = 30  # the resumed run goes on to twice as many
MEMORY_STEPS, BIG_STEPS = 5, 3
LAYER_COUNTS, MICRO_BATCHES = (8, 4, 2, 1), (4, 2, 1)
MEMORY_TOLERANCE = 0.10  # step c's target: measured peak within 10 % of the plan
H100_MFU_TARGET = 0.50  # step b's target for ours on an H100
# Wall-clock limits per command, so a hung collective costs minutes, not the whole check.
PREP_TIMEOUT, SMALL_TIMEOUT, BENCH_TIMEOUT, BIG_TIMEOUT = 900, 600, 900, 1800


class StepFailed(Exception):
    def __init__(self, reason: str, output_tail: str = ""):
        super().__init__(reason)
        self.output_tail = output_tail


class StepSkipped(Exception):
    pass


@dataclass(frozen=True)
class TrainRun:
    """One `deepspeed --module pipeline.train` run: a shipped profile, its overrides, the GPUs."""

    profile: str
    overrides: tuple[str, ...]
    gpus: int

    def resolve(self, vocab_size: int | None) -> Profile:
        return load_profile(REPO / self.profile, self.gpus, self.overrides, vocab_size)

    def command(self, out: Path, resume: str) -> list[str]:
        cmd = [*DEEPSPEED, "--num_gpus", str(self.gpus), "--master_port", str(free_port()), "--module",
               "pipeline.train", "--profile", self.profile, "--out", str(out), "--resume", resume]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(manifest: Path | None) -> tuple[str, ...]:
    return (f"data.manifest={manifest}",) if manifest else ()


# A few optimizer steps of exactly one micro-batch per GPU, no evaluation, one checkpoint at the end.
SHORT = ("train.grad_accum_steps=1", "train.global_batch_tokens=auto", "train.global_batch_size=auto",
         "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0",
         "train.keep_last=1")
# What makes the 7B shapes fit and run fast on one GPU (profile switches of pipeline/config.py).
FAST_7B = ("train.activation_checkpointing=true", "train.attention_backend=flash", "train.loss_chunk_tokens=4096")


def demo_run(manifest: Path | None, gpus: int, steps: int) -> TrainRun:
    return TrainRun("ds_configs/tiny_cpu.json", (*_data(manifest), "train.precision=bf16", f"train.steps={steps}"),
                    gpus)


def pipeline_run(manifest: Path | None) -> TrainRun:
    return TrainRun("ds_configs/tiny_cpu_pipeline.json", (*_data(manifest), "train.precision=bf16", "train.steps=20"),
                    2)


def layer_run(manifest: Path | None, layers: int, micro_batch: int) -> TrainRun:
    """The shape bench/train_throughput.py --gpu-7b-layers measures, as a profile the planner reads."""
    return TrainRun("ds_configs/7b_zero3.json", (*_data(manifest), f"model.n_layers={layers}", "model.max_seq_len=4096",
                                                  "data.seq_len=4096", f"train.micro_batch_size={micro_batch}",
                                                  "train.steps=10", *SHORT, *FAST_7B), 1)


def memory_run(manifest: Path | None, gpus: int) -> TrainRun:
    return TrainRun("ds_configs/7b_zero3.json", (*_data(manifest), "model.preset=llama-1b", "train.micro_batch_size=4",
                                                  f"train.steps={MEMORY_STEPS}", *SHORT), gpus)


def big_run(manifest: Path | None, gpus: int) -> TrainRun:
    return TrainRun("ds_configs/7b_zero3_offload.json", (*_data(manifest), "model.vocab_size=32000",
                                                          "train.micro_batch_size=1", f"train.steps={BIG_STEPS}",
                                                          *SHORT, *FAST_7B), gpus)


class Check:
    """What every step shares: the output directory, the GPUs, the prepared data, the command runner."""

    def __init__(self, out: Path, gpus: int, gpu_name: str, gpu_bytes: float, manifest: Path | None):
        self.out, self.gpus, self.gpu_name, self.gpu_bytes = out, gpus, gpu_name, gpu_bytes
        self.manifest = manifest
        self.started = time.monotonic()
        self.env = dict(os.environ, DS_ACCELERATOR="cuda", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                        PYTHONWARNINGS="ignore::FutureWarning")

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    @property
    def vocab(self) -> int | None:
        from pipeline.data import Manifest

        return Manifest.load(self.manifest).tokenizer.vocab_size if self.manifest else None

    def sh(self, name: str, cmd: list[str], timeout: int) -> str:
        """Run `cmd` from the repository root; its output goes to OUT/logs/NAME.log and, on success,
        stdout is returned. Its whole process group is killed at the timeout (the deepspeed
        launcher's ranks included, which would otherwise hold the GPU)."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"  {name}: {' '.join(Path(c).name if c == cmd[0] else c for c in cmd)[:200]}")
        tic = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            log.write_text(stdout + stderr)
            raise StepFailed(f"{name}: no result within {timeout} s (log {log})", tail(stdout, stderr)) from None
        except BaseException:  # Ctrl-C reaches this process only, not the command's own session
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.write_text(stdout + stderr)
        self.log(f"  {name}: exit {proc.returncode} after {time.monotonic() - tic:.0f} s")
        if proc.returncode:
            raise StepFailed(f"{name}: exited {proc.returncode} (log {log})", tail(stdout, stderr))
        return stdout

    def prepared(self) -> Path:
        """The token-shard manifest: --manifest, or a slice of the demo corpus prepared once under OUT/prep."""
        if self.manifest:
            return self.manifest
        manifest = self.out / "prep" / "shards" / "manifest.json"
        if not manifest.exists():
            config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
            config["sources"][0]["max_bytes"] = PREP_MAX_BYTES
            config["sources"][0]["paths"] = site_packages()
            config["tokenizer"]["sample_bytes"] = PREP_TOKENIZER_BYTES
            config["shards"]["validation_fraction"] = PREP_VALIDATION
            path = self.out / "prep-config.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=2))
            self.sh("prep", [sys.executable, "-m", "data_prep", "run", "--config", str(path), "--out",
                             str(self.out / "prep")], PREP_TIMEOUT)
        self.manifest = manifest
        return manifest


def site_packages() -> list[str]:
    """Every site-packages directory this interpreter reads. In .venv-gpu most packages, and with
    them most of the demo corpus, sit beside the machine's python, not in the venv's own directory
    (all that data_prep reads by default)."""
    return sorted({p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()})


def tail(stdout: str, stderr: str, chars: int = 3000) -> str:
    return (stdout[-chars // 2:] + ("\n--- stderr ---\n" + stderr[-chars // 2:] if stderr.strip() else "")).strip()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise StepFailed(f"{path}: missing; the trainer logged nothing")
    return [json.loads(line) for line in path.read_text().splitlines()]


def finite_losses(records: list[dict]) -> list[float]:
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise StepFailed(f"training losses not all finite: {losses}")
    return losses


def train_figures(records: list[dict]) -> dict:
    losses = finite_losses(records)
    times = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r]
    out = {"steps": records[-1]["step"], "loss_first": losses[0], "loss_last": losses[-1],
           "tokens_per_s_median": statistics.median(times)}
    mfu = [r["perf/mfu"] for r in records if "perf/mfu" in r]
    if mfu:
        out["mfu_median"] = statistics.median(mfu)
    peak = [r["mem/max_allocated_gb"] for r in records if "mem/max_allocated_gb" in r]
    if peak:
        out["peak_gpu_memory_gib"] = max(peak)
    return out


def expect_checkpoint(run_dir: Path, steps: int) -> None:
    latest = run_dir / "checkpoints" / "latest"
    have = latest.read_text().strip() if latest.exists() else "none"
    if have != f"global_step{steps}":
        raise StepFailed(f"{latest}: names {have}, expected global_step{steps}")


def export_and_generate(check: Check, name: str, run_dir: Path, hf_dir: Path, dtype: str, new_tokens: int) -> dict:
    """Export with --verify (logits of our model against the exported one), then load the
    export with transformers alone in a new process and generate."""
    shutil.rmtree(hf_dir, ignore_errors=True)
    said = check.sh(f"{name}-export", [sys.executable, "-m", "pipeline.export", "--checkpoint", str(run_dir),
                                       "--out", str(hf_dir), "--dtype", dtype, "--verify"], BIG_TIMEOUT)
    found = re.search(r"largest logit difference (\S+) \(tolerance (\S+)\)", said)
    text = check.sh(f"{name}-generate", [sys.executable, "-m", "pipeline.generate", str(hf_dir), "--prompt",
                                         "Permission is hereby granted", "--max-new-tokens", str(new_tokens)],
                    BIG_TIMEOUT)
    return {"dtype": dtype, "max_logit_diff": float(found[1]) if found else None,
            "tolerance": float(found[2]) if found else None, "generated": text.strip()[-300:]}


def step_demo(check: Check, figures: dict) -> None:
    manifest = check.prepared()
    splits = json.loads(manifest.read_text())["splits"]
    figures["data"] = {"manifest": str(manifest), "train_tokens": splits["train"]["tokens"]}
    run_dir = check.out / "a" / "train"
    shutil.rmtree(run_dir.parent, ignore_errors=True)  # resume is checked against this run's own checkpoint
    check.sh("a-train", demo_run(manifest, check.gpus, DEMO_STEPS).command(run_dir, "none"), SMALL_TIMEOUT)
    expect_checkpoint(run_dir, DEMO_STEPS)
    figures["train"] = {"gpus": check.gpus, **train_figures(read_metrics(run_dir))}
    said = check.sh("a-resume", demo_run(manifest, check.gpus, 2 * DEMO_STEPS).command(run_dir, "auto"), SMALL_TIMEOUT)
    resumed = re.search(r"resumed from \S+ at step (\d+)", said)
    if not resumed or int(resumed[1]) != DEMO_STEPS:
        raise StepFailed(f"a-resume: expected 'resumed from ... at step {DEMO_STEPS}' in its output", said[-1500:])
    expect_checkpoint(run_dir, 2 * DEMO_STEPS)
    figures["resume"] = {"from_step": int(resumed[1]), **train_figures(read_metrics(run_dir)[DEMO_STEPS:])}
    figures["export"] = export_and_generate(check, "a", run_dir, check.out / "a" / "hf", "fp32", 30)
    if check.gpus < 2:
        figures["pipeline_engine"] = "skipped: needs 2 GPUs"
        return
    pipe_dir = check.out / "a" / "pipeline"
    check.sh("a-pipeline", pipeline_run(manifest).command(pipe_dir, "none"), SMALL_TIMEOUT)
    figures["pipeline_engine"] = {"gpus": 2, **train_figures(read_metrics(pipe_dir))}


def fits(profile: Profile, gpus: int, gpu_bytes: float) -> bool:
    return memory(profile, 1, gpus).total <= gpu_bytes * (1 - HEADROOM)


def layer_shape(check: Check) -> tuple[int, int]:
    """The most layers, then the largest micro-batch, that the planner fits on one GPU."""
    for layers in LAYER_COUNTS:
        for mb in MICRO_BATCHES:
            if fits(layer_run(None, layers, mb).resolve(None), 1, check.gpu_bytes):
                return layers, mb
    return 1, 1


def bench_figures(result: dict) -> dict:
    """bench/train_throughput.py's JSON, with ours' tokens/s as a ratio to each peer's."""
    rows = {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in result["results"]}
    ours = rows.get("ours", {}).get("tokens_per_s")
    ratios = {f"ours/{name}": ours / r["tokens_per_s"] for name, r in rows.items()
              if name != "ours" and ours and r.get("tokens_per_s")}
    figures = {"device": result["device"], "shape": result["shape"], "sdpa_backend": result.get("sdpa_backend"),
               "results": rows, "tokens_per_s_ratio": ratios}
    mfu = rows.get("ours", {}).get("mfu")
    if "H100" in result["device"] and mfu is not None:
        figures["ours_mfu_reaches_h100_target"] = mfu >= H100_MFU_TARGET  # a benchmark figure, not a verdict
    return figures


def step_layers(check: Check, figures: dict) -> None:
    layers, mb = layer_shape(check)
    figures["planned"] = {"layers": layers, "micro_batch": mb}
    while True:
        out = check.out / "b" / f"bench-{layers}-layers.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            check.sh(f"b-bench-{layers}-layers", [sys.executable, "bench/train_throughput.py", "--gpu-7b-layers",
                                                   str(layers), "--micro-batch", str(mb), "--json", str(out)],
                     BENCH_TIMEOUT)
            break
        except StepFailed as e:
            # The planner leaves headroom, but the peers hold their own copies; fewer layers then.
            if layers == 1 or "out of memory" not in e.output_tail.lower():
                raise
            figures.setdefault("out_of_memory_with_layers", []).append(layers)
            layers //= 2
    figures.update(bench_figures(json.loads(out.read_text())))


def step_memory(check: Check, figures: dict) -> None:
    run = memory_run(check.prepared(), check.gpus)
    mem = memory(run.resolve(check.vocab), 1, check.gpus)
    # max_allocated counts torch's allocations only: the planner's CUDA/NCCL reserve is left out of the comparison.
    predicted = mem.model_states + mem.activations
    figures["planned"] = {"model_states_gib": mem.model_states / GiB, "activations_gib": mem.activations / GiB,
                          "predicted_gib": predicted / GiB,
                          "deepspeed_estimate_gib": mem.deepspeed_estimate / GiB if mem.deepspeed_estimate else None,
                          "with_runtime_reserve_gib": mem.total / GiB}
    run_dir = check.out / "c" / "train"
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    check.sh("c-train", run.command(run_dir, "none"), BIG_TIMEOUT)
    figures["train"] = {"gpus": check.gpus, **train_figures(read_metrics(run_dir))}
    measured = figures["train"].get("peak_gpu_memory_gib")
    if measured is None:
        raise StepFailed("metrics.jsonl has no mem/max_allocated_gb: the trainer did not run on CUDA")
    ratio = measured * GiB / predicted
    figures["measured_over_predicted"] = ratio
    figures["within_10_percent"] = abs(ratio - 1) <= MEMORY_TOLERANCE
    # The checkpoint (~15 GB) serves nothing after the measurement, and step d needs the disk.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def examine(check: Check, run: TrainRun, out_dir: Path) -> tuple[list[str], list[str]]:
    """(profile problems, resource shortages) of `run`: the profile must resolve and pass the
    preflight; the planner's GPU and host memory and the preflight's checkpoint disk space
    describe this machine instead."""
    try:
        profile = run.resolve(check.vocab)
    except ProfileError as e:
        return [str(e)], []
    lines = run_preflight(profile, check.manifest, out_dir, run.gpus)
    problems = [line for line in lines if not line.startswith("checkpoints:")]
    shortages = [line for line in lines if line.startswith("checkpoints:")]
    mem = memory(profile, 1, run.gpus)
    usable = check.gpu_bytes * (1 - HEADROOM)
    if mem.total > usable:
        shortages.append(f"GPU memory: the planner needs {mem.total / GiB:.1f} GiB per GPU, a {check.gpu_name} "
                         f"offers {usable / GiB:.1f} GiB usable")
    host = psutil.virtual_memory().available
    if mem.host_per_node > host:
        shortages.append(f"host memory: the offloaded optimizer states need {mem.host_per_node / GiB:.0f} GiB, "
                         f"{host / GiB:.0f} GiB available")
    return problems, shortages


def step_big(check: Check, figures: dict) -> None:
    run = big_run(check.prepared(), check.gpus)
    run_dir = check.out / "d" / "train"
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    problems, shortages = examine(check, run, run_dir)
    if problems:
        raise StepFailed("; ".join(problems))
    mem = memory(run.resolve(check.vocab), 1, check.gpus)
    figures["planned"] = {"gpu_gib": mem.total / GiB, "host_gib": mem.host_per_node / GiB}
    if shortages:
        raise StepSkipped("; ".join(shortages))
    check.sh("d-train", run.command(run_dir, "none"), BIG_TIMEOUT)
    expect_checkpoint(run_dir, BIG_STEPS)
    figures["train"] = {"gpus": check.gpus, **train_figures(read_metrics(run_dir))}
    figures["export"] = export_and_generate(check, "d", run_dir, check.out / "d" / "hf", "bf16", 8)
    # ~94 GB of optimizer states of a 3-step model: the export above is what is worth keeping.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


STEPS = {"a": step_demo, "b": step_layers, "c": step_memory, "d": step_big}


def runs_of(step: str, check: Check) -> dict[str, TrainRun]:
    """Every training run a step makes, by name (what --dry-run examines)."""
    manifest, gpus = check.prepared(), check.gpus
    if step == "a":
        runs = {"train": demo_run(manifest, gpus, DEMO_STEPS), "resume": demo_run(manifest, gpus, 2 * DEMO_STEPS)}
        return {**runs, "pipeline": pipeline_run(manifest)} if gpus >= 2 else runs
    if step == "b":
        return {"layers": layer_run(manifest, *layer_shape(check))}
    return {"train": (memory_run if step == "c" else big_run)(manifest, gpus)}


def dry_step(check: Check, step: str, figures: dict) -> None:
    problems = []
    for name, run in runs_of(step, check).items():
        wrong, shortages = examine(check, run, check.out / "dry-run" / step / name)
        figures[name] = {"profile": run.profile, "gpus": run.gpus, "overrides": " ".join(run.overrides)}
        if not wrong:
            mem = memory(run.resolve(check.vocab), 1, run.gpus)
            figures[name].update(planned_gpu_gib=mem.total / GiB, planned_host_gib=mem.host_per_node / GiB)
        figures[name]["preflight"] = "; ".join(wrong) or "ok"
        figures[name]["would_skip"] = "; ".join(shortages) or "no"
        problems += wrong
    shutil.rmtree(check.out / "dry-run", ignore_errors=True)  # the preflight's write test leaves empty directories
    if step == "a" and check.gpus < 2:
        figures["pipeline"] = "skipped: needs 2 GPUs"
    if problems:
        raise StepFailed("; ".join(problems))


def run_step(check: Check, step: str, dry_run: bool) -> StepResult:
    check.log(f"step {step}: {TITLES[step]}")
    figures: dict = {}
    tic = time.monotonic()
    status, reason, output = "pass", "", ""
    try:
        dry_step(check, step, figures) if dry_run else STEPS[step](check, figures)
    except StepSkipped as e:
        status, reason = "skipped", str(e)
    except StepFailed as e:
        status, reason, output = "fail", str(e), e.output_tail
    except Exception as e:  # noqa: BLE001 - a broken step is reported like a failed one; the next still runs
        status, reason, output = "fail", f"{type(e).__name__}: {e}", traceback.format_exc()[-3000:]
    result = StepResult(step, TITLES[step], status, time.monotonic() - tic, figures, reason, output)
    check.log(f"step {step}: {status}" + (f" ({reason})" if reason else "") + f" after {result.seconds:.0f} s")
    return result


PROBE = """import json, torch
n = torch.cuda.device_count()
p = torch.cuda.get_device_properties(0) if n else None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": n,
                  "gpu": p.name if p else None, "gpu_memory_bytes": p.total_memory if p else 0,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if n else None}))"""


def probe_torch() -> dict:
    """torch's view of the GPUs, from a child process: this one must hold no CUDA context (its
    memory would be missing from the measured runs)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: {sys.executable} cannot import torch ({last})")
    return json.loads(proc.stdout)


def package_versions() -> dict:
    """Each requirements.txt package: the version this interpreter uses and the pinned one."""
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name, pinned = line.split("==")
        try:
            used = metadata.version(name)
        except metadata.PackageNotFoundError:
            used = None
        out[name] = {"used": used, "pinned": pinned.strip()}
    return out


def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"expected letters from {','.join(STEPS)} separated by commas (got {text!r})")
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="report, logs and run directories (default runs/gpu-check)")
    p.add_argument("--steps", type=parse_steps, default=list(STEPS), help="which steps, e.g. a,c (default a,b,c,d)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: check every step's profile with the planner and the preflight, run nothing")
    p.add_argument("--manifest", type=Path, help="use this prepared token-shard manifest instead of preparing a "
                   "slice of the demo corpus under OUT/prep")
    p.add_argument("--gpus", type=int, help="GPUs to use (default: every GPU torch sees; 1 with --dry-run)")
    p.add_argument("--plan-gpu", default="h100-80gb", choices=sorted(GPU_MEMORY),
                   help="with --dry-run: the GPU kind to plan for (default h100-80gb)")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        p.error(f"--gpus: must be at least 1 (got {args.gpus})")
    if args.manifest and not args.manifest.is_file():
        p.error(f"--manifest: no such file (got {args.manifest})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    found = probe_torch()
    if args.dry_run:
        gpus, gpu_name, gpu_bytes = args.gpus or 1, args.plan_gpu, GPU_MEMORY[args.plan_gpu]
    elif not found["gpus"]:
        print(f"error: torch {found['torch']} (CUDA {found['cuda']}) sees no GPU; on a machine without one use "
              "--dry-run", file=sys.stderr)
        return 2
    else:
        gpus = min(args.gpus or found["gpus"], found["gpus"])
        gpu_name, gpu_bytes = found["gpu"], found["gpu_memory_bytes"]
    out = Path(args.out)
    check = Check(out, gpus, gpu_name, gpu_bytes, args.manifest.resolve() if args.manifest else None)
    environment = {"python": sys.version.split()[0], "torch": found["torch"], "cuda": found["cuda"],
                   "nccl": found["nccl"], "gpus_seen": found["gpus"], "gpu": found["gpu"],
                   "gpu_memory_gib": found["gpu_memory_bytes"] / GiB, "gpus_used": gpus}
    if args.dry_run:
        environment["planned_for"] = f"{gpus} × {gpu_name} ({gpu_bytes / GiB:.0f} GiB)"
    environment["packages"] = package_versions()
    check.log(f"{'dry run' if args.dry_run else 'GPU check'}: steps {','.join(args.steps)} on {gpus} × {gpu_name} "
              f"→ {out}")
    results = []
    for step in args.steps:
        results.append(run_step(check, step, args.dry_run))
        write_report(out, results, environment, args.dry_run)  # a report after every step, should the next hang
    check.log(f"report: {out / 'report.md'}, {out / 'report.json'}")
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
