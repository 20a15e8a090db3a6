"""pipeline/engines/blocks.py and the chunked loss, on the plain model in one process."""

import pytest
import torch

from pipeline.config import TrainSection
from pipeline.engines.blocks import prepare_blocks
from pipeline.model import PRESETS, ModelConfig, Transformer, chunked_cross_entropy

@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the same tokens every run


CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=176, max_seq_len=64)


def train_section(**kw) -> TrainSection:
    return TrainSection(steps=1, micro_batch_size=1, **kw)


def loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_every_kth_block_recomputes_and_gradients_do_not_change():
    tokens = torch.randint(0, CFG.vocab_size, (2, 33))
    plain = Transformer(CFG, seed=1)
    model = Transformer(CFG, seed=1)
    recomputations = prepare_blocks(enumerate(model.layers),
                                    train_section(activation_checkpointing=True, activation_checkpointing_every=2))
    calls = [0] * CFG.n_layers
    for i, block in enumerate(model.layers):
        block.attention.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    want, got = loss_and_grads(plain, tokens), loss_and_grads(model, tokens)
    # Blocks 1 and 3 (the 2nd and 4th) run their forward again in the backward pass; 0 and 2 store activations.
    assert calls == [1, 2, 1, 2]
    assert recomputations.count == 2  # what the trainer logs as train/recomputed_blocks
    with torch.no_grad():
        model(tokens[:, :-1])
    assert recomputations.count == 2  # a forward without a backward recomputes nothing
    assert got[0] == want[0]
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=0, atol=0)


def test_forced_attention_kernel_runs_or_fails_loudly():
    tokens = torch.randint(0, CFG.vocab_size, (2, 33))
    want = loss_and_grads(Transformer(CFG, seed=2), tokens)
    model = Transformer(CFG, seed=2)
    prepare_blocks(enumerate(model.layers), train_section(attention_backend="math"))
    got = loss_and_grads(model, tokens)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    # No memory-efficient kernel on the CPU: the run stops instead of quietly taking another.
    model = Transformer(CFG, seed=2)
    prepare_blocks(enumerate(model.layers), train_section(attention_backend="efficient"))
    with pytest.raises(RuntimeError, match="No viable backend"):
        model(tokens)


def test_compiled_blocks_give_the_eager_losses_and_gradients():
    tokens = torch.randint(0, CFG.vocab_size, (2, 33))
    want = loss_and_grads(Transformer(CFG, seed=3), tokens)
    model = Transformer(CFG, seed=3)
    prepare_blocks(enumerate(model.layers), train_section(compile=True, activation_checkpointing=True))
    got = loss_and_grads(model, tokens)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-4, atol=1e-6)
    assert set(want[1]) == set(got[1])  # compiling kept the parameter names


def test_chunked_loss_equals_the_full_loss_in_fp32():
    tokens = torch.randint(0, CFG.vocab_size, (3, 41))
    want = loss_and_grads(Transformer(CFG, seed=4), tokens)
    for chunk in (1, 17, 120, 10_000):  # one token, chunks that do not divide 120 tokens, all of them, more
        got = loss_and_grads(Transformer(CFG, seed=4, loss_chunk_tokens=chunk), tokens)
        assert got[0] == pytest.approx(want[0], rel=1e-6)  # a few fp32 roundings of a loss near 6
        for n in want[1]:
            torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-5, atol=1e-7)


def test_chunked_loss_in_bf16_is_as_close_to_fp32_as_the_full_loss():
    tokens = torch.randint(0, CFG.vocab_size, (3, 41))
    exact = loss_and_grads(Transformer(CFG, seed=5), tokens)
    full = loss_and_grads(Transformer(CFG, seed=5).bfloat16(), tokens)
    chunked = loss_and_grads(Transformer(CFG, seed=5, loss_chunk_tokens=16).bfloat16(), tokens)

    def err(g):
        return max(((g[n] - exact[1][n]).abs().max() / exact[1][n].abs().max()).item() for n in g)

    assert abs(chunked[0] - exact[0]) <= 2 * abs(full[0] - exact[0]) + 1e-3
    assert err(chunked[1]) <= 1.5 * err(full[1])


def test_chunked_loss_without_gradients_and_logits_unchanged():
    cfg = PRESETS["tiny"]
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    full, chunked = Transformer(cfg, seed=6), Transformer(cfg, seed=6, loss_chunk_tokens=7)
    with torch.no_grad():
        assert chunked(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(
            full(tokens[:, :-1], tokens[:, 1:]).item(), abs=1e-6)
        torch.testing.assert_close(chunked(tokens), full(tokens), rtol=0, atol=0)  # no labels: logits
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (5,))
    loss = chunked_cross_entropy(h, w, y, 2)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    (2.5 * loss).backward()
    gh, gw = torch.autograd.grad(2.5 * ref, (h, w))
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)
