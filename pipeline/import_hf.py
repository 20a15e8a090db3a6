"""Import a Hugging Face LLaMA checkpoint as the starting point of continued pretraining.

    python -m pipeline.import_hf HF_DIR --out INIT_DIR
    deepspeed --module pipeline.train ... --init-from INIT_DIR

HF_DIR is any `LlamaForCausalLM` directory with safetensors weights (multi-head or grouped-
query attention, rope_scaling "linear" or "llama3", tied or untied embeddings). Tied embeddings
are untied exactly: the head is a copy of the embedding, and the export ties them again while
training has kept them equal. INIT_DIR receives:

    model.safetensors   every parameter under our names (`pipeline/hf.py`), fp32, model order
    model.json          `ModelConfig.to_dict()`; --init-from carries rope_theta, norm_eps, context
                        length and rope_scaling from it into the run (`pipeline/init_from.py`)
    import.json         provenance (base model, its Hub address, licence, tokens it was trained on, whether
                        its embeddings were tied) and its bos/eos ids
    tokenizer files     copied when HF_DIR has them (tokenizer.model, tokenizer.json, ...)

Provenance defaults come from HF_DIR's model card front matter (`license:`, `base_model:`) and
config.json's `_name_or_path`; --base-model, --license and --base-tokens override them. No local
path is recorded (a model card is published).

`pipeline.hf.load_init_dir(INIT_DIR)` reads it back as (ModelConfig, state dict). Tensors are
copied one at a time (memory holds one tensor, not the model). The output is written under a
temporary name and renamed when complete; on any error nothing is left behind. Pickle weights
(`*.bin`) are refused rather than loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from data_prep.io_utils import staged_dir
from pipeline.hf import (INIT_CONFIG, TIED_HEAD, TOKENIZER_FILES, config_from_hf, from_hf_name, hf_weight_files,
                         model_shapes, safetensors_entries, write_safetensors)
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
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ImportHFError(f"{path}: {key}={hf[key]!r} is not supported (our LLaMA has {key}={ok!r})")
    try:
        return config_from_hf(hf), hf
    except (KeyError, ValueError, TypeError) as e:
        raise ImportHFError(f"{path}: {e}") from None


def plan_tensors(hf_dir: Path, cfg: ModelConfig, tied: bool = False) -> dict[str, tuple[Path, str]]:
    """Our name → (file, Hugging Face name), checked against the config: every parameter present
    once with its shape, nothing unknown. `tied`: the head is read from the embedding (a stored
    lm_head.weight, which some tied checkpoints carry, is ignored)."""
    try:
        files = hf_weight_files(hf_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ImportHFError(str(e)) from None
    want = model_shapes(cfg)
    where: dict[str, tuple[Path, str]] = {}
    try:
        for path, fh, name, ours in safetensors_entries(files, from_hf_name):
            if tied and name == TIED_HEAD:
                continue
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
    if tied and "tok_embeddings.weight" in where:
        where["output.weight"] = where["tok_embeddings.weight"]
    missing = [to for to in want if to not in where]
    if missing:
        raise ImportHFError(f"{hf_dir}: parameter(s) {missing[:5]} missing from the weight files")
    return {n: where[n] for n in want}


def _stream(plan: dict[str, tuple[Path, str]]):
    from safetensors import safe_open

    handles = {}
    try:
        for ours, (path, name) in plan.items():
            try:
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt").__enter__()
                tensor = handles[path].get_tensor(name)
            except Exception as e:  # SafetensorError on a truncated or corrupt file, OSError
                raise ImportHFError(f"{path}: cannot be read ({str(e).strip().splitlines()[0][:200]}); "
                                    "truncated or corrupt? download it again") from None
            yield ours, tensor
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def card_front_matter(hf_dir: Path) -> dict[str, str]:
    """`key: value` lines of the YAML front matter of HF_DIR/README.md (scalars only)."""
    card = hf_dir / "README.md"
    lines = card.read_text(errors="replace").splitlines() if card.exists() else []
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and value.strip() and not line.startswith((" ", "-")):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def provenance(hf_dir: Path, hf: dict, base_model: str | None, license: str | None, base_tokens: int | None) -> dict:
    """What the model card of every model trained from this import says about its base."""
    front = card_front_matter(hf_dir)
    name = base_model or front.get("base_model") or hf.get("_name_or_path") or hf_dir.resolve().name
    if Path(name).is_absolute():
        name = Path(name).name  # a local path says nothing to the card's readers and leaks the machine's layout
    # A Hugging Face Hub id ("org/name") says where the weights can be had; a bare name does not.
    source = f"https://huggingface.co/{name}" if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else "unpublished (local copy)"
    return {"base_model": name, "source": source, "license": license or front.get("license") or "unknown",
            "base_tokens": base_tokens}


def import_hf(hf_dir: str | Path, out: str | Path, base_model: str | None = None, license: str | None = None,
              base_tokens: int | None = None) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise ImportHFError(f"{hf_dir}: not a directory")
    if out.exists():
        raise ImportHFError(f"{out}: already exists; choose another --out or remove it")
    cfg, hf = read_hf_config(hf_dir)
    tied = bool(hf.get("tie_word_embeddings", False))
    plan = plan_tensors(hf_dir, cfg, tied)  # every input check happens before anything is written
    with staged_dir(out) as tmp:
        write_safetensors(model_shapes(cfg), _stream(plan), tmp, "fp32", max_shard_bytes=None)
        (tmp / INIT_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        meta = {**provenance(hf_dir, hf, base_model, license, base_tokens), "tied_embeddings": tied,
                "bos_token_id": hf.get("bos_token_id", 1), "eos_token_id": hf.get("eos_token_id", 2),
                "torch_dtype": hf.get("torch_dtype") or hf.get("dtype")}
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
    p.add_argument("--base-model", help="the base model's name for model cards, e.g. meta-llama/Llama-3.2-1B "
                                        "(default: HF_DIR's card or config.json, else the directory's name)")
    p.add_argument("--license", help="the base model's licence, e.g. llama3.2 (default: HF_DIR's card, else 'unknown')")
    p.add_argument("--base-tokens", type=int, help="tokens the base model was trained on, if published")
    args = p.parse_args(argv)
    try:
        out = import_hf(args.hf_dir, args.out, args.base_model, args.license, args.base_tokens)
    except ImportHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out, EROFS, ...
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"imported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
