"""`--init-from`: continue pretraining an imported model without changing it behind the user's back.

`adopt(profile, manifest, INIT_DIR)` runs on every rank before any process group exists and
returns an `InitFrom` whose profile is the one the run trains:

- rope_theta, norm_eps, the context length (max_seq_len) and rope_scaling are the imported
  model's. A profile that sets one of them to another value is refused, naming both values; one
  that leaves it to its preset gets the imported value (other values would change the function
  the base model computes, and the export's config.json would describe another model).
- The shape (dim, layers, heads, FFN, vocabulary) must be the profile's.
- The imported tokenizer must be the data's: the same SentencePiece file, or the same token for
  every id. Otherwise the run is refused, or with `remap=True` (`--remap-vocab`) the embedding
  and head rows are carried over by token bytes into the data tokenizer's ids; tokens the base
  vocabulary lacks start from the mean row.
- The profile records the base model's provenance (`import.json`: name, licence, tokens, whether
  its embeddings were tied), which every checkpoint's profile.json and the export's model card carry.

`InitFrom.weights()` reads the weights in the run's layout one tensor at a time as the engine
asks for them, so a pipeline stage reads only its own layers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.config import Profile
from pipeline.data import Manifest
from pipeline.hf import INIT_CONFIG, INIT_WEIGHTS, from_hf_name, hf_parts, model_shapes
from pipeline.model import ModelConfig, RopeScaling

# What the imported model fixes and a profile may only repeat.
CARRIED = ("rope_theta", "norm_eps", "max_seq_len", "rope_scaling")
SHAPE = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "vocab_size")
EMBEDDING_ROWS = ("tok_embeddings.weight", "output.weight")
UNKNOWN = b"\0unk"  # the unknown token, matched by role across tokenizers (as bos and eos are)


class InitFromError(ValueError):
    """An --init-from directory this run cannot start from faithfully; one line."""


@dataclass(frozen=True)
class InitFrom:
    path: Path
    profile: Profile
    source: ModelConfig
    rows: torch.Tensor | None  # --remap-vocab: base id of each data id (-1: none), else None

    def weights(self) -> "InitWeights":
        return InitWeights(self.path / INIT_WEIGHTS, self.profile.model, self.rows)


class InitWeights(Mapping):
    """The imported weights under the run's names and layout (fused parts concatenated, rows
    remapped), each read from the file when asked for."""

    def __init__(self, file: Path, cfg: ModelConfig, rows: torch.Tensor | None):
        self.file, self.rows = file, rows
        self.parts = {name: [from_hf_name(hf) for hf, _ in pieces] for name, pieces in hf_parts(cfg).items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as fh:
            pieces = [fh.get_tensor(p) for p in self.parts[name]]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.rows is not None and name in EMBEDDING_ROWS:
            # Rows of tokens the base lacks start at the mean row: an average token, not noise.
            t = torch.where((self.rows >= 0)[:, None], t[self.rows.clamp(min=0)], t.mean(0))
        return t

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def read_import(path: Path) -> tuple[ModelConfig, dict]:
    """(model config, import.json) of an INIT_DIR, checked against its weight file's header."""
    for f in (path / INIT_CONFIG, path / INIT_WEIGHTS):
        if not f.exists():
            raise InitFromError(f"{f}: missing; --init-from expects a directory written by pipeline.import_hf")
    cfg = ModelConfig(**json.loads((path / INIT_CONFIG).read_text()))
    from safetensors import safe_open

    with safe_open(str(path / INIT_WEIGHTS), framework="pt") as fh:  # headers only
        have = {n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()}
    if have != model_shapes(replace(cfg, fused_projections=False)):
        raise InitFromError(f"{path / INIT_WEIGHTS}: parameter names or shapes do not match {INIT_CONFIG}")
    meta = path / "import.json"
    return cfg, json.loads(meta.read_text()) if meta.exists() else {}


def adopt(profile: Profile, manifest: Manifest, path: str | Path, remap: bool = False) -> InitFrom:
    path = Path(path)
    src, meta = read_import(path)
    where = f"{path / INIT_CONFIG}"
    given = profile.raw.model
    carried = {}
    for key in CARRIED:
        theirs, mine = getattr(src, key), getattr(given, key)  # mine None: the profile leaves it to its preset
        if key == "rope_scaling" and mine is not None:
            mine = RopeScaling(**mine)
        if mine is not None and mine != theirs:
            raise InitFromError(f"{profile.source}: model.{key}={_show(mine)} contradicts the imported model's "
                                f"{_show(theirs)} ({where}); remove it from the profile to keep the imported value")
        carried[key] = theirs
    model = replace(profile.model, **carried)
    check = [k for k in SHAPE if not (remap and k == "vocab_size")]
    diff = [f"{k} {getattr(src, k)} ≠ {getattr(model, k)}" for k in check if getattr(src, k) != getattr(model, k)]
    if diff:
        raise InitFromError(f"{where}: the imported model does not match the profile's model: {', '.join(diff)}")
    if profile.data.seq_len > model.max_seq_len:
        raise InitFromError(f"{profile.source}: data.seq_len={profile.data.seq_len} exceeds the imported model's "
                            f"context {model.max_seq_len} ({where})")
    rows = compare_tokenizers(path, meta, manifest, remap)
    if rows is None and remap:
        raise InitFromError(f"{path}: --remap-vocab given but the imported tokenizer is the data's; drop the flag")
    if rows is not None and len(rows) < model.vocab_size:  # a vocabulary padded beyond the tokenizer's
        rows = torch.cat([rows, torch.full((model.vocab_size - len(rows),), -1)])
    base = {k: meta.get(k) for k in ("base_model", "source", "license", "base_tokens", "tied_embeddings")}
    base.update(context=src.max_seq_len, vocabulary_remapped=rows is not None)
    return InitFrom(path, profile.model_copy(update={"model": model, "base_model": base}), src, rows)


def _show(value) -> str:
    return json.dumps(value.__dict__ if isinstance(value, RopeScaling) else value)


# --- tokenizers ---------------------------------------------------------------------------

def compare_tokenizers(path: Path, meta: dict, manifest: Manifest, remap: bool) -> torch.Tensor | None:
    """None when the imported tokenizer is the data's; with `remap`, the base id of every data id
    (-1 where the base has no such token); otherwise InitFromError naming both files."""
    tok = manifest.tokenizer
    # The same file (a .model, or the base's own tokenizer.json given to data prep as tokenizer.existing).
    if any(f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() == tok.sha256
           for f in (path / "tokenizer.model", path / "tokenizer.json")):
        return None
    ours = path / "tokenizer.model"
    if ours.exists():
        theirs = sentencepiece_tokens(ours)
    elif (path / "tokenizer.json").exists():
        theirs = tokenizer_json_tokens(path / "tokenizer.json")
    else:
        raise InitFromError(f"{path}: no tokenizer.model or tokenizer.json, so the data's ids ({tok.model_path}) cannot "
                            "be checked against the imported model's; copy the base model's tokenizer files into it")
    data = tokenizer_json_tokens(tok.model_path) if tok.model_path.suffix == ".json" else sentencepiece_tokens(tok.model_path)
    # Specials by role: <s> of one tokenizer is <|begin_of_text|> of another.
    data[tok.bos_id], data[tok.eos_id] = b"\0bos", b"\0eos"
    for role, key in ((b"\0bos", "bos_token_id"), (b"\0eos", "eos_token_id")):
        if isinstance(meta.get(key), int) and meta[key] < len(theirs):
            theirs[meta[key]] = role
    differ = [i for i in range(max(len(data), len(theirs))) if i >= len(data) or i >= len(theirs) or data[i] != theirs[i]]
    if not differ:
        return None
    if not remap:
        i = differ[0]
        raise InitFromError(
            f"{path}: the imported tokenizer is not the data's ({tok.model_path}): {len(differ)} ids differ (first: "
            f"id {i}, {_piece(theirs, i)} vs {_piece(data, i)}); tokenize the data with the base model's tokenizer "
            "(data_prep tokenizer.existing_model, or tokenizer.existing for a tokenizer.json) or pass --remap-vocab")
    index = {}
    for i, b in enumerate(theirs):
        if b is not None:
            index.setdefault(b, i)
    # A token keeps its id where both agree (byte pieces and "▁" can stand for the same bytes).
    return torch.tensor([i if i < len(theirs) and theirs[i] == b else index.get(b, -1) if b is not None else -1
                         for i, b in enumerate(data)])


def _piece(tokens: list, i: int) -> str:
    return repr(tokens[i]) if i < len(tokens) else "none"


def sentencepiece_tokens(model_file: Path) -> list[bytes | None]:
    """The bytes each id of a SentencePiece model stands for (None: control pieces; UNKNOWN: <unk>)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    out: list[bytes | None] = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            out.append(UNKNOWN)
        elif sp.is_control(i):
            out.append(None)
        elif sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))  # <0xNN>
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's reversible map of the 256 bytes to printable characters (byte-level BPE vocabularies).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_json_tokens(path: Path) -> list[bytes | None]:
    """The bytes each id of a `tokenizers` file stands for: byte-level BPE (Llama 3, SmolLM2) or
    SentencePiece-style ("▁" for a space, <0xNN> byte pieces); added special tokens are None,
    the unknown token UNKNOWN."""
    spec = json.loads(path.read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    unk = spec["model"].get("unk_token")
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    decode = _byte_level_decoder()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if piece == unk:
            out[i] = UNKNOWN
        elif piece in special:
            continue
        elif byte_level and all(c in decode for c in piece):
            out[i] = bytes(decode[c] for c in piece)
        elif not byte_level and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("▁", " ").encode()
    return out
