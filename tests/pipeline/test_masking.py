"""Document masking through both engines, 2 CPU ranks, the real launcher: a packed batch's loss
is the token-weighted mean of each document's loss run alone (pipeline/model.py Packing)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from runs import REPO, cpu_env, pipe_args, run_deepspeed, train_losses, zero3_args
from pipeline.data import Manifest, open_split
from pipeline.model import Transformer, ModelConfig

MASKING = ("--set", "train.document_masking=true", "--set", "train.reset_positions=true", "--set", "train.steps=1",
           "--set", "train.lr=1e-30", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0",
           "--set", "train.final_checkpoint=false")


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> Path:
    """Data whose windows pack many documents: each line of the package descriptions installed
    beside the trainer (the pinned packages' METADATA, real prose and markup, a few to a few
    dozen tokens each) is one, through the real data prep."""
    out = tmp_path_factory.mktemp("short")
    lines = [ln.strip() for f in sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/METADATA"))
             for ln in f.read_text(errors="replace").splitlines() if len(ln.strip()) > 20 and ":" not in ln[:20]]
    paragraphs = lines[:6000]
    (out / "in").mkdir()
    (out / "in" / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    config = {"sources": [{"name": "docs", "type": "jsonl", "paths": [str(out / "in")]}],
              "filters": {k: {"enabled": False} for k in ("language", "gopher_quality", "gopher_repetition", "c4",
                                                          "fineweb")},
              "tokenizer": {"vocab_size": 1024, "sample_bytes": 2_000_000},
              "shards": {"validation_fraction": 0.02}}
    (out / "prep.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(out / "prep.json"), "--out",
                    str(out / "data")], cwd=REPO, env=cpu_env(), check=True, capture_output=True, timeout=600)
    return out / "data" / "shards" / "manifest.json"


def documents_alone(model: Transformer, x: torch.Tensor, y: torch.Tensor, eos: int) -> tuple[float, int]:
    """Each document of each window on its own: its tokens from position 0, plain causal
    attention, its own next-token targets; (token-weighted mean loss, documents)."""
    total, count, docs = 0.0, 0, 0
    with torch.no_grad():
        for row_x, row_y in zip(x, y):
            ends = (row_x == eos).nonzero().flatten().tolist()
            for start, end in zip([0] + [e + 1 for e in ends], ends + [len(row_x) - 1]):
                if start <= end:
                    n = end + 1 - start
                    total += model(row_x[None, start:end + 1], row_y[None, start:end + 1]).item() * n
                    count, docs = count + n, docs + 1
    assert count == x.numel()
    return total / count, docs


@pytest.mark.parametrize("engine", ["zero3", "pipeline"])
def test_a_packed_batch_with_document_masking_is_each_document_alone(engine, short_documents, tmp_path):
    """(Before: train.document_masking did not exist, and attention crossed documents.)"""
    args = {"zero3": zero3_args, "pipeline": pipe_args}[engine]
    out = tmp_path / "run"
    run_deepspeed(args(short_documents, out, *MASKING))
    saved = json.loads((out / "profile.json").read_text())
    cfg = ModelConfig(**{k: v for k, v in saved["model"].items() if k != "preset"})
    manifest = Manifest.load(short_documents)
    x, y = open_split(manifest, "train", saved["data"]["seq_len"], saved["data"]["seed"]).batch(
        range(saved["train"]["global_batch_size"]))
    x, y = torch.from_numpy(x.astype("int64")), torch.from_numpy(y.astype("int64"))
    model = Transformer(cfg, seed=saved["train"]["seed"])  # the trainer's initial weights (lr 1e-30 keeps them)
    want, docs = documents_alone(model, x, y, manifest.tokenizer.eos_id)
    assert docs > 2 * len(x), docs  # the batch packs many documents, so the masking is exercised
    with torch.no_grad():
        crossing = model(x, y).item()
    got = train_losses(out)[1]
    assert got == pytest.approx(want, abs=2e-5, rel=0)
    assert abs(crossing - want) > 20 * 2e-5, (crossing, want)  # attention across documents is another loss
