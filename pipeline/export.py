"""Export a training checkpoint to a Hugging Face `LlamaForCausalLM` directory.

    python -m pipeline.export --checkpoint runs/demo/train --out runs/demo/hf \
        [--tag latest|global_stepN] [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--verify]

--checkpoint is a run directory (holding `checkpoints/`), the checkpoints directory itself, or
an `--init-from` directory written by `python -m pipeline.import_hf`. Both engines' checkpoints
are read directly from the files (`pipeline/checkpoint_reader.py`), on the CPU, whatever world size
saved them, one layer at a time: weights go to disk as they are merged, so memory holds about
one layer, never the model.

The output holds config.json, generation_config.json, `model-0000k-of-0000n.safetensors` with
`model.safetensors.index.json`, the tokenizer (tokenizer.model plus the files AutoTokenizer
reads) and a model card. It is written under a temporary name and renamed when complete, so a
directory named OUT is always whole; on any error nothing is left behind.

--verify runs a batch through our model and through the exported `transformers` model and
fails (exit 3, no output) if the largest logit difference exceeds the dtype's tolerance; it also
checks that AutoTokenizer gives the SentencePiece model's ids. See docs/export.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from pipeline.checkpoint_reader import CheckpointError, open_checkpoint
from data_prep.io_utils import staged_dir
from pipeline.hf import INIT_CONFIG, INIT_WEIGHTS, TOKENIZER_FILES, model_shapes, parse_size, save_hf_model
from pipeline.model import ModelConfig, Transformer


# Largest logit difference allowed by --verify, relative to max(1, largest |logit|) of our fp32
# model: fp32 only sees summation-order noise; bf16 keeps 8 mantissa bits (~4e-3 relative per
# rounding), fp16 keeps 11, and the errors of a few hundred roundings per logit add up.
VERIFY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


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
    if not tag or "/" in tag or not (root / tag).is_dir():
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


class Source:
    """What is being exported: a model config, a tensor stream, tokenizer files and card facts."""

    def __init__(self, checkpoint: str | Path, tag: str):
        path = Path(checkpoint)
        self.init_dir = (path / INIT_CONFIG).exists() and (path / INIT_WEIGHTS).exists()
        if self.init_dir:
            self.dir, self.tag, self.profile = path, None, None
            self.cfg = ModelConfig(**json.loads((path / INIT_CONFIG).read_text()))
            meta = path / "import.json"
            self.meta = json.loads(meta.read_text()) if meta.exists() else {}
            from safetensors import safe_open

            with safe_open(str(path / INIT_WEIGHTS), framework="pt") as fh:  # headers only, no tensor data
                have = {n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()}
            if have != model_shapes(self.cfg):
                raise ExportError(f"{path / INIT_WEIGHTS}: parameter names or shapes do not match {INIT_CONFIG}")
            return
        self.root, self.tag = find_checkpoint(path, tag)
        self.dir = self.root / self.tag
        self.profile = read_run_profile(self.dir)
        self.cfg = model_config_from_profile(self.profile)
        try:
            self.reader = open_checkpoint(self.dir, self.profile["topology"]["engine"], self.cfg,
                                          self.profile["deepspeed"]["zero_optimization"]["stage"])
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        # meta.json (written by the trainer's rank 0 beside DeepSpeed's files) must tell the same story.
        meta_file = self.dir / "meta.json"
        self.meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        step = getattr(self.reader, "step", None)
        if self.meta.get("step") is not None and step is not None and self.meta["step"] != step:
            raise ExportError(f"{meta_file}: step {self.meta['step']} but the DeepSpeed files were saved at step {step}; "
                              "files from different runs")
        world = getattr(self.reader, "world", None)
        dp = self.meta.get("data_parallel_size")
        if dp is not None and world is not None and dp != world:
            raise ExportError(f"{meta_file}: data_parallel_size {dp} but the ZeRO-{self.reader.STAGES} files were saved "
                              f"by {world} ranks; files from different runs")

    def tensors(self):
        """(our name, tensor) in model order, one at a time."""
        if self.init_dir:
            order = list(model_shapes(self.cfg))
            from safetensors import safe_open

            with safe_open(str(self.dir / INIT_WEIGHTS), framework="pt") as fh:
                for name in order:
                    yield name, fh.get_tensor(name)
        else:
            yield from self.reader.tensors()

    def model(self) -> Transformer:
        """Our model with the checkpoint's weights, in fp32 (for --verify)."""
        with torch.device("meta"):
            model = Transformer(self.cfg)
        model.load_state_dict({n: t.float() for n, t in self.tensors()}, assign=True)
        return model.eval()


def copy_tokenizer(src: Source, out: Path) -> dict:
    """Copy the tokenizer files; returns bos/eos ids and where the data came from."""
    if src.init_dir:
        for name in TOKENIZER_FILES:
            if (src.dir / name).exists():
                shutil.copy2(src.dir / name, out / name)
        return {"bos_id": src.meta.get("bos_token_id", 1), "eos_id": src.meta.get("eos_token_id", 2),
                "manifest": None, "raw": {}, "model": src.dir / "tokenizer.model"}
    from pipeline.data import Manifest, ManifestError

    try:
        manifest = Manifest.load(src.profile["data"]["manifest"])
    except ManifestError as e:
        raise ExportError(f"{src.dir / 'profile.json'}: data.manifest: {e}") from None
    tok = manifest.tokenizer
    if not tok.model_path.exists():
        raise ExportError(f"{tok.model_path}: tokenizer model missing (named by {manifest.path})")
    digest = hashlib.sha256(tok.model_path.read_bytes()).hexdigest()
    if digest != tok.sha256:
        raise ExportError(f"{tok.model_path}: sha256 {digest[:12]}… differs from the manifest's {tok.sha256[:12]}…; "
                          "the tokenizer changed after the data was tokenized")
    for name in TOKENIZER_FILES:
        path = tok.directory / name
        if not path.exists():
            raise ExportError(f"{path}: tokenizer file missing (the data-prep tokenizer directory must hold {TOKENIZER_FILES})")
        shutil.copy2(path, out / name)
    return {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "manifest": str(manifest.path), "raw": manifest.raw,
            "model": tok.model_path}


def final_loss(metrics_file: Path, step: int | None) -> float | None:
    """The training loss logged at `step` (the checkpoint's), not a later one of the same run."""
    if step is None or not metrics_file.exists():
        return None
    loss = None
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec and rec.get("step", 0) <= step:
            loss = rec["train/loss"]
    return loss


def model_card(src: Source, data: dict, dtype: str, verified: dict | None) -> str:
    cfg = src.cfg
    head = ["---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
            f"# LLaMA-architecture model, {cfg.num_params() / 1e6:.1f}M parameters", ""]
    arch = (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} KV), FFN {cfg.ffn_dim}, "
            f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    check = (f"largest logit difference {verified['max_abs_diff']:.3g} vs the training model "
             f"(tolerance {verified['tolerance']:.3g})" if verified else "not run (use --verify)")
    if src.init_dir:
        rows = [f"| architecture | {arch} |", f"| converted from | {src.meta.get('source', 'unknown')} |",
                f"| weights | {dtype} |", f"| verification | {check} |"]
        return "\n".join(head + ["Converted by this repository's `pipeline.import_hf`.", "", "| | |", "|---|---|", *rows, ""])
    profile, tag = src.profile, src.tag
    step = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else None
    if "consumed_samples" in src.meta and "seq_len" in profile.get("data", {}):
        tokens = src.meta["consumed_samples"] * profile["data"]["seq_len"]  # exact across batch-size changes
    else:
        tokens = step * profile["train"]["global_batch_tokens"] if step is not None else None
    loss = final_loss(src.root.parent / "metrics.jsonl", step)
    train_tokens = data["raw"].get("splits", {}).get("train", {}).get("tokens", "?")
    rows = [
        f"| architecture | {arch} |",
        f"| checkpoint | {tag} |",
        f"| steps | {step} |",
        f"| tokens seen | {tokens:,} |" if tokens is not None else "| tokens seen | unknown |",
        f"| final training loss | {loss:.4f} |" if loss is not None else "| final training loss | unknown |",
        f"| engine | {profile['topology']['engine']} |",
        f"| data | {data['manifest']} ({train_tokens} training tokens) |",
        f"| weights | {dtype} |",
        f"| verification | {check} |",
    ]
    return "\n".join(head + ["Pretrained from scratch with this repository's DeepSpeed trainer.", "",
                             "| | |", "|---|---|", *rows, "",
                             "## Training profile", "", "```json", json.dumps(profile, indent=2), "```", ""])


def verify(src: Source, hf_dir: Path, dtype: str, tokenizer_model: Path | None, seed: int = 0) -> dict:
    """Logits of our fp32 model vs the exported `transformers` model on one batch; tokenizer ids
    of AutoTokenizer vs SentencePiece on a sample text. Raises ExportError past the tolerance."""
    from transformers import AutoModelForCausalLM

    cfg = src.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=g)
    ours = src.model()
    with torch.no_grad():
        ref = ours(tokens)
    del ours
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                                                 "fp16": torch.float16}[dtype]).eval()
    with torch.no_grad():
        got = theirs(tokens).logits.float()
    diff = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    tol = VERIFY_TOLERANCE[dtype] * scale
    result = {"max_abs_diff": diff, "tolerance": tol, "tokens": tuple(tokens.shape)}
    if not diff <= tol:  # also catches NaN
        raise ExportError(f"verification failed: largest logit difference {diff:.3g} exceeds the {dtype} tolerance "
                          f"{tol:.3g}; the export is not equivalent to the checkpoint")
    if tokenizer_model is not None and (hf_dir / "tokenizer.model").exists():
        import sentencepiece as spm
        from transformers import AutoTokenizer

        sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
        text = "Licensed under the Apache License, Version 2.0 (the \"License\"); café 123  \t tabs ✓."
        a, b = sp.encode(text), hf_tok(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise ExportError(f"verification failed: AutoTokenizer ids {b[:12]}… differ from SentencePiece's {a[:12]}…")
        result["tokenizer"] = "matches SentencePiece"
    return result


def export(checkpoint: str | Path, out: str | Path, tag: str = "latest", dtype: str = "fp32",
           max_shard_size: str = "5GB", check: bool = False) -> Path:
    if dtype not in VERIFY_TOLERANCE:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(VERIFY_TOLERANCE)}")
    parse_size(max_shard_size)
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out}: already exists; choose another --out or remove it")
    src = Source(checkpoint, tag)  # every input check happens before anything is written
    with staged_dir(out) as tmp:
        data = copy_tokenizer(src, tmp)
        try:
            save_hf_model(src.tensors(), src.cfg, tmp, dtype, max_shard_size, data["bos_id"], data["eos_id"])
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        verified = verify(src, tmp, dtype, data["model"]) if check else None
        if verified:
            print(f"verified: largest logit difference {verified['max_abs_diff']:.3g} "
                  f"(tolerance {verified['tolerance']:.3g}); tokenizer {verified.get('tokenizer', 'not checked')}")
        (tmp / "README.md").write_text(model_card(src, data, dtype, verified))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory, or an import_hf output")
    p.add_argument("--tag", default="latest", help="'latest' (default) or a tag such as global_step100")
    p.add_argument("--out", required=True, help="output Hugging Face directory (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (default)")
    p.add_argument("--verify", action="store_true", help="compare logits with our model; fail past the tolerance")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_size, args.verify)
    except (ExportError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 3 if str(e).startswith("verification failed") else 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
