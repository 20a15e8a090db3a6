"""Read the model weights out of DeepSpeed checkpoints, one layer at a time, without DeepSpeed.

Three layouts: the data-parallel engine's at ZeRO stage 3 and at stage 1 or 2, and the
pipeline engine's (see `pipeline/train.py` for the directory around them). Optimizer files of
bf16 runs are named `bf16_zero_pp_rank_...` instead of `zero_pp_rank_...`.

ZeRO-3 (`topology.engine` "zero3", or "zero" at stage 3), one pair of files per data-parallel
rank R of W:

    zero_pp_rank_R_mp_rank_00_model_states.pt   param_shapes: [OrderedDict(name → Size)] per
                                                optimizer group, global_steps, dp_world_size, ...
    zero_pp_rank_R_mp_rank_00_optim_states.pt   optimizer_state_dict.fp32_flat_groups: one flat
                                                fp32 tensor per group, rank R's partitions
                                                (named bf16_zero_pp_rank_R_... after bf16 training)

    Parameters are laid out in `param_shapes` order across the concatenated groups; parameter p
    of n elements owns ceil(n / W) elements of every rank's flat vector (DeepSpeed pads the last
    rank), so its full value is the concatenation over ranks of the same slice, cut to n
    (deepspeed/utils/zero_to_fp32.py, `_zero3_merge_trainable_params`, is the reference).

ZeRO-1/2 (`topology.engine` "zero" at stage 1 or 2):

    mp_rank_00_model_states.pt                  rank 0 only: param_shapes, global_steps, ... (and
                                                the 16-bit weights, which the export does not use)
    zero_pp_rank_R_mp_rank_00_optim_states.pt   optimizer_state_dict.single_partition_of_fp32_groups:
                                                rank R's 1/W of each group's flat fp32 vector

    Each group's vector is the concatenation over ranks; parameter p is the slice at its offset
    in `param_shapes` order, parameters separated by `param_alignment_paddings` (`Zero12Reader`).

Pipeline (`topology.engine == "pipeline"`, `PipelineModule.save_state_dict`):

    layer_{idx:02d}-model_states.pt   idx 0: embedding, 1..L: block idx-1, L+1: final norm + head
                                      (deepspeed/runtime/pipe/module.py, `ckpt_layer_path`)

Files are opened with `safe_torch_load` (weights_only=True, one allow-list, `ALLOWED_GLOBALS`,
shared with the trainer) and memory-mapped. The only non-tensor objects in them are a few
DeepSpeed classes in the optimizer files (`ZeroStageEnum`, the loss scaler, ZeRO-1/2's
`fragment_address`); the export maps them to an inert stand-in, so nothing from the file is
executed and DeepSpeed need not be installed. A rank's optimizer file is re-opened for every
layer and closed after it, so the pages of the memory map touched for one layer are released
before the next: peak memory stays near one layer, whatever the model size.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.hf import model_shapes, shape_problem
from pipeline.model import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the file."""


# The only non-tensor objects DeepSpeed pickles into the files the trainer writes, listed with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 (fp32, bf16, fp16),
# pipeline + ZeRO-1 and universal checkpoints. Everything else in them is tensors and plain
# containers. One list for every reader: the trainer, the universal conversion and the export.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2's param_slice_mappings
)


class _Opaque:
    """Inert stand-in for the allowed DeepSpeed objects, where only the tensors are wanted."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _deepspeed_classes() -> list:
    """The allowed globals as DeepSpeed's own classes (for loading into a DeepSpeed engine)."""
    import importlib

    return [getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2])
            for name in ALLOWED_GLOBALS]


_torch_load = torch.load  # the unpatched function, whatever `safe_loading` does to torch.load


def safe_torch_load(path, map_location=None, *, real_classes: bool = True, mmap: bool = False, **_ignored):
    """torch.load with weights_only=True and only ALLOWED_GLOBALS: a tampered file cannot run code
    when it is loaded. `real_classes`: DeepSpeed's classes (needs DeepSpeed), else inert stand-ins.
    Any other keyword (DeepSpeed passes weights_only=False) is overridden."""
    allowed = _deepspeed_classes() if real_classes else [(_Opaque, name) for name in ALLOWED_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return _torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unpickling refused"
        raise CheckpointError(f"{path}: refused to load a pickled object outside the allow-list "
                              f"(pipeline/checkpoint_reader.py ALLOWED_GLOBALS): {reason}") from None
    except Exception as e:  # RuntimeError on a truncated zip, OSError, ...
        raise CheckpointError(f"{path}: cannot be read ({str(e).strip().splitlines()[0][:200]})") from None


@contextmanager
def safe_loading():
    """Every torch.load in the block (DeepSpeed's checkpoint engine, its universal-checkpoint
    loader and `ds_to_universal`, which all pass weights_only=False) goes through
    `safe_torch_load`."""
    torch.load = safe_torch_load
    try:
        yield
    finally:
        torch.load = _torch_load


def load_file(path: Path) -> dict:
    """A checkpoint file for reading its tensors without DeepSpeed: safe, memory-mapped, DeepSpeed's
    objects replaced by inert stand-ins."""
    return safe_torch_load(path, map_location="cpu", real_classes=False, mmap=True)


def layer_units(names) -> list[list[str]]:
    """Group names into what a reader loads at once: the embedding, each block, the rest."""
    units: dict[str, list[str]] = {}
    for name in names:
        m = re.match(r"^(layers\.\d+)\.", name)
        units.setdefault(m.group(1) if m else name, []).append(name)
    return list(units.values())


def _check_names(where: str, have: dict, want: dict) -> None:
    problem = shape_problem(have, want)
    if problem:
        raise CheckpointError(f"{where}: {problem[1]}")


def _tag_step(tag_dir: Path) -> int | None:
    m = re.fullmatch(r"global_step(\d+)", tag_dir.name)
    return int(m.group(1)) if m else None


def _copy_range(pieces: list[torch.Tensor], start: int, out: torch.Tensor) -> None:
    """Fill `out` with elements start .. start + len(out) of the concatenation of `pieces`, without
    concatenating them (a parameter may straddle two flat groups or two ranks' partitions)."""
    dst, need = 0, out.numel()
    for piece in pieces:
        if start >= piece.numel():
            start -= piece.numel()
            continue
        take = min(need, piece.numel() - start)
        out[dst:dst + take].copy_(piece[start:start + take])
        dst, need, start = dst + take, need - take, 0
        if not need:
            return
    raise CheckpointError(f"the flat fp32 groups end {need} elements short of a parameter; files from different runs?")


class _ZeroReader:
    """What the readers of the ZeRO data-parallel engine's checkpoints share: one optimizer file
    per data-parallel rank holding its part of the fp32 master weights, and model-state files
    naming every parameter and shape in the order the flat vectors hold them."""

    # bf16 runs prefix the optimizer files with "bf16_" (DeepSpeedEngine._get_zero_ckpt_prefix).
    OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
    STAGES = ""  # for messages, e.g. "3" or "1/2"
    MODEL_PER_RANK = True  # one model-state file per rank, or rank 0's only
    FLAT_KEY = ""  # where in the optimizer state this rank's fp32 weights are

    def _read_model_states(self, model_files: list[Path], cfg: ModelConfig) -> list[dict]:
        """param_shapes (one name → shape dict per optimizer group) after every consistency check;
        sets world, step and optim_files."""
        states = [load_file(f) for f in model_files]
        if "param_shapes" not in states[0]:
            raise CheckpointError(f"{model_files[0]}: no param_shapes; not a ZeRO stage {self.STAGES} checkpoint")
        self.world = self._agree(states, "dp_world_size", model_files)
        if self.MODEL_PER_RANK:
            self._check_ranks("model-state", model_files)
        self.optim_files = self._rank_files(self.OPTIM)
        self._check_ranks("optimizer", self.optim_files)
        for key in ("global_steps", "global_samples", "ds_version", "param_shapes", "ds_config", "run_id"):
            self._agree(states, key, model_files)
        self.step = states[0].get("global_steps")
        if _tag_step(self.tag_dir) not in (None, self.step):
            raise CheckpointError(f"{model_files[0]}: saved at step {self.step} but lies in {self.tag_dir.name}; "
                                  "files from different runs or steps")
        if states[0].get("frozen_param_shapes"):
            raise CheckpointError(f"{model_files[0]}: frozen parameters are not supported")
        groups = states[0]["param_shapes"]
        _check_names(str(model_files[0]), {n: s for g in groups for n, s in g.items()}, model_shapes(cfg))
        self.order = list(model_shapes(cfg))
        return groups

    def _rank_files(self, pattern: re.Pattern) -> list[Path]:
        found = {}
        for f in self.tag_dir.iterdir():
            m = pattern.match(f.name)
            if m:
                found[int(m.group(1))] = f
        return [found[r] for r in sorted(found)]

    def _check_ranks(self, kind: str, files: list[Path]) -> None:
        ranks = [int(re.search(r"rank_(\d+)_mp", f.name).group(1)) for f in files]
        missing = sorted(set(range(self.world)) - set(ranks))
        extra = sorted(set(ranks) - set(range(self.world)))
        if missing:
            raise CheckpointError(f"{self.tag_dir}: {kind} file(s) of rank(s) {missing} missing "
                                  f"(the checkpoint was saved by {self.world} ranks)")
        if extra:
            raise CheckpointError(f"{self.tag_dir}: extra {kind} file(s) of rank(s) {extra}, but the checkpoint was "
                                  f"saved by {self.world} ranks; files from different runs?")

    def _agree(self, states: list[dict], key: str, files: list[Path]):
        first = states[0].get(key)
        for f, s in zip(files[1:], states[1:]):
            if s.get(key) != first:
                raise CheckpointError(f"{f}: {key} differs from {files[0].name}'s; files from different runs or steps")
        return first

    def _optim_states(self) -> list[dict]:
        """Every rank's optimizer state (memory-mapped), its flat groups and partition count checked."""
        out = []
        for f in self.optim_files:
            opt = load_file(f).get("optimizer_state_dict", {})
            if opt.get(self.FLAT_KEY) is None:
                raise CheckpointError(f"{f}: no {self.FLAT_KEY}; not a ZeRO stage {self.STAGES} optimizer file")
            counts = opt.get("partition_count")  # one per group below stage 3
            if any(c != self.world for c in (counts if isinstance(counts, list) else [counts])):
                raise CheckpointError(f"{f}: partitioned {counts} ways, but the model states say "
                                      f"{self.world} ranks; files from different runs?")
            out.append(opt)
        return out

    def _gather(self, flats: list[list[torch.Tensor]], name: str) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, fp32 tensor) in model order; each yielded tensor owns its memory."""
        for unit in layer_units(self.order):
            flats = [load_file(f)["optimizer_state_dict"][self.FLAT_KEY] for f in self.optim_files]
            gathered = [(name, self._gather(flats, name)) for name in unit]
            del flats  # drop the memory maps before the consumer works on this layer
            yield from gathered


@dataclass
class _Slot:
    """Where one parameter lives in every rank's concatenated flat fp32 vector."""

    shape: torch.Size
    offset: int
    part: int  # elements per rank, ceil(numel / world)


class Zero3Reader(_ZeroReader):
    """The fp32 master weights of a ZeRO-3 checkpoint, merged from any number of ranks."""

    MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
    STAGES = "3"
    FLAT_KEY = "fp32_flat_groups"

    def __init__(self, tag_dir: Path, cfg: ModelConfig):
        self.tag_dir = tag_dir
        model_files = self._rank_files(self.MODEL)
        if not model_files:
            raise CheckpointError(f"{tag_dir}: no ZeRO-3 model-state files (zero_pp_rank_*_mp_rank_00_model_states.pt)")
        groups = self._read_model_states(model_files, cfg)
        self.slots: dict[str, _Slot] = {}
        offset = 0
        for name, shape in ((n, s) for g in groups for n, s in g.items()):
            part = math.ceil(shape.numel() / self.world)
            self.slots[name] = _Slot(shape, offset, part)
            offset += part
        for f, opt in zip(self.optim_files, self._optim_states()):
            have = sum(g.numel() for g in opt[self.FLAT_KEY])
            if have != offset:
                raise CheckpointError(f"{f}: holds {have} fp32 elements but the parameter shapes need {offset} "
                                      "per rank; files from different runs?")

    def _gather(self, flats: list[list[torch.Tensor]], name: str) -> torch.Tensor:
        slot = self.slots[name]
        out = torch.empty(slot.part * self.world, dtype=torch.float32)
        for r, groups in enumerate(flats):
            _copy_range(groups, slot.offset, out[r * slot.part:(r + 1) * slot.part])
        return out[:slot.shape.numel()].view(slot.shape)


class Zero12Reader(_ZeroReader):
    """The fp32 master weights of a ZeRO stage 1 or 2 checkpoint, merged from any number of ranks.

    DeepSpeed flattens each optimizer group's parameters in `param_shapes` order into one vector,
    each parameter followed by its alignment padding (`param_alignment_paddings`), and cuts it into
    W equal partitions; rank R's file holds partition R (`single_partition_of_fp32_groups`, the
    trailing padding removed). So a group's vector is the concatenation over ranks, and parameter
    p is the slice at its offset (deepspeed/utils/zero_to_fp32.py, `_zero2_merge_trainable_params`,
    is the reference). The single model-state file, written by rank 0, names the parameters."""

    MODEL_FILE = "mp_rank_00_model_states.pt"
    STAGES = "1/2"
    MODEL_PER_RANK = False
    FLAT_KEY = "single_partition_of_fp32_groups"

    def __init__(self, tag_dir: Path, cfg: ModelConfig):
        self.tag_dir = tag_dir
        model_file = tag_dir / self.MODEL_FILE
        if not model_file.exists():
            raise CheckpointError(f"{tag_dir}: no ZeRO-1/2 model-state file ({self.MODEL_FILE})")
        groups = self._read_model_states([model_file], cfg)
        opts = self._optim_states()
        paddings = self._agree(opts, "param_alignment_paddings", self.optim_files) or [[0] * len(g) for g in groups]
        if len(paddings) != len(groups) or len(opts[0][self.FLAT_KEY]) != len(groups):
            raise CheckpointError(f"{self.optim_files[0]}: {len(opts[0][self.FLAT_KEY])} flat groups but "
                                  f"{model_file.name} names {len(groups)}; files from different runs?")
        self.slots: dict[str, tuple[int, int, torch.Size]] = {}  # name → (group, offset, shape)
        for g, (shapes, pads) in enumerate(zip(groups, paddings)):
            offset = 0
            for (name, shape), pad in zip(shapes.items(), pads):
                self.slots[name] = (g, offset, shape)
                offset += shape.numel() + pad
            have = sum(opt[self.FLAT_KEY][g].numel() for opt in opts)
            if have != offset:
                raise CheckpointError(f"{tag_dir}: optimizer group {g} holds {have} fp32 elements over the "
                                      f"{self.world} ranks but its parameters need {offset}; files from different runs?")

    def _gather(self, flats: list[list[torch.Tensor]], name: str) -> torch.Tensor:
        g, offset, shape = self.slots[name]
        out = torch.empty(shape.numel(), dtype=torch.float32)
        _copy_range([groups[g] for groups in flats], offset, out)
        return out.view(shape)


class PipelineReader:
    """The weights of a pipeline-engine checkpoint, one layer file at a time."""

    LAYER = re.compile(r"^layer_(\d+)-(.*)model_states\.pt$")

    def __init__(self, tag_dir: Path, cfg: ModelConfig):
        self.tag_dir, self.cfg = tag_dir, cfg
        files: dict[int, Path] = {}
        for f in sorted(tag_dir.iterdir()):
            m = self.LAYER.match(f.name)
            if not m:
                continue
            if m.group(2):
                raise CheckpointError(f"{f}: tensor-parallel layer files ({m.group(2).rstrip('-')}) are not supported")
            files[int(m.group(1))] = f
        if not files:
            raise CheckpointError(f"{tag_dir}: no pipeline layer files (layer_NN-model_states.pt)")
        n = cfg.n_layers + 2
        missing = sorted(set(range(n)) - set(files))
        extra = sorted(set(files) - set(range(n)))
        if missing:
            raise CheckpointError(f"{tag_dir}: layer file(s) {[f'layer_{i:02d}-model_states.pt' for i in missing]} missing "
                                  f"(a {cfg.n_layers}-block model has layers 00..{n - 1:02d})")
        if extra:
            raise CheckpointError(f"{tag_dir}: extra layer file(s) {[files[i].name for i in extra]}: a {cfg.n_layers}-block "
                                  "model has no such layer; files from a different run?")
        self.files = [files[i] for i in range(n)]
        self.want = model_shapes(cfg)
        step = _tag_step(tag_dir)
        for f in sorted(tag_dir.glob("mp_rank_*_model_states.pt")):
            saved = load_file(f).get("global_steps")
            if step is not None and saved is not None and saved != step:
                raise CheckpointError(f"{f}: saved at step {saved} but lies in {tag_dir.name}; files from different runs or steps")
        self._validate()

    def _our_name(self, idx: int, key: str) -> str:
        return f"layers.{idx - 1}.{key}" if 1 <= idx <= self.cfg.n_layers else key

    def _want_in(self, idx: int) -> dict[str, tuple[int, ...]]:
        L = self.cfg.n_layers
        if idx == 0:
            return {n: s for n, s in self.want.items() if n == "tok_embeddings.weight"}
        if idx <= L:
            return {n: s for n, s in self.want.items() if n.startswith(f"layers.{idx - 1}.")}
        return {n: s for n, s in self.want.items() if n in ("norm.weight", "output.weight")}

    def _validate(self) -> None:
        # Only the pickled metadata is read here; tensor data stays in the (lazy) memory map.
        for idx, f in enumerate(self.files):
            state = load_file(f)
            _check_names(str(f), {self._our_name(idx, k): t.shape for k, t in state.items()}, self._want_in(idx))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for idx, f in enumerate(self.files):
            state = {self._our_name(idx, k): t for k, t in load_file(f).items()}
            for n in self._want_in(idx):
                yield n, state[n].clone()  # own the memory; the map closes with `state`
            del state


def open_checkpoint(tag_dir: Path, engine: str, cfg: ModelConfig,
                    zero_stage: int = 3) -> Zero3Reader | Zero12Reader | PipelineReader:
    """The reader for a checkpoint of `engine` (profile.json's topology.engine) at `zero_stage`
    (its deepspeed.zero_optimization.stage; the pipeline engine's ZeRO-1 leaves the layer files whole)."""
    if engine in ("zero", "zero3"):
        return Zero3Reader(tag_dir, cfg) if zero_stage == 3 else Zero12Reader(tag_dir, cfg)
    if engine == "pipeline":
        return PipelineReader(tag_dir, cfg)
    raise CheckpointError(f"{tag_dir}/profile.json: unknown engine {engine!r}")
