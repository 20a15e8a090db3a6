"""The trainer's training, written again from its documented contracts and nothing of `pipeline`:
the model is `transformers`' LlamaForCausalLM, the optimizer `torch.optim.AdamW` over groups
chosen here, the loss `F.cross_entropy`, the schedule and the sample order those of
docs/formats.md, the tokens read from the shards with pyarrow. A bug shared with the trainer
can only come from torch or transformers themselves.

One process, one micro-batch of the whole global batch: the mean loss over equally long
sequences is the mean of the micro-batch means, so only the order of sums differs from a
DeepSpeed run of the same global batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

# --- the sample order (docs/formats.md, "Samples")

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Steele, Lea & Flood's splitmix64 output function for state x."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def permuted(j: int, n: int, key: int) -> int:
    """Element j of the keyed permutation of [0, n): 6 rounds of an unbalanced Feistel network on
    the fewest bits b covering n (low ⌊b/2⌋ bits key a change of the high part with
    splitmix64(low ^ key ^ splitmix64(round)), then move to the top), repeated while ≥ n."""
    bits = max(1, (n - 1).bit_length())
    low_bits = bits // 2
    high_bits = bits - low_bits
    while True:
        for r in range(6):
            low, high = j & ((1 << low_bits) - 1), j >> low_bits
            j = (low << high_bits) | (high ^ (splitmix64(low ^ key ^ splitmix64(r)) & ((1 << high_bits) - 1)))
        if j < n:
            return j


class Windows:
    """The samples of one split of a single-source manifest: its documents concatenated in
    manifest order, windows of seq_len + 1 tokens, window j from token j·seq_len; position p of
    the run is window permuted(p mod n, n, key of pass p // n), the key of source 0 being
    splitmix64(splitmix64(seed) ^ 0) and that of a pass splitmix64(source key ^ pass)."""

    def __init__(self, manifest: Path, split: str, seq_len: int, seed: int):
        raw = json.loads(manifest.read_text())
        shards = [s for s in raw["shards"] if s["split"] == split]
        assert len({s.get("source", "default") for s in shards}) == 1, "the reference reads one source"
        parts = []
        for s in shards:
            with pa.OSFile(str(manifest.parent / s["path"])) as f:
                table = pa.ipc.open_stream(f).read_all()
            parts.append(table.column(raw.get("column", "input_ids")).combine_chunks().flatten().to_numpy())
        self.tokens = np.concatenate(parts).astype(np.int64)
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len
        self.key = splitmix64(splitmix64(seed) ^ 0)

    def at(self, position: int) -> np.ndarray:
        passes, j = divmod(position, self.n)
        start = permuted(j, self.n, splitmix64(self.key ^ passes)) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.at(p) for p in range(first, first + size)]))
        return rows[:, :-1], rows[:, 1:]


# --- the model: LlamaForCausalLM holding the trainer's weights

# The trainer's parameter names (pipeline/model.py) → Hugging Face LLaMA's (modeling_llama.py), written here.
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
HF_BLOCK_NAMES = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
                  "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
                  "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                  "feed_forward.w2": "mlp.down_proj"}


def hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.{HF_BLOCK_NAMES[rest.removesuffix('.weight')]}.weight"


def llama(model: dict, weights: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """`model`: the profile's resolved model section (config.json's fields in the trainer's names)."""
    config = LlamaConfig(vocab_size=model["vocab_size"], hidden_size=model["dim"], intermediate_size=model["ffn_dim"],
                         num_hidden_layers=model["n_layers"], num_attention_heads=model["n_heads"],
                         num_key_value_heads=model["n_kv_heads"] or model["n_heads"],
                         max_position_embeddings=model["max_seq_len"], rms_norm_eps=model["norm_eps"],
                         rope_parameters={"rope_type": "default", "rope_theta": model["rope_theta"]},
                         # eager: attention written out in torch, not the SDPA kernel the trainer calls
                         tie_word_embeddings=False, attn_implementation="eager")
    hf = LlamaForCausalLM(config)
    state = {hf_name(k): v for k, v in weights.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


# --- the recipe: AdamW, decay on matrices only, linear warmup then cosine to a floor, clipping


@dataclass(frozen=True)
class Recipe:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float
    global_batch: int
    seed: int
    seq_len: int
    # The defects the suite's bounds must tell apart (each off in the trainer's recipe):
    decay_norms_from: int | None = None  # weight decay on norm gains from this step (0-based) on
    cpu_adam_l2: bool = False  # DeepSpeed's CPU Adam in plain-Adam mode: decay as L2 in the gradient
    pure_bf16: bool = False  # bf16 weights and Adam states, no fp32 master copy

    @classmethod
    def of(cls, profile: dict, **changes) -> "Recipe":
        """From a resolved profile (a run's profile.json: the trainer's sections as written)."""
        t, d = profile["train"], profile["data"]
        return replace(cls(lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"], weight_decay=t["weight_decay"],
                           grad_clip=t["grad_clip"], warmup_steps=t["warmup_steps"], decay_steps=t["decay_steps"],
                           min_lr_ratio=t["min_lr_ratio"],
                           global_batch=t["global_batch_size"],
                           seed=d["seed"], seq_len=d["seq_len"]), **changes)

    def lr_at(self, step: int) -> float:
        """The rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.Optimizer:
    # Matrices (embedding, projections, head) decay; vectors (the norms' gains) do not.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": r.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    if r.cpu_adam_l2:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=r.lr, betas=r.betas, eps=r.eps, adamw_mode=False)
    return torch.optim.AdamW(groups, lr=r.lr, betas=r.betas, eps=r.eps)


def train(manifest: Path, model_section: dict, weights: dict[str, torch.Tensor], r: Recipe,
          steps: int) -> dict[int, float]:
    """Losses of steps 1..steps, keyed as metrics.jsonl keys them."""
    model = llama(model_section, weights)
    if r.pure_bf16:
        model = model.to(torch.bfloat16)
    opt = optimizer(model, r)
    samples = Windows(manifest, "train", r.seq_len, r.seed)
    losses = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = r.lr_at(step)
        if r.decay_norms_from is not None and step >= r.decay_norms_from:
            opt.param_groups[1]["weight_decay"] = r.weight_decay
        x, y = samples.batch(step * r.global_batch, r.global_batch)
        logits = model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        losses[step + 1] = loss.item()
    return losses
