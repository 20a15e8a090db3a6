"""The trainer through the real `deepspeed` launcher, 2 CPU processes, gloo.

Every run uses the same global batch (16 sequences of 128 tokens) and schedule, so runs of
different engines and world sizes can be compared step by step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from runs import (DEEPSPEED, REPO, STEPS, common, cpu_env, free_port, pipe_args, read_metrics, run_deepspeed,
                  train_losses, zero3_args, zero_args)
from pipeline.distributed import LAUNCHER_VARIABLES
from pipeline.data import micro_batch_positions

ENGINE_ARGS = {"zero3": zero3_args, "pipeline": pipe_args}


def test_zero3_trains_and_checkpoints(zero3_run):
    losses = train_losses(zero3_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.2, losses
    ckpts = zero3_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"global_step{STEPS}"
    assert len(list((ckpts / f"global_step{STEPS}").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    assert json.loads((ckpts / f"global_step{STEPS}" / "meta.json").read_text())["data_parallel_size"] == 2


def test_metrics_in_jsonl_and_tensorboard(zero3_run):
    records = read_metrics(zero3_run)
    last = records[-1]
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops_per_device",
                "train/skipped_steps", "val/loss"):
        assert key in last and math.isfinite(last[key]), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((zero3_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "val/loss"} <= tags
    assert len(acc.Scalars("train/loss")) == STEPS
    # The rate each step used (failed first: the next step's was logged): linear warmup over 2
    # steps to the peak 3e-3, then cosine to 10 % of it at step 8.
    peak, warmup = 3e-3, 2
    want = [peak * (s + 1) / warmup if s < warmup else
            peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (STEPS - warmup)))) for s in range(STEPS)]
    np.testing.assert_allclose([r["train/lr"] for r in records], want, rtol=1e-12)
    # Evaluation and checkpoint time are reported apart from the step time (at steps 4 and 8).
    assert [r["step"] for r in records if "perf/eval_time_s" in r] == [4, 8]
    assert [r["step"] for r in records if "perf/checkpoint_time_s" in r] == [4, 8]


def test_pipeline_two_stages_trains(pipe_run):
    losses = train_losses(pipe_run)
    assert losses[STEPS] < losses[1] - 0.2, losses
    tag = pipe_run / "checkpoints" / f"global_step{STEPS}"
    # tiny has 2 blocks: embedding, 2 blocks, head
    assert sorted(p.name for p in tag.glob("layer_*-model_states.pt")) == [
        f"layer_{i:02d}-model_states.pt" for i in range(4)]


# ZeRO-1/2 vs ZeRO-3, same samples, same initial weights, fp32: the stages compute the same
# update and differ only in the order of floating-point sums (gradient buckets reduced in another
# grouping, the gradient norm summed over other partitions). Measured over these 8 steps: at most
# 2.4e-7 apart, below one fp32 ulp of a loss near 8 (9.5e-7); allowed: two ulps. A real difference
# (a rank that kept its own weights, a gradient left unreduced) changes the update itself, not the
# last bit of a sum.
STAGE_ATOL = 2e-6


def gap(got: dict[int, float], want: dict[int, float], relative: bool = False) -> float:
    """The largest difference of two runs' losses over every step of `got`, which `want` must
    have too (absolute, or relative to `want`)."""
    assert set(got) <= set(want) and got, (sorted(got), sorted(want))
    return max(abs(got[s] - want[s]) / (abs(want[s]) if relative else 1.0) for s in got)


def assert_within(got: dict[int, float], want: dict[int, float], bound: float, what, relative: bool = False) -> None:
    apart = gap(got, want, relative)
    assert apart <= bound, f"{what}: {apart:.2e} apart, bound {bound:.0e}"


def assert_outside(got: dict[int, float], want: dict[int, float], bound: float, what, relative: bool = False) -> None:
    """A negative control: a run with a defect the bound exists to catch lies outside it."""
    apart = gap(got, want, relative)
    print(f"negative control {what}: {apart:.2e} apart, {apart / bound:.1f}× the bound {bound:.0e}")
    assert apart > 2 * bound, f"{what}: only {apart:.2e} apart, within 2× the bound {bound:.0e}: the bound is loose"


def test_both_engines_match_plain_pytorch_reference(zero3_run, pipe_run, reference_losses):
    """tests/reference.py trains the same model (transformers' LLaMA holding the trainer's initial
    weights) with torch's AdamW, its own loss, schedule and sample order, in one process."""
    ref = reference_losses()
    for run in (zero3_run, pipe_run):
        # fp32 on the CPU; only the order of reductions differs (micro-batches, ranks, stages, one
        # batch of 16 in the reference). Measured over the 8 steps: 8.3e-7 (ZeRO-3) and 9.5e-7
        # (pipeline) apart, one ulp of a loss near 8.
        assert_within(train_losses(run), ref, STAGE_ATOL, run)
    assert ref[STEPS] < ref[1] - 0.2  # the steps really changed the weights
    assert_optimizer_bound_is_tight(reference_losses, train_losses(zero3_run))


def assert_optimizer_bound_is_tight(reference_losses, fp32: dict[int, float]) -> None:
    """The defects an fp32 comparison at STAGE_ATOL guards against: weight decay lost (5e-6 at
    step 2, 4e-4 at step 8 with the suite's lr 3e-3 and decay 0.1), and decay as an L2 term in
    Adam's gradient (DeepSpeed's CPU Adam with adamw_mode=False), which shifts every step after
    the first (0.02 at step 2)."""
    for defect in ({"weight_decay": 0.0}, {"cpu_adam_l2": True}):
        assert_outside(reference_losses(**defect), fp32, STAGE_ATOL, defect)


def test_zero_stages_1_and_2_give_the_losses_of_zero3(prepared_data, zero3_run, zero2_run, tmp_path):
    zero1 = tmp_path / "zero1"
    run_deepspeed(zero_args(1, prepared_data, zero1, "--set", "train.steps=4", "--set", "train.checkpoint_every=0",
                            "--set", "train.eval_every=0", "--set", "train.final_checkpoint=false"))
    # As a benchmark runs it (train.final_checkpoint=false): every step logged, nothing saved at the
    # end (failed first: the last step always saved).
    assert [r["step"] for r in read_metrics(zero1)] == [1, 2, 3, 4]
    assert not (zero1 / "checkpoints" / "latest").exists()
    assert not list((zero1 / "checkpoints").rglob("global_step*"))
    want = train_losses(zero3_run)
    for run, steps in ((zero1, range(1, 5)), (zero2_run, range(1, STEPS + 1))):
        got = train_losses(run)
        assert sorted(got) == list(steps), run
        np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=0, atol=STAGE_ATOL,
                                   err_msg=str(run))
    tag = zero2_run / "checkpoints" / f"global_step{STEPS}"
    assert json.loads((tag / "profile.json").read_text())["deepspeed"]["zero_optimization"]["stage"] == 2
    assert (tag / "mp_rank_00_model_states.pt").exists()  # stage 1/2: rank 0 writes the whole model


def test_zero2_resumes_on_another_number_of_ranks(prepared_data, zero2_run, tmp_path):
    """2 ranks → 1 (through the universal checkpoint; same-rank resume is the ZeRO-3 SIGTERM test's)."""
    out = tmp_path / "run"
    shutil.copytree(zero2_run / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / f"global_step{STEPS}")
    (out / "checkpoints" / "latest").write_text("global_step4\n")
    # 1 rank: accumulation 4 keeps the global batch at 16 sequences.
    proc = run_deepspeed(zero_args(2, prepared_data, out, "--set", "train.grad_accum_steps=4"), nproc=1)
    assert "converting to a universal checkpoint" in proc.stdout
    got, want = train_losses(out), train_losses(zero2_run)
    assert sorted(got) == list(range(5, STEPS + 1))
    # Same samples in the same order; only the reduction order differs from the 2-rank run.
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=0, atol=STAGE_ATOL)


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    try:
        kids = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if "pipeline.train" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline())]


def test_sigterm_checkpoints_and_resume_reproduces_losses(prepared_data, zero3_run, tmp_path):
    out = tmp_path / "run"
    # Without a final checkpoint, too: the stop by signal still saves, as it exists to be resumed.
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", *zero3_args(prepared_data, out, "--set", "train.checkpoint_every=0",
                                   "--set", "train.final_checkpoint=false")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for the first step, then preempt like a scheduler would
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.05)
    for p in _workers(proc):
        p.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    assert "preempted (SIGTERM): stopped after step" in output
    stopped = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert 1 <= stopped < STEPS, "the run finished before the signal arrived"
    assert json.loads((out / "preempted").read_text()) == {"step": stopped, "signal": "SIGTERM"}  # for sbatch

    run_deepspeed(zero3_args(prepared_data, out, "--resume", "auto"))
    got, want = train_losses(out), train_losses(zero3_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Bit-for-bit: same data order, same optimizer state, same reductions.
    assert got == want
    assert not (out / "preempted").exists()

    # Same step, same weights, but another run: the export refuses to mix their files.
    from pipeline.export import ExportError, export

    tag = f"checkpoints/global_step{STEPS}"
    shutil.copy(zero3_run / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt", out / tag)
    with pytest.raises(ExportError, match="run_id differs"):
        export(out, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


class _Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_tampered_checkpoint(prepared_data, zero3_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(zero3_run / "checkpoints", out / "checkpoints")
    f = out / "checkpoints" / f"global_step{STEPS}" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    state["note"] = _Payload(tmp_path / "pwned")
    torch.save(state, f)
    proc = run_deepspeed(zero3_args(prepared_data, out, "--set", f"train.steps={STEPS + 1}"), check=False)
    assert proc.returncode != 0
    assert "refused to load a pickled object outside the allow-list" in proc.stdout + proc.stderr
    assert not (tmp_path / "pwned").exists()


def assert_resume_bound_is_tight(reference_losses, uninterrupted: Path) -> None:
    """ZeRO-3's universal loader gives every param group the first one's hyperparameters (mended
    in pipeline/engines/zero.py): a resume that let it through decays the norm gains from the
    first resumed step, 1e-4 from the uninterrupted losses at the second, 3e-4 at the fourth."""
    resumed = {s: v for s, v in reference_losses(decay_norms_from=4).items() if s > 4}
    assert_outside(resumed, train_losses(uninterrupted), STAGE_ATOL, "weight decay on the norms after the resume")


def test_resume_on_a_different_number_of_ranks(prepared_data, zero3_run, reference_losses, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(zero3_run / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / f"global_step{STEPS}")
    (out / "checkpoints" / "latest").write_text("global_step4\n")
    # 1 rank instead of 2: accumulation 4 keeps the global batch at 16 sequences.
    proc = run_deepspeed(["pipeline.train", *zero3_args(prepared_data, out, "--set", "train.grad_accum_steps=4")[1:]],
                         nproc=1)
    assert "converting to a universal checkpoint" in proc.stdout
    got, want = train_losses(out), train_losses(zero3_run)
    assert sorted(got) == list(range(5, STEPS + 1))
    # Same samples in the same order; only the reduction order differs from the 2-rank run
    # (measured: at most 2.4e-7 apart over steps 5-8).
    assert_within(got, want, STAGE_ATOL, out)
    assert_resume_bound_is_tight(reference_losses, zero3_run)


def test_pipeline_resumes_with_other_stages_and_data_parallel_size(prepared_data, pipe_run, reference_losses, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pipe_run / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / f"global_step{STEPS}")
    (out / "checkpoints" / "latest").write_text("global_step4\n")
    # 2 stages × 1 replica → 1 stage × 2 replicas, same global batch of 16.
    args = common(prepared_data, out, "--profile", "ds_configs/tiny_cpu_pipeline.json",
                  "--set", "topology.pipeline_stages=1", "--set", "train.micro_batch_size=8",
                  "--set", "train.grad_accum_steps=1")
    # First with a tampered file: rank 0's conversion refuses it (failed first: DeepSpeed's converter
    # unpickled it with weights_only=False), and rank 1, waiting on the filesystem, stops too: one
    # message, no hang.
    f = out / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt"
    saved = f.read_bytes()
    state = torch.load(f, weights_only=False)
    state["note"] = _Payload(tmp_path / "pwned")
    torch.save(state, f)
    proc = run_deepspeed(args, check=False, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("refused to load a pickled object outside the allow-list") == 1, output[-4000:]
    assert not (tmp_path / "pwned").exists()
    f.write_bytes(saved)
    proc = run_deepspeed(args)
    assert "converting to a universal checkpoint" in proc.stdout
    got, want = train_losses(out), train_losses(pipe_run)
    assert sorted(got) == list(range(5, STEPS + 1))
    assert_within(got, want, STAGE_ATOL, out)  # measured: identical to the bit
    assert_resume_bound_is_tight(reference_losses, pipe_run)


def test_optimizer_offload_uses_deepspeeds_cpu_adam_with_the_same_losses(prepared_data, zero3_run, reference_losses,
                                                                          tmp_path):
    """ZeRO-Offload (as in 7b_zero3_offload.json): DeepSpeed refuses a torch optimizer there
    (zero_force_ds_cpu_optimizer), so the trainer passes DeepSpeedCPUAdam in AdamW mode."""
    out = tmp_path / "run"
    run_deepspeed(zero3_args(prepared_data, out, "--set", 'deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}',
                             "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0",
                             "--set", "train.final_checkpoint=false"))
    got, want = train_losses(out), train_losses(zero3_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Measured: identical to the bit over the 8 steps (CPU Adam's AdamW update is torch's).
    assert_within(got, want, STAGE_ATOL, out)
    assert_optimizer_bound_is_tight(reference_losses, want)


def test_samples_of_a_step_do_not_depend_on_world_size():
    def step_positions(step, dp, mb, gbs):
        accum = gbs // (mb * dp)
        return sorted(p for m in range(accum) for r in range(dp) for p in micro_batch_positions(step * gbs, m, r, mb, dp))

    for step in (0, 7):
        want = list(range(step * 48, (step + 1) * 48))
        assert step_positions(step, 1, 4, 48) == want
        assert step_positions(step, 2, 4, 48) == want
        assert step_positions(step, 3, 8, 48) == want


def _start(module_args: list[str], nproc: int) -> subprocess.Popen:
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", *module_args]
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_during_save_then_resume_on_fewer_ranks_with_a_derived_batch(prepared_data, tmp_path):
    """Every rank killed mid-save; then the run resumes on 1 rank. The profile derives the global
    batch from the world size (2 × 4 × 2 = 16 sequences; on 1 rank 8), as tiny_cpu.json does."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = run_deepspeed(zero3_args(prepared_data, out), env=cpu_env(PIPELINE_KILL_DURING_SAVE_STEP=str(STEPS)),
                         check=False)
    assert proc.returncode != 0
    assert (ckpts / "latest").read_text().strip() == "global_step4"
    # The partial save lies in .staging, never under its final name (failed first: written in place,
    # so a later save of that step on fewer ranks kept the stale rank-1 files beside its own).
    assert (ckpts / ".staging" / f"global_step{STEPS}").is_dir()
    assert not (ckpts / f"global_step{STEPS}").exists()

    # A SIGUSR1 while rank 0 converts to a universal checkpoint (long work before the first step) is
    # kept, not fatal (failed first: the default action killed the process): the run stops before
    # its first step, exits 0 and leaves the `preempted` mark.
    launcher = _start(zero3_args(prepared_data, out), nproc=1)
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if "converting to a universal checkpoint" in line:
            for p in _workers(launcher):
                p.send_signal(signal.SIGUSR1)
            break
    output = "".join(lines) + launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, output[-4000:]
    assert "preempted (SIGUSR1): stopped before its first step" in output
    assert json.loads((out / "preempted").read_text())["step"] == 4
    assert (ckpts / "global_step4_universal").is_dir()  # the conversion finished regardless

    # The next start continues from the next unseen sample (failed first: from step × the new batch,
    # replaying samples 40..63) and says the batch changed.
    resumed = run_deepspeed(zero3_args(prepared_data, out), nproc=1)
    assert "converting" not in resumed.stdout
    assert ("global batch changed since global_step4: 16 → 8 sequences (world size 2 → 1); continuing from "
            "sample 64, the next unseen one") in resumed.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # the killed run's steps 5-7 dropped
    assert [r["data/consumed_samples"] for r in records] == [16, 32, 48, 64, 72, 80, 88, 96]
    meta = json.loads((ckpts / f"global_step{STEPS}" / "meta.json").read_text())
    assert (meta["consumed_samples"], meta["global_batch_size"], meta["world_size"]) == (96, 8, 1)
    assert not (out / "preempted").exists() and not (ckpts / ".staging" / f"global_step{STEPS}").exists()
    # The re-saved step 8 holds only the 1-rank run's files: the export merges it.
    from pipeline.export import export

    export(out, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_nan_step_is_skipped_and_counted_and_consecutive_ones_stop_the_run(prepared_data, tmp_path):
    """One NaN step (2) is skipped and training goes on; two in a row (5, 6) stop the run with a
    checkpoint at the stop, which is not a multiple of checkpoint_every (and is made even without a
    final checkpoint: the stopped run is meant to be resumed)."""
    out = tmp_path / "run"
    proc = run_deepspeed(zero3_args(prepared_data, out, "--set", "train.max_consecutive_skips=2",
                                    "--set", "train.checkpoint_every=4", "--set", "train.keep_last=1",
                                    "--set", "train.final_checkpoint=false"),
                         env=cpu_env(PIPELINE_INJECT_NAN_STEPS="2,5,6"), check=False)
    assert proc.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in proc.stderr + proc.stdout
    # DeepSpeed's CPU shared-memory all-reduce segments of this run were unlinked (they would
    # otherwise stay in RAM-backed /dev/shm, 66 MB per rank per run).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.master_port}_*"))
    records = {r["step"]: r for r in read_metrics(out)}  # strict JSON (failed first: NaN was written)
    assert records[2]["train/loss"] is None and "train/loss" in records[2]["nonfinite"]
    assert records[1]["train/skipped_steps"] == 0
    assert records[4]["train/skipped_steps"] == 1
    assert math.isfinite(records[4]["train/loss"]) and records[4]["train/loss"] < records[1]["train/loss"]
    assert max(records) == 6  # stopped right after the second skip in a row
    # A checkpoint at the stop (weights unchanged since step 4), and only the last one kept.
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step6"]


SLOW_RANK0 = """import os, runpy, time
if os.environ.get("RANK") == "0":
    time.sleep(5)
runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)
"""


def test_zero3_with_pipeline_is_refused_before_any_process_group(prepared_data, tmp_path):
    # Rank 0 reports a refusal every rank reaches; here it reaches it 5 s after rank 1, and its
    # line must still be printed before the launcher ends the run (failed first: rank 1 exited,
    # the launcher killed rank 0 before it printed, and stderr was empty).
    (tmp_path / "slow_rank0.py").write_text(SLOW_RANK0)
    args = zero3_args(prepared_data, tmp_path / "run", "--set", "topology.engine=pipeline",
                      "--set", "topology.pipeline_stages=2")
    proc = run_deepspeed(["slow_rank0", *args[1:]], check=False,
                         env=cpu_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}"))
    assert proc.returncode != 0
    assert "DeepSpeed refuses ZeRO-2/3 with pipeline parallelism" in proc.stderr
    assert "zero3" in proc.stderr and "pipeline" in proc.stderr
    assert "init_distributed" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


# bf16 and activation checkpointing under DeepSpeed, and the speed switches of the train section,
# on both engines. Each run is compared step by step with the fp32 run of the same engine.

SHORT = 4  # steps of the speed-switch runs, compared with the first steps of the 8-step fp32 runs (same schedule)

# bf16 against fp32, relative, over the 8 steps. bf16 keeps 8 significant bits (unit roundoff
# 2^-8 = 0.4 %), but DeepSpeed keeps fp32 master weights and Adam states (and, for the pipeline,
# accumulates gradients in fp32), so the rounding does not compound across steps. Measured: at
# most 9.5e-5 (ZeRO-3) and 1.09e-4 (pipeline) on the suite's data (5.9e-5 and 4.7e-5 on an
# earlier build of the same fixture), up and down, not growing with the steps. A run that lost
# the fp32 master copy (pure bf16 weights and Adam states) drifts further each step: 1.8e-5 at
# step 2, 1.4e-4 at step 4, 6.0e-4 to 6.4e-4 at step 8, 2.4x the bound.
BF16_RTOL = 2.5e-4


def _run(engine: str, manifest: Path, out: Path, *sets: str, steps: int = SHORT) -> dict[int, float]:
    args = ENGINE_ARGS[engine](manifest, out, "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0",
                               "--set", f"train.steps={steps}", "--set", f"train.final_checkpoint={steps == STEPS}",
                               *(a for s in sets for a in ("--set", s)))
    run_deepspeed(args)
    return train_losses(out)


def recomputed_blocks(run: Path) -> list[int]:
    return [r["train/recomputed_blocks"] for r in read_metrics(run)]


def checkpointed_per_step(run: Path) -> int:
    """Blocks a step of `run` recomputes with checkpointing on: every `every`-th of the n_layers
    blocks, once for each micro-batch of each replica (global batch / micro-batch size): a ZeRO
    rank runs every block, a pipeline stage its own, so the sum over ranks is the same."""
    profile = json.loads((run / "profile.json").read_text())
    t = profile["train"]
    return profile["model"]["n_layers"] // t["activation_checkpointing_every"] * t["global_batch_size"] // t["micro_batch_size"]


@pytest.mark.parametrize("engine", ["zero3", "pipeline"])
def test_bf16_tracks_fp32_and_activation_checkpointing_changes_nothing(prepared_data, zero3_run, pipe_run,
                                                                       reference_losses, tmp_path, engine):
    """Both engines wrap their blocks for recomputation in one place (pipeline/engines/blocks.py);
    each runs bf16 with and without it."""
    fp32 = train_losses(zero3_run if engine == "zero3" else pipe_run)
    bf16 = _run(engine, prepared_data, tmp_path / "bf16", "train.precision=bf16", steps=STEPS)
    recomputed = _run(engine, prepared_data, tmp_path / "ac", "train.precision=bf16",
                      "train.activation_checkpointing=true", steps=STEPS)
    # Recomputing a block's forward in the backward pass repeats the same bf16 operations on
    # the same inputs: on the CPU the losses are identical to the bit. That holds as well when
    # nothing is recomputed, hence the count (ZeRO-3: 2 blocks × 2 micro-batches × 2 ranks = 8;
    # pipeline: 1 block × 2 micro-batches × 2 stages = 4), and none without checkpointing.
    assert recomputed == bf16
    assert recomputed_blocks(tmp_path / "ac") == [checkpointed_per_step(tmp_path / "ac")] * STEPS
    assert recomputed_blocks(tmp_path / "bf16") == [0] * STEPS
    print(f"bf16 vs fp32 ({engine}): {gap(bf16, fp32, relative=True):.2e} apart at most")
    assert_within(bf16, fp32, BF16_RTOL, engine, relative=True)
    # A bf16 path that silently ran fp32 would match exactly.
    assert any(bf16[s] != fp32[s] for s in bf16), "bf16 gave fp32's losses to the bit: was it on?"
    assert_outside(reference_losses(pure_bf16=True), fp32, BF16_RTOL, "pure bf16", relative=True)
    if engine == "zero3":
        # bf16 runs name ZeRO's optimizer files bf16_zero_pp_rank_R_...; they hold the same fp32
        # master weights, and the export finds them and passes its logit check.
        from pipeline.export import export

        assert list((tmp_path / "bf16" / "checkpoints" / f"global_step{STEPS}").glob("bf16_zero_pp_rank_*_optim_states.pt"))
        export(tmp_path / "bf16", tmp_path / "hf", check=True)


@pytest.mark.parametrize("engine", ["zero3", "pipeline"])
def test_speed_switches_give_the_fp32_losses(prepared_data, zero3_run, pipe_run, tmp_path, engine):
    """Chunked loss (chunks that do not divide the batch's tokens), checkpointing every second
    block, and one SDPA kernel forced: only the order of floating-point sums changes."""
    fp32 = train_losses(zero3_run if engine == "zero3" else pipe_run)
    got = _run(engine, prepared_data, tmp_path / "run", "train.loss_chunk_tokens=100",
               "train.activation_checkpointing=true", "train.activation_checkpointing_every=2",
               "train.attention_backend=flash")
    steps = list(range(1, SHORT + 1))
    np.testing.assert_allclose([got[s] for s in steps], [fp32[s] for s in steps], rtol=0, atol=2e-5)
    assert recomputed_blocks(tmp_path / "run") == [checkpointed_per_step(tmp_path / "run")] * SHORT


def test_one_process_without_a_launcher_trains_and_checkpoints(prepared_data, tmp_path):
    """`python -m pipeline.train` with no launcher: a world of one, not DeepSpeed's MPI discovery."""
    out = tmp_path / "run"
    env = {k: v for k, v in cpu_env().items() if k not in LAUNCHER_VARIABLES}
    args = zero3_args(prepared_data, out, "--set", "train.steps=3", "--set", "train.decay_steps=3",
                      "--set", "train.checkpoint_every=3", "--set", "train.eval_every=3")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step3"
    assert json.loads((out / "checkpoints" / "global_step3" / "meta.json").read_text())["world_size"] == 1
