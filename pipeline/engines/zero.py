"""ZeRO data parallelism over all ranks, at the profile's stage: 1 shards the optimizer states,
2 also the gradients, 3 also the parameters."""

from __future__ import annotations

import deepspeed
import numpy as np
import torch

from pipeline import distributed
from pipeline.config import Profile
from pipeline.distributed import broadcast_values
from pipeline.engines.base import EngineBase
from pipeline.engines.blocks import prepare_blocks
from pipeline.model import Packing, Transformer
from pipeline.optim import build_optimizer, optimizer_offloaded


class ZeroEngine(EngineBase):
    def __init__(self, profile: Profile, init_state: dict[str, torch.Tensor] | None = None,
                 packing: Packing | None = None):
        self.profile = profile
        self.stage = profile.zero_stage
        model = build_model(profile, init_state)
        model.packing = packing
        self.recomputations = prepare_blocks(enumerate(model.layers), profile.train)
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
        if self.stage == 3 and self.engine.load_universal_checkpoint():
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


def build_model(profile: Profile, init_state: dict[str, torch.Tensor] | None) -> Transformer:
    """The model, holding the --init-from weights (given on rank 0 only) on every rank.

    Stage 3: built under zero.Init so no rank ever holds the whole model: each parameter is
    partitioned as soon as its module is constructed (the 7B model never materialises). Rank 0's
    weights go in parameter by parameter before deepspeed.initialize, which copies the partitions
    into the optimizer's fp32 master weights.

    Stages 1 and 2: every rank holds the whole model, built on its local rank's device as
    zero.Init builds it (so both draw the initial weights from the same generator, and no rank
    holds an fp32 copy in host memory). Rank 0 copies its weights in; the other ranks get them
    from deepspeed.initialize, which broadcasts every parameter from rank 0 for a model not built
    under zero.Init (DeepSpeedEngine._broadcast_model, on the engine's device) before the
    optimizer copies them into its fp32 partitions."""
    if profile.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=profile.deepspeed):
            model = Transformer(profile.model, seed=profile.train.seed, loss_chunk_tokens=profile.train.loss_chunk_tokens)
        _load_partitioned(model, init_state)  # a no-op (one broadcast) without --init-from
        return model
    with distributed.collective_device():  # this rank's device, set by init_distributed
        model = Transformer(profile.model, seed=profile.train.seed, loss_chunk_tokens=profile.train.loss_chunk_tokens)
    if init_state is not None:
        model.load_state_dict(init_state)
    return model


def _load_partitioned(model: Transformer, state: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's weights into a model built under zero.Init: each parameter is gathered, overwritten
    on rank 0 and re-partitioned."""
    rank = distributed.rank()
    if not broadcast_values([1.0 if rank == 0 and state is not None else 0.0], src=0)[0]:
        return
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(state[name])
