"""The tokenizer a run applies, behind one interface: a SentencePiece `tokenizer.model` or a
`tokenizers` `tokenizer.json` (tokenizer.type), loaded once per process.

`encode(texts, add_bos, add_eos)` gives each text's ids with BOS/EOS around them, on one
thread (a tokenize task is one core's work: the executor runs one process per core);
`vocab()` the manifest's tokenizer fields.
"""
from __future__ import annotations

import os
from pathlib import Path

from data_prep.config import TokenizerConfig

_cache: dict[tuple, object] = {}


def load(model_file: Path, cfg: TokenizerConfig):
    key = (str(model_file), cfg.type, cfg.bos_token, cfg.eos_token)
    if key not in _cache:
        _cache[key] = BpeEncoder(model_file, cfg) if cfg.type == "bpe" else SentencePieceEncoder(model_file)
    return _cache[key]


def described(model_file: Path, tokenizer: dict):
    """The encoder of a manifest's `tokenizer` section (docs/formats.md; no `type`: SentencePiece)."""
    kind = tokenizer.get("type", "sentencepiece")
    names = {k: tokenizer.get(k) for k in ("bos_token", "eos_token")} if kind == "bpe" else {}
    return load(model_file, TokenizerConfig(type=kind, **names))


class SentencePieceEncoder:
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def vocab(self) -> dict:
        sp = self.sp
        return {"type": "sentencepiece", "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
                "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}

    def encode(self, texts: list[str], add_bos: bool, add_eos: bool) -> list[list[int]]:
        return self.sp.encode(texts, add_bos=add_bos, add_eos=add_eos, num_threads=1)


class BpeEncoder:
    """`tokenizers`' encode of the file, with its post-processor replaced by BOS/EOS as the
    shards want them (in Rust: no per-token Python work). Special tokens typed in a document
    are text, as they are to SentencePiece: a document that contains "<|end_of_text|>" does not
    end there (`encode_special_tokens`)."""

    def __init__(self, path: Path, cfg: TokenizerConfig):
        from tokenizers import Tokenizer

        from data_prep.bpe import special_tokens, vocab_size

        # One thread per process; set before any encode, so that workers forked from this
        # process also run single-threaded (and `tokenizers` has no fork to warn about).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tok = Tokenizer.from_file(str(path))
        self.bos, self.eos = special_tokens(path, cfg.bos_token, cfg.eos_token)
        self.bos_id, self.eos_id = self.tok.token_to_id(self.bos), self.tok.token_to_id(self.eos)
        self.size = vocab_size(self.tok)
        self.tok.encode_special_tokens = True
        self._with = {}  # (add_bos, add_eos) -> post-processor

    def vocab(self) -> dict:
        return {"type": "bpe", "vocab_size": self.size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": -1,
                "unk_id": -1, "bos_token": self.bos, "eos_token": self.eos}

    def encode(self, texts: list[str], add_bos: bool, add_eos: bool) -> list[list[int]]:
        self.tok.post_processor = self._processor(add_bos, add_eos)
        # encode_batch_fast: ids without character offsets, which the shards do not keep.
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=True)]

    def _processor(self, add_bos: bool, add_eos: bool):
        from tokenizers import processors

        key = (add_bos, add_eos)
        if key not in self._with:
            single = " ".join([self.bos] * add_bos + ["$A"] + [self.eos] * add_eos)
            specials = list({t: i for t, i in ((self.bos, self.bos_id), (self.eos, self.eos_id))}.items())
            self._with[key] = processors.TemplateProcessing(single=single, pair=f"{single} $B", special_tokens=specials)
        return self._with[key]
