"""Hugging Face LLaMA → `--init-from` directory → Hugging Face again."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.export import export
from pipeline.hf import load_init_dir
from pipeline.import_hf import import_hf, main
from pipeline.model import Transformer


def hf_model(path: Path, n_kv_heads: int, dtype=torch.float32, shard="60KB") -> Path:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=n_kv_heads, vocab_size=300, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=50000.0)
    torch.manual_seed(n_kv_heads)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # so a wrong norm mapping cannot hide
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("n_kv_heads,dtype,export_dtype", [(8, torch.float32, "fp32"), (2, torch.float32, "fp32"),
                                                         (2, torch.bfloat16, "bf16")])
def test_round_trip_is_bit_identical(tmp_path, n_kv_heads, dtype, export_dtype):
    src = hf_model(tmp_path / "src", n_kv_heads, dtype)
    assert main([str(src), "--out", str(tmp_path / "init")]) == 0
    cfg, state = load_init_dir(tmp_path / "init")
    assert cfg.kv_heads == n_kv_heads and cfg.rope_theta == 50000.0 and cfg.norm_eps == 1e-6
    assert all(t.dtype == torch.float32 for t in state.values())
    assert json.loads((tmp_path / "init" / "model.json").read_text()) == cfg.to_dict()

    export(tmp_path / "init", tmp_path / "back", dtype=export_dtype, max_shard_size="60KB", check=True)
    a, b = tensors(src), tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_imported_weights_compute_the_same_logits(tmp_path):
    src = hf_model(tmp_path / "src", 2)
    main([str(src), "--out", str(tmp_path / "init")])
    cfg, state = load_init_dir(tmp_path / "init")
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=0)


def test_tokenizer_files_travel_with_the_weights(tmp_path):
    src = hf_model(tmp_path / "src", 2)
    (src / "tokenizer.json").write_text("{}")
    main([str(src), "--out", str(tmp_path / "init")])
    assert (tmp_path / "init" / "tokenizer.json").read_text() == "{}"


def expect_error(capsys, src: Path, out: Path, message: str):
    assert main([str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_hugging_face_directories(tmp_path, capsys):
    src = hf_model(tmp_path / "src", 2)
    out = tmp_path / "out" / "init"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))

    moved = src / shards[1]
    moved.rename(tmp_path / "aside")
    expect_error(capsys, src, out, f"{shards[1]}: listed in model.safetensors.index.json but missing")
    (tmp_path / "aside").rename(moved)

    save_file({"x": torch.zeros(1)}, str(src / "model-00099-of-00099.safetensors"))
    expect_error(capsys, src, out, "model-00099-of-00099.safetensors: weight file not listed")
    (src / "model-00099-of-00099.safetensors").unlink()

    first = src / shards[0]
    saved = first.read_bytes()
    with safe_open(str(first), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(first), metadata={"format": "pt"})
    expect_error(capsys, src, out, "'model.layers.0.self_attn.q_proj.bias' is not part of a LLaMA model")
    state.pop("model.layers.0.self_attn.q_proj.bias")
    state.pop(next(iter(state)))
    save_file(state, str(first), metadata={"format": "pt"})
    expect_error(capsys, src, out, "missing from the weight files")
    first.write_bytes(saved)

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    expect_error(capsys, src, out, "rope_scaling")
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    expect_error(capsys, src, out, "beyond the 2 layers config.json declares")
    (src / "config.json").write_text(json.dumps(cfg))

    out.mkdir(parents=True)
    assert main([str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    expect_error(capsys, pickled, tmp_path / "x", "only pickle (*.bin) weights")


def test_load_init_dir_checks_its_input(tmp_path):
    src = hf_model(tmp_path / "src", 2)
    main([str(src), "--out", str(tmp_path / "init")])
    weights = tmp_path / "init" / "model.safetensors"
    state = load_file(weights)
    state.pop("norm.weight")
    save_file(state, str(weights))
    with pytest.raises(KeyError, match="norm.weight"):
        load_init_dir(tmp_path / "init")
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_init_dir(tmp_path)


def test_export_refuses_an_init_dir_that_disagrees_with_its_config(tmp_path):
    from pipeline.export import ExportError

    src = hf_model(tmp_path / "src", 2)
    main([str(src), "--out", str(tmp_path / "init")])
    model_json = tmp_path / "init" / "model.json"
    model_json.write_text(json.dumps({**json.loads(model_json.read_text()), "n_layers": 2}))
    with pytest.raises(ExportError, match="do not match model.json"):
        export(tmp_path / "init", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the LLaMA family people continue from: each config.json's features at a small size -------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILIES = {
    # meta-llama/Llama-2-7b-hf: multi-head attention, theta 1e4, untied.
    "llama-2": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=4096, tie_word_embeddings=False),
    # meta-llama/Llama-3.2-1B: GQA, theta 5e5, llama3 rope scaling, tied embeddings.
    "llama-3.2": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    # TinyLlama/TinyLlama-1.1B: GQA 32/4, untied; here with linear rope scaling ×2 (its long-context variants).
    "tinyllama-linear": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=2048, rope_scaling={"rope_type": "linear", "factor": 2.0},
                             tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M: GQA 9/3, theta 1e5, tied.
    "smollm2": dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, tie_word_embeddings=True),
}


def family_model(path: Path, family: str) -> Path:
    cfg = transformers.LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, vocab_size=256,
                                   head_dim=96 // FAMILIES[family]["num_attention_heads"], **FAMILIES[family])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    (path / "README.md").write_text(f"---\nlicense: test-licence\nbase_model: org/{family}\n---\n# card\n")
    return path


def logits_equal(hf_dir: Path, model: Transformer, tokens: torch.Tensor):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, model.eval()(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_import_train_export(family, tmp_path):
    """HF → import → a few optimizer steps on our model → the exporter → transformers computes our
    logits. Tied bases: untied exactly on import, exported tied while unchanged, untied once trained."""
    from pipeline.hf import INIT_WEIGHTS, model_shapes, write_safetensors

    src = family_model(tmp_path / "src", family)
    import_hf(src, tmp_path / "init")
    cfg, state = load_init_dir(tmp_path / "init")
    meta = json.loads((tmp_path / "init" / "import.json").read_text())
    assert meta["base_model"] == f"org/{family}" and meta["license"] == "test-licence"
    assert meta["source"] == f"https://huggingface.co/org/{family}" and str(tmp_path) not in json.dumps(meta)
    tied = FAMILIES[family]["tie_word_embeddings"]
    assert meta["tied_embeddings"] is tied
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"]) is tied
    assert (cfg.rope_scaling is not None) is ("rope_scaling" in FAMILIES[family])

    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    unchanged = export(tmp_path / "init", tmp_path / "unchanged", check=True)
    assert json.loads((unchanged / "config.json").read_text())["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in tensors(unchanged)) is not tied
    model = Transformer(cfg)
    model.load_state_dict(state)
    logits_equal(unchanged, model, tokens)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model.train()(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained = tmp_path / "trained"
    trained.mkdir()
    for f in ("model.json", "import.json"):
        shutil.copy(tmp_path / "init" / f, trained / f)
    write_safetensors(model_shapes(cfg), iter(model.state_dict().items()), trained, "fp32", max_shard_bytes=None)
    assert (trained / INIT_WEIGHTS).exists()
    out = export(trained, tmp_path / "out", check=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False  # the head moved
    if tied:
        from pipeline.export import ExportError

        with pytest.raises(ExportError, match="tying would change the model"):
            export(trained, tmp_path / "forced", tie="yes")
    logits_equal(out, model, tokens)


def test_truncated_weights_and_an_unwritable_out_are_one_line(tmp_path, capsys):
    """Failed first: a traceback for each (SafetensorError; PermissionError/EROFS from mkdir)."""
    src = hf_model(tmp_path / "hf", n_kv_heads=2, shard="1GB")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    expect_error(capsys, src, tmp_path / "init", f"{weights}: cannot be read")
    weights.write_bytes(data)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # mkdir under it fails as under a read-only mount
    assert main([str(src), "--out", str(blocker / "init")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(blocker) in err, err
