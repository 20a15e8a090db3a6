"""Export a training checkpoint to a Hugging Face `LlamaForCausalLM` directory.

    python -m pipeline.export --checkpoint runs/demo/train --out runs/demo/hf [--tag latest] [--dtype fp32]

--checkpoint is a run directory (holding `checkpoints/`) or the checkpoints directory itself.
The output holds config.json, generation_config.json, safetensors weights, the tokenizer files
(tokenizer.model plus the files AutoTokenizer reads) and a model card. It is written under a
temporary name and renamed when complete, so a directory named OUT is always whole.
ZeRO-3 checkpoints are read directly (partitions merged on the CPU) from any world size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipeline.hf import save_hf_model
from pipeline.model import ModelConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExportError(RuntimeError):
    pass


def find_checkpoint(path: str | Path, tag: str = "latest") -> tuple[Path, str]:
    """(checkpoints root, concrete tag) for a run dir or checkpoints dir and a tag or 'latest'."""
    root = Path(path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise ExportError(f"{path}: not a directory")
    if tag == "latest":
        latest = root / "latest"
        if not latest.exists():
            raise ExportError(f"{root}: no 'latest' file, so no complete checkpoint; pass --tag global_stepN")
        tag = latest.read_text().strip()
    if not (root / tag).is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ExportError(f"{root}: no checkpoint tagged {tag!r} (have: {', '.join(have) or 'none'})")
    return root, tag


def read_run_profile(ckpt_dir: Path) -> dict:
    f = ckpt_dir / "profile.json"
    if not f.exists():
        raise ExportError(f"{ckpt_dir}: profile.json is missing, so the model shape is unknown")
    return json.loads(f.read_text())


def model_config_from_profile(profile: dict) -> ModelConfig:
    fields = {k: v for k, v in profile["model"].items() if k != "preset"}
    return ModelConfig(**fields)


def zero3_tensors(root: Path, tag: str):
    """Yield (name, fp32 tensor) one at a time from a ZeRO-3 checkpoint of any world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list((root / tag).glob("zero_pp_rank_*_model_states.pt")):
        raise ExportError(f"{root / tag}: no ZeRO model-state files (zero_pp_rank_*_model_states.pt)")
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    for name, t in lazy.items():
        yield name, t.contiguous()


def copy_tokenizer(profile: dict, out: Path) -> dict:
    from pipeline.data import Manifest

    manifest = Manifest.load(profile["data"]["manifest"])
    tok = manifest.tokenizer
    digest = hashlib.sha256(tok.model_path.read_bytes()).hexdigest()
    if digest != tok.sha256:
        raise ExportError(f"{tok.model_path}: sha256 {digest[:12]}… differs from the manifest's {tok.sha256[:12]}…; "
                          "the tokenizer changed after the data was tokenized")
    for name in TOKENIZER_FILES:
        src = tok.directory / name
        if not src.exists():
            raise ExportError(f"{src}: tokenizer file missing (the data-prep tokenizer directory must hold {TOKENIZER_FILES})")
        shutil.copy2(src, out / name)
    return {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "manifest": str(manifest.path), "raw": manifest.raw}


def model_card(profile: dict, tag: str, cfg: ModelConfig, data: dict, metrics_file: Path | None) -> str:
    last = {}
    if metrics_file and metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            rec = json.loads(line)
            if "train/loss" in rec:
                last = rec
    step = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else None
    tokens = step * profile["train"]["global_batch_tokens"] if step is not None else None
    splits = data["raw"].get("splits", {})
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
        f"# LLaMA-architecture model, {cfg.num_params() / 1e6:.1f}M parameters", "",
        "Pretrained from scratch with this repository's DeepSpeed trainer.", "",
        "| | |", "|---|---|",
        f"| architecture | dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} KV), FFN {cfg.ffn_dim}, vocab {cfg.vocab_size} |",
        f"| checkpoint | {tag} |",
        f"| steps | {step} |",
        f"| tokens seen | {tokens:,} |" if tokens is not None else "| tokens seen | unknown |",
        f"| final training loss | {last.get('train/loss', float('nan')):.4f} |",
        f"| engine | {profile['topology']['engine']} |",
        f"| data | {data['manifest']} ({splits.get('train', {}).get('tokens', '?')} training tokens) |",
        "", "## Training profile", "", "```json", json.dumps(profile, indent=2), "```", "",
    ]
    return "\n".join(lines)


def export(checkpoint: str | Path, out: str | Path, tag: str = "latest", dtype: str = "fp32",
           max_shard_size: str = "5GB") -> Path:
    root, tag = find_checkpoint(checkpoint, tag)
    profile = read_run_profile(root / tag)
    cfg = model_config_from_profile(profile)
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out}: already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        data = copy_tokenizer(profile, tmp)
        if profile["topology"]["engine"] != "zero3":
            raise ExportError(f"{root / tag}: engine {profile['topology']['engine']!r} checkpoints are not supported yet")
        save_hf_model(zero3_tensors(root, tag), cfg, tmp, dtype, max_shard_size, data["bos_id"], data["eos_id"])
        (tmp / "README.md").write_text(model_card(profile, tag, cfg, data, root.parent / "metrics.jsonl"))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory or its checkpoints/ directory")
    p.add_argument("--tag", default="latest", help="'latest' (default) or a tag such as global_step100")
    p.add_argument("--out", required=True, help="output Hugging Face directory (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (default)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_size)
    except (ExportError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
