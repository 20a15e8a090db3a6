"""Shared fixtures: real prepared data and real DeepSpeed runs through the launcher on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, cpu_env, pipe_args, run_deepspeed, zero3_args, zero_args


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """Real data prep on a few MB of the built-in corpus; returns the manifest path."""
    out = tmp_path_factory.mktemp("prep")
    config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
    config["sources"][0]["max_bytes"] = 6_000_000
    config["tokenizer"]["sample_bytes"] = 3_000_000
    config["shards"]["validation_fraction"] = 0.1  # enough validation tokens from a small corpus
    cfg = out / "prep.json"
    cfg.write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(cfg), "--out", str(out / "data")],
                   cwd=REPO, env=cpu_env(), check=True, capture_output=True, text=True, timeout=600)
    manifest = out / "data" / "shards" / "manifest.json"
    splits = json.loads(manifest.read_text())["splits"]
    assert splits["train"]["tokens"] > 100_000 and splits["validation"]["tokens"] > 2_000, splits
    return manifest


# The reference runs of both engines (8 steps, checkpoints at 4 and 8), one each per session:
# test_export.py exports them, test_train.py resumes and compares against them.

def _reference_run(tmp_path_factory, name: str, args) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    run_deepspeed(args(out))
    return out


@pytest.fixture(scope="session")
def zero3_run(prepared_data, tmp_path_factory) -> Path:
    return _reference_run(tmp_path_factory, "zero3", lambda out: zero3_args(prepared_data, out))


@pytest.fixture(scope="session")
def zero2_run(prepared_data, tmp_path_factory) -> Path:
    return _reference_run(tmp_path_factory, "zero2", lambda out: zero_args(2, prepared_data, out))


@pytest.fixture(scope="session")
def pipe_run(prepared_data, tmp_path_factory) -> Path:
    return _reference_run(tmp_path_factory, "pipe", lambda out: pipe_args(prepared_data, out))
