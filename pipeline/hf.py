"""Mapping between this repository's LLaMA (`pipeline/model.py`) and Hugging Face `LlamaForCausalLM`.

Both use the rotate-half rotary layout, so every tensor maps one-to-one by name, with no
permutation of the q/k projections (unlike Meta's original interleaved checkpoints). A model
with `fused_projections` stacks several Hugging Face tensors by rows in one of ours (`_FUSED`);
`hf_parts` is the one place that says which, and every conversion below derives from it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from pipeline.model import ModelConfig, RopeScaling

# The tokenizer files of a Hugging Face LLaMA directory (data_prep writes them; export and import copy them).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# A fused parameter of a block → the unfused parameters it stacks, by rows, in this order.
_FUSED = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}
TIED_HEAD = "lm_head.weight"  # not written when the export ties it to model.embed_tokens.weight
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_OURS_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_OURS_TOP = {v: k for k, v in _TOP_MAP.items()}


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(f"parameter {name!r} has no Hugging Face LLaMA equivalent")


def from_hf_name(name: str) -> str:
    if name in _HF_TO_OURS_TOP:
        return _HF_TO_OURS_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_TO_OURS_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_OURS_LAYER[m.group(2)]}"
    raise KeyError(f"Hugging Face parameter {name!r} is not part of a LLaMA model")


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32", bos_id: int = 1, eos_id: int = 2,
                   max_positions: int | None = None, tied: bool = False) -> dict:
    """The `config.json` of a `LlamaForCausalLM` equal to `cfg`. `max_positions`: the context the
    weights were trained for (default `cfg.max_seq_len`); `tied`: lm_head shares the embedding.
    rope_scaling is written in the transformers 4.x form, which 5.x also reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": max_positions or cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": asdict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def rope_scaling_from_hf(hf: dict) -> RopeScaling | None:
    """`rope_scaling` (transformers 4.x, "type" in older files) or `rope_parameters` (5.x) of a
    config.json; None for plain rotary embeddings. Types our model lacks raise ValueError."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in RopeScaling.TYPES:
        raise ValueError(f"rope_scaling: rope_type={kind!r} is not supported (only 'default', "
                         f"{', '.join(repr(t) for t in RopeScaling.TYPES)})")
    fields = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
              if k in rope and (kind == "llama3" or k == "factor")}
    return RopeScaling(rope_type=kind, **fields)


def config_from_hf(hf: dict) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face LLaMA `config.json` (dict). Tied embeddings are not
    part of it: the importer unties them (exactly: the head becomes a copy of the embedding)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'llama'")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg = ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        init_std=hf.get("initializer_range", 0.02),
        rope_scaling=rope_scaling_from_hf(hf),
    )
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"config.json: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads={cfg.head_dim}")
    return cfg


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ bytes (Hugging Face's convention for --max-shard-size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected a number with an optional unit such as 500MB or 5GB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: str, max_shard_bytes: int | None) -> list[list[str]]:
    """Names per output file, in order: a file is closed before the tensor that would overflow it
    (the rule of transformers' `save_pretrained`); one file when max_shard_bytes is None."""
    size = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * size
        if max_shard_bytes is not None and shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]], dtype: str) -> bytes:
    size = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + math.prod(shapes[name]) * size
        header[name] = {"dtype": _ST_DTYPES[_DTYPES[dtype]], "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int | None = 5 * 10**9,
) -> dict:
    """Write `tensors` as `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`
    (or one `model.safetensors` when max_shard_bytes is None).

    `shapes` announces every name and shape up front, in the order `tensors` yields them, so each
    file's header is written first and every tensor goes to disk as soon as it arrives: memory
    holds one tensor at a time, not a shard. Returns the index dict.
    """
    out_dir = Path(out_dir)
    target = _DTYPES[dtype]
    shards = plan_shards(shapes, dtype, max_shard_bytes)
    n = len(shards)
    files = ["model.safetensors"] if max_shard_bytes is None else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    it = iter(tensors)
    for names, fname in zip(shards, files):
        tmp = out_dir / f".{fname}.tmp"
        with open(tmp, "wb") as f:
            f.write(_header(names, shapes, dtype))
            for want in names:
                got = next(it, None)
                if got is None or got[0] != want:
                    raise ValueError(f"tensor stream: expected {want!r}, got {got and got[0]!r}")
                t = got[1].detach().to("cpu", target).contiguous()
                if tuple(t.shape) != tuple(shapes[want]):
                    raise ValueError(f"tensor {want!r}: shape {tuple(t.shape)}, expected {tuple(shapes[want])}")
                f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
                weight_map[want] = fname
                del got, t
        os.replace(tmp, out_dir / fname)
    extra = next(it, None)
    if extra is not None:
        raise ValueError(f"tensor stream: unexpected extra tensor {extra[0]!r}")
    size = torch.empty((), dtype=target).element_size()
    index = {"metadata": {"total_size": sum(math.prod(s) * size for s in shapes.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    if max_shard_bytes is not None:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes, in model order (embedding, blocks, final norm, head)."""
    from pipeline.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def hf_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Our parameter names of `cfg`, in model order → the Hugging Face tensors (name, shape) each
    holds, stacked by rows in this order: one for every parameter of an unfused model, three for
    `wqkv` (q, k, v) and two for `w13` (gate, up) of a fused one."""
    plain = model_shapes(replace(cfg, fused_projections=False))
    parts = {}
    for name in model_shapes(cfg):
        m = _LAYER_RE.match(name)
        pieces = [f"layers.{m.group(1)}.{p}" for p in _FUSED[m.group(2)]] if m and m.group(2) in _FUSED else [name]
        parts[name] = [(to_hf_name(p), plain[p]) for p in pieces]
    return parts


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of `cfg`'s tensors, in model order."""
    return {hf: shape for pieces in hf_parts(cfg).values() for hf, shape in pieces}


def hf_tensors(state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
               cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors (of `cfg`'s layout) under Hugging Face names, lazily; fused weights are cut
    into their parts by rows (views: the values are the fused weight's, bit for bit)."""
    parts = hf_parts(cfg)
    for name, t in (state.items() if isinstance(state, dict) else state):
        if name not in parts:
            raise KeyError(f"parameter {name!r} is not part of this model")
        pieces = parts[name]
        yield from zip([hf for hf, _ in pieces], t.split([shape[0] for _, shape in pieces]))


def from_hf_tensors(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict of `cfg`'s layout from tensors under Hugging Face names (taken out of `hf` as
    they are used); fused weights are the parts concatenated by rows."""
    state = {}
    for name, pieces in hf_parts(cfg).items():
        tensors = [hf.pop(h) for h, _ in pieces]
        state[name] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return state


def relayout(state: dict[str, torch.Tensor], src: ModelConfig, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`state`, a state dict of `src`'s layout, in `cfg`'s: fused or unfused (same shape fields).
    Consumes `state`, so each fused weight's parts are freed as soon as it is built."""
    if src.fused_projections == cfg.fused_projections:
        return state
    hf = dict(hf_tensors([(n, state.pop(n)) for n in list(state)], src))
    return from_hf_tensors(hf, cfg)


def _in_order(state: dict[str, torch.Tensor], names) -> Iterator[tuple[str, torch.Tensor]]:
    extra = sorted(set(state) - set(names))
    if extra:
        raise KeyError(f"parameter(s) {extra[:5]} are not part of this model")
    for name in names:
        if name not in state:
            raise KeyError(f"parameter {name!r} missing")
        yield name, state[name]


def save_hf_model(
    state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    bos_id: int = 1,
    eos_id: int = 2,
    max_positions: int | None = None,
    tied: bool = False,
) -> None:
    """Write config.json, generation_config.json and safetensors weights into `out_dir` (must exist).
    With `tied`, lm_head.weight is not written (the caller has checked it equals the embedding).

    `state` is a state dict (our names) or an iterator yielding our names in model order, which
    is what the checkpoint readers of `pipeline/checkpoint_reader.py` produce: then only one tensor is
    in memory at a time.
    """
    out_dir = Path(out_dir)
    config = hf_config_dict(cfg, _DTYPE_NAMES[dtype], bos_id, eos_id, max_positions, tied)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Greedy unless the caller asks to sample: the same prompt gives the same text everywhere.
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shapes = model_shapes(cfg)
    if isinstance(state, dict):
        state = _in_order(state, list(shapes))
    hf = hf_tensors(state, cfg)
    names = hf_shapes(cfg)
    if tied:
        names.pop(TIED_HEAD)
        hf = ((n, t) for n, t in hf if n != TIED_HEAD)
    write_safetensors(names, hf, out_dir, dtype, parse_size(max_shard_size))


def hf_weight_files(hf_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory, checked against its index."""
    hf_dir = Path(hf_dir)
    index_path = hf_dir / "model.safetensors.index.json"
    present = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if index_path.exists():
        try:
            listed = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index_path}: not a safetensors index ({e})") from None
        missing = [f for f in listed if f not in present]
        if missing:
            raise FileNotFoundError(f"{hf_dir / missing[0]}: listed in model.safetensors.index.json but missing")
        extra = [f for f in present if f not in listed]
        if extra:
            raise ValueError(f"{hf_dir / extra[0]}: weight file not listed in model.safetensors.index.json "
                             "(left over from another model?)")
        return [hf_dir / f for f in listed]
    if present == ["model.safetensors"]:
        return [hf_dir / "model.safetensors"]
    if present:
        raise ValueError(f"{hf_dir}: {len(present)} safetensors files but no model.safetensors.index.json")
    if list(hf_dir.glob("*.bin")):
        raise ValueError(f"{hf_dir}: only pickle (*.bin) weights; convert them to safetensors first "
                         "(loading them would run arbitrary code from the file)")
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def safetensors_entries(files: list[Path], rename=lambda n: n):
    """(file, open handle, name in the file, renamed) for every tensor of `files`, without reading
    any tensor data. Rotary buffers are skipped; an unknown name or a name in two files is an
    error naming the file."""
    from safetensors import safe_open

    seen: dict[str, Path] = {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # SafetensorError on a truncated or corrupt file, OSError
            raise ValueError(f"{path}: cannot be read ({str(e).strip().splitlines()[0][:200]}); truncated or "
                             "corrupt? download it again") from None
        with handle as fh:
            for name in fh.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer some older exports carry; recomputed from rope_theta
                try:
                    ours = rename(name)
                except KeyError as e:
                    raise KeyError(f"{path}: {e.args[0]}") from None
                if ours in seen:
                    raise ValueError(f"{path}: {name} also appears in {seen[ours].name}")
                seen[ours] = path
                yield path, fh, name, ours


def iter_safetensors(files: list[Path], rename=lambda n: n) -> Iterator[tuple[str, torch.Tensor]]:
    """(renamed name, tensor) one at a time from safetensors files."""
    for _, fh, name, ours in safetensors_entries(files, rename):
        yield ours, fh.get_tensor(name)


def shape_problem(have: dict, want: dict[str, tuple[int, ...]]) -> tuple[type[Exception], str] | None:
    """What is wrong with named shapes `have` against the model's `want`, as (KeyError, message)
    for unknown or missing names and (ValueError, message) for a wrong shape; None when they agree."""
    unknown = [n for n in have if n not in want]
    if unknown:
        return KeyError, f"unknown parameter name(s) {unknown[:5]} for this LLaMA model"
    missing = [n for n in want if n not in have]
    if missing:
        return KeyError, f"parameter(s) {missing[:5]} missing"
    for n, shape in have.items():
        if tuple(shape) != tuple(want[n]):
            return ValueError, f"{n} has shape {tuple(shape)} but the model needs {tuple(want[n])}"
    return None


def check_state(where: str, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every parameter of `cfg` present with its shape, and nothing else."""
    problem = shape_problem({n: t.shape for n, t in state.items()}, model_shapes(cfg))
    if problem:
        error, message = problem
        raise error(f"{where}: {message}")


def load_hf_state(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face LLaMA directory (safetensors only, no pickle) into our names."""
    hf_dir = Path(hf_dir)
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    state = dict(iter_safetensors(hf_weight_files(hf_dir), from_hf_name))
    check_state(str(hf_dir), state, cfg)
    return cfg, state


INIT_WEIGHTS, INIT_CONFIG = "model.safetensors", "model.json"


def load_init_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The (config, fp32 state dict in our names) of an `--init-from` directory written by
    `python -m pipeline.import_hf`; the trainer loads it into the model before step 0."""
    path = Path(path)
    cfg_file, weights = path / INIT_CONFIG, path / INIT_WEIGHTS
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f}: missing; --init-from expects a directory written by pipeline.import_hf")
    cfg = ModelConfig(**json.loads(cfg_file.read_text()))
    state = dict(iter_safetensors([weights]))
    check_state(str(weights), state, cfg)
    return cfg, state
