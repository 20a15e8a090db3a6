"""The peer for bench/train_throughput.py: a bare DeepSpeed loop doing the same work as our
trainer, and nothing else.

The same work: the same model built the same way for the profile's topology (ZeRO-3: the plain
Transformer under zero.Init; pipeline: the PipelineModule of pipeline.engines.pipe), the same
block preparation (`prepare_blocks`: attention backend, activation checkpointing, compile), the
same optimizer (`build_optimizer`, DeepSpeed's CPU Adam when the optimizer is offloaded), the
same DeepSpeed config and the same token windows per data-parallel rank. Nothing else: no
metrics, no loss all-reduce, no checkpoints, no fault handling, no progress line.

    deepspeed --num_gpus 2 bench/bare_deepspeed_loop.py --profile P --manifest M --steps N --out times.json

Rank 0 writes {"step_times": [seconds per optimizer step], "peak_mem_gib": GiB or null} to --out
(peak: torch.cuda.max_memory_allocated on a GPU, null on the CPU).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from peer_args import peer_parser  # noqa: E402
from pipeline.config import Profile, load_profile  # noqa: E402
from pipeline.data import Manifest, micro_batch_positions, open_split  # noqa: E402
from pipeline.distributed import exit_process, init_distributed, shutdown  # noqa: E402
from pipeline.engines.blocks import prepare_blocks  # noqa: E402
from pipeline.engines.pipe import build_pipeline_module  # noqa: E402
from pipeline.engines.zero import build_model  # noqa: E402
from pipeline.optim import build_optimizer, optimizer_offloaded  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = peer_parser(__doc__)
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def initialize(module, profile: Profile):
    opt, sched = build_optimizer(module.named_parameters(), profile.train, optimizer_offloaded(profile.deepspeed))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=profile.deepspeed,
                                      dist_init_required=False)
    return engine


def zero_engine(profile: Profile):
    # The trainer's model build (zero.Init at stage 3, the local device below), blocks prepared before wrapping.
    model = build_model(profile, None)
    prepare_blocks(enumerate(model.layers), profile.train)
    return initialize(model, profile)


def pipeline_engine(profile: Profile):
    # build_pipeline_module applies prepare_blocks to this stage's blocks and sets the loss.
    return initialize(build_pipeline_module(profile.model, profile.topology.pipeline_stages, profile.train), profile)


def zero_step(engine, batches) -> None:
    for x, y in batches:
        loss = engine(torch.from_numpy(x).to(engine.device), torch.from_numpy(y).to(engine.device))  # the model's loss
        engine.backward(loss)
        engine.step()  # the optimizer runs at the accumulation boundary
    loss.item()  # wait for the device, as the trainer's loss read does


def pipeline_step(engine, batches) -> None:
    it = ((torch.from_numpy(x).to(engine.device), torch.from_numpy(y).to(engine.device)) for x, y in batches)
    float(engine.train_batch(data_iter=it))


def main() -> None:
    args = parse_args()
    init_distributed()  # the trainer's own: gloo on the CPU, and no shared-memory leftovers
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    manifest = Manifest.load(args.manifest)
    profile = load_profile(args.profile, world, [*args.overrides, f"data.manifest={args.manifest}"],
                           vocab_size=manifest.tokenizer.vocab_size)
    t = profile.train
    torch.manual_seed(t.seed)
    pipe = profile.topology.engine == "pipeline"
    engine = pipeline_engine(profile) if pipe else zero_engine(profile)
    dp_rank = engine.grid.get_data_parallel_rank() if pipe else rank
    step_fn = pipeline_step if pipe else zero_step
    samples = open_split(manifest, "train", profile.data.seq_len, profile.data.seed, profile.data.mixture)
    mb, dp, accum, gbs = t.micro_batch_size, profile.data_parallel_size, profile.grad_accum_steps, profile.global_batch_size
    times = []
    for step in range(args.steps):
        tic = time.perf_counter()
        step_fn(engine, [samples.batch(micro_batch_positions(step * gbs, m, dp_rank, mb, dp)) for m in range(accum)])
        times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_times": times, "peak_mem_gib": peak}))
    shutdown()  # the trainer's end: every rank done, then the process group torn down


if __name__ == "__main__":
    main()
    exit_process(0)  # as the trainer: no interpreter teardown racing gloo's threads (the exit -6)
