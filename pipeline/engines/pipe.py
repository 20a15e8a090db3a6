"""Pipeline parallelism: DeepSpeed `PipelineModule` stages built from the model's own layer
classes, ZeRO stage 1 over the data-parallel replicas of each stage.

Layer list (its indices are the checkpoint's `layer_XX-model_states.pt` files):

    0            EmbeddingLayer   tok_embeddings
    1..n_layers  BlockLayer       one TransformerBlock each (attention, feed_forward, norms)
    n_layers+1   HeadLayer        norm, output

Parameter names inside each layer are those of `pipeline/model.py`, so layer k's tensors are
the plain model's `layers.{k-1}.*` and one naming scheme serves both engines and the export.
Stages are cut by parameter count (`partition_method="parameters"`).
"""

from __future__ import annotations

import deepspeed
import numpy as np
import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from pipeline.config import Profile, TrainSection
from pipeline.engines.base import EngineBase
from pipeline.engines.blocks import prepare_blocks
from pipeline.model import (Embedding, LMHead, ModelConfig, Packing, RMSNorm, TransformerBlock, causal_lm_loss,
                            document_layout, document_mask, packed_rotary, rotary_tables, seeded_init)
from pipeline.optim import build_optimizer, optimizer_offloaded


class EmbeddingLayer(nn.Module):
    """The embedding; with document masking it also hands on each token's document index and
    position (`document_layout`), which every later stage needs and cannot see in the tokens."""

    def __init__(self, cfg: ModelConfig, seed: int, packing: Packing | None = None):
        super().__init__()
        self.packing = packing
        with seeded_init(seed, 0):
            self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)

    def forward(self, tokens: torch.Tensor):
        h = self.tok_embeddings(tokens)
        return (h, *document_layout(tokens, self.packing.eos_id)) if self.packing else h


class BlockLayer(TransformerBlock):
    """A TransformerBlock that takes what pipeline stages pass along (the hidden state, and with
    document masking the documents and positions) and makes its rotary tables itself, cached per
    sequence length."""

    def __init__(self, cfg: ModelConfig, seed: int, index: int, packing: Packing | None = None):
        with seeded_init(seed, 1 + index):
            super().__init__(cfg)
        self._cfg, self.packing = cfg, packing
        self.index = index
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def forward(self, inputs):  # type: ignore[override]
        h, doc, positions = inputs if self.packing else (inputs, None, None)
        t = h.shape[1]
        if self._rope is None or self._rope[0] != t or self._rope[1].device != h.device:
            cos, sin = rotary_tables(self._cfg, t, h.device)
            self._rope = (t, cos, sin)
        cos, sin = self._rope[1], self._rope[2]
        if not self.packing:
            return super().forward(h, cos, sin)
        if self.packing.reset_positions:
            cos, sin = packed_rotary(cos, sin, positions)
        return super().forward(h, cos, sin, document_mask(doc)), doc, positions


class HeadLayer(nn.Module):
    """Final norm and output projection. DeepSpeed hands the last stage's output and the labels
    to a separate loss function; with a chunked loss that output is the normalised hidden state
    and `loss` applies the head chunk by chunk, so the full logits never exist."""

    def __init__(self, cfg: ModelConfig, seed: int, loss_chunk_tokens: int = 0):
        super().__init__()
        with seeded_init(seed, cfg.n_layers + 1):
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = LMHead(cfg.dim, cfg.vocab_size, cfg.init_std, loss_chunk_tokens)

    def forward(self, h) -> torch.Tensor:
        h = self.norm(h[0] if isinstance(h, tuple) else h)
        return h if self.output.loss_chunk_tokens else self.output(h)

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.output(out, labels) if self.output.loss_chunk_tokens else causal_lm_loss(out, labels)


def build_pipeline_module(cfg: ModelConfig, stages: int, train: TrainSection,
                          packing: Packing | None = None) -> PipelineModule:
    """This rank's stage. Activation checkpointing is not DeepSpeed's (activation_checkpoint_interval
    stays 0): `prepare_blocks` applies it to the blocks as it does for ZeRO-3."""
    layers = [LayerSpec(EmbeddingLayer, cfg, train.seed, packing)]
    layers += [LayerSpec(BlockLayer, cfg, train.seed, i, packing) for i in range(cfg.n_layers)]
    layers += [LayerSpec(HeadLayer, cfg, train.seed, train.loss_chunk_tokens)]
    module = PipelineModule(layers=layers, num_stages=stages, loss_fn=causal_lm_loss, partition_method="parameters",
                            activation_checkpoint_interval=0)
    module.recomputations = prepare_blocks(((f.index, f) for f in module.forward_funcs if isinstance(f, BlockLayer)),
                                           train)
    return module


def pipeline_name(layer_index: int, name: str, n_layers: int) -> str:
    """The plain model's parameter name of parameter `name` of pipeline layer `layer_index`."""
    return f"layers.{layer_index - 1}.{name}" if 1 <= layer_index <= n_layers else name


class PipelineEngine(EngineBase):
    def __init__(self, profile: Profile, init_state: dict[str, torch.Tensor] | None = None,
                 packing: Packing | None = None):
        self.profile = profile
        module = build_pipeline_module(profile.model, profile.topology.pipeline_stages, profile.train, packing)
        if init_state is not None:  # --init-from: every stage copies its own layers, before the optimizer exists
            with torch.no_grad():
                for full_name, p in module.named_parameters():
                    idx, name = full_name.split(".", 1)
                    p.copy_(init_state[pipeline_name(int(idx), name, profile.model.n_layers)])
        optimizer, scheduler = build_optimizer(module.named_parameters(), profile.train,
                                               optimizer_offloaded(profile.deepspeed))
        ds_engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=profile.deepspeed, dist_init_required=False)
        self._wrap(ds_engine)
        self.recomputations = module.recomputations
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self._poison = False
        self._head = module.forward_funcs[-1]  # a HeadLayer on the last stage, whose loss DeepSpeed calls
        module.loss_fn = self._loss

    def _loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self._head.loss(out, labels)
        return loss * float("nan") if self._poison else loss  # fault injection (pipeline/faults.py)

    def _iter(self, micro_batches):
        for x, y in micro_batches:
            yield torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def train_step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], poison: bool = False) -> float:
        # train_batch runs every micro-batch through the pipeline schedule and steps the optimizer;
        # the returned loss is the micro-batch mean, already shared by all stages.
        self._poison = poison
        try:
            return float(self.engine.train_batch(data_iter=self._iter(micro_batches)))
        finally:
            self._poison = False

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        return float(self.engine.eval_batch(data_iter=self._iter(micro_batches)))
