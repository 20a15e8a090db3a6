import dataclasses
import functools
from dataclasses import replace

import pytest
import torch
import transformers

from pipeline.hf import hf_parts, load_hf_state, relayout, save_hf_model
from pipeline.import_hf import import_hf
from pipeline.model import PRESETS, ModelConfig, Packing, Transformer


def test_llama_7b_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = Transformer(PRESETS["llama-7b"])
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert PRESETS["llama-7b"].num_params() == 6_738_415_616


@pytest.mark.parametrize("n_kv_heads,fused", [(None, False), (2, False), (2, True)])
def test_logits_match_transformers_after_export(tmp_path, n_kv_heads, fused):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], n_kv_heads=n_kv_heads, vocab_size=512, fused_projections=fused)
    ours = Transformer(cfg).eval()
    # Norm weights start at 1; randomise them so a wrong norm mapping cannot hide.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_hf_model(ours.state_dict(), cfg, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        a = ours(tokens)
        b = theirs(tokens).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_hf_round_trip_is_bit_identical(tmp_path):
    cfg = PRESETS["tiny"]
    state = Transformer(cfg).state_dict()
    save_hf_model(state, cfg, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()  # forced several shards
    cfg2, state2 = load_hf_state(tmp_path)
    assert cfg2 == cfg
    assert state.keys() == state2.keys()
    for k in state:
        assert torch.equal(state[k], state2[k]), k


def test_config_rejects_bad_head_split():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=5, vocab_size=10, ffn_dim=8)


def fused_pair(seed: int = 3) -> tuple[Transformer, Transformer]:
    # Parts of 42·42, 14·42 and 100·42 values, not multiples of 16: one normal_ over a whole fused
    # weight would draw other values than one per part (on the CPU; with multiples of 16 it agrees).
    cfg = dataclasses.replace(PRESETS["tiny"], dim=42, n_heads=3, n_kv_heads=1, ffn_dim=100, vocab_size=512)
    return Transformer(cfg, seed=seed), Transformer(dataclasses.replace(cfg, fused_projections=True), seed=seed)


def split(fused: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused model's tensors (weights or gradients) under the unfused model's names."""
    return relayout(dict(tensors), fused.cfg, dataclasses.replace(fused.cfg, fused_projections=False))


def test_fused_projections_are_the_same_model():
    """Built from one seed, the fused model holds the unfused weights stacked (wqkv = [wq; wk; wv],
    w13 = [w1; w3]) and computes the same logits and, after splitting, the same gradients."""
    plain, fused = fused_pair()
    state = fused.state_dict()
    assert "layers.1.attention.wqkv.weight" in state and "layers.1.feed_forward.w13.weight" in state
    assert [h for h, _ in hf_parts(fused.cfg)["layers.1.attention.wqkv.weight"]] == [
        f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    unfused = plain.state_dict()
    for name, t in split(fused, state).items():
        assert torch.equal(t, unfused[name]), name

    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 512, (2, 37), generator=g), torch.randint(0, 512, (2, 37), generator=g)
    # The same dot products, but a wider GEMM may take another kernel or blocking, so the last
    # bits may differ (seen: equal at the tiny preset's shapes, 3e-8 apart at these).
    torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-6)
    plain(tokens, labels).backward()
    fused(tokens, labels).backward()
    grads = split(fused, {n: p.grad for n, p in fused.named_parameters()})
    for name, p in plain.named_parameters():
        # A weight gradient sums over the batch's tokens; one larger GEMM may block that sum
        # differently from three, so the last bits may differ (seen: 5e-9 on gradients of 1e-3).
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_fused_model_round_trips_through_export_and_import(tmp_path):
    """Export splits the fused rows exactly (the files equal the unfused model's export, byte for
    byte); import_hf plus relayout (what --init-from does for a fused profile) stacks them again."""
    plain, fused = fused_pair()
    for d in ("plain", "fused"):
        (tmp_path / d).mkdir()
    save_hf_model(plain.state_dict(), plain.cfg, tmp_path / "plain", max_shard_size="100KB")
    save_hf_model(fused.state_dict(), fused.cfg, tmp_path / "fused", max_shard_size="100KB")
    for f in sorted((tmp_path / "plain").iterdir()):
        assert f.read_bytes() == (tmp_path / "fused" / f.name).read_bytes(), f.name

    import_hf(tmp_path / "fused", tmp_path / "init")
    from pipeline.init_from import InitWeights

    back = InitWeights(tmp_path / "init" / "model.safetensors", fused.cfg, None)
    state = fused.state_dict()
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                      "high_freq_factor": 8.0, "original_max_position_embeddings": 256}])
def test_rope_scaling_tables_match_transformers(scaling):
    """cos/sin of every position up to 8192, against transformers' LlamaRotaryEmbedding; the
    head dimension and theta put frequencies in all three llama3 bands."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = ModelConfig(dim=128, n_layers=1, n_heads=2, vocab_size=8, ffn_dim=8, max_seq_len=8192, rope_theta=500000.0,
                      rope_scaling=scaling)
    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=8192,
                                  rope_theta=500000.0, rope_scaling=dict(scaling))
    ref = LlamaRotaryEmbedding(hf)
    positions = torch.arange(8192)[None]
    cos, sin = ref(torch.zeros(1, dtype=torch.float32), positions)
    ours_cos, ours_sin = Transformer(cfg).rotary(8192, "cpu")
    plain_cos, _ = Transformer(dataclasses.replace(cfg, rope_scaling=None)).rotary(8192, "cpu")
    assert (plain_cos - cos[0]).abs().max() > 0.1  # the scaling changes the tables
    torch.testing.assert_close(ours_cos, cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_sin, sin[0], atol=1e-5, rtol=0)


# --- document masking ------------------------------------------------------------------------

def _packed_window(eos: int, vocab: int) -> torch.Tensor:
    """Two windows of 48 tokens, documents of 11, 20, 5, 1 and the rest, each ending with EOS."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for lengths in ((11, 20, 5, 1, 12), (30, 19)):
        row = []
        for n in lengths:
            row += torch.randint(3, vocab, (n - 1,), generator=g).tolist() + [eos]
        rows.append(row[:48] + [eos] * (48 - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize("flex", [False, True])
def test_a_packed_window_with_document_masking_is_each_document_alone(flex, monkeypatch):
    """The loss of a packed window with masking and reset positions is the token-weighted mean of
    each document run alone (its own tokens, positions from 0, plain causal attention), in fp32;
    FlexAttention's block mask (the CUDA path, here uncompiled) gives the same."""
    import pipeline.model as model_mod

    cfg = replace(PRESETS["tiny"], vocab_size=64, max_seq_len=64)
    eos = 2
    model = Transformer(cfg, seed=5)
    window = _packed_window(eos, cfg.vocab_size)
    x, y = window[:, :-1], window[:, 1:]
    if flex:  # the block mask CUDA gets, on the CPU
        monkeypatch.setattr(model_mod, "document_mask", functools.partial(model_mod.document_mask, flex=True))
    model.packing = Packing(eos, reset_positions=True)
    with torch.no_grad():  # FlexAttention has no backward on the CPU
        packed = model(x, y)
    model.packing = None
    total, count = 0.0, 0
    for row_x, row_y in zip(x, y):
        ends = (row_x == eos).nonzero().flatten().tolist()
        for start, end in zip([0] + [e + 1 for e in ends], ends + [len(row_x) - 1]):
            if start > end:
                continue
            seg_x, seg_y = row_x[start:end + 1][None], row_y[start:end + 1][None]
            total += model(seg_x, seg_y).item() * seg_x.shape[1]
            count += seg_x.shape[1]
    assert count == x.numel()
    assert packed.item() == pytest.approx(total / count, abs=2e-6, rel=0)
    plain = model(x, y).item()  # without masking the documents see each other: a different loss
    assert abs(plain - packed.item()) > 1e-3
