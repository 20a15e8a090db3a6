"""Helpers for tests that run real DeepSpeed processes through the launcher on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The deepspeed launcher installed next to the interpreter running the tests.
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free TCP port for a launcher or a Ray head to bind seconds later. Chosen at random below
    the kernel's ephemeral range: no socket the kernel numbers itself (gloo's, Ray's, those of a
    test in another pytest-xdist worker) can take it in the meantime, and parallel workers,
    each with its own random state, rarely pick the same one."""
    high = _ephemeral_ports_start()
    for _ in range(200):
        port = random.randrange(max(1024, high - 12000), high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port found below {high}")


def bench_module(name: str):
    """bench/NAME.py imported as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::FutureWarning")
    env.update(extra)
    return env


def run_deepspeed(module_args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module pipeline.train ARGS` on the CPU, output captured."""
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           "--module", *module_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    proc.master_port = port
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-6000:]}")
    # Every launch of the suite is also a check of a clean end: no rank may abort while exiting
    # (the C++ teardown race that pipeline/distributed.py exit_process avoids).
    assert "terminate called" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


def _not_json(constant: str):
    raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, parsed as strict JSON (NaN or Infinity fail)."""
    return [json.loads(line, parse_constant=_not_json) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}




# --- the suite's reference runs (shared by test_train.py and test_export.py through conftest.py)

STEPS = 8


def common(manifest: Path, out: Path, *extra: str) -> list[str]:
    sets = {"data.manifest": str(manifest), "train.steps": STEPS, "train.warmup_steps": 2, "train.decay_steps": STEPS,
            "train.log_every": 1, "train.checkpoint_every": 4, "train.eval_every": 4, "train.eval_batches": 1}
    args = ["pipeline.train", "--out", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def zero3_args(manifest, out, *extra):
    return common(manifest, out, "--profile", "ds_configs/tiny_cpu.json", "--set", "train.micro_batch_size=4",
                  "--set", "train.grad_accum_steps=2", *extra)


def pipe_args(manifest, out, *extra):
    return common(manifest, out, "--profile", "ds_configs/tiny_cpu_pipeline.json", "--set", "train.micro_batch_size=8",
                  "--set", "train.grad_accum_steps=2", *extra)


def zero_args(stage, manifest, out, *extra):
    """The ZeRO-3 run's arguments at another ZeRO stage of the data-parallel engine."""
    return zero3_args(manifest, out, "--set", "topology.engine=zero", "--set", f"deepspeed.zero_optimization.stage={stage}",
                      *extra)
