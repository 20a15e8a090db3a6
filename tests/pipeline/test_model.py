import dataclasses

import pytest
import torch
import transformers

from pipeline.hf import load_hf_state, save_hf_model
from pipeline.model import PRESETS, ModelConfig, Transformer


def test_llama_7b_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = Transformer(PRESETS["llama-7b"])
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert PRESETS["llama-7b"].num_params() == 6_738_415_616


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_logits_match_transformers_after_export(tmp_path, n_kv_heads):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], n_kv_heads=n_kv_heads, vocab_size=512)
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
