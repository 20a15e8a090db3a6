"""The exported Hugging Face files encode exactly like the SentencePiece model."""
from pathlib import Path

import sentencepiece as spm

from prep_corpus import real_paragraphs
from data_prep.config import TokenizerConfig
from data_prep.tokenizer import export_hf, train_sentencepiece

EDGE_CASES = ["", " ", "  two leading spaces", "trailing  ", "tabs\tand\nnew\n\nlines", "digits 1234567 and 3.14",
              "Ünïcödé, 漢字 and emoji 🙂 fall back to bytes", "a  b   c", "<s> is not special in text </s>"]


def test_autotokenizer_matches_sentencepiece(tmp_path: Path):
    paras = real_paragraphs()
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(paras[::2]), encoding="utf-8")
    model = train_sentencepiece(sample, tmp_path / "tok", TokenizerConfig(vocab_size=1000), 2)
    export_hf(model, tmp_path / "tok")
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in (tmp_path / "tok").iterdir()}

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    texts = paras[1::2][:600] + EDGE_CASES  # held-out real text
    mismatches = [t for t in texts if hf(t)["input_ids"] != [sp.bos_id()] + sp.encode(t)]
    assert not mismatches, mismatches[:3]
    assert hf.decode(hf("Hello  world 42 🙂")["input_ids"], skip_special_tokens=True) == "Hello  world 42 🙂"


def test_llama_like_options(tmp_path: Path):
    sample = tmp_path / "s.txt"
    sample.write_text("\n".join(real_paragraphs()[:400]), encoding="utf-8")
    model = train_sentencepiece(sample, tmp_path, TokenizerConfig(vocab_size=600), 1)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    # split_digits: every digit its own piece; byte_fallback: unseen characters become bytes, not <unk>.
    pieces = sp.encode("2024", out_type=str)
    assert [p.strip("▁") for p in pieces if p.strip("▁")] == ["2", "0", "2", "4"]
    assert sp.unk_id() not in sp.encode("\u16a0\u16a1 runes")
    assert sp.get_piece_size() == 600
