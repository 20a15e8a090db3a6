"""Training checkpoints: DeepSpeed's own files per tag, plus an atomic `latest` pointer,
a `meta.json` per tag, pruning, and resuming on a different number of ranks.

Layout under RUN/checkpoints/:
    latest                  the newest *complete* tag, replaced atomically
    run_id                  made at the first start, kept across resumes, stamped into every rank's files
    global_stepN/           DeepSpeed's files (ZeRO partitions or pipeline layer files)
        profile.json        the fully resolved profile (the export reads the model shape here)
        meta.json           step, consumed samples and the topology that wrote it
    global_stepN_universal/ made on demand when resuming on another topology

Every rank writes its part of tag T, all ranks meet at a barrier, and only then rank 0
replaces `latest` (write a temporary file, rename). A crash mid-save therefore leaves
`latest` naming the previous complete checkpoint. `--resume auto` only ever reads `latest`.

Resuming on another world size: DeepSpeed's ZeRO partitions are tied to the data-parallel
size that wrote them, so the tag is first converted to DeepSpeed's "universal" checkpoint
format (`deepspeed.checkpoint.ds_to_universal`, one file per parameter and optimizer state)
and loaded with `checkpoint.load_universal`. Sample order does not depend on the world size
(`pipeline/data.py`), so the run continues with the same samples.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.faults import FaultInjection


def rng_state() -> dict:
    """This rank's random number generator states, as JSON (kept out of DeepSpeed's pickled
    files so that those stay loadable with `torch.load(weights_only=True)`)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class CheckpointError(RuntimeError):
    pass


def _deepspeed_globals() -> list:
    """The only non-tensor objects DeepSpeed pickles into the files this trainer writes (listed
    with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2, ZeRO-3, pipeline + ZeRO-1
    and universal checkpoints); everything else in them is tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None):
    """torch.load with weights_only=True and DeepSpeed's few classes allowed: a checkpoint file
    that was tampered with cannot run code when it is loaded."""
    import pickle

    with torch.serialization.safe_globals(_deepspeed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unpickling refused"
            raise CheckpointError(f"{path}: refused to load a pickled object outside the allow-list "
                                  f"(pipeline/checkpoint.py _deepspeed_globals): {reason}") from None


def use_safe_loading(ds_engine) -> None:
    """Route every file DeepSpeed's engine loads (model states, optimizer partitions, pipeline
    layers) through `safe_torch_load` instead of its default unrestricted torch.load."""
    ds_engine.checkpoint_engine.load = safe_torch_load


class Checkpoints:
    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        """An id made when the run first starts and kept across resumes (RUN/checkpoints/run_id).
        Every rank writes it into its DeepSpeed files, so the export can tell files of another
        run apart. Collective: call on every rank."""
        if self._run_id is None:
            f = self.root / "run_id"
            if distributed.rank() == 0 and not f.exists():
                self.root.mkdir(parents=True, exist_ok=True)
                tmp = self.root / "run_id.tmp"
                tmp.write_text(uuid.uuid4().hex + "\n")
                os.replace(tmp, f)
            distributed.barrier()
            self._run_id = f.read_text().strip()
        return self._run_id

    def latest(self) -> str | None:
        f = self.root / "latest"
        return f.read_text().strip() if f.exists() else None

    def load(self, engine, tag: str) -> int:
        """Load `tag` into `engine` and this rank's RNG states; returns the step it was saved at."""
        engine.load(str(self.root), tag)
        rng_file = self.root / tag / "rng" / f"rank{distributed.rank():05d}.json"
        if rng_file.exists():  # absent in universal checkpoints: another world size has other ranks
            restore_rng_state(json.loads(rng_file.read_text()))
        return self.meta(tag)["step"]

    def meta(self, tag: str) -> dict:
        f = self.root / tag / "meta.json"
        if not f.exists():
            raise CheckpointError(f"{self.root / tag}: meta.json missing; not a complete checkpoint of this trainer")
        return json.loads(f.read_text())

    def save(self, engine, step: int, meta: dict, profile_dict: dict, faults: FaultInjection) -> str:
        tag = f"global_step{step}"
        rank = distributed.rank()
        engine.save(str(self.root), tag, {"step": step, "run_id": self.run_id})
        rng_dir = self.root / tag / "rng"
        rng_dir.mkdir(exist_ok=True)
        (rng_dir / f"rank{rank:05d}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            (self.root / tag / "profile.json").write_text(json.dumps(profile_dict, indent=2) + "\n")
            (self.root / tag / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        faults.maybe_die_in_save(step)
        distributed.barrier()
        if rank == 0:
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / "latest")
            self._prune(tag)
        distributed.barrier()
        return tag

    def _prune(self, newest: str) -> None:
        tags = sorted((p for p in self.root.glob("global_step*") if p.is_dir() and p.name[11:].isdigit()),
                      key=lambda p: int(p.name.removeprefix("global_step")))
        for old in tags[:-self.keep_last]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)

    def prepare_resume(self, tag: str, topology: dict) -> tuple[str, bool]:
        """(tag to load, whether it is a universal checkpoint) for resuming `tag` on `topology`
        ({"data_parallel_size", "pipeline_stages"}). Rank 0 converts when the topology changed."""
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"checkpoint {self.root / tag} does not exist")
        saved = self.meta(tag)
        if all(saved.get(k) == v for k, v in topology.items()):
            return tag, False
        universal = f"{tag}_universal"
        if distributed.rank() == 0 and not (self.root / universal).is_dir():
            tmp = self.root / f".{universal}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(self.root / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
            print(f"topology changed since {tag} ({saved.get('data_parallel_size')} data-parallel × "
                  f"{saved.get('pipeline_stages')} stages → {topology['data_parallel_size']} × "
                  f"{topology['pipeline_stages']}): converting to a universal checkpoint", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CheckpointError(f"converting {self.root / tag} to universal format failed:\n{proc.stderr[-3000:]}")
            for name in ("profile.json", "meta.json"):
                shutil.copy2(self.root / tag / name, tmp / name)
            os.replace(tmp, self.root / universal)
        distributed.barrier()
        return universal, True
