"""bench/train_throughput.py's GPU mode, checked without a GPU: argument handling and the three
runs' resolved profiles (--dry-run), and the plain PyTorch peer on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

from runs import REPO, bench_module, cpu_env


def bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/train_throughput.py", *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_dry_run_plans_three_runs_on_the_7b_layer_shape(tmp_path):
    proc = bench("--gpu-7b-layers", "3", "--micro-batch", "2", "--no-activation-checkpointing",
                 "--manifest", str(tmp_path / "manifest.json"), "--set", "train.lr=1e-4", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = {line.split(":", 1)[0]: line for line in proc.stdout.splitlines() if not line.startswith(" ")}
    resolved = [line for line in proc.stdout.splitlines() if line.startswith("  resolved:")]
    assert "--module pipeline.train" in plan["ours"] and "--num_gpus 1" in plan["ours"]
    assert "bench/bare_deepspeed_loop.py" in plan["bare_deepspeed"] and "--num_gpus 1" in plan["bare_deepspeed"]
    assert "bench/plain_torch_loop.py" in plan["plain_pytorch"] and "deepspeed" not in plan["plain_pytorch"]
    assert len(resolved) == 3
    for line in resolved:
        assert "3 layers, dim 4096, FFN 11008, 32 heads, vocab 32000, seq 4096 (max 4096)" in line
        assert "micro-batch 2 × accumulation 1, bf16, activation checkpointing False, attention flash" in line
        # The chunked loss the planner's memory assumes, and no checkpoint: a benchmark measures.
        assert "loss chunk 4096," in line and "final checkpoint False" in line
    assert all("--set train.lr=1e-4" in plan[name] for name in ("ours", "bare_deepspeed", "plain_pytorch"))


def test_gpu_dry_run_refuses_a_bad_override_in_one_line(tmp_path):
    proc = bench("--gpu-7b-layers", "2", "--set", "data.seq_len=8192", "--manifest", str(tmp_path / "m.json"),
                 "--dry-run")
    assert proc.returncode == 1
    profile = REPO / "ds_configs/7b_zero3.json"
    assert proc.stderr.strip().splitlines() == [
        f"error: {profile}: data.seq_len: exceeds model.max_seq_len=4096 (got 8192)"]


def test_gpu_json_report_has_exactly_the_documented_keys(tmp_path):
    tt = bench_module("train_throughput")
    args = tt.parse_args(["--gpu-7b-layers", "2", "--json", str(tmp_path / "gpu.json")])
    profile = tt.load_profile(tt.REPO / tt.GPU_PROFILE, 1, tt.run_overrides(30, tt.gpu_overrides(2, 1, True, [], 4096)))
    outputs = {name: {"label": name, "step_times": [2.0, 1.0, 3.0], "peak_mem_gib": 10.0}
               for name in ("ours", "bare_deepspeed", "plain_pytorch")}
    outputs["plain_pytorch"]["sdpa_backend"] = "unknown"  # the profiler saw no SDPA operator
    tt.report_gpu(args, profile, outputs)
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert set(doc) == {"device", "shape", "results", "sdpa_backend"}
    assert doc["shape"] == {"dim": 4096, "ffn_dim": 11008, "n_heads": 32, "n_layers": 2, "seq_len": 4096,
                            "micro_batch_size": 1, "precision": "bf16"}
    assert [r["name"] for r in doc["results"]] == ["ours", "bare_deepspeed", "plain_pytorch"]
    ours = doc["results"][0]
    assert set(ours) == {"name", "step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gib"}
    assert ours["step_time_s"] == 2.0 and ours["tokens_per_s"] == 4096 / 2.0 and ours["peak_mem_gib"] == 10.0
    assert doc["sdpa_backend"] == "flash"  # the one kernel the profile allows


def test_json_needs_gpu_mode():
    proc = bench("--json", "x.json")
    assert proc.returncode == 2 and "--json is written in GPU mode" in proc.stderr


def test_plain_pytorch_loop_trains_and_reads_the_sdpa_kernel(prepared_data, tmp_path):
    out = tmp_path / "plain.json"
    proc = subprocess.run([sys.executable, "bench/plain_torch_loop.py", "--profile", "ds_configs/tiny_cpu.json",
                           "--manifest", str(prepared_data), "--steps", "2", "--out", str(out),
                           "--set", "train.attention_backend=math", "--set", "train.activation_checkpointing=true"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["step_times"]) == 2 and result["peak_mem_gib"] is None and result["device"] == "cpu"
    assert result["sdpa_backend"] == "math"  # the one kernel allowed, read off the profiler
