"""Byte-level BPE (tokenizer.type "bpe"): train one with Hugging Face `tokenizers` on the
bounded sample, or take an existing `tokenizer.json`; find its BOS and EOS.

The `tokenizer.json` is the source of truth for ids: the shards hold what `tokenizers`'
`encode` gives for each document, with BOS and EOS as the manifest says
(tests/data_prep/test_bpe.py checks it through the CLI).

A trained tokenizer has Llama 3's layout: its pre-tokenizer (the regex split below, then
bytes to characters without a second regex), the byte-level decoder, and two special tokens,
BOS "<|begin_of_text|>" and EOS "<|end_of_text|>" (ids 0 and 1 here; Llama 3 has them at
128000/128001 after its merges). The pre-tokenizer is Llama 3's so that it is one that tools
know: llama.cpp's converter recognises pre-tokenizers by a hash of the ids a tokenizer gives on a
probe text, which also depends on the merges, so a tokenizer trained here is registered there
as `llama-bpe` by its hash (docs/export.md, "llama.cpp and a byte-level BPE tokenizer").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.config import TokenizerConfig

# Llama 3's pre-tokenizer split (its tokenizer.json): contractions, letters with one leading
# non-letter, numbers of up to 3 digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Conventional names of BOS and EOS among a tokenizer.json's special added tokens (Llama 3,
# LLaMA 2 / Mistral, Gemma; GPT-2 and Qwen use "<|endoftext|>" as their end of text).
BOS_NAMES = (BOS, "<s>", "<bos>")
EOS_NAMES = (EOS, "</s>", "<eos>", "<|endoftext|>")


class TokenizerFileError(ValueError):
    pass


def train_bpe(sample_file: Path, cfg: TokenizerConfig):
    """A `tokenizers.Tokenizer` trained on the sample's lines (each keeps its newline)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    bos, eos = cfg.bos_token or BOS, cfg.eos_token or EOS
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=list(dict.fromkeys([bos, eos])),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(sample_file)], trainer)
    # As Llama 3's: BOS before each text. Data prep adds BOS/EOS itself, as shards.add_bos/add_eos say.
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def save(tok, path: Path) -> None:
    """Write under a temporary name, then rename: a killed run leaves no partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)


def vocab_size(tok) -> int:
    """One more than the largest id: an embedding row for every id, added tokens included."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def special_tokens(path: Path, bos_token: str | None = None, eos_token: str | None = None) -> tuple[str, str]:
    """(BOS, EOS) of a tokenizer.json, by the first rule that names each:
    1. tokenizer.bos_token / eos_token of the config (they must be added tokens of the file);
    2. its post-processor: the special token a TemplateProcessing puts before $A is BOS, the
       one after $A is EOS (Llama 3 names its BOS there);
    3. the first special added token with a conventional name (BOS_NAMES, EOS_NAMES).
    A TokenizerFileError names the file and what to set when a rule finds none."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    added = {t["content"]: t for t in raw.get("added_tokens", [])}
    before, after = _template_specials(raw.get("post_processor"))
    found = []
    for role, given, template, names in (("bos", bos_token, before, BOS_NAMES), ("eos", eos_token, after, EOS_NAMES)):
        if given is not None:
            if given not in added:
                raise TokenizerFileError(f"{path}: tokenizer.{role}_token {given!r} is not one of its added tokens")
            found.append(given)
            continue
        conventional = [n for n in names if n in added and added[n].get("special")]
        pick = template or (conventional[0] if conventional else None)
        if pick is None:
            raise TokenizerFileError(f"{path}: no {role.upper()} token found (not in its post_processor, and none of "
                                     f"{list(names)} is a special added token); set tokenizer.{role}_token")
        found.append(pick)
    return found[0], found[1]


def _template_specials(proc: dict | None) -> tuple[str | None, str | None]:
    """The special tokens a TemplateProcessing (alone or in a Sequence) puts right before and
    right after $A in its single-text template."""
    if not proc:
        return None, None
    if proc.get("type") == "Sequence":
        for p in proc.get("processors", []):
            pair = _template_specials(p)
            if pair != (None, None):
                return pair
        return None, None
    if proc.get("type") != "TemplateProcessing":
        return None, None
    items = proc.get("single", [])
    at = next((i for i, it in enumerate(items) if "Sequence" in it and it["Sequence"]["id"] == "A"), None)
    if at is None:
        return None, None
    special = lambda i: items[i]["SpecialToken"]["id"] if 0 <= i < len(items) and "SpecialToken" in items[i] else None  # noqa: E731
    return special(at - 1), special(at + 1)


def export_hf(tokenizer_json: Path, out_dir: Path, bos: str, eos: str) -> None:
    """tokenizer_config.json and special_tokens_map.json beside a copy of tokenizer_json (its
    bytes unchanged), so that AutoTokenizer in transformers 4.x and 5.x loads out_dir and gives
    `tokenizers`' ids: BOS as the file's post-processor adds it, special tokens' names in text as
    text (tests/pipeline/test_export_bpe.py)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data_prep.tokenizer import save_hf_files

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_json)), bos_token=bos,
                                   eos_token=eos, clean_up_tokenization_spaces=False,
                                   model_max_length=1_000_000_000_000_000_019_884_624_838_656)
    save_hf_files(fast, out_dir, {"bos_token": bos, "eos_token": eos}, {}, keep=tokenizer_json)
