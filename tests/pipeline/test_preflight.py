"""Preflight on a real prepared data set: all good passes; each broken thing is one line, and
all of them are listed together."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_profile, parse_profile, read_profile_json
from pipeline.preflight import checkpoint_bytes, main, run_preflight

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "ds_configs" / "tiny_cpu.json"


@pytest.fixture(scope="session")
def prep_dir(prepared_data) -> Path:
    """A directory written by `python -m data_prep run` (tests/conftest.py)."""
    return prepared_data.parent.parent


@pytest.fixture
def prep(prep_dir, tmp_path) -> Path:
    """A private copy to break."""
    dst = tmp_path / "prep"
    shutil.copytree(prep_dir / "shards", dst / "shards")
    shutil.copytree(prep_dir / "tokenizer", dst / "tokenizer")
    return dst


def _raw(*overrides):
    from pipeline.config import apply_overrides

    return parse_profile(apply_overrides(read_profile_json(TINY), list(overrides)), str(TINY))


def _vocab(prep: Path) -> int:
    return json.loads((prep / "shards" / "manifest.json").read_text())["tokenizer"]["vocab_size"]


def test_all_good(prep, tmp_path):
    manifest = prep / "shards" / "manifest.json"
    assert run_preflight(_raw(), manifest, tmp_path / "run", 2) == []
    resolved = load_profile(TINY, 2, vocab_size=_vocab(prep))
    assert run_preflight(resolved, manifest, tmp_path / "run", 2) == []
    for stage in (1, 2):  # the data-parallel engine at a lower ZeRO stage
        zero = _raw("topology.engine=zero", f"deepspeed.zero_optimization.stage={stage}")
        assert run_preflight(zero, manifest, tmp_path / "run", 2) == []
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_every_failure_is_listed_one_line_each(prep, tmp_path):
    manifest = prep / "shards" / "manifest.json"
    m = json.loads(manifest.read_text())
    shard = prep / "shards" / m["shards"][0]["path"]
    shard.unlink()  # a missing shard
    (prep / "tokenizer" / "tokenizer.model").write_bytes(b"not a tokenizer")  # another tokenizer
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run directory should be")
    raw = _raw("model.vocab_size=100", "topology.engine=pipeline", "topology.pipeline_stages=2")
    failures = run_preflight(raw, manifest, blocked / "run", 3)
    text = "\n".join(failures)
    assert all("\n" not in f for f in failures)
    assert f"shard {shard.name} is listed but missing" in text
    assert "model.vocab_size=100 is smaller than the tokenizer's" in text
    assert "sha256" in text and "not the manifest's" in text
    assert "not a SentencePiece model" in text
    assert "world size 3" in text and "pipeline_stages=2" in text
    assert "not writable" in text
    assert len(failures) >= 6


def test_batch_arithmetic(prep, tmp_path):
    raw = _raw("train.grad_accum_steps=auto", "train.global_batch_size=20")
    failures = run_preflight(raw, prep / "shards" / "manifest.json", tmp_path / "run", 2)
    assert len(failures) == 1 and "train.global_batch_size" in failures[0] and "micro_batch_size 8" in failures[0]


def test_validation_split_must_hold_a_sample_when_the_run_evaluates(prep, tmp_path):
    manifest = prep / "shards" / "manifest.json"
    tokens = json.loads(manifest.read_text())["splits"]["validation"]["tokens"]
    longer = [f"model.max_seq_len={tokens}", f"data.seq_len={tokens}"]
    lines = run_preflight(_raw(*longer, "train.eval_every=50"), manifest, tmp_path / "run", 2)
    assert lines == [f"data: {manifest}: the validation split holds {tokens} tokens, fewer than one sample of "
                     f"data.seq_len={tokens}; prepare more validation data or set train.eval_every=0"]
    assert run_preflight(_raw(*longer, "train.eval_every=0"), manifest, tmp_path / "run", 2) == []


def test_an_empty_validation_split_is_refused_when_the_run_evaluates(prep, tmp_path, capsys):
    """A small prepared set can get no validation document at all; evaluation then used to be
    off without a word. Through the CLI: one line saying how to get a split, nothing started."""
    manifest = prep / "shards" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert any(s["split"] == "validation" for s in m["shards"])
    m["shards"] = [s for s in m["shards"] if s["split"] != "validation"]  # as data prep writes a set without one
    m["splits"].pop("validation", None)
    manifest.write_text(json.dumps(m))
    args = ["--profile", str(TINY), "--out", str(tmp_path / "run"), "--world-size", "2", "--manifest", str(manifest)]
    assert main([*args, "--set", "train.eval_every=1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"preflight: data: {manifest}: the validation split is empty, but train.eval_every=1 evaluates; "
                   "prepare the data again with a larger shards.validation_fraction, or set train.eval_every=0 "
                   "to train without evaluation", "preflight: 1 problem(s); nothing was started"]
    assert main([*args, "--set", "train.eval_every=0"]) == 0  # the way to train without evaluation


def test_tokenizer_vocabulary_must_match_the_manifest(prep, tmp_path):
    manifest = prep / "shards" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["tokenizer"]["vocab_size"] += 1
    m["tokenizer"]["eos_id"] = 7
    manifest.write_text(json.dumps(m))
    text = "\n".join(run_preflight(_raw(), manifest, tmp_path / "run", 2))
    assert "vocabulary size is" in text and "eos_id is 2" in text


def test_missing_manifest_and_mixture(tmp_path):
    failures = run_preflight(_raw('data.mixture={"web": 1.0}'), tmp_path / "nope.json", tmp_path / "run", 2)
    assert len(failures) == 1 and "manifest not found" in failures[0]


def test_room_for_keep_last_checkpoints_and_a_conversion(prep, tmp_path, monkeypatch):
    import pipeline.preflight as pf

    resolved = load_profile(TINY, 2, vocab_size=_vocab(prep))
    one = checkpoint_bytes(resolved)
    assert one == resolved.model.num_params() * 12  # fp32 profile: weights 4 + Adam 8
    keep = resolved.train.keep_last
    assert keep == 2
    # Room for two checkpoints passed before; keep_last=2, the one being saved and a universal
    # copy need 3 checkpoints + 12 bytes per parameter. (Failed on the old check.)
    need = (keep + 1) * one + 12 * resolved.model.num_params()
    free = {"bytes": 2 * one}
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, free["bytes"]))
    manifest = prep / "shards" / "manifest.json"
    failures = run_preflight(resolved, manifest, tmp_path / "run", 2)
    assert len(failures) == 1 and "train.keep_last=2" in failures[0] and "universal" in failures[0], failures
    free["bytes"] = need
    assert run_preflight(resolved, manifest, tmp_path / "run", 2) == []
    # The checkpoints already there count as available: they are replaced or pruned in turn.
    old = tmp_path / "run" / "checkpoints" / "global_step10"
    old.mkdir(parents=True)
    (old / "shard.pt").write_bytes(b"\0" * 1000)
    free["bytes"] = need - 1000
    assert run_preflight(resolved, manifest, tmp_path / "run", 2) == []
    free["bytes"] = need - 1001
    assert len(run_preflight(resolved, manifest, tmp_path / "run", 2)) == 1


def test_a_run_that_saves_nothing_needs_no_checkpoint_space(prep, tmp_path, monkeypatch):
    """A benchmark (no periodic save within its steps, no final checkpoint) starts on a disk that
    holds no checkpoint of its model: the 7B layer-shape benchmark on a 64 GiB disk was refused
    for 119 GiB of checkpoints it would never write. (Failed before final_checkpoint was counted.)"""
    import pipeline.preflight as pf

    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    manifest = prep / "shards" / "manifest.json"
    vocab = _vocab(prep)
    no_save = ["train.final_checkpoint=false", "train.steps=10"]
    for every in ("0", "11"):
        profile = load_profile(TINY, 2, [*no_save, f"train.checkpoint_every={every}"], vocab_size=vocab)
        assert run_preflight(profile, manifest, tmp_path / "run", 2) == [], every
    # A periodic save within the run, or the final one, still needs its room.
    for saves in ([*no_save, "train.checkpoint_every=5"], ["train.steps=10", "train.checkpoint_every=0"]):
        failures = run_preflight(load_profile(TINY, 2, saves, vocab_size=vocab), manifest, tmp_path / "run", 2)
        assert len(failures) == 1 and failures[0].startswith("checkpoints:"), (saves, failures)


def test_cli(prep, tmp_path, capsys):
    manifest = str(prep / "shards" / "manifest.json")
    args = ["--profile", str(TINY), "--manifest", manifest, "--out", str(tmp_path / "run")]
    assert main(args + ["--gpus-per-node", "2"]) == 0
    assert "preflight: ok" in capsys.readouterr().out
    assert main(args + ["--world-size", "2", "--set", "train.global_batch_size=20",
                        "--set", "train.grad_accum_steps=auto"]) == 1
    err = capsys.readouterr().err
    assert "preflight: batch:" in err and "1 problem(s)" in err
    os.environ.pop("WORLD_SIZE", None)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
