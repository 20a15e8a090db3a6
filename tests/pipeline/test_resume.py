"""What a resume accepts and refuses (pipeline/resume.py), through the trainer's command line.

Every refusal must come before anything is converted, loaded or written: one line naming the
fields with both values, exit code 2, and the run directory exactly as it was.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import REPO, STEPS, cpu_env, run_deepspeed, train_losses, zero3_args, zero_args
from pipeline.resume import ALLOWABLE, REFUSED, differences


def _snapshot(run: Path) -> dict[str, bytes | None]:
    """Every file under the run directory, with the bytes of the small ones."""
    return {str(p.relative_to(run)): (p.read_bytes() if p.stat().st_size < 100_000 else None)
            for p in sorted(run.rglob("*")) if p.is_file()}


def _copy(zero3_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(zero3_run, out)
    return out


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    """The trainer without a launcher (a world of one); a refusal needs no process group."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)


def _refused(proc: subprocess.CompletedProcess, run: Path, before: dict) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: cannot resume")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert _snapshot(run) == before  # no profile.json rewrite, no universal copy, nothing staged
    return lines[0]


def test_a_resume_refuses_another_window_length_model_or_zero_stage(prepared_data, zero3_run, tmp_path):
    """The saved sample position means other tokens at another data.seq_len; another preset does
    not load; another ZeRO stage is another optimizer-state layout. (Before: seq_len passed
    silently, the preset died in load_state_dict, and each attempt rewrote OUT/profile.json.)"""
    run = _copy(zero3_run, tmp_path)
    before = _snapshot(run)
    tag = f"{run / 'checkpoints' / f'global_step{STEPS}'}"
    line = _refused(_one_process(zero3_args(prepared_data, run, "--set", "data.seq_len=64")), run, before)
    assert line == (f"error: cannot resume {tag}: data.seq_len: checkpoint 128, now 64; "
                    "to change it deliberately: --allow-change data.seq_len")
    line = _refused(_one_process(zero3_args(prepared_data, run, "--set", "model.preset=small")), run, before)
    assert "model.dim: checkpoint 64, now " in line and "model.n_layers: checkpoint 2, now " in line, line
    assert line.endswith("use another --out to start a new run")
    line = _refused(_one_process(zero_args(2, prepared_data, run)), run, before)
    assert "deepspeed.zero_optimization.stage: checkpoint 3, now 2" in line and "topology.engine" not in line, line
    # A field a checkpoint cannot change is not allowable either.
    proc = _one_process(zero3_args(prepared_data, run, "--allow-change", "model.dim"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --allow-change model.dim: a checkpoint cannot be loaded with another value; allowable: data.seq_len")
    assert _snapshot(run) == before


def test_another_engine_is_refused_before_any_conversion(prepared_data, zero3_run, tmp_path):
    """The pipeline engine resuming a ZeRO run, through the launcher on 2 ranks. (Before: it
    converted to a universal checkpoint, left the copy behind and died in DeepSpeed's
    AssertionError in state_dict_factory.check_ckpt_list.)"""
    run = _copy(zero3_run, tmp_path)
    before = _snapshot(run)
    args = zero3_args(prepared_data, run, "--profile", "ds_configs/tiny_cpu_pipeline.json",
                      "--set", "train.micro_batch_size=8")
    proc = run_deepspeed(args, check=False)
    line = _refused(proc, run, before) if proc.returncode == 2 else pytest.fail(proc.stderr[-3000:])
    assert 'topology.engine: checkpoint "zero", now "pipeline"' in line, line
    assert "converting" not in proc.stdout


def test_data_with_another_tokenizer_is_refused(zero3_run, tmp_path):
    """Another vocabulary: the ids of the new data mean other tokens. (Before: a tensor size
    mismatch deep in the load.)"""
    config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
    config["sources"][0]["max_bytes"] = 1_500_000
    config["tokenizer"].update(vocab_size=2048, sample_bytes=1_000_000)
    (tmp_path / "prep.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(tmp_path / "prep.json"), "--out",
                    str(tmp_path / "data")], cwd=REPO, env=cpu_env(), check=True, capture_output=True, timeout=600)
    run = _copy(zero3_run, tmp_path)
    before = _snapshot(run)
    line = _refused(_one_process(zero3_args(tmp_path / "data" / "shards" / "manifest.json", run)), run, before)
    saved = json.loads((run / "profile.json").read_text())
    assert f"model.vocab_size: checkpoint {saved['model']['vocab_size']}, now 2048" in line, line
    assert f"tokenizer.sha256: checkpoint \"{saved['tokenizer']['sha256']}\", now \"" in line, line


def test_a_deliberate_longer_context_resumes_and_is_recorded(prepared_data, zero3_run, tmp_path):
    """--allow-change data.seq_len: the run continues from the checkpoint with the new windows,
    says so, and its next checkpoint records the new length."""
    run = _copy(zero3_run, tmp_path)
    proc = run_deepspeed(zero3_args(prepared_data, run, "--set", "data.seq_len=192", "--set", f"train.steps={STEPS + 1}",
                                    "--allow-change", "data.seq_len"))
    assert (f"resuming global_step{STEPS} with deliberate changes (--allow-change): "
            "data.seq_len: checkpoint 128, now 192") in proc.stdout
    losses = train_losses(run)
    assert STEPS + 1 in losses and losses[STEPS + 1] == pytest.approx(losses[STEPS], abs=1.0)
    saved = json.loads((run / "checkpoints" / f"global_step{STEPS + 1}" / "profile.json").read_text())
    assert saved["data"]["seq_len"] == 192 and json.loads((run / "profile.json").read_text())["data"]["seq_len"] == 192


def test_a_resume_without_init_from_after_an_init_from_run_is_refused(prepared_data, tmp_path):
    """An --init-from run resumed without --init-from would rebuild the preset's model from the
    profile (before: silently, when the shapes happened to match)."""
    import transformers

    from pipeline.data import Manifest
    from pipeline.import_hf import import_hf

    tok = Manifest.load(prepared_data).tokenizer
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "published")
    for f in tok.directory.iterdir():
        shutil.copy(f, tmp_path / "published" / f.name)
    import_hf(tmp_path / "published", tmp_path / "init", base_model="org/base-3", license="llama3.2")
    run = tmp_path / "run"
    args = zero3_args(prepared_data, run, "--set", "train.eval_every=0", "--set", "train.grad_accum_steps=4")
    first = _one_process([*args, "--set", "train.steps=1", "--init-from", str(tmp_path / "init")])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)
    line = _refused(_one_process([*args, "--set", "train.steps=2"]), run, before)
    assert 'base_model: checkpoint "org/base-3", now none' in line, line
    assert "model.rope_theta: checkpoint 500000.0, now 10000.0" in line, line
    # With the same --init-from the resume goes on (the base's weights are not read again).
    again = _one_process([*args, "--set", "train.steps=2", "--init-from", str(tmp_path / "init")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(train_losses(run)) == [1, 2]


def test_every_compared_field_is_named_once_and_old_checkpoints_without_a_tokenizer_record_resume():
    saved = {"topology": {"engine": "zero3"}, "deepspeed": {"zero_optimization": {"stage": 3}},
             "train": {"precision": "bf16"}, "data": {"seq_len": 128},
             "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 176, "vocab_size": 4096,
                       "fused_projections": False, "max_seq_len": 256, "norm_eps": 1e-5, "rope_theta": 1e4,
                       "rope_scaling": None, "init_std": 0.02, "preset": "tiny"}}
    now = json.loads(json.dumps(saved))
    now["topology"]["engine"] = "zero"  # the engine's older name is the same engine
    now["model"].update(preset="other", init_std=0.5)  # neither matters to a loaded checkpoint
    now["tokenizer"] = {"sha256": "ab"}
    assert differences(saved, now) == []
    now["base_model"] = {"base_model": "org/x"}
    assert differences(saved, now) == ['base_model: checkpoint none, now "org/x"']
    assert differences(saved, now, ["base_model"]) == []
    assert len(set(REFUSED) | set(ALLOWABLE)) == len(REFUSED) + len(ALLOWABLE)
