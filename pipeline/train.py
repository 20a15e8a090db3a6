"""Pretrain a LLaMA model with DeepSpeed.

Run through the DeepSpeed launcher, one process per device:

    deepspeed --num_gpus 8 --module pipeline.train --profile ds_configs/7b_zero3.json --out runs/7b
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module pipeline.train --profile ds_configs/tiny_cpu.json --out runs/tiny

Writes under --out: `profile.json` (the fully resolved profile), `checkpoints/` (DeepSpeed
checkpoints, `latest` naming the newest complete one), `metrics.jsonl` and `tensorboard/`, and
`preempted` when a SIGTERM or SIGUSR1 stopped the run early (a batch script requeues on it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import torch

from pipeline import distributed
from pipeline.checkpoint_reader import CheckpointError
from pipeline.checkpoints import Checkpoints, write_durably
from pipeline.config import Profile, ProfileError, apply_overrides, parse_profile, read_profile_json, resolve
from pipeline.data import Manifest, ManifestError, micro_batch_positions, open_split
from pipeline.distributed import all_reduce_sum, init_distributed, world_size
from pipeline.faults import FaultInjection, LossSpikeDetector, SkipTracker, Stragglers
from pipeline.model import Packing
from pipeline.resume import (ResumeRefused, check_allow_change, check_resume, resume_point, resume_state, resume_tag,
                             topology_of)
from pipeline.metrics import WANDB_MISSING, MetricsWriter, WandbRun, detect_peak_flops, flops_per_token, wandb_available
from pipeline.watchdog import Watchdog


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="JSON profile (see ds_configs/)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics, resolved profile")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="'auto': continue from the newest complete checkpoint in OUT/checkpoints if any; "
                        "'none': start fresh (refused if checkpoints exist); or a tag such as global_step100")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from these weights (a directory written by python -m pipeline.import_hf) instead of "
                        "a random init (its rope, norm and context settings are carried into the run; see "
                        "pipeline/init_from.py); weights ignored when resuming from a checkpoint")
    p.add_argument("--remap-vocab", action="store_true",
                   help="--init-from a model whose tokenizer is not the data's: carry embedding rows over by token")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   help="resume although the checkpoint's FIELD differs, for a deliberate change such as "
                        "data.seq_len for a longer context (repeatable; see pipeline/resume.py for what a resume "
                        "compares)")
    p.add_argument("--inject-hang", metavar="STEP:RANK",
                   help="fire drill: RANK sleeps for good while reading the batch of STEP (the watchdog, "
                        "train.hang_timeout_s, then ends the run; pipeline/watchdog.py)")
    p.add_argument("--inject-slow", metavar="RANK:SECONDS",
                   help="fire drill: RANK takes SECONDS longer to read every batch (a slow node; named in the "
                        "log, and warned about, see train.straggler_lag)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.
    Made first thing in `main`, so a signal during start-up (engine build, resume, a universal
    conversion) is kept: the run then stops before its first step instead of being killed."""

    def __init__(self):
        self.requested = False
        self.signal = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal = signal.Signals(signum).name


PREEMPTED = "preempted"  # OUT/preempted: written when a signal stopped the run before train.steps


def all_ranks_mean_and_any(value: float, flag: bool, count: int = 0,
                           mine: tuple[float, ...] = ()) -> tuple[float, bool, int, list[tuple]]:
    """The mean of `value` over ranks, whether any rank raised `flag`, the sum of `count`, and
    every rank's `mine` (each rank fills its own slots, the sum gathers them), in one all-reduce:
    one collective per step is all the loop adds to DeepSpeed's own."""
    n, world, rank = len(mine), world_size(), distributed.rank()
    slots = [0.0] * (n * world)
    slots[rank * n:(rank + 1) * n] = mine
    total, raised, counted, *gathered = all_reduce_sum([value, 1.0 if flag else 0.0, count, *slots])
    return (total / world, raised > 0, int(counted),
            [tuple(gathered[r * n:(r + 1) * n]) for r in range(world)] if n else [])


def all_ranks_mean(value: float) -> float:
    return all_ranks_mean_and_any(value, False)[0]


class StartError(Exception):
    """A reason not to start, one line; `only_rank0`: every rank reached it, so one report is enough."""

    def __init__(self, message: str, only_rank0: bool = True):
        super().__init__(message)
        self.only_rank0 = only_rank0


REPORT_GRACE_S = 20.0


def report_start_error(e: StartError, preempt: Preemption) -> None:
    """Print the refusal. When rank 0 reports for all, the other ranks wait for it (at most
    REPORT_GRACE_S): a launcher kills every rank once one exits non-zero, so a rank that left
    first could have rank 0 killed before its line was printed. The launcher's SIGTERM, sent
    when rank 0 has exited, ends the wait at once."""
    rank = int(os.environ.get("RANK", 0))
    if not str(e):
        return
    if not e.only_rank0 or rank == 0:
        print(e, file=sys.stderr, flush=True)
        return
    deadline = time.monotonic() + REPORT_GRACE_S
    while not preempt.requested and time.monotonic() < deadline:
        time.sleep(0.05)


def resolve_profile(args: argparse.Namespace, world: int) -> tuple[Profile, Manifest]:
    """The profile with every derived value, checked against the data manifest it names."""
    try:
        raw = parse_profile(apply_overrides(read_profile_json(args.profile), args.overrides), args.profile)
        manifest = Manifest.load(raw.data.manifest)
        profile = resolve(raw, args.profile, world, vocab_size=manifest.tokenizer.vocab_size)
    except (ProfileError, ManifestError) as e:  # a profile names each wrong field on a line of its own
        raise StartError("\n".join(f"error: {line}" for line in str(e).splitlines())) from None
    if profile.model.vocab_size < manifest.tokenizer.vocab_size:
        raise StartError(f"error: {args.profile}: model.vocab_size={profile.model.vocab_size} is smaller than the "
                         f"tokenizer's {manifest.tokenizer.vocab_size} ({manifest.tokenizer.model_path})")
    return profile, manifest


def adopt_init(args: argparse.Namespace, profile: Profile, manifest: Manifest):
    """--init-from's model settings, tokenizer check and provenance (pipeline/init_from.py), or None."""
    from pipeline.init_from import InitFromError, adopt

    try:
        return adopt(profile, manifest, args.init_from, args.remap_vocab) if args.init_from else None
    except (InitFromError, OSError) as e:
        raise StartError(f"error: --init-from {args.init_from}: {e}") from None


def check_preflight(profile: Profile, args: argparse.Namespace, world: int, rank: int) -> None:
    """`python -m pipeline.preflight`'s checks, from files only, so every rank reaches its verdict
    before any process group exists; rank 0 and each node's first rank report (a node can miss a mount)."""
    from pipeline.preflight import run_preflight

    failures = run_preflight(profile, profile.data.manifest, args.out, world)
    if failures:
        report = rank == 0 or args.local_rank == 0
        raise StartError("\n".join(f"preflight (rank {rank}): {line}" for line in failures) if report else "",
                         only_rank0=False)


def run_profile(profile: Profile, manifest: Manifest) -> dict:
    """What OUT/profile.json and every checkpoint record: the resolved profile, with the manifest's
    absolute path and the tokenizer the data was made with (what a resume compares)."""
    profile_dict = profile.resolved_dict()
    profile_dict["data"]["manifest"] = str(Path(profile.data.manifest).resolve())
    profile_dict["tokenizer"] = {"sha256": manifest.tokenizer.sha256, "vocab_size": manifest.tokenizer.vocab_size}
    return profile_dict


def write_run_files(ckpts: Checkpoints, profile_dict: dict, out: Path) -> None:
    """OUT/profile.json, once the resume point has loaded: a refused or failed attempt leaves the
    previous one. Removes the `preempted` mark of the previous attempt."""
    try:
        if distributed.rank() == 0:
            ckpts.root.mkdir(parents=True, exist_ok=True)
            write_durably(out / "profile.json", json.dumps(profile_dict, indent=2) + "\n")
            (out / PREEMPTED).unlink(missing_ok=True)
        ckpts.run_id  # collective: every rank learns the run's id before the first save
    except OSError as e:
        raise StartError(f"error: {e.filename or out}: {e.strerror or e}", only_rank0=False) from None
    except CheckpointError as e:
        raise StartError(f"error: {e}", only_rank0=False) from None


def checked_resume_tag(ckpts: Checkpoints, args: argparse.Namespace, profile_dict: dict) -> str | None:
    """The tag to resume (None: start fresh), refused in one line when the checkpoint's profile
    differs in a field a resume cannot change (pipeline/resume.py). From files only."""
    try:
        check_allow_change(args.allow_change)
        tag = resume_tag(ckpts, args.resume)
        changed = check_resume(ckpts, tag, profile_dict, args.allow_change) if tag else []
    except (ResumeRefused, CheckpointError) as e:
        raise StartError(f"error: {e}") from None
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming {tag} with deliberate changes (--allow-change): {'; '.join(changed)}", flush=True)
    return tag


def packing_of(profile: Profile, manifest: Manifest) -> Packing | None:
    """train.document_masking's documents: they end with the data's EOS, which must be there."""
    if not profile.train.document_masking:
        return None
    if not manifest.raw.get("add_eos", True):
        raise StartError(f"error: train.document_masking: {manifest.path} was prepared with add_eos false, so nothing "
                         "marks where a document ends; prepare the data with EOS, or set train.document_masking=false")
    return Packing(manifest.tokenizer.eos_id, profile.train.reset_positions)


def initial_weights(init, profile: Profile):
    """--init-from's weights where the engine needs them: rank 0 for the ZeRO engine, every pipeline
    rank (each reading only its stage's tensors)."""
    if not init or not (profile.topology.engine == "pipeline" or distributed.rank() == 0):
        return None
    return init.weights()


class Trainer:
    """The loop, one named step at a time: train step, metrics, evaluation, checkpoint, stop."""

    def __init__(self, profile: Profile, manifest: Manifest, engine, ckpts: Checkpoints, profile_dict: dict,
                 out: Path, preempt: Preemption, start_step: int = 0, consumed: int = 0,
                 faults: FaultInjection | None = None):
        self.profile, self.engine, self.ckpts, self.profile_dict = profile, engine, ckpts, profile_dict
        self.out, self.preempt = out, preempt
        self.start_step = self.step = start_step
        self.consumed = consumed  # samples of the train order used so far: where the next step starts
        self.rank, self.world = distributed.rank(), world_size()
        t = profile.train
        self.train_samples = open_split(manifest, "train", profile.data.seq_len, profile.data.seed, profile.data.mixture)
        # Opened only for a run that evaluates: a validation split shorter than one sample stops no other run.
        self.val_samples = (open_split(manifest, "validation", profile.data.seq_len, profile.data.seed)
                            if manifest.split_shards("validation") and t.eval_every else None)
        self.flops_per_token = flops_per_token(profile.model, profile.data.seq_len)
        self.device_kind, self.peak_flops = detect_peak_flops()
        wandb = WandbRun(t.wandb, out, ckpts.run_id, profile_dict) if t.wandb and self.rank == 0 else None
        self.metrics = MetricsWriter(out, enabled=self.rank == 0, resume_step=start_step, wandb=wandb)
        self.faults = faults or FaultInjection.from_env()
        self.watchdog = Watchdog(out, self.rank, self.world, t.hang_timeout_s)
        self.stragglers = Stragglers(t.straggler_lag, t.straggler_intervals)
        self.skips = SkipTracker(t.max_consecutive_skips, already_skipped=engine.skipped_steps)
        self.spikes = LossSpikeDetector()

    def say(self, line: str, **kw) -> None:
        if self.rank == 0:
            print(line, flush=True, **kw)

    def micro_batches(self, samples, first: int) -> list:
        """This rank's micro-batches of the step whose first sample position is `first`."""
        p = self.profile
        return [samples.batch(micro_batch_positions(first, m, self.engine.dp_rank, p.train.micro_batch_size,
                                                    p.data_parallel_size))
                for m in range(p.grad_accum_steps)]

    def train_step(self) -> tuple[float, bool, list[tuple]]:
        """One optimizer step; (the loss averaged over ranks, whether any rank was asked to stop,
        and on log steps every rank's (own, engine) seconds: pipeline/faults.py Stragglers).
        Also counts the blocks all ranks recomputed in it (`recomputed`)."""
        step, tic = self.step + 1, time.perf_counter()
        self.watchdog.beat(step, "batch")
        batches = self.micro_batches(self.train_samples, self.consumed)
        self.faults.maybe_delay(step, self.rank)
        own = time.perf_counter() - tic
        self.watchdog.beat(step, "engine")
        before = self.engine.recomputations.count
        local = self.engine.train_step(batches, poison=step in self.faults.nan_steps)
        engine = time.perf_counter() - tic - own
        self.step, self.consumed = step, self.consumed + self.profile.global_batch_size
        self.watchdog.beat(step, "all-reduce")
        loss, stop, self.recomputed, times = all_ranks_mean_and_any(
            local, self.preempt.requested, self.engine.recomputations.count - before,
            (own, engine) if self.log_due() else ())
        return loss, stop, times

    def log_due(self) -> bool:
        t = self.profile.train
        return self.step % t.log_every == 0 or self.step == t.steps or self.step == self.start_step + 1

    def step_metrics(self, loss: float, lr: float, elapsed: float) -> dict:
        """The step's metrics; `lr` is the rate the step used, `elapsed` its time alone (without
        evaluation or checkpointing, which are logged apart)."""
        p = self.profile
        tokens_per_s = p.tokens_per_step / elapsed
        tflops = self.flops_per_token * tokens_per_s / self.world / 1e12
        values = {"train/loss": loss, "train/lr": lr, "perf/tokens_per_s": tokens_per_s,
                  "perf/tflops_per_device": tflops, "perf/step_time_s": elapsed,
                  "data/consumed_samples": self.consumed, "train/skipped_steps": self.skips.total,
                  "train/loss_spikes": self.spikes.spikes, "train/recomputed_blocks": self.recomputed}
        if self.engine.grad_norm is not None:
            values["train/grad_norm"] = self.engine.grad_norm
        if self.peak_flops:
            values["perf/mfu"] = tflops * 1e12 / self.peak_flops
        if torch.cuda.is_available():
            values["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            values["mem/rss_gb"] = psutil.Process().memory_info().rss / 2**30
        return values

    def evaluate(self) -> float:
        self.watchdog.beat(self.step, "evaluation")
        gbs = self.profile.global_batch_size  # the same validation samples at every evaluation
        losses = [self.engine.eval_loss(self.micro_batches(self.val_samples, b * gbs))
                  for b in range(self.profile.train.eval_batches)]
        return all_ranks_mean(sum(losses) / len(losses))

    def eval_due(self) -> bool:
        t = self.profile.train
        return self.val_samples is not None and t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps)

    def report(self, loss: float, values: dict, skipped: bool, spike: bool) -> None:
        t, step = self.profile.train, self.step
        if skipped:
            self.say(f"step {step}: skipped (non-finite loss or gradient norm; loss {loss}); "
                     f"{self.skips.consecutive} in a row, {self.skips.total} in total")
        if spike:
            self.say(f"step {step}: loss spike {loss:.4f} (spike #{self.spikes.spikes})")
        if self.log_due():
            line = (f"step {step}/{t.steps} | loss {loss:.4f} | lr {values['train/lr']:.2e} | "
                    f"gnorm {values.get('train/grad_norm', float('nan')):.3f} | {values['perf/tokens_per_s']:,.0f} tok/s | "
                    f"{values['perf/tflops_per_device']:.3f} TFLOP/s/{self.device_kind}")
            if "perf/mfu" in values:
                line += f" | MFU {values['perf/mfu']:.1%}"
            if "val/loss" in values:
                line += f" | val {values['val/loss']:.4f}"
            if "perf/slowest_rank" in values:
                line += f" | slowest rank {values['perf/slowest_rank']} +{values['perf/slowest_rank_lag_s']:.2f} s"
            self.say(line)

    def checkpoint(self) -> None:
        self.watchdog.beat(self.step, "checkpoint")
        # After skipped steps the weights are still those from before the trouble.
        meta = {"consumed_samples": self.consumed, "global_batch_size": self.profile.global_batch_size,
                "world_size": self.world, **topology_of(self.profile)}
        saved = self.ckpts.save(self.engine, self.step, meta, self.profile_dict, self.faults)
        self.say(f"checkpoint {self.ckpts.root / saved}")

    def checkpoint_due(self, stop: bool) -> bool:
        t = self.profile.train
        return (stop or self.skips.exhausted or (self.step == t.steps and t.final_checkpoint)
                or bool(t.checkpoint_every and self.step % t.checkpoint_every == 0))

    def run(self) -> int:
        t = self.profile.train
        if all_ranks_mean_and_any(0.0, self.preempt.requested)[1]:  # a signal during start-up
            return self.stop_preempted("before its first step")
        while self.step < t.steps:
            lr, tic = self.engine.lr, time.perf_counter()  # the rate this step uses
            loss, stop, times = self.train_step()
            values = self.step_metrics(loss, lr, time.perf_counter() - tic)
            if times:
                values.update(self.slow_ranks(times, values["perf/step_time_s"]))
            skipped, spike = self.skips.update(self.engine.skipped_steps), self.spikes.update(loss)
            if self.eval_due():
                tic = time.perf_counter()
                values["val/loss"] = self.evaluate()
                values["perf/eval_time_s"] = time.perf_counter() - tic
            self.report(loss, values, skipped, spike)
            if self.checkpoint_due(stop):
                tic = time.perf_counter()
                self.checkpoint()
                values["perf/checkpoint_time_s"] = time.perf_counter() - tic
            self.metrics.log(self.step, values)
            if self.skips.exhausted:
                self.say(f"error: {self.skips.consecutive} consecutive steps had a non-finite loss or gradient norm "
                         f"(train.max_consecutive_skips={t.max_consecutive_skips}); stopped at step {self.step}. The "
                         f"weights in {self.ckpts.root / self.ckpts.latest()} are those from before step "
                         f"{self.step - self.skips.consecutive + 1}; lower train.lr or inspect the data, then resume "
                         "with --resume auto", file=sys.stderr)
                self.metrics.close()
                return 3
            if stop:
                return self.stop_preempted(f"after step {self.step}")
        self.metrics.close()
        return 0

    def slow_ranks(self, times: list[tuple], step_s: float) -> dict:
        """The slowest rank's metrics; that rank warns, naming its host, when it stays slow."""
        values, warn = self.stragglers.update(times, step_s)
        if warn and values["perf/slowest_rank"] == self.rank:
            t = self.profile.train
            print(f"warning: rank {self.rank} ({socket.gethostname()}) is the slowest for {self.stragglers.count} "
                  f"log intervals in a row: {values['perf/slowest_rank_lag_s']:.2f} s behind the median rank at step "
                  f"{self.step} (more than train.straggler_lag={t.straggler_lag:g} of the {step_s:.2f} s step, "
                  "reading its batch or host work)", file=sys.stderr, flush=True)
        return values

    def stop_preempted(self, when: str) -> int:
        """A signal asked the run to stop: mark OUT/preempted for the batch script and exit 0."""
        self.metrics.close()
        if self.rank == 0:
            (self.out / PREEMPTED).write_text(json.dumps({"step": self.step, "signal": self.preempt.signal}) + "\n")
        self.say(f"preempted ({self.preempt.signal or 'signal on another rank'}): stopped {when}; "
                 "resume with --resume auto")
        return 0


def start(args: argparse.Namespace, preempt: Preemption) -> Trainer:
    """Everything before the first step: profile, resume check, preflight, process group, resume point, engine."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    # Validate everything that can be checked from files before any process group starts, so a
    # bad profile fails fast on every rank with the same one-line reasons.
    profile, manifest = resolve_profile(args, world)
    init = adopt_init(args, profile, manifest)
    profile = init.profile if init else profile
    if profile.train.wandb and not wandb_available():
        raise StartError(f"error: {WANDB_MISSING}")
    out = Path(args.out)
    ckpts = Checkpoints(out / "checkpoints", profile.train.keep_last, profile.train.conversion_timeout_s)
    profile_dict = run_profile(profile, manifest)
    tag = checked_resume_tag(ckpts, args, profile_dict)
    check_preflight(profile, args, world, rank)
    try:
        faults = FaultInjection.from_env(args.inject_hang, args.inject_slow)
    except ValueError as e:
        raise StartError(f"error: {e}") from None
    if torch.cuda.is_available() and os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1":
        (out / "hang").mkdir(parents=True, exist_ok=True)  # NCCL's flight recorder, beside the watchdog's stacks
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str((out / "hang").resolve() / "nccl-rank-"))
    init_distributed(profile.train.collective_timeout_s)
    try:
        load_tag, profile, made_universal = resume_point(ckpts, tag, profile)
    except CheckpointError as e:
        raise StartError(f"error: {e}") from None
    init_state = initial_weights(init, profile) if not load_tag else None
    torch.manual_seed(profile.train.seed)  # identical initial weights on every rank, and across engines
    from pipeline.engines import build_engine

    engine = build_engine(profile, init_state, packing_of(profile, manifest))
    del init_state
    if args.init_from and not load_tag and rank == 0:
        print(f"initialised from {args.init_from}", flush=True)
    try:
        start_step, consumed = resume_state(ckpts, engine, load_tag, profile, made_universal)
    except CheckpointError as e:  # this rank's files; the launcher stops the other ranks
        raise StartError(f"error (rank {rank}): {e}", only_rank0=False) from None
    write_run_files(ckpts, profile_dict, out)
    trainer = Trainer(profile, manifest, engine, ckpts, profile_dict, out, preempt, start_step, consumed, faults)
    p, t = profile, profile.train
    trainer.say(f"training {p.model.num_params() / 1e6:.2f}M parameters | engine {p.topology.engine} | "
                f"world {world} (data-parallel {p.data_parallel_size}) | batch {p.global_batch_size} × "
                f"{p.data.seq_len} tokens | steps {start_step}→{t.steps} | "
                f"{trainer.train_samples.num_samples} train samples")
    return trainer


def main(argv=None) -> int:
    preempt = Preemption()  # before any long work: a signal during start-up is not lost
    args = parse_args(argv)
    try:
        trainer = start(args, preempt)
        code = trainer.run()
    except StartError as e:
        report_start_error(e, preempt)
        return 2
    except CheckpointError as e:  # a save that could not be written: one line, naming the path
        print(f"error (rank {int(os.environ.get('RANK', 0))}): {e}", file=sys.stderr, flush=True)
        return 2
    distributed.shutdown()
    return code


if __name__ == "__main__":
    distributed.exit_process(main())
