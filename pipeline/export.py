"""Export a training checkpoint to a Hugging Face `LlamaForCausalLM` directory.

    python -m pipeline.export --checkpoint runs/demo/train --out runs/demo/hf \
        [--tag latest|global_stepN] [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--verify] \
        [--tokenizer DIR] [--tie-embeddings auto|yes|no] [--gguf FILE]

--checkpoint is a run directory (holding `checkpoints/`), the checkpoints directory itself, or
an `--init-from` directory written by `python -m pipeline.import_hf`. Both engines' checkpoints
are read directly from the files (`pipeline/checkpoint_reader.py`), on the CPU, whatever world size
saved them, one layer at a time: weights go to disk as they are merged, so memory holds about
one layer, never the model.

The output holds config.json (max_position_embeddings: the context the weights were trained
for), generation_config.json (greedy decoding unless a caller asks to sample),
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, the tokenizer
(SentencePiece's tokenizer.model, or a byte-level BPE's tokenizer.json unchanged, plus the files
that transformers 4.x and 5.x load as `PreTrainedTokenizerFast` with the data's ids) and
a model card (base model, licence and tokens for continued pretraining; no local paths). It is
written under a temporary name and renamed when complete, readable as the umask allows, so a
directory named OUT is always whole; on any error nothing is left behind, and what a killed
export left (`.OUT.tmp-HOST-PID-*`) is removed by the next export to OUT on that host.

The tokenizer is the data-prep one the checkpoint's manifest names, or --tokenizer DIR (a
directory holding its tokenizer.model or tokenizer.json; checked against the manifest's sha256 when the manifest is
still there). --tie-embeddings: a base model imported with tied embeddings is exported tied when
the head still equals the embedding ("auto", which then reads the checkpoint twice); "yes"
requires them equal, "no" never ties.

--verify loads the exported files in fp32 with `transformers` and compares their logits with our
model's whose weights are cast to --dtype and back: the same function, so the fp32 tolerance
holds at any dtype and a wrong mapping (say gate and up swapped) cannot pass; it fails (exit 3,
no output) past it. It also checks that AutoTokenizer gives the data's ids (SentencePiece's, or
`tokenizers`' for a tokenizer.json).

--gguf FILE also writes the export as one GGUF file for llama.cpp (`pipeline/to_gguf.py`), with
the export's dtype; a byte-level BPE trained by data prep included, which llama.cpp's own
converter refuses. See docs/export.md.
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
from pipeline.checkpoints import checkpoint_tags
from data_prep.io_utils import staged_dir
from pipeline.hf import INIT_CONFIG, INIT_WEIGHTS, TOKENIZER_FILES, model_shapes, parse_size, save_hf_model
from pipeline.model import ModelConfig, Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# Largest logit difference allowed by --verify, relative to max(1, largest |logit|): both sides
# compute in fp32 from the same (cast) weights, so only summation order differs.
VERIFY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


def find_checkpoint(path: str | Path, tag: str = "latest") -> tuple[Path, str]:
    """(checkpoints root, concrete tag) for a run dir or checkpoints dir and a tag or 'latest'."""
    root = Path(path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise ExportError(f"{path}: not a directory")
    have = checkpoint_tags(root)
    if not have:
        raise ExportError(f"{root}: no checkpoints here (no global_stepN directory); train first, or name the run "
                          f"or checkpoints directory that holds them")
    if tag == "latest":
        latest = root / "latest"
        if not latest.exists():
            raise ExportError(f"{root}: no 'latest' file, so no complete checkpoint; pass --tag one of {', '.join(have)}")
        tag = latest.read_text().strip()
    if not tag or "/" in tag or not (root / tag).is_dir():
        raise ExportError(f"{root}: no checkpoint tagged {tag!r} (have: {', '.join(have)})")
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
            self.base = {**self.meta, "context": self.cfg.max_seq_len}
            from safetensors import safe_open

            with safe_open(str(path / INIT_WEIGHTS), framework="pt") as fh:  # headers only, no tensor data
                have = {n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()}
            if have != model_shapes(self.cfg):
                raise ExportError(f"{path / INIT_WEIGHTS}: parameter names or shapes do not match {INIT_CONFIG}")
            return
        self.root, self.tag = find_checkpoint(path, tag)
        self.dir = self.root / self.tag
        self.profile = read_run_profile(self.dir)
        self.base = self.profile.get("base_model")  # None: pretrained from scratch
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

    def model(self, dtype: str = "fp32") -> Transformer:
        """Our model with the checkpoint's weights cast to `dtype` and back to fp32 (for --verify)."""
        with torch.device("meta"):
            model = Transformer(self.cfg)
        model.load_state_dict({n: t.to(DTYPES[dtype]).float() for n, t in self.tensors()}, assign=True)
        return model.eval()

    def context(self) -> int:
        """The context the weights were trained for: the run's sequence length, or the base
        model's context when that is longer (continued pretraining on shorter samples keeps it)."""
        if self.profile is None:
            return self.cfg.max_seq_len
        trained = self.profile["data"]["seq_len"]
        return max(trained, (self.base or {}).get("context") or 0)

    def embeddings_equal(self) -> bool:
        """Whether the head equals the embedding bit for bit (a pass over the weights)."""
        embedding = None
        for name, t in self.tensors():
            if name == "tok_embeddings.weight":
                embedding = t
            elif name == "output.weight":
                return torch.equal(embedding, t)
        return False


def copy_tokenizer(src: Source, out: Path, tokenizer_dir: str | Path | None = None) -> dict:
    """Write the tokenizer files; returns bos/eos ids, the data's description and the model file."""
    if src.init_dir:
        for name in TOKENIZER_FILES:
            if (src.dir / name).exists():
                shutil.copy2(src.dir / name, out / name)
        loadable_in_4x(out / "tokenizer_config.json")
        return {"bos_id": src.meta.get("bos_token_id", 1), "eos_id": src.meta.get("eos_token_id", 2),
                "data": None, "model": tokenizer_file(src.dir)}
    from pipeline.data import Manifest, ManifestError

    manifest_path = Path(src.profile["data"]["manifest"])
    try:
        manifest = Manifest.load(manifest_path)
    except ManifestError as e:
        if tokenizer_dir is None or manifest_path.exists():
            hint = "" if manifest_path.exists() else "; pass --tokenizer DIR (the directory of its tokenizer.model or .json)"
            raise ExportError(f"{src.dir / 'profile.json'}: data.manifest: {e}{hint}") from None
        manifest = None
    model = tokenizer_file(Path(tokenizer_dir)) if tokenizer_dir else manifest.tokenizer.model_path
    if not model.exists():
        hint = "" if tokenizer_dir else " (named by the data manifest); pass --tokenizer DIR if it moved"
        raise ExportError(f"{model}: tokenizer model missing{hint}")
    if manifest is not None:
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        if digest != manifest.tokenizer.sha256:
            raise ExportError(f"{model}: sha256 {digest[:12]}… differs from the manifest's {manifest.tokenizer.sha256[:12]}…; "
                              "not the tokenizer the data was tokenized with")
    kind = {"type": "bpe" if model.suffix == ".json" else "sentencepiece"}
    vocab = write_tokenizer(model, out, manifest.raw["tokenizer"] if manifest else kind)
    if manifest is None and vocab["vocab_size"] > src.cfg.vocab_size:
        raise ExportError(f"{model}: {vocab['vocab_size']} ids, more than the model's vocabulary {src.cfg.vocab_size}")
    bos, eos = (manifest.tokenizer.bos_id, manifest.tokenizer.eos_id) if manifest else (vocab["bos_id"], vocab["eos_id"])
    data = None
    if manifest is not None:
        train_tokens = manifest.raw.get("splits", {}).get("train", {}).get("tokens")
        sources = sorted({s.source for s in manifest.shards})
        data = {"name": f"{manifest.path.parent.parent.name}/{manifest.path.parent.name}/{manifest.path.name}",
                "train_tokens": train_tokens, "sources": sources}
    return {"bos_id": bos, "eos_id": eos, "data": data, "model": out / model.name}


def tokenizer_file(directory: Path) -> Path:
    """A directory's tokenizer: its SentencePiece tokenizer.model, else a byte-level BPE's
    tokenizer.json (data prep writes both for SentencePiece, the .json alone for BPE)."""
    return directory / "tokenizer.model" if (directory / "tokenizer.model").exists() else directory / "tokenizer.json"


def write_tokenizer(model: Path, out: Path, described: dict) -> dict:
    """The tokenizer file and the transformers files made from it; its vocabulary description
    (data_prep.encoders: size, BOS and EOS, for a tokenizer.json as the manifest names them)."""
    from data_prep import bpe, encoders, tokenizer

    try:
        vocab = encoders.described(model, described).vocab()
    except bpe.TokenizerFileError as e:
        raise ExportError(str(e)) from None
    if vocab["type"] == "bpe":
        bpe.export_hf(model, out, vocab["bos_token"], vocab["eos_token"])  # tokenizer.json unchanged
    else:
        shutil.copy2(model, out / "tokenizer.model")
        tokenizer.export_hf(out / "tokenizer.model", out)  # the transformers files, made from the model itself
    return vocab


def loadable_in_4x(config: Path) -> None:
    """transformers 5 writes "tokenizer_class": "TokenizersBackend", a name 4.x does not know;
    PreTrainedTokenizerFast reads the same tokenizer.json in both."""
    if config.exists():
        cfg = json.loads(config.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            config.write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, sort_keys=True) + "\n")


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


def _tokens(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "unknown"


def provenance_rows(base: dict | None, tokens: int | None) -> tuple[str, list[str]]:
    """The card's sentence on where the weights come from, and its rows on the base model."""
    if not base:
        return "Pretrained from scratch with this repository's DeepSpeed trainer.", []
    rows = [f"| base model | {base.get('base_model') or 'unknown'} |", f"| base model source | {base.get('source') or 'unknown'} |",
            f"| base model licence | {base.get('license') or 'unknown'} |",
            f"| base model tokens | {_tokens(base.get('base_tokens'))} |"]
    if tokens is not None and isinstance(base.get("base_tokens"), int):
        rows.append(f"| tokens in total (base + this run) | {base['base_tokens'] + tokens:,} |")
    if base.get("vocabulary_remapped"):
        rows.append("| vocabulary | remapped to the data's tokenizer (rows carried over by token) |")
    return (f"Continued pretraining of {base.get('base_model') or 'an imported model'} with this repository's "
            "DeepSpeed trainer; the base model's licence applies.", rows)


def model_card(src: Source, data: dict, dtype: str, verified: dict | None, tied: bool) -> str:
    cfg = src.cfg
    licence = (src.base or {}).get("license")
    head = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    head += [f"license: {licence}"] if licence and licence != "unknown" else []
    head += [f"base_model: {src.base['base_model']}"] if src.base and src.base.get("base_model") else []
    head += ["---", "", f"# LLaMA-architecture model, {cfg.num_params() / 1e6:.1f}M parameters", ""]
    arch = (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} KV), FFN {cfg.ffn_dim}, "
            f"vocab {cfg.vocab_size}, context {src.context()}, rope theta {cfg.rope_theta:g}"
            + (f", rope scaling {cfg.rope_scaling.rope_type} ×{cfg.rope_scaling.factor:g}" if cfg.rope_scaling else "")
            + (", tied embeddings" if tied else ""))
    check = (f"largest logit difference {verified['max_abs_diff']:.3g} vs the training model "
             f"(tolerance {verified['tolerance']:.3g})" if verified else "not run (use --verify)")
    if src.init_dir:
        intro, rows = provenance_rows(src.base, None)
        rows = [f"| architecture | {arch} |", *rows, f"| weights | {dtype} |", f"| verification | {check} |"]
        return "\n".join(head + ["Converted by this repository's `pipeline.import_hf`, not trained further.", "",
                                 "| | |", "|---|---|", *rows, ""])
    profile, tag = src.profile, src.tag
    step = int(tag.removeprefix("global_step")) if tag.startswith("global_step") else None
    if "consumed_samples" in src.meta and "seq_len" in profile.get("data", {}):
        tokens = src.meta["consumed_samples"] * profile["data"]["seq_len"]  # exact across batch-size changes
    else:
        tokens = step * profile["train"]["global_batch_tokens"] if step is not None else None
    loss = final_loss(src.root.parent / "metrics.jsonl", step)
    intro, base_rows = provenance_rows(src.base, tokens)
    d = data["data"]
    described = (f"{d['name']} ({_tokens(d['train_tokens'])} training tokens; sources: {', '.join(d['sources'])})"
                 if d else "unknown (data manifest not available at export)")
    rows = [
        f"| architecture | {arch} |",
        *base_rows,
        f"| checkpoint | {tag} |",
        f"| steps | {step} |",
        f"| tokens seen in this run | {tokens:,} |" if tokens is not None else "| tokens seen in this run | unknown |",
        f"| final training loss | {loss:.4f} |" if loss is not None else "| final training loss | unknown |",
        f"| engine | {profile['topology']['engine']} |",
        f"| data | {described} |",
        f"| weights | {dtype} |",
        f"| verification | {check} |",
    ]
    # The profile as trained, without the machine's paths (the card is published).
    shown = json.loads(json.dumps(profile))
    shown["data"]["manifest"] = Path(profile["data"]["manifest"]).name
    return "\n".join(head + [intro, "", "| | |", "|---|---|", *rows, "",
                             "## Training profile", "", "```json", json.dumps(shown, indent=2), "```", ""])


def verify(src: Source, hf_dir: Path, dtype: str, tokenizer_model: Path | None, seed: int = 0) -> dict:
    """Logits of the exported `transformers` model loaded in fp32 vs our model with the weights
    cast to `dtype` and back: the same numbers on both sides, so a difference past summation-order
    noise is a wrong mapping at any dtype. Tokenizer ids of AutoTokenizer vs the data's
    tokenizer on a sample text. Raises ExportError past the tolerance."""
    from transformers import AutoModelForCausalLM

    cfg = src.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=g)
    ours = src.model(dtype)
    with torch.no_grad():
        ref = ours(tokens)
    del ours
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = theirs(tokens).logits
    diff = (got - ref).abs().max().item()
    tol = VERIFY_TOLERANCE * max(1.0, ref.abs().max().item())
    result = {"max_abs_diff": diff, "tolerance": tol, "tokens": tuple(tokens.shape)}
    if not diff <= tol:  # also catches NaN
        raise ExportError(f"verification failed: largest logit difference {diff:.3g} exceeds the tolerance {tol:.3g} "
                          f"(both in fp32 from the {dtype} weights); the export is not equivalent to the checkpoint")
    if tokenizer_model is not None and (hf_dir / tokenizer_model.name).exists():
        from transformers import AutoTokenizer

        text = "Licensed under the Apache License, Version 2.0 (the \"License\"); café 123  \t tabs ✓."
        want, source = _reference_ids(hf_dir / tokenizer_model.name, text)
        got = AutoTokenizer.from_pretrained(hf_dir)(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ExportError(f"verification failed: AutoTokenizer ids {got[:12]}… differ from {source}'s {want[:12]}…")
        result["tokenizer"] = f"matches {source}"
    return result


def _reference_ids(model: Path, text: str) -> tuple[list[int], str]:
    """The ids the data was tokenized with (no BOS/EOS), and whose they are."""
    if model.suffix == ".json":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model))
        tok.encode_special_tokens = True  # as data prep encodes (data_prep.encoders.BpeEncoder)
        return tok.encode(text, add_special_tokens=False).ids, "tokenizers"
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).encode(text), "SentencePiece"


def choose_tied(src: Source, mode: str) -> bool:
    """Whether lm_head is exported tied to the embedding (see --tie-embeddings)."""
    if mode == "no" or (mode == "auto" and not (src.base or {}).get("tied_embeddings")):
        return False
    if src.embeddings_equal():
        return True
    if mode == "yes":
        raise ExportError("--tie-embeddings yes: the head differs from the embedding after training; tying would "
                          "change the model (use auto or no)")
    return False


def export(checkpoint: str | Path, out: str | Path, tag: str = "latest", dtype: str = "fp32",
           max_shard_size: str = "5GB", check: bool = False, tokenizer: str | Path | None = None,
           tie: str = "auto") -> Path:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    parse_size(max_shard_size)
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out}: already exists; choose another --out or remove it")
    src = Source(checkpoint, tag)  # every input check happens before anything is written
    tied = choose_tied(src, tie)
    with staged_dir(out) as tmp:
        data = copy_tokenizer(src, tmp, tokenizer)
        try:
            save_hf_model(src.tensors(), src.cfg, tmp, dtype, max_shard_size, data["bos_id"], data["eos_id"],
                          src.context(), tied)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        verified = verify(src, tmp, dtype, data["model"]) if check else None
        if verified:
            print(f"verified: largest logit difference {verified['max_abs_diff']:.3g} "
                  f"(tolerance {verified['tolerance']:.3g}); tokenizer {verified.get('tokenizer', 'not checked')}")
        (tmp / "README.md").write_text(model_card(src, data, dtype, verified, tied))
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
    p.add_argument("--tokenizer", metavar="DIR", help="directory holding the run's tokenizer.model or tokenizer.json, where the data-prep "
                                                      "directory the checkpoint names is gone (another machine)")
    p.add_argument("--gguf", metavar="FILE", help="also write the export as this GGUF file for llama.cpp (must not exist)")
    p.add_argument("--tie-embeddings", default="auto", choices=["auto", "yes", "no"],
                   help="export lm_head tied to the embedding: auto (default) when the base model was tied and the "
                        "two are still equal; yes (they must be equal); no")
    args = p.parse_args(argv)
    try:
        if args.gguf and Path(args.gguf).exists():
            raise ExportError(f"{args.gguf}: already exists; choose another --gguf or remove it")
        out = export(args.checkpoint, args.out, args.tag, args.dtype, args.max_shard_size, args.verify,
                     args.tokenizer, args.tie_embeddings)
        if args.gguf:
            from pipeline.to_gguf import write_gguf

            print(f"wrote {write_gguf(out, args.gguf, GGUF_TYPES[args.dtype])}")
    except (ExportError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 3 if str(e).startswith("verification failed") else 2
    except OSError as e:  # a read-only or full --out, EROFS, ...
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
