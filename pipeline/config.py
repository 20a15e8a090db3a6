"""Training profiles: JSON on disk, typed models in code, validated once at the edge.

A profile has five sections:

    model      which preset, and any field of `ModelConfig` to override
    data       where the token-shard manifest is, sequence length, mixture weights
    train      optimisation, batch sizes, schedule, checkpoint and logging cadence
    topology   which engine: "zero3" (data parallel, ZeRO stage 3) or "pipeline"
               (DeepSpeed PipelineModule + ZeRO stage 1)
    deepspeed  a verbatim DeepSpeed config; values the trainer derives may be "auto"

`load_profile()` returns a `Profile` whose DeepSpeed section has every "auto" filled in and
checked, so nothing downstream re-reads raw dicts. Every mistake is reported as one line that
names the file, the field, the value and what is allowed; unknown keys are errors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.model import PRESETS, ModelConfig


class ProfileError(ValueError):
    """A profile that cannot be used; the message is one line per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    preset: str = "tiny"
    dim: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    ffn_dim: int | None = Field(None, gt=0)
    # "auto": taken from the tokenizer recorded in the data manifest.
    vocab_size: int | Literal["auto"] | None = None
    max_seq_len: int | None = Field(None, gt=0)
    norm_eps: float | None = Field(None, gt=0)
    rope_theta: float | None = Field(None, gt=0)
    init_std: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _known_preset(self) -> "ModelSection":
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} is not one of {sorted(PRESETS)}")
        return self

    def build(self, vocab_size: int | None = None) -> ModelConfig:
        base = PRESETS[self.preset]
        fields = {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}
        if fields.get("vocab_size") == "auto":
            if vocab_size is None:
                raise ProfileError("model.vocab_size is 'auto' but no tokenizer vocabulary is known")
            fields["vocab_size"] = vocab_size
        return ModelConfig(**{**base.to_dict(), **fields})


class DataSection(_Section):
    manifest: str = "runs/demo/prep/shards/manifest.json"
    seq_len: int = Field(256, gt=0)
    # Source name → weight; empty means every source in proportion to its tokens.
    mixture: dict[str, float] = Field(default_factory=dict)
    seed: int = 1234
    num_workers: int = Field(0, ge=0)


class TrainSection(_Section):
    steps: int = Field(gt=0)
    # Batch sizes: set micro_batch_size, and either global_batch_size (sequences),
    # global_batch_tokens, or grad_accum_steps; the rest are derived and checked.
    micro_batch_size: int = Field(gt=0)
    grad_accum_steps: int | Literal["auto"] = "auto"
    global_batch_size: int | Literal["auto"] = "auto"
    global_batch_tokens: int | Literal["auto"] = "auto"
    # LLaMA's published recipe (Touvron et al. 2023): AdamW β=(0.9, 0.95), weight decay 0.1,
    # linear warmup then cosine to 10 % of peak, gradient clipping 1.0.
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(2000, ge=0)
    decay_steps: int | Literal["auto"] = "auto"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    activation_checkpointing: bool = False
    seed: int = 1234
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)
    eval_batches: int = Field(8, gt=0)
    checkpoint_every: int = Field(1000, ge=0)
    keep_last: int = Field(3, gt=0)
    # Fault handling: a non-finite loss skips the step; this many in a row stop the run.
    max_consecutive_skips: int = Field(10, gt=0)


class TopologySection(_Section):
    engine: Literal["zero3", "pipeline"] = "zero3"
    pipeline_stages: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _stages_match_engine(self) -> "TopologySection":
        if self.engine == "zero3" and self.pipeline_stages != 1:
            raise ValueError(
                f"pipeline_stages={self.pipeline_stages} needs engine 'pipeline' "
                "(DeepSpeed cannot combine ZeRO-3 with pipeline parallelism)"
            )
        return self


class ProfileFile(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection
    topology: TopologySection = TopologySection()
    deepspeed: dict[str, Any] = Field(default_factory=dict)


class Profile(BaseModel):
    """A validated profile with everything derived: what the trainer and tools consume."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: str
    raw: ProfileFile
    model: ModelConfig
    world_size: int
    data_parallel_size: int
    grad_accum_steps: int
    global_batch_size: int  # sequences per optimizer step, all ranks
    deepspeed: dict[str, Any]  # complete DeepSpeed config, no "auto" left

    @property
    def train(self) -> TrainSection:
        return self.raw.train

    @property
    def data(self) -> DataSection:
        return self.raw.data

    @property
    def topology(self) -> TopologySection:
        return self.raw.topology

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.raw.data.seq_len

    def resolved_dict(self) -> dict:
        """The fully resolved profile, as written next to checkpoints."""
        out = self.raw.model_dump(mode="json")
        out["model"] = {"preset": self.raw.model.preset, **self.model.to_dict()}
        out["train"].update(grad_accum_steps=self.grad_accum_steps, global_batch_size=self.global_batch_size,
                            global_batch_tokens=self.tokens_per_step)
        out["deepspeed"] = self.deepspeed
        return out


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        value = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {json.dumps(e.get('input'), default=str)[:80]})"
        lines.append(f"{source}: {loc or '<top>'}: {msg}{value}")
    return "\n".join(lines)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ProfileError(f"--set {dotted}: {k!r} is not a section")
    d[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings; the value is parsed as JSON when it can be, else a string."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        _set_dotted(raw, key.strip(), value)
    return raw


def _resolve_batch(t: TrainSection, seq_len: int, dp: int, source: str) -> tuple[int, int]:
    """(grad_accum_steps, global_batch_size) from whichever of the batch fields were given."""
    per_accum = t.micro_batch_size * dp
    given = {k: getattr(t, k) for k in ("grad_accum_steps", "global_batch_size", "global_batch_tokens")
             if getattr(t, k) != "auto"}
    gbs = None
    if "global_batch_tokens" in given:
        if given["global_batch_tokens"] % seq_len:
            raise ProfileError(f"{source}: train.global_batch_tokens={given['global_batch_tokens']} is not a multiple "
                               f"of data.seq_len={seq_len}")
        gbs = given["global_batch_tokens"] // seq_len
    if "global_batch_size" in given:
        if gbs is not None and gbs != given["global_batch_size"]:
            raise ProfileError(f"{source}: train.global_batch_size={given['global_batch_size']} disagrees with "
                               f"train.global_batch_tokens/seq_len={gbs}")
        gbs = given["global_batch_size"]
    if gbs is None:
        accum = given.get("grad_accum_steps", 1)
        return accum, accum * per_accum
    if gbs % per_accum:
        raise ProfileError(f"{source}: global batch of {gbs} sequences is not a multiple of micro_batch_size "
                           f"{t.micro_batch_size} × data-parallel size {dp} = {per_accum}")
    accum = gbs // per_accum
    if "grad_accum_steps" in given and given["grad_accum_steps"] != accum:
        raise ProfileError(f"{source}: train.grad_accum_steps={given['grad_accum_steps']} but the global batch needs "
                           f"{gbs} / ({t.micro_batch_size} × {dp}) = {accum}")
    return accum, gbs


def _fill(ds: dict, key: str, value: Any, source: str, path: str) -> None:
    """Fill an "auto" (or missing) DeepSpeed value; a given value must agree with the derived one."""
    if ds.get(key, "auto") == "auto":
        ds[key] = value
    elif ds[key] != value:
        raise ProfileError(f"{source}: deepspeed.{path}{key}={ds[key]!r} disagrees with the value derived from "
                           f"the train section ({value!r}); set it to \"auto\"")


def resolve(raw: ProfileFile, source: str, world_size: int, vocab_size: int | None = None) -> Profile:
    topo = raw.topology
    if world_size % topo.pipeline_stages:
        raise ProfileError(f"{source}: world size {world_size} is not a multiple of topology.pipeline_stages="
                           f"{topo.pipeline_stages}")
    dp = world_size // topo.pipeline_stages
    model = raw.model.build(vocab_size)
    if raw.data.seq_len > model.max_seq_len:
        raise ProfileError(f"{source}: data.seq_len={raw.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    t = raw.train
    accum, gbs = _resolve_batch(t, raw.data.seq_len, dp, source)

    ds = copy.deepcopy(raw.deepspeed)
    _fill(ds, "train_batch_size", gbs, source, "")
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, source, "")
    _fill(ds, "gradient_accumulation_steps", accum, source, "")
    _fill(ds, "gradient_clipping", t.grad_clip, source, "")
    for key, on in (("bf16", t.precision == "bf16"), ("fp16", t.precision == "fp16")):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", on, source, f"{key}.")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", "auto")
    want = 3 if topo.engine == "zero3" else 1
    if stage == "auto":
        zero["stage"] = want
    elif topo.engine == "pipeline" and stage >= 2:
        raise ProfileError(
            f"{source}: deepspeed.zero_optimization.stage={stage} with topology.engine='pipeline': DeepSpeed refuses "
            "ZeRO-2/3 together with pipeline parallelism (assert in deepspeed/runtime/pipe/engine.py); use either "
            "engine 'zero3' (ZeRO stage 3, data parallel) or engine 'pipeline' with ZeRO stage 0 or 1"
        )
    elif topo.engine == "zero3" and stage != 3:
        raise ProfileError(f"{source}: deepspeed.zero_optimization.stage={stage} but topology.engine='zero3' needs 3")
    if zero["stage"] == 3:
        # DeepSpeed's own "auto" rules (as its Hugging Face integration applies them), from the hidden size.
        h = model.dim
        _fill(zero, "reduce_bucket_size", h * h, source, "zero_optimization.")
        _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h), source, "zero_optimization.")
        _fill(zero, "stage3_param_persistence_threshold", 10 * h, source, "zero_optimization.")
    if topo.engine == "pipeline" and t.precision == "bf16":
        # DeepSpeed's pipeline engine with bf16 needs fp32 gradient accumulation.
        dtypes = ds.setdefault("data_types", {})
        _fill(dtypes, "grad_accum_dtype", "fp32", source, "data_types.")
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress line
    ds.setdefault("wall_clock_breakdown", False)
    for bad in ("optimizer", "scheduler"):
        if bad in ds:
            raise ProfileError(f"{source}: deepspeed.{bad}: the trainer builds the optimizer and schedule from the train "
                               "section (so weight decay skips norms); remove this key")
    left = _find_auto(ds)
    if left:
        raise ProfileError(f"{source}: deepspeed.{left} is \"auto\" but the trainer does not derive it; give a value")
    return Profile(source=source, raw=raw, model=model, world_size=world_size, data_parallel_size=dp,
                   grad_accum_steps=accum, global_batch_size=gbs, deepspeed=ds)


def _find_auto(d: Any, prefix: str = "") -> str | None:
    if isinstance(d, dict):
        for k, v in d.items():
            found = _find_auto(v, f"{prefix}{k}.")
            if found:
                return found
    elif d == "auto":
        return prefix.rstrip(".")
    return None


def parse_profile(raw: dict, source: str) -> ProfileFile:
    try:
        return ProfileFile.model_validate(raw)
    except ValidationError as e:
        raise ProfileError(_format_validation_error(source, e)) from None


def read_profile_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile ({e.strerror})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a JSON object at the top level")
    return raw


def load_profile(path: str | Path, world_size: int, overrides: list[str] = (), vocab_size: int | None = None) -> Profile:
    raw = apply_overrides(read_profile_json(path), list(overrides))
    return resolve(parse_profile(raw, str(path)), str(path), world_size, vocab_size)
