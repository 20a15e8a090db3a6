"""The LLaMA architecture in plain PyTorch.

Reads top to bottom like the diagram:

    tokens → Embedding → [TransformerBlock × n_layers] → RMSNorm → LMHead → logits (or, given labels, the loss)
    TransformerBlock:  x + Attention(RMSNorm(x)),  then  h + FeedForward(RMSNorm(h))
    Attention:         q, k, v projections → rotary embedding on q, k → causal SDPA (or within each
                       document, `Packing`) → output projection
    FeedForward:       SwiGLU, w2(silu(w1 x) * w3 x)

With `fused_projections` the q, k, v projections are one weight `wqkv` (rows: q, then k, then v)
and the gate and up projections one weight `w13` (rows: w1, then w3): one GEMM instead of three
and two, the same function and, from the same seed, the same weights stacked (`FusedLinear`).

Nothing here knows about DeepSpeed; engines in `pipeline/engines/` wrap these modules.

Document masking (`Packing`, train.document_masking): a training window packs several documents,
each ending with EOS. With packing set, each token attends only to the earlier tokens of its own
document (`document_mask`), and with `reset_positions` its rotary position counts from its
document's first token, so a packed window computes exactly what each document would alone.
On CUDA the mask is a FlexAttention block mask (no dense seq × seq mask; fully masked blocks
are skipped); elsewhere a dense boolean mask for SDPA, exact and small at CPU sizes.

Rotary embeddings may be stretched for long contexts (`RopeScaling`: "linear" divides every
frequency by a factor; "llama3" divides only the low frequencies and blends the middle band, as
Llama 3.1+ do); the tables follow Hugging Face's `modeling_rope_utils` exactly.

Rotary embeddings use the "rotate half" layout (the first and second halves of each head
dimension form the pairs), which is the layout of Hugging Face's `LlamaForCausalLM`; weights
therefore map one-to-one to Hugging Face names with no permutation (see `pipeline/hf.py`).
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """Hugging Face's `rope_scaling` (`rope_parameters` in transformers 5) of type linear or llama3;
    the llama3 defaults are Llama 3.1's published values."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    TYPES = ("linear", "llama3")

    def __post_init__(self) -> None:
        if self.rope_type not in self.TYPES:
            raise ValueError(f"model.rope_scaling.rope_type={self.rope_type!r} is not supported (one of {list(self.TYPES)})")
        if not self.factor >= 1:
            raise ValueError(f"model.rope_scaling.factor={self.factor} must be >= 1")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"model.rope_scaling: high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_dim: int
    n_kv_heads: int | None = None  # None: multi-head attention; fewer than n_heads: GQA
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    fused_projections: bool = False  # wqkv and w13 instead of wq, wk, wv and w1, w3 (names and shapes change)
    rope_scaling: RopeScaling | None = None  # None: plain rotary frequencies

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # as read back from JSON (profiles, model.json)
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        return replace(self, vocab_size=vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (embedding and head untied)."""
        d, f, v, hd = self.dim, self.ffn_dim, self.vocab_size, self.head_dim
        attn = d * d * 2 + 2 * d * self.kv_heads * hd
        block = attn + 3 * d * f + 2 * d
        return 2 * v * d + self.n_layers * block + d


# Presets as code. Hugging Face config.json of meta-llama/Llama-2-7b-hf for llama-7b.
PRESETS: dict[str, ModelConfig] = {
    # For CPU tests and the demo: a few seconds a step on 2 cores.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, ffn_dim=176, max_seq_len=256),
    "small": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, ffn_dim=688, max_seq_len=512),
    "llama-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=32000, ffn_dim=5632, max_seq_len=4096),
    "llama-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008, max_seq_len=4096),
    "llama-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, ffn_dim=13824, max_seq_len=4096),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference implementation does, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def scale_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
    """The rotary frequencies stretched for a longer context (transformers' `_compute_llama3_parameters`
    and `_compute_linear_scaling_rope_parameters`)."""
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths beyond original/low_freq_factor are divided by the factor, those below
    # original/high_freq_factor kept, and the band between interpolated smoothly.
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim), rotate-half layout."""
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    inv_freq = scale_frequencies(inv_freq, cfg.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim), or (batch, 1, seq, head_dim)
    for positions of their own per sequence (`Packing.reset_positions`)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass(frozen=True)
class Packing:
    """Documents packed into one window, each ending with `eos_id`: attention stays inside each
    document; with `reset_positions` rotary positions restart at each document's first token."""

    eos_id: int
    reset_positions: bool = False


def document_layout(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position within the document) of every token of tokens (batch, seq): a
    document ends with its EOS, and the token after an EOS starts the next one."""
    eos = (tokens == eos_id).to(torch.int32)
    doc = torch.cumsum(eos, dim=1) - eos
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[:, 1:] = eos[:, :-1].bool()
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return doc, index - first


def document_mask(doc: torch.Tensor, flex: bool | None = None):
    """What attends to what: causal, and within one document. A FlexAttention BlockMask on CUDA
    (or with `flex`), a dense boolean (batch, 1, seq, seq) mask elsewhere."""
    b, t = doc.shape
    if doc.is_cuda if flex is None else flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(batch, head, q, kv):
            return (q >= kv) & (doc[batch, q] == doc[batch, kv])

        return create_block_mask(same_document, b, None, t, t, device=doc.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def packed_rotary(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables at each token's own position: (batch, 1, seq, head_dim)."""
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, gqa: bool) -> torch.Tensor:
    """Causal attention, or attention under `document_mask`'s mask."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)


@functools.cache
def _flex_attention(compiled: bool):
    """FlexAttention is fast only compiled (on CUDA); uncompiled it is torch's exact reference."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@contextmanager
def seeded_init(seed: int, layer_index: int):
    """Draw a layer's initial weights from its own seed: layer k of a model built from `seed`
    gets the same weights whether the whole model is built in one process, partitioned as it is
    built (`deepspeed.zero.Init`), or only the layers of one pipeline stage are built.
    Index 0 is the embedding, 1..n_layers the blocks, n_layers + 1 the final norm and head."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 100_003 + layer_index)
        yield


class Linear(nn.Linear):
    """Bias-free linear layer initialised N(0, std).

    The init lives in `reset_parameters`, which nn.Linear's constructor calls, because
    `deepspeed.zero.Init` partitions a module's parameters the moment its constructor returns:
    an init applied afterwards would touch an empty partition and silently do nothing."""

    def __init__(self, d_in: int, d_out: int, std: float):
        self.std = std
        super().__init__(d_in, d_out, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)


class FusedLinear(Linear):
    """Projections of the same input stacked into one weight, rows `parts[0]` first; forward
    returns the outputs split back into the parts. Each part is drawn in turn as its own `Linear`
    would be, so a fused model has exactly the weights of the unfused model built from the same
    seed (one normal_ over the whole weight would not in general: the CPU generator fills 16
    values at a time and redraws a ragged tail; CUDA's assigns values to threads by size)."""

    def __init__(self, d_in: int, parts: tuple[int, ...], std: float):
        self.parts = parts
        super().__init__(d_in, sum(parts), std)

    def reset_parameters(self) -> None:
        for part in self.weight.split(self.parts):
            nn.init.normal_(part, 0.0, self.std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(x).split(self.parts, dim=-1)


class Embedding(nn.Embedding):
    """Token embedding initialised N(0, std) (see `Linear` for why in reset_parameters)."""

    def __init__(self, vocab_size: int, dim: int, std: float):
        self.std = std
        super().__init__(vocab_size, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)


def _residual_std(cfg: ModelConfig) -> float:
    # Output projections of each residual branch are scaled by 1/sqrt(2·n_layers)
    # (GPT-2 / Megatron convention) so the residual stream keeps its scale with depth.
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.fused = cfg.fused_projections
        q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if self.fused:
            self.wqkv = FusedLinear(cfg.dim, (q, kv, kv), cfg.init_std)
        else:
            self.wq = Linear(cfg.dim, q, cfg.init_std)
            self.wk = Linear(cfg.dim, kv, cfg.init_std)
            self.wv = Linear(cfg.dim, kv, cfg.init_std)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, _residual_std(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x) if self.fused else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, mask, self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_projections
        if self.fused:
            self.w13 = FusedLinear(cfg.dim, (cfg.ffn_dim, cfg.ffn_dim), cfg.init_std)  # gate, up
        else:
            self.w1 = Linear(cfg.dim, cfg.ffn_dim, cfg.init_std)  # gate
            self.w3 = Linear(cfg.dim, cfg.ffn_dim, cfg.init_std)  # up
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, _residual_std(cfg))  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x) if self.fused else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LMHead(Linear):
    """The output projection. Given labels it returns the mean next-token loss instead of the
    logits; with `loss_chunk_tokens` set it never holds more than that many tokens' logits
    (`chunked_cross_entropy`), which for a 32k vocabulary at 4096 tokens × micro-batch 4 saves
    the 2 GiB of fp32 logits plus their gradient. Computed inside this module's own forward so
    that ZeRO-3 has gathered the weight."""

    def __init__(self, dim: int, vocab_size: int, std: float, loss_chunk_tokens: int = 0):
        super().__init__(dim, vocab_size, std)
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        if not self.loss_chunk_tokens:
            return causal_lm_loss(super().forward(h), labels)
        return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.weight, labels.reshape(-1), self.loss_chunk_tokens)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0, loss_chunk_tokens: int = 0, packing: Packing | None = None):
        super().__init__()
        self.cfg, self.packing = cfg, packing
        with seeded_init(seed, 0):
            self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        blocks = []
        for i in range(cfg.n_layers):
            with seeded_init(seed, 1 + i):
                blocks.append(TransformerBlock(cfg))
        self.layers = nn.ModuleList(blocks)
        with seeded_init(seed, cfg.n_layers + 1):
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = LMHead(cfg.dim, cfg.vocab_size, cfg.init_std, loss_chunk_tokens)

    def rotary(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(self.cfg, seq_len, device)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (batch, seq) int64 → logits (batch, seq, vocab); with labels (already shifted,
        as `causal_lm_loss` takes them) → the mean loss, a scalar."""
        cos, sin = self.rotary(tokens.shape[1], tokens.device)
        mask = None
        if self.packing is not None:
            doc, positions = document_layout(tokens, self.packing.eos_id)
            mask = document_mask(doc)
            if self.packing.reset_positions:
                cos, sin = packed_rotary(cos, sin, positions)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.output(self.norm(h), labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` are already shifted (labels[t] = tokens[t+1])."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `labels`, one chunk of tokens at a time.

    Each chunk's gradients are computed in the forward pass while its logits exist (softmax
    minus one-hot is the gradient of cross-entropy with respect to the logits), so backward has
    nothing to recompute: memory is one chunk's fp32 logits plus the gradients of `h` and
    `weight` that backward would hold anyway. The same arithmetic as the unchunked path (16-bit
    matmuls, fp32 softmax), so losses agree to float rounding."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            hc, yc = h[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(hc, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                d = torch.exp(logits - lse[:, None])  # softmax, in place of the logits
                d[torch.arange(len(yc), device=d.device), yc] -= 1.0
                d = d.to(h.dtype)
                if want_h:
                    grad_h[start:start + chunk] = d @ weight
                if want_w:
                    grad_w += (d.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype), None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """`causal_lm_loss(F.linear(h, weight), labels)` for h (tokens, dim), labels (tokens,), with
    at most `chunk` tokens' logits in memory at once."""
    return _ChunkedLinearCrossEntropy.apply(h, weight, labels, chunk)
