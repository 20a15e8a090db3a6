"""The run's checkpoint directory: staged saves renamed into place, an atomic `latest` pointer,
a `meta.json` per tag, pruning, and resuming on a different topology.

Layout under RUN/checkpoints/:
    latest                  the newest *complete* tag, replaced atomically
    run_id                  made at the first start, kept across resumes, stamped into every rank's files
    global_stepN/           DeepSpeed's files (ZeRO partitions or pipeline layer files)
        profile.json        the fully resolved profile and tokenizer hash (the export reads the model
                            shape here; a resume compares it, pipeline/resume.py)
        meta.json           step, consumed samples, global batch and the topology that wrote it
        rng/rankK.json      each rank's random number generator states
    global_stepN_universal/ made on demand when resuming on another topology
    .staging/               saves and conversions in progress (removed when they are renamed into place)

What survives what (docs/launch.md says the same for operators):
  * A crash, kill or full disk during a save: every rank writes tag T into `.staging/T`, flushes
    it to stable storage (`os.sync` on each rank, so each node's writes are on the shared
    filesystem), and meets the others at a barrier; only then does rank 0 rename the whole
    directory into place, fsync the directory, and replace `latest` (temporary file, fsync,
    rename). A directory named `global_stepN` is therefore always complete, `latest` always
    names one, and stale files of an earlier attempt (say, from more ranks) can never mix in:
    the next save of the same step starts from an empty staging directory.
  * An empty `latest`, or one naming a missing tag, is an error with the fix, never "start fresh".
  * Another world size or pipeline layout: DeepSpeed's ZeRO partitions are tied to the topology
    that wrote them, so the tag is converted to DeepSpeed's universal format (one file per
    parameter) by rank 0, in a child process with parallel workers and a time limit
    (`train.conversion_timeout_s`), while the other ranks wait on the filesystem rather than in
    a collective (a barrier would trip NCCL's watchdog during an hour-long 7B conversion). A
    failure stops every rank with one message. The conversion, like every load, unpickles only
    tensors and `checkpoint_reader.ALLOWED_GLOBALS` (`safe_loading`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.checkpoint_reader import CheckpointError, safe_loading
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text`: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _io_error(e: OSError, what: str) -> CheckpointError:
    return CheckpointError(f"{e.filename or what}: {what} failed: {e.strerror or e}")


def checkpoint_tags(root: Path) -> list[str]:
    """The complete checkpoints (`global_stepN` directories) under `root`, oldest first."""
    dirs = [p for p in Path(root).glob("global_step*") if p.is_dir() and p.name[11:].isdigit()]
    return [p.name for p in sorted(dirs, key=lambda p: int(p.name[11:]))]


class Checkpoints:
    def __init__(self, root: Path, keep_last: int, conversion_timeout_s: float = 3600):
        self.root, self.keep_last, self.conversion_timeout_s = Path(root), keep_last, conversion_timeout_s
        self.staging = self.root / ".staging"
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        """An id made when the run first starts and kept across resumes (RUN/checkpoints/run_id).
        Every rank writes it into its DeepSpeed files, so the export can tell files of another
        run apart. Collective: call on every rank."""
        if self._run_id is None:
            f = self.root / "run_id"
            if distributed.rank() == 0 and not f.exists():
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    write_durably(f, uuid.uuid4().hex + "\n")
                except OSError as e:
                    raise _io_error(e, "writing the run id") from None
            distributed.barrier()
            self._run_id = f.read_text().strip()
        return self._run_id

    def latest(self) -> str | None:
        """The tag `latest` names; None when there is no `latest` (a fresh run). An empty `latest`
        or one naming a missing tag is an error: starting fresh would silently throw a run away."""
        f = self.root / "latest"
        if not f.exists():
            return None
        tag = f.read_text().strip()
        if not tag:
            raise CheckpointError(f"{f} is empty; write the tag of a complete checkpoint into it (one of "
                                  f"{self.tags() or 'none found'}), or pass --resume global_stepN")
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"{f} names {tag}, which does not exist; write the tag of a complete checkpoint "
                                  f"into it (one of {self.tags() or 'none found'}), or pass --resume global_stepN")
        return tag

    def tags(self) -> list[str]:
        """The complete checkpoints, oldest first."""
        return checkpoint_tags(self.root)

    def load(self, engine, tag: str) -> dict:
        """Load `tag` into `engine` and this rank's RNG states; returns the tag's meta.json."""
        with safe_loading():
            engine.load(str(self.root), tag)
        rng_file = self.root / tag / "rng" / f"rank{distributed.rank():05d}.json"
        if rng_file.exists():  # absent in universal checkpoints: another world size has other ranks
            restore_rng_state(json.loads(rng_file.read_text()))
        return self.meta(tag)

    def meta(self, tag: str) -> dict:
        f = self.root / tag / "meta.json"
        if not f.exists():
            raise CheckpointError(f"{self.root / tag}: meta.json missing; not a complete checkpoint of this trainer")
        return json.loads(f.read_text())

    def save(self, engine, step: int, meta: dict, profile_dict: dict, faults: FaultInjection) -> str:
        """Save on every rank into `.staging/TAG`, then rename into place and move `latest` (see the
        module docstring). Collective."""
        tag, rank = f"global_step{step}", distributed.rank()
        staged = self.staging / tag
        if rank == 0:  # leftovers of a save that was killed; every rank waits until they are gone
            shutil.rmtree(staged, ignore_errors=True)
        distributed.barrier()
        try:
            engine.save(str(self.staging), tag, {"step": step, "run_id": self.run_id})
            (staged / "rng").mkdir(exist_ok=True)
            (staged / "rng" / f"rank{rank:05d}.json").write_text(json.dumps(rng_state()))
            if rank == 0:
                (staged / "profile.json").write_text(json.dumps(profile_dict, indent=2) + "\n")
                (staged / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
            os.sync()  # this node's writes reach stable storage before rank 0 may publish them
        except OSError as e:
            raise _io_error(e, f"saving checkpoint {tag}") from None
        faults.maybe_die_in_save(step)
        distributed.barrier()
        if rank == 0:
            try:
                self._publish(staged)
                write_durably(self.root / "latest", tag + "\n")
            except OSError as e:
                raise _io_error(e, f"publishing checkpoint {tag}") from None
            self._prune(tag)
        distributed.barrier()
        return tag

    def _publish(self, staged: Path) -> None:
        final = self.root / staged.name
        if final.exists():  # saved again after a resume from an earlier tag: the old one goes
            old = self.staging / f"{staged.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(staged, final)
        _fsync_path(self.root)

    def _prune(self, newest: str) -> None:
        for old in self.tags()[:-self.keep_last]:
            if old != newest:
                shutil.rmtree(self.root / old, ignore_errors=True)
                shutil.rmtree(self.root / f"{old}_universal", ignore_errors=True)

    def prepare_resume(self, tag: str, topology: dict) -> tuple[str, bool]:
        """(tag to load, whether it is a universal checkpoint) for resuming `tag` on `topology`
        ({"data_parallel_size", "pipeline_stages"}). Collective: rank 0 converts when the topology
        changed, the others wait for the result on the filesystem."""
        if not (self.root / tag).is_dir():
            raise CheckpointError(f"checkpoint {self.root / tag} does not exist (complete ones: {self.tags() or 'none'})")
        saved = self.meta(tag)
        if all(saved.get(k) == v for k, v in topology.items()):
            return tag, False
        universal = f"{tag}_universal"
        failed = self.staging / f"{universal}.failed"
        if distributed.rank() == 0:
            self.staging.mkdir(parents=True, exist_ok=True)
            failed.unlink(missing_ok=True)
        distributed.barrier()  # no rank can see a failure marker of an earlier attempt
        if distributed.rank() == 0 and not (self.root / universal).is_dir():
            print(f"topology changed since {tag} ({saved.get('data_parallel_size')} data-parallel × "
                  f"{saved.get('pipeline_stages')} stages → {topology['data_parallel_size']} × "
                  f"{topology['pipeline_stages']}): converting to a universal checkpoint", flush=True)
            try:
                self._convert(tag, universal)
            except CheckpointError as e:
                failed.write_text(str(e) + "\n")
                raise
        elif distributed.rank() != 0:
            self._wait_for(universal, failed)
        distributed.barrier()
        return universal, True

    def _convert(self, tag: str, universal: str) -> None:
        tmp = self.staging / universal
        shutil.rmtree(tmp, ignore_errors=True)
        # Each extract worker holds one rank's optimizer file; more than 8 rarely helps and costs memory.
        workers = max(1, min(8, len(os.sched_getaffinity(0))))
        cmd = [sys.executable, "-m", "pipeline.checkpoints", "--input_folder", str(self.root / tag),
               "--output_folder", str(tmp), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers), "--inject_missing_state"]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.conversion_timeout_s)
        except subprocess.TimeoutExpired:
            raise CheckpointError(f"converting {self.root / tag} to a universal checkpoint did not finish in "
                                  f"{self.conversion_timeout_s:.0f} s (train.conversion_timeout_s)") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise CheckpointError(f"converting {self.root / tag} to a universal checkpoint failed: "
                                  f"{lines[-1] if lines else f'exit status {proc.returncode}'}")
        for name in ("profile.json", "meta.json"):
            shutil.copy2(self.root / tag / name, tmp / name)
        os.sync()
        os.replace(tmp, self.root / universal)
        _fsync_path(self.root)
        print(f"converted {tag} in {time.monotonic() - start:.0f} s with {workers} workers", flush=True)

    def _wait_for(self, universal: str, failed: Path) -> None:
        """Wait, without any collective, until rank 0 published `universal` or reported a failure."""
        deadline = time.monotonic() + self.conversion_timeout_s + 120  # rank 0 reports its own timeout first
        while not (self.root / universal).is_dir():
            if failed.exists():
                raise CheckpointError(failed.read_text().strip()) from None
            if time.monotonic() > deadline:
                raise CheckpointError(f"{self.root / universal}: rank 0 neither published the universal checkpoint "
                                      f"nor reported a failure within train.conversion_timeout_s + 120 s")
            time.sleep(1.0)


def _convert_main(argv: list[str]) -> None:
    """`python -m pipeline.checkpoints ds_to_universal-arguments`: DeepSpeed's conversion with every
    torch.load made safe. SIGTERM and SIGUSR1 are for the trainer (it stops at the next step
    boundary); the conversion it is waiting for finishes."""
    import multiprocessing

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    multiprocessing.set_start_method("fork", force=True)  # the workers inherit safe_loading
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *argv]
    with safe_loading():
        ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    try:
        _convert_main(sys.argv[1:])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
