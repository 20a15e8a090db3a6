"""--init-from carries the imported model's settings, checks its tokenizer and records its provenance."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.config import load_profile
from pipeline.data import Manifest
from pipeline.import_hf import import_hf
from pipeline.init_from import InitFromError, adopt

REPO = Path(__file__).resolve().parents[2]
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}


@pytest.fixture(scope="module")
def manifest(prepared_data) -> Manifest:
    return Manifest.load(prepared_data)


@pytest.fixture(scope="module")
def base(manifest, tmp_path_factory) -> Path:
    """A Llama-3-style base (theta 5e5, eps 1e-6, context 2048, llama3 scaling) of the tiny shape,
    with the data's tokenizer."""
    d = tmp_path_factory.mktemp("base")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=manifest.tokenizer.vocab_size,
                                   max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=500000.0,
                                   rope_scaling=ROPE)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf")
    for f in manifest.tokenizer.directory.iterdir():
        shutil.copy(f, d / "hf" / f.name)
    return import_hf(d / "hf", d / "init", base_model="org/base-3", license="llama3.2", base_tokens=9_000_000)


def profile(manifest: Manifest, *overrides: str):
    return load_profile(REPO / "ds_configs" / "tiny_cpu.json", 2,
                        [f"data.manifest={manifest.path}", "model.max_seq_len=null", *overrides],
                        vocab_size=manifest.tokenizer.vocab_size)


def test_imported_settings_are_carried_and_recorded(manifest, base):
    init = adopt(profile(manifest), manifest, base)
    m = init.profile.model
    assert (m.rope_theta, m.norm_eps, m.max_seq_len) == (500000.0, 1e-6, 2048)
    assert m.rope_scaling.rope_type == "llama3" and m.rope_scaling.original_max_position_embeddings == 1024
    saved = init.profile.resolved_dict()  # what profile.json beside every checkpoint holds
    assert saved["model"]["rope_theta"] == 500000.0 and saved["model"]["rope_scaling"]["factor"] == 8.0
    assert saved["base_model"] == {"base_model": "org/base-3", "source": "https://huggingface.co/org/base-3",
                                   "license": "llama3.2", "base_tokens": 9_000_000,
                                   "tied_embeddings": False, "context": 2048, "vocabulary_remapped": False}
    assert json.dumps(saved)  # JSON as written


@pytest.mark.parametrize("override,message", [
    ("model.rope_theta=10000", "model.rope_theta=10000.0 contradicts the imported model's 500000.0"),
    ("model.norm_eps=1e-5", "model.norm_eps=1e-05 contradicts the imported model's 1e-06"),
    ("model.max_seq_len=256", "model.max_seq_len=256 contradicts the imported model's 2048"),
    ('model.rope_scaling={"rope_type": "linear", "factor": 2.0}', "model.rope_scaling="),
    ("model.dim=128", "dim 64 ≠ 128"),
])
def test_a_contradicting_profile_is_refused_naming_both_values(manifest, base, override, message):
    with pytest.raises(InitFromError) as e:
        adopt(profile(manifest, override), manifest, base)
    assert message in str(e.value) and "\n" not in str(e.value)


def swapped_tokenizer(base: Path, to: Path, a: int, b: int) -> Path:
    """`base` with a tokenizer.json whose tokens `a` and `b` trade ids (and no tokenizer.model)."""
    shutil.copytree(base, to)
    (to / "tokenizer.model").unlink(missing_ok=True)
    spec = json.loads((to / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    ka, kb = [k for k, v in vocab.items() if v == a][0], [k for k, v in vocab.items() if v == b][0]
    vocab[ka], vocab[kb] = b, a
    (to / "tokenizer.json").write_text(json.dumps(spec))
    return to


def test_the_imported_tokenizer_must_be_the_datas(manifest, base, tmp_path):
    other = swapped_tokenizer(base, tmp_path / "other", 300, 301)
    with pytest.raises(InitFromError, match=r"the imported tokenizer is not the data's .*2 ids differ \(first: id 300"):
        adopt(profile(manifest), manifest, other)
    # The same tokens under another file (tokenizer.json instead of tokenizer.model) pass.
    assert adopt(profile(manifest), manifest, swapped_tokenizer(base, tmp_path / "same", 300, 300)).rows is None

    none = shutil.copytree(base, tmp_path / "none")
    for f in ("tokenizer.model", "tokenizer.json"):
        (none / f).unlink()
    with pytest.raises(InitFromError, match="no tokenizer.model or tokenizer.json"):
        adopt(profile(manifest), manifest, none)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> tuple[Manifest, Path]:
    """Data prep with a byte-level BPE trained on real text, and a Llama-3-style base of the tiny
    shape published with that tokenizer.json."""
    import subprocess
    import sys

    from runs import cpu_env

    d = tmp_path_factory.mktemp("bpe")
    config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
    config["sources"][0]["max_bytes"] = 2_000_000
    config["tokenizer"] = {"type": "bpe", "vocab_size": 600}
    (d / "prep.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(d / "prep.json"), "--out", str(d / "data")],
                   cwd=REPO, env=cpu_env(), check=True, capture_output=True, timeout=600)
    manifest = Manifest.load(d / "data" / "shards" / "manifest.json")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=manifest.tokenizer.vocab_size,
                                   max_position_embeddings=2048, rope_theta=500000.0, rope_scaling=ROPE,
                                   bos_token_id=manifest.tokenizer.bos_id, eos_token_id=manifest.tokenizer.eos_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf")
    shutil.copy(manifest.tokenizer.model_path, d / "hf" / "tokenizer.json")
    return manifest, import_hf(d / "hf", d / "init", base_model="org/base-3", license="llama3.2")


def test_bpe_data_is_compared_with_the_imported_tokenizer_json(bpe_data, tmp_path):
    # Failed first: the data's tokenizer.json was read as a SentencePiece model.
    manifest, base = bpe_data
    assert adopt(profile(manifest), manifest, base).rows is None  # the data's own file
    # The same tokens in another file (re-serialised: another sha256) pass; two ids traded do not.
    assert adopt(profile(manifest), manifest, swapped_tokenizer(base, tmp_path / "same", 300, 300)).rows is None
    with pytest.raises(InitFromError, match=r"the imported tokenizer is not the data's .*2 ids differ \(first: id 300"):
        adopt(profile(manifest), manifest, swapped_tokenizer(base, tmp_path / "other", 300, 301))
    rows = adopt(profile(manifest), manifest, swapped_tokenizer(base, tmp_path / "remap", 300, 301), remap=True).rows
    assert rows[300].item() == 301 and rows[301].item() == 300 and rows[:300].tolist() == list(range(300))


def test_remap_vocab_carries_rows_over_by_token(manifest, base, tmp_path):
    other = swapped_tokenizer(base, tmp_path / "other", 300, 301)
    init = adopt(profile(manifest), manifest, other, remap=True)
    assert init.profile.base_model["vocabulary_remapped"] is True
    weights = init.weights()
    plain = adopt(profile(manifest), manifest, base).weights()
    for name in ("tok_embeddings.weight", "output.weight"):
        got, src = weights[name], plain[name]
        assert torch.equal(got[300], src[301]) and torch.equal(got[301], src[300]), name
        assert torch.equal(got[:300], src[:300]) and torch.equal(got[302:], src[302:]), name
    with pytest.raises(InitFromError, match="drop the flag"):
        adopt(profile(manifest), manifest, base, remap=True)


def test_a_pipeline_stage_reads_only_its_own_tensors(manifest, base, monkeypatch):
    """What the trainer hands a pipeline rank reads nothing until its stage asks, then only that
    stage's tensors (not the whole fp32 model on every rank)."""
    import safetensors

    from pipeline.train import initial_weights

    read = []
    real = safetensors.safe_open

    class Counting:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, attr):  # keys, get_slice: headers only
            return getattr(self.h, attr)

        def get_tensor(self, name):
            read.append(name)
            return self.h.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    pipe = load_profile(REPO / "ds_configs" / "tiny_cpu_pipeline.json", 2,
                        [f"data.manifest={manifest.path}", "model.max_seq_len=null"], vocab_size=manifest.tokenizer.vocab_size)
    init = adopt(pipe, manifest, base)
    weights = initial_weights(init, init.profile)
    assert read == []
    last_stage = [n for n in weights if n.startswith("layers.1.") or n in ("norm.weight", "output.weight")]
    for name in last_stage:
        weights[name]
    assert sorted(read) == sorted(last_stage)


def test_weights_are_read_per_tensor_in_the_runs_layout(manifest, base):
    init = adopt(profile(manifest, "model.fused_projections=true"), manifest, base)
    weights = init.weights()
    assert "layers.1.attention.wqkv.weight" in weights and "layers.1.attention.wq.weight" not in weights
    wqkv = weights["layers.1.attention.wqkv.weight"]
    from safetensors.torch import load_file

    raw = load_file(base / "model.safetensors")
    assert torch.equal(wqkv, torch.cat([raw[f"layers.1.attention.w{x}.weight"] for x in "qkv"]))
