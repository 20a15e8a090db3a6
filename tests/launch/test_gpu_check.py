"""launch/gpu_check.py without a GPU: its options, its plan and budget, --dry-run (every step's
profile through the planner and the preflight, on real prepared data), the report it writes where
$OUT says, and that it leaves no process behind however it is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import psutil
import pytest
import torch

from launch.gpu_report import StepResult, write_report
from runs import REPO, cpu_env

SCRIPT = str(REPO / "launch" / "gpu_check.py")


def gpu_check(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=cpu_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def test_help_names_the_steps_and_options():
    r = gpu_check("--help")
    assert r.returncode == 0, r.stderr
    for text in ("--dry-run", "--steps", "--budget-s", "--bundle", "--results", "$OUT", "runs/gpu-check",
                 "llama-7b", "bench/train_throughput.py", "launch/gpu_check.sh"):
        assert text in r.stdout, text


@pytest.mark.parametrize("steps", ["a,x", ""])
def test_unknown_steps_are_refused(steps, prepared_data, tmp_path):
    r = gpu_check("--dry-run", "--manifest", str(prepared_data), "--steps", steps, "--out", str(tmp_path))
    assert r.returncode == 2 and "--steps" in r.stderr and "expected letters from c,a,b,e,d" in r.stderr, r.stderr
    assert not (tmp_path / "report.json").exists()


def test_data_is_required_and_never_prepared_here(tmp_path):
    r = gpu_check("--dry-run", "--out", str(tmp_path))
    assert r.returncode == 2 and "one of the arguments --bundle --manifest is required" in r.stderr, r.stderr
    r = gpu_check("--dry-run", "--bundle", str(tmp_path), "--out", str(tmp_path))
    assert r.returncode == 2 and "bundle.json not found" in r.stderr and "make gpu-bundle" in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check would start")
def test_without_a_gpu_only_the_dry_run_starts(prepared_data, tmp_path):
    r = gpu_check("--manifest", str(prepared_data), "--out", str(tmp_path))
    assert r.returncode == 2 and "sees no GPU" in r.stderr and "--dry-run" in r.stderr, r.stderr


def test_dry_run_plans_within_the_budget_and_accepts_every_profile(prepared_data, tmp_path):
    r = gpu_check("--dry-run", "--gpus", "2", "--manifest", str(prepared_data), "--out", str(tmp_path / "work"),
                  "--results", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # The plan comes first, before any step starts, in the order of what each proves per second.
    assert r.stdout.index("plan for h100-80gb, budget 480 s") < r.stdout.index("step c:")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] and report["passed"] and report["stopped"] is None
    plan = report["plan"]
    assert [s["step"] for s in plan["steps"]] == ["c", "a", "b", "e", "d"]
    # On 2 GPUs a also runs the pipeline engine, which leaves too little of 480 s for e.
    assert {s["step"]: s["decision"] for s in plan["steps"]} == {"c": "run", "a": "run", "b": "run", "e": "skip",
                                                                 "d": "skip"}
    assert 0 < plan["planned_s"] <= 480 and plan["planned_s"] == sum(
        s["estimate_s"] for s in plan["steps"] if s["decision"] == "run")
    steps = {s["step"]: s for s in report["steps"]}
    assert {k: s["status"] for k, s in steps.items()} == {"c": "pass", "a": "pass", "b": "pass", "e": "skipped",
                                                          "d": "skipped"}
    assert "of the 480 s budget left" in steps["e"]["reason"]
    # d, llama-7b with its optimizer states in host memory, needs far more host memory than here,
    # and the report still says what it would have measured.
    assert "host memory" in steps["d"]["reason"] and "7B checkpoint" in steps["d"]["figures"]["would_measure"]
    assert steps["d"]["figures"]["train"]["planned_host_gib"] > 100
    for s in ("c", "a", "b"):
        assert steps[s]["estimate_s"] <= steps[s]["limit_s"] <= 480, steps[s]
    runs = {(s, name): run for s in ("c", "a", "b") for name, run in steps[s]["figures"].items()
            if isinstance(run, dict) and "profile" in run}
    # Two GPUs: the pipeline engine's profile is examined too, on both of them.
    assert set(runs) == {("a", "train"), ("a", "resume"), ("a", "pipeline"), ("b", "layers"), ("c", "train")}
    for key, run in runs.items():
        assert run["planned_gpu_gib"] > 0, (key, run)
    assert runs["a", "pipeline"]["gpus"] == 2 and "train.precision=bf16" in runs["a", "pipeline"]["overrides"]
    # b and c measure: no final checkpoint; b plans with the loss settings its benchmark runs with,
    # read back from the benchmark's own dry run of the same command.
    for key in (("b", "layers"), ("c", "train")):
        assert "train.final_checkpoint=false" in runs[key]["overrides"], key
    assert "train.loss_chunk_tokens=4096" in runs["b", "layers"]["overrides"]
    assert "loss chunk 4096," in steps["b"]["figures"]["bench_resolved"]
    assert "8 layers" in steps["b"]["figures"]["bench_resolved"]
    # Every step reads the one prepared data set.
    for run in runs.values():
        assert f"data.manifest={prepared_data}" in run["overrides"]
    assert os.listdir(tmp_path / "work") == ["logs"]  # nothing prepared, no run directory
    # On one GPU the pipeline engine is left out, and the report says so.
    one = tmp_path / "one"
    r = gpu_check("--dry-run", "--steps", "a", "--manifest", str(prepared_data), "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((one / "report.json").read_text())["steps"][0]
    assert a["status"] == "pass" and set(a["figures"]) == {"train", "resume"}


def test_on_one_gpu_the_document_masking_step_fits_and_its_benchmark_runs(prepared_data, tmp_path):
    """Step e on one GPU within the default budget; its dry run runs bench/document_masking.py
    itself on the CPU (small shapes, the CPU path's dense mask) and checks its agreement."""
    r = gpu_check("--dry-run", "--manifest", str(prepared_data), "--out", str(tmp_path / "work"),
                  "--results", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {s["step"]: s["decision"] for s in report["plan"]["steps"]}["e"] == "run"
    e = next(s for s in report["steps"] if s["step"] == "e")
    assert e["status"] == "pass" and e["estimate_s"] <= e["limit_s"], e
    kernel = e["figures"]["kernel_on_cpu"]
    assert kernel["documents"] > 1 and kernel["max_abs_diff_from_dense_mask"] <= 1e-6, kernel
    assert 0 < kernel["rel_error_out"] < 1e-2 and 0 < kernel["rel_error_grads"] < 1e-2, kernel  # bf16 against fp32
    assert kernel["document_masking_ms"] > 0 and kernel["causal_sdpa_ms"] > 0
    overrides = e["figures"]["train"]["overrides"]
    assert "train.document_masking=true" in overrides and "train.reset_positions=true" in overrides


@pytest.mark.parametrize("key", ["rel_error_out", "rel_error_grads"])
@pytest.mark.parametrize("error", [0.2, float("nan")])
def test_masking_figures_away_from_the_reference_fail_the_step(key, error):
    from launch.gpu_steps import MASKING_TOLERANCE, StepFailed, agreeing

    close = {"rel_error_out": MASKING_TOLERANCE / 2, "rel_error_grads": MASKING_TOLERANCE / 2}
    assert agreeing("e-bench", close)
    with pytest.raises(StepFailed, match="away .relative. from the float32 reference"):
        agreeing("e-bench", {**close, key: error})


def test_attention_across_documents_fails_the_masking_check():
    """The negative control of step e's check, computed as the benchmark computes it: plain causal
    attention, which attends across the packed documents, is far outside the tolerance."""
    import torch

    from bench.document_masking import EOS, forward_backward, packed_tokens, relative_errors
    from launch.gpu_steps import StepFailed, agreeing
    from pipeline.model import document_layout, document_mask

    doc, _ = document_layout(packed_tokens(1, 256, 64, "cpu"), EOS)
    q, k, v, grad = (torch.randn(1, 4, 256, 32) for _ in range(4))
    reference = forward_backward(q, k, v, grad, document_mask(doc, flex=False), torch.float32)
    # (on the CPU the mask is the dense one: FlexAttention has no backward there)
    masked = relative_errors(forward_backward(q, k, v, grad, document_mask(doc), torch.bfloat16), reference)
    across = relative_errors(forward_backward(q, k, v, grad, None, torch.bfloat16), reference)
    assert agreeing("masked", {"rel_error_out": masked[0], "rel_error_grads": masked[1]})
    with pytest.raises(StepFailed):
        agreeing("across", {"rel_error_out": across[0], "rel_error_grads": across[1]})


def test_a_step_that_no_longer_fits_the_budget_is_skipped_saying_why(prepared_data, tmp_path):
    r = gpu_check("--dry-run", "--manifest", str(prepared_data), "--out", str(tmp_path), "--budget-s", "150")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["c"]["status"] == "pass" and steps["b"]["status"] == "skipped"
    assert "of the 150 s budget left" in steps["b"]["reason"]
    assert "MFU" in steps["b"]["figures"]["would_measure"]
    assert report["plan"]["planned_s"] <= 150


def test_a_failing_step_does_not_stop_the_next(prepared_data, tmp_path):
    # The manifest alone, away from its shards: every step's preflight finds the data missing.
    manifest = tmp_path / "elsewhere" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(prepared_data.read_text())
    out = tmp_path / "report"
    r = gpu_check("--dry-run", "--steps", "c,a", "--manifest", str(manifest), "--out", str(out))
    assert r.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("c", "fail"), ("a", "fail")]
    assert all("is listed but missing" in s["reason"] for s in report["steps"])
    assert "at least one step FAILED" in (out / "report.md").read_text()


def test_results_go_to_OUT_as_three_files(prepared_data, tmp_path):
    """Where $OUT is set (a GPU machine that gives back a few files from it), the report, its JSON
    and the end of every command's output land there, and nothing else does."""
    out = tmp_path / "OUT"
    r = gpu_check("--dry-run", "--steps", "b", "--manifest", str(prepared_data), "--out", str(tmp_path / "work"),
                  OUT=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "report.json", "report.md"]
    assert all(oct((out / f).stat().st_mode)[-3:] == "644" for f in os.listdir(out))
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
        said = tar.extractfile("logs/b-bench-dry-run.out").read().decode()
    assert "logs/probe.out" in names and "resolved:" in said


def _descendants_once_up(proc: subprocess.Popen, expected: int, timeout: float = 120) -> list[psutil.Process]:
    """The check's descendants once the injected hang's tree is up (check → python → 2 × sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if sum(k.name() == "sleep" for k in kids) >= expected:
            return kids
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the injected hang never started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_check_leaves_no_process_behind(sig, prepared_data, tmp_path):
    """Step b's command hangs (a child in the check's group of it, a grandchild in a session of its
    own); the check is sent `sig`: every descendant is gone within seconds, and the report says
    which step was stopped. (Before: commands in new sessions outlived a killed check.)"""
    proc = subprocess.Popen([sys.executable, SCRIPT, "--dry-run", "--steps", "b,d", "--manifest", str(prepared_data),
                             "--out", str(tmp_path)], cwd=REPO, env=cpu_env(GPU_CHECK_INJECT_HANG="b"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = _descendants_once_up(proc, 2)
    assert len(kids) >= 3
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, [(p.pid, p.name()) for p in alive]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stopped"] == f"stopped by {sig.name}" and not report["passed"]
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("b", "fail"), ("d", "skipped")]
    assert report["steps"][1]["reason"] == f"not started: stopped by {sig.name}"
    assert "STOPPED" in (tmp_path / "report.md").read_text()


def test_a_command_past_its_limit_is_killed_with_its_whole_tree(tmp_path):
    """What the budget does to a step that overruns: its command's group is killed and every
    descendant reaped, the one that left the group included. Run in a child process: the check
    makes itself a subreaper, which a pytest worker should not become."""
    code = f"""
import sys, time, psutil
sys.path.insert(0, {str(REPO)!r})
from launch.gpu_procs import Processes, TimedOut
p = Processes(inject_hang="x")
tic = time.monotonic()
try:
    p.run("hang", ["true"], __import__("pathlib").Path({str(tmp_path)!r}), None, timeout=3, step="x")
except TimedOut as e:
    print("timed out:", e)
# The group is gone; the sleep that left it for a session of its own is now this process's (a subreaper's).
print("outside the group:", [c.cmdline() for c in psutil.Process().children(recursive=True)
                             if c.status() != psutil.STATUS_ZOMBIE])
p.stop_all()
print("left:", len(psutil.Process().children(recursive=True)), "after", round(time.monotonic() - tic))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "timed out: hang: no result within its limit of 3 s; killed" in r.stdout
    assert "outside the group: [['sleep', '601']]" in r.stdout and "left: 0 after" in r.stdout, r.stdout
    assert "hanging" in (tmp_path / "hang.out").read_text()  # what it said before it was killed is kept


def test_report_shows_every_figure_and_every_outcome(tmp_path):
    results = [
        StepResult("a", "demo path on the GPU", "pass", 192.4,
                   {"train": {"loss_first": 8.3125, "loss_last": 5.25, "tokens_per_s_median": 123456.7},
                    "pipeline_engine": "skipped: needs 2 GPUs"}, estimate_s=120.0, limit_s=270.0),
        StepResult("b", "LLaMA-7B layer shape throughput", "fail", 61.0, {"planned": {"layers": 8, "micro_batch": 2}},
                   "b-bench-8-layers: exited 1 (log runs/gpu-check/logs/b-bench-8-layers.log)",
                   "Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access"),
        StepResult("d", "llama-7b with optimizer offload", "skipped", 3.0, {"planned": {"host_gib": 150.6}},
                   "host memory: the offloaded optimizer states need 151 GiB, 120 GiB available"),
    ]
    env = {"torch": "2.13.0+cu130", "gpu": "NVIDIA H100 80GB HBM3", "gpus_used": 1,
           "packages": {"deepspeed": {"used": "0.19.8", "pinned": "0.19.8"},
                        "numpy": {"used": "2.5.2", "pinned": "2.4.6"}, "rensa": {"used": None, "pinned": "0.5.0"}}}
    write_report(tmp_path, results, env, dry_run=False)

    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["passed"] is False and not doc["dry_run"]
    assert [s["status"] for s in doc["steps"]] == ["pass", "fail", "skipped"]
    assert doc["steps"][0]["figures"]["train"]["tokens_per_s_median"] == 123456.7
    assert doc["environment"]["packages"]["numpy"] == {"used": "2.5.2", "pinned": "2.4.6"}

    md = (tmp_path / "report.md").read_text()
    assert "at least one step FAILED" in md
    assert "| a | demo path on the GPU | pass | 3m 12s | 2m 00s | 4m 30s |" in md
    assert "| b | LLaMA-7B layer shape throughput | fail | 1m 01s |  |  |" in md
    assert "| d | llama-7b with optimizer offload | skipped: host memory: the offloaded optimizer states need " \
           "151 GiB, 120 GiB available | 3s |" in md
    for row in ("| train.loss_first | 8.312 |", "| train.tokens_per_s_median | 1.235e+05 |",
                "| pipeline_engine | skipped: needs 2 GPUs |", "| planned.layers | 8 |", "| planned.host_gib | 150.6 |",
                "| numpy | 2.5.2 | 2.4.6 |", "| rensa | missing | 0.5.0 |", "| gpu | NVIDIA H100 80GB HBM3 |"):
        assert row in md, row
    assert "Failed: b-bench-8-layers: exited 1" in md and "RuntimeError: CUDA error: an illegal memory access" in md


def test_report_of_passing_steps_says_so(tmp_path):
    write_report(tmp_path, [StepResult("c", "llama-1b memory against the plan", "pass", 5.0,
                                       {"measured_over_predicted": 1.04, "within_10_percent": True})], {}, dry_run=True)
    md = (tmp_path / "report.md").read_text()
    assert "dry run" in md and "every step passed or was skipped" in md
    assert "| measured_over_predicted | 1.04 |" in md and "| within_10_percent | true |" in md
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True


def test_benchmark_figures_give_ours_against_each_peer(tmp_path):
    from launch.gpu_steps import bench_figures

    def row(name, tokens_per_s, mfu):
        return {"name": name, "step_time_s": 16384 / tokens_per_s, "tokens_per_s": tokens_per_s,
                "tflops_per_device": 400.0 * mfu / 0.5, "mfu": mfu, "peak_mem_gib": 41.5}

    result = {"device": "NVIDIA H100 80GB HBM3", "sdpa_backend": "flash",
              "shape": {"dim": 4096, "ffn_dim": 11008, "n_heads": 32, "n_layers": 8, "seq_len": 4096,
                        "micro_batch_size": 4, "precision": "bf16"},
              "results": [row("ours", 11000.0, 0.55), row("bare_deepspeed", 10000.0, 0.5),
                          row("plain_pytorch", 12500.0, 0.625)]}
    figures = bench_figures(result)
    assert figures["tokens_per_s_ratio"] == {"ours/bare_deepspeed": 1.1, "ours/plain_pytorch": 0.88}
    assert figures["ours_mfu_reaches_h100_target"] is True
    write_report(tmp_path, [StepResult("b", "LLaMA-7B layer shape throughput", "pass", 300.0, figures)], {}, False)
    md = (tmp_path / "report.md").read_text()
    for row_text in ("| tokens_per_s_ratio.ours/bare_deepspeed | 1.1 |", "| results.ours.mfu | 0.55 |",
                     "| results.plain_pytorch.tokens_per_s | 1.25e+04 |", "| shape.n_layers | 8 |",
                     "| sdpa_backend | flash |"):
        assert row_text in md, row_text


@pytest.mark.parametrize("gpu, most", [("h100-80gb", (8, 4)), ("a100-40gb", (4, 4))])
def test_the_layer_shape_is_the_largest_the_planner_fits(gpu, most, prepared_data, tmp_path):
    from launch.gpu_steps import GPU, Check, layer_shape
    from pipeline.metrics import PEAK_FLOPS
    from pipeline.plan import GPU_MEMORY

    check = Check(tmp_path, 1, GPU(gpu, GPU_MEMORY[gpu], PEAK_FLOPS[gpu]), prepared_data, None, {})
    assert layer_shape(check) == most


@pytest.mark.slow
def test_step_a_runs_its_real_commands_on_the_cpu(prepared_data, tmp_path):
    """Step a's own code, not its dry run: train, checkpoint, resume at the saved step, export
    with the logit check, generate, and the figures read back, on the CPU (gloo, bf16) instead of
    NCCL. What a GPU session would otherwise be the first to run. In a child process: the check's
    process control makes its process a subreaper, which a pytest worker should not become."""
    code = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from launch.gpu_procs import Processes
from launch.gpu_steps import GPU, STEPS, Check
env = dict(os.environ, PYTHONPATH={str(REPO)!r})
check = Check(Path({str(tmp_path)!r}), 1, GPU("cpu", 80 * 2**30, 989e12), Path({str(prepared_data)!r}), Processes(), env)
figures = {{}}
STEPS["a"].body(check, figures)
print(json.dumps(figures))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["train"]["steps"] == 30 and figures["resume"]["from_step"] == 30
    assert figures["resume"]["steps"] == 60 and figures["resume"]["loss_last"] < figures["train"]["loss_first"]
    assert figures["export"]["max_logit_diff"] <= figures["export"]["tolerance"]
    assert figures["export"]["generated"].startswith("Permission is hereby granted")
    assert figures["pipeline_engine"] == "skipped: needs 2 GPUs"
    assert (tmp_path / "logs" / "a-resume.out").read_text().count("resumed from") == 1
