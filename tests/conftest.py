"""Shared fixtures: real prepared data and real DeepSpeed runs through the launcher on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import reference
from runs import REPO, STEPS, cpu_env, pipe_args, run_deepspeed, zero3_args, zero_args


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


@pytest.fixture(scope="session")
def reference_losses(zero3_run):
    """`reference_losses(**defect)`: the losses of tests/reference.py's training (transformers'
    LLaMA, torch AdamW, written from the contracts) over the reference runs' 8 steps, with the
    ZeRO-3 run's resolved profile and the trainer's initial weights; `defect`: a `Recipe` field
    that puts in a defect the suite's bounds must catch. Each variant is trained once a session."""
    from pipeline.model import ModelConfig, Transformer

    profile = json.loads((zero3_run / "profile.json").read_text())
    model = {k: v for k, v in profile["model"].items() if k != "preset"}
    # The trainer draws its initial weights from the seed (pipeline.model); only they are taken from it.
    weights = Transformer(ModelConfig(**model), seed=profile["train"]["seed"]).state_dict()
    cache = {}

    def losses(**defect) -> dict[int, float]:
        key = tuple(sorted(defect.items()))
        if key not in cache:
            recipe = reference.Recipe.of(profile, **defect)
            cache[key] = reference.train(Path(profile["data"]["manifest"]), model, weights, recipe, STEPS)
        return cache[key]

    return losses
