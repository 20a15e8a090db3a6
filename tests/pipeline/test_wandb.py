"""Weights & Biases as an optional metrics sink (pipeline/metrics.py WandbRun), offline, no network."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from runs import REPO, cpu_env, run_deepspeed, train_losses, zero3_args
from pipeline.metrics import WANDB_MISSING

WANDB = ("--set", "train.wandb.project=tiny", "--set", "train.wandb.name=offline-test", "--set",
         "train.wandb.mode=offline", "--set", "train.steps=3", "--set", "train.eval_every=0",
         "--set", "train.checkpoint_every=0", "--set", "train.final_checkpoint=false")


def wandb_records(path: Path):
    """The protobuf records of a .wandb run file, read with W&B's own message types: LevelDB's log
    format, a 7-byte ':W&B' header, then 32 KiB blocks of records, each checksum (4 bytes),
    length (2), type (1: whole, 2-4: first, middle, last piece) and data."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def test_an_offline_wandb_run_holds_the_step_losses_and_the_profile(prepared_data, tmp_path):
    out = tmp_path / "run"
    run_deepspeed(zero3_args(prepared_data, out, *WANDB))
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # rank 0 only, under OUT/wandb, for `wandb sync`
    history, config = {}, None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[item["step"]] = item
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
            run = rec.run
    want = train_losses(out)
    assert sorted(history) == [1, 2, 3] and {s: history[s]["train/loss"] for s in history} == want
    assert "perf/tokens_per_s" in history[3] and "train/lr" in history[3]
    saved = json.loads((out / "profile.json").read_text())
    assert config["model"] == saved["model"] and config["train"]["wandb"]["mode"] == "offline"
    assert (run.display_name, run.project) == ("offline-test", "tiny")
    assert run.run_id == (out / "checkpoints" / "run_id").read_text().strip()  # a resume continues this W&B run


def test_wandb_not_installed_is_one_line(prepared_data, tmp_path):
    """Python's own way to make an import fail: None in sys.modules."""
    code = ("import sys; sys.modules['wandb'] = None; from pipeline.train import main; "
            f"sys.exit(main({zero3_args(prepared_data, tmp_path / 'run', *WANDB)[1:]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {WANDB_MISSING}", proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
