"""What both engines do to the transformer blocks before DeepSpeed wraps them, in one place and
one order (torchtitan's `parallelize_llama` order): attention kernel choice → activation
checkpointing → torch.compile.

Each transform replaces the block's `forward` on the instance, so parameter names, and with
them checkpoints and the Hugging Face mapping, do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from pipeline.config import TrainSection

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def checkpointed_block(index: int, every: int) -> bool:
    """Whether block `index` (0-based, over the whole model) recomputes its activations: blocks
    k-1, 2k-1, ... for every = k, so a pipeline stage decides alike for its share of the blocks."""
    return (index + 1) % every == 0


def _with_sdpa_backend(forward, backend):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with sdpa_kernel([backend]):
            return forward(*args, **kwargs)
    return run


class Recomputations:
    """How many block forwards ran again in a backward pass, counted where they run: each
    checkpointed forward counts its calls of the block and the block's own calls, so a
    recomputation is a block call beyond its forward. The trainer logs the count per step
    (train/recomputed_blocks), proof that checkpointing is on, not only switched on."""

    def __init__(self):
        self.forwards = 0
        self.block_calls = 0

    @property
    def count(self) -> int:
        return self.block_calls - self.forwards


def _recomputed(forward, recomputations: Recomputations):
    def block(*args, **kwargs):
        recomputations.block_calls += 1
        return forward(*args, **kwargs)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        recomputations.forwards += 1
        # Non-reentrant: works with inputs that need no grad (a pipeline stage's first block) and
        # with ZeRO-3, whose hooks gather the parameters again for the recomputation.
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return run


def prepare_blocks(blocks: Iterable[tuple[int, nn.Module]], train: TrainSection) -> Recomputations:
    """Apply the profile's attention backend, activation checkpointing and compilation to
    `blocks`, given as (index in the whole model, block) pairs; returns the counter of their
    recomputations."""
    recomputations = Recomputations()
    for index, block in blocks:
        if train.attention_backend != "default":
            block.forward = _with_sdpa_backend(block.forward, SDPA_BACKENDS[train.attention_backend])
        if train.activation_checkpointing and checkpointed_block(index, train.activation_checkpointing_every):
            block.forward = _recomputed(block.forward, recomputations)
        if train.compile:
            block.compile()
    return recomputations
