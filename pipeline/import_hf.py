"""Import a Hugging Face LLaMA checkpoint as the starting point of continued pretraining.

    python -m pipeline.import_hf HF_DIR --out INIT_DIR
    deepspeed --module pipeline.train ... --init-from INIT_DIR

HF_DIR is any `LlamaForCausalLM` directory with safetensors weights (multi-head or grouped-
query attention). INIT_DIR receives:

    model.safetensors   every parameter under our names (`pipeline/hf.py`), fp32, model order
    model.json          `ModelConfig.to_dict()`; the trainer's profile must describe the same model
    import.json         where it came from, and its bos/eos ids
    tokenizer files     copied when HF_DIR has them (tokenizer.model, tokenizer.json, ...)

`pipeline.hf.load_init_dir(INIT_DIR)` reads it back as (ModelConfig, state dict). Tensors are
copied one at a time (memory holds one tensor, not the model). The output is written under a
temporary name and renamed when complete; on any error nothing is left behind. Pickle weights
(`*.bin`) are refused rather than loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from data_prep.io_utils import staged_dir
from pipeline.hf import (INIT_CONFIG, TOKENIZER_FILES, config_from_hf, from_hf_name, hf_weight_files, model_shapes,
                         safetensors_entries, write_safetensors)
from pipeline.model import ModelConfig



class ImportHFError(ValueError):
    """A Hugging Face directory this importer cannot convert faithfully."""


def read_hf_config(hf_dir: Path) -> tuple[ModelConfig, dict]:
    path = hf_dir / "config.json"
    if not path.exists():
        raise ImportHFError(f"{path}: missing; not a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ImportHFError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        raise ImportHFError(f"{path}: architectures {archs}, expected ['LlamaForCausalLM']")
    # Features our model does not have: converting them silently would change the function.
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ImportHFError(f"{path}: {key}={hf[key]!r} is not supported (our LLaMA has {key}={ok!r})")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ImportHFError(f"{path}: rope_parameters.rope_type={rope['rope_type']!r} is not supported (only 'default')")
    try:
        return config_from_hf(hf), hf
    except (KeyError, ValueError, TypeError) as e:
        raise ImportHFError(f"{path}: {e}") from None


def plan_tensors(hf_dir: Path, cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
    """Our name → (file, Hugging Face name), checked against the config: every parameter present
    once with its shape, nothing unknown."""
    try:
        files = hf_weight_files(hf_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ImportHFError(str(e)) from None
    want = model_shapes(cfg)
    where: dict[str, tuple[Path, str]] = {}
    try:
        for path, fh, name, ours in safetensors_entries(files, from_hf_name):
            if ours not in want:
                raise ImportHFError(f"{path}: {name} is beyond the {cfg.n_layers} layers config.json declares")
            shape = tuple(fh.get_slice(name).get_shape())
            if shape != want[ours]:
                raise ImportHFError(f"{path}: {name} has shape {shape}, config.json implies {want[ours]}")
            where[ours] = (path, name)
    except ImportHFError:
        raise
    except (KeyError, ValueError) as e:  # unknown or duplicated names, from safetensors_entries
        raise ImportHFError(e.args[0]) from None
    missing = [to for to in want if to not in where]
    if missing:
        raise ImportHFError(f"{hf_dir}: parameter(s) {missing[:5]} missing from the weight files")
    return {n: where[n] for n in want}


def _stream(plan: dict[str, tuple[Path, str]]):
    from safetensors import safe_open

    handles = {}
    try:
        for ours, (path, name) in plan.items():
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            yield ours, handles[path].get_tensor(name)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise ImportHFError(f"{hf_dir}: not a directory")
    if out.exists():
        raise ImportHFError(f"{out}: already exists; choose another --out or remove it")
    cfg, hf = read_hf_config(hf_dir)
    plan = plan_tensors(hf_dir, cfg)  # every input check happens before anything is written
    with staged_dir(out) as tmp:
        write_safetensors(model_shapes(cfg), _stream(plan), tmp, "fp32", max_shard_bytes=None)
        (tmp / INIT_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        meta = {"source": str(hf_dir.resolve()), "bos_token_id": hf.get("bos_token_id", 1),
                "eos_token_id": hf.get("eos_token_id", 2), "torch_dtype": hf.get("torch_dtype") or hf.get("dtype")}
        (tmp / "import.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.import_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="Hugging Face LlamaForCausalLM directory (safetensors weights)")
    p.add_argument("--out", required=True, help="output directory for --init-from (must not exist)")
    args = p.parse_args(argv)
    try:
        out = import_hf(args.hf_dir, args.out)
    except ImportHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
