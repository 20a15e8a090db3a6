"""Prove the GPU path and measure it, within a time budget, on a machine with NVIDIA GPUs.

    bash launch/gpu_check.sh --bundle gpu-bundle --budget-s 480 --results "$OUT"   # on the GPU machine
    python launch/gpu_check.py --bundle gpu-bundle --dry-run                       # the plan, anywhere

Steps, run in this order (what each proves per second of GPU time first; launch/gpu_plan.py):
  c  llama-1b, ZeRO-3 bf16 over NCCL, flash attention, a few steps: peak GPU memory measured
     beside pipeline.plan's prediction
  a  the demo path on the GPU: ZeRO-3 bf16 training through the deepspeed launcher → checkpoint
     → resume → export --verify → generate with transformers; the pipeline engine (2 stages,
     bf16) when there are 2 GPUs or more
  b  the LLaMA-7B layer shape (dim 4096, FFN 11008, 32 heads, seq 4096, bf16) through
     bench/train_throughput.py: tokens/s, TFLOP/s and MFU of ours, a bare DeepSpeed loop and
     plain PyTorch
  e  document masking: bench/document_masking.py (FlexAttention's block mask against causal SDPA
     at the 7B attention shape), then the tiny model trained with train.document_masking
  d  llama-7b, ZeRO-3 with the optimizer states in host memory: finite loss, checkpoint, export,
     load with transformers

Before anything runs, the plan is printed: each step's estimated seconds on the GPU at hand and
whether it runs. A step runs only if its estimate fits in what is left of --budget-s and the
machine has the GPU memory, host memory and disk it needs; it gets a hard limit from what is
left. A step that cannot run is skipped with the reason, and the report says what it would have
measured. Every step reads one prepared data set (--bundle's, or --manifest): nothing is
prepared here.

Every step records pass, fail or skipped, its figures, its wall time beside its estimate, and on
failure the end of the failing command's output; a failed step does not stop the next. After
every step, RESULTS/report.md, report.json and logs.tar.gz (the end of every command's output)
are written again; RESULTS is --results, else $OUT if set, else --out. On SIGINT, SIGTERM or the
budget's end every process the check started is killed and waited for (launch/gpu_procs.py).
Exit status: 0 when no step failed, 1 when one did, 2 on a usage error or no GPU, 128 + N when
stopped by signal N.

--dry-run needs no GPU: it passes the profile of every run of the chosen steps through the
planner and the preflight, for --gpus GPUs of kind --plan-gpu, runs the benchmark's own
--dry-run for step b, and writes the same report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# This process only plans and reports. Its DeepSpeed (the planner's estimator) stays off the GPU:
# a CUDA context here would hold memory the measured runs then lack. The commands get "cuda".
os.environ["DS_ACCELERATOR"] = "cpu"

from launch.gpu_plan import ORDER, Plan, Planned, budget_reason  # noqa: E402
from launch.gpu_procs import Processes, Stopped  # noqa: E402
from launch.gpu_report import StepResult, failed, write_report  # noqa: E402
from launch.gpu_steps import GPU, STEPS, Check, StepFailed, examine, run_figures  # noqa: E402
from pipeline.config import ProfileError  # noqa: E402
from pipeline.metrics import PEAK_FLOPS, gpu_kind  # noqa: E402
from pipeline.plan import GPU_MEMORY, GiB  # noqa: E402

DEFAULT_BUDGET_S = 480
PROBE_TIMEOUT_S = 120
# The budget's backstop: if the check itself (not a command) is still busy this long after the
# budget ran out, SIGALRM stops it as a signal would.
BACKSTOP_S = 20
PROBE = """import json, torch
n = torch.cuda.device_count()
p = torch.cuda.get_device_properties(0) if n else None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": n,
                  "gpu": p.name if p else None, "gpu_memory_bytes": p.total_memory if p else 0,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if n else None}))"""


def probe_torch(processes: Processes, out: Path, env: dict) -> dict:
    """torch's view of the GPUs, from a child process: this one must hold no CUDA context (its
    memory would be missing from the measured runs)."""
    done = processes.run("probe", [sys.executable, "-c", PROBE], out / "logs", env, PROBE_TIMEOUT_S)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: {sys.executable} cannot import torch ({last})")
    return json.loads(done.stdout)


def make_plan(check: Check, steps: list[str], budget_s: float) -> Plan:
    """Every chosen step's costs, profile problems and machine shortages, in ORDER, decided."""
    planned = []
    for letter in [s for s in ORDER if s in steps]:
        step, problems, shortages = STEPS[letter], [], []
        for name, run in step.runs(check).items():
            wrong, short = examine(check, run, check.out / "preflight" / letter / name)
            problems += wrong
            shortages += short
        try:
            costs = step.costs(check)
        except ProfileError:  # already among its problems
            costs = []
        planned.append(Planned(letter, step.title, step.measures, costs, problems, shortages))
    shutil.rmtree(check.out / "preflight", ignore_errors=True)  # the preflight's write test leaves directories
    plan = Plan(budget_s, check.gpu.name, planned)
    plan.decide()
    return plan


def planned_runs(check: Check, letter: str) -> dict:
    figures = {}
    for name, run in STEPS[letter].runs(check).items():
        try:
            figures[name] = run_figures(check, run)
        except ProfileError as e:
            figures[name] = {"profile": run.profile, "error": str(e)}
    return figures


def run_step(check: Check, plan: Plan, planned: Planned, left_s: float, dry_run: bool) -> StepResult:
    """One step under the hard limit that `left_s` seconds of the budget give it: pass, fail or
    skipped, with its figures."""
    letter, limit = planned.step, plan.limit(planned.step, left_s)
    result = StepResult(letter, planned.title, "skipped", 0.0, estimate_s=planned.estimate_s, limit_s=limit)
    if planned.problems:
        result.status, result.reason = "fail", "; ".join(planned.problems)
        return result
    if planned.decision == "skip" or limit is None:
        result.reason = planned.reason or budget_reason(planned.estimate_s, left_s, plan.budget_s)
        result.figures = {"would_measure": planned.measures, **planned_runs(check, letter)}
        check.log(f"step {letter}: skipped ({result.reason})")
        return result
    check.log(f"step {letter}: {planned.title} (estimate ~{math.ceil(planned.estimate_s)} s, limit {limit:.0f} s)")
    check.step, check.deadline = letter, time.monotonic() + limit
    tic = time.monotonic()
    try:
        if dry_run:
            result.figures = planned_runs(check, letter)
            if STEPS[letter].dry:
                STEPS[letter].dry(check, result.figures)
        else:
            STEPS[letter].body(check, result.figures)
        result.status = "pass"
    except StepFailed as e:
        result.status, result.reason, result.output_tail = "fail", str(e), e.output_tail
    except Exception as e:  # noqa: BLE001 - a broken step is reported like a failed one; the next still runs
        result.status, result.reason = "fail", f"{type(e).__name__}: {e}"
        result.output_tail = traceback.format_exc()[-3000:]
    finally:
        check.step, check.deadline = "", math.inf
        result.seconds = time.monotonic() - tic
    check.log(f"step {letter}: {result.status}" + (f" ({result.reason})" if result.reason else "")
              + f" after {result.seconds:.0f} s")
    return result


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


def bundle_summary(bundle: Path | None) -> dict | None:
    if bundle is None:
        return None
    doc = json.loads((bundle / "bundle.json").read_text())
    return {"path": str(bundle), "built": doc["built"], "mib": round(doc["bytes"] / 2**20, 1),
            "wheels": ", ".join(f"{w['name']} {w['version']}" for w in doc["wheels"]),
            "data_tokens": doc["data"]["tokens"]}


def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"expected letters from {','.join(ORDER)} separated by commas (got {text!r})")
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--bundle", type=Path, help="the folder `make gpu-bundle` built: its prepared data is used "
                      "(its wheels are installed by launch/gpu_check.sh)")
    data.add_argument("--manifest", type=Path, help="a prepared token-shard manifest to use instead")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds the whole check may take, probe included (default {DEFAULT_BUDGET_S})")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="work directory: run directories and full logs (default runs/gpu-check)")
    p.add_argument("--results", type=Path, help="where report.md, report.json and logs.tar.gz go "
                   "(default: $OUT if set, else --out)")
    p.add_argument("--steps", type=parse_steps, default=list(ORDER),
                   help=f"which steps (default {','.join(ORDER)}); they run in the order {','.join(ORDER)}")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: the plan, every step's profile through the planner and the preflight, and the "
                   "benchmark's own dry run; no training")
    p.add_argument("--gpus", type=int, help="GPUs to use (default: every GPU torch sees; 1 with --dry-run)")
    p.add_argument("--plan-gpu", default="h100-80gb", choices=sorted(GPU_MEMORY),
                   help="with --dry-run: the GPU kind to plan for (default h100-80gb)")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        p.error(f"--gpus: must be at least 1 (got {args.gpus})")
    if args.budget_s <= 0:
        p.error(f"--budget-s: must be positive (got {args.budget_s:g})")
    if args.bundle:
        if not (args.bundle / "bundle.json").is_file():
            p.error(f"--bundle: {args.bundle}/bundle.json not found (build the bundle with `make gpu-bundle`)")
        args.manifest = args.bundle / json.loads((args.bundle / "bundle.json").read_text())["data"]["manifest"]
    if not args.manifest.is_file():
        p.error(f"--manifest: no such file (got {args.manifest})")
    args.results = args.results or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.out)
    return args


def on_signal(signum, frame):
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, signal.SIG_IGN)  # the cleanup that follows must not be interrupted
    if signum == signal.SIGALRM:
        raise Stopped("the budget ran out while the check itself was busy", 1)
    raise Stopped(f"stopped by {signal.Signals(signum).name}", 128 + signum)


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, on_signal)
    signal.alarm(math.ceil(args.budget_s) + BACKSTOP_S)
    processes = Processes()
    env = dict(os.environ, DS_ACCELERATOR="cuda", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore::FutureWarning")
    env.pop("OUT", None)  # the runs' own outputs go under --out
    results: list[StepResult] = []
    environment: dict = {}
    plan = None
    current: Planned | None = None
    current_started = started
    out = args.out.resolve()

    def report(stopped: str = "") -> None:
        write_report(args.results, results, environment, args.dry_run, plan.as_dict() if plan else None, stopped,
                     out / "logs")

    try:
        found = probe_torch(processes, out, env)
        if args.dry_run:
            gpus, gpu = args.gpus or 1, GPU(args.plan_gpu, GPU_MEMORY[args.plan_gpu], PEAK_FLOPS[args.plan_gpu])
        elif not found["gpus"]:
            print(f"error: torch {found['torch']} (CUDA {found['cuda']}) sees no GPU; on a machine without one use "
                  "--dry-run", file=sys.stderr)
            return 2
        else:
            gpus = min(args.gpus or found["gpus"], found["gpus"])
            kind, peak = gpu_kind(found["gpu"])
            gpu = GPU(found["gpu"], found["gpu_memory_bytes"], peak or PEAK_FLOPS.get(kind) or 300e12)
        check = Check(out, gpus, gpu, args.manifest.resolve(), processes, env, started)
        environment = {"python": sys.version.split()[0], "torch": found["torch"], "cuda": found["cuda"],
                       "nccl": found["nccl"], "gpus_seen": found["gpus"], "gpu": found["gpu"],
                       "gpu_memory_gib": found["gpu_memory_bytes"] / GiB, "gpus_used": gpus,
                       "budget_s": args.budget_s, "data": str(check.manifest), "bundle": bundle_summary(args.bundle)}
        if args.dry_run:
            environment["planned_for"] = f"{gpus} × {gpu.name} ({gpu.memory_bytes / GiB:.0f} GiB)"
        environment["packages"] = package_versions()
        plan = make_plan(check, args.steps, args.budget_s)
        print(plan.table(), flush=True)
        report()
        spent = 0.0  # the dry run's clock: the plan's estimates of the steps before
        for planned in plan.steps:
            left = args.budget_s - (spent if args.dry_run else time.monotonic() - started)
            current, current_started = planned, time.monotonic()
            results.append(run_step(check, plan, planned, left, args.dry_run))
            current = None
            if args.dry_run and results[-1].status == "pass":
                spent += planned.estimate_s
            report()
    except Stopped as e:
        processes.stop_all()
        print(f"{e}: every process the check started is stopped", file=sys.stderr, flush=True)
        if current is not None:
            results.append(StepResult(current.step, current.title, "fail", time.monotonic() - current_started, {},
                                      str(e), "", current.estimate_s))
        for planned in (plan.steps if plan else [])[len(results):]:
            results.append(StepResult(planned.step, planned.title, "skipped", 0.0,
                                      {"would_measure": planned.measures}, f"not started: {e}"))
        report(str(e))
        return e.exit_code
    finally:
        signal.alarm(0)
        processes.stop_all()
    print(f"report: {args.results / 'report.md'}, {args.results / 'report.json'}, {args.results / 'logs.tar.gz'}",
          flush=True)
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
