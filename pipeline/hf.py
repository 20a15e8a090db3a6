"""Mapping between this repository's LLaMA (`pipeline/model.py`) and Hugging Face `LlamaForCausalLM`.

Both use the rotate-half rotary layout, so every tensor maps one-to-one by name, with no
permutation of the q/k projections (unlike Meta's original interleaved checkpoints).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.model import ModelConfig

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


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32", bos_id: int = 1, eos_id: int = 2) -> dict:
    """The `config.json` of a `LlamaForCausalLM` equal to `cfg`."""
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
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def config_from_hf(hf: dict) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face LLaMA `config.json` (dict)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'llama'")
    if hf.get("tie_word_embeddings"):
        raise ValueError("config.json: tie_word_embeddings=true is not supported (LLaMA unties them)")
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


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, dtype: str = "fp32", max_shard_bytes: int = 5 * 10**9
) -> dict:
    """Write Hugging Face-named tensors as `model-0000k-of-0000n.safetensors` plus the index.

    Consumes `tensors` lazily and holds at most one shard's worth in memory at a time, so a
    caller that yields one layer at a time keeps peak memory near one shard plus one layer.
    Returns the index dict.
    """
    out_dir = Path(out_dir)
    target = _DTYPES[dtype]
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    total = 0
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if not current:
            return
        tmp_name = f"shard-{len(shards):05d}.tmp.safetensors"
        save_file(current, str(out_dir / tmp_name), metadata={"format": "pt"})
        shards.append(list(current))
        current, current_bytes = {}, 0

    for name, t in tensors:
        t = t.detach().to("cpu", target).contiguous()
        nbytes = t.numel() * t.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current[name] = t
        current_bytes += nbytes
        total += nbytes
    flush()

    n = len(shards)
    for i, names in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / f"shard-{i:05d}.tmp.safetensors", out_dir / final)
        for name in names:
            weight_map[name] = final
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if n > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def hf_tensors(state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename our tensors to Hugging Face names, lazily."""
    items = state.items() if isinstance(state, dict) else state
    for name, t in items:
        yield to_hf_name(name), t


def save_hf_model(
    state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    out_dir: str | Path,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    bos_id: int = 1,
    eos_id: int = 2,
) -> None:
    """Write config.json, generation_config.json and safetensors weights into `out_dir` (must exist)."""
    out_dir = Path(out_dir)
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(cfg, _DTYPE_NAMES[dtype], bos_id, eos_id), indent=2) + "\n")
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_safetensors(hf_tensors(state), out_dir, dtype, parse_size(max_shard_size))


def load_hf_state(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face LLaMA directory (safetensors only, no pickle) into our names."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    index_path = hf_dir / "model.safetensors.index.json"
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        path = hf_dir / f
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in the index but missing")
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer some older exports carry; recomputed from rope_theta
                state[from_hf_name(name)] = fh.get_tensor(name)
    return cfg, state
