"""The GPU check's steps: the runs each makes, what it costs, what it reads back, what it proves.

Every step reads the one prepared data set (the bundle's, or --manifest): no step prepares data.
Steps b and c measure and end without a final checkpoint (`train.final_checkpoint=false`);
a saves, resumes from its own checkpoint and exports; d saves once and exports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from launch.gpu_plan import PYTHON_START_S, Cost, offload_cost, train_cost
from launch.gpu_procs import Processes, TimedOut
from pipeline.config import Profile, ProfileError, load_profile
from pipeline.plan import HEADROOM, GiB, memory
from pipeline.preflight import run_preflight

REPO = Path(__file__).resolve().parents[1]
# The `deepspeed` launcher (its console script calls this main), run by this interpreter: in the
# GPU venv the script may sit beside the machine's own packages, off PATH.
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_addr", "127.0.0.1"]
DEMO_STEPS = 30  # the resumed run goes on to twice as many
MEMORY_STEPS, BIG_STEPS = 5, 3
BENCH_STEPS = 15  # 3 untimed, 12 timed, each of ours, the bare DeepSpeed loop and plain PyTorch
LAYER_COUNTS, MICRO_BATCHES = (8, 4, 2, 1), (4, 2, 1)
LOSS_CHUNK_TOKENS = 4096  # the 7B shapes' chunked loss: the fp32 logits of 4 × 4096 tokens never exist whole
MEMORY_TOLERANCE = 0.10  # step c's target: measured peak within 10 % of the plan
H100_MFU_TARGET = 0.50  # step b's target for ours on an H100
MASKING_STEPS = 10
# Step e: FlexAttention's output and gradients in bf16 against a float32 reference, as
# ‖ours − ref‖ / ‖ref‖; bf16 operands land between 1e-3 and 1e-2 (2e-3 to 3e-3 on the CPU's shapes).
MASKING_TOLERANCE = 2e-2
FLEX_COMPILE_S = 40.0  # torch.compile of FlexAttention's forward and backward kernels (a guess; the report corrects it)


class StepFailed(Exception):
    def __init__(self, reason: str, output_tail: str = ""):
        super().__init__(reason)
        self.output_tail = output_tail


def bench_module(name: str):
    """bench/NAME.py as a module (bench/ is a folder of scripts): step b plans from the same
    profile overrides the benchmark runs with."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


THROUGHPUT = bench_module("train_throughput")


@dataclass(frozen=True)
class GPU:
    name: str  # as torch names it, or the --plan-gpu kind in a dry run
    memory_bytes: float
    peak_flops: float


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


# A few optimizer steps of exactly one micro-batch per GPU, no evaluation, no periodic checkpoint.
SHORT = ("train.grad_accum_steps=1", "train.global_batch_tokens=auto", "train.global_batch_size=auto",
         "train.warmup_steps=1", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0",
         "train.keep_last=1")
# A run that measures ends without a final checkpoint: at 1B that is 15 GB of disk and time for nothing.
MEASURE_ONLY = ("train.final_checkpoint=false",)
# What makes the 7B shapes fit and run fast on one GPU (profile switches of pipeline/config.py).
FAST_7B = ("train.activation_checkpointing=true", "train.attention_backend=flash",
           f"train.loss_chunk_tokens={LOSS_CHUNK_TOKENS}")


def demo_run(manifest: Path, gpus: int, steps: int) -> TrainRun:
    return TrainRun("ds_configs/tiny_cpu.json", (f"data.manifest={manifest}", "train.precision=bf16",
                                                  f"train.steps={steps}"), gpus)


def pipeline_run(manifest: Path) -> TrainRun:
    return TrainRun("ds_configs/tiny_cpu_pipeline.json", (f"data.manifest={manifest}", "train.precision=bf16",
                                                           "train.steps=20"), 2)


def layer_run(manifest: Path, layers: int, micro_batch: int) -> TrainRun:
    """Our run of bench/train_throughput.py --gpu-7b-layers, with the benchmark's own overrides."""
    overrides = THROUGHPUT.run_overrides(BENCH_STEPS, THROUGHPUT.gpu_overrides(layers, micro_batch, True, [],
                                                                               LOSS_CHUNK_TOKENS))
    return TrainRun(THROUGHPUT.GPU_PROFILE, (f"data.manifest={manifest}", *overrides), 1)


def memory_run(manifest: Path, gpus: int) -> TrainRun:
    return TrainRun("ds_configs/7b_zero3.json", (f"data.manifest={manifest}", "model.preset=llama-1b",
                                                  "train.micro_batch_size=4", f"train.steps={MEMORY_STEPS}", *SHORT,
                                                  *MEASURE_ONLY),
                    gpus)


def big_run(manifest: Path, gpus: int) -> TrainRun:
    # d keeps its one checkpoint: what it proves is that a 7B checkpoint is written and exported.
    return TrainRun("ds_configs/7b_zero3_offload.json", (f"data.manifest={manifest}", "model.vocab_size=32000",
                                                          "train.micro_batch_size=1", f"train.steps={BIG_STEPS}",
                                                          *SHORT, *FAST_7B), gpus)


class Check:
    """What every step shares: the work directory, the GPUs, the data, the commands and their limit."""

    def __init__(self, out: Path, gpus: int, gpu: GPU, manifest: Path, processes: Processes, env: dict,
                 started: float | None = None):
        self.out, self.gpus, self.gpu, self.manifest = out, gpus, gpu, manifest
        self.processes, self.env = processes, env
        self.started = time.monotonic() if started is None else started
        self.step = ""
        self.deadline = math.inf  # monotonic time at which the current step's limit runs out

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    @property
    def vocab(self) -> int:
        from pipeline.data import Manifest

        return Manifest.load(self.manifest).tokenizer.vocab_size

    def sh(self, name: str, cmd: list[str]) -> str:
        """Run `cmd` from the repository root within the step's limit; its stdout on success.
        Output goes to OUT/logs/NAME.out and .err."""
        shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
        self.log(f"  {name}: {shown[:200]}")
        try:
            done = self.processes.run(name, cmd, self.out / "logs", self.env, self.deadline - time.monotonic(),
                                      cwd=REPO, step=self.step)
        except TimedOut as e:
            raise StepFailed(str(e), e.output_tail) from None
        self.log(f"  {name}: exit {done.returncode} after {done.seconds:.0f} s")
        if done.returncode:
            raise StepFailed(f"{name}: exited {done.returncode} (log {self.out / 'logs' / name}.out, .err)",
                             done.tail())
        return done.stdout


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise StepFailed(f"{path}: missing; the trainer logged nothing")
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_figures(records: list[dict]) -> dict:
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise StepFailed(f"training losses not all finite: {losses}")
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
                                       "--out", str(hf_dir), "--dtype", dtype, "--verify"])
    found = re.search(r"largest logit difference (\S+) \(tolerance (\S+)\)", said)
    text = check.sh(f"{name}-generate", [sys.executable, "-m", "pipeline.generate", str(hf_dir), "--prompt",
                                         "Permission is hereby granted", "--max-new-tokens", str(new_tokens)])
    return {"dtype": dtype, "max_logit_diff": float(found[1]) if found else None,
            "tolerance": float(found[2]) if found else None, "generated": text.strip()[-300:]}


# --- a: the demo path on the GPU

def runs_a(check: Check) -> dict[str, TrainRun]:
    runs = {"train": demo_run(check.manifest, check.gpus, DEMO_STEPS),
            "resume": demo_run(check.manifest, check.gpus, 2 * DEMO_STEPS)}
    return {**runs, "pipeline": pipeline_run(check.manifest)} if check.gpus >= 2 else runs


def costs_a(check: Check) -> list[Cost]:
    peak, runs = check.gpu.peak_flops, runs_a(check)
    tiny = runs["train"].resolve(check.vocab)
    costs = [train_cost("a-train", tiny, DEMO_STEPS, check.gpus, peak, saves=1),
             train_cost("a-resume", tiny, DEMO_STEPS, check.gpus, peak, saves=1, loads=1),
             Cost("a-export", PYTHON_START_S + 5), Cost("a-generate", PYTHON_START_S + 5)]
    if "pipeline" in runs:
        costs.append(train_cost("a-pipeline", runs["pipeline"].resolve(check.vocab), 20, 2, peak))
    return costs


def step_a(check: Check, figures: dict) -> None:
    splits = json.loads(check.manifest.read_text())["splits"]
    figures["data"] = {"manifest": str(check.manifest), "train_tokens": splits["train"]["tokens"]}
    runs = runs_a(check)
    run_dir = check.out / "a" / "train"
    shutil.rmtree(run_dir.parent, ignore_errors=True)  # resume is checked against this run's own checkpoint
    check.sh("a-train", runs["train"].command(run_dir, "none"))
    expect_checkpoint(run_dir, DEMO_STEPS)
    figures["train"] = {"gpus": check.gpus, **train_figures(read_metrics(run_dir))}
    said = check.sh("a-resume", runs["resume"].command(run_dir, "auto"))
    resumed = re.search(r"resumed from \S+ at step (\d+)", said)
    if not resumed or int(resumed[1]) != DEMO_STEPS:
        raise StepFailed(f"a-resume: expected 'resumed from ... at step {DEMO_STEPS}' in its output", said[-1500:])
    expect_checkpoint(run_dir, 2 * DEMO_STEPS)
    figures["resume"] = {"from_step": int(resumed[1]), **train_figures(read_metrics(run_dir)[DEMO_STEPS:])}
    figures["export"] = export_and_generate(check, "a", run_dir, check.out / "a" / "hf", "fp32", 30)
    if "pipeline" not in runs:
        figures["pipeline_engine"] = "skipped: needs 2 GPUs"
        return
    pipe_dir = check.out / "a" / "pipeline"
    check.sh("a-pipeline", runs["pipeline"].command(pipe_dir, "none"))
    figures["pipeline_engine"] = {"gpus": 2, **train_figures(read_metrics(pipe_dir))}


# --- b: the LLaMA-7B layer shape, three ways

def fits(profile: Profile, gpus: int, gpu_bytes: float) -> bool:
    return memory(profile, 1, gpus).total <= gpu_bytes * (1 - HEADROOM)


def layer_shape(check: Check) -> tuple[int, int]:
    """The most layers, then the largest micro-batch, that the planner fits on one GPU."""
    for layers in LAYER_COUNTS:
        for mb in MICRO_BATCHES:
            if fits(layer_run(check.manifest, layers, mb).resolve(check.vocab), 1, check.gpu.memory_bytes):
                return layers, mb
    return 1, 1


def runs_b(check: Check) -> dict[str, TrainRun]:
    return {"layers": layer_run(check.manifest, *layer_shape(check))}


def costs_b(check: Check) -> list[Cost]:
    profile, peak = runs_b(check)["layers"].resolve(check.vocab), check.gpu.peak_flops
    return [Cost("b-bench", PYTHON_START_S),
            train_cost("ours", profile, BENCH_STEPS, 1, peak),
            train_cost("bare_deepspeed", profile, BENCH_STEPS, 1, peak),
            train_cost("plain_pytorch", profile, BENCH_STEPS + 1, 1, peak, launcher=False)]  # +1: the profiled step


def bench_command(check: Check, layers: int, micro_batch: int, *extra: str) -> list[str]:
    return [sys.executable, "bench/train_throughput.py", "--gpu-7b-layers", str(layers), "--micro-batch",
            str(micro_batch), "--manifest", str(check.manifest), "--steps", str(BENCH_STEPS),
            "--loss-chunk-tokens", str(LOSS_CHUNK_TOKENS), *extra]


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


def step_b(check: Check, figures: dict) -> None:
    layers, mb = layer_shape(check)
    figures["planned"] = {"layers": layers, "micro_batch": mb, "loss_chunk_tokens": LOSS_CHUNK_TOKENS}
    while True:
        out = check.out / "b" / f"bench-{layers}-layers.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            check.sh(f"b-bench-{layers}-layers", bench_command(check, layers, mb, "--json", str(out), "--work",
                                                               str(out.parent)))
            break
        except StepFailed as e:
            # The planner leaves headroom, but the peers hold their own copies; fewer layers then.
            if layers == 1 or "out of memory" not in e.output_tail.lower():
                raise
            figures.setdefault("out_of_memory_with_layers", []).append(layers)
            layers //= 2
    figures.update(bench_figures(json.loads(out.read_text())))


def dry_b(check: Check, figures: dict) -> None:
    """The benchmark's own --dry-run, as a command of the step: it resolves the profile it would
    run, which must be the one planned (the loss settings the planned memory assumes above all)."""
    layers, mb = layer_shape(check)
    said = check.sh("b-bench-dry-run", bench_command(check, layers, mb, "--dry-run"))
    resolved = next((line.strip() for line in said.splitlines() if line.strip().startswith("resolved:")), "")
    figures["bench_resolved"] = resolved
    if f"loss chunk {LOSS_CHUNK_TOKENS}," not in resolved or f"{layers} layers" not in resolved:
        raise StepFailed(f"bench/train_throughput.py would run another profile than the planned one "
                         f"({layers} layers, loss chunk {LOSS_CHUNK_TOKENS}): {resolved or 'no resolved: line'}",
                         said[-1500:])


# --- c: llama-1b memory against the plan

def runs_c(check: Check) -> dict[str, TrainRun]:
    return {"train": memory_run(check.manifest, check.gpus)}


def costs_c(check: Check) -> list[Cost]:
    return [train_cost("c-train", runs_c(check)["train"].resolve(check.vocab), MEMORY_STEPS, check.gpus,
                       check.gpu.peak_flops)]


def step_c(check: Check, figures: dict) -> None:
    run = runs_c(check)["train"]
    mem = memory(run.resolve(check.vocab), 1, check.gpus)
    # max_allocated counts torch's allocations only: the planner's CUDA/NCCL reserve is left out of the comparison.
    predicted = mem.model_states + mem.activations
    figures["planned"] = {"model_states_gib": mem.model_states / GiB, "activations_gib": mem.activations / GiB,
                          "predicted_gib": predicted / GiB,
                          "deepspeed_estimate_gib": mem.deepspeed_estimate / GiB if mem.deepspeed_estimate else None,
                          "with_runtime_reserve_gib": mem.total / GiB}
    run_dir = check.out / "c" / "train"
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    check.sh("c-train", run.command(run_dir, "none"))
    figures["train"] = {"gpus": check.gpus, **train_figures(read_metrics(run_dir))}
    measured = figures["train"].get("peak_gpu_memory_gib")
    if measured is None:
        raise StepFailed("metrics.jsonl has no mem/max_allocated_gb: the trainer did not run on CUDA")
    ratio = measured * GiB / predicted
    figures["measured_over_predicted"] = ratio
    figures["within_10_percent"] = abs(ratio - 1) <= MEMORY_TOLERANCE


# --- d: llama-7b with the optimizer in host memory

def runs_d(check: Check) -> dict[str, TrainRun]:
    return {"train": big_run(check.manifest, check.gpus)}


def costs_d(check: Check) -> list[Cost]:
    profile, peak = runs_d(check)["train"].resolve(check.vocab), check.gpu.peak_flops
    weights_s = profile.model.num_params() * 2 / 1e9  # bf16 weights written and read back, ~1 GB/s
    train = train_cost("d-train", profile, BIG_STEPS, check.gpus, peak, saves=1)
    return [Cost("d-train", train.seconds + offload_cost(profile, BIG_STEPS)),
            Cost("d-export", PYTHON_START_S + 4 * weights_s), Cost("d-generate", PYTHON_START_S + weights_s)]


def step_d(check: Check, figures: dict) -> None:
    run = runs_d(check)["train"]
    mem = memory(run.resolve(check.vocab), 1, check.gpus)
    figures["planned"] = {"gpu_gib": mem.total / GiB, "host_gib": mem.host_per_node / GiB}
    run_dir = check.out / "d" / "train"
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    check.sh("d-train", run.command(run_dir, "none"))
    expect_checkpoint(run_dir, BIG_STEPS)
    figures["train"] = {"gpus": check.gpus, **train_figures(read_metrics(run_dir))}
    figures["export"] = export_and_generate(check, "d", run_dir, check.out / "d" / "hf", "bf16", 8)
    # ~94 GB of optimizer states of a 3-step model: the export above is what is worth keeping.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


# --- e: document masking's kernel against causal SDPA, and a run that trains with it

def masking_run(manifest: Path) -> TrainRun:
    """The tiny model in bf16 with attention kept inside each document (FlexAttention's block
    mask on CUDA) and positions restarted at each document, in windows long enough to hold several."""
    return TrainRun("ds_configs/tiny_cpu.json", (f"data.manifest={manifest}", "train.precision=bf16",
                                                  f"train.steps={MASKING_STEPS}", "data.seq_len=1024",
                                                  "model.max_seq_len=1024", "train.document_masking=true",
                                                  "train.reset_positions=true", "train.log_every=1",
                                                  "train.eval_every=0", "train.checkpoint_every=0", *MEASURE_ONLY),
                    1)


def runs_e(check: Check) -> dict[str, TrainRun]:
    return {"train": masking_run(check.manifest)}


def costs_e(check: Check) -> list[Cost]:
    tiny = runs_e(check)["train"].resolve(check.vocab)
    train = train_cost("e-train", tiny, MASKING_STEPS, 1, check.gpu.peak_flops)
    return [Cost("e-bench", PYTHON_START_S + FLEX_COMPILE_S), Cost("e-train", train.seconds + FLEX_COMPILE_S)]


def masking_figures(check: Check, name: str, *args: str) -> dict:
    """bench/document_masking.py's figures; its output and gradients must agree with the float32 reference."""
    out = check.out / "e" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    check.sh(name, [sys.executable, "bench/document_masking.py", *args, "--json", str(out)])
    return agreeing(name, json.loads(out.read_text()))


def agreeing(name: str, figures: dict) -> dict:
    for key, what in (("rel_error_out", "output"), ("rel_error_grads", "gradients")):
        if not figures[key] <= MASKING_TOLERANCE:  # NaN fails too
            raise StepFailed(f"{name}: FlexAttention's block mask gives {what} {figures[key]:.3g} away (relative) "
                             f"from the float32 reference with the dense mask (tolerance {MASKING_TOLERANCE})")
    return figures


def step_e(check: Check, figures: dict) -> None:
    figures["kernel"] = masking_figures(check, "e-bench")
    run_dir = check.out / "e" / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    check.sh("e-train", runs_e(check)["train"].command(run_dir, "none"))
    figures["train"] = train_figures(read_metrics(run_dir))


def dry_e(check: Check, figures: dict) -> None:
    """The benchmark itself on the CPU, on small shapes (ours is the CPU path there, SDPA with
    the dense mask: FlexAttention has no backward on the CPU): the script, its figures and the
    agreement check run as they will on the GPU."""
    figures["kernel_on_cpu"] = masking_figures(check, "e-bench-cpu", "--device", "cpu", "--seq", "256", "--heads",
                                               "4", "--head-dim", "32", "--mean-doc-tokens", "64", "--iters", "2")


# --- what the plan and the dry run read of every step

def examine(check: Check, run: TrainRun, out_dir: Path) -> tuple[list[str], list[str]]:
    """(profile problems, machine shortages) of `run`: the profile must resolve and pass the
    preflight; the planner's GPU and host memory and the preflight's checkpoint disk space
    describe this machine (or, in a dry run, the planned GPU)."""
    try:
        profile = run.resolve(check.vocab)
    except ProfileError as e:
        return [str(e)], []
    lines = run_preflight(profile, check.manifest, out_dir, run.gpus)
    problems = [line for line in lines if not line.startswith("checkpoints:")]
    shortages = [line for line in lines if line.startswith("checkpoints:")]
    if run.gpus > check.gpus:
        shortages.append(f"needs {run.gpus} GPUs, {check.gpus} here")
    mem = memory(profile, 1, run.gpus)
    usable = check.gpu.memory_bytes * (1 - HEADROOM)
    if mem.total > usable:
        shortages.append(f"GPU memory: the planner needs {mem.total / GiB:.1f} GiB per GPU, a {check.gpu.name} "
                         f"offers {usable / GiB:.1f} GiB usable")
    host = psutil.virtual_memory().available
    if mem.host_per_node > host:
        shortages.append(f"host memory: the offloaded optimizer states need {mem.host_per_node / GiB:.0f} GiB, "
                         f"{host / GiB:.0f} GiB available")
    return problems, shortages


def run_figures(check: Check, run: TrainRun) -> dict:
    mem = memory(run.resolve(check.vocab), 1, run.gpus)
    return {"profile": run.profile, "gpus": run.gpus, "overrides": " ".join(run.overrides),
            "planned_gpu_gib": mem.total / GiB, "planned_host_gib": mem.host_per_node / GiB}


@dataclass(frozen=True)
class Step:
    letter: str
    title: str
    measures: str  # what a report says the step would have measured, had it run
    runs: Callable[[Check], dict[str, TrainRun]]
    costs: Callable[[Check], list[Cost]]
    body: Callable[[Check, dict], None]
    dry: Callable[[Check, dict], None] | None = None  # commands a dry run makes too


STEPS = {
    "a": Step("a", "demo path on the GPU",
              "ZeRO-3 bf16 training over NCCL → checkpoint → resume at the saved step → export --verify → "
              "generate with transformers (and the pipeline engine on 2 GPUs): losses, tokens/s, logit difference",
              runs_a, costs_a, step_a),
    "b": Step("b", "LLaMA-7B layer shape throughput",
              "tokens/s, TFLOP/s, MFU and peak memory of ours, the bare DeepSpeed loop and plain PyTorch on the "
              "LLaMA-7B layer shape (dim 4096, FFN 11008, 32 heads, seq 4096, bf16), the SDPA kernel that ran",
              runs_b, costs_b, step_b, dry_b),
    "c": Step("c", "llama-1b memory against the plan",
              "ZeRO-3 bf16 over NCCL with the flash kernel on llama-1b: finite losses, tokens/s, and the peak GPU "
              "memory measured against pipeline.plan's prediction (target within 10 %)",
              runs_c, costs_c, step_c),
    "e": Step("e", "document masking on the GPU",
              "FlexAttention with a block mask against causal SDPA at the LLaMA-7B attention shape (32 heads × 128, "
              "seq 4096, bf16, forward + backward): ms per call, ratio, relative error against a float32 reference; "
              "and the tiny model trained 10 steps with train.document_masking and train.reset_positions: finite losses",
              runs_e, costs_e, step_e, dry_e),
    "d": Step("d", "llama-7b with optimizer offload",
              "llama-7b with its optimizer states in host memory: finite losses, step time, peak memory, a 7B "
              "checkpoint exported in bf16 and loaded by transformers",
              runs_d, costs_d, step_d),
}
