"""pipeline/to_gguf.py: an exported directory as one GGUF file that llama.cpp runs. The export
tests (test_export.py) run it on trained SentencePiece and byte-level BPE exports; these cover
what a published Llama-3-style directory adds (llama3 rope scaling, bf16) and the refusals."""
from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import REPO
from test_export import assert_llama_cpp_agrees, licence_texts, llama_cpp


def tiny_bpe_dir(tmp_path: Path, *, gpt2_pre: bool = False, rope_scaling: dict | None = None) -> tuple[Path, object]:
    """A Llama-3-style Hugging Face directory: a byte-level BPE trained by data prep on real text
    and a random tiny LlamaForCausalLM."""
    import transformers
    from tokenizers import pre_tokenizers

    from data_prep.bpe import export_hf, save, train_bpe
    from data_prep.config import TokenizerConfig

    (tmp_path / "sample.txt").write_text("\n".join(t[:20000] for t in licence_texts()[:20]))
    tok = train_bpe(tmp_path / "sample.txt", TokenizerConfig(type="bpe", vocab_size=700))
    if gpt2_pre:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    save(tok, tmp_path / "tokenizer.json")
    cfg = transformers.LlamaConfig(vocab_size=768, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=False,
                                   bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                                   eos_token_id=tok.token_to_id("<|end_of_text|>"))
    torch.manual_seed(3)
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    export_hf(tmp_path / "tokenizer.json", hf, "<|begin_of_text|>", "<|end_of_text|>")
    return hf, tok


def to_gguf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.to_gguf", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_llama3_rope_scaling_and_the_tokenizer_run_in_llama_cpp(tmp_path):
    """llama3 rope scaling is the rope_freqs tensor llama.cpp divides by: with a short original
    context every frequency band is scaled, and llama.cpp's logits are transformers'."""
    import gguf

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf, tok = tiny_bpe_dir(tmp_path, rope_scaling=scaling)
    proc = to_gguf("--hf", str(hf), "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.tokens"]) == 768  # padded to the embedding rows
    merges = json.loads((hf / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == tok.token_to_id("<|begin_of_text|>")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    # 1 for the high frequencies, the factor for the low ones, and llama3's smooth band between
    assert factors.min() == 1.0 and factors.max() == pytest.approx(8.0) and ((factors > 1) & (factors < 8)).any()
    tok.encode_special_tokens = True
    texts = [t[:1500] for t in licence_texts()[20:23]] + ["café 123  \t tabs ✓ 漢字 🙂 <|end_of_text|>"]
    assert_llama_cpp_agrees(tmp_path / "m.gguf", hf, texts, [tok.encode(t).ids for t in texts])


def test_bf16_weights_are_the_rounded_weights_and_run_in_llama_cpp(tmp_path):
    import gguf
    import transformers
    from safetensors.torch import load_file

    hf, tok = tiny_bpe_dir(tmp_path)
    assert to_gguf("--hf", str(hf), "--out", str(tmp_path / "m.gguf"), "--type", "bf16").returncode == 0
    weights = load_file(hf / "model.safetensors")
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    embedding = torch.from_numpy(stored["token_embd.weight"].data.copy()).view(torch.bfloat16)
    assert torch.equal(embedding.reshape(768, 64), weights["model.embed_tokens.weight"].to(torch.bfloat16))
    assert stored["output_norm.weight"].data.dtype == "float32"  # norms stay f32, as llama.cpp wants them
    ids = tok.encode(licence_texts()[0][:1000]).ids
    _, logits = llama_cpp(tmp_path / "m.gguf", [], ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    # llama.cpp also rounds activations to bf16 for its bf16 products: bf16-sized differences only
    assert (logits - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())


def test_an_unknown_pre_tokenizer_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    hf, _ = tiny_bpe_dir(tmp_path, gpt2_pre=True)
    proc = to_gguf("--hf", str(hf), "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "tokenizer.json: pre_tokenizer" in proc.stderr, proc.stderr
    assert not glob.glob(str(tmp_path / "*m.gguf*"))
    proc = to_gguf("--hf", str(tmp_path), "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 2 and "config.json: missing" in proc.stderr and proc.stderr.count("\n") == 1
