"""The launch scripts, through the real deepspeed launcher on the CPU (DS_ACCELERATOR=cpu, gloo):
both launch forms of launch/pretrain_7b.sh, and a two-node run simulated on this machine through
launch/slurm/pretrain_7b.sbatch (stand-ins for srun and scontrol start one launcher per "node",
each with one process, node ranks 0 and 1, rendezvous on 127.0.0.1)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, free_port

SCRIPT = REPO / "launch" / "pretrain_7b.sh"
SBATCH = REPO / "launch" / "slurm" / "pretrain_7b.sbatch"
TINY = str(REPO / "ds_configs" / "tiny_cpu.json")
STEPS = 3


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PATH=f"{Path(sys.executable).parent}:{env['PATH']}", **extra)
    return env


def _small(manifest: Path) -> list[str]:
    # Tiny model, short sequences, a few steps: each run is ~30-50 s on 2 cores, most of it start-up.
    return [f"--set=data.manifest={manifest}", f"--set=train.steps={STEPS}", "--set=train.micro_batch_size=2",
            "--set=data.seq_len=64", "--set=train.eval_every=0", "--set=train.checkpoint_every=0"]


def _trained(out: Path, log: str) -> None:
    assert (out / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}", log[-3000:]
    assert (out / "checkpoints" / f"global_step{STEPS}").is_dir()
    assert (out / "profile.json").is_file()
    assert re.search(rf"step {STEPS}/{STEPS} \| loss", log), log[-3000:]


def test_help_and_dry_run():
    for cmd in (["bash", str(SCRIPT), "--help"], ["bash", str(SBATCH), "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        assert r.returncode == 0 and "--profile" in r.stdout, r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--profile", TINY,
                        "--gpus-per-node", "2", "--master-port", "29999", "--out", "/tmp/x", "--set", "train.steps=1"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert "--num_gpus 2 --master_port 29999" in r.stdout and "--set train.steps=1" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--launcher", "slurm"], "--launcher must be pdsh, openmpi or mvapich"),
    (["--profile", "nope.json"], "no such file"),
    (["--node-rank", "1"], "--node-rank needs --hostfile"),
    (["--out"], "--out needs a value"),
])
def test_bad_options_are_one_line(args, message):
    r = subprocess.run(["bash", str(SCRIPT), "--profile", TINY, *args], capture_output=True, text=True, env=_env())
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_python_form_reads_the_same_defaults(tmp_path):
    """The Python part applies launch/env.sh exactly as bash's `source` does."""
    names = re.findall(r"^export (\w+)=", (REPO / "launch" / "env.sh").read_text(), re.M)
    clean = {k: v for k, v in os.environ.items() if k not in names}
    bash = subprocess.run(["bash", "-c", f"source {REPO}/launch/env.sh && env -0"], capture_output=True, env=clean)
    from_bash = dict(kv.split("=", 1) for kv in bash.stdout.decode().split("\0") if "=" in kv)
    code = (f"import os, re\nfor line in open({str(REPO / 'launch' / 'env.sh')!r}):\n"
            "    m = re.match(r'^export (\\w+)=\"\\$\\{\\1:-(.*)\\}\"', line)\n"
            "    if m: os.environ.setdefault(m.group(1), m.group(2))\n"
            f"print(repr({{k: os.environ[k] for k in {names!r}}}))")
    py = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, check=True)
    assert eval(py.stdout) == {k: from_bash[k] for k in names}  # noqa: S307 - our own repr
    # And the Python part of pretrain_7b.sh is that very loop.
    assert "m = re.match(r'^export (\\w+)=\"\\$\\{\\1:-(.*)\\}\"', line)" in SCRIPT.read_text()


@pytest.mark.slow
def test_bash_form_trains_two_processes(tmp_path, prepared_data):
    out = tmp_path / "run"
    r = subprocess.run(["bash", str(SCRIPT), "--profile", TINY, "--gpus-per-node", "2", "--master-port", str(free_port()),
                        "--out", str(out), *_small(prepared_data)],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _trained(out, r.stdout)
    assert "world 2 (data-parallel 2)" in r.stdout
    logs = list((out / "logs").glob("launch-node0-*.log"))
    assert len(logs) == 1 and f"step {STEPS}/{STEPS}" in logs[0].read_text()


@pytest.mark.slow
def test_deepspeed_form_trains_two_processes(tmp_path, prepared_data):
    out = tmp_path / "run"
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPT), "--profile", TINY,
                        "--out", str(out), *_small(prepared_data)],
                       capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _trained(out, r.stdout)
    assert "world 2 (data-parallel 2)" in r.stdout


FAKE_SCONTROL = """#!/bin/bash
# stand-in for `scontrol show hostnames LIST`
printf 'node0\\nnode1\\n'
"""
FAKE_SRUN = """#!/bin/bash
# stand-in for srun --ntasks-per-node=1: one task per node, SLURM_NODEID set, all at once
while [[ $1 == --* ]]; do shift; done
pids=()
for k in 0 1; do SLURM_NODEID=$k "$@" > "$FAKE_SRUN_LOGS/node$k.log" 2>&1 & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _slurm_env(tmp_path: Path, scontrol: str, srun: str, **extra) -> dict:
    """The environment of a batch job on this machine: stand-ins for scontrol and srun first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", scontrol), ("srun", srun)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = _env(SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", **extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


@pytest.mark.slow
def test_two_nodes_simulated_through_slurm_script(tmp_path, prepared_data):
    out = tmp_path / "run"
    env = _slurm_env(tmp_path, FAKE_SCONTROL, FAKE_SRUN, SLURM_JOB_NODELIST="node[0-1]", MASTER_PORT=str(free_port()),
                     FAKE_SRUN_LOGS=str(tmp_path))
    r = subprocess.run(["bash", str(SBATCH), "--profile", TINY, "--out", str(out), *_small(prepared_data)],
                       capture_output=True, text=True, env=env, timeout=600)
    logs = {k: (tmp_path / f"node{k}.log").read_text() for k in (0, 1) if (tmp_path / f"node{k}.log").exists()}
    assert r.returncode == 0, r.stdout + r.stderr + str({k: v[-2000:] for k, v in logs.items()})
    assert (out / "logs" / "hostfile-4242").read_text() == "node0 slots=1\nnode1 slots=1\n"
    _trained(out, logs[0])
    assert "world 2 (data-parallel 2)" in logs[0]
    assert "--no_ssh --node_rank 1" in logs[1] and "exit status 0" in logs[1]
    assert sorted(p.name for p in (out / "logs").glob("launch-node*.log"))[0].startswith("launch-node0-")


REQUEUE_SCONTROL = """#!/bin/bash
# stand-in for scontrol: `show hostnames LIST`, and `requeue JOB` recorded in $FAKE_SCONTROL_LOG
if [[ $1 == requeue ]]; then echo "$*" >> "$FAKE_SCONTROL_LOG"; exit 0; fi
printf 'node0\\n'
"""
STOPPED_SRUN = """#!/bin/bash
# stand-in for srun whose trainers a signal stopped early: they exit 0 and leave OUT/preempted
echo '{"step": 7, "signal": "SIGUSR1"}' > "$OUT_DIR/preempted"
"""
FINISHED_SRUN = """#!/bin/bash
# stand-in for srun whose trainers finished their steps
exit 0
"""


@pytest.mark.parametrize("srun, restarts, requeued, code", [
    (STOPPED_SRUN, "0", True, 0),      # failed first: a stopped run was never requeued
    (STOPPED_SRUN, "20", False, 1),    # MAX_REQUEUES reached: stop, and say so
    (FINISHED_SRUN, "0", False, 0),    # a finished run is not requeued
])
def test_slurm_script_requeues_a_run_stopped_by_a_signal(tmp_path, srun, restarts, requeued, code):
    """The batch file's end: the trainer side (SIGUSR1 → checkpoint, OUT/preempted, exit 0) is
    tested through the launcher in tests/pipeline/test_train.py."""
    log = tmp_path / "scontrol.log"
    env = _slurm_env(tmp_path, REQUEUE_SCONTROL, srun, SLURM_JOB_NODELIST="node0", SLURM_RESTART_COUNT=restarts,
                     FAKE_SCONTROL_LOG=str(log))
    r = subprocess.run(["bash", str(SBATCH), "--profile", TINY, "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == code, r.stdout + r.stderr
    assert (log.read_text() == "requeue 4242\n") if requeued else not log.exists()
    if requeued:
        assert "stopped early" in r.stdout and "requeueing job 4242 (restart 1)" in r.stdout
    if restarts == "20":
        assert "requeued 20 times already (MAX_REQUEUES)" in r.stderr
