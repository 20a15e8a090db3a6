"""Write an exported Hugging Face LLaMA directory as one GGUF file that llama.cpp runs.

    python -m pipeline.to_gguf --hf runs/demo/hf --out runs/demo/model.gguf [--type f32|f16|bf16]

or `python -m pipeline.export ... --gguf FILE`, which writes it after the export. The input is a
directory written by `pipeline.export` (config.json, safetensors, and the tokenizer: a
SentencePiece tokenizer.model, or a byte-level BPE tokenizer.json with Llama 3's
pre-tokenizer).

llama.cpp's own converter (`convert_hf_to_gguf.py`) names a byte-level BPE's pre-tokenizer by
the hash of the ids it gives for a probe text, so it refuses every BPE trained here: the ids,
and so the hash, depend on the merges. This writer reads the pre-tokenizer itself from
tokenizer.json and names it (`llama-bpe` for Llama 3's split pattern); anything else is refused
in one line. The GGUF is written with llama.cpp's own `gguf` library, one tensor at a time (memory
holds one tensor), under a temporary name renamed when complete. Tensor layout follows llama.cpp's
`llama` architecture: q and k rows are in the interleaved rotary order it applies (the inverse of
the half-split order of the Hugging Face files), 1-D norms stay float32, and llama3 rope scaling is
the `rope_freqs` tensor of per-frequency factors. See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.hf import config_from_hf, hf_weight_files, safetensors_entries
from pipeline.model import scale_frequencies

TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FROM_CONFIG_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class GGUFError(ValueError):
    pass


def interleave_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from the half-split rotary order (Hugging Face: the first half
    of each head's rows are the pairs' first elements) to the interleaved order llama.cpp rotates
    (pair i in rows 2i and 2i+1)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    from data_prep.bpe import LLAMA3_PATTERN

    raw = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre, model = raw.get("pre_tokenizer") or {}, raw.get("model") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = steps[0] if kinds == ["Split", "ByteLevel"] else {}
    if (model.get("type") == "BPE" and not model.get("byte_fallback") and raw.get("normalizer") is None
            and split.get("pattern", {}).get("Regex") == LLAMA3_PATTERN and not steps[-1].get("use_regex", True)):
        return "llama-bpe"
    raise GGUFError(f"{tokenizer_json}: pre_tokenizer {kinds} with its pattern is not Llama 3's byte-level BPE "
                    "(Split on data_prep.bpe.LLAMA3_PATTERN, then ByteLevel without its own regex), the one this "
                    "writer names for llama.cpp")


def bpe_vocab(tokenizer_json: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id and llama.cpp token types: special added tokens are CONTROL, other
    added tokens USER_DEFINED; ids past the tokenizer up to the embedding rows are UNUSED."""
    import gguf

    raw = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in raw["model"]["vocab"].items()}
    for t in raw.get("added_tokens", []):
        tokens[t["id"]] = (t["content"], gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    return _padded(tokens, n_vocab, tokenizer_json)


def _padded(tokens: dict[int, tuple[str, int]], n_vocab: int, where: Path) -> tuple[list[str], list[int]]:
    """(strings, types) for ids 0..n_vocab-1: ids the tokenizer lacks are unused "[PADi]" rows."""
    import gguf

    if max(tokens) >= n_vocab:
        raise GGUFError(f"{where}: id {max(tokens)} is past the model's {n_vocab} embedding rows")
    rows = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    return [t for t, _ in rows], [k for _, k in rows]


def sentencepiece_vocab(model: Path, n_vocab: int) -> tuple[list[str], list[int], list[float], bool]:
    """Pieces, llama.cpp token types and scores by id of a SentencePiece model, and whether it
    adds the "▁" prefix (llama.cpp's add_space_prefix)."""
    import gguf
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    sp = SentencePieceProcessor(model_file=str(model))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    kind = lambda i: (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)  # noqa: E731
                      else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                      else gguf.TokenType.NORMAL)
    tokens = {i: (sp.id_to_piece(i), kind(i), sp.get_score(i)) for i in range(sp.vocab_size())}
    pieces, types = _padded({i: t[:2] for i, t in tokens.items()}, n_vocab, model)
    scores = [tokens[i][2] if i in tokens else -1000.0 for i in range(n_vocab)]
    return pieces, types, scores, proto.normalizer_spec.add_dummy_prefix


def add_tokenizer(writer, hf_dir: Path, n_vocab: int) -> None:
    import gguf

    if (hf_dir / "tokenizer.model").exists():
        tokens, types, scores, space_prefix = sentencepiece_vocab(hf_dir / "tokenizer.model", n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(space_prefix)
        merges = False
    elif (hf_dir / "tokenizer.json").exists():
        tokens, types = bpe_vocab(hf_dir / "tokenizer.json", n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(hf_dir / "tokenizer.json"))
        merges = True
    else:
        raise GGUFError(f"{hf_dir}: no tokenizer.model or tokenizer.json")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # BOS/EOS ids, whether BOS is added, and the merges, as the transformers files give them.
    special = gguf.SpecialVocab(hf_dir, load_merges=merges, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)


def add_hyperparameters(writer, hf: dict, cfg, file_type: int) -> None:
    writer.add_context_length(hf.get("max_position_embeddings", cfg.max_seq_len))
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)


def rope_factors(cfg) -> torch.Tensor | None:
    """llama3 rope scaling as llama.cpp takes it: per frequency, the factor it divides by."""
    if cfg.rope_scaling is None or cfg.rope_scaling.rope_type != "llama3":
        return None
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    return inv_freq / scale_frequencies(inv_freq, cfg.rope_scaling)


def gguf_tensors(hf_dir: Path, cfg, dtype: torch.dtype):
    """(GGUF name, shape, lazy array) of every tensor in file order, without reading data."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.kv_heads}
    factors = rope_factors(cfg)
    if factors is not None:
        yield "rope_freqs.weight", tuple(factors.shape), lambda: factors.numpy()
    for path, fh, name, _ in safetensors_entries(hf_weight_files(hf_dir)):
        target = names.get_name(name, try_suffixes=(".weight",))
        if target is None:
            raise GGUFError(f"{path}: tensor {name} has no GGUF llama name")
        shape = tuple(fh.get_slice(name).get_shape())

        def load(path=path, name=name, target=target, shape=shape):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name).float()
            part = target.split(".")[-2]
            if part in heads:
                t = interleave_rotary(t, heads[part])
            return as_array(t, torch.float32 if len(shape) == 1 else dtype)

        yield target, shape, load


def as_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """numpy data of `t` in `dtype` (bf16 as its raw 16-bit words, as gguf writes it)."""
    t = t.to(dtype).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()


def write_gguf(hf_dir: str | Path, out: str | Path, kind: str | None = None) -> Path:
    import gguf

    hf_dir, out = Path(hf_dir), Path(out)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
        cfg = config_from_hf(hf)
    except FileNotFoundError:
        raise GGUFError(f"{hf_dir / 'config.json'}: missing; --hf must be an exported Hugging Face directory") from None
    except (ValueError, KeyError) as e:
        raise GGUFError(f"{hf_dir / 'config.json'}: {e}") from None
    kind = kind or FROM_CONFIG_DTYPE.get(hf.get("torch_dtype") or hf.get("dtype"), "f32")
    if kind not in TYPES:
        raise GGUFError(f"--type {kind!r}: expected one of {sorted(TYPES)}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[kind]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(hf_dir.name)
        add_hyperparameters(writer, hf, cfg, file_type)
        add_tokenizer(writer, hf_dir, cfg.vocab_size)
        tensors = list(gguf_tensors(hf_dir, cfg, TYPES[kind]))
        sizes = []
        for name, shape, _ in tensors:
            t32 = len(shape) == 1 or name == "rope_freqs.weight" or kind == "f32"
            raw = gguf.GGMLQuantizationType.F32 if t32 else (gguf.GGMLQuantizationType.F16 if kind == "f16"
                                                              else gguf.GGMLQuantizationType.BF16)
            sizes.append(int(np.prod(shape)) * (4 if t32 else 2))
            # bf16 words are 2 bytes, as float16's: the element shape and size are what matter here
            writer.add_tensor_info(name, shape, np.dtype(np.float32 if t32 else np.float16), sizes[-1], raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(sizes), desc=out.name, unit="B", unit_scale=True, unit_divisor=1024, disable=None) as bar:
            for (_, _, load), size in zip(tensors, sizes):  # one tensor in memory at a time
                writer.write_tensor_data(load())
                bar.update(size)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.to_gguf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="a directory written by python -m pipeline.export")
    p.add_argument("--out", required=True, help="the GGUF file to write (must not exist)")
    p.add_argument("--type", choices=sorted(TYPES), help="weight type (default: the export's dtype)")
    args = p.parse_args(argv)
    if Path(args.out).exists():
        print(f"error: {args.out}: already exists; choose another --out or remove it", file=sys.stderr)
        return 2
    try:
        out = write_gguf(args.hf, args.out, args.type)
    except (GGUFError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
