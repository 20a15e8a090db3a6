"""The FLOPs convention against a count of the multiplications torch actually runs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.metrics import flops_per_token
from pipeline.model import ModelConfig, Transformer


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flops_per_token_is_three_forward_passes_of_counted_matmuls(kv_heads):
    """Training = forward + backward (twice the forward's multiply-adds), so 3 × the forward pass's
    FLOPs as torch's FlopCounterMode counts them: every mm of the projections and head, and the
    attention's two bmm (the math kernel computes the full T × T scores: no causal discount).
    Failed first by 6·(2L + 1)·d: the RMSNorm gains were counted as matmul weights."""
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=kv_heads, ffn_dim=160, vocab_size=300, max_seq_len=64)
    model = Transformer(cfg, seed=0)
    batch, seq = 2, 48
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm", "aten.bmm"}, counts
    assert 3 * counter.get_total_flops() / (batch * seq) == flops_per_token(cfg, seq)
