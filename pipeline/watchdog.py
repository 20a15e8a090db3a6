"""A hang watchdog on every rank: stacks, the ranks that stopped, and an exit the job script requeues.

The loop reports progress at each phase it enters (`beat`): reading a step's batch, the
engine's forward, backward and optimizer step (where DeepSpeed's collectives are), the loop's
one all-reduce, evaluation, checkpoint. A daemon thread wakes every few seconds; it writes the
rank's position to OUT/hang/progress/rank-N.json when it changed (so every rank can see every
other's, across nodes, on the run's shared filesystem), and when no phase has begun for
`train.hang_timeout_s` it:

1. writes every thread's Python stack to OUT/hang/rank-N.txt (and, on CUDA, NCCL's flight
   recorder to OUT/hang/nccl-rank-N.pkl where torch provides it);
2. waits two wake-ups for the other ranks' positions, then writes one line naming the step,
   the phase, and the ranks that stopped furthest behind (the ones the others wait for) to its
   stack file and, on each node's first rank, to the log: e.g.
   `hang: no progress for 60 s at step 5: rank 1 (node-7) stopped in 'batch' of step 5; ranks
   0, 2-7 wait in 'engine' of step 5; stacks in runs/x/hang ...`;
3. writes OUT/preempted (`"reason": "hang"`), so the SLURM script requeues the job and `--resume
   auto` continues from the newest checkpoint, and ends the process with EXIT_HANG.

Start-up (engine build, a universal conversion, which has `train.conversion_timeout_s`) is not
watched: the watchdog arms at the loop's first phase.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

EXIT_HANG = 4
# The phases of a step, in the order a rank goes through them: a rank behind another in this
# order (at the same step) is one the other waits for.
PHASES = ("batch", "engine", "all-reduce", "evaluation", "checkpoint")


def _ranges(ranks: list[int]) -> str:
    """[0, 2, 3, 4, 7] -> '0, 2-4, 7'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def hang_line(positions: dict[int, dict], world: int, idle_s: float, directory: Path) -> str:
    """The one line: the ranks at the earliest position stopped; the others wait for them."""
    def order(p: dict) -> tuple[int, int]:
        return p["step"], PHASES.index(p["phase"]) if p["phase"] in PHASES else -1

    missing = [r for r in range(world) if r not in positions]
    earliest = min((order(p) for p in positions.values()), default=(0, -1))
    behind = sorted(r for r, p in positions.items() if order(p) == earliest)
    ahead = sorted(r for r in positions if r not in behind)
    step = max((p["step"] for p in positions.values()), default=0)
    parts = []
    if missing:
        parts.append(f"rank{'s' if len(missing) > 1 else ''} {_ranges(missing)} never reported progress")
    if behind and (ahead or not missing):
        p = positions[behind[0]]
        hosts = sorted({positions[r]["host"] for r in behind})
        verb = "stopped" if ahead or missing else "all stopped"
        parts.append(f"rank{'s' if len(behind) > 1 else ''} {_ranges(behind)} ({', '.join(hosts)}) {verb} in "
                     f"'{p['phase']}' of step {p['step']}")
    for phase_step in sorted({order(positions[r]) for r in ahead}):
        rs = [r for r in ahead if order(positions[r]) == phase_step]
        p = positions[rs[0]]
        parts.append(f"{'ranks' if len(rs) > 1 else 'rank'} {_ranges(rs)} {'wait' if len(rs) > 1 else 'waits'} in "
                     f"'{p['phase']}' of step {p['step']}")
    return f"hang: no progress for {idle_s:.0f} s at step {step}: {'; '.join(parts)}; stacks in {directory}"


class Watchdog:
    def __init__(self, out: Path, rank: int, world: int, timeout_s: float):
        self.dir, self.rank, self.world, self.timeout_s = Path(out) / "hang", rank, world, timeout_s
        self.progress_dir = self.dir / "progress"
        self.host = socket.gethostname()
        self.interval = max(0.5, min(5.0, timeout_s / 10))
        self.position: dict | None = None
        self.last = time.monotonic()
        self._written: dict | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def beat(self, step: int, phase: str) -> None:
        """The rank begins `phase` of `step` (its progress); arms the watchdog on the first call."""
        self.position, self.last = {"step": step, "phase": phase, "host": self.host}, time.monotonic()
        if self._thread is None and self.timeout_s > 0:
            self.progress_dir.mkdir(parents=True, exist_ok=True)
            (self.progress_dir / f"rank-{self.rank}.json").unlink(missing_ok=True)  # an earlier attempt's
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        pos = self.position
        if pos is not None and pos != self._written:
            tmp = self.progress_dir / f".rank-{self.rank}.json.tmp"
            tmp.write_text(json.dumps(pos))
            os.replace(tmp, self.progress_dir / f"rank-{self.rank}.json")
            self._written = pos

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
            except OSError:
                pass  # a full or flaky filesystem must not stop training; the next wake-up retries
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                self._fire(idle)

    def _positions(self) -> dict[int, dict]:
        out = {}
        for r in range(self.world):
            try:
                out[r] = json.loads((self.progress_dir / f"rank-{r}.json").read_text())
            except (OSError, ValueError):
                pass
        return out

    def _fire(self, idle: float) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / f"rank-{self.rank}.txt", "w") as f:
                f.write(f"rank {self.rank} on {self.host}, pid {os.getpid()}: no progress for {idle:.0f} s "
                        f"(train.hang_timeout_s={self.timeout_s:g}); last position {json.dumps(self.position)}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            _dump_nccl_trace(self.dir / f"nccl-rank-{self.rank}.pkl")
            time.sleep(2 * self.interval)  # the other ranks publish their last positions
            line = hang_line(self._positions(), self.world, idle, self.dir)
            line += f" (seen by rank {self.rank}; exit code {EXIT_HANG}; resume with --resume auto)"
            with open(self.dir / f"rank-{self.rank}.txt", "a") as f:
                f.write(f"\n{line}\n")
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one line per node: a lost node leaves the others'
                print(line, file=sys.stderr, flush=True)
            mark = {"step": (self.position or {}).get("step"), "signal": None, "reason": "hang"}
            tmp = self.dir.parent / f".preempted.{self.rank}.tmp"
            tmp.write_text(json.dumps(mark) + "\n")
            os.replace(tmp, self.dir.parent / "preempted")
        finally:
            os._exit(EXIT_HANG)


def _dump_nccl_trace(path: Path) -> None:
    """NCCL's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE > 0, set by launch/env.sh), where torch has it."""
    try:
        import torch

        if not torch.cuda.is_available():
            return
        dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
        if dump is not None:
            path.write_bytes(dump())
    except Exception:  # best effort: the stacks are already written
        pass
