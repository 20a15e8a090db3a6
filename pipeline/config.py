"""Training profiles: JSON on disk, typed models in code, validated once at the edge.

A profile has five sections:

    model      which preset, and any field of `ModelConfig` to override
    data       where the token-shard manifest is, sequence length, mixture weights
    train      optimisation, batch sizes, schedule, checkpoint and logging cadence
    topology   which engine: "zero" (data parallel; the ZeRO stage 1, 2 or 3 is
               deepspeed.zero_optimization.stage), "zero3" (the same, stage 3 only: the name
               older profiles and checkpoints carry) or "pipeline" (DeepSpeed PipelineModule +
               ZeRO stage 1)
    deepspeed  a verbatim DeepSpeed config; values the trainer derives may be "auto"

`load_profile()` returns a `Profile` whose DeepSpeed section has every "auto" filled in and
checked (`pipeline/ds_config.py` builds it from the resolved values), so nothing downstream
re-reads raw dicts. Every mistake is reported as one line that names the file, the field, the
value and what is allowed; unknown keys are errors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_prep.config_errors import error_lines
from pipeline.ds_config import DeepSpeedConfigError, deepspeed_config
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
    # {"rope_type": "linear" | "llama3", "factor": ..., ...} as Hugging Face writes it (pipeline/model.py RopeScaling).
    rope_scaling: dict[str, Any] | None = None
    # One GEMM for q, k, v and one for gate and up (see pipeline/model.py); changes parameter names.
    fused_projections: bool = False

    @model_validator(mode="after")
    def _known_preset(self) -> "ModelSection":
        if self.preset not in PRESETS:
            raise ValueError(f"preset: not one of {sorted(PRESETS)} (got {self.preset!r})")
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

    @model_validator(mode="after")
    def _positive_weights(self) -> "DataSection":
        for name, w in self.mixture.items():
            if not w > 0:
                raise ValueError(f"mixture.{name}: weight must be > 0 (got {w})")
        return self


class WandbSection(_Section):
    """Weights & Biases as a metrics sink beside metrics.jsonl and TensorBoard (pipeline/metrics.py).
    "offline" writes OUT/wandb/offline-run-*/ for `wandb sync` to upload later."""

    project: str
    name: str | None = None  # the run's display name; default: W&B's
    mode: Literal["online", "offline"] = "online"


class TrainSection(_Section):
    # Run length: `steps`, or "auto" with a token budget `total_tokens` (steps = the budget
    # divided by the tokens of one optimizer step, rounded up). Steps given as a number win over
    # the budget, so `--set train.steps=20` turns any profile into a short smoke run.
    steps: int | Literal["auto"] = "auto"
    total_tokens: int | None = Field(None, gt=0)
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
    # What makes a large model fast; each is off (or "auto") by default and changes no result
    # beyond floating-point reordering (tests/pipeline/test_speedups.py compares losses).
    # Activation checkpointing: recompute the activations of every k-th transformer block in the
    # backward pass instead of storing them (k = activation_checkpointing_every; 1 = every block,
    # torchtitan's "full"; 2 = half of them, its selective per-layer option).
    # Document masking (pipeline/model.py Packing): each token attends only to earlier tokens of
    # its own document in the packed window (documents end with EOS); reset_positions restarts
    # rotary positions at each document's first token. Llama 3's recipe; Megatron's
    # --reset-attention-mask / --reset-position-ids.
    document_masking: bool = False
    reset_positions: bool = False
    activation_checkpointing: bool = False
    activation_checkpointing_every: int = Field(1, gt=0)
    # Cross-entropy over chunks of this many tokens, each chunk's logits made, used and freed in
    # turn: the full (tokens × vocabulary) fp32 logits never exist. 0: the whole batch at once.
    loss_chunk_tokens: int = Field(0, ge=0)
    # torch.compile each transformer block (after activation checkpointing, as torchtitan does).
    compile: bool = False
    # The scaled-dot-product-attention kernels allowed: "default" lets torch choose; a name allows
    # only that one, so a run that cannot use it fails instead of silently taking another.
    attention_backend: Literal["default", "flash", "efficient", "cudnn", "math"] = "default"
    seed: int = 1234
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)
    eval_batches: int = Field(8, gt=0)
    checkpoint_every: int = Field(1000, ge=0)
    # false: no save at the end, for benchmarks and smoke runs that measure; signal and skips stops still save, to resume.
    final_checkpoint: bool = True
    keep_last: int = Field(3, gt=0)
    # Resuming on another topology converts the checkpoint first (pipeline/checkpoints.py); a
    # conversion that takes longer stops every rank with one message instead of hanging.
    conversion_timeout_s: int = Field(3600, gt=0)
    # Hangs (pipeline/watchdog.py). The process group's timeout for one collective, passed to
    # DeepSpeed's init_distributed; longer than the watchdog's, so the watchdog speaks first with
    # stacks and the ranks behind. The watchdog: no new phase (batch, engine, all-reduce,
    # evaluation, checkpoint) for this long on a rank writes its stacks and ends it (exit 4);
    # 1800 s lets a 7B checkpoint (~100 GB of weights and optimizer states) reach storage at
    # 60 MB/s. 0 turns the watchdog off.
    collective_timeout_s: int = Field(3600, gt=0)
    hang_timeout_s: int = Field(1800, ge=0)
    # Slow ranks (pipeline/faults.py Stragglers): a rank whose own time lags the median by more than
    # this fraction of the step time, `straggler_intervals` log intervals in a row, gets a warning.
    straggler_lag: float = Field(0.2, gt=0)
    straggler_intervals: int = Field(3, gt=0)
    # Weights & Biases, optional (`pip install wandb`): {"project": ..., "name": ..., "mode": "online" | "offline"}.
    wandb: WandbSection | None = None
    # Fault handling: a non-finite loss skips the step; this many in a row stop the run.
    max_consecutive_skips: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _run_length(self) -> "TrainSection":
        if self.steps == "auto" and self.total_tokens is None:
            raise ValueError("steps: \"auto\" needs a token budget in train.total_tokens; set one of them (got \"auto\")")
        if self.reset_positions and not self.document_masking:
            raise ValueError("reset_positions: restarting positions needs document_masking: true (got true)")
        if self.steps != "auto" and self.steps < 1:
            raise ValueError(f"steps: expected at least 1 optimizer step, or \"auto\" (got {self.steps})")
        return self


class TopologySection(_Section):
    engine: Literal["zero", "zero3", "pipeline"] = "zero3"
    pipeline_stages: int = Field(1, gt=0)

    @property
    def data_parallel(self) -> bool:
        """Whether this is the ZeRO data-parallel engine ("zero", or "zero3" by its older name)."""
        return self.engine != "pipeline"

    @model_validator(mode="after")
    def _stages_match_engine(self) -> "TopologySection":
        if self.data_parallel and self.pipeline_stages != 1:
            raise ValueError(
                "pipeline_stages: more than one stage needs engine 'pipeline' "
                f"(engine {self.engine!r} is data parallel only) (got {self.pipeline_stages})"
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
    # --init-from: the imported model's provenance (pipeline/init_from.py), recorded in every checkpoint.
    base_model: dict[str, Any] | None = None

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
    def zero_stage(self) -> int:
        return self.deepspeed["zero_optimization"]["stage"]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.raw.data.seq_len

    @property
    def total_tokens(self) -> int:
        """Tokens the whole run consumes (steps × tokens per step)."""
        return self.raw.train.steps * self.tokens_per_step

    def resolved_dict(self) -> dict:
        """The fully resolved profile, as written next to checkpoints."""
        out = self.raw.model_dump(mode="json")
        out["model"] = {"preset": self.raw.model.preset, **self.model.to_dict()}
        out["train"].update(grad_accum_steps=self.grad_accum_steps, global_batch_size=self.global_batch_size,
                            global_batch_tokens=self.tokens_per_step)
        out["deepspeed"] = self.deepspeed
        if self.base_model is not None:
            out["base_model"] = self.base_model
        return out


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


def _error(source: str, field: str, what: str, value: Any) -> ProfileError:
    """One line: `FILE: section.key: what is wrong (got VALUE)`."""
    return ProfileError(f"{source}: {field}: {what} (got {json.dumps(value, default=str)})")


def _resolve_batch(t: TrainSection, seq_len: int, dp: int, source: str) -> tuple[int, int]:
    """(grad_accum_steps, global_batch_size) from whichever of the batch fields were given.

    The identity that must hold exactly: global batch = micro_batch_size × grad_accum_steps ×
    data-parallel size (DeepSpeed asserts the same on train_batch_size)."""
    per_accum = t.micro_batch_size * dp
    given = {k: getattr(t, k) for k in ("grad_accum_steps", "global_batch_size", "global_batch_tokens")
             if getattr(t, k) != "auto"}
    for k, v in given.items():
        if v <= 0:
            raise _error(source, f"train.{k}", "must be a positive integer or \"auto\"", v)
    gbs = None
    if "global_batch_tokens" in given:
        if given["global_batch_tokens"] % seq_len:
            raise _error(source, "train.global_batch_tokens", f"not a multiple of data.seq_len={seq_len}",
                         given["global_batch_tokens"])
        gbs = given["global_batch_tokens"] // seq_len
    if "global_batch_size" in given:
        if gbs is not None and gbs != given["global_batch_size"]:
            raise _error(source, "train.global_batch_size",
                         f"disagrees with train.global_batch_tokens / data.seq_len = {gbs}", given["global_batch_size"])
        gbs = given["global_batch_size"]
    if gbs is None:
        accum = given.get("grad_accum_steps", 1)
        return accum, accum * per_accum
    field = "train.global_batch_tokens" if "global_batch_tokens" in given else "train.global_batch_size"
    if gbs % per_accum:
        raise _error(source, field, f"a global batch of {gbs} sequences is not a multiple of micro_batch_size "
                     f"{t.micro_batch_size} × data-parallel size {dp} = {per_accum}", given[field.split(".")[1]])
    accum = gbs // per_accum
    if "grad_accum_steps" in given and given["grad_accum_steps"] != accum:
        raise _error(source, "train.grad_accum_steps", f"the global batch of {gbs} sequences needs "
                     f"{gbs} / ({t.micro_batch_size} × {dp}) = {accum}", given["grad_accum_steps"])
    return accum, gbs


def _check_shape(m: ModelSection, source: str) -> None:
    """The attention shape, with the preset's values where the profile gives none."""
    base = PRESETS[m.preset]
    d, h = m.dim or base.dim, m.n_heads or base.n_heads
    kv = m.n_kv_heads or base.n_kv_heads or h  # as build() merges them
    if d % h:
        raise _error(source, "model.dim", f"not divisible by model.n_heads={h}", d)
    if h % kv:
        raise _error(source, "model.n_kv_heads", f"does not divide model.n_heads={h}", kv)
    if (d // h) % 2:
        raise _error(source, "model.dim", f"the head dimension dim / n_heads = {d // h} must be even for rotary "
                     "embeddings", d)


def _run_steps(t: TrainSection, tokens_per_step: int) -> int:
    if t.steps != "auto":
        return t.steps
    return -(-t.total_tokens // tokens_per_step)  # ceil: the budget is a floor, never cut short


def resolve(raw: ProfileFile, source: str, world_size: int, vocab_size: int | None = None) -> Profile:
    """Fill in every derived value and check it; raises ProfileError with one line."""
    topo = raw.topology
    if world_size < 1:
        raise ProfileError(f"{source}: world size must be at least 1 (got {world_size})")
    if world_size % topo.pipeline_stages:
        raise _error(source, "topology.pipeline_stages",
                     f"world size {world_size} is not a multiple of the pipeline stages", topo.pipeline_stages)
    dp = world_size // topo.pipeline_stages
    if raw.model.vocab_size == "auto" and vocab_size is None:
        raise _error(source, "model.vocab_size", "\"auto\" needs the tokenizer of a data manifest", "auto")
    _check_shape(raw.model, source)
    try:
        model = raw.model.build(vocab_size)
    except ValueError as e:  # anything ModelConfig refuses that the check above missed
        raise ProfileError(f"{source}: model: {e}") from None
    if raw.data.seq_len > model.max_seq_len:
        raise _error(source, "data.seq_len", f"exceeds model.max_seq_len={model.max_seq_len}", raw.data.seq_len)
    if topo.pipeline_stages > model.n_layers:
        raise _error(source, "topology.pipeline_stages", f"more stages than model.n_layers={model.n_layers}",
                     topo.pipeline_stages)
    t = raw.train
    accum, gbs = _resolve_batch(t, raw.data.seq_len, dp, source)
    steps = _run_steps(t, gbs * raw.data.seq_len)
    if t.decay_steps != "auto" and t.decay_steps <= t.warmup_steps:
        raise _error(source, "train.decay_steps", f"must exceed train.warmup_steps={t.warmup_steps}", t.decay_steps)
    # The resolved profile names the run length and the cosine's length as numbers.
    filled = {"steps": steps, "decay_steps": steps if t.decay_steps == "auto" else t.decay_steps}
    raw = raw.model_copy(update={"train": t.model_copy(update=filled)})
    t = raw.train

    try:
        ds = deepspeed_config(raw.deepspeed, engine=topo.engine, precision=t.precision, grad_clip=t.grad_clip,
                              micro_batch_size=t.micro_batch_size, grad_accum_steps=accum, global_batch_size=gbs,
                              hidden_size=model.dim, world_size=world_size)
    except DeepSpeedConfigError as e:
        raise _error(source, e.field, e.what, e.value) from None
    return Profile(source=source, raw=raw, model=model, world_size=world_size, data_parallel_size=dp,
                   grad_accum_steps=accum, global_batch_size=gbs, deepspeed=ds)


def parse_profile(raw: dict, source: str) -> ProfileFile:
    try:
        return ProfileFile.model_validate(raw)
    except ValidationError as e:
        raise ProfileError("\n".join(error_lines(source, ProfileFile, e))) from None


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
