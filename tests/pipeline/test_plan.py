"""The planner: every shipped profile plans; its model-state memory is DeepSpeed's own estimate;
what does not fit is refused with a way out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pipeline.config import load_profile
from pipeline.model import PRESETS, Transformer
from pipeline.plan import GPU_MEMORY, Layout, main, make_plan, memory

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_plans(path, capsys):
    rc = main(["--profile", str(path), "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100-80gb"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for needle in ("parameters", "FLOPs per token", "tokens per step", "steps =", "GPU-hours", "verdict          fits",
                   "with activation checkpointing", "without"):
        assert needle in out, needle


@pytest.mark.parametrize("preset,vocab,fused", [("tiny", None, False), ("small", None, False), ("llama-1b", None, False),
                                               ("small", 512, False), ("small", 512, True)])
def test_layout_matches_the_built_model(preset, vocab, fused):
    # "small" with a 512-token vocabulary: a block weight is the largest, w1 unfused, w13 fused.
    cfg = dataclasses.replace(PRESETS[preset], vocab_size=vocab or PRESETS[preset].vocab_size, fused_projections=fused)
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layout = Layout.of(cfg)
    assert (layout.total_params, layout.largest_layer_params) == (total, largest)


@pytest.mark.parametrize("profile, nodes, gpn, overrides", [
    ("7b_zero3.json", 8, 8, []),
    ("7b_zero3.json", 1, 8, []),
    ("7b_zero3.json", 4, 4, ["train.micro_batch_size=2"]),
    ("7b_zero3_offload.json", 1, 2, []),
    ("7b_zero3_offload.json", 1, 4, ['deepspeed.zero_optimization.offload_param={"device": "cpu"}']),
])
def test_model_states_agree_with_deepspeeds_estimator(profile, nodes, gpn, overrides):
    p = load_profile(REPO / "ds_configs" / profile, nodes * gpn, overrides)
    m = memory(p, nodes, gpn)
    zero = p.deepspeed["zero_optimization"]
    off_opt = zero.get("offload_optimizer", {}).get("device") == "cpu"
    off_param = zero.get("offload_param", {}).get("device") == "cpu"
    layout = Layout.of(p.model)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(layout.total_params, layout.largest_layer_params, gpn, nodes,
                                                        cpu_offload=off_opt, cpu_offload_params=off_param)
    assert m.deepspeed_estimate == gpu
    assert m.model_states == pytest.approx(gpu, rel=1e-6)
    if off_opt:
        assert m.host_per_node == pytest.approx(cpu, rel=1e-6)


@pytest.mark.parametrize("nodes, gpn, offload", [(1, 8, False), (8, 8, False), (1, 4, True)])
def test_zero2_model_states_agree_with_deepspeeds_estimator(nodes, gpn, offload):
    over = ['deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}'] if offload else []
    p = load_profile(REPO / "ds_configs/7b_zero2.json", nodes * gpn, over)
    m = memory(p, nodes, gpn)
    _, gpu = estimate_zero2_model_states_mem_needs(Layout.of(p.model).total_params, gpn, nodes, cpu_offload=offload)
    assert m.deepspeed_estimate == gpu and m.estimator == "estimate_zero2_model_states"
    # DeepSpeed truncates 18·N/W to an integer; ours keeps the fraction.
    assert m.model_states == pytest.approx(gpu, abs=1)
    # (DeepSpeed's ZeRO-2 host figure, N·max(4·W, 16)·1.5, is not per-GPU states × GPUs per node
    # and grows with the world size; the planner keeps its ZeRO-3 convention for host memory.)


@pytest.mark.parametrize("nodes, gpn", [(1, 8), (8, 8)])
def test_zero1_keeps_the_16bit_gradients_whole(nodes, gpn):
    """DeepSpeed has no ZeRO-1 estimator: ZeRO-1 is its ZeRO-2 figure with the 16-bit gradients
    (2 bytes per parameter) whole instead of partitioned; ZeRO-3 partitions the weights as well."""
    world = nodes * gpn
    mem = {s: memory(load_profile(REPO / "ds_configs/7b_zero2.json", world, [f"deepspeed.zero_optimization.stage={s}"]),
                     nodes, gpn) for s in (1, 2, 3)}
    n = Layout.of(PRESETS["llama-7b"]).total_params
    assert mem[1].deepspeed_estimate is None
    assert mem[1].model_states == pytest.approx(mem[2].model_states + 2 * n * (1 - 1 / world))
    assert mem[1].model_states == pytest.approx(4 * n + 16 * n / world)
    assert mem[3].model_states < mem[2].model_states < mem[1].model_states
    assert "largest layer gathered" in mem[3].states and "largest layer gathered" not in mem[2].states


def test_7b_zero2_fits_one_node_and_a_higher_stage_is_a_way_out(capsys):
    assert main(["--profile", str(REPO / "ds_configs/7b_zero2.json"), "--nodes", "1", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "verdict          fits" in out and "DeepSpeed estimate_zero2_model_states" in out
    p = load_profile(REPO / "ds_configs/7b_zero2.json", 2)
    plan = make_plan(p, 1, 2, "h100-80gb", 0.4)
    assert not plan.fits
    assert any("deepspeed.zero_optimization.stage=3" in w for w in plan.ways_out), plan.ways_out


def test_hpz_copy_is_added_on_top_of_deepspeeds_estimate():
    p = load_profile(REPO / "ds_configs/7b_zero3_multinode.json", 64)
    m = memory(p, 8, 8)
    assert m.model_states - m.deepspeed_estimate == pytest.approx(2 * p.model.num_params() / 8)


def test_checkpointing_saves_activation_memory():
    p = load_profile(REPO / "ds_configs/7b_zero3.json", 64)
    m = memory(p, 8, 8)
    assert m.activations_checkpointed < m.activations_full / 5


def test_a_plan_that_does_not_fit_is_refused_with_a_way_out(capsys):
    args = ["--profile", str(REPO / "ds_configs/7b_zero3.json"), "--nodes", "1", "--gpus-per-node", "2",
            "--set", "train.activation_checkpointing=false"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "GiB per GPU" in out
    assert "cheapest way out activation checkpointing" in out
    assert "offload optimizer states to CPU" in out and "more GPUs" in out


def test_ways_out_actually_fit():
    p = load_profile(REPO / "ds_configs/7b_zero3.json", 1, ["train.activation_checkpointing=false"])
    plan = make_plan(p, 1, 1, "a100-40gb", 0.4, ["train.activation_checkpointing=false"])
    assert not plan.fits and plan.ways_out
    assert any("offload" in w for w in plan.ways_out)


def test_pipeline_refusal_suggests_more_stages():
    over = ["topology.pipeline_stages=1", "train.micro_batch_size=1"]
    p = load_profile(REPO / "ds_configs/7b_pipeline.json", 8, over)
    plan = make_plan(p, 1, 8, "a100-40gb", 0.4, over)
    assert not plan.fits
    assert any("pipeline_stages=" in w for w in plan.ways_out)


def test_bad_profile_and_hpz_mismatch(capsys):
    assert main(["--profile", str(REPO / "ds_configs/7b_pipeline.json"), "--nodes", "1", "--gpus-per-node", "6"]) == 2
    assert "topology.pipeline_stages" in capsys.readouterr().err
    assert main(["--profile", str(REPO / "ds_configs/7b_zero3_multinode.json"), "--nodes", "4",
                 "--gpus-per-node", "4"]) == 1
    assert "zero_hpz_partition_size=8 does not divide the 4 GPUs" in capsys.readouterr().out


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--gpus-per-node" in capsys.readouterr().out
    assert set(GPU_MEMORY) <= {"h100-80gb", "h100-pcie", "h200", "a100-80gb", "a100-40gb", "l40s"}


def test_chunked_loss_and_partial_checkpointing_in_the_activation_estimate():
    from pipeline.plan import activation_bytes

    cfg = PRESETS["llama-7b"]
    full = activation_bytes(cfg, 4, 4096, 32, checkpointing=True)
    chunked = activation_bytes(cfg, 4, 4096, 32, checkpointing=True, loss_chunk_tokens=4096)
    # 16384 tokens × 32000 × 6 bytes of logits (≈ 2.9 GiB) become one 4096-token chunk at 12 bytes
    # a value (≈ 1.5 GiB) plus the head's fp32 weight gradient (0.5 GiB).
    assert full - chunked == pytest.approx(16384 * 32000 * 6 - (4096 * 32000 * 12 + 4 * 32000 * 4096))
    half = activation_bytes(cfg, 4, 4096, 32, checkpointing=True, checkpoint_every=2)
    none = activation_bytes(cfg, 4, 4096, 32, checkpointing=False)
    assert full < half < none
