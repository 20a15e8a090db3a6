"""tokenizer.type "bpe" through the CLI: the shards hold `tokenizers`' own encode of each
document, a trained tokenizer is the same on a rerun, an existing Llama-3-style tokenizer.json
is used unchanged with its own BOS/EOS, and a vocabulary over 65,535 gives uint32 shards that
the trainer's loader reads."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from prep_corpus import real_documents, tiny_config, write_config, write_jsonl
from data_prep.bpe import LLAMA3_PATTERN, TokenizerFileError, special_tokens
from data_prep.clean import Cleaner
from data_prep.config import CleanConfig, ConfigError, load_config
from pipeline.data import Manifest, TokenStream

ROOT = Path(__file__).resolve().parents[2]
# Text that byte-level BPE must carry exactly: whitespace runs, digits, non-Latin scripts, emoji,
# and a special token's name typed in a document (text, not EOS).
EDGE = ["  runs  of   spaces  ", "tabs\tand\nnew\n\nlines, digits 1234567 and 3.14",
        "Ünïcödé, 漢字, русский текст and emoji 🙂👍🏽", "a document that mentions <|end_of_text|> and <|begin_of_text|> inline"]


def _run(cfg: Path, out: Path, *extra):
    r = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(cfg), "--out", str(out), *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _corpus(d: Path) -> dict[str, str]:
    """Writes the input; returns each document's text as the prepare stage cleans it."""
    docs = {f"d{i}": t for i, t in enumerate(real_documents(120)[:80] + EDGE)}
    write_jsonl(d / "in" / "a.jsonl", [{"id": k, "text": t} for k, t in docs.items()])
    cleaner = Cleaner(CleanConfig())
    return {k: cleaner.clean(t) for k, t in docs.items()}


def _config(d: Path, name: str, tokenizer: dict) -> Path:
    src = [{"name": "web", "type": "jsonl", "paths": [str(d / "in")], "id_field": "id"}]
    return write_config(d / name, tiny_config(src, tokenizer=tokenizer, shards={"target_bytes": 20_000, "validation_fraction": 0.1}))


def _documents(out: Path) -> tuple[dict, list[list[int]]]:
    m = json.loads((out / "shards" / "manifest.json").read_text())
    docs = []
    for sh in m["shards"]:
        table = pa.ipc.open_stream(pa.memory_map(str(out / "shards" / sh["path"]))).read_all()
        assert str(table.schema.field("input_ids").type) == f"list<item: {m['dtype']}>"
        docs += table.column("input_ids").to_pylist()
    return m, docs


def _check_ids_are_tokenizers_encode(m: dict, docs: list[list[int]], texts: dict[str, str], tok_file: Path):
    """Each shard document decodes to one input text, and its ids are `Tokenizer.encode` of that
    text (BOS from the tokenizer's post-processor) plus EOS; every input document is there once."""
    tok = Tokenizer.from_file(str(tok_file))
    bos, eos = m["tokenizer"]["bos_id"], m["tokenizer"]["eos_id"]
    by_text = {t: k for k, t in texts.items()}
    seen = []
    for ids in docs:
        assert ids[0] == bos and ids[-1] == eos and eos not in ids[1:-1]
        text = tok.decode(ids[1:-1], skip_special_tokens=False)
        assert text in by_text, text[:200]
        seen.append(by_text[text])
        if "<|" in text:  # special tokens' names in a document are text (data_prep.encoders.BpeEncoder)
            plain = Tokenizer.from_file(str(tok_file))
            plain.encode_special_tokens = True
            assert ids == plain.encode(text).ids + [eos]
        else:
            assert ids == tok.encode(text).ids + [eos]
    assert sorted(seen) == sorted(texts)


def test_trained_bpe_shards_are_tokenizers_encode_and_a_rerun_is_identical(tmp_path):
    texts = _corpus(tmp_path)
    cfg = _config(tmp_path, "prep.json", {"type": "bpe", "vocab_size": 600})
    _run(cfg, tmp_path / "out")
    out = tmp_path / "out"
    m, docs = _documents(out)
    tok_file = out / "tokenizer" / "tokenizer.json"
    t = m["tokenizer"]
    assert (m["dtype"], t["type"], t["model"], t["vocab_size"], t["bos_id"], t["eos_id"]) == \
        ("uint16", "bpe", "../tokenizer/tokenizer.json", 600, 0, 1)
    assert (t["bos_token"], t["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert t["sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert not (out / "tokenizer" / "tokenizer.model").exists()
    raw = json.loads(tok_file.read_text())
    assert raw["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_PATTERN
    assert raw["decoder"]["type"] == "ByteLevel"
    _check_ids_are_tokenizers_encode(m, docs, texts, tok_file)
    # The trainer's reader: Manifest.load and the token stream give the shards' ids.
    man = Manifest.load(out / "shards" / "manifest.json")
    assert (man.tokenizer.model_path, man.tokenizer.vocab_size) == (tok_file.resolve(), 600)
    # A rerun in another process (another hash seed), one worker: the same tokenizer and shards.
    _run(cfg, tmp_path / "again", "--workers", "1")
    for f in ("tokenizer/tokenizer.json", "shards/manifest.json"):
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f


def _llama3_style(path: Path, sample: list[str], reserved: int) -> Path:
    """A tokenizer.json laid out as Llama 3's: byte-level BPE, then `reserved` reserved special
    tokens, then BOS and EOS at the top (Llama 3: 128000/128001), BOS added by its
    post-processor, no EOS there."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(reserved)] + ["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(path))
    return path


def test_existing_llama3_style_tokenizer_over_65535_ids_gives_uint32_shards_the_loader_reads(tmp_path):
    texts = _corpus(tmp_path)
    existing = _llama3_style(tmp_path / "base-tokenizer.json", real_documents(120)[80:], reserved=70_000)
    _run(_config(tmp_path, "prep.json", {"type": "bpe", "existing": str(existing)}), tmp_path / "out")
    out = tmp_path / "out"
    m, docs = _documents(out)
    t = m["tokenizer"]
    assert (m["dtype"], t["vocab_size"], t["bos_id"], t["eos_id"]) == ("uint32", 70_502, 70_500, 70_501)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == existing.read_bytes()  # used unchanged
    _check_ids_are_tokenizers_encode(m, docs, texts, existing)
    # pipeline/data.py reads the uint32 shards: ids above 65,535 come back whole.
    man = Manifest.load(out / "shards" / "manifest.json")
    stream = TokenStream(man, list(man.shards))
    flat = [i for d in docs for i in d]
    assert man.dtype == "uint32" and stream.num_tokens == len(flat)
    assert stream.read(0, len(flat)).tolist() == flat and max(flat) == 70_501


def _bare(path: Path, added: list[dict], post_processor=None) -> Path:
    path.write_text(json.dumps({"added_tokens": added, "post_processor": post_processor}))
    return path


def test_bos_and_eos_rule(tmp_path):
    s = lambda name: {"content": name, "special": True}  # noqa: E731
    # Conventional names among special added tokens (LLaMA 2 / Mistral layout, no template).
    assert special_tokens(_bare(tmp_path / "a.json", [s("<unk>"), s("<s>"), s("</s>")])) == ("<s>", "</s>")
    # The post-processor's template names BOS before $A and EOS after it, over the names.
    tmpl = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[B]", "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}},
                                                     {"SpecialToken": {"id": "[E]", "type_id": 0}}]}
    f = _bare(tmp_path / "b.json", [s("<s>"), s("</s>"), s("[B]"), s("[E]")], tmpl)
    assert special_tokens(f) == ("[B]", "[E]")
    # The config's names win, and must be added tokens of the file.
    assert special_tokens(f, "</s>", "<s>") == ("</s>", "<s>")
    with pytest.raises(TokenizerFileError, match=r"b.json: tokenizer.eos_token 'nope' is not one of its added tokens"):
        special_tokens(f, None, "nope")
    # None found: one error naming the file and the field to set.
    with pytest.raises(TokenizerFileError, match=r"c.json: no EOS token found .* set tokenizer.eos_token$"):
        special_tokens(_bare(tmp_path / "c.json", [s("<|begin_of_text|>"), {"content": "</s>", "special": False}]))


@pytest.mark.parametrize("tokenizer, message", [
    ({"type": "bpe", "model_type": "unigram"}, "model_type: a SentencePiece option, but tokenizer.type is 'bpe'"),
    ({"existing": "tok.json"}, "existing: an option of tokenizer.type 'bpe' (got type 'sentencepiece')"),
    ({"type": "bpe", "existing": "missing.json"}, "existing: no such file: missing.json"),
])
def test_tokenizer_type_misconfiguration_is_one_line(tmp_path, tokenizer, message):
    (tmp_path / "tok.json").write_text("{}")
    tokenizer = {k: str(tmp_path / v) if k == "existing" else v for k, v in tokenizer.items()}
    cfg = write_config(tmp_path / "c.json", tiny_config([{"name": "x", "type": "jsonl", "paths": ["a"]}], tokenizer=tokenizer))
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    line = f"{cfg}: tokenizer." + message.replace("missing.json", str(tmp_path / "missing.json"))
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_a_vocabulary_the_sample_cannot_fill_is_refused(tmp_path):
    # `tokenizers` itself stops short without a word; SentencePiece refuses, and so does this.
    from data_prep.config import TokenizerConfig
    from data_prep.stages import StageError, _train

    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(real_documents(120)[:3]), encoding="utf-8")
    with pytest.raises(StageError, match=r"^tokenizer.vocab_size: 50000 is more than the training sample supports "
                                         r"\(\d+ tokens\); lower it"):
        _train(sample, tmp_path, TokenizerConfig(type="bpe", vocab_size=50_000), 1)
    assert not (tmp_path / "tokenizer.json").exists()
