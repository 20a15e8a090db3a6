"""launch/gpu_check.py without a GPU: its options, its --dry-run (every step's profile through the
planner and the preflight, on real prepared data) and the report it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launch.gpu_report import StepResult, write_report
from runs import REPO, cpu_env

SCRIPT = str(REPO / "launch" / "gpu_check.py")


def gpu_check(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_help_names_the_steps_and_options():
    r = gpu_check("--help")
    assert r.returncode == 0, r.stderr
    for text in ("--dry-run", "--steps", "--out", "runs/gpu-check", "llama-7b", "bench/train_throughput.py"):
        assert text in r.stdout


@pytest.mark.parametrize("steps", ["a,x", ""])
def test_unknown_steps_are_refused(steps, tmp_path):
    r = gpu_check("--dry-run", "--steps", steps, "--out", str(tmp_path))
    assert r.returncode == 2 and "--steps" in r.stderr and "expected letters from a,b,c,d" in r.stderr, r.stderr
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check would start")
def test_without_a_gpu_only_the_dry_run_starts(tmp_path):
    r = gpu_check("--out", str(tmp_path))
    assert r.returncode == 2 and "sees no GPU" in r.stderr and "--dry-run" in r.stderr, r.stderr
    assert not (tmp_path / "report.json").exists()


def test_dry_run_accepts_every_steps_profile(prepared_data, tmp_path):
    r = gpu_check("--dry-run", "--gpus", "2", "--manifest", str(prepared_data), "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] and report["passed"]
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["a", "b", "c", "d"] and {s["status"] for s in steps.values()} == {"pass"}
    runs = {(s, name): run for s in steps for name, run in steps[s]["figures"].items()}
    # Two GPUs: the pipeline engine's profile is examined too, on both of them.
    assert set(runs) == {("a", "train"), ("a", "resume"), ("a", "pipeline"), ("b", "layers"), ("c", "train"),
                         ("d", "train")}
    for key, run in runs.items():
        assert run["preflight"] == "ok" and run["planned_gpu_gib"] > 0, (key, run)
    assert runs["a", "pipeline"]["gpus"] == 2 and "train.precision=bf16" in runs["a", "pipeline"]["overrides"]
    big = runs["d", "train"]
    assert "model.vocab_size=32000" in big["overrides"] and "train.attention_backend=flash" in big["overrides"]
    assert big["planned_host_gib"] > 100  # 7B optimizer states offloaded: this is what decides whether d runs
    # On one GPU the pipeline engine is left out, and the report says so.
    one = tmp_path / "one"
    r = gpu_check("--dry-run", "--steps", "a", "--manifest", str(prepared_data), "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped: needs 2 GPUs" in (one / "report.md").read_text()
    assert "step a: pass" in r.stdout


def test_a_failing_step_does_not_stop_the_next(prepared_data, tmp_path):
    # The manifest alone, away from its shards: every step's preflight finds the data missing.
    manifest = tmp_path / "elsewhere" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(prepared_data.read_text())
    out = tmp_path / "report"
    r = gpu_check("--dry-run", "--steps", "c,d", "--manifest", str(manifest), "--out", str(out))
    assert r.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("c", "fail"), ("d", "fail")]
    assert all("is listed but missing" in s["reason"] for s in report["steps"])
    assert "at least one step FAILED" in (out / "report.md").read_text()


def test_report_shows_every_figure_and_every_outcome(tmp_path):
    results = [
        StepResult("a", "demo path on the GPU", "pass", 192.4,
                   {"train": {"loss_first": 8.3125, "loss_last": 5.25, "tokens_per_s_median": 123456.7},
                    "pipeline_engine": "skipped: needs 2 GPUs"}),
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
    assert "| a | demo path on the GPU | pass | 3m 12s |" in md
    assert "| b | LLaMA-7B layer shape throughput | fail | 1m 01s |" in md
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
    from launch.gpu_check import bench_figures

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
def test_the_layer_shape_is_the_largest_the_planner_fits(gpu, most, tmp_path):
    from launch.gpu_check import Check, layer_shape
    from pipeline.plan import GPU_MEMORY

    assert layer_shape(Check(tmp_path, 1, gpu, GPU_MEMORY[gpu], None)) == most
