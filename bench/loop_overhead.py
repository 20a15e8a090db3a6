"""Where our trainer's step time goes beyond the engine's work: pipeline.train run unchanged,
with the engine's `train_step` (forward, backward, optimizer step, loss read) timed per step.
The rest of a step (`perf/step_time_s` minus `train_step`) is the loop's own host work: reading
the token windows, the loss/preemption all-reduce, metrics, JSONL and TensorBoard writes.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/loop_overhead.py \\
        --profile ds_configs/tiny_cpu.json --out /tmp/overhead --set data.manifest=M \\
        --set train.steps=40 --set train.eval_every=0 --set train.checkpoint_every=0 [--cprofile DIR]

Every argument except --cprofile goes to pipeline.train. Rank 0 prints the medians over the
steps after the first 3; with --cprofile DIR each rank also writes DIR/rankR.pstats
(`python -m pstats`), whose per-call times of the loop's functions show what the rest is made of.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.engines  # noqa: E402
from pipeline import train  # noqa: E402

WARMUP = 3


def time_train_steps(durations: list[float]) -> None:
    """Make build_engine (which pipeline.train looks up when it runs) return engines whose
    train_step appends its duration to `durations`."""
    build = pipeline.engines.build_engine

    def build_timed(*args, **kwargs):
        engine = build(*args, **kwargs)
        step = engine.train_step

        def timed(*a, **k):
            tic = time.perf_counter()
            try:
                return step(*a, **k)
            finally:
                durations.append(time.perf_counter() - tic)
        engine.train_step = timed
        return engine
    pipeline.engines.build_engine = build_timed


def report(out: str, durations: list[float]) -> None:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["perf/step_time_s"] for line in lines][WARMUP:]
    inner = durations[WARMUP:WARMUP + len(steps)]
    rest = [s - i for s, i in zip(steps, inner)]
    step, r = statistics.median(steps), statistics.median(rest)
    print(f"rank 0, {len(steps)} steps: median step {step * 1e3:.1f} ms | median train_step "
          f"{statistics.median(inner) * 1e3:.1f} ms | median rest {r * 1e3:.2f} ms ({r / step:.1%} of the step), "
          f"mean rest {statistics.mean(rest) * 1e3:.2f} ms", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cprofile", metavar="DIR", help="also write a cProfile of each rank to DIR/rankR.pstats")
    args, train_argv = p.parse_known_args()
    durations: list[float] = []
    time_train_steps(durations)
    prof = cProfile.Profile() if args.cprofile else None
    if prof:
        prof.enable()
    rc = train.main(train_argv)
    if prof:
        prof.disable()
        Path(args.cprofile).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(Path(args.cprofile) / f"rank{os.environ.get('RANK', 0)}.pstats")
    if rc == 0 and os.environ.get("RANK", "0") == "0":
        report(train.parse_args(train_argv).out, durations)
    return rc


if __name__ == "__main__":
    sys.exit(main())
