"""The peer for bench/train_throughput.py: the bare DeepSpeed loop on the same model, the same
DeepSpeed config and the same token windows, with nothing else (no metrics, no checkpoints,
no fault handling, no progress line). Launched by the benchmark through the deepspeed launcher.

    deepspeed --num_gpus 2 bench/bare_deepspeed_loop.py --profile P --manifest M --steps N --out times.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_profile  # noqa: E402
from pipeline.data import Manifest, micro_batch_positions, open_split  # noqa: E402
from pipeline.model import Transformer, causal_lm_loss  # noqa: E402
from pipeline.optim import build_optimizer  # noqa: E402
from pipeline.distributed import init_distributed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    init_distributed()  # the trainer's own: gloo on the CPU, and no shared-memory leftovers
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    manifest = Manifest.load(args.manifest)
    profile = load_profile(args.profile, world, [*args.overrides, f"data.manifest={args.manifest}"],
                           vocab_size=manifest.tokenizer.vocab_size)
    t = profile.train
    torch.manual_seed(t.seed)
    with deepspeed.zero.Init(config_dict_or_path=profile.deepspeed):
        model = Transformer(profile.model, seed=t.seed)
    # The same optimizer and schedule as the trainer, so the comparison measures the loop alone.
    opt, sched = build_optimizer(model.named_parameters(), t)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=profile.deepspeed)
    samples = open_split(manifest, "train", profile.data.seq_len, profile.data.seed)
    mb, accum, gbs = t.micro_batch_size, profile.grad_accum_steps, profile.global_batch_size
    times = []
    for step in range(args.steps):
        tic = time.perf_counter()
        batches = [samples.batch(micro_batch_positions(step, m, rank, mb, world, gbs)) for m in range(accum)]
        for x, y in batches:
            loss = causal_lm_loss(engine(torch.from_numpy(x).to(engine.device)), torch.from_numpy(y).to(engine.device))
            engine.backward(loss)
            engine.step()
        loss.item()
        times.append(time.perf_counter() - tic)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_times": times}))


if __name__ == "__main__":
    main()
