"""A run that never hangs silently (pipeline/watchdog.py, pipeline/faults.py Stragglers), through
the real launcher on 2 CPU ranks: a hung rank is named with every rank's stacks and the run
ends with its own exit code, to be resumed; a slow rank is named and warned about."""

from __future__ import annotations

import json
import time
from pathlib import Path

from runs import read_metrics, run_deepspeed, train_losses, zero3_args
from pipeline.watchdog import EXIT_HANG, hang_line

HANG_S = 10
SHORT = ("--set", "train.steps=4", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=2")


def test_a_hung_rank_is_named_with_stacks_then_resume_finishes(prepared_data, tmp_path):
    """Rank 1 sleeps while reading the batch of step 3; rank 0 waits in DeepSpeed's collectives.
    (Before: no watchdog; the run waited in the collective for DeepSpeed's 600 s default, and
    --inject-hang did not exist.)"""
    out = tmp_path / "run"
    tic = time.monotonic()
    proc = run_deepspeed(zero3_args(prepared_data, out, *SHORT, "--set", f"train.hang_timeout_s={HANG_S}",
                                    "--inject-hang", "3:1"), check=False)
    elapsed = time.monotonic() - tic
    assert proc.returncode == EXIT_HANG, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hang: ")]
    assert len(lines) == 1, proc.stderr[-3000:]  # one line per node
    assert "at step 3: rank 1 (" in lines[0] and ") stopped in 'batch' of step 3; rank 0 waits in 'engine' of step 3" \
        in lines[0], lines[0]
    assert f"exit code {EXIT_HANG}; resume with --resume auto" in lines[0]
    for rank in (0, 1):
        stacks = (out / "hang" / f"rank-{rank}.txt").read_text()
        assert f"rank {rank} on " in stacks and "most recent call first" in stacks
        assert lines[0].split(" (seen by")[0] in stacks
    assert "in maybe_delay" in (out / "hang" / "rank-1.txt").read_text()  # where the sleeping rank is
    assert json.loads((out / "preempted").read_text())["reason"] == "hang"  # the SLURM script requeues
    # Start-up, two steps and a checkpoint take ~20-60 s here on 2 busy cores; the watchdog adds
    # HANG_S and two 1 s wake-ups, the launcher's teardown a few seconds.
    assert elapsed < 120 + HANG_S, elapsed
    assert sorted(train_losses(out)) == [1, 2]

    again = run_deepspeed(zero3_args(prepared_data, out, *SHORT, "--set", f"train.hang_timeout_s={HANG_S}"))
    assert f"resumed from {out / 'checkpoints' / 'global_step2'} at step 2" in again.stdout
    assert sorted(train_losses(out)) == [1, 2, 3, 4] and not (out / "preempted").exists()


def test_a_slow_rank_is_named_in_the_log_metrics_and_a_warning(prepared_data, tmp_path):
    """Rank 1 reads every batch 0.5 s late. (Before: steps were timed only as a whole.)"""
    out = tmp_path / "run"
    proc = run_deepspeed(zero3_args(prepared_data, out, "--set", "train.steps=4", "--set", "train.eval_every=0",
                                    "--set", "train.checkpoint_every=0", "--set", "train.final_checkpoint=false",
                                    "--set", "train.straggler_intervals=2", "--inject-slow", "1:0.5"))
    records = [r for r in read_metrics(out) if "perf/slowest_rank" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["perf/slowest_rank"] == 1 and 0.2 < r["perf/slowest_rank_lag_s"] < 1.0 for r in records), records
    assert "| slowest rank 1 +0.2" in proc.stdout or "| slowest rank 1 +0.3" in proc.stdout, proc.stdout[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: rank 1 (")]
    # Every second interval above the lag in a row (step 1, with its warm-up, may not be above it).
    assert warnings and "is the slowest for 2 log intervals in a row" in warnings[0], proc.stderr[-3000:]
    assert "behind the median rank at step" in warnings[0] and "train.straggler_lag=0.2" in warnings[0]


def test_a_collective_gives_up_after_train_collective_timeout_s(prepared_data, tmp_path):
    """With the watchdog off, the process group's own timeout ends a hang (before: DeepSpeed's
    600 s default, not configurable)."""
    out = tmp_path / "run"
    tic = time.monotonic()
    proc = run_deepspeed(zero3_args(prepared_data, out, *SHORT, "--set", "train.hang_timeout_s=0",
                                    "--set", "train.collective_timeout_s=8", "--inject-hang", "1:1"), check=False)
    assert proc.returncode != 0 and time.monotonic() - tic < 120, proc.stderr[-3000:]
    assert "timed out" in (proc.stdout + proc.stderr).lower() or "timeout" in (proc.stdout + proc.stderr).lower()
    assert not (out / "hang").exists()  # the watchdog stayed off


def test_the_hang_line_names_the_ranks_behind_and_the_missing(tmp_path: Path):
    pos = {r: {"step": 7, "phase": "engine", "host": "n0" if r < 4 else "n1"} for r in range(8)}
    pos[5] = {"step": 7, "phase": "batch", "host": "n1"}
    assert hang_line(pos, 8, 61.2, tmp_path) == (
        f"hang: no progress for 61 s at step 7: rank 5 (n1) stopped in 'batch' of step 7; "
        f"ranks 0-4, 6-7 wait in 'engine' of step 7; stacks in {tmp_path}")
    del pos[6]
    assert "rank 6 never reported progress; rank 5 (n1) stopped" in hang_line(pos, 8, 61, tmp_path)
    same = {r: {"step": 7, "phase": "engine", "host": "n0"} for r in range(2)}
    assert "ranks 0-1 (n0) all stopped in 'engine' of step 7" in hang_line(same, 2, 61, tmp_path)
