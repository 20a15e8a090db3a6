"""The complete DeepSpeed config of a run, from a profile's `deepspeed` section.

In: the profile's raw `deepspeed` dict (verbatim DeepSpeed keys, any derived value may be "auto"
or left out) and the values `pipeline/config.py` has already resolved from the train, topology
and model sections (engine, precision, batch sizes, gradient clipping, hidden size, world size).
Out: `deepspeed_config()` returns a new dict, the complete config handed to
`deepspeed.initialize`, with no "auto" left; the input dict is not changed.

A value the profile gives must agree with the one derived (an identity such as the batch size
is not a tunable); a key DeepSpeed would ignore or refuse late is refused here. A mistake raises
`DeepSpeedConfigError` naming the field; `pipeline/config.py` adds the profile's file to make
the one-line `FILE: deepspeed.key: what is wrong (got VALUE)` error.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import ValidationError


class DeepSpeedConfigError(ValueError):
    """A wrong value in the deepspeed section: the field (`deepspeed.…`), what is wrong, the value."""

    def __init__(self, field: str, what: str, value: Any):
        super().__init__(f"{field}: {what}")
        self.field, self.what, self.value = field, what, value


def _fill(ds: dict, key: str, value: Any, path: str) -> None:
    """Fill an "auto" (or missing) DeepSpeed value; a given value must agree with the derived one."""
    if ds.get(key, "auto") == "auto":
        ds[key] = value
    elif ds[key] != value:
        raise DeepSpeedConfigError(f"deepspeed.{path}{key}", f"disagrees with the value derived from the profile "
                                   f"({json.dumps(value)}); set it to \"auto\"", ds[key])


def _check_zero_section(zero: dict) -> None:
    """Unknown or mistyped keys of deepspeed.zero_optimization, checked by DeepSpeed's own schema
    (DeepSpeed would otherwise stop at the first one, after the model is built)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # tools that only read profiles need not have DeepSpeed installed
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        what = "unknown key (check its spelling)" if first["type"] == "extra_forbidden" else first["msg"]
        raise DeepSpeedConfigError(f"deepspeed.zero_optimization.{loc}", what, first.get("input")) from None


# Keys DeepSpeed reads only at ZeRO stage 3 (weights partitioned), with the value that leaves them off.
STAGE3_ONLY = {"offload_param": None, "zero_hpz_partition_size": 1}


def _zero_stage(engine: str, stage: Any) -> int:
    """The ZeRO stage the engine runs: "auto" is 3 for the data-parallel engine, 1 for the pipeline."""
    field = "deepspeed.zero_optimization.stage"
    if stage == "auto":
        return 1 if engine == "pipeline" else 3
    if engine == "pipeline" and stage not in (0, 1):
        raise DeepSpeedConfigError(field, "topology.engine 'pipeline' allows ZeRO stage 0 or 1 only: DeepSpeed "
                                   "refuses ZeRO-2/3 with pipeline parallelism (deepspeed/runtime/pipe/engine.py); "
                                   "for ZeRO-2/3 use topology.engine 'zero' (or 'zero3')", stage)
    if engine == "zero3" and stage != 3:
        raise DeepSpeedConfigError(field, "topology.engine 'zero3' needs 3; for ZeRO-1 or ZeRO-2 use topology.engine "
                                   "'zero'", stage)
    if engine == "zero" and stage not in (1, 2, 3):
        raise DeepSpeedConfigError(field, "topology.engine 'zero' needs 1, 2, 3 or \"auto\" (3)", stage)
    return stage


def _fill_zero_buckets(zero: dict, h: int) -> None:
    """DeepSpeed's own "auto" rules (as its Hugging Face integration applies them), from the hidden
    size h: the reduce bucket at every stage, the prefetch bucket and persistence threshold at
    stage 3 only (where they also replace DeepSpeed's defaults when absent). These are tunables,
    not identities: a number given in the profile wins. Below stage 3 a stage-3 key left "auto"
    is dropped (nothing to derive); one given a value contradicts the stage and is refused, as
    DeepSpeed would silently ignore it."""
    stage = zero["stage"]
    if stage == 3:
        for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                           ("stage3_param_persistence_threshold", 10 * h)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
        return
    if zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = h * h
    for key in [k for k in zero if k.startswith("stage3_")]:
        if zero[key] == "auto":
            del zero[key]
        else:
            raise DeepSpeedConfigError(f"deepspeed.zero_optimization.{key}", f"applies to ZeRO stage 3 only, but the "
                                       f"stage is {stage}; remove it", zero[key])
    for key, off in STAGE3_ONLY.items():
        value = zero.get(key, off)
        if value != off and not (isinstance(value, dict) and value.get("device", "none") == "none"):
            raise DeepSpeedConfigError(f"deepspeed.zero_optimization.{key}", f"applies to ZeRO stage 3 only (it "
                                       f"partitions or offloads the weights), but the stage is {stage}; remove it",
                                       value)


def _find_auto(d: Any, prefix: str = "") -> str | None:
    if isinstance(d, dict):
        for k, v in d.items():
            found = _find_auto(v, f"{prefix}{k}.")
            if found:
                return found
    elif d == "auto":
        return prefix.rstrip(".")
    return None


def deepspeed_config(raw: dict, *, engine: str, precision: str, grad_clip: float, micro_batch_size: int,
                     grad_accum_steps: int, global_batch_size: int, hidden_size: int, world_size: int) -> dict:
    """The complete DeepSpeed config (see the module docstring); raises DeepSpeedConfigError."""
    ds = copy.deepcopy(raw)
    for bad in ("optimizer", "scheduler"):
        if bad in ds:
            raise DeepSpeedConfigError(f"deepspeed.{bad}", "the trainer builds the optimizer and schedule from the "
                                       "train section (so weight decay skips norms); remove this key", ds[bad])
    _fill(ds, "train_batch_size", global_batch_size, "")
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", grad_accum_steps, "")
    _fill(ds, "gradient_clipping", grad_clip, "")
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", on, f"{key}.")
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = _zero_stage(engine, zero.get("stage", "auto"))
    _fill_zero_buckets(zero, hidden_size)
    hpz = zero.get("zero_hpz_partition_size", 1)
    if isinstance(hpz, int) and hpz > 1 and world_size % hpz:
        # ZeRO++ hpZ keeps a secondary copy of the weights partitioned over `hpz` ranks (one node).
        raise DeepSpeedConfigError("deepspeed.zero_optimization.zero_hpz_partition_size",
                                   f"world size {world_size} is not a multiple of it (set it to the GPUs per node)",
                                   hpz)
    _check_zero_section(zero)
    if engine == "pipeline" and precision == "bf16":
        # DeepSpeed's pipeline engine with bf16 needs fp32 gradient accumulation.
        dtypes = ds.setdefault("data_types", {})
        _fill(dtypes, "grad_accum_dtype", "fp32", "data_types.")
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress line
    ds.setdefault("wall_clock_breakdown", False)
    left = _find_auto(ds)
    if left:
        raise DeepSpeedConfigError(f"deepspeed.{left}", "\"auto\" but the trainer does not derive it; give a value",
                                   "auto")
    return ds
