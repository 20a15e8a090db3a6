"""Tokenizer stage: train a LLaMA-like SentencePiece BPE model on a bounded sample and export
the Hugging Face tokenizer files next to it.

The `.model` is the source of truth for ids. The Hugging Face files are built directly from
its protobuf with the `tokenizers` library (vocab + merges, byte fallback, the "▁" prefix
normaliser LLaMA uses) and are checked against sentencepiece in tests/data_prep/test_tokenizer.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_prep.config import TokenizerConfig

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def train_sentencepiece(sample_file: Path, out_dir: Path, cfg: TokenizerConfig, threads: int) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f".spm.tmp{os.getpid()}"
    spm.set_random_generator_seed(cfg.seed)
    spm.SentencePieceTrainer.train(
        input=str(sample_file),
        model_prefix=str(prefix),
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        # LLaMA's options: bytes for anything out of vocabulary, one digit per token,
        # no Unicode normalisation in the model (cleaning did NFC) and whitespace kept as is.
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        user_defined_symbols=cfg.user_defined_symbols,
        max_sentence_length=cfg.max_sentence_length,
        # The sample is already the deterministic subset we want: no resampling, no shuffling.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        train_extremely_large_corpus=False,
        num_threads=threads,
        minloglevel=2,
    )
    final = out_dir / "tokenizer.model"
    _normalise_spec(Path(f"{prefix}.model"), final)
    os.unlink(f"{prefix}.model")
    os.unlink(f"{prefix}.vocab")
    return final


def _normalise_spec(src: Path, dst: Path) -> None:
    """The trainer records its temporary prefix, input path and thread count in the model;
    fixed values here make the same sample give the same bytes on any machine and rerun."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    proto.trainer_spec.model_prefix = "tokenizer"
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append("tokenizer_sample.txt")
    proto.trainer_spec.num_threads = 1
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.write_bytes(proto.SerializeToString(deterministic=True))
    os.replace(tmp, dst)


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece BPE vocab: a piece is the merge of any two
    pieces that concatenate to it; merges rank by the merged piece's id (its score order)."""
    merges = []
    for piece, pid in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((l, r, pid) for l, r in local)
    merges.sort(key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    return [(l, r) for l, r, _ in merges]


def build_hf_tokenizer(model_file: Path, add_bos: bool = True, add_eos: bool = False):
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: Hugging Face export supports BPE models only")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = Tokenizer(BPE(vocab, _merges(vocab), unk_token=UNK, fuse_unk=True, byte_fallback=True))
    # SentencePiece with add_dummy_prefix and identity normalisation: one "▁" before the
    # text, spaces -> "▁". Known gap: with user-defined symbols the `tokenizers` normaliser
    # runs per segment around them, and the "▁" next to a symbol can differ from spm (there
    # are none by default; the parity test covers the default).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = [AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.CONTROL]
    special += [AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.UNKNOWN]
    user = [AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    single = ([f"{BOS}:0"] if add_bos else []) + ["$A:0"] + ([f"{EOS}:0"] if add_eos else [])
    pair = single + ([f"{BOS}:1"] if add_bos else []) + ["$B:1"] + ([f"{EOS}:1"] if add_eos else [])
    specials = [(t, vocab[t]) for t, on in ((BOS, add_bos), (EOS, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
    return tok


def export_hf(model_file: Path, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json beside the model.

    add_bos=True, add_eos=False: what a causal LM wants at inference; the shards carry
    EOS per document as the manifest says.
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(model_file),
        bos_token=BOS, eos_token=EOS, unk_token=UNK,
        add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000_000_000_019_884_624_838_656,
    )
    save_hf_files(fast, out_dir, {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}, {"legacy": False})


def save_hf_files(fast, out_dir: Path, special: dict, extra: dict, keep: Path | None = None) -> None:
    """`fast.save_pretrained` into out_dir, in a form transformers 4.x and 5.x both load;
    `keep`: a tokenizer.json written unchanged in place of the re-serialised one."""
    tmp = out_dir.parent / f".{out_dir.name}.hf.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = {**json.loads(cfg_path.read_text()), **extra}
    # transformers 5 names its class "TokenizersBackend", which 4.x cannot load; this one loads in both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # A special token's name typed in a document is text to data prep (SentencePiece, and
    # data_prep.encoders.BpeEncoder); without this, transformers would turn it into its id.
    cfg["split_special_tokens"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    if keep is not None:
        shutil.copyfile(keep, tmp / "tokenizer.json")
    for f in sorted(tmp.iterdir()):
        os.replace(f, out_dir / f.name)
    shutil.rmtree(tmp)
