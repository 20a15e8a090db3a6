"""Peak memory and time of `python -m pipeline.export` on a ZeRO-3 checkpoint of ~1.1B parameters.

    python bench/export_memory.py [--work /tmp/export_bench] [--world 4] [--dtype bf16] [--max-shard-size 1GB]

Training a 1B model just to get a checkpoint needs ~18 GB of CPU memory for fp32 weights and
AdamW moments and hours on a CPU, so the checkpoint is written directly in DeepSpeed's ZeRO-3
layout (`write_zero3_checkpoint`): per rank, `zero_pp_rank_R_mp_rank_00_model_states.pt` with the
same keys DeepSpeed 0.19 writes (param_shapes per optimizer group, empty module placeholders,
global_steps, dp_world_size, ds_config, ...) and `..._optim_states.pt` holding the rank's flat
fp32 partitions plus AdamW's exp_avg / exp_avg_sq of the same size, pickled with DeepSpeed's own
ZeroStageEnum and LossScaler objects. tests/pipeline/test_export.py checks that this writer's
files have the same structure as a real 2-process run's and that DeepSpeed's zero_to_fp32 reads
them to the same tensors as our reader. Weights are random; the tokenizer files are stubs (the
export copies them without reading them).

The export runs in a child process; its peak RSS (VmHWM, which includes the pages of memory-
mapped checkpoint files while they are mapped) and wall time are printed, also as ratios to the
fp32 model size and to the size of the checkpoint's files. The peer, DeepSpeed's own converter
(`zero_to_fp32.convert_zero_checkpoint_to_state_dict` to safetensors, same dtype and shard size),
is measured the same way on the same checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.hf import model_shapes  # noqa: E402
from pipeline.model import ModelConfig  # noqa: E402

# TinyLlama-1.1B's shape (dim 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000).
BENCH_MODEL = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, ffn_dim=5632,
                          max_seq_len=2048)


def optimizer_groups(shapes: dict) -> list[OrderedDict]:
    """Our optimizer's two groups (pipeline/optim.py): decayed matrices first, then norms."""
    decay = OrderedDict((n, torch.Size(s)) for n, s in shapes.items() if len(s) >= 2)
    no_decay = OrderedDict((n, torch.Size(s)) for n, s in shapes.items() if len(s) < 2)
    return [decay, no_decay]


def write_zero3_checkpoint(root: Path, cfg: ModelConfig, world: int, step: int = 1, profile: dict | None = None,
                           seed: int = 0) -> dict[str, torch.Tensor] | None:
    """A ZeRO-3 checkpoint `root/global_step{step}` of random weights, in DeepSpeed's file layout.

    Returns the full fp32 tensors when the model is small enough to keep (for tests), else None.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    tag = root / f"global_step{step}"
    tag.mkdir(parents=True)
    groups = optimizer_groups(model_shapes(cfg))
    keep = cfg.num_params() < 10**7
    full: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    # flats[r][k]: rank r's flat fp32 partition of group k, built parameter by parameter.
    flats = [[torch.empty(sum(math.ceil(s.numel() / world) for s in grp.values())) for grp in groups]
             for _ in range(world)]
    for k, grp in enumerate(groups):
        offset = 0
        for name, shape in grp.items():
            part = math.ceil(shape.numel() / world)
            value = torch.randn(shape.numel(), generator=g) * 0.02
            if keep:
                full[name] = value.view(shape).clone()
            padded = torch.cat([value, value.new_zeros(part * world - shape.numel())])
            for r in range(world):
                flats[r][k][offset:offset + part] = padded[r * part:(r + 1) * part]
            offset += part
            del value, padded
    h = cfg.dim
    ds_config = {"train_batch_size": 8 * world, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                       "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                                       "stage3_param_persistence_threshold": 10 * h},
                 "bf16": {"enabled": True}, "fp16": {"enabled": False}, "steps_per_print": 10**9,
                 "wall_clock_breakdown": False}
    for r in range(world):
        model_state = {
            "module": OrderedDict((n, torch.empty(0)) for n in model_shapes(cfg)),  # ZeRO-3 placeholders
            "buffer_names": [],
            "optimizer": None,
            "param_shapes": groups,
            "frozen_param_shapes": OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(),
            "lr_scheduler": {"base_lrs": [3e-4, 3e-4], "last_epoch": step, "_step_count": step + 1,
                             "_is_initial": False, "_get_lr_called_within_step": False,
                             "_last_lr": [3e-4, 3e-4], "lr_lambdas": [None, None]},
            "data_sampler": None,
            "random_ltd": None,
            "skipped_steps": 0,
            "global_steps": step,
            "global_samples": step * 8 * world,
            "dp_world_size": world,
            "mp_world_size": 1,
            "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": ds_config,
            "ds_version": "0.19.8",
            "step": step,  # the trainer's client state
        }
        torch.save(model_state, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        optim_state = {
            "optimizer_state_dict": {
                "zero_stage": ZeroStageEnum.weights,
                "loss_scaler": LossScaler(1.0),
                "dynamic_loss_scale": False,
                "overflow": False,
                "partition_count": world,
                "optimizer_state_dict": {
                    "state": {k: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(f),
                                  "exp_avg_sq": torch.zeros_like(f)} for k, f in enumerate(flats[r])},
                    "param_groups": [{"weight_decay": wd, "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                      "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                                      "differentiable": False, "fused": False, "decoupled_weight_decay": True,
                                      "initial_lr": 3e-4, "params": [k]} for k, wd in enumerate((0.1, 0.0))],
                },
                "fp32_flat_groups": flats[r],
            },
            "ds_config": ds_config,
            "ds_version": "0.19.8",
        }
        torch.save(optim_state, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        flats[r] = None  # free this rank's partitions before building the next file
    (root / "latest").write_text(f"global_step{step}\n")
    if profile is not None:
        (tag / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    return full if keep else None


def stub_prepared_data(root: Path, vocab_size: int) -> Path:
    """A manifest naming a small real SentencePiece model trained on this repository's docs (the
    export writes the transformers files from it); no shards."""
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import train_sentencepiece

    tok, shards = root / "tokenizer", root / "shards"
    shards.mkdir(parents=True)
    sample = root / "sample.txt"
    sample.write_text("\n".join(f.read_text() for f in sorted((REPO / "docs").glob("*.md"))))
    model = train_sentencepiece(sample, tok, TokenizerConfig(vocab_size=min(vocab_size, 1000)), threads=1)
    manifest = {"format": "arrow-token-shards", "version": 1, "column": "input_ids", "dtype": "uint16",
                "add_bos": True, "add_eos": True,
                "tokenizer": {"model": "../tokenizer/tokenizer.model",
                              "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                              "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2, "pad_id": -1, "unk_id": 0},
                "shards": [], "splits": {}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards / "manifest.json"


def bench_profile(cfg: ModelConfig, manifest: Path) -> dict:
    return {"model": {"preset": "custom", **cfg.to_dict()}, "data": {"manifest": str(manifest), "seq_len": cfg.max_seq_len},
            "train": {"global_batch_tokens": 8 * 2048}, "topology": {"engine": "zero3"},
            "deepspeed": {"zero_optimization": {"stage": 3}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/export_bench", help="scratch directory (removed first)")
    p.add_argument("--world", type=int, default=4, help="ranks the synthetic checkpoint is partitioned over")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and export afterwards")
    args = p.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cfg = BENCH_MODEL
    manifest = stub_prepared_data(work / "prep", cfg.vocab_size)
    t0 = time.perf_counter()
    write_zero3_checkpoint(work / "run" / "checkpoints", cfg, args.world, profile=bench_profile(cfg, manifest))
    build_s = time.perf_counter() - t0
    ckpt_bytes = sum(f.stat().st_size for f in (work / "run" / "checkpoints").rglob("*.pt"))
    fp32_bytes = cfg.num_params() * 4

    # Each converter runs in a fresh interpreter that reports its own VmHWM (peak RSS of its
    # address space since exec). ru_maxrss of a child is not used: Linux folds the forking
    # parent's RSS into it, and this parent just held the checkpoint it built.
    hwm = ("hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
           "print(json.dumps({'rc': rc, 'vmhwm_kb': int(hwm)}))")
    ours_code = "import json, sys; from pipeline.export import main; rc = main(sys.argv[1:]); " + hwm
    ours_cmd = [sys.executable, "-c", ours_code, "--checkpoint", str(work / "run"), "--out", str(work / "hf"),
                "--dtype", args.dtype, "--max-shard-size", args.max_shard_size]
    # The peer: DeepSpeed's own converter (the zero_to_fp32.py script's function) to safetensors.
    peer_code = ("import json, sys; from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict as c; "
                 "c(sys.argv[1], sys.argv[2], dtype=sys.argv[3], max_shard_size=sys.argv[4], safe_serialization=True); "
                 "rc = 0; " + hwm)
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    peer_cmd = [sys.executable, "-c", peer_code, str(work / "run" / "checkpoints"), str(work / "peer"),
                dtypes[args.dtype], args.max_shard_size]

    def measure(cmd: list[str]) -> tuple[int, float]:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{cmd[3:5]} failed:\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["rc"] != 0:
            sys.exit(proc.stderr)
        return report["vmhwm_kb"] * 1024, seconds

    peak, export_s = measure(ours_cmd)
    peer_peak, peer_s = measure(peer_cmd)
    shards = sorted((work / "hf").glob("model-*.safetensors"))
    largest = max(f.stat().st_size for f in shards)

    gib = 2**30
    print(f"model: {cfg.num_params() / 1e9:.3f}B parameters, fp32 {fp32_bytes / gib:.2f} GiB; "
          f"checkpoint ({args.world} ranks, weights + AdamW moments) {ckpt_bytes / gib:.2f} GiB, built in {build_s:.0f} s")
    print(f"export to {args.dtype}, {len(shards)} shards, largest {largest / gib:.2f} GiB")
    for name, pk, sec in (("ours (pipeline.export)", peak, export_s),
                          ("DeepSpeed zero_to_fp32", peer_peak, peer_s)):
        print(f"{name:24s} peak RSS {pk / gib:5.2f} GiB = {pk / fp32_bytes:.3f} x fp32 model = "
              f"{pk / ckpt_bytes:.3f} x checkpoint files = {pk / largest:.2f} x largest output shard | "
              f"time {sec:6.1f} s = {sec / (ckpt_bytes / gib):.2f} s per checkpoint GiB")
    print(f"ratio ours / DeepSpeed: peak RSS {peak / peer_peak:.2f}, time {export_s / peer_s:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
