"""Preflight: the checks worth a minute before a run worth a thousand GPU-hours.

    python -m pipeline.preflight --profile ds_configs/7b_zero3.json --out runs/7b --world-size 64

The trainer runs the same checks at start-up. Each failure is one line, and every failure is
listed, not just the first:

  * data: the manifest exists and is readable; its shards exist and are not empty; the train split
    holds at least one sample, and so does the validation split when the run evaluates (an empty
    one is refused too: evaluation is never silently off); the mixture names sources the manifest has
  * tokenizer: the model file exists, its sha256 is the one the manifest records, its vocabulary
    and BOS/EOS ids are the manifest's, and the profile's model.vocab_size covers it
  * topology: the world size is a multiple of the pipeline stages (data × pipeline = world)
  * batch: micro-batch × accumulation × data-parallel size is exactly the global batch
  * checkpoints: the output directory is writable and its filesystem has room for `keep_last`
    checkpoints, the one being saved and a universal copy (`checkpoint_space`)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from data_prep.io_utils import sha256_file
from pipeline.config import (Profile, ProfileError, ProfileFile, apply_overrides, parse_profile, read_profile_json,
                             resolve)
from pipeline.data import Manifest, ManifestError


def checkpoint_bytes(profile: Profile) -> int:
    """Size of one full DeepSpeed checkpoint, all ranks together: the 16-bit weights (2 bytes per
    parameter) plus the fp32 optimizer states (master copy, Adam m and v: 12 bytes); fp32 training
    stores 4 + 8."""
    n = profile.model.num_params()
    return n * (12 if profile.train.precision == "fp32" else 14)


def checkpoint_space(profile: Profile) -> int:
    """Disk the run's checkpoints need at their peak: `keep_last` complete checkpoints plus the one
    being saved (older ones are pruned only after it is in place), plus one universal copy (fp32
    weights, Adam m and v: 12 bytes per parameter) made when resuming on another topology. None
    for a run that saves nothing (no periodic save within its steps, `final_checkpoint` off: a
    benchmark); a stop by signal would still try one, and fail in one line if the disk is full."""
    t = profile.train
    if not t.final_checkpoint and not (t.checkpoint_every and t.checkpoint_every <= t.steps):
        return 0
    return (t.keep_last + 1) * checkpoint_bytes(profile) + 12 * profile.model.num_params()


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_data(raw: ProfileFile, manifest_path: str | Path) -> tuple[list[str], Manifest | None]:
    try:
        manifest = Manifest.load(manifest_path)
    except ManifestError as e:
        return [f"data: {e}"], None
    failures = []
    for shard in manifest.shards:
        if not shard.path.is_file():
            failures.append(f"data: {manifest.path}: shard {shard.path.name} is listed but missing")
        elif shard.path.stat().st_size == 0:
            failures.append(f"data: {shard.path}: empty file")
    train_tokens = sum(s.tokens for s in manifest.split_shards("train"))
    if not manifest.split_shards("train"):
        failures.append(f"data: {manifest.path}: no shard of split 'train'")
    elif train_tokens <= raw.data.seq_len:
        failures.append(f"data: {manifest.path}: the train split holds {train_tokens} tokens, fewer than one sample "
                        f"of data.seq_len={raw.data.seq_len}")
    val_tokens = sum(s.tokens for s in manifest.split_shards("validation"))
    if raw.train.eval_every and not manifest.split_shards("validation"):
        failures.append(f"data: {manifest.path}: the validation split is empty, but train.eval_every="
                        f"{raw.train.eval_every} evaluates; prepare the data again with a larger "
                        "shards.validation_fraction, or set train.eval_every=0 to train without evaluation")
    elif raw.train.eval_every and val_tokens <= raw.data.seq_len:
        failures.append(f"data: {manifest.path}: the validation split holds {val_tokens} tokens, fewer than one "
                        f"sample of data.seq_len={raw.data.seq_len}; prepare more validation data or set "
                        "train.eval_every=0")
    sources = {s.source for s in manifest.shards}
    for name in raw.data.mixture:
        if name not in sources:
            failures.append(f"data: data.mixture.{name}: no such source in {manifest.path} (has {sorted(sources)})")
    return failures, manifest


def check_tokenizer(raw: ProfileFile, manifest: Manifest) -> list[str]:
    tok = manifest.tokenizer
    failures = []
    vocab = raw.model.vocab_size
    if isinstance(vocab, int) and vocab < tok.vocab_size:
        failures.append(f"tokenizer: model.vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size} "
                        f"({manifest.path})")
    if manifest.dtype == "uint16" and tok.vocab_size > 65536:
        failures.append(f"tokenizer: {manifest.path}: dtype uint16 cannot hold ids of a {tok.vocab_size}-id vocabulary")
    if not tok.model_path.is_file():
        failures.append(f"tokenizer: {tok.model_path}: tokenizer model not found (named by {manifest.path})")
        return failures
    digest = sha256_file(tok.model_path)
    if digest != tok.sha256:
        failures.append(f"tokenizer: {tok.model_path}: sha256 {digest[:12]}… is not the manifest's {tok.sha256[:12]}… "
                        "(the shards were tokenized with another tokenizer)")
    from data_prep import encoders

    try:
        have = encoders.described(tok.model_path, manifest.raw["tokenizer"]).vocab()
    except Exception as e:  # noqa: BLE001 - any load failure is the finding
        kind = "tokenizers tokenizer.json" if manifest.raw["tokenizer"].get("type") == "bpe" else "SentencePiece model"
        failures.append(f"tokenizer: {tok.model_path}: not a {kind} ({str(e).splitlines()[0][:80]})")
        return failures
    for what, key, want in (("vocabulary size", "vocab_size", tok.vocab_size), ("bos_id", "bos_id", tok.bos_id),
                            ("eos_id", "eos_id", tok.eos_id)):
        if have[key] != want:
            failures.append(f"tokenizer: {tok.model_path}: {what} is {have[key]} but {manifest.path} says {want}")
    return failures


def check_topology(raw: ProfileFile, source: str, world_size: int) -> list[str]:
    stages = raw.topology.pipeline_stages
    if world_size < 1:
        return [f"topology: world size must be at least 1 (got {world_size})"]
    if world_size % stages:
        return [f"topology: world size {world_size} is not data-parallel × pipeline: not a multiple of "
                f"topology.pipeline_stages={stages} ({source})"]
    return []


def check_checkpoint_dir(out_dir: str | Path, profile: Profile | None) -> list[str]:
    out = Path(out_dir)
    ckpt = out / "checkpoints"
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=ckpt, prefix=".preflight-"):
            pass
    except OSError as e:
        return [f"checkpoints: {ckpt}: not writable ({e.strerror or e})"]
    if profile is None:
        return []
    need = checkpoint_space(profile)
    # Checkpoints already there are replaced or pruned in turn, so their space counts as available.
    have = shutil.disk_usage(ckpt).free + sum(_bytes_under(d) for d in ckpt.glob("global_step*") if d.is_dir())
    if have < need:
        return [f"checkpoints: {ckpt}: {have / 2**30:.1f} GiB free (counting its checkpoints), but "
                f"train.keep_last={profile.train.keep_last} checkpoints plus the one being saved "
                f"({checkpoint_bytes(profile) / 2**30:.1f} GiB each for {profile.model.num_params() / 1e9:.2f} B "
                f"parameters) and a universal copy for a resume on another topology need {need / 2**30:.1f} GiB"]
    return []


def run_preflight(profile: Profile | ProfileFile, manifest_path: str | Path, out_dir: str | Path,
                  world_size: int, source: str = "profile") -> list[str]:
    """Every failure as one line; an empty list when the run can start."""
    if isinstance(profile, Profile):
        raw, source, resolved = profile.raw, profile.source, profile
    else:
        raw, resolved = profile, None
    failures, manifest = check_data(raw, manifest_path)
    if manifest is not None:
        failures += check_tokenizer(raw, manifest)
    topology = check_topology(raw, source, world_size)
    failures += topology
    if not topology:
        if resolved is None or resolved.world_size != world_size:
            try:
                resolved = resolve(raw, source, world_size, manifest.tokenizer.vocab_size if manifest else None)
            except ProfileError as e:
                # Without a manifest an "auto" vocabulary cannot be resolved; that is already reported.
                if manifest is not None or raw.model.vocab_size != "auto":
                    failures.append(f"batch: {e}")
                resolved = None
    failures += check_checkpoint_dir(out_dir, resolved)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.preflight", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="JSON profile (see ds_configs/)")
    ap.add_argument("--out", required=True, help="the run directory the trainer will write (checkpoints under it)")
    ap.add_argument("--manifest", help="token-shard manifest (default: the profile's data.manifest)")
    ap.add_argument("--world-size", type=int, help="total processes; default --nodes × --gpus-per-node, "
                    "or $WORLD_SIZE")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    ap.add_argument("--gpus-per-node", type=int, help="processes per node")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a profile value, as the trainer's --set (repeatable)")
    args = ap.parse_args(argv)
    if args.world_size is None:
        args.world_size = (args.nodes * args.gpus_per_node if args.gpus_per_node
                           else int(os.environ.get("WORLD_SIZE", args.nodes)))
    try:
        raw = parse_profile(apply_overrides(read_profile_json(args.profile), args.overrides), args.profile)
    except ProfileError as e:
        for line in str(e).splitlines():
            print(f"preflight: profile: {line}", file=sys.stderr)
        return 1
    failures = run_preflight(raw, args.manifest or raw.data.manifest, args.out, args.world_size, args.profile)
    for line in failures:
        print(f"preflight: {line}", file=sys.stderr)
    if failures:
        print(f"preflight: {len(failures)} problem(s); nothing was started", file=sys.stderr)
        return 1
    print(f"preflight: ok ({args.profile}, world size {args.world_size}, out {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
