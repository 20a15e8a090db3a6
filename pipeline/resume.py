"""Resuming: what a resume may change and what it refuses, the resume point, and its load.

A checkpoint holds weights and optimizer states of one model, built by one engine, trained on
windows of one length over one tokenizer's ids; its `profile.json` records all of it (and, for
an `--init-from` run, the base model). A resume reads that record before anything is converted,
loaded or written, and compares it with the profile of the new attempt:

- **Refused always** (the checkpoint cannot be loaded, or would be read as something else):
  the engine and ZeRO stage, the precision, the model's shape (`dim`, `n_layers`, `n_heads`,
  `n_kv_heads`, `ffn_dim`, `vocab_size`, `fused_projections`).
- **Refused unless named in `--allow-change FIELD`** (a deliberate change that loads, such as
  a longer context): `data.seq_len`, `model.max_seq_len`, `model.norm_eps`, `model.rope_theta`,
  `model.rope_scaling`, the tokenizer (`tokenizer.sha256`) and the base model (`base_model`).
- **Accepted**: everything else, such as the number of ranks and pipeline stages (the
  checkpoint is converted to DeepSpeed's universal format), the global and micro batch, the
  learning-rate schedule, the run length, evaluation and checkpoint settings, and the data
  manifest as long as its tokenizer is the same.

A refusal is one line naming every differing field with both values, and it leaves the run
directory as it was: `profile.json` is written only once the checkpoint has loaded, and a
universal copy made by an attempt whose load then failed is removed.
"""

from __future__ import annotations

import json
import shutil

from pipeline import distributed
from pipeline.checkpoint_reader import CheckpointError
from pipeline.checkpoints import Checkpoints
from pipeline.config import Profile

SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "fused_projections")
REFUSED = ("topology.engine", "deepspeed.zero_optimization.stage", "train.precision",
           *(f"model.{k}" for k in SHAPE))
ALLOWABLE = ("data.seq_len", "model.max_seq_len", "model.norm_eps", "model.rope_theta", "model.rope_scaling",
             "tokenizer.sha256", "base_model")


class ResumeRefused(Exception):
    pass


def check_allow_change(fields: list[str]) -> None:
    """--allow-change names only fields a resume can change deliberately."""
    for f in fields:
        if f not in ALLOWABLE:
            why = "a checkpoint cannot be loaded with another value" if f in REFUSED else "not a field a resume compares"
            raise ResumeRefused(f"--allow-change {f}: {why}; allowable: {', '.join(ALLOWABLE)}")


def _value(d: dict, path: str):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return _ABSENT
        d = d[key]
    return d


_ABSENT = object()


def _engine(d: dict) -> str | None:
    engine = _value(d, "topology.engine")
    return "zero" if engine == "zero3" else engine  # "zero3" is the data-parallel engine's older name


def _show(v) -> str:
    if isinstance(v, dict) and "base_model" in v:  # --init-from's provenance: its name says which
        v = v["base_model"] or "an unnamed base model"
    return "none" if v is None or v is _ABSENT else json.dumps(v, separators=(",", ":"))


def differences(saved: dict, current: dict, allow: list[str] = ()) -> list[str]:
    """'FIELD: checkpoint A, now B' for each compared field that differs and is not allowed."""
    return [line for field, line in _differing(saved, current) if field not in allow]


def _differing(saved: dict, current: dict) -> list[tuple[str, str]]:
    """(FIELD, 'FIELD: checkpoint A, now B') for each compared field that differs."""
    out = []
    for path in (*REFUSED, *ALLOWABLE):
        a, b = (_engine(saved), _engine(current)) if path == "topology.engine" else (_value(saved, path),
                                                                                      _value(current, path))
        if path == "tokenizer.sha256" and a is _ABSENT:  # written by a trainer that did not record it
            continue
        if path == "base_model":
            a, b = (None if v is _ABSENT else v for v in (a, b))
        if a != b:
            out.append((path, f"{path}: checkpoint {_show(a)}, now {_show(b)}"))
    return out


def resume_tag(ckpts: Checkpoints, resume: str) -> str | None:
    """The tag `--resume` names (None: start fresh). From files only, so every rank decides alike
    before any process group exists."""
    if resume == "none":
        if (ckpts.root / "latest").exists():
            raise ResumeRefused(f"{ckpts.root} already holds checkpoints; use --resume auto or another --out")
        return None
    tag = ckpts.latest() if resume == "auto" else resume
    if tag and not (ckpts.root / tag / "profile.json").is_file():
        raise CheckpointError(f"checkpoint {ckpts.root / tag} does not exist or has no profile.json "
                              f"(complete ones: {ckpts.tags() or 'none'})")
    return tag


def check_resume(ckpts: Checkpoints, tag: str, current: dict, allow: list[str]) -> list[str]:
    """Refuse, in one line, a resume of `tag` whose profile differs from `current` (the new resolved
    profile) in a field it cannot change; returns the differences `allow` lets through."""
    diffs = _differing(json.loads((ckpts.root / tag / "profile.json").read_text()), current)
    refused = [(f, line) for f, line in diffs if f not in allow]
    if refused:
        fields = [f for f, _ in refused]
        hint = (f"; to change it deliberately: --allow-change {' --allow-change '.join(fields)}"
                if all(f in ALLOWABLE for f in fields) else "; use another --out to start a new run")
        raise ResumeRefused(f"cannot resume {ckpts.root / tag}: {'; '.join(line for _, line in refused)}{hint}")
    return [line for _, line in diffs]


def topology_of(profile: Profile) -> dict:
    return {"data_parallel_size": profile.data_parallel_size, "pipeline_stages": profile.topology.pipeline_stages}


def resume_point(ckpts: Checkpoints, tag: str | None, profile: Profile) -> tuple[str | None, Profile, bool]:
    """The tag to load (None: start fresh), the profile to build the engine with (told to read a
    universal checkpoint when the topology changed since the tag was written), and whether this
    attempt made that universal copy. Collective (a conversion); raises CheckpointError."""
    if not tag:
        return None, profile, False
    made = not (ckpts.root / f"{tag}_universal").is_dir()
    load_tag, universal = ckpts.prepare_resume(tag, topology_of(profile))
    if universal:
        profile = profile.model_copy(update={"deepspeed": {**profile.deepspeed, "checkpoint": {"load_universal": True}}})
    return load_tag, profile, universal and made


def resume_state(ckpts: Checkpoints, engine, load_tag: str | None, profile: Profile,
                 made_universal: bool = False) -> tuple[int, int]:
    """(step, consumed samples) to continue from: (0, 0), or the checkpoint's, loaded into `engine`.
    The data position is the saved sample count, not step × batch: a run resumed with another
    global batch (a world-size-derived batch on fewer ranks) continues with the next unseen sample.
    A load that fails removes the universal copy this attempt made (rank 0 made it) and raises."""
    if not load_tag:
        return 0, 0
    rank = distributed.rank()
    try:
        meta = ckpts.load(engine, load_tag)
    except BaseException:  # this rank's files; the launcher stops the other ranks
        if made_universal and rank == 0:
            shutil.rmtree(ckpts.root / load_tag, ignore_errors=True)
        raise
    step, consumed = meta["step"], meta["consumed_samples"]
    saved_batch = meta.get("global_batch_size", consumed // max(step, 1))
    if rank == 0:
        print(f"resumed from {ckpts.root / load_tag} at step {step}", flush=True)
        if saved_batch != profile.global_batch_size:
            print(f"global batch changed since {load_tag.removesuffix('_universal')}: {saved_batch} → {profile.global_batch_size} sequences "
                  f"(world size {meta.get('world_size')} → {distributed.world_size()}); continuing from sample {consumed}, the "
                  "next unseen one", flush=True)
    return step, consumed
