"""Profiles: every shipped one resolves; the 7B ones carry the LLaMA recipe; each mistake is one
line naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ProfileError, load_profile, parse_profile, resolve

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted((REPO / "ds_configs").glob("*.json"))
SEVEN_B = [p for p in PROFILES if p.name.startswith("7b_")]


def _world_sizes(path: Path) -> list[int]:
    raw = json.loads(path.read_text())
    hpz = raw.get("deepspeed", {}).get("zero_optimization", {}).get("zero_hpz_partition_size", 1)
    stages = raw.get("topology", {}).get("pipeline_stages", 1)
    base = max(hpz, stages)
    return [base, base * 2, base * 8]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_resolves(path):
    for world in _world_sizes(path):
        p = load_profile(path, world, vocab_size=4096)
        t = p.train
        assert p.global_batch_size == t.micro_batch_size * p.grad_accum_steps * p.data_parallel_size
        ds = p.deepspeed
        assert ds["train_batch_size"] == p.global_batch_size
        assert ds["train_micro_batch_size_per_gpu"] == t.micro_batch_size
        assert ds["gradient_accumulation_steps"] == p.grad_accum_steps
        assert "auto" not in json.dumps(p.resolved_dict())
        assert isinstance(t.steps, int) and t.steps > 0


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.name)
def test_7b_profiles_carry_the_llama_recipe(path):
    """Touvron et al. 2023 (LLaMA), table 2 and section 2.2, for 7B: 4M tokens per batch, peak
    learning rate 3e-4, 2000 warmup steps, cosine to 10 %, AdamW β=(0.9, 0.95), weight decay 0.1,
    gradient clipping 1.0, 2048-token context, 1T training tokens."""
    world = _world_sizes(path)[-1]
    p = load_profile(path, world)
    t, m = p.train, p.model
    assert (m.dim, m.n_layers, m.n_heads, m.ffn_dim, m.vocab_size) == (4096, 32, 32, 11008, 32000)
    assert 6.7e9 < m.num_params() < 6.8e9
    assert p.data.seq_len == 2048
    assert p.tokens_per_step == 4 * 2**20
    assert (t.lr, t.warmup_steps, t.min_lr_ratio, t.weight_decay, t.grad_clip) == (3e-4, 2000, 0.1, 0.1, 1.0)
    assert tuple(t.betas) == (0.9, 0.95)
    assert t.decay_steps == t.steps  # cosine over the whole run
    assert t.precision == "bf16" and p.deepspeed["bf16"]["enabled"] is True and p.deepspeed["fp16"]["enabled"] is False
    assert t.activation_checkpointing
    assert t.total_tokens == 10**12 and t.steps == -(-10**12 // (4 * 2**20)) and p.total_tokens >= 10**12


def test_engines_and_zero_stages():
    assert load_profile(REPO / "ds_configs/7b_zero3.json", 8).deepspeed["zero_optimization"]["stage"] == 3
    multi = load_profile(REPO / "ds_configs/7b_zero3_multinode.json", 64).deepspeed["zero_optimization"]
    assert multi["zero_hpz_partition_size"] == 8 and multi["reduce_bucket_size"] == 200_000_000
    pipe = load_profile(REPO / "ds_configs/7b_pipeline.json", 64)
    assert pipe.topology.engine == "pipeline" and pipe.data_parallel_size == 16
    assert pipe.deepspeed["zero_optimization"]["stage"] == 1 and pipe.deepspeed["data_types"]["grad_accum_dtype"] == "fp32"
    off = load_profile(REPO / "ds_configs/7b_zero3_offload.json", 2).deepspeed["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu"


def test_zero_engine_takes_its_stage_from_the_profile():
    def zero(*sets):
        return load_profile(REPO / "ds_configs/tiny_cpu.json", 2, ["topology.engine=zero", *sets], vocab_size=4096)

    assert zero().zero_stage == 3  # tiny_cpu.json says 3
    assert zero("deepspeed.zero_optimization.stage=\"auto\"").zero_stage == 3
    for stage in (1, 2):
        z = zero(f"deepspeed.zero_optimization.stage={stage}").deepspeed["zero_optimization"]
        # tiny_cpu.json's stage-3 tunables are "auto": nothing to derive below stage 3, so dropped
        assert z["stage"] == stage and not [k for k in z if k.startswith("stage3_")]
        assert z["reduce_bucket_size"] == 64 * 64  # "auto" → h², at every stage
    z2 = load_profile(REPO / "ds_configs/7b_zero2.json", 8)
    assert (z2.topology.engine, z2.zero_stage, z2.data_parallel_size) == ("zero", 2, 8)
    assert load_profile(REPO / "ds_configs/7b_zero3.json", 8).zero_stage == 3


def test_auto_bucket_sizes_follow_the_hidden_size():
    z = load_profile(REPO / "ds_configs/7b_zero3.json", 8).deepspeed["zero_optimization"]
    assert z["reduce_bucket_size"] == 4096**2
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert z["stage3_param_persistence_threshold"] == 10 * 4096


def test_overrides_and_token_budget():
    p = load_profile(REPO / "ds_configs/7b_zero3.json", 64, ["train.steps=20", "train.micro_batch_size=2"])
    assert p.train.steps == 20 and p.grad_accum_steps == 16
    p = load_profile(REPO / "ds_configs/7b_zero3.json", 64, ["train.total_tokens=8388608"])
    assert p.train.steps == 2
    p = load_profile(REPO / "ds_configs/7b_zero3.json", 64, ['deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}'])
    assert p.deepspeed["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_final_checkpoint_is_on_unless_switched_off():
    tiny = REPO / "ds_configs/tiny_cpu.json"
    assert load_profile(tiny, 2, vocab_size=4096).train.final_checkpoint is True
    p = load_profile(tiny, 2, ["train.final_checkpoint=false"], vocab_size=4096)
    assert p.train.final_checkpoint is False and p.resolved_dict()["train"]["final_checkpoint"] is False


def _tiny() -> dict:
    return json.loads((REPO / "ds_configs/tiny_cpu.json").read_text())


def _set(d: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    cur = d
    for k in parents:
        cur = cur.setdefault(k, {})
    if value is _DELETE:
        cur.pop(last, None)
    else:
        cur[last] = value
    return d


_DELETE = object()

# (change, world size, the field the one-line error must name)
MISTAKES = [
    ({"trian": {}}, 2, "trian"),
    ({"train.learning_rate": 1e-3}, 2, "train.learning_rate"),
    ({"train.micro_batch_size": "eight"}, 2, "train.micro_batch_size"),
    ({"train.lr": -1}, 2, "train.lr"),
    ({"train.precision": "bf32"}, 2, "train.precision"),
    ({"train.min_lr_ratio": 1.5}, 2, "train.min_lr_ratio"),
    ({"model.preset": "llama-70b"}, 2, "model.preset"),
    ({"model.dim": 100}, 2, "model.dim"),
    ({"model.n_kv_heads": 3}, 2, "model.n_kv_heads"),
    ({"topology.engine": "tensor"}, 2, "topology.engine"),
    ({"topology.pipeline_stages": 2}, 2, "topology.pipeline_stages"),
    ({"topology.engine": "pipeline", "topology.pipeline_stages": 2}, 3, "topology.pipeline_stages"),
    ({"train.grad_accum_steps": "auto", "train.global_batch_size": 20}, 2, "train.global_batch_size"),
    ({"train.global_batch_size": 32, "train.grad_accum_steps": 3}, 2, "train.grad_accum_steps"),
    ({"train.grad_accum_steps": "auto", "train.global_batch_tokens": 1000}, 2, "train.global_batch_tokens"),
    ({"data.seq_len": 512}, 2, "data.seq_len"),
    ({"train.steps": _DELETE}, 2, "train.steps"),
    ({"data.mixture": {"web": 0}}, 2, "data.mixture.web"),
    ({"deepspeed.optimizer": {"type": "Adam"}}, 2, "deepspeed.optimizer"),
    ({"deepspeed.zero_optimization.stage": 2}, 2, "deepspeed.zero_optimization.stage"),
    ({"topology.engine": "zero", "deepspeed.zero_optimization.stage": 0}, 2, "deepspeed.zero_optimization.stage"),
    ({"topology.engine": "zero", "topology.pipeline_stages": 2}, 2, "topology.pipeline_stages"),
    ({"topology.engine": "zero", "deepspeed.zero_optimization.stage": 2,
      "deepspeed.zero_optimization.stage3_prefetch_bucket_size": 5}, 2,
     "deepspeed.zero_optimization.stage3_prefetch_bucket_size"),
    ({"topology.engine": "zero", "deepspeed.zero_optimization.stage": 1,
      "deepspeed.zero_optimization.offload_param": {"device": "cpu"}}, 2, "deepspeed.zero_optimization.offload_param"),
    ({"topology.engine": "zero", "deepspeed.zero_optimization.stage": 2,
      "deepspeed.zero_optimization.zero_hpz_partition_size": 2}, 2, "deepspeed.zero_optimization.zero_hpz_partition_size"),
    ({"deepspeed.train_batch_size": 99}, 2, "deepspeed.train_batch_size"),
    ({"deepspeed.bf16": {"enabled": True}}, 2, "deepspeed.bf16.enabled"),
    ({"deepspeed.zero_optimization.stage3_prefetch_bucket_sise": 5}, 2, "deepspeed.zero_optimization.stage3_prefetch_bucket_sise"),
    ({"deepspeed.zero_optimization.zero_hpz_partition_size": 4}, 2, "deepspeed.zero_optimization.zero_hpz_partition_size"),
    ({"deepspeed.steps_per_print": "auto"}, 2, "deepspeed.steps_per_print"),
    ({"train.decay_steps": 10}, 2, "train.decay_steps"),
    ({"train.final_checkpoint": "sometimes"}, 2, "train.final_checkpoint"),
]


@pytest.mark.parametrize("change, world, field", MISTAKES, ids=[m[2] + f"-{i}" for i, m in enumerate(MISTAKES)])
def test_each_mistake_is_one_line_naming_the_field(tmp_path, change, world, field):
    raw = _tiny()
    for k, v in change.items():
        _set(raw, k, v)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError) as e:
        load_profile(path, world, vocab_size=4096)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"{path}: {field}"), msg


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train": {"steps": 3,}}')
    with pytest.raises(ProfileError, match=r"broken.json:1:\d+: not valid JSON"):
        load_profile(path, 1)


def test_several_mistakes_in_one_section_are_all_listed(tmp_path):
    raw = _set(_set(_tiny(), "train.lr", -1), "train.precision", "bf32")
    with pytest.raises(ProfileError) as e:
        parse_profile(raw, "x.json")
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["train.lr", "train.precision"]


def test_vocab_auto_needs_a_tokenizer():
    raw = parse_profile(_tiny(), "tiny.json")
    with pytest.raises(ProfileError, match=r"^tiny.json: model.vocab_size: .*tokenizer"):
        resolve(raw, "tiny.json", 2)
    assert resolve(raw, "tiny.json", 2, vocab_size=1024).model.vocab_size == 1024


@pytest.mark.parametrize("setting, line", [
    ("train.steps=abc", "train.steps: expected a valid integer or 'auto', got \"abc\""),
    ("train.precision=fp8", "train.precision: expected 'fp32', 'bf16' or 'fp16', got \"fp8\""),
    ("train.steps=-2", "train.steps: expected at least 1 optimizer step, or \"auto\" (got -2)"),  # was accepted
])
def test_a_bad_set_value_is_one_line_without_pydantic_internals(tmp_path, setting, line):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--profile", str(REPO / "ds_configs" / "tiny_cpu.json"),
                           "--out", str(tmp_path / "run"), "--set", setting], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode != 0
    assert proc.stderr == f"error: {REPO / 'ds_configs' / 'tiny_cpu.json'}: {line}\n", proc.stderr


def test_every_wrong_field_of_a_profile_is_a_line_of_the_trainer_error(tmp_path):
    """Two wrong settings: two lines, each an `error:` line (the second failed first: it had no prefix)."""
    profile = REPO / "ds_configs" / "tiny_cpu.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--profile", str(profile), "--out", str(tmp_path / "run"),
                           "--set", "train.steps=abc", "--set", "train.precision=fp8"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [f"error: {profile}: train.steps: expected a valid integer or 'auto', got \"abc\"",
                                        f"error: {profile}: train.precision: expected 'fp32', 'bf16' or 'fp16', got \"fp8\""], \
        proc.stderr
