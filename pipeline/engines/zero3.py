"""ZeRO stage 3 data parallelism: parameters, gradients and optimizer states sharded over all ranks."""

from __future__ import annotations

import deepspeed
import numpy as np
import torch

from pipeline.config import Profile
from pipeline import distributed
from pipeline.distributed import broadcast_values
from pipeline.engines.base import EngineBase
from pipeline.engines.blocks import prepare_blocks
from pipeline.model import Transformer
from pipeline.optim import build_optimizer, optimizer_offloaded


class Zero3Engine(EngineBase):
    def __init__(self, profile: Profile, init_state: dict[str, torch.Tensor] | None = None):
        self.profile = profile
        # Built under zero.Init so no rank ever holds the whole model: each parameter is
        # partitioned as soon as its module is constructed (the 7B model never materialises).
        with deepspeed.zero.Init(config_dict_or_path=profile.deepspeed):
            model = Transformer(profile.model, seed=profile.train.seed, loss_chunk_tokens=profile.train.loss_chunk_tokens)
        # --init-from: rank 0 holds the weights; each parameter is gathered, overwritten on rank 0
        # and re-partitioned. Done before deepspeed.initialize, which copies the partitions into
        # the optimizer's fp32 master weights. A no-op (one broadcast) without --init-from.
        _load_partitioned(model, init_state)
        prepare_blocks(enumerate(model.layers), profile.train)
        optimizer, scheduler = build_optimizer(model.named_parameters(), profile.train,
                                               optimizer_offloaded(profile.deepspeed))
        self._weight_decays = [g["weight_decay"] for g in optimizer.param_groups]
        ds_engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=profile.deepspeed, dist_init_required=False)
        self._wrap(ds_engine)
        self.dp_rank = distributed.rank()  # every rank is a data-parallel replica

    def _to(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def train_step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], poison: bool = False) -> float:
        self.engine.train()
        total = 0.0
        for x, y in micro_batches:
            loss = self.engine(self._to(x), self._to(y))
            if poison:  # fault injection (pipeline/faults.py)
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            total += loss.item()
        return total / len(micro_batches)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        self.engine.eval()
        losses = [self.engine(self._to(x), self._to(y)).item() for x, y in micro_batches]
        return sum(losses) / len(losses)

    def load(self, ckpt_dir: str, tag: str) -> dict:
        client_state = super().load(ckpt_dir, tag)
        if self.engine.load_universal_checkpoint():
            # Two quirks of DeepSpeed's ZeRO-3 universal loader (stage3.py,
            # load_hp_checkpoint_state_from_checkpoint_dir_stage3), mended here:
            # it copies the first param group's hyperparameters into every group, which would
            # start decaying the norms; and it gives every group the *same* Adam step tensor, which
            # each group's update then increments, skewing bias correction from the second step on.
            inner = self.engine.optimizer.optimizer
            assert len(inner.param_groups) == len(self._weight_decays), "param groups changed shape after loading"
            for group, wd in zip(inner.param_groups, self._weight_decays):
                group["weight_decay"] = wd
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        return client_state


def _load_partitioned(model: Transformer, state: dict[str, torch.Tensor] | None) -> None:
    rank = distributed.rank()
    if not broadcast_values([1.0 if rank == 0 and state is not None else 0.0], src=0)[0]:
        return
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(state[name])
